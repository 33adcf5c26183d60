# Two entry points a newcomer needs: `make demo` and `make test`. Both create the virtual
# environment on first use (CPU torch pinned through constraints-cpu.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev,deepspeed,demo,eval,classifiers]'
	touch $@

.PHONY: install test test-slow demo bench
install: $(BIN)/.installed

# Whole files per xdist worker: module-scoped fixtures (shards, torchrun results) build once.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# Everything but the `slow`-marked end-to-end runs; CI runs both targets.
test: $(BIN)/.installed
	$(PYTEST) -m "not slow" tests

# The slow ones (SLURM cluster, multi-process layouts, studies, demo); prints each one's cost.
test-slow: $(BIN)/.installed
	$(PYTEST) -m slow --durations=0 --durations-min=1 tests

demo: $(BIN)/.installed
	$(BIN)/sgtm demo

bench: $(BIN)/.installed
	$(BIN)/sgtm bench

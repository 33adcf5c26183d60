# Two entry points a newcomer needs: `make demo` and `make test`. Both create the virtual
# environment on first use (CPU torch pinned through constraints-cpu.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[dev,deepspeed,demo,eval]'
	touch $@

.PHONY: install test demo bench
install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder tests

demo: $(BIN)/.installed
	$(BIN)/sgtm demo

bench: $(BIN)/.installed
	$(BIN)/sgtm bench

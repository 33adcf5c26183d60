"""Metrics sinks and SGTM label counters (no process group needed)."""
from __future__ import annotations

import json
import sys

import torch

from megatron_sgtm.train.metrics import LabelCounters, MetricsSink


def _sink(tmp_path, mode, active=True):
    return MetricsSink(active, str(tmp_path), mode, "test", "unit", {"a": 1}, progress=True,
                       total_steps=2, start_step=0)


def test_counters_count_tokens_per_label_and_true_to_applied():
    counters = LabelCounters()
    applied = torch.tensor([[2, 2, 2], [0, 0, 0], [1, 1, 1]])
    truth = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]])  # row 2: undiscovered forget
    counters.add({"applied_label": applied, "true_domain": truth})
    out = counters.reduced()
    assert (out["tokens/forget"], out["tokens/unlabeled"], out["tokens/retain"]) == (3, 3, 3)
    assert out["true_forget->forget"] == 3 and out["true_forget->unlabeled"] == 3
    assert out["true_retain->retain"] == 3 and out["true_retain->forget"] == 0
    again = LabelCounters()
    again.load_state_dict(json.loads(json.dumps(counters.state_dict())))
    assert again.reduced() == out


def test_jsonl_and_offline_wandb_on_rank0(tmp_path):
    sink = _sink(tmp_path, "offline")
    sink.step(1, 100, 2.5)
    sink.log({"step": 1, "loss": 2.5})
    sink.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [{"step": 1, "loss": 2.5}]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_other_ranks_write_nothing(tmp_path):
    sink = _sink(tmp_path, "offline", active=False)
    sink.log({"step": 1, "loss": 1.0})
    sink.close()
    assert not any(tmp_path.iterdir())


def test_missing_wandb_falls_back_to_the_metrics_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    sink = _sink(tmp_path, "online")
    sink.log({"step": 3, "loss": 1.0})
    sink.close()
    assert "wandb is not installed" in capsys.readouterr().err
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 1.0}


def test_startup_record_holds_every_ranks_seconds_and_reads(tmp_path):
    """One line per start in startup.jsonl, rank by rank (rank 1 alone read a cold 4 MB file
    before it), and one summary line printed by rank 0."""
    import os

    from _workers_train import startup_world
    from distributed import run_distributed
    from megatron_sgtm.process_io import read_bytes

    cold = tmp_path / "cold.bin"
    cold.write_bytes(os.urandom(4 << 20))
    (r0, printed0), (r1, printed1) = run_distributed(startup_world, 2, str(tmp_path), str(cold))
    assert r1 is None and printed1 == [] and len(printed0) == 1
    lines = [json.loads(x) for x in (tmp_path / "startup.jsonl").read_text().splitlines()]
    assert lines == [r0] and r0["step"] == 5 and len(r0["seconds"]) == len(r0["read_bytes"]) == 2
    assert all(s > 0 for s in r0["seconds"]) and "start-up: first step" in printed0[0]
    if read_bytes() is not None:
        assert r0["read_bytes"][1] >= 4 << 20 > r0["read_bytes"][0], r0

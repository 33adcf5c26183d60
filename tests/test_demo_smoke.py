"""`sgtm demo --budget tiny`: the whole pipeline on a corpus subset; table, plots, reuse."""
from __future__ import annotations

import json

import pytest

from megatron_sgtm.demo import METHODS, format_table, main, table_rows


@pytest.mark.slow
def test_tiny_demo_table_plots_and_reuse(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--budget", "tiny", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    # no-filter once (label-free), the other four entries at rates 0 and 0.1
    assert len(rows) == 9 and all(r["status"] == "done" for r in rows)
    table = json.loads((out / "table.json").read_text())
    assert {(t["method"], t["undiscovered_rate"]) for t in table} == {
        (m, r) for m in METHODS for r in (0.0, 0.1)}
    for t in table:
        assert t["compute_vs_no_filter"] == [1.0]  # same step count for every method
        assert 0.0 <= t["generation_rate"][0] <= 1.0
    for m in METHODS:
        assert m in printed
    # sgtm_me is SGTM with masked embeddings: its own run, ablated like sgtm.
    me = {r["run_id"]: r for r in rows if r["method"] == "sgtm_me"}
    assert len(me) == 2 and all(r["base_method"] == "sgtm" for r in me.values())
    assert (out / "table.txt").read_text().strip() in printed
    for png in ("tradeoff.png", "loss_curves.png"):
        assert (out / png).stat().st_size > 1000
    # The shards were relabelled per rate, not re-prepped.
    assert sorted(p.name for p in (out / "data").iterdir() if not p.name.startswith(".")) == [
        "shards", "shards-u0", "shards-u0.1"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*.json")}
    stamps[out / "data/shards/manifest.json"] = (out / "data/shards/manifest.json").stat().st_mtime_ns
    assert main(["--budget", "tiny", "--out", str(out)]) == 0
    assert "9 already done" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_table_orders_methods_and_shows_seed_spread():
    rows = [{"status": "done", "kind": "main", "size": "a", "method": m, "rate": r, "seed": s,
             "flops": 10.0, "retain_loss": 5.0 + s, "forget_loss": 6.0, "generation_rate": 0.5,
             "steps": 3}
            for s in (0, 1) for m, r in (("no_filter", None), ("sgtm", 0.0), ("sgtm", 0.1))]
    trows = table_rows(rows)
    assert [(t["method"], t["undiscovered_rate"]) for t in trows] == [
        ("no_filter", 0.0), ("no_filter", 0.1), ("sgtm", 0.0), ("sgtm", 0.1)]
    text = format_table(trows, "bilingual")
    assert "5.500±0.500" in text and "Spanish gen" in text


def test_bad_arguments_exit_2(capsys):
    assert main(["--workers", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--recipe", "nonsense"])

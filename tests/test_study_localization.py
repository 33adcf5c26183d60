"""The localization comparisons and the results page, from hand-made result rows: cells
average seeds, label-free entries join every rate, verdicts follow the Pareto plane, the trend
is the slope per doubling, and the page states what its executions recorded."""
from __future__ import annotations

import json
import time

import pytest

from megatron_sgtm.study import localization as loc
from megatron_sgtm.study.page import record_execution, write_page
from megatron_sgtm.study.spec import SizeSpec, StudySpec

NE = {"a": 1000.0, "b": 4000.0}


def row(size, tokens, method, rate, seed, retain, forget, base=None):
    return {"status": "done", "kind": "main", "size": size, "tokens": tokens, "method": method,
            "base_method": base or method, "rate": rate, "seed": seed, "retain_loss": retain,
            "forget_loss": forget, "non_embedding_params": NE[size], "train_seconds": 6.0,
            "eval_seconds": 6.0, "run_id": f"{size}-{tokens}-{method}-u{rate}-s{seed}"}


def grid() -> list[dict]:
    rows = []
    for tokens, gap in ((2000, -0.3), (8000, -0.1), (32000, 0.1)):
        for seed, noise in ((0, 0.0), (1, 0.02)):
            rows.append(row("a", tokens, "no_filter", None, seed, 5.0, 5.5))
            for rate in (0.0, 0.1):
                rows.append(row("a", tokens, "gradient_routing", rate, seed, 5.2, 7.0 + noise))
                rows.append(row("a", tokens, "sgtm", rate, seed, 5.2, 7.0 + gap + noise))
                rows.append(row("a", tokens, "weak_filter", rate, seed, 5.1, 7.5 - 5 * rate))
                rows.append(row("a", tokens, "sgtm_me", rate, seed, 5.3, 7.2 + gap, base="sgtm"))
    return rows


def test_cells_average_seeds_and_put_label_free_entries_in_every_rate():
    cells = loc.cells(grid() + [{"status": "failed", "kind": "main", "size": "a"}])
    assert sorted(cells) == [("a", t, r) for t in (2000, 8000, 32000) for r in (0.0, 0.1)]
    gr = cells[("a", 2000, 0.1)]["gradient_routing"]
    assert (gr.forget, gr.forget_spread, gr.seeds) == (pytest.approx(7.01), pytest.approx(0.01), 2)
    assert cells[("a", 2000, 0.0)]["no_filter"] == cells[("a", 2000, 0.1)]["no_filter"]


@pytest.mark.parametrize("method, reference, words", [
    ((5.0, 7.5), (5.1, 7.0), "m better"),
    ((5.2, 6.0), (5.1, 7.0), "r better"),
    ((5.105, 7.005), (5.1, 7.0), "tie"),
    ((5.3, 7.4), (5.1, 7.0), "trade-off: m forgets more, 2.0 forget nats per retain nat"),
    ((5.0, 6.9), (5.2, 7.5), "trade-off: r forgets more, 3.0 forget nats per retain nat"),
])
def test_verdicts_follow_the_pareto_plane(method, reference, words):
    p, q = (loc.Point(*xy, 0.0, 0.0, 1) for xy in (method, reference))
    assert loc.verdict(p, q, ("m", "r")) == words


def test_comparisons_name_entries_and_the_trend_is_the_slope_per_doubling():
    comps = loc.comparisons(grid())
    pairs = {(c.method, c.reference) for c in comps}
    assert pairs == {("sgtm", "gradient_routing"), ("sgtm", "weak_filter"),
                     ("sgtm_me", "gradient_routing"), ("sgtm_me", "weak_filter")}
    first = next(c for c in comps if (c.method, c.reference, c.tokens, c.rate)
                 == ("sgtm", "gradient_routing", 2000, 0.0))
    assert (first.tokens_per_param, first.d_forget, first.verdict) == (
        2.0, pytest.approx(-0.3), "gradient_routing better")
    # Gap -0.3, -0.1, +0.1 at 2, 8, 32 tokens/param: +0.1 nat per doubling.
    assert loc.trend(comps, "sgtm", "gradient_routing", 0.0, "a") == pytest.approx(0.1)
    assert loc.trend(comps, "sgtm", "gradient_routing", 0.0, "b") is None


def test_page_states_machine_time_tables_and_plots(tmp_path):
    out = tmp_path / "study"
    out.mkdir()
    record_execution(out, start=time.time() - 120, workers=2, executed=54)
    spec = StudySpec(name="t", sizes=[SizeSpec(name="a")])
    leak = [{"size": "a", "tokens": 8000, "rate": 0.1, "method": "sgtm", "leakage": 0.02},
            {"size": "a", "tokens": 8000, "rate": 0.1, "method": "sgtm", "leakage": 0.04}]
    page = write_page(spec, "spec.yaml", out, grid(), {"leakage": leak}, tmp_path / "docs" / "r.md")
    text = page.read_text()
    machine = json.loads((out / "executions.jsonl").read_text())["machine"]
    assert machine["cpu"] in text and f"torch {machine['torch']}" in text
    assert "took 2 min" in text and "workers: [2]" in text and "54 of 54 runs done" in text
    # Rows from older code carry no version; the page says so rather than naming this one.
    assert "Code: megatron_sgtm not recorded." in text
    rows = [r | {"sgtm_version": "9.9.9+gabc"} for r in grid()]
    versioned = write_page(spec, "spec.yaml", out, rows, {"leakage": leak}, tmp_path / "r2.md")
    assert "Code: megatron_sgtm 9.9.9+gabc." in versioned.read_text()
    assert "| a | 2,000 | 2 | 5.00 / 5.50 ±0.00 | 5.20 / 7.01 ±0.01 |" in text
    assert "**sgtm vs gradient_routing**, 6 cells: sgtm better in 2, gradient_routing better in 4" in text
    assert "| a | 8 | 10% | sgtm | 0.0300 (2 seeds) |" in text
    for png in ("gaps.png", "tradeoff.png"):
        assert (tmp_path / "docs" / "r" / png).stat().st_size > 5000
        assert f"(r/{png})" in text

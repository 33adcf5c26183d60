"""A study's results page: markdown tables and two small plots, regenerated from its rows.

    sgtm study SPEC --analyze --page docs/results.md

writes docs/results.md and docs/results/{gaps,tradeoff}.png. The page states the machine and
wall time the study's executions recorded (``executions.jsonl``, written by ``sgtm study``),
so a regenerated page never claims a machine it did not run on.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..version import version_string
from . import localization as loc
from .plots import _plt, _save, series_colors

EXECUTIONS = "executions.jsonl"


def machine() -> dict:
    """What a figure needs to name its machine: CPU model, cores, torch, Python."""
    import torch

    from ..machine import cpu_model

    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "system": platform.system()}


def record_execution(out: Path, start: float, workers: int, executed: int) -> None:
    """Append one execution (wall time, workers, runs it ran, machine) to the study's log."""
    entry = {"start": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start)),
             "seconds": round(time.time() - start, 1), "workers": workers, "runs": executed,
             "machine": machine(), "sgtm_version": version_string()}
    with open(out / EXECUTIONS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def _executions(out: Path) -> list[dict]:
    path = out / EXECUTIONS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _fmt(p: loc.Point | None) -> str:
    if p is None:
        return "-"
    spread = f" ±{max(p.retain_spread, p.forget_spread):.2f}" if p.seeds > 1 else ""
    return f"{p.retain:.2f} / {p.forget:.2f}{spread}"


def _tpp(tokens: int, size: str, ne: dict) -> str:
    return f"{tokens / ne[size]:.0f}"


def loss_tables(cells: dict, methods: list[str], ne: dict) -> list[str]:
    lines = []
    for rate in sorted({k[2] for k in cells}):
        lines += [f"**{rate:.0%} undiscovered** (retain / forget loss, nats; ± is the larger "
                  "half-range over seeds)", "",
                  "| width | tokens | tokens/param | " + " | ".join(methods) + " |",
                  "|---|---|---|" + "---|" * len(methods)]
        for (size, tokens, r), pts in cells.items():
            if r == rate:
                lines.append(f"| {size} | {tokens:,} | {_tpp(tokens, size, ne)} | "
                             + " | ".join(_fmt(pts.get(m)) for m in methods) + " |")
        lines.append("")
    return lines


def comparison_table(comps: list[loc.Comparison]) -> list[str]:
    lines = ["| width | tokens/param | undisc. | SGTM entry | vs | Δ retain | Δ forget | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comps:
        lines.append(f"| {c.size} | {c.tokens_per_param:.0f} | {c.rate:.0%} | {c.method} | "
                     f"{c.reference} | {c.d_retain:+.3f} | {c.d_forget:+.3f} | {c.verdict} |")
    return lines


def summary(comps: list[loc.Comparison]) -> list[str]:
    """Counts of verdicts per pair, and the forget-gap trend with budget per width."""
    lines = []
    pairs = list(dict.fromkeys((c.method, c.reference) for c in comps))
    for m, ref in pairs:
        mine = [c for c in comps if (c.method, c.reference) == (m, ref)]
        wins = sum(c.verdict == f"{m} better" for c in mine)
        losses = sum(c.verdict == f"{ref} better" for c in mine)
        trades = [c for c in mine if c.verdict.startswith("trade-off")]
        more = sum(c.d_forget > 0 for c in trades)
        slopes = []
        for size in dict.fromkeys(c.size for c in mine):
            for rate in sorted({c.rate for c in mine}):
                s = loc.trend(comps, m, ref, rate, size)
                if s is not None:
                    slopes.append(f"{size} {rate:.0%}: {s:+.3f}")
        lines.append(f"- **{m} vs {ref}**, {len(mine)} cells: {m} better in {wins}, {ref} better "
                     f"in {losses}, trade-offs in {len(trades)} ({m} forgets more in {more}); "
                     f"forget-gap change per doubling of tokens/param: " + ", ".join(slopes))
    return lines


def leakage_table(leak: list[dict], ne: dict) -> list[str]:
    groups = defaultdict(list)
    for e in leak:
        if "leakage" in e and e.get("rate") not in (None, "") and float(e["rate"]) > 0:
            groups[(e["size"], int(e["tokens"]), float(e["rate"]), e["method"])].append(e["leakage"])
    if not groups:
        return ["(no leakage values: no 10%-undiscovered routing run at a size and budget with "
                "a baseline series)"]
    lines = ["| width | tokens/param | undisc. | method | leakage (mean over seeds) |",
             "|---|---|---|---|---|"]
    for (size, tokens, rate, m), vals in sorted(groups.items()):
        lines.append(f"| {size} | {_tpp(tokens, size, ne)} | {rate:.0%} | {m} | "
                     f"{np.mean(vals):.4f} ({len(vals)} seed{'s' * (len(vals) > 1)}) |")
    return lines


def gap_plot(comps: list[loc.Comparison], path: Path) -> Path:
    plt = _plt()
    rates = sorted({c.rate for c in comps})
    fig, axes = plt.subplots(2, max(1, len(rates)), figsize=(5 * max(1, len(rates)), 6.5),
                             squeeze=False)
    styles = ["-o", "--s", ":^", "-.v"]
    sizes = list(dict.fromkeys(c.size for c in comps))
    pairs = list(dict.fromkeys((c.method, c.reference) for c in comps))
    colors = dict(zip(pairs, ("tab:red", "tab:orange", "tab:green", "tab:purple", "tab:blue",
                              "tab:brown") * 3))
    for j, rate in enumerate(rates):
        for i, (field, label) in enumerate((("d_forget", "Δ forget loss (higher: SGTM forgets more)"),
                                            ("d_retain", "Δ retain loss (lower: SGTM keeps more)"))):
            ax = axes[i][j]
            for pair in pairs:
                for k, size in enumerate(sizes):
                    pts = sorted((c.tokens_per_param, getattr(c, field)) for c in comps
                                 if (c.method, c.reference) == pair and c.size == size
                                 and c.rate == rate)
                    if pts:
                        x, y = zip(*pts)
                        ax.plot(x, y, styles[k % len(styles)], color=colors[pair], ms=4,
                                label=f"{pair[0]} − {pair[1]}, {size}")
            ax.axhline(0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("training tokens per non-embedding parameter")
            ax.set_ylabel(label, fontsize=8)
            ax.set_title(f"{rate:.0%} undiscovered", fontsize=9)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, path)


def tradeoff_grid(cells: dict, rows: list[dict], path: Path) -> Path:
    plt = _plt()
    sizes = list(dict.fromkeys(k[0] for k in cells))
    budgets = {s: sorted({k[1] for k in cells if k[0] == s}) for s in sizes}
    ncol = max(len(b) for b in budgets.values())
    fig, axes = plt.subplots(len(sizes), ncol, figsize=(3.4 * ncol, 3.0 * len(sizes)),
                             squeeze=False)
    colors = series_colors(rows)
    markers = ["o", "^", "s", "D"]
    for i, size in enumerate(sizes):
        for j, tokens in enumerate(budgets[size]):
            ax = axes[i][j]
            for n, rate in enumerate(sorted({k[2] for k in cells})):
                for m, p in cells.get((size, tokens, rate), {}).items():
                    ax.errorbar(p.retain, p.forget, xerr=p.retain_spread, yerr=p.forget_spread,
                                fmt=markers[n % len(markers)], color=colors.get(m, "gray"), ms=5,
                                label=f"{m} {rate:.0%}" if (i, j) == (0, 0) else None)
            ax.set_title(f"{size}, {tokens:,} tokens", fontsize=8)
            ax.set_xlabel("retain loss", fontsize=7)
            ax.set_ylabel("forget loss", fontsize=7)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=5)
    fig.tight_layout()
    return _save(fig, path)


def write_page(spec, spec_path: str, out: Path, rows: list[dict], analysis: dict,
               page: Path) -> Path:
    """The markdown page at ``page``; its plots in a folder named after it."""
    cells = loc.cells(rows)
    comps = loc.comparisons(rows)
    ne = loc.non_embedding_params(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows if r.get("kind") == "main"))
    pdir = page.with_suffix("")
    gap_plot(comps, pdir / "gaps.png")
    tradeoff_grid(cells, rows, pdir / "tradeoff.png")
    execs = _executions(out)
    done = sum(r.get("status") == "done" for r in rows)
    if execs:
        m = execs[-1]["machine"]
        where = (f"{m['cores']}-core {m['cpu']}" + (f", {m['gpu']}" if m.get("gpu") else "")
                 + f", torch {m['torch']}, Python {m['python']}")
        spent = sum(e["seconds"] for e in execs)
        ran = (f"{len(execs)} execution(s) took {spent / 60:.0f} min of wall time in all "
               f"(workers: {sorted({e['workers'] for e in execs})}; first started "
               f"{execs[0]['start']} UTC)")
    else:
        where, ran = "not recorded", "wall time not recorded"
    versions = sorted({str(r.get("sgtm_version") or "not recorded") for r in rows
                       if r.get("status") == "done"})
    code = ("megatron_sgtm " + ", ".join(versions)) if versions else "no finished runs"
    cpu_min = sum(float(r.get("train_seconds") or 0) + float(r.get("eval_seconds") or 0)
                  for r in rows if r.get("status") == "done") / 60
    rel = os.path.relpath(pdir, page.parent)
    sizes = ", ".join(f"{s.name} ({s.num_layers} layers, d{s.hidden_size}, "
                      f"{ne.get(s.name, 0):,.0f} non-embedding parameters)" for s in spec.sizes)
    text = [
        f"# Study results: {spec.name}", "",
        f"Generated from `{spec_path}` by `sgtm study {spec_path} --analyze --page {page}` "
        f"(after `sgtm study {spec_path} --workers 2`). Code: {code}. Machine: {where}. {ran}; "
        f"{done} of {len(rows)} runs done, {cpu_min:.0f} CPU-minutes inside runs.", "",
        f"Sizes: {sizes}. Losses are held-out next-token cross-entropy after ablation (routing "
        "methods) and logit calibration, so a higher forget loss at the same retain loss is "
        "better localization.", "",
        "## Summary", "", *summary(comps), "",
        f"![forget and retain gaps]({rel}/gaps.png)", "",
        "## Losses", "", *loss_tables(cells, methods, ne),
        f"![trade-off per width and budget]({rel}/tradeoff.png)", "",
        "## SGTM against Gradient Routing and the weak filter", "",
        f"Δ = SGTM entry − reference; a difference within {loc.TIE} nat counts as a tie.", "",
        *comparison_table(comps), "",
        "## Leakage", "",
        "Equivalent forget tokens (from the no-filter baseline series of the same width and "
        "budget) per undiscovered forget token seen; 0: nothing leaked, 1: as if unfiltered. "
        "Values well above 1 come where the baseline series is nearly flat (a model too small "
        "or too briefly trained for the forget share to move its forget loss much): there the "
        "metric saturates and says only that ablation removed little.", "",
        *leakage_table(analysis.get("leakage", []), ne), ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(text))
    tmp.replace(page)
    return page

"""Study and demo plots (PNG, matplotlib Agg)."""
from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np

from .methods import base_of

COLORS = {"no_filter": "black", "weak_filter": "tab:orange", "strict_filter": "tab:brown",
          "gradient_routing": "tab:blue", "sgtm": "tab:red", "activation_masking": "tab:purple"}
# Named entries that are not base methods take these, in order of appearance.
EXTRA_COLORS = ("tab:green", "tab:pink", "tab:olive", "tab:cyan", "tab:gray", "gold",
                "darkred", "navy", "teal", "salmon")


def series_colors(rows: list[dict]) -> dict[str, str]:
    """Method entry name -> plot colour: a base method keeps its own; an entry that is the
    only one built on its base method takes that method's colour when it is free; every
    other entry takes the next extra colour (they repeat after ten)."""
    names = list(dict.fromkeys(r["method"] for r in rows if r.get("method")))
    bases = {r["method"]: base_of(r) for r in rows if r.get("method")}
    out = {n: COLORS[n] for n in names if n in COLORS}
    extra = itertools.cycle(EXTRA_COLORS)
    for n in names:
        if n in out:
            continue
        inherited = COLORS.get(bases[n])
        sole_user = [m for m in names if bases[m] == bases[n]] == [n]
        free = inherited is not None and inherited not in out.values()
        out[n] = inherited if sole_user and free else next(extra)
    return out


def _run_methods(rows: list[dict]) -> dict[str, str]:
    return {r["run_id"]: r["method"] for r in rows if r.get("run_id") and r.get("method")}


def _method_of(run_id: str, methods: dict[str, str]) -> str:
    """A run's method entry: from its row when known, else parsed from a base-method run id."""
    if run_id in methods:
        return methods[run_id]
    return next((m for m in COLORS if f"-{m}-" in run_id), "no_filter")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    _plt().close(fig)
    return path


def _f(r, k):
    v = r.get(k)
    return None if v in (None, "") else float(v)


def _main_done(rows):
    return [r for r in rows if r.get("status") == "done" and r.get("kind") == "main"]


def tradeoff(rows: list[dict], path: Path, title: str = "") -> Path:
    """Retain vs forget loss (calibrated), one panel per undiscovered rate; no-filter in each."""
    plt = _plt()
    rows = _main_done(rows)
    colors = series_colors(rows)
    rates = sorted({float(r["rate"]) for r in rows if r.get("rate") not in (None, "")}) or [None]
    fig, axes = plt.subplots(1, len(rates), figsize=(4.2 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for r in rows:
            if r.get("rate") in (None, "") or rate is None or float(r["rate"]) == rate:
                x, y = _f(r, "retain_loss"), _f(r, "forget_loss")
                if x is None or y is None:
                    continue
                ax.scatter(x, y, color=colors.get(r["method"], "gray"), s=28,
                           marker="o" if str(r.get("seed")) in ("0", "None") else "^")
                if len({q["size"] for q in rows}) > 1:
                    ax.annotate(r["size"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        for m, c in colors.items():
            ax.scatter([], [], color=c, label=m)
        ax.set_xlabel("retain loss (calibrated)")
        ax.set_ylabel("forget loss (calibrated)")
        ax.set_title(f"undiscovered {rate:g}" if rate is not None else "all runs")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title or "retain/forget trade-off (right-down is better forgetting at equal retain)")
    return _save(fig, path)


def loss_curves(curves: dict[str, list[dict]], path: Path, rows: list[dict] = ()) -> Path:
    """Held-out retain and forget loss during training, one line per run (``rows``: the
    result rows, to colour runs by method entry)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    methods, colors = _run_methods(rows), series_colors(list(rows))
    for run_id, curve in sorted(curves.items()):
        method = _method_of(run_id, methods)
        style = "-" if "-s0" in run_id else "--"
        for ax, key in zip(axes, ("retain", "forget")):
            pts = [(p["tokens"], p[key]) for p in curve if key in p]
            if pts:
                ax.plot(*zip(*pts), style, color=colors.get(method, COLORS.get(method, "gray")),
                        alpha=0.8, lw=1.2,
                        label=run_id if key == "retain" else None)
    for ax, key in zip(axes, ("retain", "forget")):
        ax.set_xlabel("training tokens")
        ax.set_ylabel(f"held-out {key} loss (not ablated)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=5)
    return _save(fig, path)


def leakage_plot(leak: list[dict], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    by_size = defaultdict(list)
    colors = series_colors(leak)
    for e in leak:
        if "leakage" in e and e.get("rate") not in (None, ""):
            by_size[(e["size"], e["method"])].append((float(e["rate"]), e["leakage"]))
    for (size, method), pts in sorted(by_size.items()):
        pts.sort()
        ax.plot(*zip(*pts), "o-", label=f"{method} {size}", color=colors.get(method))
    ax.set_xlabel("undiscovered rate")
    ax.set_ylabel("leakage (1 = data filtering)")
    ax.grid(alpha=0.3)
    if by_size:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no leakage values", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def penalty_bars(summary: dict, path: Path) -> Path:
    plt = _plt()
    keys = list(summary)
    splits = sorted({s for v in summary.values() for s in v})
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(keys)), 3.6))
    width = 0.8 / max(1, len(splits))
    for i, s in enumerate(splits):
        ax.bar(np.arange(len(keys)) + i * width, [summary[k].get(s, np.nan) for k in keys], width,
               label=s)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, rotation=30, ha="right", fontsize=7)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_ylabel("compute penalty")
    ax.legend(fontsize=7)
    return _save(fig, path)


def attack_curves(curves: dict[str, list[dict]], targets: dict[str, float], path: Path,
                  rows: list[dict] = ()) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    methods, colors = _run_methods(rows), series_colors(list(rows))
    for run_id, curve in sorted(curves.items()):
        method = _method_of(run_id, methods)
        ax.plot([p["step"] for p in curve], [p["forget_loss"] for p in curve], "-o", ms=2,
                color=colors.get(method, COLORS.get(method)), label=run_id)
    for t in sorted(set(targets.values())):
        ax.axhline(t, color="black", ls=":", lw=0.8)
    ax.set_xlabel("fine-tuning step (50/50 forget/retain)")
    ax.set_ylabel("forget loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=5)
    return _save(fig, path)


def scaling_plot(fits: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for (split, fit), color in zip(fits.items(), ("tab:green", "tab:red", "tab:gray")):
        pts = np.array(fit["points"], dtype=float)
        ax.scatter(pts[:, 0], pts[:, 1], color=color, label=f"{split} (no-filter)")
        if "a" in fit:
            c = np.geomspace(pts[:, 0].min() / 1.5, pts[:, 0].max() * 1.5, 50)
            ax.plot(c, fit["a"] * c ** (-fit["b"]), color=color, lw=1,
                    label=f"{fit['a']:.3g} C^-{fit['b']:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C = 6ND (FLOPs)")
    ax.set_ylabel("loss (calibrated)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)

"""Study analysis: scaling-law fit, compute penalties, leakage, fine-tuning recovery.

The math is megatron_sgtm.post.metrics; this module only picks the right rows for each.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from ..post.metrics import MetricError, compute_penalty, fit_power_law, leakage
from .methods import ABLATED, base_of

SPLITS = ("retain", "forget", "adjacent")


def _num(row: dict, key: str) -> Optional[float]:
    v = row.get(key)
    if v in (None, ""):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _done(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "done"]


def fit_scaling(rows: list[dict]) -> dict:
    """l(C) = a C^-b per eval split on the main no-filter runs (seeds averaged per point)."""
    fits = {}
    base = [r for r in _done(rows) if r["kind"] == "main" and base_of(r) == "no_filter"]
    for split in SPLITS:
        points = defaultdict(list)
        for r in base:
            loss, flops = _num(r, f"{split}_loss"), _num(r, "flops")
            if loss is not None and flops:
                points[flops].append(loss)
        if not points:
            continue
        c = sorted(points)
        l = [float(np.mean(points[x])) for x in c]
        try:
            a, b = fit_power_law(c, l)
            fits[split] = {"a": a, "b": b, "points": [[x, y] for x, y in zip(c, l)]}
        except MetricError as exc:
            fits[split] = {"error": str(exc), "points": [[x, y] for x, y in zip(c, l)]}
    return fits


def penalties(rows: list[dict], fits: dict) -> list[dict]:
    """(C_method - C_eq) / C_method per run and split, with C_eq from the no-filter fit."""
    out = []
    for r in _done(rows):
        if r["kind"] != "main":
            continue
        entry = {k: r.get(k) for k in ("run_id", "size", "tokens", "method", "rate", "seed")}
        entry["base_method"] = base_of(r)
        for split, fit in fits.items():
            loss, flops = _num(r, f"{split}_loss"), _num(r, "flops")
            if "a" in fit and loss is not None and flops:
                entry[split] = compute_penalty(loss, flops, fit["a"], fit["b"])
        out.append(entry)
    return out


def penalty_summary(pen: list[dict]) -> dict:
    """Mean penalty per (method, rate) and split."""
    groups = defaultdict(lambda: defaultdict(list))
    for p in pen:
        key = f"{p['method']}@{_rate_str(p.get('rate'))}"
        for split in SPLITS:
            if split in p:
                groups[key][split].append(p[split])
    return {k: {s: float(np.mean(v)) for s, v in g.items()} for k, g in sorted(groups.items())}


def _rate_str(rate) -> str:
    return "-" if rate in (None, "") else f"{float(rate):g}"


def leakage_rows(rows: list[dict]) -> list[dict]:
    """Leakage of every routing run that saw undiscovered forget tokens, against the
    no-filter series (forget tokens seen -> plain forget loss) of the same size and budget."""
    done = _done(rows)
    series = defaultdict(list)
    for r in done:
        if r["kind"] == "leakage":
            series[(r["size"], str(r["tokens"]))].append(
                (float(r["forget_tokens_seen"]), float(r["forget_loss_raw"])))
    out = []
    for r in done:
        if r["kind"] != "main" or base_of(r) not in ABLATED:
            continue
        pts = series.get((r["size"], str(r["tokens"])))
        undiscovered = _num(r, "undiscovered_tokens_seen") or 0.0
        entry = {k: r.get(k) for k in ("run_id", "size", "tokens", "method", "rate", "seed")}
        entry["base_method"] = base_of(r)
        entry["undiscovered_tokens_seen"] = undiscovered
        if not pts:
            entry["error"] = "no leakage baseline series for this size and budget"
        else:
            try:
                lk = leakage(float(r["forget_loss_raw"]), pts, undiscovered)
                entry.update(leakage=lk.leakage, equivalent_forget_tokens=lk.equivalent_forget_tokens,
                             clamped=lk.clamped)
            except MetricError as exc:
                entry["error"] = str(exc)
        out.append(entry)
    return out


def attack_summary(rows: list[dict], curves: dict[str, list[dict]]) -> list[dict]:
    """Steps (and forget tokens) of adversarial fine-tuning until the forget loss reaches the
    no-filter model's (same size, budget and seed)."""
    done = {r["run_id"]: r for r in _done(rows)}
    nf = {(r["size"], str(r["tokens"]), str(r["seed"])): float(r["forget_loss_raw"])
          for r in done.values() if r["kind"] == "main" and base_of(r) == "no_filter"}
    out = []
    for run_id, curve in sorted(curves.items()):
        r = done.get(run_id)
        if r is None or base_of(r) == "no_filter":
            continue
        target = nf.get((r["size"], str(r["tokens"]), str(r["seed"])))
        hit = next((p for p in curve if target is not None and p["forget_loss"] <= target), None)
        out.append({"run_id": run_id, "method": r["method"], "base_method": base_of(r),
                    "rate": r.get("rate"),
                    "target_forget_loss": target, "start_forget_loss": curve[0]["forget_loss"],
                    "end_forget_loss": curve[-1]["forget_loss"],
                    "steps_to_target": hit["step"] if hit else None,
                    "forget_tokens_to_target": hit["forget_tokens"] if hit else None,
                    "max_steps": curve[-1]["step"]})
    return out


def analyze(rows: list[dict], attack_curves: dict[str, list[dict]]) -> dict:
    fits = fit_scaling(rows)
    pen = penalties(rows, fits)
    return {"fits": fits, "penalties": pen, "penalty_summary": penalty_summary(pen),
            "leakage": leakage_rows(rows), "attack": attack_summary(rows, attack_curves)}


def format_report(result: dict) -> str:
    lines = ["scaling law l(C) = a * C^-b on no-filter runs (C = 6 N_non-embedding D):"]
    for split, fit in result["fits"].items():
        if "a" in fit:
            lines.append(f"  {split:<9} a = {fit['a']:.4g}  b = {fit['b']:.4f}  ({len(fit['points'])} points)")
        else:
            lines.append(f"  {split:<9} no fit: {fit['error']}")
    if result["penalty_summary"]:
        lines.append("compute penalty (C_method - C_eq) / C_method, mean over runs:")
        for key, splits in result["penalty_summary"].items():
            lines.append(f"  {key:<24} " + "  ".join(f"{s} {v:+.3f}" for s, v in splits.items()))
    if result["leakage"]:
        lines.append("leakage (equivalent forget tokens / undiscovered forget tokens seen):")
        for e in result["leakage"]:
            val = (f"{e['leakage']:.4f}" + (f" (clamped {e['clamped']})" if e.get("clamped") else "")
                   if "leakage" in e else f"n/a: {e['error']}")
            lines.append(f"  {e['run_id']:<36} {val}")
    if result["attack"]:
        lines.append("adversarial fine-tuning: steps until the forget loss reaches no-filter's:")
        for e in result["attack"]:
            steps = e["steps_to_target"] if e["steps_to_target"] is not None else f">{e['max_steps']}"
            lines.append(f"  {e['run_id']:<36} {steps} steps  (forget loss {e['start_forget_loss']:.3f}"
                         f" -> {e['end_forget_loss']:.3f}, target {e['target_forget_loss']})")
    return "\n".join(lines)

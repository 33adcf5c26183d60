"""The manifest and the run state: what a shard directory holds, and whether a rerun may
continue the work already in it.

The manifest is written last and with sorted keys, so the same inputs give the same bytes,
and a directory without ``manifest.json`` is never taken as complete. The plan
(``.prep/plan.json``) records the recipe fingerprint and the shard list; ``.prep/inputs.json``
records each input file's size and modification time (machine-local, so it is kept out of
the manifest). A rerun continues only when both match; otherwise it needs ``--force``.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_prep import shards
from data_prep.errors import PrepError

FORMAT_VERSION = 2
PLAN, INPUTS = "plan.json", "inputs.json"


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, sort_keys=True, indent=2) + "\n"


def load_manifest(directory: Path) -> dict | None:
    path = Path(directory) / "manifest.json"
    if not path.exists():
        return None
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(m, dict) or m.get("format_version") != FORMAT_VERSION:
        raise PrepError(f"{path}: not a format-{FORMAT_VERSION} data_prep manifest "
                        "(made by another version of sgtm prep; rebuild it with --force)")
    return m


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise PrepError(f"{path}: unreadable ({e}); rerun with --force") from None


def check_state(out: Path, plan_text: str, stamps: dict) -> bool:
    """True when ``out`` holds this plan over unchanged inputs (continue it); False when it
    holds no prep output (start); PrepError when it holds another corpus (needs --force)."""
    out = Path(out)
    state = out / shards.STATE
    old_plan = _read_json(state / PLAN)
    if old_plan is None:
        if (out / "manifest.json").exists() or (out / shards.TRAIN_DIR).exists():
            raise PrepError(f"output {out}: holds shards made by another recipe or version of "
                            "sgtm prep; choose another directory or pass --force")
        return False
    same_plan = (state / PLAN).read_text(encoding="utf-8") == plan_text
    same_inputs = _read_json(state / INPUTS) == stamps
    if same_plan and same_inputs:
        return True
    what = "input files changed since it was made" if not same_inputs else "a different recipe or shard plan"
    raise PrepError(f"output {out}: holds a different corpus ({what}; recipe {old_plan.get('recipe_name')!r}, "
                    f"fingerprint {str(old_plan.get('recipe_fingerprint'))[:12]}); "
                    "choose another directory or pass --force")


def clear(out: Path) -> None:
    """Remove what prep writes (manifest first), leaving other files alone."""
    out = Path(out)
    shards.remove_manifest(out)
    for name in ("tokenizer.model", "train_classifier_seed.npy"):
        (out / name).unlink(missing_ok=True)
    for split in shards.TEST_SPLITS + ("train",):
        for p in out.glob(f"{split}_*"):
            if p.is_file():
                p.unlink()
    for d in (shards.TRAIN_DIR, shards.STATE, ".packing_cache"):
        shutil.rmtree(out / d, ignore_errors=True)


def write_plan(out: Path, plan_text: str, stamps: dict) -> None:
    state = Path(out) / shards.STATE
    state.mkdir(parents=True, exist_ok=True)
    shards.write_json_atomic(state / INPUTS, stamps)
    tmp = state / f".{PLAN}.tmp"
    tmp.write_text(plan_text, encoding="utf-8")
    tmp.replace(state / PLAN)

"""The manifest: what a shard directory holds, how it was made, and how noisy it is.

Written last and with sorted keys, so the same inputs give the same bytes, and a
directory without ``manifest.json`` is never taken as complete.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_prep.corpus import DOMAIN_NAMES
from data_prep.errors import PrepError
from data_prep.noise import LABEL_NAMES

FORMAT_VERSION = 1


def split_stats(truth: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> dict:
    lengths = np.asarray(lengths, dtype=np.int64)
    return {
        "num_docs": int(len(truth)),
        "num_tokens": int(lengths.sum()),
        "docs_per_true_domain": {n: int((truth == i).sum()) for i, n in enumerate(DOMAIN_NAMES)},
        "tokens_per_true_domain": {n: int(lengths[truth == i].sum()) for i, n in enumerate(DOMAIN_NAMES)},
        "tokens_per_applied_label": {n: int(lengths[labels == i].sum()) for i, n in enumerate(LABEL_NAMES)},
    }


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
        raise PrepError(f"{path}: not a format-{FORMAT_VERSION} data_prep manifest")
    return m


def check_output_dir(out: Path, fingerprint: str, force: bool) -> dict | None:
    """Refuse to overwrite a directory that holds a different corpus (unless forced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"output {out}: exists and is not a directory")
    try:
        existing = load_manifest(out)
    except PrepError:
        if not force:
            raise
        return None
    if existing and existing.get("corpus_fingerprint") != fingerprint and not force:
        raise PrepError(f"output {out}: holds a different corpus (recipe {existing.get('recipe', {}).get('name')!r}, "
                        f"fingerprint {str(existing.get('corpus_fingerprint'))[:12]}); "
                        "choose another directory or pass --force")
    return existing

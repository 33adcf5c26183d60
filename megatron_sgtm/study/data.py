"""Shard directories per undiscovered rate, and the sequences each method trains on.

One ``sgtm prep`` builds the base shards; every other rate is a copy relabelled in seconds
(data_prep.relabel rewrites only the label sidecar). Packing is label-homogeneous (one applied
label per sequence), so a forget document never shares attention context with a retain one.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

TRUTH_RETAIN, TRUTH_FORGET, TRUTH_ADJACENT = 0, 1, 2


@contextlib.contextmanager
def file_lock(path: Path):
    """Serialise data preparation between workers and SLURM array tasks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _manifest(d: Path) -> Optional[dict]:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def ensure_base(recipe_path: str, overrides: list[str], out: Path,
                log: Callable[[str], None] = print) -> Path:
    """Build the base shards once; a finished directory with the same recipe is reused."""
    from data_prep.pipeline import prepare
    from data_prep.recipe import load_recipe

    out = Path(out)
    recipe = load_recipe(recipe_path, overrides)
    stamp = {"recipe": recipe.to_dict()}
    with file_lock(out.parent / ".prep.lock"):
        m = _manifest(out)
        if m is not None and json.loads((out / ".study_stamp.json").read_text()
                                        if (out / ".study_stamp.json").exists() else "{}") == stamp:
            log(f"data: reusing {out}")
            return out
        log(f"data: preparing {out} from {recipe_path}")
        prepare(recipe, out, force=True, workers=2, progress=False, log=log)
        (out / ".study_stamp.json").write_text(json.dumps(stamp))
    return out


def rate_dir(base: Path, rate: float, own_share: Optional[float] = None) -> Path:
    """Where the shards relabelled at ``rate`` live: ``<base>-u<rate>`` under the spec-wide
    retain-mode share, ``<base>-u<rate>-m<share>`` for a method's own share."""
    base = Path(base)
    suffix = "" if own_share is None else f"-m{own_share:g}"
    return base.parent / f"{base.name}-u{rate:g}{suffix}"


def ensure_rate(base: Path, rate: float, retain_mode_share: Optional[float],
                log: Callable[[str], None] = print, own_share: bool = False) -> Path:
    """The base shards relabelled at undiscovered rate ``rate`` (a sibling directory).

    ``own_share``: ``retain_mode_share`` is one method's own, cached in its own directory
    per (rate, share); otherwise it is the spec-wide one (None: the recipe's)."""
    from data_prep.relabel import relabel

    base = Path(base)
    out = rate_dir(base, rate, retain_mode_share if own_share else None)
    with file_lock(base.parent / ".prep.lock"):
        m = _manifest(out)
        if m is not None and m["noise_policy"]["undiscovered_rate"] == rate and (
                retain_mode_share is None or m["noise_policy"]["retain_mode_share"] == retain_mode_share):
            return out
        share = "" if retain_mode_share is None else f", retain-mode share {retain_mode_share:g}"
        log(f"data: relabelling a copy of {base.name} at undiscovered rate {rate:g}{share}")
        tmp = base.parent / f".{out.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(base, tmp, ignore=shutil.ignore_patterns(".staging-*", ".study_stamp.json"))
        relabel(tmp, undiscovered_rate=rate, retain_mode_share=retain_mode_share)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    return out


@dataclass
class Docs:
    tokens: list[np.ndarray]
    labels: np.ndarray  # applied label per document
    truth: np.ndarray


def read_docs(shard_dir: Path, split: str) -> Docs:
    """A split's documents through the training reader (validated; a document's applied
    label is the largest of its tokens' labels, as in training)."""
    from ..data import open_split

    shard = open_split(shard_dir, split)
    tokens = [shard.get_tokens(i).astype(np.int64) for i in range(shard.num_docs)]
    return Docs(tokens, shard.doc_labels, shard.doc_truth)


@dataclass
class Packed:
    """Fixed-length sequences ``[n, seq+1]`` with one applied label each."""

    tokens: np.ndarray
    labels: np.ndarray
    # Per sequence: tokens whose true domain is forget, and of those the ones trained unlabeled.
    forget_tokens: np.ndarray
    undiscovered_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def _pack_group(tokens: list[np.ndarray], truth: list[int], label: int, seq: int):
    if not tokens:
        return []
    stream = np.concatenate(tokens)
    is_forget = np.concatenate([np.full(len(t), tr == TRUTH_FORGET) for t, tr in zip(tokens, truth)])
    n = (len(stream) - 1) // seq
    out = []
    for i in range(n):
        window = slice(i * seq, i * seq + seq + 1)
        f = int(is_forget[window][:-1].sum())
        out.append((stream[window], label, f, f if label == 0 else 0))
    return out


def pack(docs: Docs, seq: int, seed: int, keep: Optional[np.ndarray] = None,
         labels: Optional[np.ndarray] = None) -> Packed:
    """Shuffle documents, concatenate those of one label, cut into ``seq+1`` windows, shuffle."""
    rng = np.random.default_rng(seed)
    keep = np.ones(len(docs.tokens), bool) if keep is None else keep
    labels = docs.labels if labels is None else labels
    rows = []
    for label in (0, 1, 2):
        idx = np.flatnonzero(keep & (labels == label))
        idx = idx[rng.permutation(len(idx))]
        rows += _pack_group([docs.tokens[i] for i in idx], [int(docs.truth[i]) for i in idx], label, seq)
    if not rows:
        raise ValueError(f"no complete sequence of length {seq + 1} in the selected documents")
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return Packed(np.stack([r[0] for r in rows]), np.array([r[1] for r in rows], np.int64),
                  np.array([r[2] for r in rows], np.int64), np.array([r[3] for r in rows], np.int64))


def method_selection(docs: Docs, method: str, seed: int,
                     forget_share: Optional[float] = None) -> tuple[np.ndarray, np.ndarray]:
    """(documents kept, applied labels) for a study method (SGTM.md section 6)."""
    n = len(docs.tokens)
    keep = np.ones(n, bool)
    labels = np.zeros(n, np.int64)
    if method == "no_filter" and forget_share is not None:
        # Leakage baseline: every non-forget document plus a seeded share of forget ones.
        forget = np.flatnonzero(docs.truth == TRUTH_FORGET)
        chosen = np.random.default_rng(seed + 7919).permutation(forget)[:int(round(forget_share * len(forget)))]
        keep = docs.truth != TRUTH_FORGET
        keep[chosen] = True
    elif method == "weak_filter":
        keep = docs.labels != 2
    elif method == "strict_filter":
        keep = (docs.labels != 2) & (docs.truth != TRUTH_ADJACENT)
    elif method not in ("no_filter",):
        labels = docs.labels.copy()
    return keep, labels


def by_truth(docs: Docs, truth: int, seq: int, seed: int, limit: Optional[int]) -> Optional[Packed]:
    keep = docs.truth == truth
    if not keep.any():
        return None
    packed = pack(docs, seq, seed, keep=keep, labels=np.zeros(len(docs.tokens), np.int64))
    if limit is not None:
        packed = Packed(packed.tokens[:limit], packed.labels[:limit], packed.forget_tokens[:limit],
                        packed.undiscovered_tokens[:limit])
    return packed


def eval_split(shard_dir: Path, split: str, seq: int, limit: Optional[int]) -> Optional[Packed]:
    if not (Path(shard_dir) / f"{split}_tokens.bin").exists():
        return None
    docs = read_docs(shard_dir, split)
    packed = pack(docs, seq, seed=0, labels=np.zeros(len(docs.tokens), np.int64))
    if limit is not None:
        packed = Packed(packed.tokens[:limit], packed.labels[:limit], packed.forget_tokens[:limit],
                        packed.undiscovered_tokens[:limit])
    return packed


def prompts(shard_dir: Path, n: int, length: int) -> np.ndarray:
    """Opening tokens of held-out forget-domain documents (the generation-rate prompts)."""
    docs = read_docs(shard_dir, "test_forget")
    starts = [t[:length] for t in docs.tokens if len(t) > length + 4][:n]
    if not starts:
        raise ValueError("test_forget has no document long enough to prompt with")
    return np.stack(starts)

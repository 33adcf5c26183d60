"""The Hugging Face export an lm-eval run reads: written from a checkpoint, or reused.

An export made here carries ``sgtm_eval_source.json``: the checkpoint directory, a fingerprint
of its files (names, sizes, mtimes and the metadata's sha256), whether theta_forget was zeroed,
and the tokenizer's sha256. A later run with the same checkpoint and ablation reuses it; a
changed checkpoint replaces it (atomically: written beside, then swapped in); a directory
without that file is never overwritten. Like every export, it also gets ``hf_import``'s
``sgtm_export.json`` record (config and sha256 of each file), so the other commands load it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from .ckpt_io import PostError, _find_sha

SOURCE_FILE = "sgtm_eval_source.json"
META_FILE = "sgtm_meta.json"


def is_hf_dir(path: Path) -> bool:
    """A transformers model directory (an export) rather than a megatron checkpoint."""
    from .hf_import import is_hf_export

    return is_hf_export(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(step_dir: Path) -> str:
    """Changes whenever any file of the checkpoint is rewritten."""
    h = hashlib.sha256(_sha256(step_dir / META_FILE).encode())
    for f in sorted(p for p in Path(step_dir).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(step_dir)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _config_strings(node) -> Iterable[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from _config_strings(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _config_strings(v)
    elif isinstance(node, str):
        yield node


def find_tokenizer(meta: dict, explicit: Optional[Path], checkpoint: Path,
                   required: bool) -> Optional[Path]:
    """The run's ``tokenizer.model``: ``explicit`` (a file or a prep directory), else one in a
    directory the stored config names (``data.dir``). Its sha256 must match the one the
    checkpoint recorded, when it recorded one."""
    recorded = _find_sha(meta)
    if explicit is not None:
        path = Path(explicit) / "tokenizer.model" if Path(explicit).is_dir() else Path(explicit)
        if not path.is_file():
            raise PostError(f"tokenizer {path}: does not exist")
        candidates = [path]
    else:
        # A relative data.dir was relative to where training ran: here, or an ancestor of
        # the checkpoint (runs/shards/... next to runs/ckpt/...). The sha256 check below keeps
        # a same-named directory of another run from being taken.
        bases = [Path()] + list(Path(checkpoint).resolve().parents)
        candidates = [base / v / "tokenizer.model" for v in _config_strings(meta.get("config"))
                      for base in (bases if v and not Path(v).is_absolute() else [Path()])
                      if v and (base / v / "tokenizer.model").is_file()]
    for path in candidates:
        if recorded and _sha256(path) != recorded:
            if explicit is not None:
                raise PostError(f"tokenizer {path}: sha256 {_sha256(path)[:12]}… differs from "
                                f"the {recorded[:12]}… checkpoint {checkpoint} was trained with")
            continue
        return path
    if required:
        where = ("no directory named in its stored config holds a tokenizer.model"
                 + (f" with sha256 {recorded[:12]}…" if recorded else ""))
        raise PostError(f"checkpoint {checkpoint}: its tokenizer is missing ({where}); pass "
                        "--tokenizer PATH or --data PREP_DIR of the run's `sgtm prep` output")
    return None


def provenance(step_dir: Path, ablated: bool, tokenizer: Path) -> dict:
    return {"checkpoint": str(Path(step_dir).resolve()), "fingerprint": fingerprint(step_dir),
            "ablated": bool(ablated), "tokenizer_sha256": _sha256(tokenizer)}


def default_dir(step_dir: Path, ablated: bool) -> Path:
    step_dir = Path(step_dir)
    return step_dir.with_name(step_dir.name + (".hf-ablated" if ablated else ".hf"))


def reusable(hf_dir: Path, wanted: dict) -> bool:
    """True if ``hf_dir`` is our export of exactly ``wanted``; False if absent or stale;
    refuses a directory that is not an export made here."""
    hf_dir = Path(hf_dir)
    if not hf_dir.exists():
        return False
    try:
        have = json.loads((hf_dir / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        raise PostError(f"export directory {hf_dir}: exists but holds no {SOURCE_FILE} (not "
                        "an export this command made); choose another --hf-dir") from None
    return have == wanted


def write_export(full: dict, core, hf_dir: Path, tokenizer: Path, wanted: dict,
                 meta: dict) -> None:
    """Export into a temp sibling, then swap it in for ``hf_dir`` (which may be a stale one)."""
    from .export_hf import export_hf
    from .hf_import import write_record

    hf_dir = Path(hf_dir)
    tmp = hf_dir.with_name(f".{hf_dir.name}.tmp-{os.getpid()}")
    old = hf_dir.with_name(f".{hf_dir.name}.old-{os.getpid()}")
    try:
        export_hf(full, core, tmp, tokenizer)
        (tmp / SOURCE_FILE).write_text(json.dumps(wanted, indent=1, sort_keys=True) + "\n")
        write_record(tmp, core, meta)  # last: it hashes every other file
        if hf_dir.exists():
            hf_dir.rename(old)
        tmp.rename(hf_dir)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover)

"""Merge a finished shard directory's train shards into fewer, larger files.

Every group of ``shards_per_file`` consecutive shards becomes one prefix
``train/merged-NNNNN``: token and label files are concatenated by streaming (the .bin bytes
in 16 MiB blocks, the index arrays through memory maps; see data_prep.indexed), giving the
same bytes as megatron-core's ``IndexedDatasetBuilder.add_index`` without its per-document
Python lists. The small per-document (and per-span) arrays of one group are concatenated
in memory (about 20 bytes per document), and so are the label-run files (their runs shifted
and joined at the boundaries); the merged prefix's facts combine the group's. Held-out
splits and the tokenizer are copied; the manifest is rewritten with the new shard list,
everything else unchanged, and written last.
Training reads the result exactly like the source (same documents, same order).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from data_prep import shards
from data_prep.errors import PrepError
from data_prep.indexed import merge
from data_prep.manifest import dumps, load_manifest
from data_prep.reduce import heldout_entry
from megatron_sgtm.data import facts


def _group_files(src: Path, tmp: Path, group: list[dict], prefix: str,
                 token_dtype: str) -> tuple[list[str], dict]:
    """The merged prefix's files (staged in ``tmp``) and its facts: the group's facts and
    label runs combined, or, when a shard records none (prepped before they were), a scan
    of the merged files."""
    names = []
    for kind in ("tokens", "labels"):
        merge([src / f"{e['prefix']}_{kind}" for e in group], tmp / f"{prefix}_{kind}")
        names += shards.indexed_files(prefix, kind)
    for kind in shards.DOC_ARRAYS:
        parts = [shards.load_array(src, e["prefix"], kind, required=False) for e in group]
        if all(p is None for p in parts):
            continue
        if any(p is None for p in parts):
            raise PrepError(f"{src}: {kind} sidecar present in some shards only")
        names.append(shards.save_array(tmp, prefix, kind, np.concatenate(parts)))
    if all(e.get("facts") for e in group):
        runs = facts.merge_runs((shards.load_array(src, e["prefix"], facts.RUNS_KIND), e["num_tokens"])
                                for e in group)
        merged = facts.merge_facts([e["facts"] for e in group], runs)
    else:
        merged, runs = shards.scan_facts(tmp, prefix, token_dtype)
    names.append(shards.save_array(tmp, prefix, facts.RUNS_KIND, runs))
    return names, merged


def merge_directory(src: str | Path, out: str | Path, shards_per_file: int) -> dict:
    src, out = Path(src), Path(out)
    if shards_per_file < 1:
        raise PrepError("--shards-per-file must be >= 1")
    manifest = load_manifest(src)
    if manifest is None:
        raise PrepError(f"merge {src}: no manifest.json (not a finished shard directory)")
    if out.exists() and any(out.iterdir()):
        raise PrepError(f"merge: output {out} exists and is not empty")
    entries = manifest["splits"]["train"]["shards"]
    for e in entries:
        for name, rec in e["files"].items():
            p = src / name
            if not p.is_file() or p.stat().st_size != rec["bytes"]:
                raise PrepError(f"merge {src}: {p} is missing or not the size the manifest records")
    new_entries = []
    with shards.staging(out, "merge") as tmp:
        (tmp / shards.TRAIN_DIR).mkdir()
        for g in range(0, len(entries), shards_per_file):
            group = entries[g:g + shards_per_file]
            prefix = f"{shards.TRAIN_DIR}/merged-{g // shards_per_file:05d}"
            names, merged_facts = _group_files(src, tmp, group, prefix, manifest["token_dtype"])
            new_entries.append({"prefix": prefix, "num_docs": sum(e["num_docs"] for e in group),
                                "num_tokens": sum(e["num_tokens"] for e in group),
                                "merged_from": [e["prefix"] for e in group],
                                "files": {n: shards.file_record(tmp, n) for n in names},
                                "facts": merged_facts})
            shards.place(tmp, out, names)
        copies = ["tokenizer.model"] + [p.name for p in sorted(src.glob("test_*")) if p.is_file()]
        for name in copies:
            shutil.copyfile(src / name, tmp / name)
        shards.place(tmp, out, copies)
        merged = json.loads(json.dumps(manifest))
        merged["splits"]["train"]["shards"] = new_entries
        merged["tokens_sha256"]["train"] = facts.combined_sha256(new_entries, "tokens")
        merged["label_sidecar_sha256"]["train"] = facts.combined_sha256(new_entries, "labels")
        merged["merged_from"] = str(src.resolve())
        for name, split in merged["splits"].items():
            if name != "train" and not split.get("facts"):  # copied from an older prep
                split.update(heldout_entry(out, name, manifest["token_dtype"]))
        (tmp / "manifest.json").write_text(dumps(merged), encoding="utf-8")
        shards.place(tmp, out, ["manifest.json"])
    return merged

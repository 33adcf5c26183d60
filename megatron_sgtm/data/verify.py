"""The full check of a shard directory, on demand (``sgtm verify-data``): every byte of every
file the manifest lists, against every fact and sha256 prep recorded.

Per prefix (a train shard or a held-out split), in one read of each file:

- each listed file exists, has the recorded size and sha256;
- the index files and per-document sidecars are consistent (the same structural checks as
  a training start, ``shards.open_index`` / ``open_doc_arrays``);
- every token id lies inside the vocabulary, every label is 0/1/2;
- the recorded facts (token range, label range and counts, mixed documents) and the
  label-run file equal what the scan finds;
- the manifest's combined ``tokens_sha256`` / ``label_sidecar_sha256`` match.

Prefixes run in parallel worker processes (``workers``). Problems are collected, not raised,
and grouped by kind, so a damaged corpus is described in one pass.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from . import facts
from .shards import (LABEL_MAX, DataError, open_doc_arrays, open_index, read_manifest,
                     split_prefixes)

READ_BLOCK = 1 << 24  # bytes per read

# problem kind -> what it means (the error line of its kind starts with it)
KINDS = {
    "missing": "files the manifest lists are missing",
    "size": "files differ in size from the manifest's record",
    "sha256": "files differ from the sha256 the manifest records",
    "structure": "index or sidecar files are inconsistent",
    "vocab": "token ids outside the vocabulary",
    "labels": "labels outside 0/1/2",
    "facts": "recorded facts disagree with the data",
    "checksum": "the manifest's combined sha256 disagrees",
}


@dataclass
class Problem:
    kind: str
    detail: str


@dataclass
class PrefixResult:
    prefix: str
    problems: list[Problem] = field(default_factory=list)
    bytes_read: int = 0
    tokens: int = 0
    recorded: bool = True  # the manifest records facts for it
    # sha256 over the .bin then .idx bytes, per kind (the bare splits' combined checksums)
    concatenated: dict = field(default_factory=dict)


def _read(path: Path, sinks, result: PrefixResult) -> None:
    """Stream ``path`` once into every sink (``update(bytes)``)."""
    with open(path, "rb") as f:
        while True:
            block = f.read(READ_BLOCK)
            if not block:
                break
            result.bytes_read += len(block)
            for sink in sinks:
                sink.update(block)


class _Typed:
    """Adapts a scanner of arrays to raw blocks (carrying a partial item across blocks)."""

    def __init__(self, scanner, dtype) -> None:
        self.scanner, self.dtype, self.rest = scanner, np.dtype(dtype), b""

    def update(self, block: bytes) -> None:
        data = self.rest + block
        cut = len(data) - len(data) % self.dtype.itemsize
        self.rest = data[cut:]
        self.scanner.update(np.frombuffer(data[:cut], self.dtype))


def _check_files(directory: Path, prefix: str, entry: dict, token_dtype, result: PrefixResult):
    """Read every file of the prefix once: sizes and sha256 against the records, the token and
    label scans, the concatenated digests. Returns (token scan, run scan)."""
    files = dict(entry.get("files") or {})
    tok_bin, lab_bin = f"{prefix}_tokens.bin", f"{prefix}_labels.bin"
    names = list(files) + [n for n in (f"{prefix}_tokens.idx", f"{prefix}_labels.idx", tok_bin, lab_bin)
                           if n not in files]
    tokens, runs = facts.TokenScan(), facts.RunScan()
    concat = {"tokens": hashlib.sha256(), "labels": hashlib.sha256()}
    # .bin before .idx, so the concatenated digests see the bytes in the manifest's order.
    for name in sorted(names, key=lambda n: (not n.endswith(".bin"), n)):
        path, rec = directory / name, files.get(name)
        if not path.is_file():
            if rec is not None:
                result.problems.append(Problem("missing", str(path)))
            continue  # an unlisted missing file is the structure check's to name
        size = path.stat().st_size
        if rec is not None and size != rec["bytes"]:
            result.problems.append(Problem("size", f"{path} ({size} bytes, recorded {rec['bytes']})"))
            continue
        sinks = [hashlib.sha256()]
        if name == tok_bin:
            sinks.append(_Typed(tokens, token_dtype))
        elif name == lab_bin:
            sinks.append(_Typed(runs, np.uint8))
        for kind, digest in concat.items():
            if name in (f"{prefix}_{kind}.bin", f"{prefix}_{kind}.idx"):
                sinks.append(digest)
        _read(path, sinks, result)
        if rec is not None and sinks[0].hexdigest() != rec["sha256"]:
            result.problems.append(Problem("sha256", str(path)))
    result.concatenated = {k: v.hexdigest() for k, v in concat.items()}
    return tokens, runs


def verify_prefix(directory: Path, prefix: str, entry: Optional[dict], manifest: dict) -> PrefixResult:
    entry = entry or {}
    result = PrefixResult(prefix, recorded=bool(entry.get("facts")))
    vocab = int(manifest["tokenizer"]["vocab_size"])
    try:
        ix = open_index(directory, prefix, manifest, entry)
        open_doc_arrays(directory, prefix, ix)
    except DataError as exc:
        result.problems.append(Problem("structure", str(exc)))
        ix = None
    dtype = ix.token_dtype if ix is not None else np.dtype(manifest.get("token_dtype") or np.uint16)
    tokens, scan = _check_files(directory, prefix, entry, dtype, result)
    runs = scan.runs()
    if tokens.hi is not None and (tokens.hi >= vocab or tokens.lo < 0):
        bad = tokens.hi if tokens.hi >= vocab else tokens.lo
        result.problems.append(Problem("vocab", f"{directory / prefix}_tokens.bin: token id {bad}, "
                                                f"vocabulary {vocab}"))
    if len(runs) and int(runs[:, 1].max()) > LABEL_MAX:
        result.problems.append(Problem("labels", f"{directory / prefix}_labels.bin: label "
                                                 f"{int(runs[:, 1].max())}"))
    if ix is None:
        return result
    result.tokens = ix.num_tokens
    recorded = entry.get("facts")
    if not recorded:
        return result
    found = tokens.facts()
    if len(runs) and scan.n == ix.num_tokens:
        found.update(facts.label_facts(runs, ix.num_tokens,
                                         facts.doc_label_range(runs, ix.offsets, ix.lengths)))
    differ = sorted(k for k in found if recorded.get(k) != found[k])
    if differ:
        result.problems.append(Problem("facts", f"{directory / prefix}: " + ", ".join(
            f"{k} is {found[k]}, recorded {recorded.get(k)}" for k in differ)))
    runs_path = directory / facts.runs_name(prefix)
    if runs_path.is_file():
        try:
            stored = np.load(runs_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            result.problems.append(Problem("structure", f"{runs_path}: unreadable ({exc})"))
        else:
            if not np.array_equal(stored, runs):
                result.problems.append(Problem("facts", f"{runs_path}: differs from the runs of "
                                                        f"{directory / prefix}_labels.bin"))
    elif facts.runs_name(prefix) not in (entry.get("files") or {}):
        result.problems.append(Problem("structure", f"{runs_path}: missing"))
    return result


@dataclass
class Report:
    directory: Path
    results: list[PrefixResult]
    problems: list[Problem]  # directory-level: combined checksums
    seconds: float
    workers: int

    def by_kind(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for p in self.problems + [p for r in self.results for p in r.problems]:
            out.setdefault(p.kind, []).append(p.detail)
        return {k: out[k] for k in KINDS if k in out}

    @property
    def unrecorded(self) -> list[str]:
        return [r.prefix for r in self.results if not r.recorded]

    def summary(self) -> dict:
        return {"directory": str(self.directory), "prefixes": len(self.results),
                "bytes_read": sum(r.bytes_read for r in self.results),
                "tokens": sum(r.tokens for r in self.results), "seconds": round(self.seconds, 2),
                "workers": self.workers, "unrecorded_prefixes": len(self.unrecorded),
                "problems": {k: len(v) for k, v in self.by_kind().items()}}


_MANIFEST: dict = {}


def _task(args) -> PrefixResult:
    directory, prefix, entry = args
    return verify_prefix(Path(directory), prefix, entry, _MANIFEST)


def _combined_problems(directory: Path, manifest: dict, split: str, listed, results) -> list[Problem]:
    out = []
    for kind, key in (("tokens", "tokens_sha256"), ("labels", "label_sidecar_sha256")):
        want = (manifest.get(key) or {}).get(split)
        if want is None:
            continue
        entries = [e for _, e in listed]
        if len(listed) == 1 and not (entries[0] or {}).get("prefix"):  # a bare prefix: its bytes
            have = results[0].concatenated.get(kind)
        elif all(e and all(f"{e['prefix']}_{kind}.{x}" in (e.get("files") or {}) for x in ("bin", "idx"))
                 for e in entries):
            have = facts.combined_sha256(entries, kind)
        else:
            continue
        if have != want:
            out.append(Problem("checksum", f"{directory / 'manifest.json'}: {key}.{split}"))
    return out


def verify_directory(directory, workers: int = 1) -> Report:
    """Check every prefix of every split the manifest lists (``workers`` processes)."""
    directory = Path(directory)
    t0 = time.perf_counter()
    manifest = read_manifest(directory)  # DataError: nothing to verify against
    listed = {split: split_prefixes(manifest, split) for split in sorted(manifest.get("splits") or {})}
    tasks = [(str(directory), prefix, entry) for split in listed for prefix, entry in listed[split]]
    _MANIFEST.clear()
    _MANIFEST.update(manifest)
    if workers <= 1 or len(tasks) <= 1:
        results = [_task(t) for t in tasks]
    else:  # forked workers inherit the manifest and the imports
        with multiprocessing.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            results = pool.map(_task, tasks, chunksize=1)
    problems, i = [], 0
    for split, entries in listed.items():
        problems += _combined_problems(directory, manifest, split, entries, results[i:i + len(entries)])
        i += len(entries)
    return Report(directory, results, problems, time.perf_counter() - t0, max(1, workers))


__all__ = ["KINDS", "Problem", "Report", "verify_directory", "verify_prefix"]

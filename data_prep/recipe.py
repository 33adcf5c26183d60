"""Typed data recipes: YAML -> validated dataclasses, with ``key=value`` overrides.

Every problem found while loading (unknown keys, wrong types, out-of-range values) is
collected and reported together in one :class:`PrepError`, so a user fixes a recipe
in one round instead of one key at a time.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from data_prep.errors import PrepError
from megatron_sgtm.configbase import ConfigError, config_from_dict

SOURCE_KINDS = ("wiki_offline", "wiki_mixed", "jsonl", "parquet", "txt", "hf", "bible")
DOMAINS = ("retain", "forget", "adjacent", "topic")


@dataclass
class SourceConfig:
    name: str = ""
    kind: str = ""
    # wiki_offline: en / es / fr; bible: ignored.
    lang: Optional[str] = None
    # Local file or directory (jsonl/parquet/txt/bible sword dir/hf local dataset).
    path: Optional[str] = None
    # hf: hub id or builder name ("json", "parquet"), data_files for local builders.
    dataset: Optional[str] = None
    config_name: Optional[str] = None
    data_files: Optional[list[str]] = None
    split: str = "train"
    revision: Optional[str] = None
    streaming: bool = True
    # bible: sword module name, e.g. WEB or SpaRV.
    module: Optional[str] = None
    # None = the kind's natural field ("extract" for wiki_offline, "text" otherwise).
    text_field: Optional[str] = None
    # retain/forget/adjacent fixes the true domain of every document; "topic" maps
    # each record's topic field through the recipe's ``topics`` section.
    domain: str = "retain"
    # txt: documents are separated by this string (default: blank line).
    separator: str = "\n\n"
    max_docs: Optional[int] = None
    # Paragraph truth: a record field holding one domain (retain/forget/adjacent) per
    # paragraph, in the order ``classifier.granularity: paragraph`` splits the text.
    paragraph_domains_field: Optional[str] = None
    # hf: the dataset is read as this many ``Dataset.shard(num_shards, index)`` pieces.
    num_shards: int = 1
    # wiki_mixed: seed of the mixed-language documents built from the embedded leads.
    mix_seed: int = 0


@dataclass
class TopicConfig:
    field: str = "topic"
    forget: list[str] = dataclasses.field(default_factory=list)
    adjacent: list[str] = dataclasses.field(default_factory=list)
    # Topics that say nothing about the subject. They are kept as retain truth (the
    # realistic case: a corpus's unlabelled bucket hides some target text) or dropped.
    uncategorized: list[str] = dataclasses.field(default_factory=lambda: ["Uncategorized"])
    uncategorized_policy: str = "retain"


@dataclass
class SplitConfig:
    test_fraction: float = 0.1
    max_test_docs: Optional[int] = 1000
    seed: int = 0


@dataclass
class TokenizerConfig:
    # Path to an existing sentencepiece model; None trains one on the train split.
    model: Optional[str] = None
    kind: str = "unigram"
    vocab_size: int = 2048
    max_train_bytes: int = 2_000_000
    character_coverage: float = 0.9995
    num_threads: int = 2
    seed: int = 0


@dataclass
class ClassifierConfig:
    # language: py3langid restricted to ``languages``; topic: TF-IDF + logistic
    # regression fit on a labelled seed split; oracle: the truth itself.
    kind: str = "language"
    languages: list[str] = field(default_factory=lambda: ["en", "es"])
    forget_language: str = "es"
    threshold: float = 0.5
    # Language is decided by the first characters; capping them keeps prep I/O-bound.
    max_chars: int = 300
    seed_fraction: float = 0.2
    seed: int = 0
    # document: one score and label per document; paragraph: the text is split on blank
    # lines and each paragraph is scored and labelled (per-token labels in the sidecar).
    granularity: str = "document"
    # Paragraphs shorter than this take their document's score (too short to classify).
    min_paragraph_chars: int = 80


@dataclass
class NoiseConfig:
    seed: int = 0
    undiscovered_rate: float = 0.0
    false_positive_rate: float = 0.0
    retain_mode_share: float = 0.25
    # Where injected false positives come from: adjacent docs, retain docs, or
    # auto = adjacent when the corpus has any, retain otherwise.
    fp_pool: str = "auto"


@dataclass
class ShardingConfig:
    # Large jsonl files are cut into byte ranges of about this size (parquet: row
    # groups); each range is one map task with bounded memory.
    target_bytes: int = 64_000_000
    # Corpus-wide steps (held-out split, tokenizer, topic classifier) read at most this
    # many bytes of text, taken from the start of every shard in proportion to its size.
    sample_bytes: int = 64_000_000
    # Documents per classify/tokenize/write step inside a shard.
    chunk_docs: int = 1024


@dataclass
class Recipe:
    name: str = ""
    sources: list[SourceConfig] = field(default_factory=list)
    topics: TopicConfig = field(default_factory=TopicConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    # Per-source cap applied to sources without their own max_docs (seeded subset).
    max_docs: Optional[int] = None
    skip_empty: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def problems(self) -> list[str]:
        errors: list[str] = []
        _check_values(self, errors)
        return errors


def _check_values(r: Recipe, errors: list[str]) -> None:
    def rate(path: str, v: float) -> None:
        if not 0.0 <= v <= 1.0:
            errors.append(f"{path}: must be in [0, 1], got {v}")

    if not r.sources:
        errors.append("sources: at least one source is required")
    names = [s.name for s in r.sources]
    for i, s in enumerate(r.sources):
        p = f"sources[{i}]"
        if not s.name:
            errors.append(f"{p}.name: required")
        if s.kind not in SOURCE_KINDS:
            errors.append(f"{p}.kind: unknown source {s.kind!r} (known: {', '.join(SOURCE_KINDS)})")
        if s.domain not in DOMAINS:
            errors.append(f"{p}.domain: must be one of {', '.join(DOMAINS)}, got {s.domain!r}")
        if s.kind == "wiki_offline" and s.lang not in ("en", "es", "fr"):
            errors.append(f"{p}.lang: wiki_offline needs lang en, es or fr, got {s.lang!r}")
        if s.kind in ("jsonl", "parquet", "txt") and not s.path:
            errors.append(f"{p}.path: required for kind {s.kind}")
        if s.kind == "hf" and not (s.dataset or s.path):
            errors.append(f"{p}: kind hf needs dataset or path")
        if s.kind == "bible" and not s.module:
            errors.append(f"{p}.module: required for kind bible (e.g. WEB, SpaRV)")
        if s.max_docs is not None and s.max_docs < 1:
            errors.append(f"{p}.max_docs: must be >= 1")
        if s.num_shards < 1:
            errors.append(f"{p}.num_shards: must be >= 1")
        if s.num_shards > 1 and s.kind != "hf":
            errors.append(f"{p}.num_shards: only for kind hf (files are sharded by sharding.target_bytes)")
        if s.kind == "wiki_mixed" and s.paragraph_domains_field != "paragraph_domains":
            errors.append(f"{p}.paragraph_domains_field: wiki_mixed records their truth in 'paragraph_domains'")
    if len(set(names)) != len(names):
        errors.append("sources: names must be unique")
    if r.max_docs is not None and r.max_docs < 1:
        errors.append("max_docs: must be >= 1")
    if r.topics.uncategorized_policy not in ("retain", "drop"):
        errors.append("topics.uncategorized_policy: must be retain or drop")
    if any(s.domain == "topic" for s in r.sources) and not r.topics.forget:
        errors.append("topics.forget: a source uses domain 'topic' but no forget topics are set")
    if not 0.0 < r.split.test_fraction < 1.0:
        errors.append(f"split.test_fraction: must be in (0, 1), got {r.split.test_fraction}")
    if r.tokenizer.kind not in ("bpe", "unigram"):
        errors.append(f"tokenizer.kind: must be bpe or unigram, got {r.tokenizer.kind!r}")
    if r.tokenizer.vocab_size < 300:
        errors.append("tokenizer.vocab_size: must be >= 300 (byte fallback needs 256 pieces)")
    if r.classifier.kind not in ("language", "topic", "oracle"):
        errors.append(f"classifier.kind: must be language, topic or oracle, got {r.classifier.kind!r}")
    if r.classifier.kind == "language" and r.classifier.forget_language not in r.classifier.languages:
        errors.append("classifier.forget_language: must be one of classifier.languages")
    rate("classifier.threshold", r.classifier.threshold)
    if not 0.0 < r.classifier.seed_fraction < 1.0:
        errors.append("classifier.seed_fraction: must be in (0, 1)")
    if r.classifier.granularity not in ("document", "paragraph"):
        errors.append(f"classifier.granularity: must be document or paragraph, got {r.classifier.granularity!r}")
    if r.classifier.min_paragraph_chars < 0:
        errors.append("classifier.min_paragraph_chars: must be >= 0")
    sh = r.sharding
    if sh.target_bytes < 1 or sh.sample_bytes < 1 or sh.chunk_docs < 1:
        errors.append("sharding: target_bytes, sample_bytes and chunk_docs must be >= 1")
    rate("noise.undiscovered_rate", r.noise.undiscovered_rate)
    rate("noise.false_positive_rate", r.noise.false_positive_rate)
    rate("noise.retain_mode_share", r.noise.retain_mode_share)
    if r.noise.fp_pool not in ("auto", "adjacent", "retain"):
        errors.append("noise.fp_pool: must be auto, adjacent or retain")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML; list indices allowed)."""
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"override {item!r}: expected key=value")
            continue
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as e:
            errors.append(f"override {item!r}: value is not valid YAML ({e})")
            continue
        node: Any = data
        parts = key.split(".")
        try:
            for p in parts[:-1]:
                node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            errors.append(f"override {item!r}: no such place in the recipe")
    if errors:
        raise PrepError("bad overrides:\n  " + "\n  ".join(errors))
    return data


def recipe_from_dict(data: dict) -> Recipe:
    """Types and keys checked by the project's config loader, then the recipe's own value
    checks; every problem in one PrepError."""
    try:
        return config_from_dict(Recipe, data)
    except ConfigError as exc:
        raise PrepError("invalid recipe:\n  " + "\n  ".join(exc.problems)) from None


def load_recipe(path: str | Path, overrides: Optional[list[str]] = None) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise PrepError(f"recipe {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PrepError(f"recipe {p}: not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise PrepError(f"recipe {p}: expected a mapping at the top level")
    return recipe_from_dict(apply_overrides(data, list(overrides or [])))

"""Typed data recipes: YAML -> validated dataclasses, with ``key=value`` overrides.

Every problem found while loading (unknown keys, wrong types, out-of-range values) is
collected and reported together in one :class:`PrepError`, so a user fixes a recipe
in one round instead of one key at a time.
"""
from __future__ import annotations

import dataclasses
import re
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
    # regression fit on a labelled seed split; oracle: the truth itself; fasttext: a
    # fastText ``.bin`` model; hf: a local transformers sequence-classification directory;
    # keywords: a term / regex list; python: ``module:function``; cascade: ``stages`` in
    # order (see data_prep/classifiers/ and data_prep/README.md for each one's score).
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
    # fasttext: the .bin / .ftz file; hf: the model directory (config, weights, tokenizer).
    model: Optional[str] = None
    # fasttext / hf: the model's label that means forget (e.g. __label__es); its
    # probability is the score.
    forget_label: Optional[str] = None
    # hf and python: texts per forward pass / per call.
    batch_size: int = 32
    # hf: tokens per window (special tokens included; null = the longest the model and its
    # tokenizer take); longer texts are cut into windows and their window scores aggregated
    # (max: any forget window flags the text; mean).
    max_length: Optional[int] = None
    window_aggregation: str = "max"
    # hf: at most this many windows per text (the first ones); None scores every window.
    max_windows: Optional[int] = None
    # hf: float32, bfloat16 or float16; device auto = the GPU when there is one.
    dtype: str = "float32"
    device: str = "auto"
    # hf on CPU: torch threads per map process; one, like every other step of a map process
    # (parallelism is one process per shard). Forked --workers always use one each.
    threads: int = 1
    # keywords: the list file (one term, or re:REGEX, per line; optional TAB weight).
    keywords: Optional[str] = None
    # keywords: the (weighted) hit count at which a text scores 0.5.
    min_hits: float = 1.0
    case_fold: bool = True
    # keywords: count each term once per text instead of every occurrence.
    distinct_terms: bool = False
    # python: ``module:function`` or ``path/to/file.py:function``.
    entry_point: Optional[str] = None
    # cascade: classifier settings, in order; a text leaves at the first stage that
    # decides it, later stages see only what passes.
    stages: list[ClassifierConfig] = field(default_factory=list)
    # A cascade stage (not the last): retain = it decides the texts it scores below its
    # threshold and passes the rest (a blocklist); forget = it decides those at or above.
    decides: Optional[str] = None


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

    def fingerprint_dict(self) -> dict:
        """The recipe as its fingerprints see it: classifier keys added after the first prep
        format are left out where they hold their defaults, so a directory prepared before
        they existed is still recognised as the same corpus (continued, extended,
        relabelled) instead of being refused until ``--force`` rebuilds it."""
        d = self.to_dict()
        defaults = dataclasses.asdict(ClassifierConfig())
        for key in LATER_CLASSIFIER_KEYS:
            if d["classifier"][key] == defaults[key]:
                del d["classifier"][key]
        return d

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
    _check_classifier(r.classifier, "classifier", errors)
    sh = r.sharding
    if sh.target_bytes < 1 or sh.sample_bytes < 1 or sh.chunk_docs < 1:
        errors.append("sharding: target_bytes, sample_bytes and chunk_docs must be >= 1")
    rate("noise.undiscovered_rate", r.noise.undiscovered_rate)
    rate("noise.false_positive_rate", r.noise.false_positive_rate)
    rate("noise.retain_mode_share", r.noise.retain_mode_share)
    if r.noise.fp_pool not in ("auto", "adjacent", "retain"):
        errors.append("noise.fp_pool: must be auto, adjacent or retain")


# Classifier settings that did not exist in the first prep format (see fingerprint_dict). A
# key added to ClassifierConfig later belongs here too, or every earlier directory is refused.
LATER_CLASSIFIER_KEYS = ("model", "forget_label", "batch_size", "max_length", "window_aggregation",
                         "max_windows", "dtype", "device", "threads", "keywords", "min_hits",
                         "case_fold", "distinct_terms", "entry_point", "stages", "decides")
CLASSIFIER_KINDS = ("language", "topic", "oracle", "fasttext", "hf", "keywords", "python", "cascade")
# Stages score texts on their own: topic (fit on a corpus-wide seed split), the oracle and
# nested cascades are not stages.
STAGE_KINDS = ("language", "fasttext", "hf", "keywords", "python")
HF_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_ENTRY_POINT = re.compile(r"[^:]+:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
# Keys that belong to one family of kinds only: set for another kind, they are a mistake.
_KEY_KINDS = {"model": ("fasttext", "hf"), "forget_label": ("fasttext", "hf"), "keywords": ("keywords",),
              "entry_point": ("python",)}


def _check_classifier(c: ClassifierConfig, where: str, errors: list[str], stage: Optional[tuple[int, int]] = None,
                      cascade_threshold: float = 0.5) -> None:
    """The classifier's own checks; ``stage`` = (index, count) inside a cascade."""
    kinds = STAGE_KINDS if stage else CLASSIFIER_KINDS
    if c.kind not in kinds:
        errors.append(f"{where}.kind: must be one of {', '.join(kinds)}, got {c.kind!r}")
        return
    if c.kind == "language" and c.forget_language not in c.languages:
        errors.append(f"{where}.forget_language: must be one of {where}.languages")
    if not 0.0 <= c.threshold <= 1.0:
        errors.append(f"{where}.threshold: must be in [0, 1], got {c.threshold}")
    if not 0.0 < c.seed_fraction < 1.0:
        errors.append(f"{where}.seed_fraction: must be in (0, 1)")
    if c.granularity not in ("document", "paragraph"):
        errors.append(f"{where}.granularity: must be document or paragraph, got {c.granularity!r}")
    if c.min_paragraph_chars < 0:
        errors.append(f"{where}.min_paragraph_chars: must be >= 0")
    for key, owners in _KEY_KINDS.items():
        if getattr(c, key) is not None and c.kind not in owners:
            errors.append(f"{where}.{key}: only for kind {' or '.join(owners)} (this classifier is {c.kind})")
        elif getattr(c, key) in (None, "") and c.kind in owners:
            errors.append(f"{where}.{key}: required for kind {c.kind}")
    if c.entry_point and c.kind == "python" and not _ENTRY_POINT.fullmatch(c.entry_point):
        errors.append(f"{where}.entry_point: expected module:function or path/to/file.py:function, "
                      f"got {c.entry_point!r}")
    if c.batch_size < 1:
        errors.append(f"{where}.batch_size: must be >= 1")
    if c.kind == "hf":
        if c.max_length is not None and c.max_length < 8:
            errors.append(f"{where}.max_length: must be >= 8 tokens")
        if c.window_aggregation not in ("max", "mean"):
            errors.append(f"{where}.window_aggregation: must be max or mean, got {c.window_aggregation!r}")
        if c.max_windows is not None and c.max_windows < 1:
            errors.append(f"{where}.max_windows: must be >= 1 (or null for every window)")
        if c.dtype not in HF_DTYPES:
            errors.append(f"{where}.dtype: must be one of {', '.join(HF_DTYPES)}, got {c.dtype!r}")
        if not _DEVICE.fullmatch(c.device):
            errors.append(f"{where}.device: must be auto, cpu, cuda or cuda:N, got {c.device!r}")
        if c.threads < 1:
            errors.append(f"{where}.threads: must be >= 1")
    if c.kind == "keywords" and not c.min_hits > 0:
        errors.append(f"{where}.min_hits: must be > 0, got {c.min_hits}")
    if c.kind == "cascade":
        if len(c.stages) < 2:
            errors.append(f"{where}.stages: a cascade needs at least two stages")
        for i, st in enumerate(c.stages):
            _check_classifier(st, f"{where}.stages[{i}]", errors, (i, len(c.stages)), c.threshold)
    elif c.stages:
        errors.append(f"{where}.stages: only for kind cascade")
    if stage is None:
        if c.decides is not None:
            errors.append(f"{where}.decides: only for the stages of a cascade")
        return
    i, n = stage
    if c.granularity != "document":
        errors.append(f"{where}.granularity: set granularity on the cascade, not on its stages")
    if i == n - 1:
        if c.decides is not None:
            errors.append(f"{where}.decides: the last stage decides every text that reaches it; leave it unset")
        # Its scores are the labels' scores: one threshold for both, or its report misleads.
        if c.threshold != cascade_threshold:
            errors.append(f"{where}.threshold: the last stage's texts are labelled at the cascade's threshold "
                          f"{cascade_threshold}; set the same here, not {c.threshold}")
        return
    decides = c.decides or "retain"
    if decides not in ("retain", "forget"):
        errors.append(f"{where}.decides: must be retain or forget, got {c.decides!r}")
    # A text a stage lets go must keep that stage's decision under the cascade's threshold.
    elif decides == "retain" and c.threshold > cascade_threshold:
        errors.append(f"{where}.threshold: {c.threshold} is above the cascade's threshold {cascade_threshold}; "
                      "a text this stage decides as retain would be labelled forget")
    elif decides == "forget" and c.threshold < cascade_threshold:
        errors.append(f"{where}.threshold: {c.threshold} is below the cascade's threshold {cascade_threshold}; "
                      "a text this stage decides as forget would be labelled retain")


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

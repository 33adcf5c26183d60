"""Local lm-evaluation-harness tasks built from a prep output's held-out splits.

Per held-out split (forget, retain, adjacent when present) two tasks, so accuracy can be read
per domain the way WMDP-bio next to MMLU is:

- ``{prefix}_{split}_mc`` (multiple choice, ``acc`` / ``acc_norm``): the passage before a
  sentence of a held-out document, and four candidate next sentences: the real one and three
  sentences of similar token length from *other* documents of the same split (same language and
  domain, so choosing needs the document's content, not its language). Chance is 1/4.
- ``{prefix}_{split}_cloze`` (log-likelihood, ``acc`` = greedy match and ``perplexity``): the
  passage before a word that occurred earlier in it (at least 5 letters); the target is that
  word, LAMBADA-style.

Texts are the documents decoded with the run's own sentencepiece model, so every task works for
any source prep read. Contexts are cut to whole words from the left to ``context_tokens``; a
context plus its continuation never exceeds ``context_tokens + choice_max_tokens`` tokens, so
a model with that many positions sees every item whole. Items and choice order are drawn
from ``seed``: the same prep output and settings give the same files.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

SPLITS = {"forget": "test_forget", "retain": "test_retain", "adjacent": "test_adjacent"}
# A sentence ends at . ! ? (optionally closed by a quote or bracket) and whitespace, before an
# upper-case letter or a digit (after an optional opening mark); a period after a word of one
# or two letters is an abbreviation ("a. C.", "EE. UU.", "Dr."), not an end.
_CANDIDATE_END = re.compile(r"([.!?])[\"'”»)\]]?\s+")
_ABBREVIATION = re.compile(r"(?:^|[\s(.])[^\W\d_]{1,2}$")
_OPENING = "¿¡\"“«(['"
_WORD = re.compile(r"\w+", re.UNICODE)
FORMAT_VERSION = 1


@dataclass
class TaskBuildConfig:
    prefix: str = "sgtm"
    max_items: int = 1000  # per split and task
    per_document: int = 3  # items from one document (the earliest sentences first)
    choices: int = 4
    context_tokens: int = 40
    choice_min_tokens: int = 4
    choice_max_tokens: int = 24
    cloze_min_letters: int = 5
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.prefix):
            out.append(f"prefix: {self.prefix!r} must be a letter then letters, digits or _")
        if self.max_items <= 0 or self.per_document <= 0:
            out.append("max_items and per_document: must be positive")
        if self.choices < 2:
            out.append("choices: need at least 2")
        if self.context_tokens < 8:
            out.append("context_tokens: need at least 8")
        if not 1 <= self.choice_min_tokens <= self.choice_max_tokens:
            out.append("need 1 <= choice_min_tokens <= choice_max_tokens")
        if self.cloze_min_letters < 1:
            out.append("cloze_min_letters: must be positive")
        return out


class Encoder:
    """Token counts with the run's tokenizer (what the model will see)."""

    def __init__(self, model_file: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def count(self, text: str) -> int:
        return len(self.sp.encode(text))

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def documents(data: Path, split: str, enc: Encoder, eod_id: Optional[int]) -> list[str]:
    from ..data import open_split

    shard = open_split(data, split)
    out = []
    for i in range(shard.num_docs):
        ids = shard.get_tokens(i)
        if eod_id is not None and len(ids) and ids[-1] == eod_id:
            ids = ids[:-1]
        out.append(enc.decode(ids))
    return out


def _is_end(text: str, m: re.Match) -> bool:
    rest = text[m.end():].lstrip(_OPENING)
    if not rest or not (rest[0].isupper() or rest[0].isdigit()):
        return False
    return m.group(1) != "." or not _ABBREVIATION.search(text[:m.start()])


def sentences(text: str) -> list[tuple[int, str]]:
    """(start offset, sentence) pairs; whitespace between sentences is dropped."""
    out, start = [], 0
    for m in _CANDIDATE_END.finditer(text):
        if not _is_end(text, m):
            continue
        piece = text[start:m.end()].strip()
        if piece:
            out.append((start, piece))
        start = m.end()
    if text[start:].strip():
        out.append((start, text[start:].strip()))
    return out


def left_cut(text: str, budget: int, enc: Encoder) -> Optional[str]:
    """The longest whole-word tail of ``text`` within ``budget`` tokens (None if not one word)."""
    text = text.strip()
    if enc.count(text) <= budget:
        return text or None
    words = text.split(" ")
    lo, hi = 1, len(words)  # smallest number of leading words to drop
    while lo < hi:
        mid = (lo + hi) // 2
        if enc.count(" ".join(words[mid:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    tail = " ".join(words[lo:]).strip()
    return tail if tail and enc.count(tail) <= budget else None


def _golds(docs: list[str], cfg: TaskBuildConfig, enc: Encoder, rng) -> list[tuple]:
    """(doc, context, sentence, tokens): up to ``per_document`` sentences per document, the
    earliest first (never the document's first: the context then most likely names the
    subject), each distinct."""
    golds, seen = [], set()
    for d in rng.permutation(len(docs)):
        made = 0
        for start, sentence in sentences(docs[d])[1:]:
            if made == cfg.per_document:
                break
            n = enc.count(sentence)
            if not cfg.choice_min_tokens <= n <= cfg.choice_max_tokens or sentence in seen:
                continue
            context = left_cut(docs[d][:start], cfg.context_tokens, enc)
            if context is not None:
                golds.append((int(d), context, sentence, n))
                seen.add(sentence)
                made += 1
    return golds


def _blocks(golds: list[tuple], size: int, rng) -> list[list[tuple]]:
    """Groups of ``size`` sentences of neighbouring token lengths, from distinct documents."""
    order = sorted(range(len(golds)), key=lambda i: (golds[i][3], rng.random()))
    blocks, current, waiting = [], [], []
    for i in order:
        pending = waiting + [i]
        waiting = []
        for j in pending:
            if any(golds[j][0] == golds[k][0] for k in current):
                waiting.append(j)  # same document as one in the block: try the next block
            else:
                current.append(j)
            if len(current) == size:
                blocks.append([golds[k] for k in current])
                current = []
    return blocks


def mc_items(docs: list[str], cfg: TaskBuildConfig, enc: Encoder, rng) -> list[dict]:
    """Sentences are grouped in blocks of ``choices`` of similar length from different
    documents; each sentence of a block is the answer of one item whose distractors are the
    block's other sentences. Every sentence is thus the answer once and a distractor
    ``choices - 1`` times, so a scorer that ignores the context (however much it prefers some
    sentences in themselves) is right on exactly one item per block: accuracy above
    ``1 / choices`` can only come from the context."""
    blocks = _blocks(_golds(docs, cfg, enc, rng), cfg.choices, rng)
    # Whole blocks only, so the property above holds for any max_items.
    keep = sorted(rng.permutation(len(blocks))[:cfg.max_items // cfg.choices])
    items = []
    for block in (blocks[b] for b in keep):
        for d, context, gold, _ in block:
            order = rng.permutation(len(block))
            choices = [block[i][2] for i in order]
            items.append({"id": f"doc{d}", "context": context, "choices": choices,
                          "label": choices.index(gold)})
    return items


def cloze_items(docs: list[str], cfg: TaskBuildConfig, enc: Encoder, rng) -> list[dict]:
    items = []
    for d in rng.permutation(len(docs)):
        text, seen, made = docs[d], set(), 0
        for m in _WORD.finditer(text):
            if made == cfg.per_document or len(items) >= cfg.max_items:
                break
            word = m.group(0)
            if word in seen and len(word) >= cfg.cloze_min_letters and word.isalpha() \
                    and text[m.start() - 1:m.start()] == " ":
                context = left_cut(text[:m.start()], cfg.context_tokens, enc)
                # The earlier occurrence must survive the cut, so the word is recoverable.
                if context and re.search(rf"\b{re.escape(word)}\b", context):
                    items.append({"id": f"doc{int(d)}", "context": context, "target": " " + word})
                    made += 1
            seen.add(word)
    return items


def task_yaml(name: str, kind: str, data_file: Path) -> str:
    head = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}},
            "test_split": "test", "doc_to_text": "{{context}}"}
    if kind == "mc":
        body = {"output_type": "multiple_choice", "doc_to_choice": "choices",
                "doc_to_target": "label", "target_delimiter": " ",
                "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in ("acc", "acc_norm")]}
    else:
        body = {"output_type": "loglikelihood", "doc_to_target": "{{target}}",
                "target_delimiter": "",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity",
                                 "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    import yaml

    return yaml.safe_dump({**head, **body, "metadata": {"version": FORMAT_VERSION}},
                          sort_keys=False, allow_unicode=True)


def build_tasks(data: Path, tmp: Path, final: Path, cfg: TaskBuildConfig) -> dict:
    """Write every task (YAML + jsonl) and a group ``{prefix}`` into ``tmp``; data paths name
    ``final``, where the caller renames ``tmp`` to. Returns the summary written as tasks.json."""
    from ..data import DataError, read_manifest
    from .shards import has_split

    manifest = read_manifest(data)
    enc = Encoder(Path(data) / "tokenizer.model")
    eod = (manifest.get("tokenizer") or {}).get("eod_id")
    summary = {"format_version": FORMAT_VERSION, "data": str(Path(data).resolve()),
               "tokenizer_sha256": (manifest.get("tokenizer") or {}).get("sha256"),
               "config": cfg.__dict__.copy(), "tasks": {}}
    names = []
    for split, shard_split in SPLITS.items():
        if not has_split(data, shard_split):
            continue
        docs = documents(data, shard_split, enc, eod)
        for k, (kind, build) in enumerate((("mc", mc_items), ("cloze", cloze_items))):
            rng = np.random.default_rng([cfg.seed, list(SPLITS).index(split), k])
            items = build(docs, cfg, enc, rng)
            name = f"{cfg.prefix}_{split}_{kind}"
            if not items:
                raise DataError(f"{data}: split {shard_split} yields no {kind} items "
                                 "(documents too short for these settings)")
            (tmp / f"{name}.jsonl").write_text(
                "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
            (tmp / f"{name}.yaml").write_text(task_yaml(name, kind, final / f"{name}.jsonl"),
                                              encoding="utf-8")
            summary["tasks"][name] = {"split": shard_split, "kind": kind, "items": len(items),
                                      "documents": len(docs),
                                      "chance": 1.0 / cfg.choices if kind == "mc" else None}
            names.append(name)
    import yaml

    (tmp / f"{cfg.prefix}.yaml").write_text(yaml.safe_dump({"group": cfg.prefix, "task": names}),
                                            encoding="utf-8")
    (tmp / "tasks.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary

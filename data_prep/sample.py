"""The global stage: every corpus-wide decision, taken on a bounded, deterministic sample.

Runs once, before the map, in one process; the map tasks then read only its small outputs.

1. **Caps** (``max_docs``): a source with a cap is counted once (a full read of that
   source only); the kept documents are a seeded subset of its valid documents
   (``default_rng([split.seed, source_index + 1])``), or its first ``cap`` documents for a
   streaming hub dataset.
2. **The sample**: from every shard, its first documents up to a byte quota proportional to
   the shard's input size, ``sharding.sample_bytes`` in all. A corpus no larger than
   ``sample_bytes`` is sampled whole.
3. **Held-out split**: per true domain, ``max(1, round(test_fraction * n))`` documents of
   the ``n`` sampled ones, at most ``max_test_docs``, chosen by a seeded permutation. With a
   whole-corpus sample this is exactly a per-domain share of the corpus. In paragraph mode
   only documents whose paragraphs share one truth are eligible (held-out sets stay pure).
4. **Tokenizer**: trained on the sample's train documents (``tokenizer.max_train_bytes``).
5. **Topic classifier**: fit on a seeded ``seed_fraction`` of the sample's train documents,
   saved as JSON; its seed documents are flagged in the map's ``*_seed.npy``. A classifier
   the user brings (fasttext, hf, keywords, python, cascade) has its files hashed here.

Documents are identified by ``(shard, ordinal)``: their position in the shard's stream of
kept, valid documents, which every reader of the shard sees the same way.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep import shards
from data_prep.classifiers import TopicScorer, file_records, make_scorer, seed_mask
from data_prep.documents import DOMAIN_NAMES, FORGET, RETAIN, Doc, Keep, shard_docs
from data_prep.encode import ChunkEncoder
from data_prep.errors import PrepError
from data_prep.plan import ShardSpec
from data_prep.recipe import Recipe
from data_prep.tokenizer import TokenizerInfo, describe, load_tokenizer, train_tokenizer

GLOBAL_MARKER = "global.done.json"
IDS = ("heldout", "seed")


@dataclass
class Caps:
    keeps: dict[int, Keep] = field(default_factory=dict)  # shard index -> Keep (capped sources only)

    def for_shard(self, i: int) -> Optional[Keep]:
        return self.keeps.get(i)


def compute_caps(recipe: Recipe, plan: list[ShardSpec]) -> Caps:
    caps = Caps()
    for si, src in enumerate(recipe.sources):
        cap = src.max_docs or recipe.max_docs
        if not cap:
            continue
        mine = [s for s in plan if s.source == si]
        streaming = src.kind == "hf" and src.streaming
        counts, total = [], 0
        for s in mine:
            n = 0
            if not (streaming and total >= cap):
                for _ in shard_docs(s, recipe, Keep(0, np.arange(cap - total)) if streaming else None):
                    n += 1
            counts.append(n)
            total += n
        if streaming or total <= cap:
            kept = np.arange(min(cap, total), dtype=np.int64)
        else:
            rng = np.random.default_rng([recipe.split.seed, si + 1])
            kept = np.sort(rng.choice(total, size=cap, replace=False)).astype(np.int64)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        for s, f in zip(mine, first):
            caps.keeps[s.index] = Keep(int(f), kept)
    return caps


@dataclass
class Sampled:
    ids: np.ndarray  # int64 [n, 2]: (shard, ordinal)
    docs: list[Doc]

    @property
    def truth(self) -> np.ndarray:
        return np.fromiter((d.truth for d in self.docs), np.int64, count=len(self.docs))


def collect_sample(recipe: Recipe, plan: list[ShardSpec], caps: Caps) -> Sampled:
    budget = recipe.sharding.sample_bytes
    total = sum(s.size for s in plan)
    ids, docs = [], []
    for s in plan:
        quota = None if total <= budget else budget * s.size / max(total, 1)
        got = 0
        for k, doc in enumerate(shard_docs(s, recipe, caps.for_shard(s.index))):
            if quota is not None and got >= quota:
                break
            ids.append((s.index, k))
            docs.append(doc)
            got += len(doc.text.encode("utf-8"))
    return Sampled(np.asarray(ids, np.int64).reshape(-1, 2), docs)


def choose_heldout(sample: Sampled, recipe: Recipe) -> dict[int, np.ndarray]:
    """Sample positions of the held-out documents per true domain, in corpus order."""
    cfg = recipe.split
    truth = sample.truth
    eligible = np.fromiter((d.pure for d in sample.docs), bool, count=len(sample.docs))
    order = np.random.default_rng(cfg.seed).permutation(len(truth))
    out: dict[int, np.ndarray] = {}
    for d in range(len(DOMAIN_NAMES)):
        members = order[(truth[order] == d) & eligible[order]]
        if len(members) == 0:
            continue
        n = max(1, int(round(cfg.test_fraction * len(members))))
        if cfg.max_test_docs is not None:
            n = min(n, cfg.max_test_docs)
        if n >= len(members):
            raise PrepError(f"domain {DOMAIN_NAMES[d]}: only {len(members)} documents in the sample, "
                            "too few for a held-out test split")
        out[d] = np.sort(members[:n])
    for d in (RETAIN, FORGET):
        if d not in out:
            raise PrepError(f"the sample has no {DOMAIN_NAMES[d]} documents"
                            f"{' that are pure (one truth for every paragraph)' if not eligible.all() else ''}; "
                            "check the recipe's domains")
    return out


def _ids_file(state: Path, name: str, ids: np.ndarray) -> str:
    path = f"{name}.npy"
    np.save(state / path, np.ascontiguousarray(ids, np.int64).reshape(-1, 2), allow_pickle=False)
    return path


def read_sample(recipe: Recipe, plan: list[ShardSpec]) -> tuple[Caps, Sampled, dict[int, np.ndarray]]:
    """Everything the global stage reads, before it writes anything: bad input found here
    (for a corpus within ``sample_bytes``: anywhere) leaves the output directory untouched."""
    caps = compute_caps(recipe, plan)
    sample = collect_sample(recipe, plan, caps)
    return caps, sample, choose_heldout(sample, recipe)


def run_global(recipe: Recipe, out: Path, plan: list[ShardSpec], caps: Caps, sample: Sampled,
               heldout: dict[int, np.ndarray], log: Callable[[str], None]) -> dict:
    """Write tokenizer, classifier, held-out splits and the id lists; returns the marker."""
    is_test = np.zeros(len(sample.docs), bool)
    for idx in heldout.values():
        is_test[idx] = True
    train_pos = np.flatnonzero(~is_test)
    log(f"prep: sample of {len(sample.docs)} documents from {len(plan)} shards; held out "
        + ", ".join(f"{DOMAIN_NAMES[d]} {len(v)}" for d, v in heldout.items()))
    train_texts = [sample.docs[i].text for i in train_pos]
    tok: TokenizerInfo = (load_tokenizer(recipe.tokenizer.model) if recipe.tokenizer.model
                          else train_tokenizer(train_texts, recipe.tokenizer))
    cfg = recipe.classifier
    seed_ids = np.zeros((0, 2), np.int64)
    with shards.staging(out, "global") as tmp:
        (tmp / "tokenizer.model").write_bytes(tok.model_bytes)
        names = ["tokenizer.model"]
        state_names = []
        if cfg.kind == "topic":
            seed = seed_mask(len(train_pos), cfg)
            truth = sample.truth[train_pos]
            scorer = TopicScorer(cfg).fit([t for t, s in zip(train_texts, seed) if s], truth[seed] == FORGET)
            state_names.append(scorer.save(tmp))
            seed_ids = sample.ids[train_pos[seed]]
        encoder = ChunkEncoder(tok.model_bytes, tok.eod_id, tok.token_dtype, cfg, make_scorer(cfg, tmp))
        splits = {}
        for d, idx in heldout.items():
            name = f"test_{DOMAIN_NAMES[d]}"
            enc = encoder.encode([sample.docs[i] for i in idx], paragraphs=cfg.granularity == "paragraph")
            shards.write_tokens(tmp, name, enc.tokens, enc.doc_lengths, tok.token_dtype)
            shards.write_labels(tmp, name, np.zeros(len(idx), np.uint8), enc.doc_lengths, enc.doc_lengths)
            shards.save_array(tmp, name, "truth", enc.doc_truth)
            shards.save_array(tmp, name, "scores", enc.doc_scores)
            names += shards.indexed_files(name, "tokens") + shards.indexed_files(name, "labels") + \
                [f"{name}_truth.npy", f"{name}_scores.npy"]
            splits[name] = {"num_docs": int(len(idx)), "num_tokens": int(enc.doc_lengths.sum())}
        state_names.append(_ids_file(tmp, "heldout", sample.ids[np.sort(np.concatenate(list(heldout.values())))]))
        state_names.append(_ids_file(tmp, "seed", seed_ids))
        caps_doc = {str(i): {"first_ordinal": k.first_ordinal} for i, k in sorted(caps.keeps.items())}
        kept = {}
        for i, k in caps.keeps.items():
            src = plan[i].source
            if src not in kept:
                kept[src] = k.kept
                state_names.append(f"kept-source-{src}.npy")
                np.save(tmp / state_names[-1], k.kept, allow_pickle=False)
        (tmp / "caps.json").write_text(json.dumps(caps_doc, sort_keys=True), encoding="utf-8")
        state_names.append("caps.json")
        marker = {"tokenizer": tok.to_manifest(), "token_dtype": np.dtype(tok.token_dtype).name,
                  "test_splits": splits, "sample_docs": len(sample.docs),
                  # The classifier's model files, hashed once here for the manifest.
                  "classifier_files": file_records(cfg),
                  "files": {n: shards.file_record(tmp, n) for n in names},
                  "state": {n: shards.file_record(tmp, n) for n in state_names}}
        shards.place(tmp, out, names)
        (Path(out) / shards.STATE).mkdir(exist_ok=True)
        shards.place(tmp, Path(out) / shards.STATE, state_names)
    shards.write_json_atomic(Path(out) / shards.STATE / GLOBAL_MARKER, marker)
    return marker


@dataclass
class GlobalState:
    """What a map task reads back from the global stage."""

    tokenizer: TokenizerInfo
    heldout: np.ndarray  # [n, 2]
    seed: np.ndarray  # [n, 2]
    caps: Caps

    def ordinals(self, which: str, shard: int) -> np.ndarray:
        ids = getattr(self, which)
        return np.sort(ids[ids[:, 0] == shard, 1]) if len(ids) else np.zeros(0, np.int64)


def load_global(out: Path, plan: list[ShardSpec]) -> GlobalState:
    state = Path(out) / shards.STATE
    marker_file = state / GLOBAL_MARKER
    if not marker_file.is_file():
        raise PrepError(f"{out}: the global stage has not finished (no {shards.STATE}/{GLOBAL_MARKER}); "
                        "run `sgtm prep` without --task-index first")
    marker = json.loads(marker_file.read_text(encoding="utf-8"))
    for name, rec in marker["state"].items():
        p = state / name
        if not p.is_file() or p.stat().st_size != rec["bytes"] or \
                hashlib.sha256(p.read_bytes()).hexdigest() != rec["sha256"]:
            raise PrepError(f"{p}: does not match the global stage's completion marker {marker_file}; "
                            "rerun with --force")
    tok = describe((Path(out) / "tokenizer.model").read_bytes(), str(Path(out) / "tokenizer.model"))
    if tok.sha256 != marker["tokenizer"]["sha256"]:
        raise PrepError(f"{out}/tokenizer.model: differs from the global stage's marker; rerun with --force")
    caps = Caps()
    caps_doc = json.loads((state / "caps.json").read_text(encoding="utf-8"))
    for key, v in caps_doc.items():
        i = int(key)
        kept = np.load(state / f"kept-source-{plan[i].source}.npy", allow_pickle=False)
        caps.keeps[i] = Keep(int(v["first_ordinal"]), kept)
    return GlobalState(tok, np.load(state / "heldout.npy"), np.load(state / "seed.npy"), caps)

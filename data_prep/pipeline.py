"""Recipe -> shard directory: read, split, tokenize + classify (multiprocess), label, write."""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep import classifiers, shards
from data_prep.corpus import FORGET, Split, load_corpus, split_corpus
from data_prep.manifest import FORMAT_VERSION, check_output_dir, dumps, split_stats
from data_prep.noise import apply_policy
from data_prep.recipe import ClassifierConfig, Recipe
from data_prep.tokenizer import TokenizerInfo, load_tokenizer, train_tokenizer

CHUNK_DOCS = 256
SEED_FILE = "train_classifier_seed.npy"

_worker: dict = {}


def _init_worker(lang_cfg: Optional[ClassifierConfig]) -> None:
    _worker["lang"] = classifiers.LanguageScorer(lang_cfg) if lang_cfg else None
    _worker["sp_key"] = _worker["sp"] = None


def _process(task: tuple[str, bytes, int, list[str]]) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Tokenize a chunk (batch encode) and, for the language classifier, score it too:
    both are CPU-bound, so they share the same worker pass over the text."""
    key, model_bytes, eod, texts = task
    if _worker["sp_key"] != key:
        import sentencepiece as spm

        _worker["sp"] = spm.SentencePieceProcessor(model_proto=model_bytes)
        _worker["sp_key"] = key
    ids = _worker["sp"].encode(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(x + [eod] for x in ids),
                       dtype=np.int32, count=int(lengths.sum()))
    scores = _worker["lang"].score(texts) if _worker["lang"] else None
    return flat, lengths, scores


class Encoder:
    """The worker pool for tokenization + language scoring.

    The language model is loaded in the parent before forking, so workers share it
    instead of each unpacking it. The tokenizer travels with each chunk and is cached
    per worker (it is only known after training). ``start`` queues all chunks and
    returns at once, so the parent can fit the topic classifier while workers encode.
    """

    def __init__(self, lang_cfg: Optional[ClassifierConfig], workers: int, progress: bool):
        self.lang_cfg, self.progress = lang_cfg, progress
        _init_worker(lang_cfg)
        # fork: workers inherit the loaded modules; nothing CUDA is ever initialised here.
        self.pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        self._pending = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def start(self, texts: list[str], tok: TokenizerInfo) -> None:
        chunks = [texts[i:i + CHUNK_DOCS] for i in range(0, len(texts), CHUNK_DOCS)]
        tasks = [(tok.sha256, tok.model_bytes, tok.eod_id, c) for c in chunks]
        # imap keeps order, so output never depends on worker timing.
        it = self.pool.imap(_process, tasks) if self.pool is not None else map(_process, tasks)
        self._pending = (chunks, it)

    def collect(self):
        from tqdm import tqdm

        chunks, it = self._pending
        bar = tqdm(total=sum(len(t.encode("utf-8")) for c in chunks for t in c), unit="B",
                   unit_scale=True, desc="tokenize+classify", disable=not self.progress, file=sys.stderr)
        results = []
        with bar:
            for chunk, res in zip(chunks, it):
                results.append(res)
                bar.update(sum(len(t.encode("utf-8")) for t in chunk))
        if not results:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), None
        flat = np.concatenate([r[0] for r in results])
        lengths = np.concatenate([r[1] for r in results])
        scores = np.concatenate([r[2] for r in results]) if self.lang_cfg else None
        return flat, lengths, scores


def _classify(recipe: Recipe, splits: dict[str, Split], lang_scores: Optional[np.ndarray]):
    """Per-split forget scores, plus the train docs reserved to fit the classifier."""
    cfg = recipe.classifier
    train = splits["train"]
    seed = np.zeros(len(train.texts), dtype=bool)
    if cfg.kind == "language":
        out, start = {}, 0
        for name, sp in splits.items():
            out[name] = lang_scores[start:start + len(sp.texts)]
            start += len(sp.texts)
        return out, seed
    if cfg.kind == "oracle":
        return {name: classifiers.oracle_scores(sp.truth) for name, sp in splits.items()}, seed
    seed = classifiers.seed_mask(len(train.texts), cfg)
    scorer = classifiers.TopicScorer(cfg).fit([t for t, s in zip(train.texts, seed) if s],
                                              train.truth[seed] == FORGET)
    return {name: scorer.score(sp.texts) for name, sp in splits.items()}, seed


def prepare(recipe: Recipe, out: str | Path, force: bool = False, workers: int = 2,
            progress: bool = True, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Build the shard directory ``out`` from ``recipe``; returns the manifest."""
    out = Path(out)
    lang_cfg = recipe.classifier if recipe.classifier.kind == "language" else None
    with Encoder(lang_cfg, workers, progress) as encoder:
        corpus = load_corpus(recipe)
        given_tok = load_tokenizer(recipe.tokenizer.model) if recipe.tokenizer.model else None
        fingerprint = recipe.corpus_fingerprint({
            "sources": [s.to_dict() for s in corpus.sources],
            "tokenizer_sha256": given_tok.sha256 if given_tok else None})
        existing = check_output_dir(out, fingerprint, force)
        splits = split_corpus(corpus, recipe)
        log(f"prep: {len(corpus.texts)} documents; " +
            ", ".join(f"{n} {len(s.texts)}" for n, s in splits.items()))
        tok = given_tok or train_tokenizer(splits["train"].texts, recipe.tokenizer)
        all_texts = [t for s in splits.values() for t in s.texts]
        encoder.start(all_texts, tok)
        if lang_cfg is None:
            scores, seed = _classify(recipe, splits, None)
        flat, lengths, lang_scores = encoder.collect()
    if lang_cfg is not None:
        scores, seed = _classify(recipe, splits, lang_scores)

    train = splits["train"]
    ntrain = len(train.texts)
    threshold = recipe.classifier.threshold
    metrics = classifiers.measure(scores["train"], train.truth, threshold, ~seed)
    result = apply_policy(train.truth, scores["train"], lengths[:ntrain], threshold, recipe.noise)
    log(f"prep: classifier {recipe.classifier.kind}: precision {metrics['precision']:.4f} "
        f"recall {metrics['recall']:.4f} f1 {metrics['f1']:.4f} on {metrics['evaluated_docs']} train docs")

    dtype = tok.token_dtype
    manifest = {
        "format_version": FORMAT_VERSION,
        "corpus_fingerprint": fingerprint,
        "recipe": recipe.to_dict(),
        "tokenizer": tok.to_manifest(),
        "token_dtype": np.dtype(dtype).name,
        "sources": [s.to_dict() for s in corpus.sources],
        "corpus": {"uncategorized_docs": corpus.uncategorized_docs, "dropped_docs": corpus.dropped_docs,
                   "skipped_empty_docs": corpus.skipped_empty,
                   "uncategorized_policy": recipe.topics.uncategorized_policy},
        "noise_policy": {**dataclasses.asdict(recipe.noise), "threshold": threshold},
        "realised": result.report,
        "classifier": {"kind": recipe.classifier.kind, **metrics,
                       "evaluated_on": ("train docs outside the classifier's seed split" if seed.any()
                                        else "all train docs")},
        "splits": {}, "label_sidecar_sha256": {}, "tokens_sha256": {},
    }
    with shards.staging(out) as tmp:
        (tmp / "tokenizer.model").write_bytes(tok.model_bytes)
        names = ["tokenizer.model", SEED_FILE]
        np.save(tmp / SEED_FILE, seed.astype(np.uint8), allow_pickle=False)
        doc_start = tok_start = 0
        for name, sp in splits.items():
            n = len(sp.texts)
            lens = lengths[doc_start:doc_start + n]
            ntok = int(lens.sum())
            labels = result.labels if name == "train" else np.zeros(n, dtype=np.uint8)
            shards.write_tokens(tmp, name, flat[tok_start:tok_start + ntok], lens, dtype)
            shards.write_labels(tmp, name, labels, lens)
            shards.write_doc_arrays(tmp, name, sp.truth, scores[name])
            manifest["splits"][name] = split_stats(sp.truth, labels, lens)
            manifest["tokens_sha256"][name] = shards.sha256_files(
                [tmp / f"{name}_tokens.bin", tmp / f"{name}_tokens.idx"])
            manifest["label_sidecar_sha256"][name] = shards.sha256_files(
                [tmp / f"{name}_labels.bin", tmp / f"{name}_labels.idx"])
            names += shards.split_files(name)
            doc_start += n
            tok_start += ntok
        (tmp / "manifest.json").write_text(dumps(manifest), encoding="utf-8")
        stale = [f for f in shards.all_known_files() if f not in names] if existing or force else []
        shards.publish(tmp, out, names + ["manifest.json"], remove=stale)
    r = result.report
    log(f"prep: wrote {out}: {sum(s['num_tokens'] for s in manifest['splits'].values())} tokens; "
        f"realised undiscovered {r['undiscovered_rate']:.4f}, false positives {r['false_positive_rate']:.4f} "
        f"({r['false_positive_pool']} pool), retain-mode share {r['retain_mode_share']:.4f}")
    return manifest

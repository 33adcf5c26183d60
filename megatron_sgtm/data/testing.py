"""Write small, real shard directories for tests and smoke runs (same format as data_prep).

``write_test_shards`` writes one split through megatron-core's ``IndexedDatasetBuilder`` and
merges it into the directory's ``manifest.json``; call it once per split. Text documents are
tokenised with a small sentencepiece model trained on the embedded English/Spanish fixture
(``sample_text.py``), so "the loss falls on real text" tests see real text.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .sample_text import ENGLISH, SPANISH

EOD_PIECE, GOOD_PIECE, BAD_PIECE = "<eod>", "<good>", "<bad>"
Doc = Union[str, Sequence[int], np.ndarray]


@lru_cache(maxsize=4)
def sample_tokenizer(vocab_size: int = 320) -> bytes:
    """A sentencepiece model (bytes) trained on the fixture; ids: unk 0, eod 1, pad 2."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.set_random_generator_seed(0)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ENGLISH + SPANISH), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, unk_id=0, eos_id=1, eos_piece=EOD_PIECE,
        pad_id=2, bos_id=-1, control_symbols=[GOOD_PIECE, BAD_PIECE], hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


def _tokenizer_entry(model: bytes) -> tuple[dict, "object"]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=model)
    return {"path": "tokenizer.model", "sha256": hashlib.sha256(model).hexdigest(),
            "vocab_size": sp.vocab_size(), "eod_id": sp.eos_id(),
            "good_id": sp.piece_to_id(GOOD_PIECE), "bad_id": sp.piece_to_id(BAD_PIECE),
            "pad_id": sp.pad_id()}, sp


def sample_documents(n_docs: int, seed: int = 0, forget_share: float = 0.3,
                     adjacent_share: float = 0.0, sentences: tuple[int, int] = (2, 6)):
    """(texts, truth): English documents are retain (0), Spanish forget (1); ``adjacent_share``
    of the English ones are marked adjacent (2) so filters have something to drop."""
    rng = np.random.default_rng(seed)
    texts, truth = [], []
    for _ in range(n_docs):
        forget = rng.random() < forget_share
        pool = SPANISH if forget else ENGLISH
        k = int(rng.integers(sentences[0], sentences[1] + 1))
        texts.append(" ".join(pool[i] for i in rng.choice(len(pool), size=k, replace=False)))
        truth.append(1 if forget else (2 if rng.random() < adjacent_share else 0))
    return texts, np.array(truth, np.uint8)


def _write_indexed(prefix: Path, docs: list[np.ndarray], dtype) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
    builder.finalize(str(prefix) + ".idx")


def record_facts(directory: Path, prefix: str, lengths: np.ndarray, dtype) -> dict:
    """The facts and file records prep keeps for a prefix, by a full scan (and its run file)."""
    from data_prep.shards import file_record

    from .facts import doc_offsets, runs_name, scan_prefix

    tokens = np.fromfile(directory / f"{prefix}_tokens.bin", dtype=dtype)
    labels = np.fromfile(directory / f"{prefix}_labels.bin", dtype=np.uint8)
    facts, runs = scan_prefix(tokens, labels, doc_offsets(lengths), np.asarray(lengths, np.int64))
    np.save(directory / runs_name(prefix), runs, allow_pickle=False)
    names = [f"{prefix}_{kind}.{ext}" for kind in ("tokens", "labels") for ext in ("bin", "idx")]
    names += [f"{prefix}_truth.npy", f"{prefix}_scores.npy", runs_name(prefix)]
    return {"facts": facts, "files": {n: file_record(directory, n) for n in names}}


def write_test_shards(directory, docs: Sequence[Doc], labels, truth, vocab: Optional[int] = None,
                      split: str = "train", scores=None, tokenizer_vocab: int = 320) -> dict:
    """Write ``split`` of a shard directory; returns the updated manifest.

    - ``docs``: texts (tokenised with the fixture tokenizer, ``<eod>`` appended) or token-id
      sequences (written as given; pass ``vocab``). One kind per directory.
    - ``labels``: one applied label per document (0/1/2), or per-token label arrays.
    - ``truth``: one true domain per document (0 retain, 1 forget, 2 adjacent).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {
        "format_version": 1, "splits": {}, "tokens_sha256": {}, "label_sidecar_sha256": {}}
    if docs and isinstance(docs[0], str):
        model = sample_tokenizer(tokenizer_vocab)
        entry, sp = _tokenizer_entry(model)
        (directory / "tokenizer.model").write_bytes(model)
        ids = [np.array(sp.encode(text) + [entry["eod_id"]], np.int64) for text in docs]
    else:
        if vocab is None:
            raise ValueError("token-id documents need vocab")
        entry = {"path": None, "sha256": None, "vocab_size": int(vocab), "eod_id": 1,
                 "good_id": None, "bad_id": None, "pad_id": None}
        ids = [np.asarray(d, np.int64) for d in docs]
    if vocab is not None and vocab < entry["vocab_size"]:
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {entry['vocab_size']}")
    manifest["tokenizer"] = entry
    dtype = np.uint16 if entry["vocab_size"] < 65500 else np.int32
    manifest["token_dtype"] = np.dtype(dtype).name

    lengths = np.array([len(d) for d in ids], np.int64)
    per_token = [np.full(n, int(lab), np.uint8) if np.ndim(lab) == 0 else
                 np.asarray(lab, np.uint8) for lab, n in zip(labels, lengths)]
    truth = np.asarray(truth, np.uint8)
    _write_indexed(directory / f"{split}_tokens", ids, dtype)
    _write_indexed(directory / f"{split}_labels", per_token, np.uint8)
    np.save(directory / f"{split}_truth.npy", truth, allow_pickle=False)
    scores = np.asarray(truth == 1, np.float32) if scores is None else scores
    np.save(directory / f"{split}_scores.npy", np.asarray(scores, np.float32), allow_pickle=False)
    doc_label = np.array([int(p.max()) if len(p) else 0 for p in per_token])
    manifest["splits"][split] = {
        "num_docs": len(ids), "num_tokens": int(lengths.sum()),
        "tokens_per_applied_label": {n: int(lengths[doc_label == i].sum())
                                     for i, n in enumerate(("unlabeled", "retain", "forget"))},
        **record_facts(directory, split, lengths, dtype),
    }
    tmp = manifest_path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, sort_keys=True, indent=2) + "\n")
    os.replace(tmp, manifest_path)
    return manifest


def write_sample_shards(directory, n_train: int = 200, n_test: int = 30, seed: int = 0,
                        retain_share: float = 0.25, adjacent_share: float = 0.1) -> dict:
    """A complete bilingual shard directory: train (Spanish labelled forget, a share of the
    English labelled retain, the rest unlabeled) plus test_retain / test_forget."""
    texts, truth = sample_documents(n_train, seed, adjacent_share=adjacent_share)
    rng = np.random.default_rng(seed + 1)
    labels = np.where(truth == 1, 2, np.where(rng.random(len(truth)) < retain_share, 1, 0))
    write_test_shards(directory, texts, labels, truth)
    for split, share in (("test_retain", 0.0), ("test_forget", 1.0)):
        t, tr = sample_documents(n_test, seed + 7 + int(share), forget_share=share)
        manifest = write_test_shards(directory, t, np.zeros(len(t), np.int64), tr, split=split)
    return manifest

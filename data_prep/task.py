"""The map task: one shard in, its train files out, then its completion marker.

The same function runs under every executor (in-process, local pool, SLURM array task).
Memory is bounded by one chunk of documents plus the shard's per-document arrays (a few
bytes per document), whatever the corpus size. Files are written under ``.prep/tmp-*``,
renamed into ``train/``, and only then is the marker written (atomically): a shard without
a marker is unfinished and is redone from scratch by the next run.
"""
from __future__ import annotations

import errno
import hashlib
import resource
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from data_prep import shards
from data_prep.classifiers import add_counts, make_scorer, scorer_key
from data_prep.documents import Doc, DocCounts, shard_docs
from data_prep.encode import ChunkEncoder
from data_prep.errors import PrepError
from data_prep.indexed import IndexedWriter
from data_prep.plan import ShardSpec
from data_prep.recipe import Recipe
from data_prep.sample import GlobalState
from megatron_sgtm.data.facts import TokenScan

_encoders: dict = {}


def encoder_for(recipe: Recipe, out: Path, state: GlobalState) -> ChunkEncoder:
    """One tokenizer + scorer per process, for every shard it runs (models are large and slow
    to load: once per worker, never per shard). A changed classifier is a new key."""
    key = (str(out), state.tokenizer.sha256, scorer_key(recipe.classifier))
    if key not in _encoders:
        tok = state.tokenizer
        _encoders.clear()
        _encoders[key] = ChunkEncoder(tok.model_bytes, tok.eod_id, tok.token_dtype, recipe.classifier,
                                      make_scorer(recipe.classifier, Path(out) / shards.STATE))
    return _encoders[key]


def _chunks(docs: Iterator[Doc], size: int) -> Iterator[list[Doc]]:
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _member(sorted_ids: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
    if len(sorted_ids) == 0:
        return np.zeros(len(ordinals), bool)
    i = np.minimum(np.searchsorted(sorted_ids, ordinals), len(sorted_ids) - 1)
    return sorted_ids[i] == ordinals


def run_shard(recipe: Recipe, out: Path, spec: ShardSpec, state: GlobalState) -> dict:
    """Process one shard; returns (and writes) its completion marker."""
    out = Path(out)
    t0 = time.perf_counter()
    shards.clear_stale_staging(out, spec.name)
    prefix = shards.shard_prefix(spec.index)
    paragraphs = recipe.classifier.granularity == "paragraph"
    heldout, seed = state.ordinals("heldout", spec.index), state.ordinals("seed", spec.index)
    encoder = encoder_for(recipe, out, state)
    counts, digest, token_range = DocCounts(), hashlib.sha256(), TokenScan()
    stage_counts = None  # cascades: per level and stage, summed over the shard's chunks
    arrays: dict[str, list[np.ndarray]] = {k: [] for k in shards.DOC_ARRAYS}
    n_docs = n_tokens = n_heldout = text_bytes = ordinal = 0
    try:
        with shards.staging(out, spec.name) as tmp:
            (tmp / shards.TRAIN_DIR).mkdir()
            writer = IndexedWriter(tmp / f"{prefix}_tokens", state.tokenizer.token_dtype)
            try:
                docs = shard_docs(spec, recipe, state.caps.for_shard(spec.index), counts, digest)
                for chunk in _chunks(docs, recipe.sharding.chunk_docs):
                    ords = np.arange(ordinal, ordinal + len(chunk), dtype=np.int64)
                    ordinal += len(chunk)
                    test = _member(heldout, ords)
                    n_heldout += int(test.sum())
                    chunk = [d for d, t in zip(chunk, test) if not t]
                    if not chunk:
                        continue
                    text_bytes += sum(len(d.text.encode("utf-8")) for d in chunk)
                    enc = encoder.encode(chunk, paragraphs)
                    writer.add(enc.tokens, enc.doc_lengths)
                    stage_counts = add_counts(stage_counts, enc.stage_counts)
                    token_range.update(enc.tokens)
                    arrays["truth"].append(enc.doc_truth)
                    arrays["scores"].append(enc.doc_scores)
                    arrays["seed"].append(_member(seed, ords[~test]).astype(np.uint8))
                    if paragraphs:
                        arrays["span_lengths"].append(enc.span_lengths.astype(np.int32))
                        arrays["span_truth"].append(enc.span_truth)
                        arrays["span_scores"].append(enc.span_scores)
                    n_docs += len(chunk)
                    n_tokens += int(enc.doc_lengths.sum())
                writer.finalize()
            finally:
                writer.close()
            names = shards.indexed_files(prefix, "tokens")
            dtypes = {"truth": np.uint8, "scores": np.float32, "seed": np.uint8,
                      "span_lengths": np.int32, "span_truth": np.uint8, "span_scores": np.float32}
            for kind in shards.DOC_ARRAYS:
                if kind == "seed" and recipe.classifier.kind != "topic":
                    continue
                if kind.startswith("span_") and not paragraphs:
                    continue
                parts = arrays[kind]
                arr = np.concatenate(parts) if parts else np.zeros(0, dtypes[kind])
                names.append(shards.save_array(tmp, prefix, kind, arr.astype(dtypes[kind])))
            files = {n: shards.file_record(tmp, n) for n in names}
            shards.place(tmp, out, names)
    except PrepError as e:
        raise PrepError(f"{spec.describe(recipe)}: {e}") from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise PrepError(f"{spec.describe(recipe)}: cannot write its output under {out} "
                            f"({e.strerror}); nothing of this shard was marked complete") from None
        raise
    marker = {"shard": spec.index, "prefix": prefix, "input_sha256": digest.hexdigest(),
              "num_docs": n_docs, "num_tokens": n_tokens, "heldout_docs": n_heldout,
              "text_bytes": text_bytes, "counts": counts.to_dict(), "files": files,
              "facts": token_range.facts()}
    if stage_counts is not None:
        marker["classifier_stages"] = stage_counts
    try:
        shards.write_json_atomic(shards.marker_path(out, spec.index), marker)
    except OSError as e:
        raise PrepError(f"{spec.describe(recipe)}: cannot write its completion marker ({e.strerror})") from None
    # Returned only, never written: markers stay deterministic.
    marker["seconds"] = time.perf_counter() - t0
    marker["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return marker

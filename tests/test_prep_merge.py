"""The streaming merge: megatron-core's bytes, the same dataset for training, relabel-able."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.cli import main
from data_prep.indexed import DTYPE_CODES, INDEX_HEADER, IndexedWriter, merge
from data_prep.relabel import relabel
from megatron_sgtm.data import TrainBatches, open_split
from megatron_sgtm.data.index_file import read_index
from prep_corpus import RECIPE_OVERRIDES, write_corpus


def _megatron():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def test_writer_and_merge_match_megatron_builder(tmp_path):
    m = _megatron()
    assert INDEX_HEADER == m._INDEX_HEADER
    assert all(m.DType.code_from_dtype(getattr(np, k)) == v for k, v in DTYPE_CODES.items())
    rng = np.random.default_rng(0)
    prefixes = []
    for i, n_docs in enumerate((7, 1, 12)):
        lengths = rng.integers(1, 30, n_docs)
        flat = rng.integers(0, 60000, int(lengths.sum())).astype(np.uint16)
        ours = tmp_path / f"ours{i}"
        w = IndexedWriter(ours, np.uint16)
        w.add(flat[: int(lengths[:3].sum())], lengths[:3])
        w.add(flat[int(lengths[:3].sum()):], lengths[3:])
        w.finalize()
        ref = m.IndexedDatasetBuilder(str(tmp_path / f"ref{i}.bin"), dtype=np.uint16)
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        for a, b in zip(bounds[:-1], bounds[1:]):
            ref.add_document(torch.from_numpy(flat[a:b].astype(np.int64)), [int(b - a)])
        ref.finalize(str(tmp_path / f"ref{i}.idx"))
        for ext in (".bin", ".idx"):
            assert Path(f"{ours}{ext}").read_bytes() == (tmp_path / f"ref{i}{ext}").read_bytes()
        prefixes.append(ours)
    merge(prefixes, tmp_path / "merged")
    ref = m.IndexedDatasetBuilder(str(tmp_path / "refmerged.bin"), dtype=np.uint16)
    for p in prefixes:
        ref.add_index(str(p))
    ref.finalize(str(tmp_path / "refmerged.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"refmerged{ext}").read_bytes()
    # The reader a start uses (no megatron-core import) sees what megatron-core's reader sees.
    for prefix in [*prefixes, tmp_path / "refmerged"]:
        ours, theirs = read_index(Path(f"{prefix}.idx")), m.IndexedDataset(str(prefix), mmap=True)
        assert ours.dtype == np.dtype(theirs.index.dtype)
        assert ours.sequence_count == len(theirs.index) and ours.document_count == len(theirs.document_indices)
        assert np.array_equal(ours.lengths, theirs.sequence_lengths)
        assert np.array_equal(ours.pointers, theirs.index.sequence_pointers)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    recipe = write_corpus(root)
    assert main(["--recipe", str(recipe), "--out", str(root / "src"), "--no-progress", "--workers", "2",
                 *RECIPE_OVERRIDES]) == 0
    return root / "src"


def test_merged_directory_trains_the_same(built, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["--merge", str(built), "--out", str(out), "--shards-per-file", "4"]) == 0
    src_m, m = (json.loads((d / "manifest.json").read_text()) for d in (built, out))
    assert len(m["splits"]["train"]["shards"]) == -(-len(src_m["splits"]["train"]["shards"]) // 4)
    assert m["tokens_sha256"]["train"] != src_m["tokens_sha256"]["train"]
    a, b = open_split(built, "train"), open_split(out, "train")
    for name in ("doc_lengths", "doc_labels", "doc_truth", "doc_scores"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    x = TrainBatches(a, 64, 4, 0, 1, 0, "sgtm", use_cache=False).batch_at(40)
    y = TrainBatches(b, 64, 4, 0, 1, 0, "sgtm", use_cache=False).batch_at(40)
    assert all(torch.equal(x[k], y[k]) for k in x)
    r = relabel(out, undiscovered_rate=0.5)  # a merged directory relabels like any other
    assert abs(r["realised"]["undiscovered_rate"] - 0.5) < 0.02
    capsys.readouterr()
    assert main(["--merge", str(built), "--out", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err

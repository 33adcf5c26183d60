"""Per-prefix facts: prep records them (a full scan agrees), relabel and merge keep them
right, a start checks them cheaply (one clear error when they disagree) and reads a bounded
number of bytes; directories prepped before facts fall back to the full scan."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards as prep_shards
from data_prep.merge import merge_directory
from data_prep.relabel import relabel
from megatron_sgtm import cli as sgtm_cli
from megatron_sgtm.data import DataError, TrainBatches, facts, open_split
from megatron_sgtm.data.index_file import read_index
from megatron_sgtm.data.shards import split_prefixes
from megatron_sgtm.data.testing import write_test_shards
from megatron_sgtm.process_io import ReadMeter, evict, read_bytes
from prep_corpus import prep_small

TINY = str(Path(__file__).resolve().parent.parent / "configs/train/tiny_cpu.yaml")


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    return prep_small(tmp_path_factory.mktemp("facts"))


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _entries(d):
    m = json.loads((d / "manifest.json").read_text())
    return m, [(p, e) for split in sorted(m["splits"]) for p, e in split_prefixes(m, split)]


def reference_facts(d, prefix, token_dtype):
    """A prefix's facts and label runs computed the plain way, apart from facts.py: whole
    arrays in memory, a max/min per document."""
    tokens = np.fromfile(d / f"{prefix}_tokens.bin", dtype=token_dtype)
    labels = np.fromfile(d / f"{prefix}_labels.bin", dtype=np.uint8)
    lengths = np.asarray(read_index(d / f"{prefix}_tokens.idx").lengths, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts = np.concatenate([[0], np.flatnonzero(labels[1:] != labels[:-1]) + 1])
    counts = np.bincount(labels, minlength=3).tolist()
    mixed = np.maximum.reduceat(labels, offsets) != np.minimum.reduceat(labels, offsets)
    return ({"token_min": int(tokens.min()), "token_max": int(tokens.max()),
             "label_range": [int(labels.min()), int(labels.max())], "label_counts": counts,
             "label_runs": len(starts), "mixed_label_docs": int(mixed.sum())},
            np.stack([starts, labels[starts].astype(np.int64)], axis=1))


def assert_facts_match_a_full_scan(d):
    """Every prefix's recorded facts, run file and file records equal a scan of its files."""
    m, listed = _entries(d)
    for prefix, entry in listed:
        found, runs = reference_facts(d, prefix, m["token_dtype"])
        assert entry["facts"] == found, prefix
        assert np.array_equal(np.load(d / facts.runs_name(prefix)), runs), prefix
        for name, rec in entry["files"].items():
            assert prep_shards.file_record(d, name) == rec, name
    return listed


def test_prep_records_facts_a_full_scan_confirms(prepped):
    listed = assert_facts_match_a_full_scan(prepped)
    train = [e for prefix, e in listed if prefix.startswith("train/")]
    assert len(train) > 2 and len(listed) == len(train) + 2  # + test_retain, test_forget
    for e in train:
        f = e["facts"]
        assert sum(f["label_counts"]) == e["num_tokens"] and 0 <= f["token_min"] <= f["token_max"] < 600
        assert facts.runs_name(e["prefix"]) in e["files"]
    assert any(e["facts"]["label_range"] == [0, 2] for e in train)


def test_relabel_rewrites_label_facts_and_keeps_token_facts(prepped, tmp_path):
    d = _copy(prepped, tmp_path)
    _, before = _entries(d)
    relabel(d, undiscovered_rate=0.5, retain_mode_share=0.6, seed=7)
    after = assert_facts_match_a_full_scan(d)
    changed = 0
    for (_, old), (_, new) in zip(before, after):
        for k in ("token_min", "token_max"):
            assert old["facts"][k] == new["facts"][k]
        changed += old["facts"]["label_counts"] != new["facts"]["label_counts"]
    assert changed > 0  # the new policy moved labels, and the facts followed


def test_merge_combines_facts_and_runs(prepped, tmp_path):
    out = tmp_path / "merged"
    merge_directory(prepped, out, shards_per_file=3)
    listed = assert_facts_match_a_full_scan(out)  # runs stay maximal across shard boundaries
    assert any(e.get("merged_from") and len(e["merged_from"]) == 3 for _, e in listed)
    a, b = open_split(prepped, "train"), open_split(out, "train")
    assert not a.unrecorded and not b.unrecorded
    assert np.array_equal(a.label_runs, b.label_runs)


def _strip_facts(d):
    """The manifest an older prep wrote: no facts, no run files."""
    m = json.loads((d / "manifest.json").read_text())
    for split in m["splits"].values():
        for e in split.get("shards", [split]):
            e.pop("facts", None)
            for name in [n for n in e.get("files", {}) if n.endswith("_label_runs.npy")]:
                del e["files"][name]
                (d / name).unlink()
    (d / "manifest.json").write_text(json.dumps(m))


def test_older_directories_are_scanned_in_full_with_one_warning(prepped, tmp_path, capsys):
    old = _copy(prepped, tmp_path, "old")
    _strip_facts(old)
    new, legacy = open_split(prepped, "train"), open_split(old, "train")
    assert legacy.unrecorded == legacy.prefixes and not new.unrecorded
    assert new.scan_note() is None and "--relabel" in legacy.scan_note()
    for name in ("doc_labels", "doc_label_min", "label_runs", "doc_truth"):
        assert np.array_equal(getattr(new, name), getattr(legacy, name)), name
    # sgtm train's preflight says so once, before anything starts.
    code = sgtm_cli.main(["train", "--config", TINY, "--dry-run", f"data.dir={old}", "checkpoint.dir="])
    err = capsys.readouterr().err
    assert code == 0 and err.count("warning: data:") == 1 and "record no facts" in err
    # Merging such a directory records the facts of the merged files (a scan of them) ...
    merge_directory(old, tmp_path / "merged", shards_per_file=2)
    assert_facts_match_a_full_scan(tmp_path / "merged")
    # ... and relabelling it with its own policy records them without changing a label.
    labels = {p: (old / f"{p}_labels.bin").read_bytes() for p in legacy.prefixes}
    relabel(old)
    assert_facts_match_a_full_scan(old)
    assert all((old / f"{p}_labels.bin").read_bytes() == b for p, b in labels.items())
    assert not open_split(old, "train").unrecorded


def _page_of(path, offset, value, dtype):
    raw = bytearray(path.read_bytes())
    size = np.dtype(dtype).itemsize
    raw[offset:offset + size] = np.array([value], dtype).tobytes()
    path.write_bytes(bytes(raw))


def _damage(name, d):
    m = json.loads((d / "manifest.json").read_text())
    e = m["splits"]["train"]["shards"][0]
    p = d / e["prefix"]
    if name == "token_above_recorded_max":  # still inside the vocabulary: only the facts know
        first_page = np.fromfile(p.with_name(p.name + "_tokens.bin"), m["token_dtype"], facts.PAGE // 2)
        e["facts"]["token_max"] = int(first_page.max()) - 1
        (d / "manifest.json").write_text(json.dumps(m))
    elif name == "sampled_token_page":
        _page_of(p.with_name(p.name + "_tokens.bin"), 2, e["facts"]["token_max"] + 1, m["token_dtype"])
    elif name == "sampled_label_page":
        lab = p.with_name(p.name + "_labels.bin")
        _page_of(lab, 0, 1 if lab.read_bytes()[0] != 1 else 2, np.uint8)
    elif name == "run_file":
        runs = np.load(p.with_name(p.name + "_label_runs.npy"))
        runs[0, 1] = (runs[0, 1] + 1) % 3 if runs[1, 1] != (runs[0, 1] + 1) % 3 else (runs[0, 1] + 2) % 3
        np.save(p.with_name(p.name + "_label_runs.npy"), runs)
    elif name == "recorded_size":
        m["splits"]["train"]["shards"][0]["files"][e["prefix"] + "_truth.npy"]["bytes"] += 1
        (d / "manifest.json").write_text(json.dumps(m))
    elif name == "facts_lack_a_key":
        del m["splits"]["train"]["shards"][0]["facts"]["token_min"]
        (d / "manifest.json").write_text(json.dumps(m))
    elif name == "recorded_vocab":
        m["splits"]["train"]["shards"][0]["facts"]["token_max"] = m["tokenizer"]["vocab_size"]
        (d / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("damage, needle", [
    ("token_above_recorded_max", r"shard-00000_tokens.bin: token id \d+ near byte 0 is outside the range"),
    ("sampled_token_page", r"shard-00000_tokens.bin: token id \d+ near byte 0 is outside the range"),
    ("sampled_label_page", r"shard-00000_labels.bin: labels near byte 0 differ from .*_label_runs.npy"),
    ("run_file", r"shard-00000_label_runs.npy: label_counts .* but the manifest records"),
    ("recorded_size", r"shard-00000_truth.npy: \d+ bytes, the manifest records \d+"),
    ("facts_lack_a_key", r"manifest: the facts of train/shard-00000 lack token_min"),
    ("recorded_vocab", r"shard-00000_tokens.bin: token id 600 outside the manifest's vocabulary of 600 \(recorded"),
])
def test_facts_disagreeing_with_a_cheap_check_are_one_error_at_start(prepped, tmp_path, capsys,
                                                                     damage, needle):
    d = _copy(prepped, tmp_path)
    _damage(damage, d)
    with pytest.raises(DataError, match=needle):
        open_split(d, "train")
    # The same one error from `sgtm train`, before any process starts.
    code = sgtm_cli.main(["train", "--config", TINY, "--dry-run", f"data.dir={d}", "checkpoint.dir="])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: data: "), err


def _cold_read_is_measurable(path) -> bool:
    """/proc/self/io counts the bytes a cold read fetches (page-cache eviction works here)."""
    evict([path])
    meter = ReadMeter()
    path.read_bytes()
    return meter.bytes is not None and meter.bytes >= path.stat().st_size


def test_a_start_reads_the_index_files_and_a_few_pages(tmp_path):
    """Cold page cache: opening the split and building its batches (a restart: the packing
    cache exists) reads the index-sized files and at most a few pages of each .bin, not the
    16 MB of tokens; an older directory without facts reads every byte."""
    if read_bytes() is None:
        pytest.skip("no /proc/self/io on this system")
    rng = np.random.default_rng(0)
    lengths = rng.integers(2000, 6000, 2000)
    docs = [np.append(rng.integers(3, 1000, n - 1), 1) for n in lengths]
    d = tmp_path / "big"
    write_test_shards(d, docs, rng.choice(3, len(docs)), rng.choice(2, len(docs)), vocab=1000)
    if not _cold_read_is_measurable(d / "train_tokens.bin"):
        pytest.skip("page-cache eviction has no effect on this filesystem")
    TrainBatches(open_split(d, "train"), 64, 8, 0, 1, 0, "sgtm")  # writes the packing cache
    bins = sum(p.stat().st_size for p in d.glob("*.bin"))
    small = [p for p in d.rglob("*") if p.is_file() and p.suffix != ".bin" and ".packing_cache" not in p.parts]
    # The small files whole (their last page whole), and the sampled pages of each .bin.
    index_bytes = sum(-(-p.stat().st_size // facts.PAGE) * facts.PAGE for p in small)
    pages = sum(len(facts.sample_spans(p.stat().st_size)) for p in d.glob("*.bin")) * facts.PAGE
    evict([d])
    meter = ReadMeter()
    split = open_split(d, "train")
    assert meter.bytes <= index_bytes + pages, (meter.bytes, index_bytes, pages)
    assert meter.bytes < bins / 20 and bins > 16e6
    # The packing cache (a restart: it exists) is memory-mapped: its headers, not its arrays.
    meter = ReadMeter()
    batches = TrainBatches(split, 64, 8, 0, 1, 0, "sgtm")
    assert meter.bytes <= len(list(d.rglob(".packing_cache/*/*.npy"))) * 64 * 1024, meter.bytes
    # A step reads the pages of its own sequences (8 of 65 tokens, each in at most two
    # documents) and packing entries, not the readahead window around each (MBs here).
    evict([d])
    meter = ReadMeter()
    batches.batch_at(0)
    assert meter.bytes <= 8 * 2 * 2 * 2 * facts.PAGE + 7 * 8 * 2 * facts.PAGE, meter.bytes
    _strip_facts(d)
    evict([d])
    meter = ReadMeter()
    open_split(d, "train")
    assert meter.bytes >= bins

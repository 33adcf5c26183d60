"""Sharded prep: output independent of worker count and shard size, exact resume after
SIGKILL, and refusal of a changed recipe or input without --force."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from data_prep.cli import main
from data_prep.pipeline import prepare
from data_prep.recipe import load_recipe
from prep_corpus import RECIPE_OVERRIDES, tree, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _prep(recipe: Path, out: Path, *extra: str) -> int:
    return main(["--recipe", str(recipe), "--out", str(out), "--no-progress", *RECIPE_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(root)


@pytest.fixture(scope="module")
def one_worker(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "out"
    assert _prep(corpus, out, "--workers", "1") == 0
    return out


def test_plan_cuts_files_into_byte_ranges(one_worker):
    plan = json.loads((one_worker / ".prep" / "plan.json").read_text())["shards"]
    m = json.loads((one_worker / "manifest.json").read_text())
    assert len(plan) >= 6 and len({s["path"] for s in plan}) == 2
    for path in {s["path"] for s in plan}:
        ranges = [(s["start"], s["stop"]) for s in plan if s["path"] == path]
        assert ranges[0][0] == 0 and ranges[-1][1] == os.path.getsize(path)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap
    assert len(m["splits"]["train"]["shards"]) == len(plan)
    assert all(len(e["files"]) >= 6 for e in m["splits"]["train"]["shards"])


def test_three_workers_byte_identical(corpus, one_worker, tmp_path):
    out = tmp_path / "w3"
    assert _prep(corpus, out, "--workers", "3") == 0
    assert tree(out) == tree(one_worker)


def test_shard_size_changes_only_the_cut(corpus, one_worker, tmp_path):
    """One shard per file holds exactly the same documents, tokens and labels: no line is
    lost or read twice at a range boundary."""
    out = tmp_path / "whole"
    assert _prep(corpus, out, "--workers", "2", "sharding.target_bytes=100000000") == 0

    def train(d):
        m = json.loads((d / "manifest.json").read_text())
        cat = lambda kind, dt: np.concatenate([np.fromfile(d / f"{s['prefix']}_{kind}.bin", dt)  # noqa: E731
                                               for s in m["splits"]["train"]["shards"]])
        return m, cat("tokens", np.uint16), cat("labels", np.uint8)

    (ma, ta, la), (mb, tb, lb) = train(one_worker), train(out)
    assert len(mb["splits"]["train"]["shards"]) == 2
    assert np.array_equal(ta, tb) and np.array_equal(la, lb)
    assert ma["realised"] == mb["realised"]
    for name in ("tokenizer.model", "test_forget_tokens.bin", "test_retain_tokens.bin"):
        assert (one_worker / name).read_bytes() == (out / name).read_bytes()


@pytest.mark.slow
def test_sigkill_mid_shard_then_rerun_redoes_only_unfinished(corpus, one_worker, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "--recipe", str(corpus), "--out", str(out),
           "--no-progress", "--workers", "1", *RECIPE_OVERRIDES, "sharding.chunk_docs=4"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    state = out / ".prep"
    deadline = time.time() + 120
    mid_shard = False
    while time.time() < deadline and proc.poll() is None:
        done = list(state.glob("shard-*.done.json")) if state.exists() else []
        if len(done) >= 2 and list(state.glob("tmp-shard-*")):
            os.killpg(proc.pid, signal.SIGKILL)
            mid_shard = True
            break
        time.sleep(0.002)
    proc.wait(timeout=30)
    assert mid_shard, "the run ended before it could be killed inside a shard"
    assert not (out / "manifest.json").exists()
    finished = {p.name for p in state.glob("shard-*.done.json")}
    n_shards = len(json.loads((state / "plan.json").read_text())["shards"])
    assert 2 <= len(finished) < n_shards
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{n_shards - len(finished)} of {n_shards} shards to process ({len(finished)} already finished)" \
        in res.stderr
    assert tree(out) == tree(one_worker)


def test_changed_recipe_or_input_refused_without_force(corpus, one_worker, tmp_path, capsys):
    out = tmp_path / "copy"
    assert _prep(corpus, out, "--workers", "2") == 0
    before = tree(out)
    assert _prep(corpus, out, "tokenizer.vocab_size=700") == 2
    assert "holds a different corpus (a different recipe" in capsys.readouterr().err
    assert _prep(corpus, out, "sharding.target_bytes=30000") == 2  # another shard plan
    capsys.readouterr()
    en = Path(load_recipe(corpus).sources[0].path)
    original, st = en.read_bytes(), en.stat()
    try:
        en.write_bytes(original + b'{"text": "One more English lead about a river city."}\n')
        assert _prep(corpus, out) == 2
        assert "input files changed since it was made" in capsys.readouterr().err
        assert tree(out) == before
    finally:
        en.write_bytes(original)
        os.utime(en, ns=(st.st_atime_ns, st.st_mtime_ns))
    # A new noise policy is not a new corpus: every shard is reused, only labels change.
    logs = []
    m = prepare(load_recipe(corpus, RECIPE_OVERRIDES + ["noise.undiscovered_rate=0.5"]), out,
                workers=2, progress=False, log=logs.append)
    assert not any("shards to process" in line for line in logs)
    assert abs(m["realised"]["undiscovered_rate"] - 0.5) < 0.02
    changed = sorted(k for k, v in tree(out).items() if before.get(k) != v)
    assert changed and all(k == "manifest.json" or k.endswith(("_labels.bin", "_label_runs.npy"))
                           for k in changed)


@pytest.mark.parametrize("kind", ["parquet", "hf_map", "hf_stream"])
def test_row_group_and_hf_shards_read_every_document_once(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_prep import PrepError
    from data_prep.corpus import load_corpus
    from data_prep.plan import make_plan
    from data_prep.recipe import recipe_from_dict
    from prep_corpus import wiki_leads, write_jsonl

    docs = wiki_leads("en", 120)
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet", row_group_size=20)
    files = [str(write_jsonl(tmp_path / f"p{i}.jsonl", docs[i * 40:(i + 1) * 40])) for i in range(3)]
    src = {"parquet": {"kind": "parquet", "path": str(tmp_path / "a.parquet")},
           "hf_map": {"kind": "hf", "dataset": "json", "data_files": files, "streaming": False, "num_shards": 4},
           "hf_stream": {"kind": "hf", "dataset": "json", "data_files": files, "streaming": True,
                         "num_shards": 3}}[kind]
    recipe = recipe_from_dict({"name": "x", "sources": [{"name": "s", "domain": "retain", **src}],
                               "sharding": {"target_bytes": 4000}})
    assert len(make_plan(recipe)) >= 3
    assert load_corpus(recipe).texts == docs
    if kind == "hf_stream":
        too_many = recipe_from_dict({"name": "x", "sources": [{"name": "s", "domain": "retain", **src,
                                                               "num_shards": 4}]})
        with pytest.raises(PrepError, match="has only 3 data files to shard by"):
            load_corpus(too_many)

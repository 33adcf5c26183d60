"""Bad input and bad state in sharded prep: one clear error naming the file and line or the
shard, exit status 2, and nothing left that looks complete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_prep import PrepError
from data_prep.cli import main
from data_prep.plan import make_plan
from data_prep.recipe import load_recipe
from data_prep.sample import load_global
from data_prep.task import run_shard
from megatron_sgtm.data import DataError, open_split
from prep_corpus import RECIPE_OVERRIDES, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _error_line(stderr: str) -> str:
    """The one ``error:`` line, which ends stderr (progress lines may come before it)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    return errors[0]


def _prep(recipe: Path, out: Path, *extra: str) -> int:
    return main(["--recipe", str(recipe), "--out", str(out), "--no-progress", *RECIPE_OVERRIDES, *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    recipe = write_corpus(root)
    assert _prep(recipe, root / "out", "--workers", "2") == 0
    return recipe, root / "out"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_malformed_line_deep_in_a_shard(tmp_path, capsys, workers):
    recipe = write_corpus(tmp_path)
    en = Path(load_recipe(recipe).sources[0].path)
    lines = en.read_bytes().splitlines(keepends=True)
    lines[249] = b'{"text": "a line cut off\n'
    en.write_bytes(b"".join(lines))
    out = tmp_path / "out"
    # A small sample does not reach line 250: the map finds it, with its line number.
    assert _prep(recipe, out, "--workers", workers, "sharding.sample_bytes=20000") == 2
    err = _error_line(capsys.readouterr().err)
    assert f"{en}:250: not valid JSON" in err and err.startswith("error: shard ")
    assert not (out / "manifest.json").exists()
    plan = json.loads((out / ".prep" / "plan.json").read_text())["shards"]
    bad = [s["index"] for s in plan if s["path"] == str(en) and s["start"] <= sum(map(len, lines[:249])) < s["stop"]]
    assert not (out / ".prep" / f"shard-{bad[0]:05d}.done.json").exists()
    assert not list(out.rglob("tmp-*"))


def test_vanished_input(built, tmp_path, capsys):
    recipe, src_out = built
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    es = Path(load_recipe(recipe).sources[1].path)
    saved, st = es.read_bytes(), es.stat()
    try:
        plan = make_plan(load_recipe(recipe, RECIPE_OVERRIDES))
        state = load_global(out, plan)
        es.unlink()
        # A rerun sees it before anything is written ...
        assert _prep(recipe, out) == 2
        assert f"error: source es: no .jsonl/.json files at {es}" in capsys.readouterr().err
        # ... and a map task that loses its input mid-run names its shard.
        spec = [s for s in plan if s.path == str(es)][0]
        with pytest.raises(PrepError, match=f"{es}: vanished since the shard plan was made \\(shard {spec.index}\\)"):
            run_shard(load_recipe(recipe, RECIPE_OVERRIDES), out, spec, state)
    finally:
        es.write_bytes(saved)
        os.utime(es, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_marker_disagreeing_with_its_files(built, tmp_path, capsys, damage):
    recipe, src_out = built
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    victim = out / "train" / "shard-00002_tokens.bin"
    data = bytearray(victim.read_bytes())
    if damage == "truncate":
        victim.write_bytes(bytes(data[:-10]))
        expect = f"{victim}: {len(data) - 10} bytes, its completion marker says {len(data)}"
    else:
        data[100] ^= 1
        victim.write_bytes(bytes(data))
        expect = f"{victim}: sha256 differs from its completion marker"
    assert _prep(recipe, out) == 2
    err = _error_line(capsys.readouterr().err)
    assert "shard 2 (" in err and expect in err
    assert not (out / "manifest.json").exists()  # it no longer looks complete
    with pytest.raises(DataError, match="manifest.json: missing"):
        open_split(out, "train")
    # --force rebuilds it.
    assert _prep(recipe, out, "--force") == 0
    assert victim.read_bytes() == (src_out / "train" / "shard-00002_tokens.bin").read_bytes()


def test_reader_names_a_vanished_shard_file(built, tmp_path):
    _, src_out = built
    out = tmp_path / "out"
    shutil.copytree(src_out, out)
    (out / "train" / "shard-00001_labels.bin").unlink()
    with pytest.raises(DataError, match="train/shard-00001_labels.bin: missing"):
        open_split(out, "train")


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["tmpfs", "file_size_limit"])
def test_disk_full(built, tmp_path, how):
    recipe, _ = built
    out = tmp_path / "full"
    mounted = how == "tmpfs" and _tmpfs(out, "160k")
    if how == "tmpfs" and not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit case covers the write path")
    limit = "" if mounted else textwrap.dedent("""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))
    """)
    code = limit + textwrap.dedent(f"""
        import sys
        from data_prep.cli import main
        sys.exit(main({["--recipe", str(recipe), "--out", str(out / "o"), "--no-progress",
                        "--workers", "1", *RECIPE_OVERRIDES]!r}))
    """)
    try:
        res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2, res.stderr[-2000:]
        err = _error_line(res.stderr)
        assert ("No space left on device" if mounted else "File too large") in err
        assert not (out / "o" / "manifest.json").exists()
        # Every shard marked complete really is complete; the one that failed left nothing.
        done = sorted((out / "o" / ".prep").glob("shard-*.done.json"))
        for marker in done:
            for name, rec in json.loads(marker.read_text())["files"].items():
                assert (out / "o" / name).stat().st_size == rec["bytes"]
        assert not list((out / "o").rglob("tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=True)

"""`sgtm verify-data DIR`: every byte against every recorded fact and sha256; one `error:`
line per kind of problem and exit 2, or a JSON summary and exit 0."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from megatron_sgtm import cli as sgtm_cli
from prep_corpus import prep_small


@pytest.fixture(scope="module")
def prepped(tmp_path_factory):
    return prep_small(tmp_path_factory.mktemp("verify"))


def _copy(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _verify(capsys, d, *flags):
    code = sgtm_cli.main(["verify-data", *flags, str(d)])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    return code, errors, out, err


def _shard(d, i=0):
    m = json.loads((d / "manifest.json").read_text())
    return m, m["splits"]["train"]["shards"][i]


def _set_token(d, i, value, where=None):
    """Write token ``value`` into shard ``i`` at a position whose id lies strictly inside the
    shard's range (so that only the value written can move the range)."""
    m, e = _shard(d, i)
    path = d / f"{e['prefix']}_tokens.bin"
    tokens = np.fromfile(path, dtype=m["token_dtype"])
    lo, hi = tokens.min(), tokens.max()
    pos = int(np.flatnonzero((tokens > lo) & (tokens < hi - 1))[0]) if where is None else where
    tokens[pos] = value(tokens[pos]) if callable(value) else value
    tokens.tofile(path)
    return m, e


def test_a_clean_directory_verifies_in_parallel(prepped, capsys):
    code, errors, out, _ = _verify(capsys, prepped, "--workers", "2")
    summary = json.loads(out)
    assert code == 0 and errors == [] and summary["verified"] is True
    m = json.loads((prepped / "manifest.json").read_text())
    assert summary["prefixes"] == len(m["splits"]["train"]["shards"]) + 2
    assert summary["tokens"] == sum(s["num_tokens"] for s in m["splits"].values())
    disk = sum(p.stat().st_size for p in prepped.rglob("*") if p.is_file() and ".prep" not in p.parts
               and p.name not in ("manifest.json", "tokenizer.model"))
    assert summary["bytes_read"] == disk  # every byte of every shard file, once
    # The flag may come after the directory (intermixed parsing, as every sgtm command).
    assert sgtm_cli.main(["verify-data", str(prepped), "--workers", "1"]) == 0


def test_a_flipped_byte_in_a_token_file_is_one_sha256_error(prepped, tmp_path, capsys):
    d = _copy(prepped, tmp_path)
    _, e = _set_token(d, 1, lambda t: t ^ 1)
    code, errors, out, _ = _verify(capsys, d, "--workers", "2")
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: sha256: ") and f"{e['prefix']}_tokens.bin" in errors[0]
    assert json.loads(out)["problems"] == {"sha256": 1}


def test_the_same_problem_in_several_shards_is_one_line(prepped, tmp_path, capsys):
    d = _copy(prepped, tmp_path)
    for i in range(4):
        _set_token(d, i, lambda t: t ^ 1)
    code, errors, out, _ = _verify(capsys, d)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: sha256: ")
    assert errors[0].endswith("(and 1 more)") and json.loads(out)["problems"] == {"sha256": 4}


def test_an_out_of_vocabulary_token(prepped, tmp_path, capsys):
    """Written into a shard after prep: the bytes, the vocabulary and the recorded range each
    disagree, one line each. Recorded so at prep (a manifest whose vocabulary is smaller than
    the ids): only the vocabulary line."""
    d = _copy(prepped, tmp_path)
    m, _ = _set_token(d, 2, lambda t: 600)
    code, errors, _, _ = _verify(capsys, d)
    assert code == 2 and [e.split(":")[1].strip() for e in errors] == ["sha256", "vocab", "facts"], errors
    assert "token id 600, vocabulary 600" in errors[1] and "token_max is 600, recorded" in errors[2]
    shutil.rmtree(d)
    d = _copy(prepped, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = m["splits"]["train"]["shards"][0]["facts"]["token_max"]
    (d / "manifest.json").write_text(json.dumps(m))
    code, errors, _, _ = _verify(capsys, d)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: vocab: "), errors


def test_labels_runs_sizes_and_missing_files(prepped, tmp_path, capsys):
    d = _copy(prepped, tmp_path)
    m, e0 = _shard(d, 0)
    lab = d / f"{e0['prefix']}_labels.bin"
    raw = bytearray(lab.read_bytes())
    raw[-1] = 7
    lab.write_bytes(bytes(raw))
    _, e1 = _shard(d, 1)
    (d / f"{e1['prefix']}_scores.npy").unlink()
    _, e2 = _shard(d, 2)
    with open(d / f"{e2['prefix']}_truth.npy", "ab") as f:
        f.write(b"\0")
    _, e3 = _shard(d, 3)
    tok = d / f"{e3['prefix']}_tokens.bin"
    tok.write_bytes(tok.read_bytes()[:-2])
    code, errors, out, _ = _verify(capsys, d)
    kinds = [e.split(":")[1].strip() for e in errors]
    assert code == 2 and kinds == ["missing", "size", "sha256", "structure", "labels", "facts"], errors
    assert "label 7" in errors[kinds.index("labels")]
    assert len(errors) == len(set(kinds))


def test_the_manifests_combined_checksum(prepped, tmp_path, capsys):
    d = _copy(prepped, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["tokens_sha256"]["train"] = "0" * 64
    m["label_sidecar_sha256"]["test_forget"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(m))
    code, errors, out, _ = _verify(capsys, d)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: checksum: ")
    assert "tokens_sha256.train" in errors[0] and "label_sidecar_sha256.test_forget" in errors[0]


def test_a_directory_without_facts_verifies_what_it_records(prepped, tmp_path, capsys):
    from test_data_facts import _strip_facts

    d = _copy(prepped, tmp_path)
    _strip_facts(d)
    code, errors, out, err = _verify(capsys, d)
    assert code == 0 and errors == [] and "record no facts" in err and "--relabel" in err
    assert json.loads(out)["unrecorded_prefixes"] == json.loads(out)["prefixes"]
    _set_token(d, 0, lambda t: t ^ 1)
    code, errors, _, _ = _verify(capsys, d)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: sha256: ")


def test_bad_arguments_are_one_error(tmp_path, capsys):
    assert sgtm_cli.main(["verify-data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "manifest.json: missing" in err[0]
    assert sgtm_cli.main(["verify-data", str(tmp_path), "--workers", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --workers must be >= 1, got 0"

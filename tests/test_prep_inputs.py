"""Local sources (jsonl, parquet, txt, HF datasets) and bad input: one clear PrepError each,
and nothing already written is damaged."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import yaml

from data_prep import PrepError
from data_prep.cli import main
from data_prep.corpus import load_corpus
from data_prep.pipeline import prepare
from data_prep.recipe import load_recipe, recipe_from_dict

WORDS = {
    "retain": "the river city market bridge king music painter novel harbor winter road village".split(),
    "forget": "cell protein virus gene enzyme blood tissue bacteria immune organ neuron species".split(),
}


def _docs(domain: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS[domain]) for _ in range(rng.randint(30, 60))) + "." for _ in range(n)]


def _write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs), encoding="utf-8")
    return path


def _recipe(tmp: Path, retain_src: dict, forget_src: dict, **extra) -> Path:
    data = {
        "name": "tiny",
        "sources": [{"name": "r", "domain": "retain", **retain_src}, {"name": "f", "domain": "forget", **forget_src}],
        "split": {"test_fraction": 0.1},
        "tokenizer": {"vocab_size": 320},
        "classifier": {"kind": "oracle"},
        "noise": {"undiscovered_rate": 0.25},
        **extra,
    }
    p = tmp / "recipe.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture()
def tiny(tmp_path):
    r = _write_jsonl(tmp_path / "r.jsonl", _docs("retain", 60, 1))
    f = _write_jsonl(tmp_path / "f.jsonl", _docs("forget", 40, 2))
    return _recipe(tmp_path, {"kind": "jsonl", "path": str(r)}, {"kind": "jsonl", "path": str(f)})


def test_local_formats_read_the_same(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs("retain", 20, 5)
    jl = _write_jsonl(tmp_path / "a.jsonl", docs, field="body")
    pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    fdocs = _docs("forget", 20, 6)
    fj = _write_jsonl(tmp_path / "f.jsonl", fdocs)
    forget = {"kind": "jsonl", "path": str(fj)}
    variants = {
        "jsonl": {"kind": "jsonl", "path": str(jl), "text_field": "body"},
        "parquet": {"kind": "parquet", "path": str(tmp_path / "a.parquet"), "text_field": "body"},
        "txt": {"kind": "txt", "path": str(tmp_path / "a.txt")},
        "hf_stream": {"kind": "hf", "dataset": "json", "data_files": [str(jl)], "text_field": "body",
                      "streaming": True},
    }
    for kind, src in variants.items():
        c = load_corpus(load_recipe(_recipe(tmp_path, src, forget)))
        assert c.texts == docs + fdocs, kind
        assert c.truth.tolist() == [0] * 20 + [1] * 20, kind
        assert c.input_sha256 and all(len(v) == 64 for v in c.input_sha256.values()), kind


def test_tiny_prep_end_to_end(tiny, tmp_path):
    m = prepare(load_recipe(tiny), tmp_path / "out", workers=1, progress=False, log=lambda s: None)
    assert m["realised"]["undiscovered_rate"] == pytest.approx(0.25, abs=0.02)
    assert not list((tmp_path / "out").rglob("tmp-*"))  # no scratch left behind


def test_recipe_errors_reported_together(tmp_path):
    bad = {"name": "x", "sources": [{"name": "a", "kind": "nosuch", "domain": "retain"}],
           "noise": {"undiscovered_rate": 1.5, "colour": "red"}, "tokenizer": {"vocab_size": "big"}}
    with pytest.raises(PrepError) as e:
        recipe_from_dict(bad)
    msg = str(e.value)
    assert "noise.colour: unknown key" in msg and "tokenizer.vocab_size: expected an integer" in msg
    # value checks run once the types are right
    bad["noise"].pop("colour")
    bad["tokenizer"]["vocab_size"] = 1000
    with pytest.raises(PrepError) as e:
        recipe_from_dict(bad)
    assert "unknown source 'nosuch'" in str(e.value) and "noise.undiscovered_rate: must be in [0, 1]" in str(e.value)


@pytest.mark.parametrize("case", ["missing_field", "empty", "non_utf8", "bad_json"])
def test_bad_documents(case, tmp_path):
    r = tmp_path / "r.jsonl"
    docs = _docs("retain", 10, 3)
    lines = [json.dumps({"text": d}).encode() for d in docs]
    expect = {"missing_field": "r.jsonl:4: missing field 'text'", "empty": "r.jsonl:4: empty document",
              "non_utf8": "r.jsonl:4: not valid UTF-8", "bad_json": "r.jsonl:4: not valid JSON"}[case]
    lines[3] = {"missing_field": json.dumps({"body": "x"}).encode(),
                "empty": json.dumps({"text": "   "}).encode(),
                "non_utf8": b'{"text": "caf\xe9"}',
                "bad_json": b'{"text": '}[case]
    r.write_bytes(b"\n".join(lines) + b"\n")
    f = _write_jsonl(tmp_path / "f.jsonl", _docs("forget", 10, 4))
    recipe = _recipe(tmp_path, {"kind": "jsonl", "path": str(r)}, {"kind": "jsonl", "path": str(f)})
    with pytest.raises(PrepError, match=expect.replace(".", r"\.")):
        load_corpus(load_recipe(recipe))


def test_skip_empty_documents(tmp_path):
    r = _write_jsonl(tmp_path / "r.jsonl", _docs("retain", 10, 3) + [""])
    f = _write_jsonl(tmp_path / "f.jsonl", _docs("forget", 10, 4))
    recipe = _recipe(tmp_path, {"kind": "jsonl", "path": str(r)}, {"kind": "jsonl", "path": str(f)},
                     skip_empty=True)
    c = load_corpus(load_recipe(recipe))
    assert len(c.texts) == 20 and c.skipped_empty == 1


def test_bible_without_pysword_is_a_clear_error(tmp_path):
    try:
        import pysword  # noqa: F401
        pytest.skip("pysword is installed here")
    except ImportError:
        pass
    f = _write_jsonl(tmp_path / "f.jsonl", _docs("forget", 10, 4))
    recipe = _recipe(tmp_path, {"kind": "bible", "module": "WEB"}, {"kind": "jsonl", "path": str(f)})
    with pytest.raises(PrepError, match="needs pysword"):
        load_corpus(load_recipe(recipe))


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["--recipe", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: recipe") and "no such file" in err
    assert main(["--relabel", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_different_corpus_refused_and_existing_untouched(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--recipe", str(tiny), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    before = _tree(out)
    # A different corpus (other vocab) is refused ...
    rc = main(["--recipe", str(tiny), "--out", str(out), "tokenizer.vocab_size=400", "--no-progress"])
    assert rc == 2 and "holds a different corpus" in capsys.readouterr().err
    # ... and so is bad input, before anything is written.
    (tmp_path / "r.jsonl").write_bytes(b'{"text": "\xff"}\n')
    assert main(["--recipe", str(tiny), "--out", str(out), "--force", "--no-progress"]) == 2
    assert "not valid UTF-8" in capsys.readouterr().err
    # ... and an impossible relabel policy.
    assert main(["--relabel", str(out), "--undiscovered-rate", "1.5"]) == 2
    assert "noise.undiscovered_rate: must be in [0, 1]" in capsys.readouterr().err
    assert _tree(out) == before
    # --force replaces it, with no stale files left behind
    _write_jsonl(tmp_path / "r.jsonl", _docs("retain", 60, 9))
    assert main(["--recipe", str(tiny), "--out", str(out), "tokenizer.vocab_size=400", "--force",
                 "--workers", "1", "--no-progress"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"]["tokenizer"]["vocab_size"] == 400
    assert sum(np.load(out / f"{s['prefix']}_truth.npy").size for s in m["splits"]["train"]["shards"]) \
        == m["splits"]["train"]["num_docs"]
    assert not list(out.glob("train_*")) and not list(out.rglob("tmp-*"))

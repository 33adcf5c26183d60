"""Bad classifier input: one clear `error:` line naming the recipe key and the file, exit status
2, and nothing written (the classifier is loaded and probed on real documents first)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep import PrepError
from data_prep.cli import main
from data_prep.recipe import load_recipe
from prep_classifiers import SPANISH_WORDS, fasttext_args, tiny_hf, train_fasttext
from prep_corpus import RECIPE_OVERRIDES, wiki_leads, write_corpus
from prep_entry_points import MARK

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ROOT / "tests/prep_entry_points.py"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def models(corpus):
    """A trained fastText model, a tiny HF classifier, and the same encoder without a head."""
    root, recipe = corpus
    texts = wiki_leads("en", 60) + wiki_leads("es", 40)
    return {"fasttext": train_fasttext(recipe, root / "fasttext.bin", RECIPE_OVERRIDES, epoch=2),
            "hf": tiny_hf(root / "hf", texts), "headless": tiny_hf(root / "headless", texts, head=False)}


def _error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0], err
    return errors[0]


def _bad_files(root: Path) -> dict[str, Path]:
    files = {"not_utf8": b"anthrax\n\xff\xfe\n", "bad_regex": b"fine\nre:(unclosed\n", "empty": b"# nothing\n\n",
             "bad_weight": b"term\tlots\n", "punctuation_only": b"+++\n", "garbage_model": b"not a model" * 10}
    out = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        out[name] = root / name
    (root / "a_directory").mkdir(exist_ok=True)
    out["a_directory"] = root / "a_directory"
    return out


CASES = {
    # name: (overrides, the message the error line must contain)
    "fasttext_missing_model": (lambda f, m: fasttext_args(f["a_directory"] / "missing.bin"),
                               "classifier.model: {a_directory}/missing.bin: no such file"),
    "fasttext_unknown_label": (lambda f, m: fasttext_args(m["fasttext"])[:2] + ["classifier.forget_label=__label__es"],
                               "classifier.forget_label: '__label__es' is not a label of {fasttext} (its labels: "),
    "fasttext_not_a_model": (lambda f, m: fasttext_args(f["garbage_model"]), "not a fastText model"),
    "hf_missing_directory": (lambda f, m: ["classifier.kind=hf", f"classifier.model={f['a_directory']}/nope",
                                           "classifier.forget_label=forget"], "no such directory"),
    "hf_without_head": (lambda f, m: ["classifier.kind=hf", f"classifier.model={m['headless']}",
                                      "classifier.forget_label=forget"],
                        "{headless}: has no trained classification head: classifier.bias, classifier.weight "
                        "missing from its weights (saved from BertModel"),
    "hf_unknown_label": (lambda f, m: ["classifier.kind=hf", f"classifier.model={m['hf']}",
                                       "classifier.forget_label=LABEL_1"],
                         "classifier.forget_label: 'LABEL_1' is not a label of {hf} (its id2label: retain, forget)"),
    "hf_not_a_model_directory": (lambda f, m: ["classifier.kind=hf", f"classifier.model={f['a_directory']}",
                                               "classifier.forget_label=forget"], "no config.json"),
    "keywords_missing": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['a_directory']}/x.txt"],
                         "classifier.keywords: {a_directory}/x.txt: no such file"),
    "keywords_a_directory": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['a_directory']}"],
                             "is a directory, not a keyword list"),
    "keywords_not_utf8": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['not_utf8']}"],
                          "{not_utf8}: not valid UTF-8 (invalid start byte at byte 8)"),
    "keywords_bad_regex": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['bad_regex']}"],
                           "{bad_regex}:2: not a valid regular expression"),
    "keywords_empty": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['empty']}"],
                       "no terms or patterns in it"),
    "keywords_bad_weight": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['bad_weight']}"],
                            "{bad_weight}:1: weight 'lots' after the TAB is not a number"),
    "keywords_no_word": (lambda f, m: ["classifier.kind=keywords", f"classifier.keywords={f['punctuation_only']}"],
                         "{punctuation_only}:1: the term '+++' has no letters or digits"),
    "python_wrong_shape": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:wrong_shape"],
                           "classifier.entry_point prep_entry_points:wrong_shape: returned shape (32, 2) for a batch "
                           "of 32 texts; the contract is one score per text, shape (32,)"),
    "python_one_short": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:one_short"],
                         "returned shape (31,) for a batch of 32 texts"),
    "python_nan": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:nan"],
                   "prep_entry_points:nan: returned nan for text 31 of a batch of 32 (1 non-finite in all)"),
    "python_above_one": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:out_of_range"],
                         "returned 1.5 for text 0 of a batch of 32 (32 outside [0, 1] in all)"),
    "python_negative": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:negative"],
                        "returned -0.25 for text 0"),
    "python_strings": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:strings"],
                       "returned list, not a sequence of numbers"),
    "python_raises": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:raises"],
                      "prep_entry_points:raises: raised RuntimeError: model server unreachable"),
    "python_no_module": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=no_such_module_here:f"],
                         "no module named no_such_module_here (is its directory on PYTHONPATH?)"),
    "python_no_function": (lambda f, m: ["classifier.kind=python", "classifier.entry_point=prep_entry_points:absent"],
                           "prep_entry_points has no attribute absent"),
    "python_not_callable": (lambda f, m: ["classifier.kind=python",
                                          "classifier.entry_point=prep_entry_points:NOT_CALLABLE"], "not a function"),
    "cascade_stage_missing_model": (
        lambda f, m: ["classifier.kind=cascade", f"classifier.stages=[{{kind: keywords, keywords: {SPANISH_WORDS}}}, "
                      f"{{kind: fasttext, model: {f['a_directory']}/gone.bin, forget_label: __label__forget}}]"],
        "classifier.stages[1].model: {a_directory}/gone.bin: no such file"),
    "cascade_stage_bad_output": (
        lambda f, m: ["classifier.kind=cascade", f"classifier.stages=[{{kind: keywords, keywords: {SPANISH_WORDS}}}, "
                      "{kind: python, entry_point: 'prep_entry_points:out_of_range'}]"],
        "classifier.stages[1].entry_point prep_entry_points:out_of_range: returned 1.5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_classifier_input_writes_nothing(case, corpus, models, tmp_path, capsys):
    root, recipe = corpus
    files = _bad_files(root)
    make_args, message = CASES[case]
    out = tmp_path / "out"
    rc = main(["--recipe", str(recipe), "--out", str(out), "--no-progress", *RECIPE_OVERRIDES,
               *make_args(files, models)])
    assert rc == 2
    err = _error(capsys)
    assert message.format(**{k: str(v) for k, v in {**files, **models}.items()}) in err, err
    assert not out.exists()  # checked before the output directory is touched


def test_the_cli_exits_2_with_one_error_line(corpus, tmp_path):
    """The real command in its own process, with an entry point given as a file path."""
    _, recipe = corpus
    res = subprocess.run([sys.executable, "-m", "data_prep", "--recipe", str(recipe), "--out", str(tmp_path / "out"),
                          "--no-progress", *RECIPE_OVERRIDES, "classifier.kind=python",
                          f"classifier.entry_point={ENTRY_POINTS}:nan"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.splitlines()[-1].startswith(f"error: classifier.entry_point {ENTRY_POINTS}:nan: returned nan")
    assert not (tmp_path / "out").exists()


def test_a_violation_deep_in_the_corpus_names_its_shard(tmp_path, capsys):
    """Past the probe, a bad score stops the shard that met it; it is not marked complete and
    no manifest appears."""
    recipe = write_corpus(tmp_path)
    es = Path(load_recipe(recipe).sources[1].path)
    lines = es.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[150] = lines[150].replace('{"text": "', f'{{"text": "{MARK} ', 1)
    es.write_text("".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--recipe", str(recipe), "--out", str(out), "--no-progress", "--workers", "1", *RECIPE_OVERRIDES,
                 "classifier.kind=python", "classifier.entry_point=prep_entry_points:nan_on_marked"]) == 2
    err = _error(capsys)
    assert err.startswith("error: shard ") and f"({es} bytes " in err and "returned nan for text " in err
    assert not (out / "manifest.json").exists() and not list(out.rglob("tmp-*"))
    start = sum(len(x.encode("utf-8")) for x in lines[:150])
    plan = json.loads((out / ".prep" / "plan.json").read_text())["shards"]
    bad = [s["index"] for s in plan if s["path"] == str(es) and s["start"] <= start < s["stop"]]
    assert f"error: shard {bad[0]} (" in err
    assert not (out / ".prep" / f"shard-{bad[0]:05d}.done.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["classifier.kind=fasttext"], "classifier.model: required for kind fasttext"),
    (["classifier.kind=hf", "classifier.model=m", "classifier.forget_label=x", "classifier.device=tpu"],
     "classifier.device: must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (["classifier.kind=hf", "classifier.model=m", "classifier.forget_label=x", "classifier.window_aggregation=sum"],
     "classifier.window_aggregation: must be max or mean"),
    (["classifier.kind=keywords", "classifier.keywords=k", "classifier.min_hits=0"], "classifier.min_hits: must be > 0"),
    (["classifier.kind=keywords", "classifier.keywords=k", "classifier.model=m"],
     "classifier.model: only for kind fasttext or hf (this classifier is keywords)"),
    (["classifier.kind=python", "classifier.entry_point=module_only"], "expected module:function"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: keywords, keywords: k}]"], "at least two stages"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: topic}, {kind: keywords, keywords: k}]"],
     "classifier.stages[0].kind: must be one of language, fasttext, hf, keywords, python, got 'topic'"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: keywords, keywords: k, threshold: 0.6}, "
      "{kind: keywords, keywords: k}]"], "classifier.stages[0].threshold: 0.6 is above the cascade's threshold 0.5"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: keywords, keywords: k, decides: forget, threshold: 0.4}, "
      "{kind: keywords, keywords: k}]"], "classifier.stages[0].threshold: 0.4 is below the cascade's threshold 0.5"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: keywords, keywords: k}, "
      "{kind: keywords, keywords: k, decides: retain}]"], "classifier.stages[1].decides: the last stage decides every"),
    (["classifier.kind=cascade", "classifier.threshold=0.3", "classifier.stages=[{kind: keywords, keywords: k, "
      "threshold: 0.3}, {kind: keywords, keywords: k}]"],
     "classifier.stages[1].threshold: the last stage's texts are labelled at the cascade's threshold 0.3"),
    (["classifier.kind=cascade", "classifier.stages=[{kind: keywords, keywords: k, granularity: paragraph}, "
      "{kind: keywords, keywords: k}]"], "set granularity on the cascade, not on its stages"),
    (["classifier.decides=retain"], "classifier.decides: only for the stages of a cascade"),
    (["classifier.stages=[{kind: keywords, keywords: k}]"], "classifier.stages: only for kind cascade"),
])
def test_recipe_checks_of_the_new_keys(overrides, message):
    with pytest.raises(PrepError) as e:
        load_recipe(ROOT / "configs/data/bilingual.yaml", overrides)
    assert message in str(e.value)

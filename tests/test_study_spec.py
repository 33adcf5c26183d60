"""Study specs without training: named method entries, architecture keys, path resolution,
and every bad input reported as one clear error naming its key."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_sgtm.configbase import ConfigError
from megatron_sgtm.study import data as sdata
from megatron_sgtm.study.analysis import analyze
from megatron_sgtm.study.cli import main
from megatron_sgtm.study.engine import core_config
from megatron_sgtm.study.plots import series_colors
from megatron_sgtm.study.runner import Context
from megatron_sgtm.study.spec import entry_of, expand, load_spec, method_entries

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs/studies/micro.yaml"
RECIPE = ROOT / "configs/data/bilingual.yaml"
SIZE = "sizes: [{name: s8, num_layers: 2, hidden_size: 32, num_attention_heads: 4, " \
       "ffn_hidden_size: 64, forget_heads: 1, forget_mlp_units: 8}]\n"
NAMED = ("methods:\n"
         "  no_filter: {}\n"
         "  sgtm: {}\n"
         "  sgtm_me: {method: sgtm, mask_embeddings: true}\n"
         "  jp: {method: sgtm, variant: joint_projection, forget_heads: 2, layers: [1]}\n"
         "  gr: {method: gradient_routing, retain_mode_share: 0.25}\n"
         "  wf: {method: weak_filter}\n")


def _spec(tmp_path: Path, text: str, overrides=None):
    path = tmp_path / "spec.yaml"
    path.write_text(f"recipe: {RECIPE}\n" + text)
    return load_spec(path, overrides)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        _spec(tmp_path, text)
    return err.value.problems


def test_list_form_expands_exactly_as_before():
    spec = load_spec(MICRO)
    runs = expand(spec, vocab=800)
    assert [r.run_id for r in runs] == [
        "s16-16384-no_filter-una-s0", "s16-16384-sgtm-u0.1-s0",
        "s32-16384-no_filter-una-s0", "s32-16384-sgtm-u0.1-s0",
        "leak-s16-16384-f0-s0", "leak-s16-16384-f0.5-s0", "leak-s16-16384-f1-s0"]
    assert [r.base_method for r in runs] == [r.method for r in runs]
    assert spec.methods == ["no_filter", "sgtm"]
    # Default settings: the routing of the base method, the size's forget units.
    size = spec.sizes[0]
    core = core_config(size, 800, 32, entry_of(spec, runs[1]))
    assert (core.routing.method, core.routing.variant, core.routing.mask_embeddings) == (
        "sgtm", "default", False)
    assert (core.partition.forget_heads, core.partition.forget_mlp_units, core.partition.layers) == (
        1, 8, None)
    assert core_config(size, 800, 32, entry_of(spec, runs[0])).routing.method == "none"


def test_named_entries_expand_with_their_names_and_base_methods(tmp_path):
    spec = _spec(tmp_path, SIZE + "undiscovered_rates: [0.1]\n" + NAMED)
    runs = expand(spec, vocab=100)
    assert [(r.run_id, r.base_method) for r in runs] == [
        ("s8-200k-no_filter-una-s0", "no_filter"), ("s8-200k-sgtm-u0.1-s0", "sgtm"),
        ("s8-200k-sgtm_me-u0.1-s0", "sgtm"), ("s8-200k-jp-u0.1-s0", "sgtm"),
        ("s8-200k-gr-u0.1-s0", "gradient_routing"), ("s8-200k-wf-u0.1-s0", "weak_filter")]
    by_name = {r.method: r for r in runs}
    size = spec.sizes[0]
    me = core_config(size, 100, 16, entry_of(spec, by_name["sgtm_me"]))
    assert me.routing.mask_embeddings and me.routing.method == "sgtm"
    jp = core_config(size, 100, 16, entry_of(spec, by_name["jp"]))
    assert (jp.routing.variant, jp.partition.forget_heads, jp.partition.layers) == (
        "joint_projection", 2, [1])
    assert jp.partition.forget_mlp_units == 8  # not overridden: the size's
    assert not jp.problems() and not me.problems()
    assert core_config(size, 100, 16, entry_of(spec, by_name["wf"])).routing.method == "none"
    # Overrides reach into an entry; the list form still replaces the mapping.
    spec2 = _spec(tmp_path, SIZE + NAMED, ["methods.sgtm_me.mask_embeddings=false"])
    assert not method_entries(spec2)["sgtm_me"].mask_embeddings
    assert list(method_entries(_spec(tmp_path, NAMED, ["methods=[sgtm]"]))) == ["sgtm"]


def test_relabelled_shards_are_cached_per_rate_and_share(tmp_path):
    spec = _spec(tmp_path, SIZE + "undiscovered_rates: [0.1]\n" + NAMED)
    ctx = Context(out=tmp_path, base_shards=tmp_path / "shards", vocab=100, eod_id=1)
    runs = {r.method: r for r in expand(spec, 100)}
    assert ctx.shards_for(runs["no_filter"], entry_of(spec, runs["no_filter"])) == tmp_path / "shards"
    assert ctx.shards_for(runs["sgtm"], entry_of(spec, runs["sgtm"])) == tmp_path / "shards-u0.1"
    assert ctx.shards_for(runs["gr"], entry_of(spec, runs["gr"])) == tmp_path / "shards-u0.1-m0.25"
    assert sdata.rate_dir(tmp_path / "shards", 0.1) == tmp_path / "shards-u0.1"


@pytest.mark.parametrize("text, key", [
    ("methods:\n  sgtm: {mask_embedings: true}\n", "methods.sgtm.mask_embedings: unknown key"),
    ("methods:\n  weak_filter: {variant: joint_projection}\n", "methods.weak_filter.variant"),
    ("methods:\n  wf: {method: weak_filter, mask_embeddings: true}\n", "methods.wf.mask_embeddings"),
    ("methods:\n  no_filter: {mask_embeddings: true}\n", "methods.no_filter.mask_embeddings"),
    ("methods:\n  no_filter: {retain_mode_share: 0.5}\n", "methods.no_filter.retain_mode_share"),
    ("methods:\n  gr: {method: gradient_routing, variant: joint_attention}\n", "methods.gr.variant"),
    ("methods:\n  wf: {method: weak_filter, forget_heads: 1}\n", "methods.wf.forget_heads"),
    ("methods:\n  sgtm: {retain_mode_share: 1.5}\n", "methods.sgtm.retain_mode_share"),
    ("methods:\n  magic: {}\n", "methods.magic.method: required"),
    ("methods:\n  x: {method: magic}\n", "methods.x.method: 'magic'"),
    ("methods: [sgtm, magic]\n", "methods[1]: 'magic'"),
    ("methods: [sgtm, sgtm]\n", "methods: duplicate"),
    ("methods:\n  no_filter: {method: sgtm}\n", "methods.no_filter.method"),
    ("attack: {methods: [sgtm_me]}\n", "attack.methods: 'sgtm_me'"),
])
def test_bad_method_entries_are_one_error_naming_the_key(tmp_path, text, key):
    (problem,) = _problems(tmp_path, text)
    assert problem.startswith(key), problem


@pytest.mark.parametrize("size, methods, words", [
    ("forget_heads: 4", "", ["s8", "forget_heads 4", "4 heads"]),
    ("forget_mlp_units: 64", "", ["s8", "forget_mlp_units 64", "ffn_hidden_size 64"]),
    ("", "methods:\n  big: {method: sgtm, forget_heads: 4}\n", ["methods.big", "s8"]),
    ("", "methods:\n  big: {method: sgtm, forget_mlp_units: 100}\n", ["methods.big", "s8"]),
    ("", "methods:\n  deep: {method: sgtm, layers: [0, 5]}\n", ["methods.deep", "[5]", "s8"]),
    # Under GQA forget_heads counts query groups: 2 of 2 groups leaves none.
    ("num_query_groups: 2, forget_heads: 2", "", ["s8", "forget_heads 2", "2 query groups"]),
    ("num_query_groups: 3", "", ["s8", "num_query_groups 3"]),
    ("activation: relu", "", ["sizes[0].activation", "relu"]),
])
def test_forget_units_must_fit_the_size(tmp_path, size, methods, words):
    base = "{name: s8, num_layers: 2, hidden_size: 32, num_attention_heads: 4, ffn_hidden_size: 64"
    text = f"sizes: [{base}{', ' + size if size else ''}}}]\n" + methods
    (problem,) = _problems(tmp_path, text)
    assert all(w in problem for w in words), problem


TWO_SIZES = ("sizes:\n"
             "  - {name: a, num_layers: 1, hidden_size: 16, num_attention_heads: 2, "
             "ffn_hidden_size: 32, forget_mlp_units: 8, tokens: [1000, 4000]}\n"
             "  - {name: b, num_layers: 1, hidden_size: 32, num_attention_heads: 2, "
             "ffn_hidden_size: 64, forget_mlp_units: 8, tokens: [2000, 8000]}\n"
             "methods: [no_filter]\n")


def test_leakage_series_at_each_size_and_chosen_budget(tmp_path):
    spec = _spec(tmp_path, TWO_SIZES + "leakage: {forget_shares: [0, 1], sizes: [a, b], "
                                       "budget_index: -1}\n")
    leak = [r.run_id for r in expand(spec, 100) if r.kind == "leakage"]
    assert leak == ["leak-a-4k-f0-s0", "leak-a-4k-f1-s0", "leak-b-8k-f0-s0", "leak-b-8k-f1-s0"]
    # The single-size form is unchanged: the first size, its first budget.
    spec = _spec(tmp_path, TWO_SIZES + "leakage: {forget_shares: [0.5]}\n")
    assert [r.run_id for r in expand(spec, 100) if r.kind == "leakage"] == ["leak-a-1k-f0.5-s0"]


@pytest.mark.parametrize("leakage, key", [
    ("{forget_shares: [0], sizes: [a, c]}", "leakage.sizes: 'c'"),
    ("{forget_shares: [0], size: a, sizes: [b]}", "leakage.size and leakage.sizes"),
    ("{forget_shares: [0], sizes: [b], budget_index: 2}", "leakage.budget_index 2"),
])
def test_bad_leakage_series_is_one_error_naming_the_key(tmp_path, leakage, key):
    (problem,) = _problems(tmp_path, TWO_SIZES + f"leakage: {leakage}\n")
    assert problem.startswith(key), problem


def test_gqa_counts_groups_and_architecture_reaches_the_model_config(tmp_path):
    spec = _spec(tmp_path, "sizes: [{name: g, num_layers: 2, hidden_size: 32, num_attention_heads: 4,"
                           " num_query_groups: 2, forget_heads: 1, ffn_hidden_size: 64,"
                           " forget_mlp_units: 8, activation: swiglu, position_embedding: rope,"
                           " normalization: RMSNorm, tie_embeddings: false}]\nmethods: [sgtm]\n")
    (run,) = expand(spec, 100)
    core = core_config(spec.sizes[0], 100, 16, entry_of(spec, run))
    m = core.model
    assert (m.num_query_groups, m.activation, m.position_embedding, m.normalization,
            m.tie_embeddings) == (2, "swiglu", "rope", "RMSNorm", False)
    assert not core.problems()


def test_paths_resolve_against_the_spec_folder_then_the_project_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_spec(MICRO).recipe == str(RECIPE)  # configs/data/... from the project root
    spec_dir = tmp_path / "specs"
    spec_dir.mkdir()
    (spec_dir / "local.yaml").write_text(RECIPE.read_text())
    (spec_dir / "a.yaml").write_text("recipe: local.yaml\n")
    assert load_spec(spec_dir / "a.yaml").recipe == str(spec_dir / "local.yaml")
    # The spec's folder wins over the project root.
    (spec_dir / "configs/data").mkdir(parents=True)
    (spec_dir / "configs/data/bilingual.yaml").write_text(RECIPE.read_text())
    (spec_dir / "b.yaml").write_text("recipe: configs/data/bilingual.yaml\n")
    assert load_spec(spec_dir / "b.yaml").recipe == str(spec_dir / "configs/data/bilingual.yaml")
    # Absolute paths stay; a relative one found nowhere is one error naming both places.
    assert load_spec(spec_dir / "b.yaml", [f"recipe={RECIPE}"]).recipe == str(RECIPE)
    (tmp_path / "here.yaml").write_text("x: 1\n")  # in the cwd only: not looked at
    (spec_dir / "c.yaml").write_text("recipe: here.yaml\n")
    with pytest.raises(ConfigError) as err:
        load_spec(spec_dir / "c.yaml")
    (problem,) = err.value.problems
    assert problem.startswith("recipe: here.yaml not found")
    assert str(spec_dir / "here.yaml") in problem and str(ROOT / "here.yaml") in problem


def test_cli_bad_spec_exits_2_with_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"recipe: {RECIPE}\nmethods:\n  sgtm: {{mask_embedings: true}}\n")
    assert main([str(bad), "--list", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: invalid config (1 problem(s)):"]
    assert "methods.sgtm.mask_embedings" in err
    assert not (tmp_path / "o").exists()


def test_analysis_and_plots_use_base_methods_for_behaviour_and_names_for_labels():
    def row(method, base, rate, flops, forget, **kw):
        return {"status": "done", "kind": "main", "size": "a", "tokens": 1, "seed": 0,
                "run_id": f"a-1-{method}-u{rate}-s0", "method": method, "base_method": base,
                "rate": rate, "flops": flops, "retain_loss": 9 * flops ** -0.05,
                "forget_loss": forget, "forget_loss_raw": forget, **kw}

    rows = [row("nf", "no_filter", None, 1e9, 5.0), row("nf", "no_filter", None, 1e10, 4.0),
            row("sgtm_me", "sgtm", 0.1, 1e10, 6.0, undiscovered_tokens_seen=10),
            row("wf", "weak_filter", 0.1, 1e10, 5.5)]
    rows[1]["run_id"] += "b"
    res = analyze(rows, {rows[2]["run_id"]: [{"step": 1, "forget_loss": 5.0, "forget_tokens": 4}]})
    assert len(res["fits"]["retain"]["points"]) == 2  # the no_filter-based entry "nf"
    assert set(res["penalty_summary"]) == {"nf@-", "sgtm_me@0.1", "wf@0.1"}
    (leak,) = res["leakage"]  # only the routing-based entry is a leakage candidate
    assert leak["method"] == "sgtm_me" and "no leakage baseline" in leak["error"]
    (attack,) = res["attack"]
    assert attack["method"] == "sgtm_me" and attack["target_forget_loss"] == 4.0
    colors = series_colors(rows)
    assert set(colors) == {"nf", "sgtm_me", "wf"} and len(set(colors.values())) == 3
    # A base-method name keeps its colour next to an entry of the same base.
    both = series_colors([{"method": "sgtm"}, {"method": "sgtm_me", "base_method": "sgtm"}])
    assert both["sgtm"] == "tab:red" and both["sgtm_me"] != "tab:red"

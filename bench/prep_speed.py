"""Raw-text throughput of `sgtm prep`, end to end: read, classify, tokenize, write.

A warm-up run pays the one-off costs first: importing megatron-core, training the
tokenizer (bounded by tokenizer.max_train_bytes) and loading the classifier (cached per
process). The timed run then gets the trained tokenizer and measures the per-corpus work
that scales with data size. Both times are printed, with the machine.

``--classifier KIND`` (repeatable, or ``all``) runs the recipe with that classifier kind
instead of its own, and prints one row per kind: documents and MB per second of the whole
prep, per CPU-second (the per-core rate: every process's CPU time counted), and of the
classifier alone, also per CPU-second (this process scoring every document in chunks of
``sharding.chunk_docs``). CPU time, unlike wall time, hardly depends on what else runs.
The classifiers are built first, outside the timing: fasttext is trained on the recipe's
documents (its held-out split left out), hf is a tiny random two-layer BERT
(``data_prep.classifiers.examples``: it measures the batching path, not a production model;
pass ``--hf-model DIR`` for yours), keywords is configs/data/keywords/spanish_function_words.txt,
python is ``data_prep.classifiers.examples:spanish_function_words``, and cascade is that
keyword list then the fastText model.

    python bench/prep_speed.py [--recipe configs/data/bilingual.yaml] [--workers N] [key=value ...]
    python bench/prep_speed.py --classifier all [--workers N] [max_docs=2000 ...]
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = ("language", "oracle", "fasttext", "hf", "keywords", "python", "cascade")
KEYWORDS = ROOT / "configs/data/keywords/spanish_function_words.txt"


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # workers count once reaped
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    from megatron_sgtm.machine import cpu_model

    return f"{platform.node()}: {cpu_model()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def classifier_overrides(kind: str, recipe, tmp: Path, hf_model: str | None, built: dict) -> list[str]:
    """The recipe overrides that select ``kind``, building its classifier (once) in ``tmp``."""
    def fasttext_model() -> str:
        if "fasttext" not in built:
            from data_prep.classifiers.train_fasttext import train

            t0 = time.perf_counter()
            built["fasttext"] = str(train(recipe, tmp / "fasttext.bin")["model"])
            print(f"built: fastText model in {time.perf_counter() - t0:.1f} s (not timed below)")
        return built["fasttext"]

    if kind in ("language", "oracle"):
        return [f"classifier.kind={kind}"]
    if kind == "fasttext":
        return ["classifier.kind=fasttext", f"classifier.model={fasttext_model()}",
                "classifier.forget_label=__label__forget"]
    if kind == "hf":
        if not hf_model:
            from data_prep.classifiers.examples import tiny_hf_classifier
            from data_prep.corpus import load_corpus

            hf_model = str(tiny_hf_classifier(tmp / "hf", load_corpus(recipe).texts[:2000]))
        return ["classifier.kind=hf", f"classifier.model={hf_model}", "classifier.forget_label=forget"]
    if kind == "keywords":
        return ["classifier.kind=keywords", f"classifier.keywords={KEYWORDS}", "classifier.min_hits=5"]
    if kind == "python":
        return ["classifier.kind=python", "classifier.entry_point=data_prep.classifiers.examples:spanish_function_words"]
    return ["classifier.kind=cascade",
            f"classifier.stages=[{{kind: keywords, keywords: {KEYWORDS}, min_hits: 5}}, "
            f"{{kind: fasttext, model: {fasttext_model()}, forget_label: __label__forget}}]"]


def _own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return own.ru_utime + own.ru_stime


def classify_only(recipe, texts: list[str]) -> float:
    """CPU-seconds for this process to score every text (chunks of sharding.chunk_docs)."""
    from data_prep.classifiers import make_scorer

    scorer = make_scorer(recipe.classifier, Path())
    if scorer is None:
        return float("nan")
    scorer.trace(texts[:8])  # loaded and warm
    step = recipe.sharding.chunk_docs
    cpu0 = _own_cpu_seconds()
    for i in range(0, len(texts), step):
        scorer.trace(texts[i:i + step])
    return _own_cpu_seconds() - cpu0


def run(recipe_path: str, overrides: list[str], workers: int, tmp: Path, name: str) -> dict:
    from data_prep.corpus import load_corpus
    from data_prep.pipeline import prepare
    from data_prep.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    t0 = time.perf_counter()
    prepare(recipe, tmp / f"{name}-warm", workers=workers, progress=False, log=lambda m: None)
    warm = time.perf_counter() - t0
    tok = str(tmp / f"{name}-warm" / "tokenizer.model")
    recipe = load_recipe(recipe_path, overrides + [f"tokenizer.model={tok}"])
    texts = load_corpus(recipe).texts
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    prepare(recipe, tmp / f"{name}-timed", workers=workers, progress=False, log=lambda m: None)
    dt = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    return {"recipe": recipe, "docs": len(texts), "mb": mb, "seconds": dt, "cpu": cpu, "warm": warm,
            "classify": classify_only(recipe, texts)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default=str(ROOT / "configs/data/bilingual.yaml"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--classifier", action="append", choices=KINDS + ("all",),
                    help="time the recipe with this classifier kind (repeatable; all = every kind)")
    ap.add_argument("--hf-model", help="a Hugging Face classifier directory for the hf row (its "
                                       "forget label must be 'forget'); default: a tiny random one")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()

    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost is not prep work)

    from data_prep.recipe import load_recipe

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not a.classifier:
            r = run(a.recipe, a.overrides, a.workers, tmp, "recipe")
            mb, dt, cpu = r["mb"], r["seconds"], r["cpu"]
            print(f"recipe: {Path(a.recipe).name} ({r['recipe'].classifier.kind} classifier), workers {a.workers}")
            print(f"prep: {mb:.2f} MB raw text in {dt:.2f} s = {mb / dt:.2f} MB/s end to end "
                  "(read + classify + tokenize + write)")
            print(f"warm-up run (tokenizer training + one-off loads): {r['warm']:.2f} s")
            # Wall-clock MB/s depends on what else the machine runs; CPU time does not.
            print(f"cpu: {cpu:.2f} CPU-seconds (main + workers) = {mb / cpu:.2f} MB per CPU-second; "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            return 0
        kinds = KINDS if "all" in a.classifier else tuple(dict.fromkeys(a.classifier))
        base = load_recipe(a.recipe, a.overrides)
        built: dict = {}
        rows = []
        for kind in kinds:
            over = a.overrides + classifier_overrides(kind, base, tmp, a.hf_model, built)
            r = run(a.recipe, over, a.workers, tmp, kind)
            rows.append((kind, r))
        print(f"recipe: {Path(a.recipe).name}, {rows[0][1]['docs']} documents, {rows[0][1]['mb']:.2f} MB; "
              f"workers {a.workers}")
        print("| kind | prep docs/s per core | prep MB/s per core | prep wall s | classifier alone docs/s per core | "
              "classifier alone MB/s per core |")
        print("|---|---|---|---|---|---|")
        for kind, r in rows:
            c = r["classify"]
            alone = ("n/a (scores from truth)", "n/a") if c != c else (f"{r['docs'] / c:,.0f}", f"{r['mb'] / c:.2f}")
            print(f"| {kind} | {r['docs'] / r['cpu']:,.0f} | {r['mb'] / r['cpu']:.2f} | {r['seconds']:.2f} | "
                  f"{alone[0]} | {alone[1]} |")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
              "(per core = per CPU-second of every process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train a fastText forget classifier on a recipe's own labelled documents.

    python -m data_prep.classifiers.train_fasttext --recipe R.yaml --out MODEL.bin [key=value ...]
        [--epoch 10] [--dim 32] [--word-ngrams 2] [--bucket 200000] [--lr 0.5]

It reads what ``sgtm prep`` would read for its global stage (the bounded sample, with the
recipe's ``max_docs`` caps), leaves out exactly the documents prep will hold out for its
test splits, and trains on the rest: ``__label__forget`` for forget truth, ``__label__retain``
for everything else (a document with per-paragraph truth gives one line per paragraph). So
``classifier.heldout`` in the manifest of a prep that uses the model measures it on documents
it never saw. The model is written atomically; the labels are printed as JSON.
Use it as ``classifier.kind=fasttext classifier.model=MODEL.bin classifier.forget_label=__label__forget``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from data_prep.classifiers.fasttext_model import import_fasttext
from data_prep.documents import FORGET
from data_prep.errors import PrepError

FORGET_LABEL, RETAIN_LABEL = "__label__forget", "__label__retain"
# fasttext-numpy2-wheel 0.9.2 initialises the input matrix in blocks of a tenth of it, one per
# training thread: blocks no thread covers (with ten threads, the few values after the tenth
# block) keep whatever the memory held, and training stops now and then with "Encountered
# NaN". Measured on the test corpora: 0 of 4 trainings finished at thread=1, 6 of 10 at
# thread=10, 10 of 10 at 11 and at 16. Sixteen threads cover every block on any core count.
TRAIN_THREADS = 16


def training_lines(recipe) -> tuple[list[str], dict]:
    """One ``__label__X text`` line per train document (or paragraph) of the recipe's sample."""
    from data_prep.plan import make_plan
    from data_prep.sample import read_sample

    _, sample, heldout = read_sample(recipe, make_plan(recipe))
    held = {int(i) for idx in heldout.values() for i in idx}
    lines, counts = [], {FORGET_LABEL: 0, RETAIN_LABEL: 0}
    for i, doc in enumerate(sample.docs):
        if i in held:
            continue
        units = zip(doc.paragraphs, doc.paragraph_truth) if doc.paragraph_truth else [(doc.text, doc.truth)]
        for text, truth in units:
            label = FORGET_LABEL if truth == FORGET else RETAIN_LABEL
            flat = " ".join(text.split())
            if flat:
                lines.append(f"{label} {flat}")
                counts[label] += 1
    if not counts[FORGET_LABEL] or not counts[RETAIN_LABEL]:
        raise PrepError(f"training needs forget and retain documents; the recipe's sample gives {counts}")
    return lines, {"heldout_docs_left_out": len(held), "lines": counts}


def train(recipe, out: Path, epoch: int = 10, dim: int = 32, word_ngrams: int = 2, bucket: int = 200_000,
          lr: float = 0.5, seed: int = 0) -> dict:
    fasttext = import_fasttext("train_fasttext")
    lines, info = training_lines(recipe)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        data = Path(tmp) / "train.txt"
        data.write_text("\n".join(lines) + "\n", encoding="utf-8")
        model = fasttext.train_supervised(str(data), epoch=epoch, dim=dim, wordNgrams=word_ngrams, bucket=bucket,
                                          lr=lr, seed=seed, thread=TRAIN_THREADS, verbose=0, minCount=1)
        staged = Path(tmp) / out.name
        model.save_model(str(staged))
        os.replace(staged, out)
    return {**info, "model": str(out), "labels": list(model.get_labels()), "bytes": out.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data_prep.classifiers.train_fasttext", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides, as for sgtm prep")
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--out", required=True, help="the model file to write (.bin)")
    ap.add_argument("--epoch", type=int, default=10)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--word-ngrams", type=int, default=2)
    ap.add_argument("--bucket", type=int, default=200_000)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_intermixed_args(argv)
    from data_prep.recipe import load_recipe

    try:
        recipe = load_recipe(a.recipe, a.overrides)
        info = train(recipe, Path(a.out), a.epoch, a.dim, a.word_ngrams, a.bucket, a.lr, a.seed)
    except PrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The reduce: check every shard against its marker, apply the noise policy, write labels
and the manifest. ``--relabel`` is the same step with a new policy.

The noise policy needs corpus-wide rates, so it reads every shard's per-unit sidecars
(truth, score, length and seed flag: about 20 bytes per unit, where a unit is a document,
or a paragraph span at paragraph granularity), never the tokens. It then writes each shard's
per-token label file and, last, the manifest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from data_prep import classifiers, shards
from data_prep.documents import DOMAIN_NAMES, FORGET
from data_prep.errors import PrepError
from data_prep.manifest import FORMAT_VERSION, dumps
from data_prep.noise import LABEL_NAMES, apply_policy
from data_prep.plan import ShardSpec, source_version
from data_prep.recipe import Recipe
from data_prep.sample import GLOBAL_MARKER
from megatron_sgtm.data import facts
from megatron_sgtm.version import version_string


def read_marker(out: Path, spec: ShardSpec, recipe: Recipe) -> Optional[dict]:
    path = shards.marker_path(out, spec.index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrepError(f"{spec.describe(recipe)}: completion marker {path} unreadable ({e})") from None


def check_marker(out: Path, spec: ShardSpec, recipe: Recipe, marker: dict, full: bool) -> None:
    """The shard's files are the ones its marker describes: sizes always, sha256 if ``full``.
    On a mismatch the manifest is removed first: the directory must stop looking complete."""
    try:
        _check_files(out, spec, recipe, marker, full)
    except PrepError:
        shards.remove_manifest(out)
        raise


def _check_files(out: Path, spec: ShardSpec, recipe: Recipe, marker: dict, full: bool) -> None:
    for name, rec in marker["files"].items():
        p = Path(out) / name
        where = f"{spec.describe(recipe)}: {p}"
        if not p.is_file():
            raise PrepError(f"{where}: missing, but the shard's completion marker lists it; "
                            "rerun with --force (or delete the marker to redo this shard)")
        if p.stat().st_size != rec["bytes"]:
            raise PrepError(f"{where}: {p.stat().st_size} bytes, its completion marker says {rec['bytes']}; "
                            "rerun with --force (or delete the marker to redo this shard)")
        if full and shards.sha256_files([p]) != rec["sha256"]:
            raise PrepError(f"{where}: sha256 differs from its completion marker; "
                            "rerun with --force (or delete the marker to redo this shard)")


@dataclass
class Units:
    """Concatenated per-unit arrays of all shards, plus where each shard's units are."""

    truth: np.ndarray
    scores: np.ndarray
    lengths: np.ndarray
    seed: np.ndarray
    doc_of_unit: np.ndarray  # global document index of each unit
    doc_truth: np.ndarray
    doc_scores: np.ndarray
    doc_seed: np.ndarray
    bounds: list[tuple[int, int]]  # per shard: unit range


def _shard_units(out: Path, prefix: str, paragraphs: bool, topic: bool):
    lengths = shards.doc_lengths(out, prefix)
    truth = shards.load_array(out, prefix, "truth")
    scores = shards.load_array(out, prefix, "scores")
    seed = shards.load_array(out, prefix, "seed") if topic else np.zeros(len(lengths), np.uint8)
    if not len(lengths) == len(truth) == len(scores) == len(seed):
        raise PrepError(f"{out / prefix}: sidecars disagree with the token file's {len(lengths)} documents")
    if not paragraphs:
        return lengths, truth, scores, seed, np.arange(len(lengths)), (truth, scores, seed)
    span_len = shards.load_array(out, prefix, "span_lengths").astype(np.int64)
    span_truth = shards.load_array(out, prefix, "span_truth")
    span_scores = shards.load_array(out, prefix, "span_scores")
    ends = np.cumsum(span_len)
    doc_ends = np.cumsum(lengths)
    if ends[-1:].tolist() != doc_ends[-1:].tolist() or not np.isin(doc_ends, ends).all():
        raise PrepError(f"{out / prefix}_span_lengths.npy: spans do not tile the documents")
    owner = np.searchsorted(doc_ends, ends - 1, side="right")
    return span_len, span_truth, span_scores, seed[owner], owner, (truth, scores, seed)


def gather_units(out: Path, prefixes: list[str], recipe: Recipe) -> Units:
    paragraphs = recipe.classifier.granularity == "paragraph"
    topic = recipe.classifier.kind == "topic"
    parts, bounds, start, doc_base = [], [], 0, 0
    for prefix in prefixes:
        u = _shard_units(out, prefix, paragraphs, topic)
        parts.append(u[:4] + (u[4] + doc_base,) + u[5])
        bounds.append((start, start + len(u[0])))
        start += len(u[0])
        doc_base += len(u[5][0])
    cat = [np.concatenate([p[i] for p in parts]) for i in range(8)]
    return Units(cat[1].astype(np.uint8), cat[2].astype(np.float32), cat[0].astype(np.int64),
                 cat[3].astype(bool), cat[4].astype(np.int64), cat[5].astype(np.uint8),
                 cat[6].astype(np.float32), cat[7].astype(bool), bounds)


def _token_measure(flag: np.ndarray, truth: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> dict:
    pos = truth == FORGET
    tp = int(lengths[keep & flag & pos].sum())
    fp = int(lengths[keep & flag & ~pos].sum())
    fn = int(lengths[keep & ~flag & pos].sum())
    return {**classifiers.rates(tp, fp, fn), "tokens": int(lengths[keep].sum())}


def granularity_metrics(u: Units, threshold: float) -> dict:
    """Classifier quality per document and per paragraph, and per token for labels taken at
    either granularity (the truth of a token is its paragraph's)."""
    doc_flag = u.doc_scores >= threshold
    span_flag = u.scores >= threshold
    keep = ~u.seed
    return {"document": classifiers.measure(u.doc_scores, u.doc_truth, threshold, ~u.doc_seed),
            "paragraph": classifiers.measure(u.scores, u.truth, threshold, keep),
            "tokens": {"document_labels": _token_measure(doc_flag[u.doc_of_unit], u.truth, u.lengths, keep),
                       "paragraph_labels": _token_measure(span_flag, u.truth, u.lengths, keep)}}


def train_stats(u: Units, labels: np.ndarray, paragraphs: bool) -> dict:
    out = {"num_docs": int(len(u.doc_truth)), "num_tokens": int(u.lengths.sum()),
           "docs_per_true_domain": {n: int((u.doc_truth == i).sum()) for i, n in enumerate(DOMAIN_NAMES)},
           "tokens_per_true_domain": {n: int(u.lengths[u.truth == i].sum()) for i, n in enumerate(DOMAIN_NAMES)},
           "tokens_per_applied_label": {n: int(u.lengths[labels == i].sum()) for i, n in enumerate(LABEL_NAMES)}}
    if paragraphs:
        out["num_spans"] = int(len(u.truth))
        out["spans_per_applied_label"] = {n: int((labels == i).sum()) for i, n in enumerate(LABEL_NAMES)}
    return out


def write_train_labels(out: Path, prefixes: list[str], u: Units,
                       labels: np.ndarray) -> dict[str, tuple[dict, dict]]:
    """Each shard's label sidecar (staged, then renamed); returns per prefix the file records
    and the label facts (``megatron_sgtm.data.facts``), taken from the labels in memory."""
    out_records = {}
    with shards.staging(out, "labels") as tmp:
        (tmp / shards.TRAIN_DIR).mkdir()
        for prefix, (a, b) in zip(prefixes, u.bounds):
            doc_len = shards.doc_lengths(out, prefix)
            runs = shards.write_labels(tmp, prefix, labels[a:b], u.lengths[a:b], doc_len)
            shards.save_array(tmp, prefix, facts.RUNS_KIND, runs)
            names = shards.label_files(prefix)
            out_records[prefix] = ({n: shards.file_record(tmp, n) for n in names},
                                   facts.label_facts(runs, int(doc_len.sum()), facts.doc_label_range(
                                       runs, facts.doc_offsets(doc_len), doc_len)))
            shards.place(tmp, out, names)
    return out_records


def token_facts(out: Path, entry: dict, token_dtype: str) -> dict:
    """A shard's token range: the map's record, or (a shard mapped before it recorded one)
    one read of its token file now."""
    recorded = entry.get("facts") or {}
    if recorded.get("token_min") is not None:
        return {k: recorded[k] for k in ("token_min", "token_max")}
    tokens = np.memmap(Path(out) / f"{entry['prefix']}_tokens.bin", dtype=np.dtype(token_dtype), mode="r")
    return facts.scan(tokens, facts.TokenScan()).facts()


def heldout_entry(out: Path, name: str, token_dtype: str) -> dict:
    """A held-out split's facts (a full scan: held-out splits are small), its run file
    (written here) and its file records."""
    found, runs = shards.scan_facts(out, name, token_dtype)
    with shards.staging(out, "heldout") as tmp:
        shards.save_array(tmp, name, facts.RUNS_KIND, runs)
        shards.place(tmp, out, [facts.runs_name(name)])
    names = [*shards.indexed_files(name, "tokens"), *shards.label_files(name),
             *(f"{name}_{k}.npy" for k in ("truth", "scores") if (Path(out) / f"{name}_{k}.npy").is_file())]
    return {"facts": found, "files": {n: shards.file_record(out, n) for n in names}}


def sources_provenance(recipe: Recipe, plan: list[ShardSpec], markers: dict[int, dict]) -> list[dict]:
    out = []
    for si, src in enumerate(recipe.sources):
        files = {}
        for s in plan:
            if s.source != si or s.path is None:
                continue
            key = Path(s.path).name if src.kind == "wiki_offline" else s.path
            if src.kind == "jsonl" and (s.start or s.stop < s.size_of_file()):
                key = f"{s.path}@{s.start}-{s.stop}"
            if src.kind == "parquet" and s.start:
                continue  # the file's first shard hashed the whole file
            files[key] = markers[s.index]["input_sha256"]
        out.append({"name": src.name, "kind": src.kind, "version": source_version(src),
                    "sha256": dict(sorted(files.items())), "dataset": src.dataset if src.kind == "hf" else None,
                    "revision": src.revision if src.kind == "hf" else None})
    return out


def corpus_fingerprint(recipe: Recipe, sources: list[dict], tokenizer_sha: Optional[str],
                       classifier_files: Optional[dict] = None) -> str:
    d = recipe.fingerprint_dict()
    d["sharding"].pop("chunk_docs")
    d.pop("noise")
    record = {"recipe": d, "sources": sources, "tokenizer_sha256": tokenizer_sha}
    if classifier_files:  # a user's model: its bytes are part of what made the labels
        record["classifier_sha256"] = {p: f["sha256"] for p, f in sorted(classifier_files.items())}
    payload = json.dumps(record, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _recorded_recipe(recipe: Recipe) -> dict:
    """The recipe as the manifest records it: without the chunk size, which changes speed and
    memory but never a byte of output."""
    d = recipe.to_dict()
    d["sharding"].pop("chunk_docs")
    return d


def label_and_manifest(recipe: Recipe, out: Path, plan: list[ShardSpec], markers: dict[int, dict],
                       log: Callable[[str], None]) -> dict:
    """The prep reduce: shard entries from the markers, then :func:`label_shards`."""
    out = Path(out)
    gm = json.loads((out / shards.STATE / GLOBAL_MARKER).read_text(encoding="utf-8"))
    entries = [{"prefix": markers[s.index]["prefix"], "num_docs": markers[s.index]["num_docs"],
                "num_tokens": markers[s.index]["num_tokens"], "files": markers[s.index]["files"],
                "facts": markers[s.index].get("facts")}
               for s in plan if markers[s.index]["num_docs"] > 0]
    base = {"tokenizer": gm["tokenizer"], "token_dtype": gm["token_dtype"],
            "sources": sources_provenance(recipe, plan, markers),
            "corpus": {**{k: sum(markers[s.index]["counts"][k] for s in plan) for k in
                          ("uncategorized_docs", "dropped_docs", "skipped_empty_docs")},
                       "sample_docs": gm["sample_docs"]},
            "test_splits": sorted(gm["test_splits"]),
            "classifier_files": gm.get("classifier_files", {})}
    for s in plan:
        base["classifier_stage_counts"] = classifiers.add_counts(base.get("classifier_stage_counts"),
                                                                 markers[s.index].get("classifier_stages"))
    return label_shards(recipe, out, entries, base, log)


def label_shards(recipe: Recipe, out: Path, entries: list[dict], base: dict,
                 log: Callable[[str], None]) -> dict:
    """Noise policy over all shards, label files, manifest (written last). ``entries``: the
    train shards (prefix, counts, files without labels); ``base``: tokenizer, token dtype,
    source provenance, corpus counts and the names of the held-out splits."""
    out = Path(out)
    prefixes = [e["prefix"] for e in entries]
    if not prefixes:
        raise PrepError(f"{out}: every train document was held out or dropped; nothing to train on")
    paragraphs = recipe.classifier.granularity == "paragraph"
    u = gather_units(out, prefixes, recipe)
    thr = recipe.classifier.threshold
    result = apply_policy(u.truth, u.scores, u.lengths, thr, recipe.noise)
    metrics = classifiers.measure(u.scores, u.truth, thr, ~u.seed)
    shards.remove_manifest(out)
    written = write_train_labels(out, prefixes, u, result.labels)
    sources = base["sources"]
    given = (base["tokenizer"]["sha256"] if recipe.tokenizer.model else None)
    train = train_stats(u, result.labels, paragraphs)
    # Per shard: every file with its size and sha256 (the map's, verified above, and the label
    # sidecar's), and its facts (the map's token range, the labels' facts).
    train["shards"] = []
    for e in entries:
        records, label = written[e["prefix"]]
        kept = {k: v for k, v in e["files"].items() if k not in shards.label_files(e["prefix"])}
        train["shards"].append({**e, "files": {**kept, **records},
                                "facts": {**token_facts(out, e, base["token_dtype"]), **label}})
    unit = "paragraph spans" if paragraphs else "docs"
    manifest = {
        "format_version": FORMAT_VERSION,
        "sgtm_version": version_string(),
        "corpus_fingerprint": corpus_fingerprint(recipe, sources, given, base.get("classifier_files")),
        "recipe": _recorded_recipe(recipe),
        "tokenizer": base["tokenizer"],
        "token_dtype": base["token_dtype"],
        "sources": sources,
        "corpus": {**{k: v for k, v in base["corpus"].items() if k != "uncategorized_policy"},
                   "uncategorized_policy": recipe.topics.uncategorized_policy},
        "granularity": recipe.classifier.granularity,
        "noise_policy": {**dataclasses.asdict(recipe.noise), "threshold": thr},
        "realised": result.report,
        "classifier": {"kind": recipe.classifier.kind, **metrics, "unit": unit,
                       "evaluated_on": (f"train {unit} outside the classifier's seed split" if u.seed.any()
                                        else f"all train {unit}")},
        "splits": {"train": train},
        # For train: sha256 over the shards' .bin then .idx sha256 hex digests, in shard order.
        "tokens_sha256": {"train": facts.combined_sha256(train["shards"], "tokens")},
        "label_sidecar_sha256": {"train": facts.combined_sha256(train["shards"], "labels")},
    }
    if paragraphs:
        manifest["classifier"]["by_granularity"] = granularity_metrics(u, thr)
    if base.get("classifier_files"):
        manifest["classifier"]["files"] = base["classifier_files"]
    if base.get("classifier_stage_counts"):
        manifest["classifier"]["stages"] = classifiers.stage_report(recipe.classifier.stages,
                                                                    base["classifier_stage_counts"])
    heldout_truth, heldout_scores = [], []
    for name in base["test_splits"]:
        truth = shards.load_array(out, name, "truth")
        heldout_truth.append(truth)
        heldout_scores.append(shards.load_array(out, name, "scores"))
        lengths = shards.doc_lengths(out, name)
        st = {"num_docs": int(len(lengths)), "num_tokens": int(lengths.sum())}
        manifest["splits"][name] = {
            **st, **heldout_entry(out, name, base["token_dtype"]),
            "docs_per_true_domain": {n: int((truth == i).sum()) for i, n in enumerate(DOMAIN_NAMES)},
            "tokens_per_true_domain": {n: int(lengths[truth == i].sum()) for i, n in enumerate(DOMAIN_NAMES)},
            "tokens_per_applied_label": {n: (st["num_tokens"] if i == 0 else 0) for i, n in enumerate(LABEL_NAMES)}}
        manifest["tokens_sha256"][name] = shards.sha256_files([out / n for n in shards.indexed_files(name, "tokens")])
        manifest["label_sidecar_sha256"][name] = shards.sha256_files(
            [out / n for n in shards.indexed_files(name, "labels")])
    if heldout_truth:
        # The held-out documents were never used to fit or seed anything in prep.
        manifest["classifier"]["heldout"] = classifiers.measure(
            np.concatenate(heldout_scores), np.concatenate(heldout_truth), thr,
            np.ones(sum(len(t) for t in heldout_truth), bool))
    with shards.staging(out, "manifest") as tmp:
        (tmp / "manifest.json").write_text(dumps(manifest), encoding="utf-8")
        shards.place(tmp, out, ["manifest.json"])
    r = result.report
    log(f"prep: classifier {recipe.classifier.kind}: precision {metrics['precision']:.4f} "
        f"recall {metrics['recall']:.4f} f1 {metrics['f1']:.4f} on {metrics['evaluated_docs']} train {unit}")
    for row in manifest["classifier"].get("stages", []):
        c = row["document"]
        log(f"prep:   stage {row['stage']} ({row['kind']}, decides {row['decides']}): saw {c['seen']} documents, "
            f"decided {c['decided']}, passed {c['passed']}; precision {c['precision']:.4f} recall {c['recall']:.4f} "
            f"at threshold {row['threshold']}")
    log(f"prep: wrote {out}: {len(prefixes)} train shards, {train['num_tokens']} train tokens; "
        f"realised undiscovered {r['undiscovered_rate']:.4f}, false positives {r['false_positive_rate']:.4f} "
        f"({r['false_positive_pool']} pool), retain-mode share {r['retain_mode_share']:.4f}")
    return manifest

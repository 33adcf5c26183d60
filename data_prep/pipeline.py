"""Recipe -> shard directory as plan, global stage, map, reduce; and the local executor.

    plan    the input cut into shards (data_prep.plan); refuses a directory holding another corpus
    global  sample -> held-out split, tokenizer, topic classifier (data_prep.sample)
    map     one task per shard: classify, tokenize, write, mark complete (data_prep.task)
    reduce  verify every shard, noise policy, labels, manifest (data_prep.reduce)

Every stage skips what a previous run finished, so a killed run is continued by running the
same command again; the result is byte-identical to an uninterrupted run, whatever the
executor or worker count. The SLURM executor (data_prep.slurm) runs the same map tasks as
array tasks.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sys
from pathlib import Path
from typing import Callable

from data_prep import shards
from data_prep.classifiers import check_classifier, classifier_inputs
from data_prep.errors import PrepError
from data_prep.manifest import check_state, clear, write_plan
from data_prep.plan import ShardSpec, input_stamps, make_plan, plan_to_json
from data_prep.recipe import Recipe
from data_prep.reduce import check_marker, label_and_manifest, read_marker
from data_prep.sample import GLOBAL_MARKER, GlobalState, load_global, read_sample, run_global
from data_prep.task import run_shard

Log = Callable[[str], None]
_pool_ctx: dict = {}


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def recipe_fingerprint(recipe: Recipe) -> str:
    """The recipe without its noise policy (relabelling changes that) and without settings
    that cannot change the output (chunk size)."""
    d = recipe.fingerprint_dict()
    d.pop("noise")
    d["sharding"].pop("chunk_docs")
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def plan_state(recipe: Recipe) -> tuple[list[ShardSpec], str, dict]:
    """The shard plan, its JSON text, and the stamps of every input (a given tokenizer and the
    classifier's files too: a changed model is a changed corpus)."""
    plan = make_plan(recipe)
    extra = ([recipe.tokenizer.model] if recipe.tokenizer.model else []) + classifier_inputs(recipe.classifier)
    return plan, plan_to_json(plan, recipe_fingerprint(recipe), recipe.name), input_stamps(plan, extra)


def open_plan(recipe: Recipe, out: Path, force: bool, log: Log) -> tuple[list[ShardSpec], GlobalState]:
    """The plan and a finished global stage: reused when the directory holds this corpus,
    otherwise built (after every read it needs succeeded, so bad input leaves ``out`` as it was)."""
    out = Path(out)
    plan, plan_text, stamps = plan_state(recipe)
    if out.exists() and not out.is_dir():
        raise PrepError(f"output {out}: exists and is not a directory")
    # --force starts afresh, but clears the old output only after every read succeeded.
    resume = False if force else check_state(out, plan_text, stamps)
    if resume and (out / shards.STATE / GLOBAL_MARKER).is_file():
        return plan, load_global(out, plan)
    caps, sample, heldout = read_sample(recipe, plan)
    # The classifier loads and scores real documents before anything is written.
    check_classifier(recipe.classifier, [d.text for d in sample.docs])
    if force:
        clear(out)
    shards.remove_manifest(out)
    write_plan(out, plan_text, stamps)
    run_global(recipe, out, plan, caps, sample, heldout, log)
    return plan, load_global(out, plan)


def _after_fork() -> None:
    scorer = _pool_ctx["encoder"].scorer
    if scorer is not None:
        scorer.after_fork()


def _pool_task(index: int) -> dict:
    recipe, out, plan, state = _pool_ctx["args"]
    return run_shard(recipe, out, plan[index], state)


def run_map(recipe: Recipe, out: Path, plan: list[ShardSpec], pending: list[ShardSpec],
            state: GlobalState, workers: int, progress: bool, log: Log) -> dict[int, dict]:
    """Run the pending shards, here or in ``workers`` forked processes (one shard each)."""
    from tqdm import tqdm

    done: dict[int, dict] = {}
    bar = tqdm(total=sum(s.size for s in pending), unit="B", unit_scale=True, desc="prep map",
               disable=not progress, file=sys.stderr)
    from data_prep.task import encoder_for

    encoder = encoder_for(recipe, out, state)  # load once in the parent; forked workers share it
    forkable = encoder.scorer is None or encoder.scorer.fork_safe
    if workers > 1 and len(pending) > 1 and not forkable:
        log(f"prep: the {recipe.classifier.kind} classifier holds a GPU, which forked workers cannot "
            "share: the map runs in this process (use SLURM array tasks for several GPUs)")
    with bar:
        if workers <= 1 or len(pending) <= 1 or not forkable:
            for s in pending:
                done[s.index] = run_shard(recipe, out, s, state)
                bar.update(s.size)
            return done
        _pool_ctx["args"] = (recipe, out, plan, state)
        _pool_ctx["encoder"] = encoder
        # fork: workers share the parent's loaded classifier instead of loading it again.
        pool = mp.get_context("fork").Pool(min(workers, len(pending)), initializer=_after_fork)
        try:
            # Largest shards first keeps the workers busy to the end; output does not depend
            # on the order (each shard writes only its own files).
            order = sorted(pending, key=lambda s: (-s.size, s.index))
            for marker in pool.imap_unordered(_pool_task, [s.index for s in order]):
                done[marker["shard"]] = marker
                bar.update(plan[marker["shard"]].size)
        finally:
            pool.terminate()  # after an error: the other shards stop, unmarked
            pool.join()
            _pool_ctx.clear()
            for s in pending:  # scratch of the workers just stopped
                shards.clear_stale_staging(out, s.name)
    return done


def shard_status(recipe: Recipe, out: Path, plan: list[ShardSpec]) -> tuple[dict[int, dict], list[ShardSpec]]:
    """Finished shards (marker present and its files the right size) and the pending ones."""
    finished, pending = {}, []
    for s in plan:
        m = read_marker(out, s, recipe)
        if m is None:
            pending.append(s)
        else:
            check_marker(out, s, recipe, m, full=False)
            finished[s.index] = m
    return finished, pending


def reduce_stage(recipe: Recipe, out: Path, plan: list[ShardSpec], log: Log) -> dict:
    finished, pending = shard_status(recipe, out, plan)
    if pending:
        names = ", ".join(str(s.index) for s in pending[:10]) + (" ..." if len(pending) > 10 else "")
        raise PrepError(f"{out}: {len(pending)} of {len(plan)} shards have not finished (shards {names}); "
                        "rerun the map (the same sgtm prep command) first")
    for s in plan:
        check_marker(out, s, recipe, finished[s.index], full=True)
    return label_and_manifest(recipe, out, plan, finished, log)


def prepare(recipe: Recipe, out: str | Path, force: bool = False, workers: int = 2,
            progress: bool = True, log: Log = _stderr) -> dict:
    """Build (or continue building) the shard directory ``out``; returns the manifest."""
    out = Path(out)
    plan, state = open_plan(recipe, out, force, log)
    finished, pending = shard_status(recipe, out, plan)
    if pending:
        shards.remove_manifest(out)
        log(f"prep: {len(pending)} of {len(plan)} shards to process"
            + (f" ({len(finished)} already finished)" if finished else ""))
        run_map(recipe, out, plan, pending, state, workers, progress, log)
    return reduce_stage(recipe, out, plan, log)


def run_task(recipe: Recipe, out: str | Path, task_index: int, shards_per_task: int,
             log: Log = _stderr) -> list[int]:
    """One SLURM array task: the shards ``[i*k, (i+1)*k)`` not finished yet."""
    out = Path(out)
    plan, plan_text, stamps = plan_state(recipe)
    if not check_state(out, plan_text, stamps):
        raise PrepError(f"{out}: no shard plan for this recipe; run the global stage first "
                        "(sgtm prep --executor slurm does)")
    state = load_global(out, plan)
    mine = plan[task_index * shards_per_task:(task_index + 1) * shards_per_task]
    if not mine:
        raise PrepError(f"--task-index {task_index}: the plan has {len(plan)} shards, "
                        f"{-(-len(plan) // shards_per_task)} tasks of {shards_per_task}")
    _, pending = shard_status(recipe, out, mine)
    for s in pending:
        m = run_shard(recipe, out, s, state)
        log(f"prep: shard {s.index}: {m['num_docs']} documents, {m['num_tokens']} tokens "
            f"in {m['seconds']:.1f} s")
    return [s.index for s in pending]


def reduce_only(recipe: Recipe, out: str | Path, log: Log = _stderr) -> dict:
    out = Path(out)
    plan, plan_text, stamps = plan_state(recipe)
    if not check_state(out, plan_text, stamps):
        raise PrepError(f"{out}: no shard plan for this recipe; nothing to reduce")
    load_global(out, plan)
    return reduce_stage(recipe, out, plan, log)


def global_only(recipe: Recipe, out: str | Path, force: bool, log: Log = _stderr) -> list[ShardSpec]:
    plan, _ = open_plan(recipe, Path(out), force, log)
    return plan


def default_shards_per_task(n_shards: int, max_tasks: int) -> int:
    return max(1, -(-n_shards // max_tasks))


__all__ = ["prepare", "run_task", "reduce_only", "global_only"]

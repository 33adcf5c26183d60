"""``sgtm eval CKPT --lm-eval TASKS``: lm-evaluation-harness on the Hugging Face export.

Runs ``lm_eval.simple_evaluate`` with its ``hf`` model on the export directory (the model and
the tokenizer exactly as a user loads them with ``transformers``), on CUDA when present, else
CPU. Task names pass through unchanged: local ones from ``--tasks-dir`` (``sgtm eval-tasks``)
and hub ones (``wmdp_bio``, ``mmlu``, ``piqa``, ...), which need network access to download
their datasets. Names are checked before anything is loaded or exported.

lm-eval scores the exported weights as they are: the logit calibration ``sgtm eval`` applies to
its losses has no place in a GPT-2/Llama checkpoint, so these accuracies are uncalibrated.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .ckpt_io import PostError

EXTRA = "eval"
INSTALL_HINT = ("pip install -e '.[eval]' in the megatron_sgtm checkout "
                "(or pip install 'lm-eval[hf]==0.4.13')")
# Metrics printed in the one-line summary, in this order, when a task reports them.
SUMMARY_METRICS = ("acc", "acc_norm", "perplexity", "exact_match", "f1")


@dataclass
class LmEvalRequest:
    tasks: list[str]
    tasks_dir: Optional[Path]
    limit: Optional[float]
    batch_size: int
    log_samples: bool = False


def require_lm_eval():
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (its hf model needs transformers and accelerate)
    except ImportError as exc:
        raise PostError(f"--lm-eval needs lm-evaluation-harness, the optional extra '{EXTRA}' "
                        f"({exc}); install it with: {INSTALL_HINT}") from None
    return lm_eval


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise PostError("--lm-eval: give one or more task names, comma-separated")
    return names


def _check_data_files(tasks_dir: Path) -> None:
    """Local tasks name their data files by absolute path; a moved directory breaks them."""
    for spec in sorted(tasks_dir.glob("*.yaml")):
        try:
            cfg = yaml.safe_load(spec.read_text()) or {}
        except yaml.YAMLError:
            continue  # lm-eval's own tags (!function); not ours to check
        files = ((cfg.get("dataset_kwargs") or {}).get("data_files") or {}) \
            if isinstance(cfg, dict) else {}
        for path in (files.values() if isinstance(files, dict) else []):
            if isinstance(path, str) and not Path(path).exists():
                raise PostError(f"task {cfg.get('task')} ({spec}): data file {path} is missing "
                                "(was the task directory moved?); re-run `sgtm eval-tasks`")


@functools.lru_cache(maxsize=8)
def _manager(include: Optional[str], defaults: bool, _signature: tuple):
    """lm-eval's index is built once per process for the same directories (a study worker
    scores many runs); ``_signature`` (the YAML files and their mtimes) keys a changed
    directory to a new index."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include, include_defaults=defaults)


def _signature(tasks_dir: Optional[Path]) -> tuple:
    if tasks_dir is None:
        return ()
    return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in Path(tasks_dir).glob("*.yaml")))


def task_manager(request: LmEvalRequest):
    """An lm-eval TaskManager knowing every requested name, or one error naming the unknown.
    lm-eval's own index (~15k tasks, seconds to build) is read only when a name is not local."""
    include = None
    if request.tasks_dir is not None:
        if not request.tasks_dir.is_dir():
            raise PostError(f"--tasks-dir {request.tasks_dir}: not a directory")
        _check_data_files(request.tasks_dir)
        include = str(Path(request.tasks_dir).resolve())
        local = _manager(include, False, _signature(request.tasks_dir))
        if all(name in local.all_tasks for name in request.tasks):
            return local
    manager = _manager(include, True, _signature(request.tasks_dir))
    unknown = [n for n in request.tasks if n not in manager.all_tasks]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = f"in {request.tasks_dir} or " if request.tasks_dir else ""
        raise PostError(f"unknown lm-eval task {', '.join(hints)}: not {where}among lm-eval's "
                        "tasks" + ("" if request.tasks_dir else
                                   "; local tasks need --tasks-dir (see `sgtm eval-tasks`)"))
    return manager


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_export(hf_dir: Path, request: LmEvalRequest, manager) -> dict:
    """``simple_evaluate`` on the export; lm-eval's results dict."""
    lm_eval = require_lm_eval()
    try:
        return lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
            tasks=list(request.tasks), limit=request.limit, batch_size=request.batch_size,
            device=_device(), task_manager=manager, log_samples=request.log_samples,
            bootstrap_iters=1000)
    except (ConnectionError, OSError) as exc:
        # Hub tasks download their data; offline, datasets / huggingface_hub raise these.
        raise PostError(f"lm-eval could not load a task's dataset ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}); hub tasks need "
                        "network access to the Hugging Face Hub or a filled HF cache") from None


def summary_lines(results: dict) -> list[str]:
    """One line per task: its headline metrics with standard errors and the item count."""
    lines = []
    for task, metrics in (results.get("results") or {}).items():
        if not _has_metrics(metrics):
            continue  # a group without aggregate metrics: its tasks have their own lines
        parts = []
        for name in SUMMARY_METRICS:
            value = metrics.get(f"{name},none")
            if isinstance(value, (int, float)):
                err = metrics.get(f"{name}_stderr,none")
                parts.append(f"{name} {value:.4f}" + (f" ± {err:.4f}" if isinstance(err, float) else ""))
        n = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        lines.append(f"lm-eval {task}: " + (", ".join(parts) or "no headline metric")
                     + (f" (n={n})" if n is not None else ""))
    return lines


def _has_metrics(metrics: dict) -> bool:
    return any(k.endswith(",none") and isinstance(v, (int, float)) for k, v in metrics.items())


def rows(results: dict, tag: dict, results_path: Path) -> list[dict]:
    out = []
    for task, metrics in (results.get("results") or {}).items():
        if not _has_metrics(metrics):
            continue
        clean = {k.replace(",none", ""): v for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        n = ((results.get("n-samples") or {}).get(task) or {}).get("effective")
        out.append(dict(tag, lm_eval_task=task, metrics=clean, n=n,
                        lm_eval_results=str(results_path)))
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_results(path: Path, results: dict, provenance: dict) -> Optional[Path]:
    """lm-eval's results JSON (plus our provenance under ``sgtm``); per-item samples, when
    logged, go to ``*_samples.jsonl`` beside it. Returns the samples path."""
    from lm_eval.utils import handle_non_serializable

    body = dict(results, sgtm=provenance)
    samples = body.pop("samples", None)
    _write_atomic(path, json.dumps(body, indent=1, default=handle_non_serializable) + "\n")
    if not samples:
        return None
    spath = path.with_name(path.name.removesuffix(".json") + "_samples.jsonl")
    _write_atomic(spath, "".join(json.dumps(dict(s, task=task), default=handle_non_serializable)
                                 + "\n" for task, items in samples.items() for s in items))
    return spath


# --- the `sgtm eval` hook -------------------------------------------------------------------

def add_arguments(p) -> None:
    g = p.add_argument_group("lm-evaluation-harness (optional extra 'eval')")
    g.add_argument("--lm-eval", metavar="TASKS", default=None,
                   help="comma-separated lm-eval tasks or groups, run on the Hugging Face "
                        "export (local ones from --tasks-dir; hub ones such as wmdp_bio,mmlu)")
    g.add_argument("--tasks-dir", type=Path, default=None,
                   help="local task directory written by `sgtm eval-tasks`")
    g.add_argument("--limit", type=float, default=None,
                   help="items per task (below 1: a fraction), as lm-eval's --limit")
    g.add_argument("--lm-eval-batch", type=int, default=16, help="lm-eval batch size")
    g.add_argument("--log-samples", action="store_true",
                   help="also write every item's inputs and log-likelihoods (*_samples.jsonl)")
    g.add_argument("--hf-dir", type=Path, default=None,
                   help="export directory to write or reuse (default: beside the checkpoint, "
                        "STEP_DIR.hf or STEP_DIR.hf-ablated)")
    g.add_argument("--tokenizer", type=Path, default=None,
                   help="the run's tokenizer.model (or prep directory) for the export; default: "
                        "--data, else the directory the checkpoint's config names")


def request_from(args) -> tuple[LmEvalRequest, object]:
    """Checked before any model work: the extra is installed and every task name is known."""
    require_lm_eval()
    if args.limit is not None and args.limit <= 0:
        raise PostError(f"--limit: must be positive, got {args.limit:g}")
    if args.lm_eval_batch <= 0:
        raise PostError("--lm-eval-batch: must be positive")
    limit = None if args.limit is None else (args.limit if args.limit < 1 else int(args.limit))
    request = LmEvalRequest(parse_tasks(args.lm_eval), args.tasks_dir, limit, args.lm_eval_batch,
                            args.log_samples)
    return request, task_manager(request)


def _decide_on_rank0(value):
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_export(args, ablate: bool, model=None, core=None, meta=None, tp: int = 1):
    """The export directory to evaluate and its provenance: ``args.checkpoint`` itself when it
    is an HF directory, else an export of the checkpoint (reused when it is current).
    ``model`` is the loaded (and, if ``ablate``, already ablated) checkpoint, if any."""
    import torch.distributed as dist

    from . import ckpt_io
    from .ablate import zero_forget_
    from .cli_common import is_rank0
    from .eval_export import (default_dir, find_tokenizer, is_hf_dir, provenance, reusable,
                              write_export)
    from .layout import gather_full_params

    if is_hf_dir(args.checkpoint):
        return Path(args.checkpoint), {"export": str(Path(args.checkpoint).resolve()),
                                       "source": "given"}
    step_dir = ckpt_io.resolve(args.checkpoint)
    meta = meta if meta is not None else ckpt_io.metadata(step_dir)
    tokenizer = find_tokenizer(meta, args.tokenizer or args.data, step_dir, required=True)
    wanted = provenance(step_dir, ablate, tokenizer)
    hf_dir = args.hf_dir or default_dir(step_dir, ablate)
    reuse = _decide_on_rank0(reusable(hf_dir, wanted) if is_rank0() else None)
    if not reuse:
        if model is None:
            model, core, meta = ckpt_io.load(step_dir, tp, args.trust_checkpoint)
            if ablate:
                zero_forget_(model)
        full = gather_full_params(model)
        if is_rank0():
            write_export(full, core, hf_dir, tokenizer, wanted, meta)
        if dist.is_initialized():
            dist.barrier()
    return hf_dir, dict(wanted, export=str(Path(hf_dir).resolve()),
                        source="reused" if reuse else "exported")


def run(args, request: LmEvalRequest, manager, hf_dir: Path, prov: dict, tag: dict,
        say) -> list[dict]:
    """Rank 0: simple_evaluate, lm-eval's results JSON (beside --out, else in the export),
    one summary line per task; returns JSON-lines rows for --out."""
    results = evaluate_export(hf_dir, request, manager)
    path = (args.out.with_name(args.out.stem + ".lm_eval.json") if args.out
            else Path(hf_dir) / "lm_eval_results.json")
    samples = write_results(path, results, dict(prov, tasks=request.tasks, limit=request.limit,
                                                calibrated=False))
    say(f"lm-eval on {hf_dir} ({prov['source']}; uncalibrated), results: {path}"
        + (f", samples: {samples}" if samples else ""))
    for line in summary_lines(results):
        say(line)
    return rows(results, tag, path)


# --- studies (`eval.lm_eval_tasks` in a study spec) -----------------------------------------

def ensure_study_tasks(shards: Path, tasks_dir: Path, tasks: list[str], log) -> None:
    """Build the local tasks of the study's held-out splits once (the default settings: the
    same items for every study of that data; lm-eval cuts inputs longer than a model's
    positions from the left), and check every name, before any run trains."""
    import shutil

    from ..configbase import ConfigError
    from ..data import DataError
    from .eval_tasks import TaskBuildConfig, build_tasks

    try:
        require_lm_eval()
        if not (tasks_dir / "tasks.json").is_file():
            tmp = tasks_dir.with_name(f".{tasks_dir.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            build_tasks(shards, tmp, tasks_dir, TaskBuildConfig())
            tmp.rename(tasks_dir)
            log(f"lm-eval tasks written to {tasks_dir}")
        task_manager(LmEvalRequest(list(tasks), tasks_dir, None, 1))
    except (PostError, DataError) as exc:
        raise ConfigError([f"eval.lm_eval_tasks: {exc}"]) from None


def score_model(model, tokenizer: Path, run_dir: Path, tasks: list[str], tasks_dir: Path,
                limit: Optional[int], batch_size: int = 16) -> dict:
    """Export a study run's model as it is evaluated (ablated where its method is) to
    ``run_dir/hf``, run lm-eval, write ``run_dir/lm_eval.json``; flat metrics for its row."""
    from .eval_export import write_export
    from .layout import gather_full_params

    hf_dir = Path(run_dir) / "hf"
    write_export(gather_full_params(model), model.core, hf_dir, tokenizer,
                 {"source": "study run", "run_dir": str(Path(run_dir).resolve())},
                 {"step": 0, "extra": {}})
    request = LmEvalRequest(list(tasks), tasks_dir, limit, batch_size)
    results = evaluate_export(hf_dir, request, task_manager(request))
    write_results(Path(run_dir) / "lm_eval.json", results, {"export": str(hf_dir)})
    return {f"lm_eval/{r['lm_eval_task']}/{k}": v for r in rows(results, {}, hf_dir)
            for k, v in r["metrics"].items() if not k.endswith("_stderr")}

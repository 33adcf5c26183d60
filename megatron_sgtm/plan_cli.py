"""``sgtm plan CONFIG [--gpus N] [--gpu-memory GiB] [--json] [--print-config] [key=value ...]``: the analytic
per-GPU memory of a training config at its parallel layout, before any GPU is allocated.

Exit status: 0 when the worst pipeline stage fits the budget, 1 when it does not, 2 for bad
input (one ``error:`` line)."""
from __future__ import annotations

import argparse
import json
import sys

from .cli_args import add_overrides, config_yaml, parse
from .configbase import ConfigError
from .plan import Layout, PlanError, plan_memory
from .plan_report import render_text, to_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sgtm plan", description=(
        "Estimate per-GPU memory (parameters, gradients, optimizer state, activations) of a "
        "training config, stage by stage, and say whether it fits. Exit 0: fits; 1: does not "
        "fit; 2: bad input."))
    p.add_argument("config", help="experiment YAML (see configs/train/)")
    p.add_argument("--gpus", type=int, default=None,
                   help="GPUs in the job (default: TP x PP, i.e. data-parallel size 1)")
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory per GPU in GiB (default 80)")
    p.add_argument("--headroom", type=float, default=0.15,
                   help="fraction of GPU memory kept free for what the plan does not count "
                        "(CUDA context, NCCL, fragmentation; default 0.15)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    add_overrides(p, "config", "tensor_parallel=4 train.micro_batch_size=2")
    return p


def main(argv: list[str]) -> int:
    args = parse(_parser(), argv)
    from .train.config import load_experiment

    try:
        if args.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory must be positive, got {args.gpu_memory:g}")
        if not 0 <= args.headroom < 1:
            raise PlanError(f"--headroom must be in [0, 1), got {args.headroom:g}")
        cfg = load_experiment(args.config, args.overrides)
        gpus = cfg.model_parallel if args.gpus is None else args.gpus
        if gpus <= 0:
            raise PlanError(f"--gpus must be positive, got {gpus}")
        layout = Layout.of(cfg, gpus)
        if args.print_config:
            print(config_yaml(cfg), end="")
            return 0
        if cfg.engine.name != "megatron":
            raise PlanError(f"the planner models engine.name megatron (megatron DDP and "
                            f"optimizer), not {cfg.engine.name!r}; add engine.name=megatron "
                            "to see that engine's plan")
        plan = plan_memory(cfg.model, layout, args.gpu_memory, args.headroom)
    except (ConfigError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(to_json(cfg.model, plan, args.config), indent=1))
    else:
        print(render_text(cfg.model, plan, args.config))
    return 0 if plan.fits else 1

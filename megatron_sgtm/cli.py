"""The ``sgtm`` command: one console script, one module per subcommand (imported lazily,
because ``import megatron.core`` alone costs seconds)."""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module with ``main(argv) -> int``, one-line help)
COMMANDS = {
    "prep": ("data_prep.cli", "build training shards from a data recipe"),
    "verify-data": ("megatron_sgtm.data.verify_cli", "check every byte of a shard directory"),
    "train": ("megatron_sgtm.train.cli", "pretrain with SGTM / baselines (torchrun, DP x TP)"),
    "plan": ("megatron_sgtm.plan_cli", "per-GPU memory estimate of a training config"),
    "ablate": ("megatron_sgtm.post.ablate_cli", "zero or prune theta_forget in a checkpoint"),
    "eval": ("megatron_sgtm.post.eval_cli", "calibrated losses per split, generation rate"),
    "eval-tasks": ("megatron_sgtm.post.eval_tasks_cli", "local lm-eval tasks from a prep output"),
    "attack": ("megatron_sgtm.post.attack_cli", "adversarial fine-tuning recovery"),
    "rmu": ("megatron_sgtm.post.rmu_cli", "the RMU post-hoc unlearning baseline"),
    "study": ("megatron_sgtm.study.cli", "run a sweep spec; fits, leakage, penalties, plots"),
    "demo": ("megatron_sgtm.demo", "the whole pipeline on the embedded real corpus (CPU)"),
    "bench": ("megatron_sgtm.bench", "CPU ratios measured in one run"),
}


def _usage() -> str:
    lines = ["usage: sgtm COMMAND [ARGS...]   (sgtm COMMAND --help for details)",
             "       sgtm --version", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V", "version"):
        from .version import version_string

        print(f"megatron_sgtm {version_string()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"error: `sgtm {name}` is not available in this build", file=sys.stderr)
            return 2
        raise
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

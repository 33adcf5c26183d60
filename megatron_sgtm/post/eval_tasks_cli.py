"""``sgtm eval-tasks --data PREP_DIR --out DIR``: local lm-evaluation-harness tasks (next-sentence
multiple choice and repeated-word cloze per held-out split) from a prep output; run them with
``sgtm eval CKPT --lm-eval PREFIX_forget_mc,... --tasks-dir DIR`` or
``lm_eval --include_path DIR --tasks ...``."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from ..configbase import ConfigError, config_from_dict
from .ckpt_io import PostError

TASKS_FILE = "tasks.json"


def parser() -> argparse.ArgumentParser:
    from .eval_tasks import TaskBuildConfig

    d = TaskBuildConfig()
    p = argparse.ArgumentParser(prog="sgtm eval-tasks", description=__doc__)
    p.add_argument("--data", type=Path, required=True, help="`sgtm prep` output directory")
    p.add_argument("--out", type=Path, required=True, help="task directory to write")
    p.add_argument("--force", action="store_true", help="replace an existing task directory")
    p.add_argument("--prefix", default=d.prefix, help="task name prefix (and group name)")
    p.add_argument("--max-items", type=int, default=d.max_items, help="items per split and task")
    p.add_argument("--choices", type=int, default=d.choices)
    p.add_argument("--context-tokens", type=int, default=d.context_tokens,
                   help="context budget in tokens (whole words, cut from the left)")
    p.add_argument("--choice-max-tokens", type=int, default=d.choice_max_tokens)
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def _replaceable(out: Path, force: bool) -> None:
    if not out.exists():
        return
    if not force:
        raise PostError(f"output {out}: already exists; pass --force to replace it")
    if not (out / TASKS_FILE).is_file():
        raise PostError(f"output {out}: exists and is not a task directory written by "
                         "`sgtm eval-tasks`; not replacing it")


def main(argv: list[str]) -> int:
    from ..data import DataError
    from .eval_tasks import TaskBuildConfig, build_tasks

    args = parser().parse_args(argv)
    out = args.out.resolve()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        cfg = config_from_dict(TaskBuildConfig, {
            "prefix": args.prefix, "max_items": args.max_items, "choices": args.choices,
            "context_tokens": args.context_tokens, "choice_max_tokens": args.choice_max_tokens,
            "seed": args.seed})
        _replaceable(out, args.force)
        tmp.mkdir(parents=True)
        summary = build_tasks(args.data, tmp, out, cfg)
        if out.exists():  # --force: swap the old directory out only once the new one is whole
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except ConfigError as exc:
        print(f"error: invalid settings: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    except (DataError, PostError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    for name, t in summary["tasks"].items():
        chance = f"chance {t['chance']:.2f}" if t["chance"] else "greedy-match cloze"
        print(f"{name:<28} {t['items']:>5} items from {t['documents']} {t['split']} documents "
              f"({chance})")
    print(f"wrote {out}: run with  sgtm eval CKPT --lm-eval {cfg.prefix} --tasks-dir {out}")
    return 0

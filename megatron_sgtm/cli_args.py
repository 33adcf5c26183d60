"""What every ``sgtm`` subcommand that takes ``key=value`` overrides shares.

- **Any order.** Flags and overrides mix freely (``sgtm train --config C a=1 --nproc 2 b=2``),
  through argparse's intermixed parsing: optionals are parsed first, so a flag's value stays
  that flag's value even when it contains ``=`` (``--out runs/lr=3e-4``), and the remaining
  words are the overrides, in the order given.
- **--print-config.** The config a run would use, after its YAML, its bases, its defaults and
  the overrides are merged and validated, printed as YAML that loads back to the same config.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from .configbase import config_to_dict


def add_overrides(parser: argparse.ArgumentParser, what: str, example: str) -> None:
    """The ``key=value`` positional and ``--print-config``; ``what`` names the config."""
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"{what} overrides, before, between or after the flags, "
                             f"e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help=f"print the resolved {what} (YAML, defaults and overrides merged, "
                             "validated as a run validates it) as YAML and exit")


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return parser.parse_intermixed_args(argv)


def config_yaml(config: Any) -> str:
    """A config dataclass as YAML that the same loader reads back to an equal config (tuples
    and paths become the lists and strings YAML has)."""
    plain = json.loads(json.dumps(config_to_dict(config), default=str))
    return yaml.safe_dump(plain, sort_keys=False, default_flow_style=False)


__all__ = ["add_overrides", "config_yaml", "parse"]

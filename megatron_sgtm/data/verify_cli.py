"""``sgtm verify-data DIR [--workers N]``: read every byte of a shard directory and check it
against what prep recorded (``verify.py``).

A training start checks only what is cheap (sizes, index files, the label-run file, a few
sampled pages of each ``.bin``); this is the full check, for after a copy, before a long
run, or when a start reports a mismatch. Prints one ``error: KIND: ...`` line per kind of
problem found and exits 2; otherwise prints a JSON summary and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ..cli_args import parse

MAX_LISTED = 3  # details named per problem kind


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sgtm verify-data",
        description="Check every file of a shard directory against the sizes, sha256 and facts "
                    "its manifest records (all bytes are read; shards in parallel).")
    p.add_argument("directory", metavar="DIR", help="a `sgtm prep` output directory")
    p.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                   help="processes, one shard at a time each (default: CPU count, at most 8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse(_parser(), list(sys.argv[1:] if argv is None else argv))
    from .shards import DataError
    from .verify import KINDS, verify_directory

    if args.workers < 1:
        print(f"error: --workers must be >= 1, got {args.workers}", file=sys.stderr)
        return 2
    try:
        report = verify_directory(args.directory, args.workers)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    found = report.by_kind()
    for kind, details in found.items():
        more = f" (and {len(details) - MAX_LISTED} more)" if len(details) > MAX_LISTED else ""
        print(f"error: {kind}: {KINDS[kind]}: {'; '.join(details[:MAX_LISTED])}{more}",
              file=sys.stderr)
    if report.unrecorded:
        print(f"warning: {len(report.unrecorded)} prefixes record no facts (prepped by an older "
              "`sgtm prep`): checked against sizes, sha256, the vocabulary and labels only; "
              f"`sgtm prep --relabel {args.directory}` records them", file=sys.stderr)
    print(json.dumps({"verified": not found, **report.summary()}, sort_keys=True))
    return 2 if found else 0


if __name__ == "__main__":
    sys.exit(main())

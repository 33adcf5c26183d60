"""The version string a bug report, a checkpoint, a prep manifest or a results row names.

``0.1.0`` from the installed package metadata; run from a git checkout it also names the
commit, ``0.1.0+g<12 hex>``, and ``.dirty`` when tracked files differ from it. The string is
computed once per process (one ``git`` call at most), never raises, and never asks git about a
repository other than the one this package lives in.
"""
from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "megatron_sgtm"
# Where the package sits in a checkout: <root>/megatron_sgtm/version.py.
_CHECKOUT_ROOT = Path(__file__).resolve().parent.parent


def package_version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-c", f"safe.directory={_CHECKOUT_ROOT}", "-C", str(_CHECKOUT_ROOT), *args], capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str | None:
    """``<12 hex>`` or ``<12 hex>.dirty`` when this package is a git checkout, else None (an
    installed wheel: site-packages is not a checkout, and a parent repository is not ours)."""
    if not (_CHECKOUT_ROOT / ".git").exists():  # a directory, or a worktree's .git file
        return None
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}.dirty" if status else commit


@functools.lru_cache(maxsize=1)
def version_string() -> str:
    commit = git_commit()
    return package_version() + (f"+g{commit}" if commit else "")


__all__ = ["git_commit", "package_version", "version_string"]

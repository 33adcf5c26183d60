"""Relative paths in a study spec: the spec file's folder first, then the project root.

A spec names files (its data recipe) relative to where it lives or to the checkout, never to
whatever directory the command happens to run from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from ..configbase import ConfigError

# Spec keys that name files.
PATH_KEYS = ("recipe",)


def project_root() -> Optional[Path]:
    """The checkout holding the package (the folder with pyproject.toml), if there is one."""
    import megatron_sgtm

    root = Path(megatron_sgtm.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else None


def resolve_path(value: str, key: str, spec_dir: Path) -> str:
    """``value`` as an absolute path: kept when absolute, else the first existing of
    ``spec_dir / value`` and ``project root / value``; a ConfigError naming ``key`` if none."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    tried = [spec_dir.resolve() / path]
    root = project_root()
    if root is not None and root / path not in tried:
        tried.append(root / path)
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    raise ConfigError([f"{key}: {value} not found (tried {', '.join(str(t) for t in tried)})"])


def resolve_spec_paths(spec, spec_file: Path):
    """A copy of ``spec`` with every path key made absolute (one error for all bad ones)."""
    problems, changes = [], {}
    for key in PATH_KEYS:
        try:
            changes[key] = resolve_path(getattr(spec, key), key, Path(spec_file).parent)
        except ConfigError as exc:
            problems += exc.problems
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(spec, **changes)

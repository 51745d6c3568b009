"""``certctl hooks install``: git hooks that run plan (and apply) after a merge or commit.

The hook is a small ``sh`` script. Every value in it (the Python interpreter, the
inventory path) is quoted with :func:`shlex.quote`; it runs from the repository's top
level, as git runs hooks. A hook file certctl did not write is never overwritten
unless ``force`` is given.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from certctl.errors import CertctlError

MARK = "# installed by certctl hooks install"
HOOKS = ("post-merge", "post-commit")


def _git(cwd: Path, *args: str) -> str:
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError:
        raise CertctlError("git is not installed") from None
    if proc.returncode != 0:
        raise CertctlError(f"{cwd} is not inside a git repository: {proc.stderr.strip()[-300:]}")
    return proc.stdout.strip()


def script(inventory_rel: str, apply: bool, state: str | None) -> str:
    py = shlex.quote(sys.executable)
    base = f"{py} -m certctl -i {shlex.quote(inventory_rel)}"
    if state:
        base += f" --state {shlex.quote(state)}"
    lines = [
        "#!/bin/sh",
        MARK,
        "# Runs certctl plan" + (" and apply" if apply else "") + " after a commit or merge.",
        'cd "$(git rev-parse --show-toplevel)" || exit 0',
        f"{base} plan || exit 0",
    ]
    if apply:
        lines.append(f"{base} apply --auto-approve")
    return "\n".join(lines) + "\n"


def install(inventory: Path, *, apply: bool, force: bool, state: str | None) -> list[Path]:
    """Write the hooks into the repository holding ``inventory``; the paths written."""
    inv = inventory.expanduser().absolute()
    where = inv if inv.is_dir() else inv.parent
    if not where.exists():
        raise CertctlError(f"{inventory}: no such file or directory")
    top = Path(_git(where, "rev-parse", "--show-toplevel"))
    hooks_dir = Path(_git(where, "rev-parse", "--git-path", "hooks"))
    if not hooks_dir.is_absolute():
        hooks_dir = where / hooks_dir
    rel = os.path.relpath(inv, top)
    if rel.startswith(".."):
        raise CertctlError(f"{inventory} is not inside the repository at {top}")
    body = script(rel, apply, state)
    hooks_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in HOOKS:
        path = hooks_dir / name
        if path.exists() and not force:
            existing = path.read_text(encoding="utf-8", errors="replace")
            if MARK not in existing:
                raise CertctlError(
                    f"{path} exists and was not written by certctl; pass --force to replace it"
                )
        tmp = path.with_name(f".{name}.certctl.tmp")
        tmp.write_text(body, encoding="utf-8")
        tmp.chmod(0o755)
        tmp.replace(path)
        written.append(path)
    return written

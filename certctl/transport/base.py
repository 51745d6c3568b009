"""The small file-and-command interface a deploying target needs from a host.

Everything is async. Paths are absolute on the host. Implementations never follow a
symlink for the final path component (``lstat``, ``O_NOFOLLOW`` / SFTP ``lstat``),
translate their library's failures into :class:`~certctl.errors.TransientError`
(connection trouble: worth a retry) or :class:`~certctl.errors.PermanentError`, and
never put file contents in an error message.
"""

from __future__ import annotations

import stat as _stat
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class FileStat:
    mode: int  # full st_mode (type bits included)
    uid: int
    gid: int
    size: int
    mtime_ns: int

    @property
    def is_reg(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_link(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def perms(self) -> int:
        return _stat.S_IMODE(self.mode)


@dataclass(frozen=True, slots=True)
class CommandResult:
    argv: tuple[str, ...]
    status: int
    output: str  # stdout + stderr, trimmed by the caller before it is shown

    @property
    def ok(self) -> bool:
        return self.status == 0


class HostIO(Protocol):
    """File operations and commands on one host."""

    #: How the host is named in messages ("local" or the inventory host name).
    label: str

    async def lstat(self, path: str) -> FileStat | None:
        """Metadata of ``path`` itself (no symlink followed); None when missing."""

    async def read(self, path: str) -> bytes: ...

    async def listdir(self, path: str) -> list[str]:
        """Names in a directory; empty when it does not exist."""

    async def mkdir(self, path: str, mode: int) -> None:
        """Create one directory; an existing one is fine."""

    async def write_new(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> FileStat:
        """Create ``path`` exclusively, write, set owner (-1 = leave) and mode, fsync."""

    async def sync_files(self, paths: Sequence[str]) -> None:
        """Make files :meth:`write_new` created durable, if it did not already."""

    async def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` with ``src``."""

    async def link(self, src: str, dst: str) -> None: ...

    async def unlink(self, path: str) -> None:
        """Remove a file; a missing one is fine."""

    async def rmdir(self, path: str) -> None:
        """Remove an empty directory; a missing or non-empty one is left alone."""

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        """Make renames in these directories durable (best effort where unsupported)."""

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Run a command given as an argument list (never through a local shell)."""

    async def resolve_ids(
        self, owner: str | int | None, group: str | int | None
    ) -> tuple[int, int]:
        """uid and gid on the host for names or numbers; -1 for "leave as is"."""

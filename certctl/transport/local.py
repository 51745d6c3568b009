""":class:`~certctl.transport.base.HostIO` on this machine: plain ``os`` calls.

Local deployment goes through exactly the same target code as SSH deployment; only
this class differs. File operations are quick and run inline; commands run as
argument lists with :func:`asyncio.create_subprocess_exec` (no shell).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
from collections.abc import Sequence

from certctl.errors import PermanentError, TransientError
from certctl.transport.base import CommandResult, FileStat


def _fs(st: os.stat_result) -> FileStat:
    return FileStat(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)


def _err(what: str, path: str, exc: OSError) -> PermanentError:
    return PermanentError(f"{what} {path}: {exc.strerror or exc}")


class LocalHost:
    label = "local"

    async def lstat(self, path: str) -> FileStat | None:
        try:
            return _fs(os.lstat(path))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _err("cannot stat", path, exc) from exc

    async def read(self, path: str) -> bytes:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _err("cannot read", path, exc) from exc
        try:
            chunks = []
            while chunk := os.read(fd, 1 << 16):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    async def listdir(self, path: str) -> list[str]:
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _err("cannot list", path, exc) from exc

    async def mkdir(self, path: str, mode: int) -> None:
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode, follow_symlinks=False)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _err("cannot create", path, exc) from exc

    async def write_new(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> FileStat:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise _err("cannot create", path, exc) from exc
        try:
            if uid != -1 or gid != -1:
                os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise _err("cannot write", path, exc) from exc
        os.close(fd)
        return _fs(st)

    async def sync_files(self, paths: Sequence[str]) -> None:
        return None  # write_new fsyncs

    async def rename(self, src: str, dst: str) -> None:
        try:
            os.replace(src, dst)
        except OSError as exc:
            raise _err("cannot replace", dst, exc) from exc

    async def link(self, src: str, dst: str) -> None:
        try:
            os.link(src, dst, follow_symlinks=False)
        except OSError as exc:
            raise _err("cannot link", dst, exc) from exc

    async def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _err("cannot remove", path, exc) from exc

    async def rmdir(self, path: str) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        for d in paths:
            with contextlib.suppress(OSError):
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except OSError as exc:
            raise PermanentError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from exc
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise TransientError(f"{argv[0]!r} did not finish within {timeout:g}s") from None
        return CommandResult(tuple(argv), proc.returncode or 0, out.decode(errors="replace"))

    async def resolve_ids(
        self, owner: str | int | None, group: str | int | None
    ) -> tuple[int, int]:
        uid = gid = -1
        try:
            if isinstance(owner, int):
                uid = owner
            elif owner:
                uid = int(owner) if owner.isdigit() else pwd.getpwnam(owner).pw_uid
            if isinstance(group, int):
                gid = group
            elif group:
                gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise PermanentError(
                f"owner {owner!r} or group {group!r} does not exist here"
            ) from None
        return uid, gid

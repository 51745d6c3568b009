"""Batched file durability for deploys (the :class:`certctl.connectors.FileSyncer`).

Targets write temp files, ask the syncer to make them durable, rename them over the
live files, then ask the syncer to make the renames durable (directory fsync). With
many deploys running concurrently, syncing every file on its own costs one disk flush
each; :class:`BatchSyncer` in ``batch`` mode instead groups every request that arrives
while a sync is in flight into the next one (like :mod:`certctl.apply.groupwriter`
does for state writes) and makes the whole group durable with ONE ``syncfs(2)`` per
filesystem, plus one ``fsync`` per distinct directory.

Modes:

* ``batch`` (default): grouped ``syncfs`` (falls back to ``fsync`` per file where
  ``syncfs`` is not available), directories fsynced once per group.
* ``each``: ``fsync`` of every file (and directory) on its own.
* ``none``: no-op. Only for tests and benchmarks that do not measure durability.

Blocking calls run in a worker thread (``asyncio.to_thread``); a caller returns only
once its own paths are durable. A failed sync raises
:class:`certctl.errors.PermanentError` for the callers whose paths were in it (after
an ``EIO`` from fsync the page cache cannot be trusted, so retrying is not safe).
Nothing here is undone: syncing is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from certctl.errors import PermanentError

MODES = ("batch", "each", "none")


@dataclass
class _Request:
    files: Sequence[str]
    dirs: Sequence[str]
    future: asyncio.Future[None]


@dataclass
class _GroupResult:
    errors: dict[str, OSError] = field(default_factory=dict)
    syncfs_calls: int = 0


def _load_syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(int fd)`` through ctypes, or None where it does not exist."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int

    def call(fd: int) -> int:
        rc = int(fn(fd))
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return rc

    return call


class BatchSyncer:
    """Implements :class:`certctl.connectors.FileSyncer`; see the module docstring."""

    def __init__(self, mode: str = "batch") -> None:
        if mode not in MODES:
            raise ValueError(f"unknown sync mode {mode!r} (use one of {', '.join(MODES)})")
        self.mode = mode
        self._syncfs_fn = _load_syncfs() if mode == "batch" else None
        self._pending: list[_Request] = []
        self._flusher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counters for tests and benchmarks.
        self.groups = 0
        self.syncfs_calls = 0

    # ------------------------------------------------------------- FileSyncer
    async def sync_files(self, paths: Sequence[str]) -> None:
        """Return once the content of every file in ``paths`` is durable."""
        await self._sync(list(paths), [])

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        """Return once the entries (renames, creations) of each directory are durable."""
        await self._sync([], list(paths))

    # -------------------------------------------------------------- internals
    async def _sync(self, files: list[str], dirs: list[str]) -> None:
        if self.mode == "none" or not (files or dirs):
            return
        if self.mode == "each":
            result = await asyncio.to_thread(self._fsync_each, files, dirs)
            _raise_for(result.errors, files, dirs)
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new asyncio.run(): forget the old loop's task
            self._loop, self._flusher, self._pending = loop, None, []
        fut: asyncio.Future[None] = loop.create_future()
        self._pending.append(_Request(files, dirs, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        while self._pending:
            # Let every runnable task add its paths before the group is cut.
            await asyncio.sleep(0)
            group, self._pending = self._pending, []
            files = list(dict.fromkeys(p for r in group for p in r.files))
            dirs = list(dict.fromkeys(p for r in group for p in r.dirs))
            try:
                result = await asyncio.to_thread(self._sync_group, files, dirs)
            except BaseException as exc:  # never leave a caller waiting forever
                for r in group:
                    if r.future.done():
                        continue
                    if isinstance(exc, Exception):
                        r.future.set_exception(PermanentError(f"file sync failed: {exc!r}"))
                    else:
                        r.future.cancel()
                if not isinstance(exc, Exception):
                    raise
                continue
            self.groups += 1
            self.syncfs_calls += result.syncfs_calls
            for r in group:
                if r.future.done():
                    continue
                try:
                    _raise_for(result.errors, r.files, r.dirs)
                except PermanentError as err:
                    r.future.set_exception(err)
                else:
                    r.future.set_result(None)

    def _sync_group(self, files: list[str], dirs: list[str]) -> _GroupResult:
        """Thread body: one syncfs per filesystem for ``files``, fsync each of ``dirs``."""
        result = _GroupResult()
        if files:
            if self._syncfs_fn is None:
                result.errors.update(_fsync_paths(files))
            else:
                by_dev: dict[int, list[str]] = {}
                for path in files:
                    try:
                        by_dev.setdefault(os.stat(path).st_dev, []).append(path)
                    except OSError as exc:
                        result.errors[path] = exc
                for members in by_dev.values():
                    try:
                        self._syncfs_path(members[0])
                        result.syncfs_calls += 1
                    except OSError as exc:
                        for p in members:
                            result.errors[p] = exc
        result.errors.update(_fsync_paths(dirs))
        return result

    def _syncfs_path(self, path: str) -> None:
        """Make the whole filesystem holding ``path`` durable (one ``syncfs(2)``)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert self._syncfs_fn is not None
            self._syncfs_fn(fd)
        finally:
            os.close(fd)

    def _fsync_each(self, files: list[str], dirs: list[str]) -> _GroupResult:
        result = _GroupResult()
        result.errors.update(_fsync_paths(files))
        result.errors.update(_fsync_paths(dict.fromkeys(dirs)))
        return result


def _fsync_paths(paths: Sequence[str] | dict[str, None]) -> dict[str, OSError]:
    errors: dict[str, OSError] = {}
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            errors[path] = exc
            continue
        try:
            os.fsync(fd)
        except OSError as exc:
            errors[path] = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    return errors


def _raise_for(errors: dict[str, OSError], files: Sequence[str], dirs: Sequence[str]) -> None:
    if not errors:
        return
    for path in (*files, *dirs):
        exc = errors.get(path)
        if exc is not None:
            raise PermanentError(f"cannot make {path} durable: {exc.strerror or exc}") from exc

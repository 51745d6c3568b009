"""``certctl discover files``: walk directories (locally, or over SSH on inventory
hosts) and record every certificate found.

Local walk (:func:`scan_local`): an explicit-stack :func:`os.scandir` walk. Regular
files up to ``max_size`` bytes are candidates; each is opened non-blocking (a FIFO
swapped in never hangs the walk), its first 4 KiB sniffed (:func:`parse.sniff`) and
only a candidate is read whole and parsed. Directory symlinks are not followed unless
``follow_symlinks``; every directory entered is remembered by (device, inode), so a
symlink loop is reported once, never walked twice. File symlinks are followed (a
self-referencing or dangling one is reported). Oversized files, symlink loops and
unreadable files or directories are reported as :class:`Problem` and the walk goes on.

Parsing stays in this process: one core reads and parses some 5,000 small
certificate files a second (measured), well above the 2,000/s target, so no
process pool (and no pickling of findings) is needed.

Key matching: the public-key digest of every unencrypted private key (PEM or DER)
is collected per directory; a finding whose leaf has the same public key gets that
key file's path as ``key_path``. Key bytes never leave :mod:`certctl.discovery.parse`.

Remote walk (:func:`scan_remote`): the same over :class:`~certctl.transport.base.HostIO`
(SFTP: one READDIR exchange per directory gives names and metadata; candidates are
read whole, being size-capped), ``concurrency`` operations at a time per host (on
top of the transport's own per-host session cap). Symlinks are not followed there.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import os
import posixpath
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from certctl.discovery import parse
from certctl.discovery.model import Finding, Problem
from certctl.errors import CertctlError
from certctl.transport.base import FileStat, HostIO

DEFAULT_MAX_SIZE = 1 << 20
DEFAULT_EXCLUDES = ("/proc", "/sys", "/dev")
_BATCH = 256


@dataclass(frozen=True)
class Options:
    max_size: int = DEFAULT_MAX_SIZE
    follow_symlinks: bool = False
    passwords: tuple[str, ...] = field(default=(), repr=False)
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES


@dataclass
class ScanResult:
    findings: list[Finding] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    files: int = 0  # regular files looked at
    skipped: int = 0  # special files, unfollowed directory symlinks, empty files

    def extend(self, other: ScanResult) -> None:
        self.findings += other.findings
        self.problems += other.problems
        self.files += other.files
        self.skipped += other.skipped


# ------------------------------------------------------------------ one file


@dataclass
class _FileResult:
    path: str
    findings: list[tuple[Finding, str | None]] = field(default_factory=list)
    key_ids: list[str] = field(default_factory=list)
    problem: str | None = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_text(path: str) -> str:
    """A path as text that can be stored and printed: bytes of a name that are not
    UTF-8 (kept by the OS layer as lone surrogates) and control characters (NUL,
    which PostgreSQL text refuses; terminal escapes) become ``\\xNN`` escapes."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        path = path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", path)


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"unreadable: {exc.strerror or exc}"


def _read_local(path: str, max_size: int) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a candidate, (None, None) for a non-candidate, or the problem."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        return None, _describe(exc)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        if st.st_size > max_size:
            return None, f"too large ({st.st_size} bytes > {max_size})"
        head = os.read(fd, parse.HEAD)
        if not head or parse.sniff(head) is None:
            return None, None
        parts = [head]
        if len(head) == parse.HEAD:
            while True:
                chunk = os.read(fd, max_size + 1 - sum(map(len, parts)) or 1)
                if not chunk:
                    break
                parts.append(chunk)
                if sum(map(len, parts)) > max_size:
                    return None, f"too large (more than {max_size} bytes)"
        return b"".join(parts), None
    except OSError as exc:
        return None, _describe(exc)
    finally:
        os.close(fd)


def _parse_bytes(
    path: str, data: bytes, host: str, passwords: Sequence[str], seen_at: datetime
) -> _FileResult:
    out = _FileResult(path)
    try:
        parsed = parse.parse(data, passwords)
        out.key_ids = parsed.key_ids
        out.problem = parsed.problem
        for suffix, fmt, chain, in_store in parsed.chains:
            out.findings.append(
                parse.make_finding(
                    chain,
                    source="file",
                    host=host,
                    location=path_text(path + (suffix or "")),
                    sni=None,
                    fmt=fmt,
                    seen_at=seen_at,
                    key_in_store=in_store,
                )
            )
    except Exception as exc:  # hostile content must not end the scan
        out.problem = f"unparsable: {type(exc).__name__}"
    return out


def _scan_batch(
    paths: Sequence[str], host: str, max_size: int, passwords: Sequence[str], seen_at: datetime
) -> list[_FileResult]:
    out: list[_FileResult] = []
    for path in paths:
        data, problem = _read_local(path, max_size)
        if data is not None:
            out.append(_parse_bytes(path, data, host, passwords, seen_at))
        elif problem is not None:
            out.append(_FileResult(path, problem=problem))
    return out


# ------------------------------------------------------------------ local walk


def _excluded(path: str, excludes: Sequence[str]) -> bool:
    return any(path == e or fnmatch.fnmatchcase(path, e) for e in excludes)


def walk_local(roots: Sequence[str], opts: Options, result: ScanResult) -> Iterator[str]:
    """Yield candidate regular files (size-capped) under ``roots``; problems and
    counts go into ``result``."""
    visited: set[tuple[int, int]] = set()
    root_files: set[str] = set()  # files given as roots: not yielded again by a walk
    stack: list[str] = []
    for root in roots:
        path = os.path.abspath(root)
        try:
            st = os.stat(path)
        except OSError as exc:
            reason = "no such file or directory" if exc.errno == errno.ENOENT else _describe(exc)
            result.problems.append(Problem("local", path, reason))
            continue
        if (st.st_dev, st.st_ino) in visited:
            continue  # a root given twice (or a file root inside a root given before)
        if stat.S_ISDIR(st.st_mode):
            visited.add((st.st_dev, st.st_ino))
            stack.append(path)
        elif stat.S_ISREG(st.st_mode):
            visited.add((st.st_dev, st.st_ino))
            root_files.add(path)
            result.files += 1
            if st.st_size > opts.max_size:
                result.problems.append(
                    Problem("local", path, f"too large ({st.st_size} bytes > {opts.max_size})")
                )
            else:
                yield path
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError as exc:
            result.problems.append(Problem("local", d, f"directory {_describe(exc)}"))
            continue
        subdirs: list[str] = []
        with it:
            for entry in it:
                path = entry.path
                if opts.excludes and _excluded(path, opts.excludes):
                    continue
                try:
                    if entry.is_symlink():
                        try:
                            st = os.stat(path)
                        except OSError as exc:
                            if exc.errno == errno.ENOENT:
                                result.problems.append(Problem("local", path, "dangling symlink"))
                            else:
                                result.problems.append(Problem("local", path, _describe(exc)))
                            continue
                        if stat.S_ISDIR(st.st_mode):
                            if not opts.follow_symlinks:
                                result.skipped += 1
                                continue
                            if opts.excludes and _excluded(os.path.realpath(path), opts.excludes):
                                result.skipped += 1  # /proc through a link is still /proc
                                continue
                            ident = (st.st_dev, st.st_ino)
                            if ident in visited:
                                result.problems.append(
                                    Problem(
                                        "local",
                                        path,
                                        "symlink loop: leads back to a directory already walked",
                                    )
                                )
                                continue
                            visited.add(ident)
                            subdirs.append(path)
                            continue
                    elif entry.is_dir(follow_symlinks=False):
                        st = entry.stat(follow_symlinks=False)
                        ident = (st.st_dev, st.st_ino)
                        if ident not in visited:  # a bind mount seen twice
                            visited.add(ident)
                            subdirs.append(path)
                        continue
                    else:
                        st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    result.problems.append(Problem("local", path, _describe(exc)))
                    continue
                if path in root_files:
                    continue
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    result.skipped += 1
                    continue
                result.files += 1
                if st.st_size > opts.max_size:
                    result.problems.append(
                        Problem("local", path, f"too large ({st.st_size} bytes > {opts.max_size})")
                    )
                    continue
                yield path
        stack.extend(sorted(subdirs, reverse=True))


def scan_local(roots: Sequence[str], opts: Options, seen_at: datetime) -> ScanResult:
    result = ScanResult()
    results: list[_FileResult] = []
    batch: list[str] = []
    for path in walk_local(roots, opts, result):
        batch.append(path)
        if len(batch) >= _BATCH:
            results += _scan_batch(batch, "local", opts.max_size, opts.passwords, seen_at)
            batch = []
    results += _scan_batch(batch, "local", opts.max_size, opts.passwords, seen_at)
    _collect(results, "local", result, posixpath.dirname)
    return result


def _collect(results: Sequence[_FileResult], host: str, into: ScanResult, dirname: Any) -> None:
    """Problems out, keys matched to certificates of the same directory, findings in
    location order."""
    keys: dict[tuple[str, str], str] = {}
    for r in sorted(results, key=lambda r: r.path):
        for key_id in r.key_ids:
            keys.setdefault((dirname(r.path), key_id), path_text(r.path))
    findings: list[Finding] = []
    for r in results:
        if r.problem is not None:
            into.problems.append(Problem(host, r.path, r.problem))
        for finding, leaf_key in r.findings:
            if leaf_key is not None:
                key_path = keys.get((dirname(r.path), leaf_key))
                if key_path is not None:
                    finding = replace(finding, key_path=key_path)
            findings.append(finding)
    into.findings += sorted(findings, key=lambda f: f.location)
    into.problems = sorted(
        (replace(p, location=path_text(p.location)) for p in into.problems),
        key=lambda p: (p.host, p.location),
    )


# ------------------------------------------------------------------ remote walk


async def scan_remote(
    io: HostIO,
    roots: Sequence[str],
    opts: Options,
    seen_at: datetime,
    *,
    concurrency: int = 8,
) -> ScanResult:
    """Walk ``roots`` on one host over its :class:`HostIO`, a directory level at a
    time. A transport with ``scandir`` (SSH: names and metadata from the SFTP READDIR
    replies) costs one exchange per directory; otherwise each entry is ``lstat``-ed.
    A failure on one path is a problem for that path; the walk goes on."""
    host = io.label
    result = ScanResult()
    results: list[_FileResult] = []
    sem = asyncio.Semaphore(max(1, concurrency))
    scandir = getattr(io, "scandir", None)

    async def lstat(path: str) -> tuple[str, FileStat | CertctlError | None]:
        async with sem:
            try:
                return path, await io.lstat(path)
            except CertctlError as exc:
                return path, exc

    async def read(path: str) -> None:
        async with sem:
            try:
                data = await io.read(path)
            except CertctlError as exc:
                results.append(_FileResult(path, problem=f"unreadable: {exc}"))
                return
        if len(data) > opts.max_size:
            results.append(_FileResult(path, problem=f"too large ({len(data)} bytes)"))
        elif parse.sniff(data[: parse.HEAD]) is not None:
            results.append(_parse_bytes(path, data, host, opts.passwords, seen_at))

    async def visit(entries: Sequence[tuple[str, FileStat | CertctlError | None]]) -> list[str]:
        """Read the candidate files among ``entries``; return the directories."""
        dirs: list[str] = []
        reads = []
        for path, st in entries:
            if opts.excludes and _excluded(path, opts.excludes):
                continue
            if isinstance(st, CertctlError):
                result.problems.append(Problem(host, path, f"unreadable: {st}"))
            elif st is None:
                result.problems.append(Problem(host, path, "no such file or directory"))
            elif st.is_dir:
                dirs.append(path)
            elif st.is_link or not st.is_reg or st.size == 0:
                result.skipped += 1
            else:
                result.files += 1
                if st.size > opts.max_size:
                    result.problems.append(
                        Problem(host, path, f"too large ({st.size} bytes > {opts.max_size})")
                    )
                else:
                    reads.append(read(path))
        await asyncio.gather(*reads)
        return dirs

    async def listing(d: str) -> list[tuple[str, FileStat | CertctlError | None]]:
        try:
            async with sem:
                if scandir is not None:
                    items: list[tuple[str, FileStat]] = await scandir(d)
                    return [(posixpath.join(d, n), st) for n, st in sorted(items)]
                names = sorted(await io.listdir(d))
        except CertctlError as exc:
            result.problems.append(Problem(host, d, f"directory unreadable: {exc}"))
            return []
        return list(await asyncio.gather(*(lstat(posixpath.join(d, n)) for n in names)))

    tops = [posixpath.normpath(r) for r in roots]
    for r in tops:
        if not r.startswith("/"):
            result.problems.append(Problem(host, r, "remote paths must be absolute"))
    top_entries = await asyncio.gather(*(lstat(r) for r in tops if r.startswith("/")))
    dirs = await visit(top_entries)
    while dirs:
        listed = await asyncio.gather(*(listing(d) for d in dirs))
        dirs = await visit([e for entries in listed for e in entries])
    _collect(results, host, result, posixpath.dirname)
    return result


def host_connection(inv: Any, name: str) -> Mapping[str, Any]:
    """The connection mapping (``name``, ``address``, merged ``vars``) of inventory host
    ``name``: a placement's on that host when there is one (the loader merged its
    variables), else the host's groups' vars (by name) under its own."""
    for cert in inv.certificates.values():
        for p in cert.placements:
            if p.host == name and p.connection:
                return dict(p.connection)
    host = inv.hosts[name]
    merged: dict[str, Any] = {}
    for gname in sorted(inv.groups):
        g = inv.groups[gname]
        if name in g.hosts:
            merged.update(g.vars)
    merged.update(host.vars)
    out: dict[str, Any] = {"name": name, "vars": merged}
    if host.address:
        out["address"] = host.address
    return out

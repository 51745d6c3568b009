"""SSH transport (asyncssh): settings from host vars, host-key policy, a connection
pool, and :class:`SSHHost`, the :class:`~certctl.transport.base.HostIO` over SFTP.

Settings come from a placement's ``connection`` (the host's ``address`` and merged
``vars``): a nested ``ssh:`` mapping and/or Ansible-style flat ``ssh_<key>`` vars
(flat ones win, so a host can override one key of a group's ``ssh:`` mapping). Keys:

``address`` (default: the host's address, else its name), ``port`` (22), ``user``,
``key_file`` (a private key file on the controller; without it the ssh-agent and the
default keys are used), ``agent`` (use ``$SSH_AUTH_SOCK`` also when ``key_file`` is
set), ``known_hosts`` (default ``~/.ssh/known_hosts``), ``host_key_policy``
(``strict``, the default: the key must be in known_hosts; ``accept-new``: a host with
no entry yet is added, a *changed* key is still refused), ``host_key_fingerprints``
(pinned ``SHA256:...`` fingerprints; when given, only those keys are accepted),
``sudo`` (commands run as ``sudo -n -- argv``), ``max_sessions`` (concurrent sessions
on that host, default 4), ``connect_timeout`` (seconds, default 15).

One connection per host is opened lazily and reused by every action on that host in
the same event loop; a per-host and a global semaphore cap concurrent sessions.
Library failures become :class:`TransientError` (connection refused, dropped,
timed out) or :class:`PermanentError` (authentication, host key, SFTP refusals).
Commands are argument lists joined with :func:`shlex.join`, so every value reaches
the remote program as one literal argument.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from certctl.errors import CertctlError, PermanentError, TransientError, UnsafeValueError
from certctl.transport.base import CommandResult, FileStat

KEYS = (
    "address",
    "port",
    "user",
    "key_file",
    "agent",
    "known_hosts",
    "host_key_policy",
    "host_key_fingerprints",
    "sudo",
    "max_sessions",
    "connect_timeout",
)
POLICIES = ("strict", "accept-new")
_HOSTNAME = re.compile(r"^[A-Za-z0-9_.:\[\]%-]+$")
_USER = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.@-]*$")
_FP = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
DEFAULT_GLOBAL_SESSIONS = 64


@dataclass(frozen=True)
class SSHSettings:
    host: str  # inventory host name, for messages
    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    agent: bool = False
    known_hosts: str | None = None
    host_key_policy: str = "strict"
    fingerprints: tuple[str, ...] = ()
    sudo: bool = False
    max_sessions: int = 4
    connect_timeout: float = 15.0

    @property
    def where(self) -> str:
        return f"host {self.host!r} ({self.address}:{self.port})"

    def known_hosts_path(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")


def settings_for(connection: Mapping[str, Any]) -> SSHSettings:
    """Parse a placement's connection (``name``, ``address``, ``vars``).

    Raises :class:`UnsafeValueError` naming the offending key.
    """
    name = str(connection.get("name") or "")
    variables = connection.get("vars") or {}
    merged: dict[str, Any] = {}
    nested = variables.get("ssh")
    if nested is not None:
        if not isinstance(nested, Mapping):
            raise UnsafeValueError("ssh vars: 'ssh' must be a mapping")
        unknown = sorted(set(nested) - set(KEYS))
        if unknown:
            raise UnsafeValueError(
                f"ssh vars: unknown key(s) {', '.join(unknown)} (known: {', '.join(KEYS)})"
            )
        merged.update(nested)
    for key in KEYS:
        if f"ssh_{key}" in variables:
            merged[key] = variables[f"ssh_{key}"]

    address = merged.get("address", connection.get("address") or name)
    if not isinstance(address, str) or not address or not _HOSTNAME.match(address):
        raise UnsafeValueError(f"ssh address {address!r} is not a host name or IP address")
    if address.startswith("-"):
        raise UnsafeValueError(f"ssh address {address!r} may not start with '-'")
    port = merged.get("port", 22)
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise UnsafeValueError(f"ssh port must be 1..65535, not {port!r}")
    user = merged.get("user")
    if user is not None and (not isinstance(user, str) or not _USER.match(user)):
        raise UnsafeValueError(f"ssh user {user!r} is not a valid user name")
    key_file = _opt_path(merged.get("key_file"), "key_file")
    known_hosts = _opt_path(merged.get("known_hosts"), "known_hosts")
    policy = merged.get("host_key_policy", "strict")
    if policy not in POLICIES:
        raise UnsafeValueError(
            f"ssh host_key_policy must be one of {', '.join(POLICIES)}, not {policy!r}"
        )
    fps = merged.get("host_key_fingerprints", ())
    if isinstance(fps, str):
        fps = [fps]
    if not isinstance(fps, list | tuple) or not all(
        isinstance(f, str) and _FP.match(f) for f in fps
    ):
        raise UnsafeValueError(
            "ssh host_key_fingerprints must be a list of 'SHA256:<base64>' fingerprints "
            "(as printed by ssh-keygen -lf)"
        )
    sessions = merged.get("max_sessions", 4)
    if isinstance(sessions, bool) or not isinstance(sessions, int) or not 0 < sessions <= 1000:
        raise UnsafeValueError(f"ssh max_sessions must be 1..1000, not {sessions!r}")
    timeout = merged.get("connect_timeout", 15)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise UnsafeValueError(f"ssh connect_timeout must be a positive number, not {timeout!r}")
    for flag in ("agent", "sudo"):
        if not isinstance(merged.get(flag, False), bool):
            raise UnsafeValueError(f"ssh {flag} must be true or false")
    return SSHSettings(
        host=name or address,
        address=address,
        port=port,
        user=user,
        key_file=key_file,
        agent=bool(merged.get("agent", False)),
        known_hosts=known_hosts,
        host_key_policy=policy,
        fingerprints=tuple(fps),
        sudo=bool(merged.get("sudo", False)),
        max_sessions=sessions,
        connect_timeout=float(timeout),
    )


def _opt_path(value: Any, key: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value or "\n" in value:
        raise UnsafeValueError(f"ssh {key} must be a file path")
    return value


# ------------------------------------------------------------------ host keys


class HostKeyChecker:
    """Decides whether a server's host key is trusted; remembers why it refused."""

    def __init__(self, settings: SSHSettings) -> None:
        self.s = settings
        self.refusal: str | None = None

    def check(self, key: asyncssh.SSHKey) -> bool:
        s = self.s
        fp = key.get_fingerprint("sha256")
        if s.fingerprints:
            if fp in s.fingerprints:
                return True
            self.refusal = (
                f"{s.where} presented host key {fp}, which is not one of the pinned "
                "host_key_fingerprints; refusing to connect"
            )
            return False
        path = s.known_hosts_path()
        trusted: Sequence[asyncssh.SSHKey] = ()
        if os.path.exists(path):
            try:
                trusted = asyncssh.read_known_hosts(path).match(s.address, s.address, s.port)[0]
            except (OSError, ValueError) as exc:
                self.refusal = f"{s.where}: cannot read known_hosts {path}: {exc}"
                return False
        if any(k == key for k in trusted):
            return True
        if trusted:
            self.refusal = (
                f"host key of {s.where} CHANGED: it now presents {fp}, which does not match "
                f"{path}; refusing to connect (if the change is expected, remove the old "
                "entry from known_hosts)"
            )
            return False
        if s.host_key_policy == "accept-new":
            try:
                _append_known_host(path, s, key)
            except OSError as exc:
                self.refusal = f"{s.where}: cannot record its new host key {fp} in {path}: {exc}"
                return False
            return True
        self.refusal = (
            f"unknown host key for {s.where}: {fp} is not in {path}; refusing to connect "
            "(add it to known_hosts, pin it with host_key_fingerprints, or set "
            "host_key_policy: accept-new)"
        )
        return False


def _append_known_host(path: str, s: SSHSettings, key: asyncssh.SSHKey) -> None:
    pattern = s.address if s.port == 22 else f"[{s.address}]:{s.port}"
    line = pattern.encode() + b" " + key.export_public_key("openssh").strip() + b"\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _trust_nothing(host: str, addr: str, port: int | None) -> tuple[list[Any], ...]:
    """asyncssh trusts no key by itself: every key goes to :class:`_Client`."""
    return ([], [], [])


class _Client(asyncssh.SSHClient):
    def __init__(self, checker: HostKeyChecker) -> None:
        self.checker = checker
        self.lost = False

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        return self.checker.check(key)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


# ------------------------------------------------------------------ errors

_SFTP_GONE = (asyncssh.SFTPConnectionLost, asyncssh.SFTPNoConnection)


def translate(exc: BaseException, s: SSHSettings, doing: str) -> CertctlError:
    """A certctl error for an asyncssh/OS failure (the caller raises it ``from exc``)."""
    if isinstance(exc, CertctlError):
        return exc
    if isinstance(exc, asyncssh.PermissionDenied):
        return PermanentError(f"{s.where}: authentication failed for user {s.user or '(default)'}")
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return PermanentError(f"{s.where}: host key not trusted")
    if isinstance(exc, _SFTP_GONE):
        return TransientError(f"{s.where}: connection lost while trying to {doing}")
    if isinstance(exc, asyncssh.SFTPError):
        return PermanentError(f"{s.where}: {doing}: {exc.reason}")
    if isinstance(exc, asyncssh.ProcessError | asyncssh.ChannelOpenError):
        return TransientError(f"{s.where}: {doing}: {exc}")
    if isinstance(exc, asyncssh.DisconnectError | asyncssh.ConnectionLost):
        return TransientError(f"{s.where}: connection lost while trying to {doing}: {exc}")
    if isinstance(exc, TimeoutError):
        return TransientError(f"{s.where}: timed out while trying to {doing}")
    if isinstance(exc, OSError):
        return TransientError(f"{s.where}: cannot {doing}: {exc.strerror or exc}")
    return PermanentError(f"{s.where}: {doing}: {type(exc).__name__}: {exc}")


def _stat(a: asyncssh.SFTPAttrs) -> FileStat:
    mtime_ns = (a.mtime or 0) * 1_000_000_000 + (a.mtime_ns or 0)
    return FileStat(a.permissions or 0, a.uid or 0, a.gid or 0, a.size or 0, mtime_ns)


# ------------------------------------------------------------------ pool


class SSHPool:
    """Connections of one event loop, one per host, with session caps."""

    def __init__(self, max_sessions: int = DEFAULT_GLOBAL_SESSIONS) -> None:
        self.loop = asyncio.get_running_loop()
        self._global = asyncio.Semaphore(max_sessions)
        self._hosts: dict[str, SSHHost] = {}
        self.connects = 0  # connections opened (tests and benchmarks read it)

    def host(self, settings: SSHSettings) -> SSHHost:
        h = self._hosts.get(settings.host)
        if h is None or h.s != settings:
            cls = SudoSSHHost if settings.sudo else SSHHost
            h = self._hosts[settings.host] = cls(settings, self)
        return h

    async def close(self) -> None:
        hosts, self._hosts = list(self._hosts.values()), {}
        await asyncio.gather(*(h.close() for h in hosts), return_exceptions=True)


class SSHHost:
    """:class:`~certctl.transport.base.HostIO` over one (re)connecting SSH connection."""

    def __init__(self, settings: SSHSettings, pool: SSHPool) -> None:
        self.s = settings
        self.label = settings.host
        self.pool = pool
        self._conn: asyncssh.SSHClientConnection | None = None
        self._client: _Client | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._connect_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(settings.max_sessions)
        self._ids: dict[tuple[str, str], int] = {}
        # A failed connect is not retried by this pool (one run): a dead host must not
        # cost connect_timeout once per placement.
        self._failed: CertctlError | None = None

    # -- connection
    async def _connect(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        async with self._connect_lock:
            if (
                self._conn is not None
                and self._sftp is not None
                and self._client is not None
                and not self._client.lost
            ):
                return self._conn, self._sftp
            await self._drop()
            if self._failed is not None:
                raise type(self._failed)(str(self._failed))
            s = self.s
            checker = HostKeyChecker(s)
            client = _Client(checker)
            agent: str | None = None
            if s.agent or s.key_file is None:
                agent = os.environ.get("SSH_AUTH_SOCK") or None
            options: dict[str, Any] = {}
            if s.key_file is not None:
                options["client_keys"] = [os.path.expanduser(s.key_file)]
            try:
                conn = await asyncssh.connect(
                    s.address,
                    s.port,
                    username=s.user,
                    known_hosts=_trust_nothing,
                    client_factory=lambda: client,
                    agent_path=agent,
                    connect_timeout=s.connect_timeout,
                    config=(),
                    keepalive_interval=15,
                    **options,
                )
            except asyncssh.HostKeyNotVerifiable as exc:
                self._failed = PermanentError(checker.refusal or f"{s.where}: host key not trusted")
                raise self._failed from exc
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                self._failed = translate(exc, s, "connect")
                raise self._failed from exc
            except asyncssh.KeyImportError as exc:
                self._failed = PermanentError(f"{s.where}: cannot load key_file {s.key_file}")
                raise self._failed from exc
            self.pool.connects += 1
            try:
                # Names that are not UTF-8 come back as lone surrogates (and go out as
                # the same bytes) instead of failing a whole directory listing.
                sftp = await conn.start_sftp_client(path_errors="surrogateescape")
            except (OSError, asyncssh.Error) as exc:
                conn.close()
                raise translate(exc, s, "start SFTP") from exc
            self._conn, self._client, self._sftp = conn, client, sftp
            return conn, sftp

    async def _drop(self) -> None:
        conn, self._conn, self._sftp, self._client = self._conn, None, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await conn.wait_closed()

    async def close(self) -> None:
        async with self._connect_lock:
            await self._drop()

    @contextlib.asynccontextmanager
    async def _session(self, doing: str) -> AsyncIterator[asyncssh.SFTPClient]:
        async with self.pool._global, self._slots:
            _, sftp = await self._connect()
            try:
                yield sftp
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                if not isinstance(exc, asyncssh.SFTPError) or isinstance(exc, _SFTP_GONE):
                    await self.close()  # reconnect next time
                raise translate(exc, self.s, doing) from exc

    # -- HostIO
    async def lstat(self, path: str) -> FileStat | None:
        async with self._session(f"stat {path}") as sftp:
            try:
                a = await sftp.lstat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
            return _stat(a)

    async def read(self, path: str) -> bytes:
        async with self._session(f"read {path}") as sftp, sftp.open(path, "rb") as f:
            data: bytes = await f.read()
            return data

    async def listdir(self, path: str) -> list[str]:
        async with self._session(f"list {path}") as sftp:
            try:
                names = await sftp.listdir(path)
            except asyncssh.SFTPNoSuchFile:
                return []
            return [str(n) for n in names if n not in (".", "..")]

    async def scandir(self, path: str) -> list[tuple[str, FileStat]]:
        """Names in a directory with their own (not followed) metadata, from the SFTP
        READDIR replies themselves: no round trip per entry. Empty when missing."""
        async with self._session(f"list {path}") as sftp:
            try:
                entries = await sftp.readdir(path)
            except asyncssh.SFTPNoSuchFile:
                return []
            return [
                (str(e.filename), _stat(e.attrs)) for e in entries if e.filename not in (".", "..")
            ]

    async def mkdir(self, path: str, mode: int) -> None:
        async with self._session(f"create {path}") as sftp:
            try:
                await sftp.mkdir(path, asyncssh.SFTPAttrs(permissions=mode))
            except asyncssh.SFTPError:
                attrs = await sftp.lstat(path)  # exists already? (SFTPv3 says "failure")
                if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                    raise
                return
            await sftp.chmod(path, mode)

    async def write_new(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> FileStat:
        flags = asyncssh.FXF_WRITE | asyncssh.FXF_CREAT | asyncssh.FXF_EXCL
        async with self._session(f"write {path}") as sftp:
            try:
                async with sftp.open(
                    path, flags, asyncssh.SFTPAttrs(permissions=0o600), encoding=None
                ) as f:
                    if uid != -1 or gid != -1:
                        await f.chown(uid, gid)
                    await f.chmod(mode)
                    await f.write(data)
                    await f.fsync()
                    a = await f.stat()
            except BaseException:
                with contextlib.suppress(Exception):
                    await sftp.remove(path)
                raise
            return _stat(a)

    async def sync_files(self, paths: Sequence[str]) -> None:
        """Nothing to do: :meth:`write_new` fsyncs each file (``fsync@openssh.com``)."""

    async def rename(self, src: str, dst: str) -> None:
        async with self._session(f"replace {dst}") as sftp:
            await sftp.posix_rename(src, dst)

    async def link(self, src: str, dst: str) -> None:
        async with self._session(f"link {dst}") as sftp:
            await sftp.link(src, dst)

    async def unlink(self, path: str) -> None:
        async with self._session(f"remove {path}") as sftp:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(path)

    async def rmdir(self, path: str) -> None:
        async with self._session(f"remove {path}") as sftp:
            with contextlib.suppress(asyncssh.SFTPError):
                await sftp.rmdir(path)

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        """fsync each directory: OpenSSH's SFTP server opens a directory read-only and
        ``fsync@openssh.com`` then syncs it. Elsewhere: ``sync -- dirs`` (coreutils).
        Best effort either way."""
        if not paths:
            return
        try:
            async with self._session("sync directories") as sftp:
                for d in paths:
                    async with sftp.open(d, "rb") as f:
                        await f.fsync()
        except (CertctlError, asyncssh.Error):
            with contextlib.suppress(CertctlError):
                await self._exec(["sync", "--", *paths], 30.0, sudo=False)

    async def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        return await self._exec(argv, timeout, sudo=self.s.sudo)

    async def _exec(self, argv: Sequence[str], timeout: float, *, sudo: bool) -> CommandResult:
        status, out, err = await self._call(argv, timeout, sudo=sudo)
        text = out.decode(errors="replace") + err.decode(errors="replace")
        return CommandResult(tuple(argv), status, text)

    async def _call(
        self, argv: Sequence[str], timeout: float, *, sudo: bool
    ) -> tuple[int, bytes, bytes]:
        """(exit status, stdout, stderr) of one argument list run on the host."""
        full = ["sudo", "-n", "--", *argv] if sudo else list(argv)
        line = shlex.join(full)
        async with self.pool._global, self._slots:
            conn, _ = await self._connect()
            try:
                proc = await conn.run(
                    line,
                    check=False,
                    stdin=asyncssh.DEVNULL,
                    encoding=None,
                    timeout=timeout,
                )
            except asyncssh.TimeoutError as exc:
                raise TransientError(
                    f"{self.s.where}: {argv[0]!r} did not finish within {timeout:g}s"
                ) from exc
            except (OSError, asyncssh.Error) as exc:
                await self.close()
                raise translate(exc, self.s, f"run {argv[0]!r}") from exc
        out = proc.stdout if isinstance(proc.stdout, bytes) else b""
        err = proc.stderr if isinstance(proc.stderr, bytes) else b""
        status = proc.exit_status if proc.exit_status is not None else -1
        return status, out, err

    async def resolve_ids(
        self, owner: str | int | None, group: str | int | None
    ) -> tuple[int, int]:
        return (
            await self._id("owner", owner, ["id", "-u", "--"]),
            await self._id("group", group, ["getent", "group", "--"]),
        )

    async def _id(self, kind: str, value: str | int | None, argv: list[str]) -> int:
        if value is None or value == "":
            return -1
        if isinstance(value, int):
            return value
        if value.isdigit():
            return int(value)
        hit = self._ids.get((kind, value))
        if hit is not None:
            return hit
        res = await self._exec([*argv, value], 30.0, sudo=False)
        text = res.output.strip()
        field = text if kind == "owner" else (text.split(":")[2] if text.count(":") >= 2 else "")
        if not res.ok or not field.isdigit():
            raise PermanentError(f"{kind} {value!r} does not exist on {self.s.where}")
        self._ids[(kind, value)] = int(field)
        return int(field)


class SudoSSHHost(SSHHost):
    """``sudo: true``: changes made as root through fixed coreutils commands.

    The login user cannot write root-owned files, so every change is one argument
    list run as ``sudo -n -- <tool> ... -- <paths>`` (no shell, no string building):
    ``install`` (copies a 0600 upload from the user's home into the destination
    directory with its final mode and owner), ``sync`` (fsync), ``mv -T`` (rename(2):
    atomic), ``ln -T``, ``rm -f``, ``mkdir -m``, ``rmdir``. Reads try SFTP first and
    fall back to ``sudo stat`` / ``cat`` / ``ls`` where the login user may not look.
    Paths are absolute and were checked at load (no metacharacters).
    """

    async def _sudo(self, argv: Sequence[str], doing: str, timeout: float = 60.0) -> bytes:
        status, out, err = await self._call(argv, timeout, sudo=True)
        if status != 0:
            msg = " ".join(err.decode(errors="replace").split())[:300]
            raise PermanentError(f"{self.s.where}: cannot {doing} (sudo {argv[0]}): {msg}")
        return out

    async def lstat(self, path: str) -> FileStat | None:
        try:
            return await SSHHost.lstat(self, path)
        except PermanentError as exc:
            if not _denied(exc):
                raise
        status, out, err = await self._call(
            ["stat", "-c", "%f %u %g %s %Y", "--", path], 60.0, sudo=True
        )
        if status != 0:
            if b"No such file" in err:
                return None
            msg = " ".join(err.decode(errors="replace").split())[:300]
            raise PermanentError(f"{self.s.where}: cannot stat {path}: {msg}")
        mode, uid, gid, size, mtime = out.decode().split()
        return FileStat(int(mode, 16), int(uid), int(gid), int(size), int(mtime) * 10**9)

    async def read(self, path: str) -> bytes:
        try:
            return await SSHHost.read(self, path)
        except PermanentError as exc:
            if not _denied(exc):
                raise
        return await self._sudo(["cat", "--", path], f"read {path}")

    async def listdir(self, path: str) -> list[str]:
        try:
            return await SSHHost.listdir(self, path)
        except PermanentError as exc:
            if not _denied(exc):
                raise
        status, out, _ = await self._call(["ls", "-A", "-1", "--", path], 60.0, sudo=True)
        return out.decode(errors="replace").splitlines() if status == 0 else []

    async def scandir(self, path: str) -> list[tuple[str, FileStat]]:
        names = await self.listdir(path)  # through sudo where SFTP is refused
        stats = await asyncio.gather(*(self.lstat(f"{path.rstrip('/')}/{n}") for n in names))
        return [(n, st) for n, st in zip(names, stats, strict=True) if st is not None]

    async def mkdir(self, path: str, mode: int) -> None:
        if await self.lstat(path) is None:
            await self._sudo(["mkdir", "-m", f"{mode:o}", "--", path], f"create {path}")

    async def write_new(self, path: str, data: bytes, mode: int, uid: int, gid: int) -> FileStat:
        # In the login user's home; the controller's pid names whose upload it is.
        upload = f".certctl-upload-{os.getpid()}-{os.urandom(8).hex()}"
        await SSHHost.write_new(self, upload, data, 0o600, -1, -1)
        try:
            argv = ["install", "-m", f"{mode:o}"]
            if uid != -1:
                argv += ["-o", str(uid)]
            if gid != -1:
                argv += ["-g", str(gid)]
            await self._sudo([*argv, "-T", "--", upload, path], f"write {path}")
        finally:
            await SSHHost.unlink(self, upload)
        st = await self.lstat(path)
        if st is None:
            raise PermanentError(f"{self.s.where}: {path} vanished after it was written")
        return st

    async def sync_files(self, paths: Sequence[str]) -> None:
        """``install`` does not fsync: one ``sync -- files`` for a stage's temps."""
        if paths:
            await self._sudo(["sync", "--", *paths], "sync the new files")

    async def rename(self, src: str, dst: str) -> None:
        await self._sudo(["mv", "-f", "-T", "--", src, dst], f"replace {dst}")

    async def link(self, src: str, dst: str) -> None:
        await self._sudo(["ln", "-T", "--", src, dst], f"link {dst}")

    async def unlink(self, path: str) -> None:
        if await self.lstat(path) is not None:
            await self._sudo(["rm", "-f", "--", path], f"remove {path}")

    async def rmdir(self, path: str) -> None:
        await self._call(["rmdir", "--", path], 60.0, sudo=True)

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        if paths:
            with contextlib.suppress(CertctlError):
                await self._call(["sync", "--", *paths], 60.0, sudo=True)


def _denied(exc: BaseException) -> bool:
    return isinstance(exc.__cause__, asyncssh.SFTPPermissionDenied)

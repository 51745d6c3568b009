"""Service targets: files on a host (over SSH, or on this machine), then validate,
reload, and verify the live endpoint; roll back on failure.

One mechanism, :class:`ServiceTarget`, type ``ssh`` (generic); the presets in
:mod:`.presets` (``nginx``, ``haproxy``, ``apache``, ``postfix``, ``caddy``...) are this class with
other defaults. A placement with a host (``hosts:`` on the target) is reached over
SSH with the host's ``ssh`` vars (:mod:`certctl.transport.ssh`); one without a host
deploys on this machine through the same code (:class:`certctl.transport.local.LocalHost`).

Configuration: the file layout of the ``file`` target (``root``, ``cert_path``,
``chain_path``, ``fullchain_path``, ``key_path``, ``combined_path``, ``pkcs12_path``,
``owner``, ``group``, ``mode``, ``key_mode``, ``backups``; the same confinement code),
plus ``validate`` and ``reload`` (argument lists; ``[]`` disables a preset's),
``command_timeout`` (seconds), ``verify: {endpoint: "host:port", sni: name,
timeout: seconds}`` and ``on_verify_failure: rollback | keep``. On a host, ``root``
must be absolute. Paths may only hold letters, digits and ``._-/@+=,:%``; values with
shell metacharacters, spaces, newlines or NUL are refused when the inventory loads.

Deploy steps (the :class:`~certctl.connectors.Target` contract):

* **stage** creates missing directories below ``root`` (never through a symlink),
  removes stale temps a killed run left, and uploads every file whose content, mode or
  owner differs to ``.<name>.certctl-<random>.tmp`` in the destination directory
  (exclusive create, owner/group and mode set, fsync). Unchanged files are left alone.
* **commit** (serialised per host) keeps ``backups`` copies (``<name>.bak.1`` newest,
  a hard link), renames the temps over the live files, then -- when a file changed, or
  ``verify`` is configured -- runs ``validate`` and ``reload``. A failure raises; the
  executor then rolls back.
* **verify** reads every file back and compares hashes; with ``verify.endpoint`` it
  probes the endpoint (TLS, SNI) until it serves the deployed certificate's SHA-256
  fingerprint or ``verify.timeout`` passes.
* **rollback** (idempotent) removes temps, restores the replaced files from their
  backups (or from memory when ``backups`` is 0), removes files that did not exist,
  and runs ``reload`` again if a reload had been attempted. With ``on_verify_failure:
  keep`` a failed endpoint verification leaves the new files in place (the deployment
  is still recorded as failed).
* **observe** reads back each placement's files (one connection per host, all hosts
  in parallel) and reports MISSING, DIFFERS (another certificate, or "content on
  target differs" from the recorded hashes, or wrong mode, or -- with ``verify`` --
  the live endpoint answering with another certificate) or MATCH. An endpoint that
  does not answer is not counted against the files.

Commands run as argument lists: locally without a shell, remotely as one
:func:`shlex.join`-quoted line, so ``$(id)`` in an argument stays a literal argument.
Command output in errors is trimmed and never includes file contents.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import os
import re
import secrets
import ssl
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from certctl import pki
from certctl.connectors import Material, ObserveItem, Staged, Target
from certctl.errors import CertctlError, PermanentError, UnsafeValueError
from certctl.model import FileRecord, Placement, SecretBytes, TargetObservation, TargetState
from certctl.transport.base import CommandResult, FileStat, HostIO
from certctl.transport.local import LocalHost
from certctl.transport.ssh import SSHPool, settings_for
from certctl_connectors.targets import file as filet

T = TypeVar("T")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/@+=,:%-]+$")
OUTPUT_MAX = 800
_ARGV_SCHEMA = {
    "type": "array",
    "maxItems": 64,
    "items": {"type": ["string", "integer"], "maxLength": 4096},
}


def _schema(type_name: str) -> dict[str, Any]:
    base = dict(filet.FileTarget.config_schema)
    props = dict(base["properties"])
    props["type"] = {"const": type_name}
    props["validate"] = _ARGV_SCHEMA
    props["reload"] = _ARGV_SCHEMA
    props["command_timeout"] = {"type": "number", "exclusiveMinimum": 0, "maximum": 3600}
    props["verify"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["endpoint"],
        "properties": {
            "endpoint": {"type": "string", "minLength": 3, "maxLength": 300},
            "sni": {"type": "string", "maxLength": 253},
            "timeout": {"type": "number", "exclusiveMinimum": 0, "maximum": 600},
        },
    }
    props["on_verify_failure"] = {"enum": ["rollback", "keep"]}
    base["properties"] = props
    base["title"] = f"{type_name} target"
    return base


@dataclass(slots=True)
class _Op:
    file: filet._File
    sha256: str
    size: int
    mtime_ns: int
    tmp: str | None = None
    existed: bool = False
    old: SecretBytes | None = field(default=None, repr=False)
    old_stat: tuple[int, int, int] | None = None
    backup: bool = False
    dropped: tuple[SecretBytes, tuple[int, int, int]] | None = field(default=None, repr=False)
    replaced: bool = False
    restored: bool = False


@dataclass
class _Stage:
    host: HostIO
    layout: filet._Layout
    ids: tuple[int, int]
    ops: list[_Op]
    new_dirs: list[str]
    committed: bool = False
    rolled_back: bool = False
    reload_attempted: bool = False
    keep: bool = False
    records: dict[str, FileRecord] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<service stage of {len(self.ops)} files on {self.host.label}>"


_SHARED = "certctl_connectors.targets.ssh.runtime"


class _Runtime:
    """What one event loop needs: the SSH pool and the per-host commit locks."""

    def __init__(self, max_sessions: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.pool = SSHPool(max_sessions)
        self.locks: dict[str, asyncio.Lock] = {}
        self.local = LocalHost()

    def lock(self, label: str) -> asyncio.Lock:
        lk = self.locks.get(label)
        if lk is None:
            lk = self.locks[label] = asyncio.Lock()
        return lk


class ServiceTarget(Target):
    """Files + validate + reload + verify, on this machine or over SSH."""

    type_name = "ssh"
    config_schema: ClassVar[Mapping[str, Any]] = _schema("ssh")
    #: Preset defaults (argument lists); a placement's own ``validate``/``reload`` win.
    default_validate: ClassVar[tuple[str, ...]] = ()
    default_reload: ClassVar[tuple[str, ...]] = ()
    #: File roles a preset needs: each inner tuple needs at least one of its roles.
    required_roles: ClassVar[tuple[tuple[str, ...], ...]] = ()

    # ------------------------------------------------------------ validation
    @classmethod
    def check_placement(cls, placement: Placement, inventory_root: Path) -> list[str]:
        try:
            cls._check(placement, inventory_root)
        except CertctlError as exc:
            return [str(exc)]
        return []

    @classmethod
    def _check(cls, placement: Placement, inventory_root: Path) -> None:
        config = placement.config
        root = config.get("root")
        for key in ("root", *filet.PATH_KEYS.values()):
            value = config.get(key)
            if isinstance(value, str) and not SAFE_PATH.match(value):
                raise UnsafeValueError(
                    f"{key} {value!r} contains a character that is not allowed in a "
                    "deployment path (shell metacharacters, spaces, newlines and NUL are "
                    "refused; allowed: letters, digits and ._-/@+=,:%)"
                )
        remote = placement.host is not None
        if remote and isinstance(root, str) and not root.startswith("/"):
            raise UnsafeValueError(f"root {root!r} must be an absolute path on the host")
        layout = filet._layout(config, "/" if remote else str(inventory_root), None)
        roles = {f.role for f in layout.files}
        for need in cls.required_roles:
            if not roles & set(need):
                keys = " or ".join(filet.PATH_KEYS[r] for r in need)
                raise UnsafeValueError(f"a {cls.type_name} target needs {keys}")
        for key in ("validate", "reload"):
            _argv(config, key, ())
        if "verify" in config:
            _endpoint(config["verify"].get("endpoint"))
        if remote:
            settings_for(placement.connection)

    # ---------------------------------------------------------------- runtime
    def _runtime(self) -> _Runtime:
        """The running loop's pool and locks, shared by every service target of the
        engine (one connection per host, whichever targets deploy there)."""
        loop = asyncio.get_running_loop()
        rt = self.ctx.shared.get(_SHARED)
        if not isinstance(rt, _Runtime) or rt.loop is not loop:
            cap = self.ctx.settings.get("ssh_max_sessions", 64)
            rt = self.ctx.shared[_SHARED] = _Runtime(
                cap if isinstance(cap, int) and cap > 0 else 64
            )
        return rt

    def _host(self, rt: _Runtime, placement: Placement) -> HostIO:
        if placement.host is None:
            return rt.local
        return rt.pool.host(settings_for(placement.connection))

    def _layout(self, placement: Placement) -> filet._Layout:
        remote = placement.host is not None
        base = "/" if remote else str(self.ctx.inventory_root)
        return filet._layout(placement.config, base, None)

    async def close(self) -> None:
        rt = self.ctx.shared.get(_SHARED)
        if isinstance(rt, _Runtime) and rt.loop is asyncio.get_running_loop():
            del self.ctx.shared[_SHARED]
            await rt.pool.close()

    # ---------------------------------------------------------------- deploy
    async def stage(self, placement: Placement, material: Material) -> Staged:
        rt = self._runtime()
        host = self._host(rt, placement)
        layout = self._layout(placement)
        config = placement.config
        ids = await host.resolve_ids(config.get("owner"), config.get("group"))
        contents = filet._Contents(material, layout.password)
        st = _Stage(host, layout, ids, [], [])
        try:
            cleaned: set[str] = set()
            for f in layout.files:
                st.new_dirs.extend(await _ensure_dir(host, layout.root, f))
                if f.dir not in cleaned:
                    cleaned.add(f.dir)
                    await _remove_stale(host, f.dir, {g.name for g in layout.files})
                st.ops.append(await _stage_file(host, f, layout, ids, contents))
            await host.sync_files([op.tmp for op in st.ops if op.tmp is not None])
        except BaseException:
            await _cleanup_stage(st)
            raise
        return Staged(placement, material, {"service": st})

    async def commit(self, staged: Staged) -> dict[str, FileRecord]:
        st = _state(staged)
        if st.committed:
            return st.records
        if st.rolled_back:
            raise PermanentError("this stage was rolled back; stage again")
        config = staged.placement.config
        rt = self._runtime()
        async with rt.lock(st.host.label):
            dirs: dict[str, None] = dict.fromkeys(os.path.dirname(d) for d in st.new_dirs)
            changed = False
            for op in st.ops:
                if op.tmp is None or op.replaced:
                    continue
                if op.existed and st.layout.backups > 0:
                    op.dropped = await _rotate_backups(st.host, op.file.path, st.layout.backups)
                    op.backup = True
                await st.host.rename(op.tmp, op.file.path)
                op.replaced = True
                op.tmp = None
                changed = True
                dirs[op.file.dir] = None
            if dirs:
                await st.host.sync_dirs(list(dirs))
            st.records = {
                op.file.role: FileRecord(op.file.path, op.sha256, op.size, op.mtime_ns)
                for op in st.ops
            }
            # Files already right but a deploy was planned (e.g. the live endpoint
            # serves another certificate): with verify configured, reload anyway.
            if changed or config.get("verify"):
                timeout = _timeout(config)
                validate = _argv(config, "validate", self.default_validate)
                if validate:
                    _check_result(await st.host.run(validate, timeout), "validate", st.host)
                reload = _argv(config, "reload", self.default_reload)
                if reload:
                    st.reload_attempted = True
                    _check_result(await st.host.run(reload, timeout), "reload", st.host)
        st.committed = True
        return st.records

    async def verify(self, staged: Staged) -> None:
        st = _state(staged)
        for op in st.ops:
            data = await st.host.read(op.file.path)
            if hashlib.sha256(data).hexdigest() != op.sha256:
                raise PermanentError(
                    f"{op.file.path} on {st.host.label} does not hold what was deployed"
                )
        verify = staged.placement.config.get("verify")
        if not verify:
            return
        host, port = _endpoint(verify.get("endpoint"))
        sni = verify.get("sni") or None
        timeout = float(verify.get("timeout", 10))
        want = staged.material.fingerprint
        seen = await probe_until(host, port, sni, want, timeout)
        if seen != want:
            if staged.placement.config.get("on_verify_failure") == "keep":
                st.keep = True
            raise PermanentError(
                f"endpoint {host}:{port} serves "
                + (f"certificate {seen[:16]}…" if seen else "no certificate")
                + f", not the deployed {want[:16]}… (after {timeout:g}s)"
            )

    async def rollback(self, staged: Staged) -> None:
        st = _state(staged)
        if st.keep:
            await _cleanup_temps(st)
            return
        rt = self._runtime()
        async with rt.lock(st.host.label):
            errors: list[str] = []
            await _cleanup_temps(st)
            any_restored = False
            for op in reversed(st.ops):
                if not op.replaced or op.restored:
                    continue
                try:
                    await _restore(st, op)
                    any_restored = True
                except CertctlError as exc:
                    errors.append(str(exc))
            if not errors:
                await _remove_new_dirs(st.host, st.new_dirs)
            if any_restored:
                await st.host.sync_dirs(sorted({op.file.dir for op in st.ops}))
            reload = _argv(staged.placement.config, "reload", self.default_reload)
            if st.reload_attempted and reload and not errors:
                try:
                    res = await st.host.run(reload, _timeout(staged.placement.config))
                    _check_result(res, "reload after rollback", st.host)
                    st.reload_attempted = False
                except CertctlError as exc:
                    errors.append(str(exc))
            st.committed = False
            st.rolled_back = True
            if errors:
                raise PermanentError("rollback incomplete: " + "; ".join(errors))

    # --------------------------------------------------------------- observe
    def observe(self, items: Sequence[ObserveItem]) -> list[TargetObservation]:
        return run_sync(self._observe_all(items))

    async def _observe_all(self, items: Sequence[ObserveItem]) -> list[TargetObservation]:
        pool = SSHPool()
        local = LocalHost()
        try:
            by_host: dict[str | None, list[int]] = {}
            for i, item in enumerate(items):
                by_host.setdefault(item.placement.host, []).append(i)
            out: list[TargetObservation | None] = [None] * len(items)

            async def one(i: int, host: HostIO) -> None:
                item = items[i]
                try:
                    out[i] = await self._observe_one(host, item)
                except CertctlError as exc:
                    out[i] = TargetObservation(
                        item.cert,
                        item.placement.id,
                        TargetState.UNKNOWN,
                        detail=f"cannot read back: {exc}",
                    )

            tasks = []
            for hname, idx in by_host.items():
                for i in idx:
                    p = items[i].placement
                    try:
                        host: HostIO = (
                            local if hname is None else pool.host(settings_for(p.connection))
                        )
                    except CertctlError as exc:
                        out[i] = TargetObservation(
                            items[i].cert, p.id, TargetState.UNKNOWN, detail=str(exc)
                        )
                        continue
                    tasks.append(one(i, host))
            await asyncio.gather(*tasks)
            return [o for o in out if o is not None]
        finally:
            await pool.close()

    async def _observe_one(self, host: HostIO, item: ObserveItem) -> TargetObservation:
        layout = self._layout(item.placement)
        pid = item.placement.id
        expected = item.expected_fingerprint
        rec = item.record
        stats: dict[str, FileStat] = {}
        missing: list[filet._File] = []
        for f in layout.files:
            s = await host.lstat(f.path)
            if s is None:
                missing.append(f)
            else:
                stats[f.role] = s
        if missing:
            detail = f"{missing[0].role} file {missing[0].path} is missing on {host.label}"
            if len(missing) > 1:
                detail += f" (and {len(missing) - 1} more)"
            return TargetObservation(item.cert, pid, TargetState.MISSING, detail=detail)

        def differs(detail: str, fp: str | None = None) -> TargetObservation:
            return TargetObservation(item.cert, pid, TargetState.DIFFERS, fp, detail)

        for f in layout.files:
            if not stats[f.role].is_reg:
                return differs(f"{f.role} file {f.path} is not a regular file")
        datas: dict[str, bytes] = {}
        found: str | None = None
        leaf_role = next((f for f in layout.files if f.role in filet.CERT_ROLES), None)
        if leaf_role is not None:
            datas[leaf_role.role] = data = await host.read(leaf_role.path)
            cert = None
            if leaf_role.role == "pkcs12":
                cert = filet._pkcs12_leaf(data, layout.password)
            else:
                try:
                    cert = pki.load_cert_pem(data)
                except pki.PKIError:
                    cert = None
            if cert is None:
                return differs(f"{leaf_role.role} file holds no certificate")
            found = pki.fingerprint(cert)
            if found != expected:
                return differs(
                    f"{leaf_role.role} file holds serial {pki.serial_hex(cert.serial_number)}, "
                    "not the current one",
                    found,
                )
        recorded = rec is not None and expected is not None and rec.fingerprint == expected
        if recorded:
            assert rec is not None
            for f in layout.files:
                r = rec.files.get(f.role)
                if r is None or r.path != f.path:
                    return differs(f"{f.role} file {f.path} is not recorded", found)
                data = datas.get(f.role)
                if data is None:
                    data = await host.read(f.path)
                if hashlib.sha256(data).hexdigest() != r.sha256:
                    return differs(
                        f"{f.role} file {f.path} on {host.label} was changed since it was deployed",
                        found,
                    )
        elif found is None:
            return differs("no certificate file to identify what is deployed (not recorded)")
        uid, gid = -1, -1
        if item.placement.config.get("owner") is not None or item.placement.config.get("group"):
            uid, gid = await host.resolve_ids(
                item.placement.config.get("owner"), item.placement.config.get("group")
            )
        for f in layout.files:
            s = stats[f.role]
            if s.perms != f.mode:
                return differs(
                    f"{f.role} file has mode {s.perms:04o}, expected {f.mode:04o}", found
                )
            if (uid != -1 and s.uid != uid) or (gid != -1 and s.gid != gid):
                return differs(f"{f.role} file has owner {s.uid}:{s.gid}", found)
        verify = item.placement.config.get("verify")
        if verify and found is not None:
            ep, port = _endpoint(verify.get("endpoint"))
            # One good answer within a second is enough: old workers of a reload that
            # just happened may still answer a probe or two.
            served = await probe_until(ep, port, verify.get("sni") or None, found, 1.0, 1)
            if served is not None and served != found:
                return differs(
                    f"the files match, but the live endpoint {ep}:{port} serves another "
                    f"certificate ({served[:16]}…)",
                    found,
                )
        return TargetObservation(item.cert, pid, TargetState.MATCH, fingerprint=found)


# ------------------------------------------------------------------ helpers


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, even inside a running loop
    (then in a worker thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _state(staged: Staged) -> _Stage:
    st = staged.data.get("service")
    if not isinstance(st, _Stage):
        raise PermanentError("not a service-target stage")
    return st


def _argv(config: Mapping[str, Any], key: str, default: Sequence[str]) -> list[str]:
    value = config.get(key)
    if value is None:
        return list(default)
    if not isinstance(value, list):
        raise UnsafeValueError(f"{key} must be a list of arguments, not a string")
    out: list[str] = []
    for i, arg in enumerate(value):
        if isinstance(arg, bool) or not isinstance(arg, str | int):
            raise UnsafeValueError(f"{key}[{i}] must be a string")
        text = str(arg)
        if "\x00" in text:
            raise UnsafeValueError(f"{key}[{i}] contains a NUL character")
        if i == 0 and (not text or "\n" in text or text.startswith("-")):
            raise UnsafeValueError(f"{key}[0] must name a program, not {text!r}")
        out.append(text)
    return out


def _timeout(config: Mapping[str, Any]) -> float:
    t = config.get("command_timeout", 60)
    return float(t) if isinstance(t, int | float) and not isinstance(t, bool) else 60.0


def _endpoint(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise UnsafeValueError("verify.endpoint must be 'host:port'")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UnsafeValueError(f"verify.endpoint {value!r} must be 'host:port'")
    if not SAFE_PATH.match(host):
        raise UnsafeValueError(f"verify.endpoint host {host!r} is not a host name or address")
    return host, int(port)


def _check_result(res: CommandResult, what: str, host: HostIO) -> None:
    if res.ok:
        return
    out = " ".join(res.output.split())
    if "PRIVATE KEY" in out:  # never echo key material a command might print
        out = "(output withheld: it mentions a private key)"
    if len(out) > OUTPUT_MAX:
        out = out[: OUTPUT_MAX - 1] + "…"
    raise PermanentError(
        f"{what} failed on {host.label}: {res.argv[0]} exited with {res.status}"
        + (f": {out}" if out else "")
    )


async def _ensure_dir(host: HostIO, root: str, f: filet._File) -> list[str]:
    """Create the file's directory (0755); refuse symlinks at or below ``root``."""
    created: list[str] = []
    parts = f.dir.strip("/").split("/") if f.dir != "/" else []
    current = ""
    root_depth = len(root.strip("/").split("/")) if root != "/" else 0
    for depth, part in enumerate(parts, start=1):
        current += "/" + part
        s = await host.lstat(current)
        if s is None:
            await host.mkdir(current, 0o755)
            created.append(current)
            continue
        below_root = depth > root_depth  # root itself may be a symlink, as for `file`
        if s.is_link and below_root:
            raise UnsafeValueError(f"{f.key} {f.rel!r} passes through a symlink at {current}")
        if not s.is_dir and not s.is_link:
            raise PermanentError(f"{f.key} {f.rel!r}: {current} is not a directory")
    return created


async def _remove_stale(host: HostIO, dirpath: str, names: set[str]) -> None:
    for n in await host.listdir(dirpath):
        if (
            n.startswith(".")
            and n.endswith(".tmp")
            and filet.TEMP_MARK in n
            and n[1 : n.rindex(filet.TEMP_MARK)] in names
        ):
            await host.unlink(f"{dirpath}/{n}")


async def _stage_file(
    host: HostIO,
    f: filet._File,
    layout: filet._Layout,
    ids: tuple[int, int],
    contents: filet._Contents,
) -> _Op:
    s = await host.lstat(f.path)
    if s is not None and not s.is_reg:
        kind = "a symlink" if s.is_link else "not a regular file"
        raise UnsafeValueError(f"{f.key} {f.rel!r}: {f.path} is {kind}; refusing to replace it")
    uid, gid = ids
    attrs_ok = (
        s is not None
        and s.perms == f.mode
        and (uid == -1 or s.uid == uid)
        and (gid == -1 or s.gid == gid)
    )
    old: bytes | None = None
    if f.role == "pkcs12":
        if s is not None and (attrs_ok or layout.backups == 0):
            old = await host.read(f.path)
        if attrs_ok and old is not None and contents.same_pkcs12(old):
            assert s is not None
            return _Op(f, hashlib.sha256(old).hexdigest(), s.size, s.mtime_ns, existed=True)
        data = contents.pkcs12()
    else:
        data = contents.get(f.role)
        if s is not None and ((attrs_ok and s.size == len(data)) or layout.backups == 0):
            old = await host.read(f.path)
        if attrs_ok and old == data:
            assert s is not None
            return _Op(f, hashlib.sha256(data).hexdigest(), s.size, s.mtime_ns, existed=True)
    tmp = f"{f.dir}/.{f.name}{filet.TEMP_MARK}{secrets.token_hex(6)}.tmp"
    ts = await host.write_new(tmp, data, f.mode, uid, gid)
    op = _Op(f, hashlib.sha256(data).hexdigest(), ts.size, ts.mtime_ns, tmp=tmp)
    if s is not None:
        op.existed = True
        if layout.backups == 0 and old is not None:
            op.old = SecretBytes(old)
            op.old_stat = (s.perms, s.uid, s.gid)
    return op


async def _rotate_backups(
    host: HostIO, path: str, keep: int
) -> tuple[SecretBytes, tuple[int, int, int]] | None:
    dropped = None
    oldest = f"{path}.bak.{keep}"
    s = await host.lstat(oldest)
    if s is not None:
        dropped = (SecretBytes(await host.read(oldest)), (s.perms, s.uid, s.gid))
    for i in range(keep - 1, 0, -1):
        if await host.lstat(f"{path}.bak.{i}") is not None:
            await host.rename(f"{path}.bak.{i}", f"{path}.bak.{i + 1}")
    await host.unlink(f"{path}.bak.1")
    await host.link(path, f"{path}.bak.1")
    return dropped


async def _restore(st: _Stage, op: _Op) -> None:
    host, f, keep = st.host, op.file, st.layout.backups
    if not op.existed:
        await host.unlink(f.path)
    elif op.backup:
        await host.rename(f"{f.path}.bak.1", f.path)
        for i in range(2, keep + 1):
            if await host.lstat(f"{f.path}.bak.{i}") is not None:
                await host.rename(f"{f.path}.bak.{i}", f"{f.path}.bak.{i - 1}")
        if op.dropped is not None:
            content, (mode, uid, gid) = op.dropped
            tmp = f"{f.dir}/.{f.name}{filet.TEMP_MARK}{secrets.token_hex(6)}.tmp"
            await host.write_new(tmp, content.reveal(), mode, uid, gid)
            await host.sync_files([tmp])
            await host.rename(tmp, f"{f.path}.bak.{keep}")
            op.dropped = None
    elif op.old is not None and op.old_stat is not None:
        mode, uid, gid = op.old_stat
        tmp = f"{f.dir}/.{f.name}{filet.TEMP_MARK}{secrets.token_hex(6)}.tmp"
        await host.write_new(tmp, op.old.reveal(), mode, uid, gid)
        await host.sync_files([tmp])
        await host.rename(tmp, f.path)
    else:
        raise PermanentError(f"{f.path}: no copy of the previous content")
    op.restored = True


async def _cleanup_temps(st: _Stage) -> None:
    for op in st.ops:
        if op.tmp is not None:
            await st.host.unlink(op.tmp)
            op.tmp = None


async def _remove_new_dirs(host: HostIO, dirs: Sequence[str]) -> None:
    for d in reversed(dirs):
        if not await host.listdir(d):
            await host.rmdir(d)


async def _cleanup_stage(st: _Stage) -> None:
    with contextlib.suppress(CertctlError):
        await _cleanup_temps(st)
        await _remove_new_dirs(st.host, st.new_dirs)


# ------------------------------------------------------------------ endpoint


async def fetch_fingerprint(host: str, port: int, sni: str | None, timeout: float) -> str | None:
    """SHA-256 fingerprint of the leaf an endpoint serves (no trust check: we compare
    it with the one deployed). None when no TLS handshake succeeded."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni or None),
            timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return hashlib.sha256(der).hexdigest() if der else None


async def probe_until(
    host: str, port: int, sni: str | None, want: str, timeout: float, stable: int = 3
) -> str | None:
    """Probe until the endpoint serves ``want`` on ``stable`` probes in a row, or
    ``timeout`` passes. A reload is asynchronous: while old workers drain, answers
    alternate between the old and the new certificate. Returns what it saw last."""
    deadline = time.monotonic() + timeout
    seen: str | None = None
    streak = 0
    while True:
        seen = await fetch_fingerprint(host, port, sni, max(1.0, min(5.0, timeout)))
        streak = streak + 1 if seen == want else 0
        if streak >= stable or time.monotonic() >= deadline:
            return seen
        await asyncio.sleep(0.1 if streak else 0.2)


CONNECTORS: list[type[Target]] = [ServiceTarget]

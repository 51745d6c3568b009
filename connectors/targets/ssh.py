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

Also: ``jks_path`` (+ ``jks_password``, ``jks_alias``, ``keytool``) builds a Java
keystore with the host's ``keytool``; the ``envoy`` preset's ``sds_path`` writes an
SDS secret file naming the chain and key files; with ``key_custody: target``
:meth:`ServiceTarget.generate_key` makes the key on the host with its ``openssl``
(pending beside ``key_path`` until the deploy commits) and only the CSR comes back.

Commands run as argument lists: locally without a shell, remotely as one
:func:`shlex.join`-quoted line, so ``$(id)`` in an argument stays a literal argument.
Command output in errors is trimmed and never includes file contents.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography.hazmat.primitives import serialization

from certctl import pki
from certctl.connectors import Material, ObserveItem, Staged, Target
from certctl.errors import CertctlError, PermanentError, UnsafeValueError
from certctl.model import (
    FileRecord,
    KeySpec,
    Placement,
    SecretBytes,
    TargetObservation,
    TargetState,
)
from certctl.observe import probe as tls_probe
from certctl.transport.base import CommandResult, FileStat, HostIO
from certctl.transport.local import LocalHost
from certctl.transport.ssh import SSHPool, settings_for
from certctl_connectors.targets import file as filet

T = TypeVar("T")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._/@+=,:%-]+$")
OUTPUT_MAX = 800
#: A FileRecord ``sha256`` of a key kept on the host (key custody ``target``): the
#: SHA-256 of its public half (SubjectPublicKeyInfo DER), so nobody reads the key.
PUB_MARK = "pub:"
PENDING_MARK = ".certctl-pending"
_CSR_RE = re.compile(
    r"-----BEGIN CERTIFICATE REQUEST-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE REQUEST-----"
)
_PUB_RE = re.compile(r"-----BEGIN PUBLIC KEY-----[A-Za-z0-9+/=\s]+-----END PUBLIC KEY-----")
_CSR_NAME = re.compile(r"^[A-Za-z0-9.*_:-]+$")
#: Files only service targets write (besides the ``file`` target's roles), in the
#: order they are renamed in: the JKS keystore (built by the host's ``keytool``) and
#: envoy's SDS secret file (last: envoy reloads when it moves).
EXTRA_PATH_KEYS = {"jks": "jks_path", "sds": "sds_path"}
SDS_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
_ARGV_SCHEMA = {
    "type": "array",
    "maxItems": 64,
    "items": {"type": ["string", "integer"], "maxLength": 4096},
}


def _schema(type_name: str, *, sds: bool = False) -> dict[str, Any]:
    base = dict(filet.FileTarget.config_schema)
    props = dict(base["properties"])
    props["type"] = {"const": type_name}
    props["jks_path"] = filet.PATH_SCHEMA
    props["jks_password"] = filet.SECRET_SCHEMA
    props["jks_alias"] = {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}
    props["keytool"] = {"type": "string", "minLength": 1, "maxLength": 4096}
    path_keys = [*filet.PATH_KEYS.values(), "jks_path"]
    if sds:
        props["sds_path"] = filet.PATH_SCHEMA
        props["sds_name"] = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,128}$"}
        path_keys.append("sds_path")
    base["anyOf"] = [{"required": [k]} for k in path_keys]
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
    file: filet.LayoutFile
    sha256: str
    size: int
    mtime_ns: int
    tmp: str | None = None
    existed: bool = False
    old: SecretBytes | None = field(default=None, repr=False)
    old_stat: tuple[int, int, int] | None = None
    backup: bool = False
    dropped: str | None = None  # where the oldest backup was moved aside (restored on rollback)
    replaced: bool = False
    restored: bool = False
    #: ``key_custody: target``: ``tmp`` is the pending key made on the host; it is
    #: never deleted by cleanup, and a rollback moves it back to pending.
    pending: bool = False


@dataclass
class _Stage:
    host: HostIO
    layout: filet.Layout
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
        for key in EXTRA_PATH_KEYS.values():
            value = config.get(key)
            if isinstance(value, str) and not SAFE_PATH.match(value):
                raise UnsafeValueError(
                    f"{key} {value!r} contains a character that is not allowed in a "
                    "deployment path (allowed: letters, digits and ._-/@+=,:%)"
                )
        remote = placement.host is not None
        if remote and isinstance(root, str) and not root.startswith("/"):
            raise UnsafeValueError(f"root {root!r} must be an absolute path on the host")
        layout = _service_layout(config, "/" if remote else str(inventory_root))
        if "jks_path" in config:
            if config.get("jks_password") is None:
                raise UnsafeValueError("jks_path needs jks_password (a secret)")
            _argv({"keytool": [config.get("keytool", "keytool")]}, "keytool", ())
            if not isinstance(config.get("keytool", "keytool"), str):
                raise UnsafeValueError("keytool must be a path")
        if "sds_path" in config and not {f.role for f in layout.files} & {"fullchain", "cert"}:
            raise UnsafeValueError("sds_path needs fullchain_path or cert_path to point at")
        if "sds_path" in config and "key" not in {f.role for f in layout.files}:
            raise UnsafeValueError("sds_path needs key_path to point at")
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

    # --------------------------------------------------------- key custody
    generates_keys: ClassVar[bool] = True

    @classmethod
    def check_key_custody(cls, placement: Placement, inventory_root: Path) -> list[str]:
        remote = placement.host is not None
        try:
            layout = _service_layout(placement.config, "/" if remote else str(inventory_root))
        except CertctlError as exc:
            return [str(exc)]
        roles = {f.role for f in layout.files}
        problems = []
        if "key" not in roles:
            problems.append("the target needs key_path (where the host keeps its key)")
        for role in sorted(roles & {"combined", "pkcs12", "jks"}):
            problems.append(
                f"{({**filet.PATH_KEYS, **EXTRA_PATH_KEYS})[role]} needs the private key, "
                "which certctl never sees with key custody 'target'"
            )
        if layout.backups < 1:
            problems.append("backups must be at least 1 (a failed deploy restores the old key)")
        return problems

    async def generate_key(
        self, placement: Placement, spec: KeySpec, names: Sequence[str], *, reuse: bool
    ) -> bytes:
        """Make the key on the host with its ``openssl`` (argument lists only) as
        ``.<key name>.certctl-pending`` beside ``key_path`` (created empty with the key's
        mode and owner first, so it is never readable by others), and return the CSR
        ``openssl req`` prints. Only the CSR crosses the connection."""
        rt = self._runtime()
        host = self._host(rt, placement)
        layout = self._layout(placement)
        f = _key_file(layout)
        config = placement.config
        timeout = _timeout(config)
        ids = await host.resolve_ids(config.get("owner"), config.get("group"))
        await _ensure_dir(host, layout.root, f)
        pending = _pending_path(f)
        source: str | None = None
        if reuse:
            s = await host.lstat(f.path)
            if s is not None and s.is_reg:
                source = f.path
        if source is None:
            s = await host.lstat(pending)
            if s is not None:
                if not s.is_reg:
                    raise UnsafeValueError(f"{pending} on {host.label} is not a regular file")
                source = pending  # a killed run's key: reuse it, never make a second
        if source is None:
            tmp = f"{f.dir}/.{f.name}{filet.TEMP_MARK}{secrets.token_hex(6)}.tmp"
            await host.write_new(tmp, b"", f.mode, *ids)
            try:
                res = await host.run(
                    ["openssl", "genpkey", *_genpkey_args(spec), "-out", tmp], timeout
                )
                _check_result(res, "key generation (openssl genpkey)", host)
                await host.sync_files([tmp])
                await host.rename(tmp, pending)
            except BaseException:
                with contextlib.suppress(CertctlError):
                    await host.unlink(tmp)
                raise
            await host.sync_dirs([f.dir])
            source = pending
        argv = ["openssl", "req", "-new", "-key", source, *_csr_args(names)]
        res = await host.run(argv, timeout)
        _check_result(res, "CSR (openssl req)", host)
        match = _CSR_RE.search(res.output)
        if match is None:
            raise PermanentError(f"openssl req on {host.label} printed no CSR")
        return match.group(0).encode() + b"\n"

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

    def _layout(self, placement: Placement) -> filet.Layout:
        remote = placement.host is not None
        base = "/" if remote else str(self.ctx.inventory_root)
        return _service_layout(placement.config, base)

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
        contents = _ServiceContents(material, layout, config)
        st = _Stage(host, layout, ids, [], [])
        try:
            cleaned: set[str] = set()
            for f in layout.files:
                st.new_dirs.extend(await _ensure_dir(host, layout.root, f))
                if f.dir not in cleaned:
                    cleaned.add(f.dir)
                    await _remove_stale(host, f.dir, {g.name for g in layout.files})
                if f.role == "key" and material.key_on_target:
                    st.ops.append(await _stage_target_key(host, f, material, config))
                elif f.role == "jks":
                    st.ops.append(await _stage_jks(host, f, layout, ids, material, config))
                else:
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
        staged.verify_detail["files_read_back"] = len(st.ops)
        for op in st.ops:
            if op.sha256.startswith(PUB_MARK):  # a key kept on the host: compare halves
                got = await _host_public_key(
                    st.host, op.file.path, _timeout(staged.placement.config)
                )
                if got != op.sha256:
                    raise PermanentError(
                        f"{op.file.path} on {st.host.label} is not the key of the deployed "
                        "certificate"
                    )
                continue
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
        staged.verify_detail["endpoint"] = f"{host}:{port}"
        if sni:
            staged.verify_detail["sni"] = sni
        seen = await probe_until(host, port, sni, want, timeout)
        staged.verify_detail["served"] = (seen or "")[:16]
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
        if any(f.role == "jks" for f in layout.files):
            await _need_keytool(host, item.placement.config)  # plan names a missing keytool
        pid = item.placement.id
        expected = item.expected_fingerprint
        rec = item.record
        stats: dict[str, FileStat] = {}
        missing: list[filet.LayoutFile] = []
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
                cert = filet.pkcs12_leaf(data, layout.password)
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
                if r.sha256.startswith(PUB_MARK):  # key custody target: never read it
                    got = await _host_public_key(host, f.path, _timeout(item.placement.config))
                    if got != r.sha256:
                        return differs(
                            f"{f.role} file {f.path} on {host.label} is not the key of the "
                            "deployed certificate",
                            found,
                        )
                    continue
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
    raise CommandFailed(
        f"{what} failed on {host.label}: {res.argv[0]} exited with {res.status}"
        + (f": {out}" if out else ""),
        out,
    )


class CommandFailed(PermanentError):
    """A validate/reload/keytool... command failed; ``output`` is its trimmed output
    (withheld when it mentions a private key), recorded with the failed deploy."""

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


async def _ensure_dir(host: HostIO, root: str, f: filet.LayoutFile) -> list[str]:
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
    f: filet.LayoutFile,
    layout: filet.Layout,
    ids: tuple[int, int],
    contents: filet.Contents,
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


async def _rotate_backups(host: HostIO, path: str, keep: int) -> str | None:
    """Shift ``.bak.1..N`` on the host. The oldest backup is renamed aside (never read:
    with target key custody it is a private key that must not leave the host); a
    rollback renames it back, and the next stage of this file sweeps it like any stale
    temp file."""
    dropped = None
    oldest = f"{path}.bak.{keep}"
    if await host.lstat(oldest) is not None:
        d, name = os.path.split(path)
        dropped = f"{d}/.{name}{filet.TEMP_MARK}dropped-{secrets.token_hex(6)}.tmp"
        await host.rename(oldest, dropped)
    for i in range(keep - 1, 0, -1):
        if await host.lstat(f"{path}.bak.{i}") is not None:
            await host.rename(f"{path}.bak.{i}", f"{path}.bak.{i + 1}")
    await host.unlink(f"{path}.bak.1")
    await host.link(path, f"{path}.bak.1")
    return dropped


async def _restore(st: _Stage, op: _Op) -> None:
    host, f, keep = st.host, op.file, st.layout.backups
    if op.pending:  # the host's new key goes back to pending: it still matches the
        await host.rename(f.path, _pending_path(f))  # issued certificate for a rerun
    if not op.existed:
        if not op.pending:
            await host.unlink(f.path)
    elif op.backup:
        await host.rename(f"{f.path}.bak.1", f.path)
        for i in range(2, keep + 1):
            if await host.lstat(f"{f.path}.bak.{i}") is not None:
                await host.rename(f"{f.path}.bak.{i}", f"{f.path}.bak.{i - 1}")
        if op.dropped is not None:
            await host.rename(op.dropped, f"{f.path}.bak.{keep}")
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
        if op.tmp is not None and not op.pending:
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


# ------------------------------------------------------------ jks and sds


def _service_layout(config: Mapping[str, Any], base: str) -> filet.Layout:
    """The ``file`` layout plus the service-only files (``jks_path``, ``sds_path``),
    confined by the same code."""
    plain = {k: v for k, v in config.items() if k not in EXTRA_PATH_KEYS.values()}
    only_extra = not any(k in config for k in filet.PATH_KEYS.values())
    if only_extra:  # e.g. just a keystore: let the file layout resolve root and modes
        plain["cert_path"] = ".certctl-layout-probe"
    layout = filet.resolve_layout(plain, base, None)
    files = [f for f in layout.files if not only_extra]
    seen = {f.path for f in files}
    mode = filet.parse_mode(config.get("mode", filet.DEFAULT_MODE), "mode")
    key_mode = filet.parse_mode(config.get("key_mode", filet.DEFAULT_KEY_MODE), "key_mode")
    for role, key in EXTRA_PATH_KEYS.items():
        rel = config.get(key)
        if rel is None:
            continue
        probe = filet.resolve_layout({"root": config.get("root"), "cert_path": rel}, base, None)
        f = probe.files[0]
        if f.path in seen:
            raise UnsafeValueError(f"{key} {rel!r} names a file another path key names")
        seen.add(f.path)
        files.append(
            filet.LayoutFile(
                role, key, rel, f.path, f.dir, f.name, key_mode if role == "jks" else mode
            )
        )
    return filet.Layout(
        layout.root, tuple(files), layout.uid, layout.gid, layout.backups, layout.password
    )


class _ServiceContents(filet.Contents):
    """File contents, plus envoy's SDS secret file."""

    def __init__(self, material: Material, layout: filet.Layout, config: Mapping[str, Any]) -> None:
        super().__init__(material, layout.password)
        self.layout = layout
        self.config = config

    def get(self, role: str) -> bytes:
        if role == "sds":
            return sds_document(self.layout, self.config, self.m.cert)
        return super().get(role)


def sds_document(layout: filet.Layout, config: Mapping[str, Any], cert: str) -> bytes:
    """An envoy SDS ``DiscoveryResponse`` file naming the deployed chain and key files
    (``.yaml``/``.yml``: YAML, else JSON). Envoy watches it (``path_config_source``)
    and reloads the certificate when certctl renames a new one in."""
    by_role = {f.role: f.path for f in layout.files}
    chain = by_role.get("fullchain") or by_role["cert"]
    secret = {
        "@type": SDS_TYPE,
        "name": str(config.get("sds_name") or cert),
        "tls_certificate": {
            "certificate_chain": {"filename": chain},
            "private_key": {"filename": by_role["key"]},
        },
    }
    sds = next(f for f in layout.files if f.role == "sds")
    if sds.name.endswith((".yaml", ".yml")):
        q = json.dumps  # a JSON string is a valid YAML double-quoted scalar
        text = (
            "resources:\n"
            f'- "@type": {q(SDS_TYPE)}\n'
            f"  name: {q(secret['name'])}\n"
            "  tls_certificate:\n"
            "    certificate_chain:\n"
            f"      filename: {q(chain)}\n"
            "    private_key:\n"
            f"      filename: {q(by_role['key'])}\n"
        )
        return text.encode()
    return (json.dumps({"resources": [secret]}, indent=2) + "\n").encode()


async def _need_keytool(host: HostIO, config: Mapping[str, Any]) -> str:
    keytool = str(config.get("keytool", "keytool"))
    try:
        res = await host.run([keytool, "-help"], 30.0)
        ok = res.ok
    except PermanentError:
        ok = False
    if not ok:
        raise PermanentError(
            f"jks_path needs keytool, which is not installed on {host.label} "
            f"({keytool!r} cannot be run; install a JRE or set keytool: /path/to/keytool)"
        )
    return keytool


async def _stage_jks(
    host: HostIO,
    f: filet.LayoutFile,
    layout: filet.Layout,
    ids: tuple[int, int],
    material: Material,
    config: Mapping[str, Any],
) -> _Op:
    """Build the keystore on the host: a PKCS#12 and the password go to a private
    (0700) work directory beside it, ``keytool -importkeystore`` (passwords read from
    a file, never on the command line) writes the JKS there, and its bytes are
    uploaded to the usual temp with the key's mode and owner."""
    keytool = await _need_keytool(host, config)
    password = config.get("jks_password")
    pw = filet.password_bytes(password)
    if len(pw) < 6:
        raise UnsafeValueError("jks_password must be at least 6 characters (keytool's rule)")
    alias = str(config.get("jks_alias") or material.cert)
    p12 = filet.Contents(material, password).pkcs12()
    prefix = f".{f.name}.certctl-work-"
    for n in await host.listdir(f.dir):  # a killed run's work directory
        if n.startswith(prefix):
            await _remove_work_dir(host, f"{f.dir}/{n}")
    work = f"{f.dir}/{prefix}{secrets.token_hex(6)}"
    await host.mkdir(work, 0o700)
    try:
        await host.write_new(f"{work}/src.p12", p12, 0o600, -1, -1)
        await host.write_new(f"{work}/pass", pw + b"\n", 0o600, -1, -1)
        argv = [
            keytool,
            "-importkeystore",
            "-noprompt",
            "-srckeystore",
            f"{work}/src.p12",
            "-srcstoretype",
            "PKCS12",
            "-srcstorepass:file",
            f"{work}/pass",
            "-srcalias",
            material.cert,
            "-destkeystore",
            f"{work}/out.jks",
            "-deststoretype",
            "JKS",
            "-deststorepass:file",
            f"{work}/pass",
            "-destkeypass:file",
            f"{work}/pass",
            "-destalias",
            alias,
        ]
        _check_result(await host.run(argv, _timeout(config)), "keytool -importkeystore", host)
        data = await host.read(f"{work}/out.jks")
    finally:
        await _remove_work_dir(host, work)
    s = await host.lstat(f.path)
    if s is not None and not s.is_reg:
        raise UnsafeValueError(f"{f.key} {f.rel!r}: {f.path} is not a regular file")
    old = await host.read(f.path) if s is not None and layout.backups == 0 else None
    tmp = f"{f.dir}/.{f.name}{filet.TEMP_MARK}{secrets.token_hex(6)}.tmp"
    ts = await host.write_new(tmp, data, f.mode, *ids)
    op = _Op(f, hashlib.sha256(data).hexdigest(), ts.size, ts.mtime_ns, tmp=tmp)
    if s is not None:
        op.existed = True
        if old is not None:
            op.old = SecretBytes(old)
            op.old_stat = (s.perms, s.uid, s.gid)
    return op


async def _remove_work_dir(host: HostIO, work: str) -> None:
    with contextlib.suppress(CertctlError):
        for n in await host.listdir(work):
            await host.unlink(f"{work}/{n}")
        await host.rmdir(work)


# ------------------------------------------------------------ key custody


def _key_file(layout: filet.Layout) -> filet.LayoutFile:
    f = next((f for f in layout.files if f.role == "key"), None)
    if f is None:
        raise PermanentError("key custody 'target' needs key_path")
    return f


def _pending_path(f: filet.LayoutFile) -> str:
    return f"{f.dir}/.{f.name}{PENDING_MARK}"


def _genpkey_args(spec: KeySpec) -> list[str]:
    if spec.algorithm == "ecdsa":
        return [
            "-algorithm",
            "EC",
            "-pkeyopt",
            f"ec_paramgen_curve:P-{spec.size}",
            "-pkeyopt",
            "ec_param_enc:named_curve",
        ]
    if spec.algorithm == "rsa":
        return ["-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{int(spec.size)}"]
    if spec.algorithm == "ed25519":
        return ["-algorithm", "ED25519"]
    raise PermanentError(f"cannot generate a {spec.id} key on a host")


def _csr_args(names: Sequence[str]) -> list[str]:
    if not names:
        raise PermanentError("a CSR needs at least one name")
    for n in names:
        if not _CSR_NAME.match(n):
            raise UnsafeValueError(f"name {n!r} cannot be put in a CSR made on the host")
    sans = []
    for n in names:
        kind = pki.classify_name(n)
        sans.append(("IP:" if kind.startswith("ip") else "DNS:") + n)
    args = ["-subj", f"/CN={names[0]}" if len(names[0]) <= 64 else "/"]
    return [*args, "-addext", "subjectAltName=" + ",".join(sans)]


async def _host_public_key(host: HostIO, path: str, timeout: float) -> str | None:
    """``pub:<sha256 of SPKI DER>`` of the key at ``path`` on the host, computed there
    by ``openssl pkey -pubout`` (only the public half comes back); None if unreadable."""
    res = await host.run(["openssl", "pkey", "-in", path, "-pubout"], timeout)
    match = _PUB_RE.search(res.output) if res.ok else None
    if match is None:
        return None
    try:
        der = serialization.load_pem_public_key(match.group(0).encode()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except ValueError:
        return None
    return PUB_MARK + hashlib.sha256(der).hexdigest()


def _cert_public_key(material: Material) -> str:
    pub = pki.load_cert_pem(material.cert_pem).public_key()
    der = pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return PUB_MARK + hashlib.sha256(der).hexdigest()


async def _stage_target_key(
    host: HostIO, f: filet.LayoutFile, material: Material, config: Mapping[str, Any]
) -> _Op:
    """The key stays on the host: the live key if it already belongs to the
    certificate (rotation ``never``, or a redeploy), else the pending key
    :meth:`ServiceTarget.generate_key` made for it (renamed in at commit)."""
    want = _cert_public_key(material)
    timeout = _timeout(config)
    s = await host.lstat(f.path)
    if s is not None and not s.is_reg:
        raise UnsafeValueError(f"{f.key} {f.rel!r}: {f.path} is not a regular file")
    if (
        s is not None
        and s.perms == f.mode
        and await _host_public_key(host, f.path, timeout) == want
    ):
        return _Op(f, want, s.size, s.mtime_ns, existed=True)
    pending = _pending_path(f)
    ps = await host.lstat(pending)
    if ps is not None and ps.is_reg and await _host_public_key(host, pending, timeout) == want:
        return _Op(f, want, ps.size, ps.mtime_ns, tmp=pending, existed=s is not None, pending=True)
    raise PermanentError(
        f"{material.cert}: neither {f.path} nor a pending key on {host.label} is the key of "
        f"version {material.version} (key custody 'target'); renew it "
        "(certctl renew --force) so the host makes a new key"
    )


# ------------------------------------------------------------------ endpoint


async def fetch_fingerprint(host: str, port: int, sni: str | None, timeout: float) -> str | None:
    """SHA-256 fingerprint of the leaf an endpoint serves (no trust check: we compare
    it with the one deployed). None when no TLS handshake succeeded. The probe is
    :mod:`certctl.observe.probe`'s, shared with ``certctl drift``."""
    return await tls_probe.fetch_fingerprint(host, port, sni, timeout)


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

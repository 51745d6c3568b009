"""The built-in ``file`` target: PEM (and PKCS#12) files on this machine.

Configuration (per placement, rendered by the inventory loader): ``root`` (relative
to the inventory root unless absolute) and at least one of ``cert_path``,
``chain_path``, ``fullchain_path``, ``key_path``, ``combined_path`` (cert + chain +
key, HAProxy style) and ``pkcs12_path`` (with ``pkcs12_password``), each relative to
``root`` and confined under it; ``owner``, ``group``, ``mode`` (certificates, default
``0644``), ``key_mode`` (key, combined and PKCS#12 files, default ``0600``) and
``backups`` (default 1).

How a deploy is made safe:

* **stage** writes every file whose content (or mode/owner) differs into a temp file
  ``.<name>.certctl-<random>.tmp`` in the same directory, created with
  ``O_EXCL|O_NOFOLLOW`` (0600 for secret files), then waits until the syncer made
  them durable. Files already right are left alone (their mtime does not change).
  Stale temps of the same name left by a killed run are removed. A failing stage
  removes its own temps; nothing live changed.
* **commit** keeps ``backups`` copies of each replaced file (``<name>.bak.1`` is the
  most recent; hard links, so no data is copied), renames the temps over the live
  files and syncs the directories. It returns a :class:`FileRecord` for every file
  of the placement, changed or not.
* **rollback** (idempotent) removes temps and, for files already replaced, restores
  the previous file from ``.bak.1`` (or from the content read at stage time when
  ``backups`` is 0), or removes a file that did not exist before.
* **observe** compares each file's ``stat`` (size, mtime) with the deployment record
  and only reads and hashes files that changed.

Paths never follow symlinks below ``root``: :meth:`FileTarget.check_placement`
refuses absolute paths, ``..`` escapes, NUL/newlines and existing symlinks, and the
file operations themselves use ``O_NOFOLLOW`` and ``lstat``.
"""

from __future__ import annotations

import contextlib
import grp
import hashlib
import os
import pwd
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certctl import pki
from certctl.connectors import ConnectorContext, Material, ObserveItem, Staged, Target
from certctl.errors import CertctlError, PermanentError, UnsafeValueError
from certctl.model import (
    FileRecord,
    Placement,
    Secret,
    SecretBytes,
    TargetObservation,
    TargetState,
)

#: Roles in write order, with their config keys.
ROLES = ("cert", "chain", "fullchain", "key", "combined", "pkcs12")
PATH_KEYS = MappingProxyType({r: f"{r}_path" for r in ROLES})
#: Roles whose files hold the private key (created 0600, mode ``key_mode``).
SECRET_ROLES = frozenset({"key", "combined", "pkcs12"})
#: Roles holding the leaf certificate, in the order observe looks at them.
CERT_ROLES = ("cert", "fullchain", "combined", "pkcs12")
DEFAULT_MODE = 0o644
DEFAULT_KEY_MODE = 0o600
TEMP_MARK = ".certctl-"
_LAYOUT_CACHE_MAX = 100_000

PATH_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 4096}
_MODE_SCHEMA = {
    "oneOf": [
        {"type": "string", "pattern": "^0?[0-7]{3}$"},
        {"type": "integer", "minimum": 0, "maximum": 511},
    ]
}
_ID_SCHEMA = {
    "oneOf": [
        {"type": "string", "minLength": 1, "pattern": "^[A-Za-z0-9._][A-Za-z0-9._-]*$"},
        {"type": "integer", "minimum": 0},
    ]
}
SECRET_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
        },
    ]
}


@dataclass(frozen=True, slots=True)
class LayoutFile:
    role: str
    key: str  # config key, e.g. "cert_path"
    rel: str  # as configured
    path: str  # absolute, normalised
    dir: str
    name: str
    mode: int


@dataclass(frozen=True, slots=True)
class Layout:
    root: str  # absolute
    files: tuple[LayoutFile, ...]
    uid: int | None
    gid: int | None
    backups: int
    password: Secret | str | None


@dataclass(slots=True)
class _Op:
    """One file of a staged deployment (connector-private, never printed)."""

    file: LayoutFile
    sha256: str
    size: int
    mtime_ns: int
    tmp: str | None = None  # temp file still to be renamed
    existed: bool = False
    old: SecretBytes | None = field(default=None, repr=False)  # content before (backups=0)
    old_stat: tuple[int, int, int] | None = None  # mode, uid, gid before
    backup: bool = False  # commit linked the previous file to .bak.1
    dropped: tuple[SecretBytes, tuple[int, int, int]] | None = field(default=None, repr=False)
    replaced: bool = False
    restored: bool = False


@dataclass
class _StageState:
    layout: Layout
    ops: list[_Op]
    new_dirs: list[str]  # directories stage created, outermost first
    committed: bool = False
    rolled_back: bool = False
    records: dict[str, FileRecord] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"<file stage of {len(self.ops)} files, committed={self.committed}>"


class FileTarget(Target):
    """Certificates, chains and keys as files on the controller. See the module doc."""

    type_name = "file"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "file target",
        "type": "object",
        "additionalProperties": False,
        "required": ["root"],
        "properties": {
            "type": {"const": "file"},
            "description": {"type": "string"},
            "hosts": {},
            "root": PATH_SCHEMA,
            **{k: PATH_SCHEMA for k in PATH_KEYS.values()},
            "pkcs12_password": SECRET_SCHEMA,
            "owner": _ID_SCHEMA,
            "group": _ID_SCHEMA,
            "mode": _MODE_SCHEMA,
            "key_mode": _MODE_SCHEMA,
            "backups": {"type": "integer", "minimum": 0, "maximum": 100},
        },
        "anyOf": [{"required": [k]} for k in PATH_KEYS.values()],
    }

    def __init__(self, name: str, ctx: ConnectorContext) -> None:
        super().__init__(name, ctx)
        # directory -> {file name -> stale temp names}, read once per directory
        self._stale: dict[str, dict[str, list[str]]] = {}
        self._ids: dict[tuple[str, str], int] = {}
        # id(placement config) -> (that config, its layout): observe and stage of one
        # run resolve each placement once. Holding the config keeps its id unique.
        self._layouts: dict[int, tuple[Mapping[str, Any], Layout]] = {}

    # ------------------------------------------------------------ validation
    @classmethod
    def check_placement(cls, placement: Placement, inventory_root: Path) -> list[str]:
        """Problems with the rendered paths (empty when fine). No file is changed."""
        try:
            layout = resolve_layout(placement.config, str(inventory_root), None)
        except CertctlError as exc:
            return [str(exc)]
        problems: list[str] = []
        for f in layout.files:
            problem = _symlink_problem(layout.root, f)
            if problem:
                problems.append(problem)
        return problems

    # ---------------------------------------------------------------- deploy
    async def stage(self, placement: Placement, material: Material) -> Staged:
        """Write temps for what differs and make them durable. Nothing live changes.

        On failure the temps written so far are removed before the error propagates.
        """
        layout = self._layout(placement)
        contents = Contents(material, layout.password)
        ops: list[_Op] = []
        new_dirs: list[str] = []
        try:
            for f in layout.files:
                new_dirs.extend(_ensure_dir(layout.root, f))
                for stale in self._stale_temps(f.dir, f.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(f.dir, stale))
                ops.append(_stage_file(f, layout, contents))
            temps = [op.tmp for op in ops if op.tmp is not None]
            if temps:
                await self.ctx.syncer.sync_files(temps)
        except BaseException:
            _remove_temps(ops)
            _remove_new_dirs(new_dirs)
            raise
        return Staged(placement, material, {"file": _StageState(layout, ops, new_dirs)})

    async def commit(self, staged: Staged) -> dict[str, FileRecord]:
        """Back up and atomically replace the changed files; sync their directories.

        Calling it again after success returns the same records. After a failure part
        way, :meth:`rollback` restores the files already replaced.
        """
        st = _state(staged)
        if st.committed:
            return st.records
        if st.rolled_back:
            raise PermanentError("this stage was rolled back; stage again")
        dirs: dict[str, None] = dict.fromkeys(os.path.dirname(d) for d in st.new_dirs)
        for op in st.ops:
            if op.tmp is None or op.replaced:
                continue
            f = op.file
            try:
                if op.existed and st.layout.backups > 0:
                    op.dropped = _rotate_backups(f.path, st.layout.backups)
                    op.backup = True
                os.replace(op.tmp, f.path)
            except OSError as exc:
                raise PermanentError(f"cannot replace {f.path}: {exc.strerror or exc}") from exc
            op.replaced = True
            op.tmp = None
            dirs[f.dir] = None
        if dirs:
            await self.ctx.syncer.sync_dirs(list(dirs))
        st.records = {
            op.file.role: FileRecord(op.file.path, op.sha256, op.size, op.mtime_ns) for op in st.ops
        }
        st.committed = True
        return st.records

    async def verify(self, staged: Staged) -> None:
        """Read every file back and compare its hash with what was deployed."""
        for op in _state(staged).ops:
            try:
                data = read_nofollow(op.file.path)
            except OSError as exc:
                raise PermanentError(
                    f"cannot read back {op.file.path}: {exc.strerror or exc}"
                ) from exc
            if hashlib.sha256(data).hexdigest() != op.sha256:
                raise PermanentError(f"{op.file.path} does not hold what was deployed")

    async def rollback(self, staged: Staged) -> None:
        """Remove temps; put back what each replaced file held before. Idempotent."""
        st = _state(staged)
        _remove_temps(st.ops)
        dirs: dict[str, None] = {}
        rewrites: list[tuple[_Op, str, str]] = []  # (op, temp, final name)
        errors: list[str] = []
        for op in st.ops:
            if not op.replaced or op.restored:
                continue
            f = op.file
            try:
                if not op.existed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(f.path)
                    op.restored = True
                elif op.backup:
                    _restore_backup(f.path, st.layout.backups)
                    op.restored = True
                    if op.dropped is not None:
                        content, (mode, uid, gid) = op.dropped
                        tmp, _ = _write_temp(f, content.reveal(), mode, uid, gid)
                        rewrites.append((op, tmp, f"{f.path}.bak.{st.layout.backups}"))
                elif op.old is not None and op.old_stat is not None:
                    mode, uid, gid = op.old_stat
                    tmp, _ = _write_temp(f, op.old.reveal(), mode, uid, gid)
                    rewrites.append((op, tmp, f.path))
                else:
                    errors.append(f"{f.path}: no copy of the previous content")
            except OSError as exc:
                errors.append(f"{f.path}: {exc.strerror or exc}")
            dirs[f.dir] = None
        try:
            if rewrites:
                await self.ctx.syncer.sync_files([t for _, t, _ in rewrites])
            for op, tmp, final in rewrites:
                os.replace(tmp, final)
                op.restored = True
                op.dropped = None
        except (OSError, CertctlError) as exc:
            for _, tmp, _ in rewrites:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            errors.append(str(exc))
        if not errors:
            _remove_new_dirs(st.new_dirs)
        dirs.update((os.path.dirname(d), None) for d in st.new_dirs)
        if dirs:
            await self.ctx.syncer.sync_dirs([d for d in dirs if os.path.isdir(d)])
        st.committed = False
        st.rolled_back = True
        if errors:
            raise PermanentError("rollback incomplete: " + "; ".join(errors))

    # --------------------------------------------------------------- observe
    def observe(self, items: Sequence[ObserveItem]) -> list[TargetObservation]:
        """What each placement holds; stat first, hash only what changed."""
        out: list[TargetObservation] = []
        for item in items:
            try:
                out.append(self._observe_one(item))
            except (CertctlError, OSError) as exc:
                detail = exc.strerror if isinstance(exc, OSError) else str(exc)
                out.append(
                    TargetObservation(
                        item.cert,
                        item.placement.id,
                        TargetState.UNKNOWN,
                        detail=f"cannot read back: {detail}",
                    )
                )
        return out

    def _observe_one(self, item: ObserveItem) -> TargetObservation:
        layout = self._layout(item.placement)
        pid = item.placement.id
        expected = item.expected_fingerprint
        rec = item.record
        stats: dict[str, os.stat_result] = {}
        missing: list[LayoutFile] = []
        for f in layout.files:
            try:
                stats[f.role] = os.lstat(f.path)
            except FileNotFoundError:
                missing.append(f)
        if missing:
            detail = f"{missing[0].role} file {missing[0].path} is missing"
            if len(missing) > 1:
                detail += f" (and {len(missing) - 1} more)"
            return TargetObservation(item.cert, pid, TargetState.MISSING, detail=detail)

        recorded = rec is not None and expected is not None and rec.fingerprint == expected
        attr_problem = _attr_problem(layout, stats)
        if recorded and attr_problem is None:
            assert rec is not None
            if all(
                (r := rec.files.get(f.role)) is not None
                and r.path == f.path
                and r.size == stats[f.role].st_size
                and r.mtime_ns == stats[f.role].st_mtime_ns
                for f in layout.files
            ):
                return TargetObservation(item.cert, pid, TargetState.MATCH, fingerprint=expected)

        # Something changed (or nothing is recorded): read, parse, hash.
        def differs(detail: str, fp: str | None = None) -> TargetObservation:
            return TargetObservation(item.cert, pid, TargetState.DIFFERS, fp, detail)

        try:
            leaf = self._leaf(layout)
        except _NoCert as exc:
            return differs(str(exc))
        found = pki.fingerprint(leaf[1]) if leaf is not None else None
        if leaf is not None and found != expected:
            return differs(
                f"{leaf[0]} file holds serial {pki.serial_hex(leaf[1].serial_number)}, "
                "not the current one",
                found,
            )
        if recorded:
            assert rec is not None
            for f in layout.files:
                r = rec.files.get(f.role)
                if r is None or r.path != f.path:
                    return differs(f"{f.role} file {f.path} is not recorded", found)
                if _sha256_file(f.path) != r.sha256:
                    return differs(f"{f.role} file content differs", found)
        elif leaf is None:
            return differs("no certificate file to identify what is deployed (not recorded)")
        if attr_problem is not None:
            return differs(attr_problem, found)
        return TargetObservation(item.cert, pid, TargetState.MATCH, fingerprint=found)

    def _leaf(self, layout: Layout) -> tuple[str, x509.Certificate] | None:
        """(role, leaf certificate) from the first certificate-bearing file."""
        for f in layout.files:
            if f.role not in CERT_ROLES:
                continue
            data = read_nofollow(f.path)
            if f.role == "pkcs12":
                cert = pkcs12_leaf(data, layout.password)
            else:
                try:
                    cert = pki.load_cert_pem(data)
                except pki.PKIError:
                    cert = None
            if cert is None:
                raise _NoCert(f.role)
            return f.role, cert
        return None

    # -------------------------------------------------------------- helpers
    def _layout(self, placement: Placement) -> Layout:
        config = placement.config
        hit = self._layouts.get(id(config))
        if hit is not None and hit[0] is config:
            return hit[1]
        layout = resolve_layout(config, str(self.ctx.inventory_root), self._ids)
        if len(self._layouts) >= _LAYOUT_CACHE_MAX:
            self._layouts.clear()
        self._layouts[id(config)] = (config, layout)
        return layout

    def _stale_temps(self, dirpath: str, name: str) -> list[str]:
        """Temps of ``name`` that were in ``dirpath`` when this instance first used it.

        They can only be left by a killed run (the apply lock keeps other processes
        out, and this instance had not written there yet).
        """
        index = self._stale.get(dirpath)
        if index is None:
            index = {}
            try:
                with os.scandir(dirpath) as it:
                    for entry in it:
                        n = entry.name
                        if n.startswith(".") and n.endswith(".tmp") and TEMP_MARK in n:
                            index.setdefault(n[1 : n.rindex(TEMP_MARK)], []).append(n)
            except FileNotFoundError:
                pass
            self._stale[dirpath] = index
        return index.pop(name, [])


CONNECTORS = [FileTarget]


# ------------------------------------------------------------------ layout


class _NoCert(PermanentError):
    def __init__(self, role: str) -> None:
        super().__init__(f"{role} file holds no certificate")
        self.role = role


def resolve_layout(
    config: Mapping[str, Any], inventory_root: str, ids: dict[Any, int] | None
) -> Layout:
    """Resolve and confine the configured paths; raise UnsafeValueError if one escapes."""
    root_cfg = config.get("root")
    if not isinstance(root_cfg, str) or not root_cfg:
        raise UnsafeValueError("file target: 'root' is required")
    _check_chars("root", root_cfg)
    root = os.path.normpath(os.path.join(inventory_root, os.path.expanduser(root_cfg)))
    mode = parse_mode(config.get("mode", DEFAULT_MODE), "mode")
    key_mode = parse_mode(config.get("key_mode", DEFAULT_KEY_MODE), "key_mode")
    files: list[LayoutFile] = []
    seen: dict[str, str] = {}
    for role in ROLES:
        key = PATH_KEYS[role]
        rel = config.get(key)
        if rel is None:
            continue
        if not isinstance(rel, str) or not rel:
            raise UnsafeValueError(f"{key} must be a non-empty string")
        _check_chars(key, rel)
        norm = os.path.normpath(rel)
        if (
            os.path.isabs(rel)
            or rel.startswith("~")
            or norm in (".", "..")
            or norm.startswith("../")
        ):
            raise UnsafeValueError(f"{key} {rel!r} escapes the target root {root_cfg}")
        path = os.path.join(root, norm)
        if path in seen:
            raise UnsafeValueError(f"{key} and {seen[path]} name the same file {rel!r}")
        seen[path] = key
        d, n = os.path.split(path)
        if n.endswith(".tmp") and TEMP_MARK in n:
            raise UnsafeValueError(f"{key} {rel!r} looks like a certctl temp file")
        files.append(
            LayoutFile(role, key, rel, path, d, n, key_mode if role in SECRET_ROLES else mode)
        )
    if not files:
        raise UnsafeValueError(
            "file target: at least one of " + ", ".join(PATH_KEYS.values()) + " is required"
        )
    backups = config.get("backups", 1)
    if isinstance(backups, bool) or not isinstance(backups, int) or backups < 0:
        raise UnsafeValueError(f"backups must be a whole number >= 0, not {backups!r}")
    password = config.get("pkcs12_password")
    if password is not None and not isinstance(password, Secret | str):
        raise UnsafeValueError("pkcs12_password must be a secret ({env: ...} or {file: ...})")
    uid = _owner_id(config.get("owner"), "owner", ids)
    gid = _owner_id(config.get("group"), "group", ids)
    return Layout(root, tuple(files), uid, gid, backups, password)


def _check_chars(key: str, value: str) -> None:
    if "\x00" in value:
        raise UnsafeValueError(f"{key} contains a NUL character")
    if "\n" in value or "\r" in value:
        raise UnsafeValueError(f"{key} contains a newline")


def parse_mode(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise UnsafeValueError(f"{key} must be an octal mode such as '0644'")
    if isinstance(value, int) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str):
        try:
            mode = int(value, 8)
        except ValueError:
            mode = -1
        if 0 <= mode <= 0o777:
            return mode
    raise UnsafeValueError(f"{key} must be an octal mode such as '0644', not {value!r}")


def _owner_id(value: Any, kind: str, cache: dict[Any, int] | None) -> int | None:
    """uid/gid for an owner/group name or number; None when not configured.

    ``cache`` is None at inventory-check time: names are then not looked up (the
    account may only exist on the deploy host).
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        raise UnsafeValueError(f"{kind} must be a name or a number")
    if value.isdigit():
        return int(value)
    if cache is None:
        return None
    ident = cache.get((kind, value))
    if ident is None:
        try:
            ident = pwd.getpwnam(value).pw_uid if kind == "owner" else grp.getgrnam(value).gr_gid
        except KeyError:
            raise PermanentError(f"{kind} {value!r} does not exist on this machine") from None
        cache[(kind, value)] = ident
    return ident


def _symlink_problem(root: str, f: LayoutFile) -> str | None:
    """A problem if a path component below ``root`` exists and is a symlink."""
    current = root
    parts = os.path.relpath(f.path, root).split(os.sep)
    for i, part in enumerate(parts):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return f"{f.key} {f.rel!r}: cannot check {current}: {exc.strerror}"
        if stat.S_ISLNK(st.st_mode):
            return f"{f.key} {f.rel!r} passes through a symlink at {current}"
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            return f"{f.key} {f.rel!r}: {current} is not a directory"
        if last and not stat.S_ISREG(st.st_mode):
            return f"{f.key} {f.rel!r}: {current} exists and is not a regular file"
    return None


def _ensure_dir(root: str, f: LayoutFile) -> list[str]:
    """Create the file's directory (0755) below ``root``, refusing symlinks.

    Returns the directories created, outermost first (their parents need a sync).
    """
    created: list[str] = []
    if not os.path.isdir(root):
        missing = []
        d = root
        while not os.path.isdir(d):
            missing.append(d)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o755)
                os.chmod(d, 0o755)  # noqa: S103 - dirs must be reachable whatever the umask
                created.append(d)
            except FileExistsError:
                pass
            except OSError as exc:
                raise PermanentError(f"cannot create {d}: {exc.strerror}") from exc
    if f.dir == root:
        return created
    current = root
    for part in os.path.relpath(f.dir, root).split(os.sep):
        current = os.path.join(current, part)
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
                os.chmod(current, 0o755, follow_symlinks=False)  # noqa: S103 - as above
            except FileExistsError:
                st = os.lstat(current)
            except OSError as exc:
                raise PermanentError(f"cannot create {current}: {exc.strerror}") from exc
            else:
                created.append(current)
                continue
        if stat.S_ISLNK(st.st_mode):
            raise UnsafeValueError(f"{f.key} {f.rel!r} passes through a symlink at {current}")
        if not stat.S_ISDIR(st.st_mode):
            raise PermanentError(f"{f.key} {f.rel!r}: {current} is not a directory")
    return created


# ------------------------------------------------------------------ content


class Contents:
    """The bytes of each role for one material, built on demand."""

    def __init__(self, material: Material, password: Secret | str | None) -> None:
        self.m = material
        self.password = password

    def key(self) -> bytes:
        if self.m.key_pem is None:
            raise PermanentError(
                f"{self.m.cert}: certctl does not hold this certificate's private key "
                "(custody: target), so it cannot write a key, combined or PKCS#12 file"
            )
        return self.m.key_pem.reveal()

    def get(self, role: str) -> bytes:
        m = self.m
        if role == "cert":
            return m.cert_pem
        if role == "chain":
            return m.chain_pem
        if role == "fullchain":
            return m.cert_pem + m.chain_pem
        if role == "key":
            return self.key()
        if role == "combined":
            return m.cert_pem + m.chain_pem + self.key()
        if role == "pkcs12":
            return self.pkcs12()
        raise PermanentError(f"unknown file role {role!r}")

    def pkcs12(self) -> bytes:
        key = pki.load_key_pem(self.key())
        leaf = pki.load_cert_pem(self.m.cert_pem)
        chain = pki.parse_pem_chain(self.m.chain_pem)
        pw = password_bytes(self.password)
        enc: serialization.KeySerializationEncryption
        if pw:
            enc = (
                serialization.PrivateFormat.PKCS12.encryption_builder()
                .kdf_rounds(100_000)
                .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                .hmac_hash(hashes.SHA256())
                .build(pw)
            )
        else:
            enc = serialization.NoEncryption()
        return pkcs12.serialize_key_and_certificates(
            self.m.cert.encode(), key, leaf, chain or None, enc
        )

    def same_pkcs12(self, existing: bytes) -> bool:
        """Whether an existing PKCS#12 file holds exactly this key, leaf and chain."""
        try:
            p12 = pkcs12.load_pkcs12(existing, password_bytes(self.password) or None)
        except (ValueError, TypeError):
            return False
        if p12.key is None or p12.cert is None:
            return False
        want_key = pki.load_key_pem(self.key())
        der = serialization.Encoding.DER
        fmt = serialization.PrivateFormat.PKCS8
        none = serialization.NoEncryption()
        if p12.key.private_bytes(der, fmt, none) != want_key.private_bytes(der, fmt, none):
            return False
        have = [p12.cert.certificate, *(c.certificate for c in p12.additional_certs)]
        want = [pki.load_cert_pem(self.m.cert_pem), *pki.parse_pem_chain(self.m.chain_pem)]
        return [c.fingerprint(hashes.SHA256()) for c in have] == [
            c.fingerprint(hashes.SHA256()) for c in want
        ]


def password_bytes(value: Secret | str | None) -> bytes:
    if value is None:
        return b""
    return (value.reveal() if isinstance(value, Secret) else value).encode()


def pkcs12_leaf(data: bytes, password: Secret | str | None) -> x509.Certificate | None:
    try:
        p12 = pkcs12.load_pkcs12(data, password_bytes(password) or None)
    except (ValueError, TypeError):
        return None
    return p12.cert.certificate if p12.cert is not None else None


def _stage_file(f: LayoutFile, layout: Layout, contents: Contents) -> _Op:
    """Compare one file with what it should hold; write a temp if it differs."""
    try:
        st: os.stat_result | None = os.lstat(f.path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise UnsafeValueError(f"{f.key} {f.rel!r}: {f.path} is {kind}; refusing to replace it")
    want_uid = layout.uid if layout.uid is not None else -1
    want_gid = layout.gid if layout.gid is not None else -1
    attrs_ok = (
        st is not None
        and stat.S_IMODE(st.st_mode) == f.mode
        and (layout.uid is None or st.st_uid == layout.uid)
        and (layout.gid is None or st.st_gid == layout.gid)
    )
    old: bytes | None = None
    if f.role == "pkcs12":
        if st is not None and (attrs_ok or layout.backups == 0):
            old = _read_for(f)
        if attrs_ok and old is not None and contents.same_pkcs12(old):
            assert st is not None
            return _Op(f, hashlib.sha256(old).hexdigest(), st.st_size, st.st_mtime_ns, existed=True)
        data = contents.pkcs12()
    else:
        data = contents.get(f.role)
        if st is not None and ((attrs_ok and st.st_size == len(data)) or layout.backups == 0):
            old = _read_for(f)
        if attrs_ok and old == data:
            assert st is not None
            return _Op(
                f, hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns, existed=True
            )
    try:
        tmp, tst = _write_temp(f, data, f.mode, want_uid, want_gid)
    except OSError as exc:
        raise PermanentError(f"cannot write next to {f.path}: {exc.strerror or exc}") from exc
    op = _Op(f, hashlib.sha256(data).hexdigest(), tst.st_size, tst.st_mtime_ns, tmp=tmp)
    if st is not None:
        op.existed = True
        if layout.backups == 0 and old is not None:
            op.old = SecretBytes(old)
            op.old_stat = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return op


def _read_for(f: LayoutFile) -> bytes:
    try:
        return read_nofollow(f.path)
    except OSError as exc:
        raise PermanentError(f"cannot read {f.path}: {exc.strerror or exc}") from exc


def _write_temp(
    f: LayoutFile, data: bytes, mode: int, uid: int, gid: int
) -> tuple[str, os.stat_result]:
    """Write ``data`` to a new temp file next to ``f`` (never following a symlink)."""
    tmp = os.path.join(f.dir, f".{f.name}{TEMP_MARK}{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600 if f.role in SECRET_ROLES else mode)
    try:
        if uid != -1 or gid != -1:
            st = os.fstat(fd)
            if (uid != -1 and uid != st.st_uid) or (gid != -1 and gid != st.st_gid):
                os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp, st


def read_nofollow(path: str) -> bytes:
    """The whole file, refusing to follow a symlink at its last component."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _sha256_file(path: str) -> str:
    return hashlib.sha256(read_nofollow(path)).hexdigest()


def _attr_problem(layout: Layout, stats: Mapping[str, os.stat_result]) -> str | None:
    for f in layout.files:
        st = stats[f.role]
        if not stat.S_ISREG(st.st_mode):
            return f"{f.role} file {f.path} is not a regular file"
        if stat.S_IMODE(st.st_mode) != f.mode:
            return f"{f.role} file has mode {stat.S_IMODE(st.st_mode):04o}, expected {f.mode:04o}"
        if layout.uid is not None and st.st_uid != layout.uid:
            return f"{f.role} file is owned by uid {st.st_uid}, expected {layout.uid}"
        if layout.gid is not None and st.st_gid != layout.gid:
            return f"{f.role} file has gid {st.st_gid}, expected {layout.gid}"
    return None


def _rotate_backups(path: str, keep: int) -> tuple[SecretBytes, tuple[int, int, int]] | None:
    """``path.bak.1..keep-1`` move up one, then ``path.bak.1`` becomes a hard link to
    the current file. Returns the content and mode/uid/gid of the oldest backup it
    dropped (``path.bak.<keep>``), so that a rollback can put it back."""
    dropped = None
    oldest = f"{path}.bak.{keep}"
    with contextlib.suppress(FileNotFoundError):
        st = os.lstat(oldest)
        dropped = (
            SecretBytes(read_nofollow(oldest)),
            (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid),
        )
    for i in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}.bak.{i}", f"{path}.bak.{i + 1}")
    first = f"{path}.bak.1"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(first)
    os.link(path, first, follow_symlinks=False)
    return dropped


def _restore_backup(path: str, keep: int) -> None:
    """Undo :func:`_rotate_backups` plus the replace: ``.bak.1`` back to the live
    name and the older backups down one (the caller rewrites the dropped oldest)."""
    os.replace(f"{path}.bak.1", path)
    for i in range(2, keep + 1):
        with contextlib.suppress(FileNotFoundError):
            os.replace(f"{path}.bak.{i}", f"{path}.bak.{i - 1}")


def _remove_new_dirs(dirs: Sequence[str]) -> None:
    """Remove directories a stage created, innermost first, if they are empty."""
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _remove_temps(ops: Sequence[_Op]) -> None:
    for op in ops:
        if op.tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(op.tmp)
            op.tmp = None


def _state(staged: Staged) -> _StageState:
    st = staged.data.get("file")
    if not isinstance(st, _StageState):
        raise PermanentError("not a file-target stage")
    return st

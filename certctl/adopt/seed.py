"""The one path every import and adoption takes: emit YAML, validate, seed the state.

Order, and what each step leaves if the process dies right after it:

1. names are checked against the inventory (and the state): a collision is refused
   unless ``--prefix`` makes the names unique;
2. certbot's ``live/`` symlinks are replaced by regular files holding the same bytes
   (the ``file`` target never writes through a symlink) -- harmless: the rerun reads
   them as they are;
3. the YAML goes to a NEW file (exclusive create; the operator's files are never
   rewritten), with a comment on each entry saying where it came from;
4. the WHOLE inventory is loaded with the new file -- schema, references, policies,
   placements; problems remove the file and undo step 2 ("changes nothing");
5. under the apply lock, one state batch records for each certificate a version (the
   certificate, chain and -- encrypted -- key, with the issuer, key spec, names and
   profile digest the loaded inventory implies), a deployment record per placement
   for the files as they are on disk, and an ``adopt`` audit event. So the next plan
   is "no changes" rather than a reissue;
6. last, certbot's ``renewal/NAME.conf`` is renamed ``*.certctl-imported``.

Steps 2-6 hold the apply lock: an apply (the daemon's, an operator's) that loaded the
new file before step 5 would otherwise reissue every entry; it is refused instead.

An exception at any step undoes the steps before it. A crash (SIGKILL) after step 3
or 5 leaves entries the rerun recognises (same name, names and key in the inventory;
not yet, or already, in the state): it seeds or just finishes them, emitting nothing
twice -- a rerun converges without reissuing.

A certificate whose key certctl cannot read is recorded with key custody
``observed``: the planner reports and renews it but never deploys that version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import os
import stat
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from certctl import pki
from certctl.adopt.model import OBSERVED, AdoptError, Candidate, IssuerDraft, Takeover, key_id
from certctl.apply.records import new_version, settled
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import IssuedCert
from certctl.engine import Engine, default_holder
from certctl.errors import CertctlError, InventoryError
from certctl.faults import Failpoints
from certctl.inventory.loader import SUFFIXES
from certctl.model import (
    DeploymentRecord,
    FileRecord,
    Inventory,
    StateSnapshot,
)
from certctl.plan.planner import profile_for
from certctl.state.base import AuditEvent, Batch, NewVersion

_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
#: Suffix given to a certbot renewal configuration certctl took over.
DISABLED_SUFFIX = ".certctl-imported"


@dataclass
class Outcome:
    path: Path | None  # the YAML written (None for a dry run)
    yaml_text: str
    adopted: list[str] = field(default_factory=list)
    observe_only: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # finished for an interrupted run


def existing_inventory(engine: Engine) -> Inventory | None:
    """The inventory as it is, or None when the directory holds no inventory file yet.
    A broken inventory is refused: nothing can be validated against it."""
    root = engine.inventory_path
    if root.exists() and not root.is_dir():
        raise AdoptError(
            f"{root} is a file: imports write a new file beside the others, so -i must "
            "name the inventory directory"
        )
    if not root.exists() or not any(
        p.suffix in SUFFIXES and not p.name.startswith(".") for p in root.iterdir()
    ):
        return None
    try:
        return engine.inventory()
    except InventoryError as exc:
        raise AdoptError(f"the inventory does not load; fix it first:\n{exc}") from None


def assign_names(
    cands: Sequence[Candidate],
    inv: Inventory | None,
    snap: StateSnapshot | None,
    prefix: str,
) -> None:
    """Apply ``prefix`` and refuse names the inventory or the state already use."""
    taken_certs = set(inv.certificates) if inv else set()
    taken_targets = set(inv.targets) if inv else set()
    taken_issuers = set(inv.issuers) if inv else set()
    live = {n for n, r in (snap.certs.items() if snap else ()) if not r.retired}
    problems: list[str] = []
    seen: set[str] = set()
    new_issuers: dict[int, tuple[IssuerDraft, IssuerDraft]] = {}  # id -> (orig, renamed)
    seen_targets: set[str] = set()
    for c in cands:
        c.name = _unique(prefix + c.name, seen)
        if c.name in taken_certs or c.name in live:
            where = "the inventory" if c.name in taken_certs else "the state"
            problems.append(
                f"certificate {c.name!r} ({c.source}) already exists in {where}; "
                "use --prefix to adopt it under another name"
            )
        seen.add(c.name)
        if c.endpoint and inv is not None and c.name in inv.endpoints:
            problems.append(f"endpoint {c.name!r} already exists in the inventory; use --prefix")
        for t in c.targets:
            t.name = _unique(prefix + t.name, seen_targets)
            seen_targets.add(t.name)
            if t.name in taken_targets:
                problems.append(f"target {t.name!r} already exists in the inventory; use --prefix")
        if c.issuer.new:
            hit = new_issuers.get(id(c.issuer))
            if hit is not None:
                draft = hit[1]
            else:
                i_name = prefix + c.issuer.name
                if i_name in taken_issuers:
                    problems.append(
                        f"issuer {i_name!r} already exists in the inventory with another "
                        "configuration; use --prefix"
                    )
                draft = IssuerDraft(i_name, c.issuer.config, c.issuer.comment)
                new_issuers[id(c.issuer)] = (c.issuer, draft)
            c.issuer = draft
    if problems:
        raise AdoptError("\n".join(dict.fromkeys(problems)))


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... when this run already uses it (e.g. an
    RSA and an ECDSA certificate of one domain)."""
    out, n = name, 2
    while out in used:
        out, n = f"{name}-{n}", n + 1
    return out


def render_yaml(cands: Sequence[Candidate], header: Sequence[str]) -> str:
    """The inventory file: issuers, targets, certificates and endpoints, each with a
    comment saying where it came from. Field names are the inventory schema's own."""
    # one line each: a newline (a directory name may hold one) would end the comment
    lines = [f"# {_one_line(h)}" if h else "#" for h in header]
    issuers: dict[str, IssuerDraft] = {}
    for c in cands:
        if c.issuer.new:
            issuers.setdefault(c.issuer.name, c.issuer)
    if issuers:
        lines.append("issuers:")
        for d in issuers.values():
            lines += _entry(d.name, d.config, [d.comment])
    targets = [t for c in cands for t in c.targets]
    if targets:
        lines.append("targets:")
        for t in targets:
            lines += _entry(t.name, t.config, [t.comment])
    lines.append("certificates:")
    for c in cands:
        names = c.names
        body: dict[str, Any] = {"common_name": names[0]}
        if len(names) > 1:
            body["sans"] = names[1:]
        body["issuer"] = c.issuer.name
        body["key"] = c.key
        if c.renew_before:
            body["renew_before"] = c.renew_before
        if c.targets:
            body["targets"] = [t.name for t in c.targets]
        comments = [
            f"from {c.source}",
            f"serial {pki.serial_hex(c.leaf.serial_number)}, expires "
            f"{c.not_after.strftime('%Y-%m-%dT%H:%M:%SZ')}, sha256 {c.fingerprint[:16]}...",
        ]
        if c.key_pem is None:
            comments.append(
                "OBSERVE ONLY until its next renewal: certctl does not hold its private key; "
                "it reports expiry and at renewal issues a new key and deploys it"
            )
        comments += [f"NOTE: {n}" for n in c.notes]
        lines += _entry(c.name, body, comments)
    endpoints = [(c.name, {**c.endpoint, "certificate": c.name}) for c in cands if c.endpoint]
    if endpoints:
        lines.append("endpoints:")
        for name, ep in endpoints:
            assert ep is not None
            lines += _entry(name, ep, [f"where {name} was found serving"])
    return "\n".join(lines) + "\n"


def _entry(name: str, body: Any, comments: Sequence[str]) -> list[str]:
    out = [
        f"  # {part}"
        for c in comments
        if c
        for part in textwrap.wrap(_one_line(c), 96, break_on_hyphens=False)
    ]
    text = yaml.dump(
        {name: _literal(body)},
        Dumper=_DUMPER,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=False,
        width=100,
    )
    out += ["  " + ln for ln in text.rstrip("\n").split("\n")]
    return out


def _literal(value: Any) -> Any:
    """Strings the inventory must take literally: the loader renders string values as
    Jinja2 templates, so a found value holding ``{{``, ``{%`` or ``{#`` (a shell hook's
    ``${#x}``, say) is wrapped in a raw block."""
    if isinstance(value, str):
        if any(m in value for m in ("{{", "{%", "{#")):
            return (
                "{% raw %}"
                + value.replace("{% endraw %}", "{% endraw %}{{ '{% endraw %}' }}{% raw %}")
                + "{% endraw %}"
            )
        return value
    if isinstance(value, dict):
        return {k: _literal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _one_line(text: str) -> str:
    return " ".join(text.replace("\x00", "").split())[:400]


def default_out(root: Path, now: datetime) -> Path:
    return root / f"adopted-{now.strftime('%Y%m%dT%H%M%SZ')}.yaml"


def check_out(root: Path, out: Path) -> Path:
    out = out.expanduser().absolute()
    if out.parent.resolve() != root.resolve():
        raise AdoptError(
            f"--out {out} must be a file directly in the inventory directory {root} "
            "(the loader reads only that directory's *.yaml files)"
        )
    if out.suffix not in SUFFIXES or out.name.startswith("."):
        raise AdoptError(
            f"--out {out.name}: the name must end in .yaml or .yml, not start with '.'"
        )
    if os.path.lexists(out):
        raise AdoptError(f"{out} already exists; certctl never rewrites an inventory file")
    return out


def commit(
    engine: Engine,
    cands: Sequence[Candidate],
    yaml_text: str | None,
    out: Path | None,
    *,
    seed: Sequence[Candidate] | None = None,
) -> Outcome:
    """Take over, write, validate, seed, disable (see the module doc). An exception
    undoes every step done; a crash (SIGKILL) leaves a state the rerun finishes.

    ``cands`` are every candidate whose lineage is taken over and disabled, ``seed``
    those whose state is recorded (default: all), ``yaml_text`` the new file (None
    when every entry is already in the inventory: the rerun after a crash)."""
    root = engine.inventory_path
    root.mkdir(parents=True, exist_ok=True)
    if yaml_text is not None:
        assert out is not None
        out = check_out(root, out)
    to_seed = list(cands if seed is None else seed)
    faults = Failpoints()
    done: list[Takeover] = []
    disabled: list[tuple[str, str]] = []
    wrote = False
    # The apply lock from the first change to the last: once the YAML exists, an
    # apply that loaded it before the state is seeded would reissue every entry.
    store = engine.store()
    try:
        store.acquire_apply_lock(default_holder())
    except CertctlError as exc:
        raise AdoptError(f"{exc}; nothing was changed") from None
    try:
        # 1. regular files for the live/ symlinks: same bytes, harmless to a rerun
        _take_over_all([t for c in cands for t in c.takeovers], done)
        faults.hit("adopt_after_takeover")
        # 2. the new inventory file
        if yaml_text is not None:
            assert out is not None
            _write_new(out, yaml_text)
            wrote = True
        faults.hit("adopt_after_yaml")
        # 3. the whole inventory must validate with it
        engine._inventory = None  # reload with the new file
        try:
            inv = engine.inventory()
        except InventoryError as exc:
            gone = f" and {out.name} was removed" if wrote and out is not None else ""
            raise AdoptError(
                f"the inventory does not validate with the adopted entries; nothing was "
                f"adopted{gone}:\n{exc}"
            ) from None
        # 4. the state, in one transaction (under the apply lock, held throughout)
        if to_seed:
            snap = store.snapshot()
            store.write(build_batch(inv, snap, to_seed, engine.clock()))
        faults.hit("adopt_after_seed")
        # 5. last: the other tool stops renewing (a rerun still finds it before this)
        for c in cands:
            for conf in c.disable:
                if os.path.exists(conf):
                    os.rename(conf, conf + DISABLED_SUFFIX)
                    disabled.append((conf, conf + DISABLED_SUFFIX))
    except BaseException:
        for src_, dst in reversed(disabled):
            with contextlib.suppress(OSError):
                os.rename(dst, src_)
        for t in reversed(done):
            with contextlib.suppress(OSError):
                _undo_take_over(t)
        if wrote and out is not None:
            with contextlib.suppress(OSError):
                out.unlink()
        engine._inventory = None
        raise
    finally:
        store.release_apply_lock()
    return Outcome(
        out if wrote else None,
        yaml_text or "",
        [c.name for c in cands],
        [c.name for c in cands if c.key_pem is None],
    )


def build_batch(
    inv: Inventory, snap: StateSnapshot, cands: Sequence[Candidate], now: datetime
) -> Batch:
    """The state that makes the next plan "no changes" for each candidate."""
    batch = Batch()
    for c in cands:
        cert = inv.certificates.get(c.name)
        if cert is None:  # pragma: no cover - the file we wrote defines it
            raise AdoptError(f"certificate {c.name!r} is not in the loaded inventory")
        if sorted(cert.names) != sorted(c.names):
            raise AdoptError(
                f"{c.name}: the inventory's names {sorted(cert.names)} are not the "
                f"certificate's {sorted(c.names)}"
            )
        if cert.key.id != key_id(c.key):
            raise AdoptError(
                f"{c.name}: the inventory asks for a {cert.key.id} key but the certificate "
                f"has a {key_id(c.key)} key"
            )
        profile = profile_for(inv, cert)
        record = snap.certs.get(c.name)
        prev = record.current.version if record is not None and record.current else 0
        leaf = c.leaf
        found = IssuedCert(
            c.cert_pem,
            c.chain_pem,
            serial=pki.serial_hex(leaf.serial_number),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint=c.fingerprint,
        )
        version = new_version(
            cert,
            profile,
            prev + 1,
            found,
            key_custody=cert.key.custody if c.key_pem is not None else OBSERVED,
        )
        batch.cert_updates.append(settled(cert, profile))
        batch.versions.append(
            NewVersion(
                version, c.cert_pem, c.chain_pem, c.key_pem, revoke_on_remove=cert.revoke_on_remove
            )
        )
        if c.key_pem is not None:
            for p in cert.placements:
                files = placement_files(p.config, inv.root, c)
                batch.deployments.append(
                    DeploymentRecord(
                        cert=c.name,
                        placement=p.id,
                        version=version.version,
                        fingerprint=version.fingerprint,
                        files=files,
                        status="deployed",
                        deployed_at=now,
                        config_digest=p.config_digest(),
                    )
                )
        batch.audit.append(
            AuditEvent(
                "adopt",
                cert=c.name,
                detail={
                    "source": c.source,
                    "serial": version.serial,
                    "fingerprint": version.fingerprint,
                    "issuer": cert.issuer,
                    "observe_only": c.key_pem is None,
                },
            )
        )
    return batch


def placement_files(config: Any, inventory_root: Path, c: Candidate) -> dict[str, FileRecord]:
    """A record of each file of a (local) placement as it is now; its certificate file
    must hold the adopted leaf and its key file the adopted key."""
    # The file target's own path rules (confinement under root), shared by the service
    # targets; loaded by name like every built-in connector.
    filet: Any = importlib.import_module("certctl_connectors.targets.file")
    try:
        layout = filet.resolve_layout(config, str(inventory_root), None)
    except CertctlError as exc:  # a path the target would refuse
        raise AdoptError(f"{c.name}: {exc}") from None
    out: dict[str, FileRecord] = {}
    for f in layout.files:
        try:
            st = os.lstat(f.path)
            if not stat.S_ISREG(st.st_mode):
                raise AdoptError(f"{c.name}: {f.path} is not a regular file")
            data = filet.read_nofollow(f.path)
        except OSError as exc:
            raise AdoptError(f"{c.name}: cannot read {f.path}: {exc.strerror}") from None
        if f.role in ("cert", "fullchain", "combined"):
            try:
                found = pki.fingerprint(pki.load_cert_pem(data))
            except pki.PKIError:
                found = ""
            if found != c.fingerprint:
                raise AdoptError(f"{c.name}: {f.path} does not hold the adopted certificate")
        if f.role == "key" and c.key_pem is not None and data != c.key_pem.reveal():
            raise AdoptError(f"{c.name}: {f.path} does not hold the adopted key")
        out[f.role] = FileRecord(
            f.path, hashlib.sha256(data).hexdigest(), st.st_size, st.st_mtime_ns
        )
    return out


def _write_new(path: Path, text: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        raise AdoptError(
            f"{path} already exists; certctl never rewrites an inventory file"
        ) from None
    except OSError as exc:
        raise AdoptError(f"cannot create {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise


def _take_over_all(takeovers: Sequence[Takeover], done: list[Takeover]) -> None:
    """Replace each symlink by a regular file of the same bytes and mode: temps
    written, made durable together (one ``syncfs``), renamed over the links, then
    each directory synced once. ``done`` lists the links replaced (for undo)."""
    temps: list[tuple[Takeover, str]] = []
    try:
        for t in takeovers:
            st = os.lstat(t.path)
            if not stat.S_ISLNK(st.st_mode) or os.readlink(t.path) != t.link:
                raise AdoptError(f"{t.path} changed while importing; nothing was imported")
            d, n = os.path.split(t.path)
            tmp = os.path.join(d, f".{n}.certctl-takeover.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            temps.append((t, tmp))
            try:
                os.fchmod(fd, t.mode)
                view = memoryview(t.data.reveal())
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
        if not temps:
            return
        syncer = BatchSyncer()
        asyncio.run(syncer.sync_files([tmp for _, tmp in temps]))
        for t, tmp in temps:
            os.replace(tmp, t.path)
            done.append(t)
        asyncio.run(syncer.sync_dirs(sorted({os.path.dirname(t.path) for t in done})))
    finally:
        for _, tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _undo_take_over(t: Takeover) -> None:
    d, n = os.path.split(t.path)
    tmp = os.path.join(d, f".{n}.certctl-undo.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(t.link, tmp)
    os.replace(tmp, t.path)
    _fsync_dir(d)


def _fsync_dir(d: str) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(
    engine: Engine,
    cands: list[Candidate],
    *,
    header: Sequence[str],
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> Outcome:
    """Name, render and (unless ``dry_run``) commit the candidates.

    A candidate the inventory already defines with the same names and key, but that
    the state does not hold (an interrupted import wrote its YAML), is seeded without
    emitting it again; one the state already holds with the same certificate is done
    (only the other tool's configuration is still renamed). So rerunning an
    interrupted import converges without reissuing anything."""
    if not cands:
        raise AdoptError("nothing to adopt")
    inv = existing_inventory(engine)
    snap = None
    if inv is not None or (engine.inventory_path / ".certctl").exists():
        try:
            snap = engine.store().snapshot()
        except CertctlError:
            snap = None
    if inv is not None:
        _reuse_known_issuers(cands, inv)
    resumed: list[Candidate] = []
    finished: list[Candidate] = []
    fresh: list[Candidate] = []
    for c in cands:
        state = _resume_state(c, prefix, inv, snap)
        if state == "seed":
            c.name = prefix + c.name
            resumed.append(c)
        elif state == "done":
            c.name = prefix + c.name
            finished.append(c)
        else:
            fresh.append(c)
    assign_names(fresh, inv, snap, prefix)
    text = render_yaml(fresh, header) if fresh else None
    if dry_run:
        return Outcome(
            None,
            text or "",
            [c.name for c in cands],
            [c.name for c in cands if c.key_pem is None],
            resumed=[c.name for c in resumed + finished],
        )
    root = engine.inventory_path
    path = out if out is not None else default_out(root, engine.clock())
    outcome = commit(
        engine,
        [*fresh, *resumed, *finished],
        text,
        path if fresh else None,
        seed=[*fresh, *resumed],
    )
    outcome.resumed = [c.name for c in resumed + finished]
    return outcome


def _resume_state(
    c: Candidate, prefix: str, inv: Inventory | None, snap: StateSnapshot | None
) -> str | None:
    """``seed`` / ``done`` for a candidate an interrupted import left behind, else None."""
    if inv is None:
        return None
    cert = inv.certificates.get(prefix + c.name)
    if cert is None or sorted(cert.names) != sorted(c.names) or cert.key.id != key_id(c.key):
        return None
    record = snap.certs.get(cert.name) if snap is not None else None
    if record is None or record.current is None or record.retired:
        return "seed"
    if record.current.fingerprint == c.fingerprint:
        return "done"
    return None


def _reuse_known_issuers(cands: Sequence[Candidate], inv: Inventory) -> None:
    """An emitted ACME issuer whose directory an inventory issuer already uses is
    replaced by a reference to that issuer."""
    by_dir = {
        str(i.config.get("directory")): name
        for name, i in sorted(inv.issuers.items())
        if i.type == "acme" and i.config.get("directory")
    }
    for c in cands:
        if c.issuer.new and c.issuer.config.get("type") == "acme":
            known = by_dir.get(str(c.issuer.config.get("directory")))
            if known is not None:
                c.issuer = IssuerDraft(known, {}, "", new=False)

"""What both state backends share: the state directory, migrations, the encoding of
rows, the folding of a :class:`~certctl.state.base.Batch` into bulk statements, and
the lazy, verified state key.

The backends differ only in how they talk to their database; every rule about what a
write means lives here once, so SQLite and PostgreSQL cannot drift apart.
"""

from __future__ import annotations

import abc
import contextlib
import gc
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

from certctl.errors import StateError
from certctl.model import (
    CertRecord,
    DeploymentRecord,
    FileRecord,
    OpenIntent,
    Secret,
    SecretBytes,
    StateSnapshot,
    VersionRecord,
)
from certctl.state import crypto
from certctl.state.base import (
    Batch,
    NotificationRecord,
    RunRecord,
    RunStats,
    StateStore,
    StoredIntent,
)

STATE_DIR = ".certctl"
#: Chunk size for IN-lists / unnest arrays of batch reads.
READ_CHUNK = 500

# ---------------------------------------------------------------------------
# state directory


def ensure_state_dir(path: Path, *, gitignore: bool) -> Path:
    """Create the state directory private (0700); optionally with a ``.gitignore`` of
    ``*`` so the state never gets committed alongside the inventory."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateError(f"cannot create the state directory {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise StateError(f"{path} is not a directory")
    if gitignore:
        ignore = path / ".gitignore"
        if not ignore.exists():
            try:
                fd = os.open(
                    ignore,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o644,
                )
            except FileExistsError:
                pass
            except OSError as exc:
                raise StateError(f"cannot write {ignore}: {exc.strerror}") from None
            else:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write("*\n")
    return path


# ---------------------------------------------------------------------------
# migrations


@dataclass(frozen=True)
class Migration:
    number: int
    name: str  # file stem, e.g. "0001_initial"
    sql: str


def load_migrations(backend: str) -> list[Migration]:
    """The packaged migrations of one backend (``sqlite`` or ``postgres``), in order."""
    folder = resources.files("certctl.state").joinpath("migrations").joinpath(backend)
    out: list[Migration] = []
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        stem = entry.name[: -len(".sql")]
        head = stem.split("_", 1)[0]
        if not head.isdigit():
            raise StateError(f"migration file {entry.name} does not start with a number")
        out.append(Migration(int(head), stem, entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.number)
    numbers = [m.number for m in out]
    if len(set(numbers)) != len(numbers):
        raise StateError(f"duplicate {backend} migration numbers: {numbers}")
    return out


def check_not_newer(applied: int, known: Sequence[Migration], where: str) -> None:
    latest = known[-1].number if known else 0
    if applied > latest:
        raise StateError(
            f"{where} has schema version {applied}, newer than this certctl knows "
            f"({latest}); upgrade certctl"
        )


# ---------------------------------------------------------------------------
# values


def utc(dt: datetime) -> datetime:
    """The same instant in UTC. A naive datetime is taken to be UTC already."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def ts_text(dt: datetime | None) -> str | None:
    """SQLite timestamp encoding: fixed-width ISO-8601 in UTC with microseconds, so it
    round-trips exactly and sorts as text."""
    if dt is None:
        return None
    return utc(dt).isoformat(timespec="microseconds")


def ts_parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def ts_native(dt: datetime | None) -> datetime | None:
    """PostgreSQL timestamp encoding: a tz-aware datetime (timestamptz)."""
    return None if dt is None else utc(dt)


def ts_from_pg(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (Secret, SecretBytes)):
        raise StateError("refusing to store a secret value in a JSON column of the state")
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dump_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    except (TypeError, ValueError) as exc:
        raise StateError(f"cannot store a value in the state: {exc}") from None


def load_json(value: Any) -> Any:
    """Decode one JSON column value (text; objects pass through unchanged)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes, bytearray)):
        return json.loads(value)
    return value


def load_json_column(values: Sequence[str | None]) -> list[Any]:
    """Decode many small JSON texts at once.

    One ``json.loads`` over ``[v1,v2,...]`` is several times faster than one call per
    value (the per-call overhead dominates for small documents), which matters for a
    snapshot of 10,000+ rows. Each value was written by :func:`dump_json`, so it is one
    complete JSON document and splicing them into an array is safe.
    """
    if not values:
        return []
    return list(json.loads("[" + ",".join("null" if v is None else v for v in values) + "]"))


def files_to_json(files: Mapping[str, FileRecord]) -> str:
    """``{role: [path, sha256, size, mtime_ns]}``: compact, because a snapshot decodes
    one of these per deployment (10,000+)."""
    return dump_json({role: [f.path, f.sha256, f.size, f.mtime_ns] for role, f in files.items()})


def files_from_data(data: Mapping[str, Sequence[Any]] | None) -> dict[str, FileRecord]:
    if not data:
        return {}
    return {role: FileRecord(f[0], f[1], f[2], f[3]) for role, f in data.items()}


TsDecode = Callable[[Any], datetime | None]
TsEncode = Callable[[datetime | None], Any]


def _required(value: datetime | None) -> datetime:
    if value is None:
        raise StateError("the state holds a row without a required timestamp")
    return value


def version_from_row(
    row: Sequence[Any], ts: TsDecode, offset: int = 0, names: Any = None
) -> VersionRecord:
    """Build a VersionRecord from the VERSION_COLUMNS of a row, starting at ``offset``.
    ``names`` is the already decoded names column, when the caller decoded in bulk."""
    o = offset
    if names is None:
        names = load_json(row[o + 8])
    return VersionRecord(
        row[o],
        int(row[o + 1]),
        row[o + 2],
        _required(ts(row[o + 3])),
        _required(ts(row[o + 4])),
        row[o + 5],
        row[o + 6],
        row[o + 7],
        tuple(names or ()),
        row[o + 9],
        row[o + 10],
        row[o + 11],
        ts(row[o + 12]),
        row[o + 13],
    )


# SELECT lists shared by both backends. JSON columns are read as text (CAST works on
# both) so they can be decoded in bulk; see load_json_column.
VERSION_COLUMNS = (
    "cert, version, serial, not_before, not_after, fingerprint, issuer, key_spec, "
    "CAST(names AS TEXT), profile_digest, status, key_custody, revoked_at, revocation_reason"
)
SNAPSHOT_CERTS_SQL = (
    "SELECT c.name, c.revoke_on_remove, c.retired, c.failures, c.next_attempt_at, "
    "c.spec_digest, c.force_renew, "
    "v.cert, v.version, v.serial, v.not_before, v.not_after, v.fingerprint, v.issuer, "
    "v.key_spec, CAST(v.names AS TEXT), v.profile_digest, v.status, v.key_custody, "
    "v.revoked_at, v.revocation_reason "
    "FROM certificates c LEFT JOIN certificate_versions v "
    "ON v.cert = c.name AND v.version = c.current_version"
)
SNAPSHOT_DEPLOYMENTS_SQL = (
    "SELECT cert, placement, version, fingerprint, CAST(files AS TEXT), status, deployed_at, "
    "config_digest FROM deployments"
)
OPEN_INTENTS_SQL = (
    "SELECT id, run_id, cert, action, placement, CAST(payload AS TEXT), created_at, key_enc "
    "FROM journal WHERE closed_at IS NULL ORDER BY created_at, seq"
)


def build_snapshot(
    cert_rows: Sequence[Sequence[Any]],
    deployment_rows: Sequence[Sequence[Any]],
    intent_rows: Sequence[Sequence[Any]],
    generation: int,
    ts: TsDecode,
) -> StateSnapshot:
    """Turn the rows of the three snapshot queries into a StateSnapshot."""
    certs: dict[str, CertRecord] = {}
    all_names = load_json_column([r[15] for r in cert_rows])
    for row, names in zip(cert_rows, all_names, strict=True):
        current = version_from_row(row, ts, 7, names) if row[7] is not None else None
        certs[row[0]] = CertRecord(
            row[0],
            current,
            bool(row[1]),
            bool(row[2]),
            int(row[3]),
            ts(row[4]),
            row[5],
            bool(row[6]),
        )
    deployments: dict[tuple[str, str], DeploymentRecord] = {}
    all_files = load_json_column([r[4] for r in deployment_rows])
    for row, files in zip(deployment_rows, all_files, strict=True):
        deployments[(row[0], row[1])] = DeploymentRecord(
            row[0],
            row[1],
            int(row[2]),
            row[3],
            files_from_data(files),
            row[5],
            ts(row[6]),
            row[7],
        )
    payloads = load_json_column([r[5] for r in intent_rows])
    intents = tuple(
        OpenIntent(
            row[0],
            int(row[1] or 0),
            row[2],
            row[3],
            row[4],
            payload or {},
            _required(ts(row[6])),
        )
        for row, payload in zip(intent_rows, payloads, strict=True)
    )
    return StateSnapshot(certs, deployments, intents, generation)


def run_from_row(row: Sequence[Any], ts: TsDecode) -> RunRecord:
    return RunRecord(
        id=int(row[0]),
        kind=row[1],
        holder=row[2],
        started_at=_required(ts(row[3])),
        finished_at=ts(row[4]),
        status=row[5],
        summary=load_json(row[6]) or {},
    )


def audit_from_row(row: Sequence[Any], ts: TsDecode) -> dict[str, Any]:
    return {
        "id": int(row[0]),
        "at": ts(row[1]),
        "event": row[2],
        "cert": row[3],
        "placement": row[4],
        "run_id": row[5],
        "detail": load_json(row[6]) or {},
    }


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while bulk-building records.

    A snapshot of 10,000 certificates allocates a few hundred thousand objects, none of
    them cyclic garbage; with the collector running, the repeated collections that this
    triggers cost about a third of the snapshot's time. Reference counting still frees
    everything as usual. The collector is re-enabled only if it was enabled before, so
    a caller who turned it off keeps it off (the same technique as Mercurial's nogc).
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def chunks(items: Sequence[Any], size: int = READ_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# ---------------------------------------------------------------------------
# folding a Batch into bulk statements


@dataclass
class PreparedBatch:
    """A :class:`Batch` turned into rows for a handful of bulk statements.

    Run in this order (one transaction), they give exactly the Batch semantics:

    1. ``intents``: INSERT journal rows (``id, cert, action, placement, payload,
       key_enc, created_at, run_id``).
    2. ``closes``: UPDATE journal SET closed_at, outcome for still-open rows
       (``closed_at, outcome, id``); the first close of an intent wins.
    3. ``cert_updates``: create missing certificate rows, then set every field that is
       not None (``name, failures, next_attempt_at, clear_next_attempt, spec_digest,
       retired, force_renew, revoke_on_remove``); one row per certificate, later
       updates in the batch folded over earlier ones.
    4. ``supersede``: the existing active version of each certificate that gets a new
       version becomes 'superseded'.
    5. ``currents``: upsert certificates (``name, current_version, revoke_on_remove``).
    6. ``versions``: INSERT version rows; the last new version of a certificate in the
       batch is 'active', any earlier one in the same batch 'superseded'.
    7. ``deployments``: upsert (last one per (cert, placement) wins).
    8. ``revocations``: UPDATE versions (``revoked_at, reason, cert, version``).
    9. ``audit``: INSERT (``at, event, cert, placement, run_id, detail``).
    """

    intents: list[tuple[Any, ...]] = field(default_factory=list)
    closes: list[tuple[Any, ...]] = field(default_factory=list)
    cert_updates: list[tuple[Any, ...]] = field(default_factory=list)
    supersede: list[str] = field(default_factory=list)
    currents: list[tuple[Any, ...]] = field(default_factory=list)
    versions: list[tuple[Any, ...]] = field(default_factory=list)
    deployments: list[tuple[Any, ...]] = field(default_factory=list)
    revocations: list[tuple[Any, ...]] = field(default_factory=list)
    audit: list[tuple[Any, ...]] = field(default_factory=list)


def prepare_batch(
    batch: Batch,
    *,
    now: datetime,
    ts: TsEncode,
    run_id: int | None,
    cipher: Callable[[], crypto.StateCipher],
) -> PreparedBatch:
    """Encode, encrypt and fold ``batch``. ``cipher`` is only called when a key is
    present, so a batch without keys never needs the state key."""
    out = PreparedBatch()
    now_enc = ts(now)

    for it in batch.intents:
        key_enc = None
        if it.key_pem is not None:
            key_enc = cipher().encrypt(it.key_pem.reveal(), crypto.aad_intent(it.id))
        out.intents.append(
            (
                it.id,
                it.cert,
                it.action,
                it.placement,
                dump_json(dict(it.payload)),
                key_enc,
                now_enc,
                run_id,
            )
        )

    seen_close: set[str] = set()
    for intent_id, outcome in batch.closed_intents:
        if intent_id not in seen_close:
            seen_close.add(intent_id)
            out.closes.append((now_enc, outcome, intent_id))

    folded: dict[str, dict[str, Any]] = {}
    for u in batch.cert_updates:
        d = folded.setdefault(u.name, {"clear": False})
        for attr in ("failures", "spec_digest", "retired", "force_renew", "revoke_on_remove"):
            value = getattr(u, attr)
            if value is not None:
                d[attr] = value
        if u.next_attempt_at is not None:
            d["next_attempt_at"] = ts(u.next_attempt_at)
            d["clear"] = False
        if u.clear_next_attempt:  # wins over a value given in the same update
            d["next_attempt_at"] = None
            d["clear"] = True
    for name, d in folded.items():
        out.cert_updates.append(
            (
                name,
                d.get("failures"),
                d.get("next_attempt_at"),
                d["clear"],
                d.get("spec_digest"),
                d.get("retired"),
                d.get("force_renew"),
                d.get("revoke_on_remove"),
            )
        )

    last_of: dict[str, int] = {}
    for i, nv in enumerate(batch.versions):
        last_of[nv.record.cert] = i
    currents: dict[str, tuple[Any, ...]] = {}
    for i, nv in enumerate(batch.versions):
        rec = nv.record
        key_enc = None
        if nv.key_pem is not None:
            key_enc = cipher().encrypt(
                nv.key_pem.reveal(), crypto.aad_version(rec.cert, rec.version)
            )
        status = "active" if last_of[rec.cert] == i else "superseded"
        out.versions.append(
            (
                rec.cert,
                rec.version,
                rec.serial,
                ts(rec.not_before),
                ts(rec.not_after),
                rec.fingerprint,
                rec.issuer,
                rec.key_spec,
                dump_json(list(rec.names)),
                rec.profile_digest,
                status,
                rec.key_custody,
                ts(rec.revoked_at),
                rec.revocation_reason,
                bytes(nv.cert_pem),
                bytes(nv.chain_pem),
                key_enc,
            )
        )
        currents[rec.cert] = (rec.cert, rec.version, bool(nv.revoke_on_remove))
    out.supersede = list(currents)
    out.currents = list(currents.values())

    deployments: dict[tuple[str, str], tuple[Any, ...]] = {}
    for dep in batch.deployments:
        deployments[(dep.cert, dep.placement)] = (
            dep.cert,
            dep.placement,
            dep.version,
            dep.fingerprint,
            files_to_json(dep.files),
            dep.status,
            ts(dep.deployed_at),
            dep.config_digest,
        )
    out.deployments = list(deployments.values())

    revocations: dict[tuple[str, int], tuple[Any, ...]] = {}
    for rv in batch.revocations:
        revocations[(rv.cert, rv.version)] = (ts(rv.revoked_at), rv.reason, rv.cert, rv.version)
    out.revocations = list(revocations.values())

    for ev in batch.audit:
        out.audit.append(
            (
                ts(ev.at) if ev.at is not None else now_enc,
                ev.event,
                ev.cert,
                ev.placement,
                ev.run_id,
                dump_json(dict(ev.detail)),
            )
        )
    return out


# ---------------------------------------------------------------------------
# the shared part of both stores


class BaseStore(StateStore):
    """Key handling and decryption helpers common to both backends.

    The state key is resolved lazily and verified against the check value in ``meta``:
    a store opened only to plan never needs (or creates) a key, but a key that is
    present and wrong is refused at open, and every apply checks it when it takes the
    lock, before any side effect.
    """

    def __init__(self, key_source: crypto.KeySource, clock: Callable[[], datetime]) -> None:
        self._keys = key_source
        self._clock = clock
        self._cipher_obj: crypto.StateCipher | None = None
        self._cipher_lock = threading.Lock()
        self._run_id: int | None = None

    # backends provide these two ------------------------------------------
    @abc.abstractmethod
    def _read_key_check(self) -> str | None:
        """The key check value recorded in meta, or None for a store without one."""

    @abc.abstractmethod
    def _record_key_check(self, value: str) -> str:
        """Record ``value`` unless one is already there; return the recorded one."""

    # ---------------------------------------------------------------------
    def _now(self) -> datetime:
        return utc(self._clock())

    def verify_key_if_present(self) -> None:
        """At open: if a key is configured or on disk, check it now (never creates one)."""
        key = self._keys.find()
        if key is not None:
            self._adopt(key)

    def _cipher(self) -> crypto.StateCipher:
        """The verified cipher; creates the key on first use in a store without one."""
        if self._cipher_obj is not None:
            return self._cipher_obj
        with self._cipher_lock:
            if self._cipher_obj is not None:
                return self._cipher_obj
            key = self._keys.find()
            if key is None:
                if self._read_key_check() is not None:
                    raise StateError(
                        "this state store holds data encrypted with a state key that is not "
                        f"available here: set ${crypto.ENV_VAR} or restore {self._keys.path}"
                    )
                key = self._keys.find_or_create()
            return self._adopt(key)

    def _adopt(self, key: bytes) -> crypto.StateCipher:
        cipher = crypto.StateCipher(key)
        recorded = self._read_key_check()
        if recorded is None:
            recorded = self._record_key_check(cipher.check_value)
        if recorded != cipher.check_value:
            raise StateError(
                f"state key does not match the one this store was created with "
                f"(key from {self._keys.describe()}); use the original key "
                f"(${crypto.ENV_VAR} or {self._keys.path})"
            )
        self._cipher_obj = cipher
        return cipher

    def _decrypt(self, blob: bytes | None, aad: bytes) -> SecretBytes | None:
        if blob is None:
            return None
        return SecretBytes(self._cipher().decrypt(bytes(blob), aad))

    def _stored_intent(self, row: Sequence[Any], ts: TsDecode) -> StoredIntent:
        return StoredIntent(
            id=row[0],
            cert=row[2],
            action=row[3],
            placement=row[4],
            payload=load_json(row[5]) or {},
            key_pem=self._decrypt(row[7], crypto.aad_intent(row[0])),
            created_at=_required(ts(row[6])),
        )

    def _material_from_row(
        self, row: Sequence[Any]
    ) -> tuple[tuple[str, int], tuple[bytes, bytes, SecretBytes | None]]:
        """Row (cert, version, cert_pem, chain_pem, key_enc) -> keyed material."""
        cert, version = row[0], int(row[1])
        key = self._decrypt(row[4], crypto.aad_version(cert, version))
        return (cert, version), (bytes(row[2]), bytes(row[3]), key)


# ---------------------------------------------------------------------------
# server reads (read API, OCSP, metrics) and API keys, written once for both backends
#
# The SQL below uses ``?`` placeholders; PostgreSQL's ``_query`` turns them into ``%s``.
# Keyset pagination compares and orders with the backend's byte-wise collation
# (``_collate``), so a cursor means the same position on both backends.

_CERT_PAGE = (
    "SELECT c.name, c.retired, c.failures, c.next_attempt_at, v.version, v.serial, v.issuer, "
    "v.not_before, v.not_after, v.status, v.revoked_at, v.revocation_reason, v.fingerprint, "
    "v.key_spec, CAST(v.names AS TEXT) "
    "FROM certificates c LEFT JOIN certificate_versions v "
    "ON v.cert = c.name AND v.version = c.current_version"
)
_DEPLOYMENT_PAGE = (
    "SELECT cert, placement, version, fingerprint, status, deployed_at, CAST(files AS TEXT) "
    "FROM deployments"
)
_RUN_PAGE = (
    "SELECT id, kind, holder, started_at, finished_at, status, CAST(summary AS TEXT) FROM runs"
)
_AUDIT_PAGE = "SELECT id, at, event, cert, placement, run_id, CAST(detail AS TEXT) FROM audit"


def cert_status(retired: bool, version_status: str | None) -> str:
    """The status the read API and metrics show for a certificate."""
    if retired:
        return "retired"
    if version_status is None:
        return "not_issued"
    return version_status  # active | revoked (the current version is never superseded)


class ServerReads(BaseStore):
    """:class:`BaseStore` plus everything written once over two backend primitives
    (``_query``/``_execute`` with ``?`` placeholders): the plain reads of the
    interface, the issuer vault, and the server's reads."""

    #: ``COLLATE`` clause giving byte-wise order (empty on SQLite: BINARY is the default).
    _collate = ""
    #: A run's duration in seconds (NULL while it runs), from its timestamp columns.
    _run_seconds = "(julianday(finished_at) - julianday(started_at)) * 86400.0"

    @abc.abstractmethod
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        """Run one read (``?`` placeholders) in its own transaction; all rows."""

    @abc.abstractmethod
    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one write (``?`` placeholders) in its own transaction; the rowcount."""

    @abc.abstractmethod
    def _ts_out(self, value: Any) -> datetime | None:
        """Decode a timestamp column."""

    @abc.abstractmethod
    def _ts_in(self, value: datetime | None) -> Any:
        """Encode a timestamp parameter."""

    # The plain reads of the StateStore interface, written once for both backends.
    def versions(self, cert: str) -> list[VersionRecord]:
        rows = self._query(
            f"SELECT {VERSION_COLUMNS} FROM certificate_versions "
            "WHERE cert = ? ORDER BY version DESC",
            (cert,),
        )
        return [version_from_row(r, self._ts_out) for r in rows]

    def certificate_pems(self, cert: str, version: int) -> tuple[bytes, bytes]:
        rows = self._query(
            "SELECT cert_pem, chain_pem FROM certificate_versions WHERE cert = ? AND version = ?",
            (cert, version),
        )
        if not rows:
            raise StateError(f"{cert}: version {version} is not in the state")
        return bytes(rows[0][0]), bytes(rows[0][1])

    def runs(self, limit: int = 20) -> list[RunRecord]:
        rows = self._query(
            "SELECT id, kind, holder, started_at, finished_at, status, summary "
            "FROM runs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [run_from_row(r, self._ts_out) for r in rows]

    def audit_log(self, limit: int = 100, cert: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT id, at, event, cert, placement, run_id, detail FROM audit"
        params: tuple[Any, ...] = ()
        if cert is not None:
            sql += " WHERE cert = ?"
            params = (cert,)
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [audit_from_row(r, self._ts_out) for r in rows]

    # The issuer vault (secret values encrypted, bound to issuer and key).
    def get(self, issuer: str, key: str) -> bytes | None:
        rows = self._query(
            "SELECT value, secret FROM issuer_vault WHERE issuer = ? AND key = ?", (issuer, key)
        )
        if not rows:
            return None
        value, secret = rows[0]
        if secret:
            return self._cipher().decrypt(bytes(value), crypto.aad_vault(issuer, key))
        return bytes(value)

    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None:
        stored = (
            self._cipher().encrypt(bytes(value), crypto.aad_vault(issuer, key))
            if secret
            else bytes(value)
        )
        self._execute(
            "INSERT INTO issuer_vault (issuer, key, value, secret, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (issuer, key) DO UPDATE SET "
            "value = excluded.value, secret = excluded.secret, "
            "updated_at = excluded.updated_at",
            (issuer, key, stored, bool(secret), self._ts_in(self._now())),
        )

    def generation(self) -> int:
        rows = self._query("SELECT generation FROM meta WHERE id = 1")
        return int(rows[0][0]) if rows else 0

    def find_serial(self, issuer: str, serial: str) -> VersionRecord | None:
        rows = self._query(
            f"SELECT {VERSION_COLUMNS} FROM certificate_versions "
            "WHERE issuer = ? AND serial = ? ORDER BY version DESC",
            (issuer, serial.lower()),
        )
        return version_from_row(rows[0], self._ts_out) if rows else None

    def list_certificates(
        self,
        *,
        after: str | None,
        limit: int,
        issuer: str | None = None,
        status: str | None = None,
        expiring_before: datetime | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if after is not None:
            where.append(f"c.name{self._collate} > ?")
            params.append(after)
        if issuer is not None:
            where.append("v.issuer = ?")
            params.append(issuer)
        if status == "retired":
            where.append("c.retired = ?")
            params.append(True)
        elif status == "not_issued":
            where.append("c.retired = ? AND v.version IS NULL")
            params.append(False)
        elif status is not None:
            where.append("c.retired = ? AND v.status = ?")
            params.extend((False, status))
        if expiring_before is not None:
            where.append("v.not_after < ?")
            params.append(self._ts_in(expiring_before))
        sql = _CERT_PAGE + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY c.name{self._collate} LIMIT ?"
        rows = self._query(sql, (*params, int(limit)))
        names = load_json_column([r[14] for r in rows])
        out = []
        ts = self._ts_out
        for r, n in zip(rows, names, strict=True):
            out.append(
                {
                    "name": r[0],
                    "status": cert_status(bool(r[1]), r[9]),
                    "failures": int(r[2]),
                    "next_attempt_at": ts(r[3]),
                    "version": r[4],
                    "serial": r[5],
                    "issuer": r[6],
                    "not_before": ts(r[7]),
                    "not_after": ts(r[8]),
                    "revoked_at": ts(r[10]),
                    "revocation_reason": r[11],
                    "fingerprint": r[12],
                    "key_spec": r[13],
                    "names": n or [],
                }
            )
        return out

    def list_deployments(
        self,
        *,
        after: tuple[str, str] | None,
        limit: int,
        cert: str | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        col = self._collate
        if after is not None:
            where.append(f"(cert{col} > ? OR (cert = ? AND placement{col} > ?))")
            params.extend((after[0], after[0], after[1]))
        if cert is not None:
            where.append("cert = ?")
            params.append(cert)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = _DEPLOYMENT_PAGE + (" WHERE " + " AND ".join(where) if where else "")
        sql += f" ORDER BY cert{col}, placement{col} LIMIT ?"
        rows = self._query(sql, (*params, int(limit)))
        files = load_json_column([r[6] for r in rows])
        return [
            {
                "cert": r[0],
                "placement": r[1],
                "version": int(r[2]),
                "fingerprint": r[3],
                "status": r[4],
                "deployed_at": self._ts_out(r[5]),
                "files": {role: f.path for role, f in files_from_data(fs).items()},
            }
            for r, fs in zip(rows, files, strict=True)
        ]

    def list_runs(
        self, *, before: int | None, limit: int, status: str | None = None
    ) -> list[RunRecord]:
        where: list[str] = []
        params: list[Any] = []
        if before is not None:
            where.append("id < ?")
            params.append(int(before))
        if status is not None:
            where.append("status = ?")
            params.append(status)
        sql = _RUN_PAGE + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit)))
        return [run_from_row(r, self._ts_out) for r in rows]

    def list_audit(
        self,
        *,
        before: int | None,
        limit: int,
        cert: str | None = None,
        event: str | None = None,
    ) -> list[dict[str, Any]]:
        where: list[str] = []
        params: list[Any] = []
        if before is not None:
            where.append("id < ?")
            params.append(int(before))
        if cert is not None:
            where.append("cert = ?")
            params.append(cert)
        if event is not None:
            where.append("event = ?")
            params.append(event)
        sql = _AUDIT_PAGE + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._query(sql + " ORDER BY id DESC LIMIT ?", (*params, int(limit)))
        return [audit_from_row(r, self._ts_out) for r in rows]

    def audit_counts(self) -> dict[str, int]:
        rows = self._query("SELECT event, COUNT(*) FROM audit GROUP BY event")
        return {str(r[0]): int(r[1]) for r in rows}

    def run_stats(self, bounds: Sequence[float]) -> list[RunStats]:
        within = "".join(", SUM(CASE WHEN d <= ? THEN 1 ELSE 0 END)" for _ in bounds)
        rows = self._query(
            f"SELECT kind, status, COUNT(*), COUNT(d), COALESCE(SUM(d), 0){within} "
            f"FROM (SELECT kind, status, {self._run_seconds} AS d FROM runs) AS r "
            "GROUP BY kind, status ORDER BY kind, status",
            [float(b) for b in bounds],
        )
        return [
            RunStats(
                str(r[0]),
                str(r[1]),
                int(r[2]),
                int(r[3]),
                float(r[4]),
                tuple(int(n or 0) for n in r[5:]),
            )
            for r in rows
        ]

    def create_api_key(self, name: str, token_hash: str) -> None:
        if not name or len(name) > 100:
            raise StateError("an API key name must be 1 to 100 characters")
        if self._query("SELECT 1 FROM api_keys WHERE name = ?", (name,)):
            raise StateError(f"an API key named {name!r} already exists")
        self._execute(
            "INSERT INTO api_keys (name, token_hash, created_at) VALUES (?, ?, ?)",
            (name, token_hash, self._ts_in(utc(datetime.now(UTC)))),
        )

    def api_keys(self) -> list[tuple[str, str]]:
        rows = self._query("SELECT name, token_hash FROM api_keys ORDER BY name")
        return [(str(r[0]), str(r[1])) for r in rows]

    def delete_api_key(self, name: str) -> bool:
        return self._execute("DELETE FROM api_keys WHERE name = ?", (name,)) > 0

    # --- notifications (migration 0003) -----------------------------------
    def enqueue_notifications(self, items: Sequence[NotificationRecord], now: datetime) -> int:
        at = self._ts_in(utc(now))
        added = 0
        # Several rows per statement (one transaction each), duplicates ignored.
        for part in chunks(list(items), 50):
            values = ", ".join("(?, ?, ?, ?, ?, 'pending', 0, ?, NULL, ?, ?)" for _ in part)
            params: list[Any] = []
            for n in part:
                params += [n.key, n.notifier, n.event, n.cert, dump_json(n.payload), at, at, at]
            added += self._execute(
                "INSERT INTO notifications (key, notifier, event, cert, payload, status, "
                "attempts, next_attempt_at, last_error, created_at, updated_at) VALUES "
                + values
                + " ON CONFLICT (key, notifier) DO NOTHING",
                params,
            )
        return added

    def due_notifications(self, now: datetime, limit: int = 1000) -> list[NotificationRecord]:
        rows = self._query(
            _NOTIFICATION_SELECT + " WHERE status = 'pending' AND next_attempt_at <= ? "
            "ORDER BY created_at, key, notifier LIMIT ?",
            (self._ts_in(utc(now)), int(limit)),
        )
        return [self._notification(r) for r in rows]

    def claim_notification(self, key: str, notifier: str, now: datetime, until: datetime) -> bool:
        return (
            self._execute(
                "UPDATE notifications SET next_attempt_at = ?, updated_at = ? "
                "WHERE key = ? AND notifier = ? AND status = 'pending' AND next_attempt_at <= ?",
                (
                    self._ts_in(utc(until)),
                    self._ts_in(utc(now)),
                    key,
                    notifier,
                    self._ts_in(utc(now)),
                ),
            )
            == 1
        )

    def finish_notification(
        self,
        key: str,
        notifier: str,
        *,
        status: str,
        attempts: int,
        next_attempt_at: datetime | None,
        error: str | None,
        now: datetime,
    ) -> None:
        if status not in ("pending", "sent", "dead"):
            raise StateError(f"unknown notification status {status!r}")
        self._execute(
            "UPDATE notifications SET status = ?, attempts = ?, next_attempt_at = ?, "
            "last_error = ?, updated_at = ? WHERE key = ? AND notifier = ?",
            (
                status,
                int(attempts),
                self._ts_in(utc(next_attempt_at)) if next_attempt_at is not None else None,
                error,
                self._ts_in(utc(now)),
                key,
                notifier,
            ),
        )

    def list_notifications(
        self, *, status: str | None = None, limit: int = 1000
    ) -> list[NotificationRecord]:
        sql = _NOTIFICATION_SELECT
        params: list[Any] = []
        if status is not None:
            sql += " WHERE status = ?"
            params.append(status)
        rows = self._query(
            sql + " ORDER BY updated_at DESC, key, notifier LIMIT ?", (*params, int(limit))
        )
        return [self._notification(r) for r in rows]

    def _notification(self, r: Sequence[Any]) -> NotificationRecord:
        return NotificationRecord(
            key=str(r[0]),
            notifier=str(r[1]),
            event=str(r[2]),
            cert=r[3],
            payload=load_json(r[4]) or {},
            status=str(r[5]),
            attempts=int(r[6]),
            next_attempt_at=self._ts_out(r[7]),
            last_error=r[8],
            created_at=self._ts_out(r[9]),
            updated_at=self._ts_out(r[10]),
        )


_NOTIFICATION_SELECT = (
    "SELECT key, notifier, event, cert, payload, status, attempts, next_attempt_at, "
    "last_error, created_at, updated_at FROM notifications"
)

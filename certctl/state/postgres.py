"""The PostgreSQL state store (psycopg 3 + psycopg_pool).

Same semantics as :mod:`certctl.state.sqlite`; the rules live in
:mod:`certctl.state.common`. What differs:

* A :class:`psycopg_pool.ConnectionPool` (autocommit connections, explicit
  transactions) serves every thread; the executor's writer thread and the main thread
  each borrow their own connection.
* ``write(batch)`` is ONE transaction of about ten statements sent in pipeline mode;
  every row list travels as arrays (binary parameters: no text escaping of PEM blobs)
  and is expanded server-side with ``unnest``, so a batch of a thousand rows costs the
  same few round-trips as a batch of one.
* The apply lock is a session advisory lock on a dedicated connection kept for the
  lock's lifetime: when the process dies, the server ends the session and the lock
  with it. The holder is recorded in the ``locks`` table together with the backend pid,
  so a loser can name who holds it. ``migrate()`` runs under a transaction-level
  advisory lock.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from certctl.errors import LockedError, StateError
from certctl.model import SecretBytes, StateSnapshot
from certctl.state import agents, common, crypto, findings
from certctl.state.base import Batch, StoredIntent

_ts = common.ts_native
_dt = common.ts_from_pg

# Advisory lock keys (two-int form): class 'cert', object 1 = apply, 2 = migrations.
_LOCK_CLASS = 0x63657274
_LOCK_APPLY = 1
_LOCK_MIGRATE = 2

_INSERT_INTENTS = """
INSERT INTO journal (id, cert, action, placement, payload, key_enc, created_at, run_id)
SELECT t.id, t.cert, t.action, t.placement, t.payload::jsonb, t.key_enc, t.created_at, t.run_id
FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bytea[],
            %b::timestamptz[], %b::bigint[])
     WITH ORDINALITY AS t(id, cert, action, placement, payload, key_enc, created_at, run_id, n)
ORDER BY t.n
"""
_CLOSE_INTENTS = """
UPDATE journal j SET closed_at = t.closed_at, outcome = t.outcome
FROM unnest(%b::timestamptz[], %b::text[], %b::text[]) AS t(closed_at, outcome, id)
WHERE j.id = t.id AND j.closed_at IS NULL
"""
_ENSURE_CERTS = (
    "INSERT INTO certificates (name) SELECT unnest(%b::text[]) ON CONFLICT (name) DO NOTHING"
)
_UPDATE_CERTS = """
UPDATE certificates c SET
    failures = COALESCE(t.failures, c.failures),
    next_attempt_at = CASE WHEN t.clear THEN NULL ELSE COALESCE(t.nat, c.next_attempt_at) END,
    spec_digest = COALESCE(t.spec, c.spec_digest),
    retired = COALESCE(t.retired, c.retired),
    force_renew = COALESCE(t.force, c.force_renew),
    revoke_on_remove = COALESCE(t.ror, c.revoke_on_remove)
FROM unnest(%b::text[], %b::integer[], %b::timestamptz[], %b::boolean[], %b::text[],
            %b::boolean[], %b::boolean[], %b::boolean[])
     AS t(name, failures, nat, clear, spec, retired, force, ror)
WHERE c.name = t.name
"""
_SUPERSEDE = (
    "UPDATE certificate_versions SET status = 'superseded' "
    "WHERE status = 'active' AND cert = ANY(%b::text[])"
)
_UPSERT_CURRENT = """
INSERT INTO certificates (name, current_version, revoke_on_remove)
SELECT * FROM unnest(%b::text[], %b::integer[], %b::boolean[])
ON CONFLICT (name) DO UPDATE SET current_version = EXCLUDED.current_version,
                                 revoke_on_remove = EXCLUDED.revoke_on_remove
"""
_INSERT_VERSIONS = """
INSERT INTO certificate_versions (cert, version, serial, not_before, not_after, fingerprint,
    issuer, key_spec, names, profile_digest, status, key_custody, revoked_at,
    revocation_reason, cert_pem, chain_pem, key_enc)
SELECT t.cert, t.version, t.serial, t.not_before, t.not_after, t.fingerprint, t.issuer,
       t.key_spec, t.names::jsonb, t.profile_digest, t.status, t.key_custody, t.revoked_at,
       t.revocation_reason, t.cert_pem, t.chain_pem, t.key_enc
FROM unnest(%b::text[], %b::integer[], %b::text[], %b::timestamptz[], %b::timestamptz[],
            %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
            %b::timestamptz[], %b::text[], %b::bytea[], %b::bytea[], %b::bytea[])
     AS t(cert, version, serial, not_before, not_after, fingerprint, issuer, key_spec, names,
          profile_digest, status, key_custody, revoked_at, revocation_reason, cert_pem,
          chain_pem, key_enc)
"""
_UPSERT_DEPLOYMENTS = """
INSERT INTO deployments (cert, placement, version, fingerprint, files, status, deployed_at,
                         config_digest)
SELECT t.cert, t.placement, t.version, t.fingerprint, t.files::jsonb, t.status,
       t.deployed_at, t.config_digest
FROM unnest(%b::text[], %b::text[], %b::integer[], %b::text[], %b::text[], %b::text[],
            %b::timestamptz[], %b::text[])
     AS t(cert, placement, version, fingerprint, files, status, deployed_at, config_digest)
ON CONFLICT (cert, placement) DO UPDATE SET
    version = EXCLUDED.version, fingerprint = EXCLUDED.fingerprint, files = EXCLUDED.files,
    status = EXCLUDED.status, deployed_at = EXCLUDED.deployed_at,
    config_digest = EXCLUDED.config_digest
"""
_REVOKE = """
UPDATE certificate_versions v SET status = 'revoked', revoked_at = t.revoked_at,
                                  revocation_reason = t.reason
FROM unnest(%b::timestamptz[], %b::text[], %b::text[], %b::integer[])
     AS t(revoked_at, reason, cert, version)
WHERE v.cert = t.cert AND v.version = t.version
"""
_INSERT_AUDIT = """
INSERT INTO audit (at, event, cert, placement, run_id, detail)
SELECT t.at, t.event, t.cert, t.placement, t.run_id, t.detail::jsonb
FROM unnest(%b::timestamptz[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::text[])
     WITH ORDINALITY AS t(at, event, cert, placement, run_id, detail, n)
ORDER BY t.n
"""
_HOLDER = """
SELECT l.pid, k.holder, a.application_name
FROM pg_locks l
LEFT JOIN locks k ON k.name = 'apply' AND k.backend_pid = l.pid
LEFT JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s
  AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Transpose rows into one list per column (psycopg sends lists as arrays)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(col) for col in zip(*rows, strict=True)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresStore(
    agents.AgentStore, findings.FindingsStore, common.ServerReads, common.BaseStore
):
    """State in a PostgreSQL database. See the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        where: str,
        key_dir: Path,
        clock: Callable[[], datetime],
        pool_size: int = 4,
        timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        keys = crypto.KeySource(
            key_dir,
            os.environ if env is None else env,
            prepare_dir=lambda d: common.ensure_state_dir(d, gitignore=True),
        )
        super().__init__(keys, clock)
        self.url = url
        self._where = where  # the URL with its password redacted, for messages
        self._timeout = timeout
        self._lock_conn: psycopg.Connection[Any] | None = None
        self._apply_holder: str | None = None
        self._lock_mutex = threading.Lock()
        # Connect once directly: a wrong host, database or password gives libpq's own
        # one-line reason at once, instead of a pool timing out in the background.
        try:
            probe = psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True)
        except psycopg.Error as exc:
            raise StateError(
                f"cannot connect to the state store {where}: {_first_line(exc)}"
            ) from None
        probe.close()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            open=True,
            timeout=timeout,
            name="certctl-state",
            kwargs={"autocommit": True, "connect_timeout": max(1, int(timeout))},
            configure=self._configure,
        )
        try:
            self._pool.wait(timeout=timeout)
        except PoolTimeout:
            self._pool.close()
            raise StateError(
                f"cannot connect to the state store {where}: no connection within {timeout:g}s"
            ) from None

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET TIME ZONE 'UTC'")

    @contextlib.contextmanager
    def _conn(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; database and pool failures become StateError."""
        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                yield conn
        except PoolTimeout:
            raise StateError(
                f"state store {self._where}: no database connection available within "
                f"{self._timeout:g}s"
            ) from None
        except psycopg.Error as exc:
            raise StateError(f"state store {self._where}: {_first_line(exc)}") from None

    def close(self) -> None:
        self.release_apply_lock()
        self._pool.close()

    # ------------------------------------------------------------ migrations
    def migrate(self) -> list[str]:
        known = common.load_migrations("postgres")
        current = self.schema_version()
        common.check_not_newer(current, known, self._where)
        if known and current == known[-1].number:
            return []  # up to date: no lock, no DDL (a read-only role can still plan)
        applied_now: list[str] = []
        with self._conn() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, _LOCK_MIGRATE))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
            common.check_not_newer(max(done, default=0), known, self._where)
            for m in known:
                if m.number in done:
                    continue
                conn.execute(m.sql.encode())  # no parameters: may hold several statements
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                    (m.number, m.name, self._now()),
                )
                applied_now.append(m.name)
        return applied_now

    def schema_version(self) -> int:
        with self._conn() as conn:
            row = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if not row or not row[0]:
                return 0
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0) if row else 0

    # ------------------------------------------------------------ key check
    def _read_key_check(self) -> str | None:
        with self._conn() as conn:
            row = conn.execute("SELECT key_check FROM meta WHERE id = 1").fetchone()
        return None if row is None else row[0]

    def _record_key_check(self, value: str) -> str:
        with self._conn() as conn, conn.transaction():
            conn.execute(
                "UPDATE meta SET key_check = %s WHERE id = 1 AND key_check IS NULL", (value,)
            )
            row = conn.execute("SELECT key_check FROM meta WHERE id = 1").fetchone()
        assert row is not None
        return str(row[0])

    # ------------------------------------------------------------ apply lock
    def acquire_apply_lock(self, holder: str) -> None:
        self._cipher()  # an apply needs the key: fail before anything happens
        with self._lock_mutex:
            if self._lock_conn is not None:
                raise LockedError(self._apply_holder or holder)
            try:
                conn = psycopg.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=max(1, int(self._timeout)),
                    application_name=f"certctl apply: {holder}"[:63],
                )
            except psycopg.Error as exc:
                raise StateError(
                    f"cannot connect to the state store {self._where}: {_first_line(exc)}"
                ) from None
            try:
                row = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS, _LOCK_APPLY)
                ).fetchone()
                if not row or not row[0]:
                    other = self._holder_of_lock(conn)
                    conn.close()
                    raise LockedError(other)
                now = self._now()
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO locks (name, holder, pid, backend_pid, acquired_at) "
                        "VALUES ('apply', %s, %s, pg_backend_pid(), %s) "
                        "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, "
                        "pid = EXCLUDED.pid, backend_pid = EXCLUDED.backend_pid, "
                        "acquired_at = EXCLUDED.acquired_at",
                        (holder, os.getpid(), now),
                    )
                    # Any apply run still 'running' died with the previous lock holder.
                    conn.execute(
                        "UPDATE runs SET status = 'crashed', finished_at = %s "
                        "WHERE status = 'running' AND kind = 'apply'",
                        (now,),
                    )
            except psycopg.Error as exc:
                conn.close()
                raise StateError(
                    f"state store {self._where}: cannot take the apply lock: {_first_line(exc)}"
                ) from None
            self._lock_conn = conn
            self._apply_holder = holder

    @staticmethod
    def _holder_of_lock(conn: psycopg.Connection[Any]) -> str:
        # The winner records its name right after taking the lock; give it a moment.
        fallback = "another certctl process (holder unknown)"
        for _ in range(25):
            rows = conn.execute(_HOLDER, (_LOCK_CLASS, _LOCK_APPLY)).fetchall()
            for _pid, holder, app in rows:
                if holder:
                    return str(holder)
                if app and str(app).startswith("certctl apply: "):
                    fallback = str(app)[len("certctl apply: ") :]
            if not rows:  # released meanwhile; say so rather than guess
                return fallback
            time.sleep(0.02)
        return fallback

    def release_apply_lock(self) -> None:
        with self._lock_mutex:
            conn = self._lock_conn
            if conn is None:
                return
            self._lock_conn = None
            self._apply_holder = None
        with contextlib.suppress(psycopg.Error):
            conn.execute(
                "DELETE FROM locks WHERE name = 'apply' AND backend_pid = pg_backend_pid()"
            )
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, _LOCK_APPLY))
        conn.close()  # ending the session releases the lock in any case

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> StateSnapshot:
        with common.gc_paused():
            with self._conn() as conn, conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                cur = conn.cursor(binary=True)
                certs = cur.execute(common.SNAPSHOT_CERTS_SQL).fetchall()
                deps = cur.execute(common.SNAPSHOT_DEPLOYMENTS_SQL).fetchall()
                intents = cur.execute(common.OPEN_INTENTS_SQL).fetchall()
                row = cur.execute("SELECT generation FROM meta WHERE id = 1").fetchone()
            generation = int(row[0]) if row else 0
            return common.build_snapshot(certs, deps, intents, generation, _dt)

    def material(self, cert: str, version: int) -> tuple[bytes, bytes, SecretBytes | None]:
        found = self.materials([(cert, version)])
        if (cert, version) not in found:
            raise StateError(f"{cert}: version {version} is not in the state")
        return found[(cert, version)]

    def materials(
        self, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[bytes, bytes, SecretBytes | None]]:
        wanted = sorted(set(keys))
        rows: list[Any] = []
        with self._conn() as conn:
            cur = conn.cursor(binary=True)
            for chunk in common.chunks(wanted):
                rows.extend(
                    cur.execute(
                        "SELECT v.cert, v.version, v.cert_pem, v.chain_pem, v.key_enc "
                        "FROM certificate_versions v "
                        "JOIN unnest(%b::text[], %b::integer[]) AS k(cert, version) "
                        "ON v.cert = k.cert AND v.version = k.version",
                        ([c for c, _ in chunk], [v for _, v in chunk]),
                    ).fetchall()
                )
        return dict(self._material_from_row(r) for r in rows)

    def open_intents(self) -> list[StoredIntent]:
        with self._conn() as conn:
            rows = conn.execute(common.OPEN_INTENTS_SQL).fetchall()
        return [self._stored_intent(r, _dt) for r in rows]

    def write(self, batch: Batch) -> None:
        if not batch:
            return
        p = common.prepare_batch(
            batch, now=self._now(), ts=_ts, run_id=self._run_id, cipher=self._cipher
        )
        with self._conn() as conn, conn.pipeline(), conn.transaction():
            cur = conn.cursor()
            if p.intents:
                cur.execute(_INSERT_INTENTS, _columns(p.intents, 8))
            if p.closes:
                cur.execute(_CLOSE_INTENTS, _columns(p.closes, 3))
            if p.cert_updates:
                cols = _columns(p.cert_updates, 8)
                cur.execute(_ENSURE_CERTS, (cols[0],))
                cur.execute(_UPDATE_CERTS, cols)
            if p.supersede:
                cur.execute(_SUPERSEDE, (p.supersede,))
                cur.execute(_UPSERT_CURRENT, _columns(p.currents, 3))
                cur.execute(_INSERT_VERSIONS, _columns(p.versions, 17))
            if p.deployments:
                cur.execute(_UPSERT_DEPLOYMENTS, _columns(p.deployments, 8))
            if p.revocations:
                cur.execute(_REVOKE, _columns(p.revocations, 4))
            if p.audit:
                cur.execute(_INSERT_AUDIT, _columns(p.audit, 6))
            cur.execute("UPDATE meta SET generation = generation + 1 WHERE id = 1")

    def begin_run(self, kind: str, holder: str, detail: Mapping[str, Any]) -> int:
        with self._conn() as conn:
            row = conn.execute(
                "INSERT INTO runs (kind, holder, started_at, status, summary) "
                "VALUES (%s, %s, %s, 'running', %s::jsonb) RETURNING id",
                (kind, holder, self._now(), common.dump_json(dict(detail))),
            ).fetchone()
        assert row is not None
        self._run_id = int(row[0])
        return self._run_id

    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None:
        with self._conn() as conn, conn.transaction():
            row = conn.execute(
                "SELECT summary FROM runs WHERE id = %s FOR UPDATE", (run_id,)
            ).fetchone()
            merged = {**(common.load_json(row[0]) if row else {}), **dict(summary)}
            conn.execute(
                "UPDATE runs SET status = %s, finished_at = %s, summary = %s::jsonb WHERE id = %s",
                (status, self._now(), common.dump_json(merged), run_id),
            )
        if self._run_id == run_id:
            self._run_id = None

    # ------------------------------------------------- server reads (common.py)
    _collate = ' COLLATE "C"'
    _run_seconds = "EXTRACT(EPOCH FROM finished_at - started_at)"

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self._conn() as conn:
            return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._conn() as conn:
            return int(conn.execute(sql.replace("?", "%s"), tuple(params)).rowcount)

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        with self._conn() as conn, conn.transaction(), conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), [tuple(r) for r in rows])
        return len(rows)

    def _ts_out(self, value: Any) -> datetime | None:
        return _dt(value)

    def _ts_in(self, value: datetime | None) -> Any:
        return _ts(value)

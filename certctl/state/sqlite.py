"""The embedded SQLite state store (the default).

One connection, shared by every thread under a :class:`threading.Lock` (the executor
writes from a worker thread while the main thread may read). WAL journal with
``synchronous=FULL``: every committed batch survives a power cut, and group commit
keeps the number of commits small. Transactions are explicit (``BEGIN IMMEDIATE`` for
writes, ``BEGIN`` for consistent multi-query reads).

The apply lock is an OS ``flock`` on ``<db>.lock``: it dies with the process (even on
SIGKILL), and the holder string written into the file lets a second acquirer name who
holds it, at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from certctl.errors import LockedError, StateError
from certctl.model import SecretBytes, StateSnapshot
from certctl.state import agents, common, crypto, findings
from certctl.state.base import Batch, StoredIntent

_ts = common.ts_text
_dt = common.ts_parse

_INSERT_INTENT = (
    "INSERT INTO journal (id, cert, action, placement, payload, key_enc, created_at, run_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_CLOSE_INTENT = "UPDATE journal SET closed_at = ?, outcome = ? WHERE id = ? AND closed_at IS NULL"
_UPSERT_CERT_UPDATE = """
INSERT INTO certificates
    (name, failures, next_attempt_at, spec_digest, retired, force_renew, revoke_on_remove)
VALUES
    (:name, COALESCE(:failures, 0), :nat, :spec, COALESCE(:retired, 0), COALESCE(:force, 0),
     COALESCE(:ror, 0))
ON CONFLICT (name) DO UPDATE SET
    failures = COALESCE(:failures, failures),
    next_attempt_at = CASE WHEN :clear THEN NULL ELSE COALESCE(:nat, next_attempt_at) END,
    spec_digest = COALESCE(:spec, spec_digest),
    retired = COALESCE(:retired, retired),
    force_renew = COALESCE(:force, force_renew),
    revoke_on_remove = COALESCE(:ror, revoke_on_remove)
"""
_SUPERSEDE = (
    "UPDATE certificate_versions SET status = 'superseded' WHERE cert = ? AND status = 'active'"
)
_UPSERT_CURRENT = (
    "INSERT INTO certificates (name, current_version, revoke_on_remove) VALUES (?, ?, ?) "
    "ON CONFLICT (name) DO UPDATE SET current_version = excluded.current_version, "
    "revoke_on_remove = excluded.revoke_on_remove"
)
_INSERT_VERSION = (
    "INSERT INTO certificate_versions (cert, version, serial, not_before, not_after, "
    "fingerprint, issuer, key_spec, names, profile_digest, status, key_custody, revoked_at, "
    "revocation_reason, cert_pem, chain_pem, key_enc) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_DEPLOYMENT = (
    "INSERT INTO deployments (cert, placement, version, fingerprint, files, status, "
    "deployed_at, config_digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (cert, placement) DO UPDATE SET version = excluded.version, "
    "fingerprint = excluded.fingerprint, files = excluded.files, status = excluded.status, "
    "deployed_at = excluded.deployed_at, config_digest = excluded.config_digest"
)
_REVOKE = (
    "UPDATE certificate_versions SET status = 'revoked', revoked_at = ?, revocation_reason = ? "
    "WHERE cert = ? AND version = ?"
)
_INSERT_AUDIT = (
    "INSERT INTO audit (at, event, cert, placement, run_id, detail) VALUES (?, ?, ?, ?, ?, ?)"
)


def _split_statements(sql: str) -> list[str]:
    """Split a migration script into complete statements (triggers included)."""
    out: list[str] = []
    buf = ""
    for line in sql.splitlines(keepends=True):
        if not buf and (not line.strip() or line.lstrip().startswith("--")):
            continue
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise StateError("a SQLite migration ends with an incomplete statement")
    return out


class SQLiteStore(agents.AgentStore, findings.FindingsStore, common.ServerReads, common.BaseStore):
    """State in one SQLite file. See the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        key_dir: Path,
        clock: Callable[[], datetime],
        env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(crypto.KeySource(key_dir, os.environ if env is None else env), clock)
        self.path = path
        self.url = f"sqlite:///{path}"
        self.lock_path = path.with_name(path.name + ".lock")
        self._db_lock = threading.Lock()
        self._apply_lock_fd: int | None = None
        self._apply_holder: str | None = None
        self._lock_mutex = threading.Lock()
        self._conn = self._connect()

    # ------------------------------------------------------------ connection
    def _connect(self) -> sqlite3.Connection:
        try:
            # Create the file private before SQLite does (its -wal/-shm copy the mode),
            # and refuse a symlink planted where the database should be.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        except OSError as exc:
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror
            raise StateError(f"cannot open the state database {self.path}: {why}") from None
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA temp_store = MEMORY")
            conn.execute("PRAGMA cache_size = -32768")  # 32 MiB
        except sqlite3.Error as exc:
            raise StateError(f"cannot open the state database {self.path}: {exc}") from None
        return conn

    @contextlib.contextmanager
    def _tx(self, mode: str = "IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """One transaction under the connection lock; SQLite errors become StateError."""
        with self._db_lock:
            conn = self._conn
            try:
                conn.execute(f"BEGIN {mode}")
            except sqlite3.Error as exc:
                raise StateError(f"state database {self.path}: {exc}") from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StateError(f"state database {self.path}: {exc}") from None
                raise

    def close(self) -> None:
        self.release_apply_lock()
        with self._db_lock, contextlib.suppress(sqlite3.Error):
            self._conn.close()

    # ------------------------------------------------------------ migrations
    def migrate(self) -> list[str]:
        known = common.load_migrations("sqlite")
        current = self.schema_version()
        common.check_not_newer(current, known, str(self.path))
        if known and current == known[-1].number:
            return []  # up to date: no write transaction (and no fsync) on every open
        applied_now: list[str] = []
        with self._tx("IMMEDIATE") as conn:  # the write lock serializes migrators
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations")}
            common.check_not_newer(max(done, default=0), known, str(self.path))
            for m in known:
                if m.number in done:
                    continue
                for stmt in _split_statements(m.sql):
                    conn.execute(stmt)
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (m.number, m.name, _ts(self._now())),
                )
                applied_now.append(m.name)
        return applied_now

    def schema_version(self) -> int:
        with self._tx("DEFERRED") as conn:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
            ).fetchone()
            if not exists:
                return 0
            row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # ------------------------------------------------------------ key check
    def _read_key_check(self) -> str | None:
        with self._tx("DEFERRED") as conn:
            row = conn.execute("SELECT key_check FROM meta WHERE id = 1").fetchone()
        return None if row is None else row[0]

    def _record_key_check(self, value: str) -> str:
        with self._tx("IMMEDIATE") as conn:
            conn.execute(
                "UPDATE meta SET key_check = ? WHERE id = 1 AND key_check IS NULL", (value,)
            )
            row = conn.execute("SELECT key_check FROM meta WHERE id = 1").fetchone()
        return str(row[0])

    # ------------------------------------------------------------ apply lock
    def acquire_apply_lock(self, holder: str) -> None:
        self._cipher()  # an apply needs the key: fail before anything happens
        with self._lock_mutex:
            self._acquire_locked(holder)

    def _acquire_locked(self, holder: str) -> None:
        if self._apply_lock_fd is not None:
            raise LockedError(self._apply_holder or holder)
        try:
            fd = os.open(
                self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise StateError(
                f"cannot open the lock file {self.lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = self._read_holder(fd)
            os.close(fd)
            raise LockedError(other) from None
        except OSError as exc:
            os.close(fd)
            raise StateError(f"cannot lock {self.lock_path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{holder}\n".encode(), 0)
            now = self._now()
            with self._tx("IMMEDIATE") as conn:
                conn.execute(
                    "INSERT INTO locks (name, holder, pid, backend_pid, acquired_at) "
                    "VALUES ('apply', ?, ?, NULL, ?) ON CONFLICT (name) DO UPDATE SET "
                    "holder = excluded.holder, pid = excluded.pid, "
                    "acquired_at = excluded.acquired_at",
                    (holder, os.getpid(), _ts(now)),
                )
                # Any apply run still 'running' died with the previous lock holder.
                conn.execute(
                    "UPDATE runs SET status = 'crashed', finished_at = ? "
                    "WHERE status = 'running' AND kind = 'apply'",
                    (_ts(now),),
                )
        except BaseException:
            os.close(fd)
            raise
        self._apply_lock_fd = fd
        self._apply_holder = holder

    @staticmethod
    def _read_holder(fd: int) -> str:
        # The winner writes its name right after taking the lock; give it a moment.
        for _ in range(20):
            data = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            if data:
                return data
            time.sleep(0.01)
        return "another certctl process (holder unknown)"

    def release_apply_lock(self) -> None:
        with self._lock_mutex:
            fd = self._apply_lock_fd
            if fd is None:
                return
            self._apply_lock_fd = None
            self._apply_holder = None
        with contextlib.suppress(StateError), self._tx("IMMEDIATE") as conn:
            conn.execute("DELETE FROM locks WHERE name = 'apply' AND pid = ?", (os.getpid(),))
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor drops the flock

    # ------------------------------------------------------------------ reads
    def snapshot(self) -> StateSnapshot:
        with common.gc_paused():
            with self._tx("DEFERRED") as conn:  # one read transaction: a consistent view
                certs = conn.execute(common.SNAPSHOT_CERTS_SQL).fetchall()
                deps = conn.execute(common.SNAPSHOT_DEPLOYMENTS_SQL).fetchall()
                intents = conn.execute(common.OPEN_INTENTS_SQL).fetchall()
                row = conn.execute("SELECT generation FROM meta WHERE id = 1").fetchone()
            return common.build_snapshot(certs, deps, intents, int(row[0]), _dt)

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
        with self._tx("DEFERRED") as conn:
            for chunk in common.chunks(wanted):
                values = ", ".join(["(?, ?)"] * len(chunk))
                params = [p for pair in chunk for p in pair]
                # CROSS JOIN fixes the loop order: one primary-key lookup per wanted
                # row (a row-value IN list would scan the whole table per chunk).
                rows.extend(
                    conn.execute(
                        f"WITH k (cert, version) AS (VALUES {values}) "
                        "SELECT v.cert, v.version, v.cert_pem, v.chain_pem, v.key_enc "
                        "FROM k CROSS JOIN certificate_versions v "
                        "ON v.cert = k.cert AND v.version = k.version",
                        params,
                    ).fetchall()
                )
        return dict(self._material_from_row(r) for r in rows)

    def open_intents(self) -> list[StoredIntent]:
        with self._tx("DEFERRED") as conn:
            rows = conn.execute(common.OPEN_INTENTS_SQL).fetchall()
        return [self._stored_intent(r, _dt) for r in rows]

    # ----------------------------------------------------------------- writes
    def write(self, batch: Batch) -> None:
        if not batch:
            return
        p = common.prepare_batch(
            batch, now=self._now(), ts=_ts, run_id=self._run_id, cipher=self._cipher
        )
        with self._tx("IMMEDIATE") as conn:
            if p.intents:
                conn.executemany(_INSERT_INTENT, p.intents)
            if p.closes:
                conn.executemany(_CLOSE_INTENT, p.closes)
            if p.cert_updates:
                conn.executemany(
                    _UPSERT_CERT_UPDATE,
                    (
                        {
                            "name": r[0],
                            "failures": r[1],
                            "nat": r[2],
                            "clear": r[3],
                            "spec": r[4],
                            "retired": r[5],
                            "force": r[6],
                            "ror": r[7],
                        }
                        for r in p.cert_updates
                    ),
                )
            if p.supersede:
                conn.executemany(_SUPERSEDE, ((c,) for c in p.supersede))
                conn.executemany(_UPSERT_CURRENT, p.currents)
                conn.executemany(_INSERT_VERSION, p.versions)
            if p.deployments:
                conn.executemany(_UPSERT_DEPLOYMENT, p.deployments)
            if p.revocations:
                conn.executemany(_REVOKE, p.revocations)
            if p.audit:
                conn.executemany(_INSERT_AUDIT, p.audit)
            conn.execute("UPDATE meta SET generation = generation + 1 WHERE id = 1")

    def begin_run(self, kind: str, holder: str, detail: Mapping[str, Any]) -> int:
        with self._tx("IMMEDIATE") as conn:
            cur = conn.execute(
                "INSERT INTO runs (kind, holder, started_at, status, summary) "
                "VALUES (?, ?, ?, 'running', ?)",
                (kind, holder, _ts(self._now()), common.dump_json(dict(detail))),
            )
            run_id = int(cur.lastrowid or 0)
        self._run_id = run_id
        return run_id

    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None:
        with self._tx("IMMEDIATE") as conn:
            row = conn.execute("SELECT summary FROM runs WHERE id = ?", (run_id,)).fetchone()
            merged = {**(common.load_json(row[0]) if row else {}), **dict(summary)}
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary = ? WHERE id = ?",
                (status, _ts(self._now()), common.dump_json(merged), run_id),
            )
        if self._run_id == run_id:
            self._run_id = None

    # ------------------------------------------------- server reads (common.py)
    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Sequence[Any]]:
        with self._tx("DEFERRED") as conn:
            return list(conn.execute(sql, tuple(params)).fetchall())

    def _execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._tx("IMMEDIATE") as conn:
            return int(conn.execute(sql, tuple(params)).rowcount)

    def _execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        with self._tx("IMMEDIATE") as conn:
            conn.executemany(sql, [tuple(r) for r in rows])
        return len(rows)

    def _ts_out(self, value: Any) -> datetime | None:
        return _dt(value)

    def _ts_in(self, value: datetime | None) -> Any:
        return _ts(value)

"""The PostgreSQL job queue (migration 0005, table ``jobs``).

Every operation is one statement over arrays, so a batch of a hundred jobs costs the
same round-trip as one job:

* :meth:`JobQueue.enqueue` inserts many jobs at once (``unnest``); a job with a
  ``dedupe_key`` already queued or leased is not inserted again (a partial unique
  index), and its id is returned instead, so the caller can wait for it. A
  ``NOTIFY certctl_jobs`` wakes idle workers at once.
* :meth:`JobQueue.claim` leases up to ``limit`` ready jobs with ``FOR UPDATE SKIP
  LOCKED`` (concurrent workers never wait for, nor take, each other's rows) and bumps
  ``attempts``, which is the lease token.
* :meth:`JobQueue.finish` records many outcomes at once, but only for jobs this worker
  still holds under the attempt it claimed: a worker that lost its lease (it stalled,
  the lease expired, another worker took the job) has its completion refused. A
  handler's own database side effect can ride in the same statement
  (``effect_sql``), which makes it happen exactly once.
* :meth:`JobQueue.reap` returns jobs whose lease expired (their worker died or
  stalled) to the queue, or to ``dead`` once they used up ``max_attempts``.

The queue needs a connection of its own (autocommit); it is not thread-safe, so each
thread that uses the queue opens its own :class:`JobQueue`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from certctl.errors import CertctlError, StateError
from certctl.state import describe_url

log = logging.getLogger("certctl.workers")

#: The NOTIFY channel enqueue signals on.
CHANNEL = "certctl_jobs"
#: Job states; ``done``, ``failed`` and ``dead`` are final.
STATES = ("queued", "leased", "done", "failed", "dead")
FINAL = ("done", "failed", "dead")

_ENQUEUE = """
INSERT INTO jobs (kind, payload, dedupe_key, batch, max_attempts, run_after)
SELECT t.kind, t.payload::jsonb, t.dedupe_key, %(batch)s, t.max_attempts,
       now() + t.delay * interval '1 second'
FROM unnest(%(kinds)s::text[], %(payloads)s::text[], %(keys)s::text[], %(maxes)s::integer[],
            %(delays)s::float8[]) WITH ORDINALITY AS t(kind, payload, dedupe_key, max_attempts,
                                                      delay, n)
ORDER BY t.n
ON CONFLICT (dedupe_key) WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'leased')
DO NOTHING
RETURNING id, dedupe_key
"""
_PENDING_BY_KEY = """
SELECT id, dedupe_key FROM jobs
WHERE dedupe_key = ANY(%(keys)s::text[]) AND state IN ('queued', 'leased')
"""
_CLAIM = """
UPDATE jobs j SET state = 'leased', leased_by = %(w)s,
    lease_until = now() + %(lease)s * interval '1 second',
    attempts = j.attempts + 1, updated_at = now()
FROM (SELECT id FROM jobs
      WHERE state = 'queued' AND run_after <= now() AND kind = ANY(%(kinds)s::text[])
      ORDER BY id LIMIT %(n)s FOR UPDATE SKIP LOCKED) c
WHERE j.id = c.id
RETURNING j.id, j.kind, j.payload, j.attempts, j.max_attempts
"""
_FINISH = """
WITH accepted AS (
    UPDATE jobs j SET
        state = CASE WHEN t.status = 'retry' AND j.attempts >= j.max_attempts THEN 'dead'
                     WHEN t.status IN ('retry', 'release') THEN 'queued'
                     ELSE t.status END,
        attempts = CASE WHEN t.status = 'release' THEN j.attempts - 1 ELSE j.attempts END,
        result = t.result::jsonb,
        last_error = t.error,
        run_after = CASE WHEN t.status IN ('retry', 'release')
                         THEN now() + t.delay * interval '1 second' ELSE j.run_after END,
        leased_by = NULL, lease_until = NULL, updated_at = now()
    FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[], %(statuses)s::text[],
                %(results)s::text[], %(errors)s::text[], %(delays)s::float8[])
         AS t(id, attempt, status, result, error, delay)
    WHERE j.id = t.id AND j.attempts = t.attempt AND j.leased_by = %(w)s
      AND j.state = 'leased'
    RETURNING j.id, j.state, t.attempt
){effects}
SELECT id, state FROM accepted
"""
_RENEW = """
UPDATE jobs j SET lease_until = now() + %(lease)s * interval '1 second'
FROM unnest(%(ids)s::bigint[], %(attempts)s::integer[]) AS t(id, attempt)
WHERE j.id = t.id AND j.attempts = t.attempt AND j.leased_by = %(w)s AND j.state = 'leased'
RETURNING j.id
"""
_REAP = """
UPDATE jobs j SET
    state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'queued' END,
    last_error = 'lease expired: worker ' || COALESCE(j.leased_by, '?')
                 || ' stopped renewing it (attempt ' || j.attempts || ')',
    leased_by = NULL, lease_until = NULL, run_after = now(), updated_at = now()
FROM (SELECT id, leased_by AS was FROM jobs WHERE state = 'leased' AND lease_until < now()
      ORDER BY id LIMIT 10000 FOR UPDATE SKIP LOCKED) c
WHERE j.id = c.id
RETURNING j.id, j.state, c.was
"""
#: The executor runs of a worker whose leases expired died with it.
_CRASHED_RUNS = """
UPDATE runs SET status = 'crashed', finished_at = now()
WHERE status = 'running' AND holder = ANY(%s::text[])
"""


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue. ``payload`` must be JSON-able and hold no secrets."""

    kind: str
    payload: Mapping[str, Any] = field(default_factory=dict)
    dedupe_key: str | None = None
    max_attempts: int = 5
    delay_s: float = 0.0


@dataclass(frozen=True)
class Job:
    """A job this worker leased; ``attempt`` is the lease token (1 on the first try)."""

    id: int
    kind: str
    payload: Mapping[str, Any]
    attempt: int
    max_attempts: int


@dataclass(frozen=True)
class Outcome:
    """What became of one leased job.

    ``status``: ``done``; ``failed`` (final: a retry would not help); ``retry``
    (queued again after ``delay_s``, or ``dead`` once the attempts are used up); or
    ``release`` (handed back untried, the attempt not counted: e.g. a plain apply
    holds the apply lock)."""

    job: Job
    status: str
    result: Mapping[str, Any] | None = None
    error: str | None = None
    delay_s: float = 0.0


def require_postgres(url: str | None, what: str) -> str:
    """The state URL if it names PostgreSQL, else a clear error."""
    scheme = url.split("://", 1)[0].lower() if url and "://" in url else ""
    if scheme not in ("postgresql", "postgres"):
        where = "the embedded SQLite store" if not url else f"SQLite ({url})"
        raise CertctlError(
            f"{what} needs a PostgreSQL state store shared by the workers "
            f"(--state postgresql://... or CERTCTL_STATE); this certctl uses {where}, "
            "which serves one machine: run `certctl apply` there instead"
        )
    assert url is not None
    return url


def connect(url: str, application_name: str, timeout: float = 10.0) -> psycopg.Connection[Any]:
    """An autocommit connection, failures as one-line StateError (password redacted)."""
    try:
        conn = psycopg.connect(
            url,
            autocommit=True,
            connect_timeout=max(1, int(timeout)),
            application_name=application_name[:63],
        )
    except psycopg.Error as exc:
        raise StateError(f"cannot connect to {describe_url(url)}: {_first_line(exc)}") from None
    conn.execute("SET TIME ZONE 'UTC'")
    return conn


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class JobQueue:
    """The queue over one dedicated connection (see the module docstring)."""

    def __init__(self, url: str, worker: str, *, application_name: str = "certctl worker"):
        self.url = url
        self.worker = worker
        self.where = describe_url(url)
        self.conn = connect(url, f"{application_name} {worker}")
        self._listening = False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StateError(f"job queue {self.where}: {what}: {_first_line(exc)}") from None

    # --------------------------------------------------------------- producers
    def enqueue(self, jobs: Sequence[NewJob], *, batch: str | None = None) -> list[int]:
        """Insert ``jobs`` (one statement); returns the id of each, in order -- for a
        job whose ``dedupe_key`` was already pending, the pending job's id."""
        if not jobs:
            return []
        params = {
            "batch": batch,
            "kinds": [j.kind for j in jobs],
            "payloads": [json.dumps(dict(j.payload), sort_keys=True) for j in jobs],
            "keys": [j.dedupe_key for j in jobs],
            "maxes": [j.max_attempts for j in jobs],
            "delays": [float(j.delay_s) for j in jobs],
        }
        with self._errors("enqueue"), self.conn.transaction():
            rows = self.conn.execute(_ENQUEUE, params).fetchall()
            by_key = {str(k): int(i) for i, k in rows if k is not None}
            new_ids = [int(i) for i, k in rows if k is None]
            missing = [j.dedupe_key for j in jobs if j.dedupe_key and j.dedupe_key not in by_key]
            if missing:
                for i, k in self.conn.execute(_PENDING_BY_KEY, {"keys": missing}).fetchall():
                    by_key[str(k)] = int(i)
            self.conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        out: list[int] = []
        plain = iter(new_ids)
        for j in jobs:
            if j.dedupe_key is None:
                out.append(next(plain))
            elif j.dedupe_key in by_key:
                out.append(by_key[j.dedupe_key])
            # else: the pending job finished between the insert and the look-up
        return out

    def counts(self, ids: Sequence[int] | None = None) -> dict[str, int]:
        """Jobs per state (of ``ids``, or of the whole queue)."""
        with self._errors("count"):
            if ids is None:
                rows = self.conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            else:
                rows = self.conn.execute(
                    "SELECT state, count(*) FROM jobs WHERE id = ANY(%s::bigint[]) GROUP BY state",
                    (list(ids),),
                )
            found = {str(s): int(n) for s, n in rows.fetchall()}
        return {s: found.get(s, 0) for s in STATES}

    def problems(self, ids: Sequence[int], limit: int = 20) -> list[tuple[int, str, str]]:
        """(id, state, last error) of failed or dead jobs among ``ids``."""
        with self._errors("read"):
            rows = self.conn.execute(
                "SELECT id, state, COALESCE(last_error, '') FROM jobs "
                "WHERE id = ANY(%s::bigint[]) AND state IN ('failed', 'dead') ORDER BY id "
                "LIMIT %s",
                (list(ids), limit),
            ).fetchall()
        return [(int(i), str(s), str(e)) for i, s, e in rows]

    def results(self, ids: Sequence[int]) -> dict[int, tuple[str, Mapping[str, Any] | None]]:
        """id -> (state, result) of ``ids``."""
        with self._errors("read"):
            rows = self.conn.execute(
                "SELECT id, state, result FROM jobs WHERE id = ANY(%s::bigint[])", (list(ids),)
            ).fetchall()
        return {int(i): (str(s), r) for i, s, r in rows}

    # --------------------------------------------------------------- workers
    def claim(self, kinds: Iterable[str], limit: int, lease_s: float) -> list[Job]:
        with self._errors("claim"):
            rows = self.conn.execute(
                _CLAIM,
                {"w": self.worker, "lease": lease_s, "kinds": list(kinds), "n": limit},
                prepare=True,
            ).fetchall()
        jobs = [Job(int(i), str(k), p or {}, int(a), int(m)) for i, k, p, a, m in rows]
        jobs.sort(key=lambda j: j.id)
        return jobs

    def finish(self, outcomes: Sequence[Outcome], *, effects: str = "") -> dict[int, str]:
        """Record outcomes (one statement); returns {id: new state} of those accepted.

        ``effects`` is an extra data-modifying CTE (``, fx AS (INSERT ... SELECT ...
        FROM accepted ...)``) run in the same statement, hence the same transaction:
        it sees ``accepted(id, state, attempt)`` and the parameter ``%(w)s``."""
        if not outcomes:
            return {}
        params = {
            "w": self.worker,
            "ids": [o.job.id for o in outcomes],
            "attempts": [o.job.attempt for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "results": [
                None if o.result is None else json.dumps(dict(o.result), sort_keys=True)
                for o in outcomes
            ],
            "errors": [o.error for o in outcomes],
            "delays": [float(o.delay_s) for o in outcomes],
        }
        with self._errors("finish"):
            rows = self.conn.execute(
                _FINISH.format(effects=effects), params, prepare=True
            ).fetchall()
        accepted = {int(i): str(s) for i, s in rows}
        lost = len(outcomes) - len(accepted)
        if lost:
            log.warning(
                "worker %s: %d completion(s) refused: the lease was lost (another worker "
                "took the job)",
                self.worker,
                lost,
            )
        return accepted

    def renew(self, jobs: Sequence[Job], lease_s: float) -> set[int]:
        """Extend the leases of ``jobs``; returns the ids still held."""
        if not jobs:
            return set()
        with self._errors("renew leases"):
            rows = self.conn.execute(
                _RENEW,
                {
                    "w": self.worker,
                    "lease": lease_s,
                    "ids": [j.id for j in jobs],
                    "attempts": [j.attempt for j in jobs],
                },
                prepare=True,
            ).fetchall()
        return {int(r[0]) for r in rows}

    def reap(self) -> dict[int, str]:
        """Expired leases back to ``queued`` (or ``dead``); {id: new state}."""
        with self._errors("reap expired leases"):
            rows = self.conn.execute(_REAP, prepare=True).fetchall()
            if rows:
                gone = sorted({f"worker {w}" for _, _, w in rows if w})
                self.conn.execute(_CRASHED_RUNS, (gone,))
        if rows:
            log.info("reclaimed %d job(s) whose lease expired", len(rows))
        return {int(i): str(s) for i, s, _ in rows}

    def pending(self, kinds: Iterable[str] | None = None) -> int:
        """Jobs queued or leased (not final), of ``kinds`` (None: of any kind)."""
        with self._errors("count"):
            if kinds is None:
                row = self.conn.execute(
                    "SELECT count(*) FROM jobs WHERE state IN ('queued', 'leased')"
                ).fetchone()
            else:
                row = self.conn.execute(
                    "SELECT count(*) FROM jobs WHERE state IN ('queued', 'leased') "
                    "AND kind = ANY(%s::text[])",
                    (list(kinds),),
                ).fetchone()
        return int(row[0]) if row else 0

    def prune(self, done_days: float = 7, failed_days: float = 30) -> int:
        """Delete final jobs (done after ``done_days``, failed/dead after
        ``failed_days``) and old ``noop`` side effects; returns the jobs deleted."""
        with self._errors("prune"), self.conn.transaction():
            cur = self.conn.execute(
                "DELETE FROM jobs WHERE (state = 'done' AND updated_at < now() - %s * "
                "interval '1 day') OR (state IN ('failed', 'dead') AND updated_at < now() - "
                "%s * interval '1 day')",
                (done_days, failed_days),
            )
            n = cur.rowcount
            self.conn.execute(
                "DELETE FROM job_effects WHERE at < now() - %s * interval '1 day'", (done_days,)
            )
        return int(n)

    # ------------------------------------------------------------ wake-ups
    def wait(self, timeout: float) -> bool:
        """Sleep until a job is enqueued (NOTIFY) or ``timeout``; True when woken."""
        with self._errors("listen"):
            if not self._listening:
                self.conn.execute(f"LISTEN {CHANNEL}")
                self._listening = True
            for _ in self.conn.notifies(timeout=max(timeout, 0.0), stop_after=1):
                return True
        return False

"""Pull-mode agents in the state store (migration 0006: ``agents``, ``agent_tokens``,
``agent_jobs``, ``agent_meta``), written once for both backends.

Rules:

* Every state change of a job is ONE conditional statement (``UPDATE ... WHERE id = ?
  AND <the state it must be in>``), so two servers (or a server and the offline sweep)
  racing for the same job cannot both win; the loser sees 0 rows and moves on.
* Statements that must happen together (enqueue + supersede + generation bump; sweep +
  re-queue) run in one transaction (:meth:`AgentStore._agent_tx`).
* ``agent_meta.jobs_generation`` is bumped whenever work becomes available (enqueue,
  re-queue); on PostgreSQL the same transaction also sends ``NOTIFY certctl_agent_jobs``
  so a waiting long poll wakes at once. ``agents_generation`` is bumped by revoke and
  delete: the server re-reads its agent cache when it changes.
* Heartbeats are written in batches (one ``UPDATE ... FROM unnest(...)`` on
  PostgreSQL), never one statement per request.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from certctl.agent.protocol import (
    OPEN_STATES,
    AgentJobRecord,
    AgentJobSpec,
    AgentRecord,
    AgentTokenRecord,
)
from certctl.errors import StateError
from certctl.state.common import ServerReads, chunks, dump_json, load_json, utc

#: PostgreSQL NOTIFY channel: work became available for agents.
JOBS_CHANNEL = "certctl_agent_jobs"

Exec = Callable[[str, Sequence[Any]], tuple[int, list[Sequence[Any]]]]

_AGENT_COLS = (
    "id, name, public_key, labels, facts, status, enrolled_at, last_seen, revoked_at, token"
)
_JOB_COLS = (
    "id, certificate, placement, selector, job, spec_digest, state, agent, attempts, "
    "lease_until, detail, created_at, updated_at, next_attempt_at, version, public_key, "
    "fingerprint, issue_payload"
)
_TOKEN_COLS = "name, token_hash, created_at, expires_at, uses_left, used, revoked_at"  # noqa: S105
#: A job an agent may lease (besides one it holds already).
_CLAIMABLE = (
    "((state IN ('queued', 'failed') AND (next_attempt_at IS NULL OR next_attempt_at <= ?)) "
    "OR (state IN ('leased', 'issued') AND lease_until < ?))"
)
_BUMP_JOBS = "UPDATE agent_meta SET jobs_generation = jobs_generation + 1 WHERE id = 1"
_BUMP_AGENTS = "UPDATE agent_meta SET agents_generation = agents_generation + 1 WHERE id = 1"


class ConflictError(StateError):
    """The row is not in the state the operation needs (another writer won)."""


class AgentStore(ServerReads):
    """The agent methods of :class:`certctl.state.base.StateStore`."""

    # ------------------------------------------------------------- plumbing
    @property
    def _agent_pg(self) -> bool:
        return self.url.startswith(("postgresql", "postgres"))

    @contextlib.contextmanager
    def _agent_tx(self) -> Iterator[Exec]:
        """One transaction; yields ``ex(sql, params) -> (rowcount, rows)`` taking ``?``
        placeholders on both backends."""
        backend: Any = self  # the backend's own connection primitives
        if self._agent_pg:
            with backend._conn() as conn, conn.transaction():

                def ex_pg(sql: str, params: Sequence[Any] = ()) -> tuple[int, list[Sequence[Any]]]:
                    cur = conn.execute(sql.replace("?", "%s"), tuple(params))
                    rows = list(cur.fetchall()) if cur.description is not None else []
                    return int(cur.rowcount), rows

                yield ex_pg
        else:
            with backend._tx("IMMEDIATE") as conn:

                def ex_lite(
                    sql: str, params: Sequence[Any] = ()
                ) -> tuple[int, list[Sequence[Any]]]:
                    cur = conn.execute(sql, tuple(params))
                    rows = list(cur.fetchall()) if cur.description is not None else []
                    return int(cur.rowcount), rows

                yield ex_lite

    def _work_available(self, ex: Exec) -> None:
        ex(_BUMP_JOBS, ())
        if self._agent_pg:
            ex(f"SELECT pg_notify('{JOBS_CHANNEL}', '')", ())

    def _ts_req(self, value: Any) -> datetime:
        out = self._ts_out(value)
        assert out is not None
        return out

    def _agent(self, r: Sequence[Any]) -> AgentRecord:
        return AgentRecord(
            id=str(r[0]),
            name=str(r[1]),
            public_key=str(r[2]),
            labels=load_json(r[3]) or {},
            facts=load_json(r[4]) or {},
            status=str(r[5]),
            enrolled_at=self._ts_req(r[6]),
            last_seen=self._ts_out(r[7]),
            revoked_at=self._ts_out(r[8]),
            extra={"token": r[9]} if r[9] else {},
        )

    def _job(self, r: Sequence[Any]) -> AgentJobRecord:
        return AgentJobRecord(
            id=str(r[0]),
            certificate=str(r[1]),
            placement=str(r[2]),
            selector=load_json(r[3]) or {},
            job=load_json(r[4]) or {},
            spec_digest=str(r[5]),
            state=str(r[6]),
            agent=r[7],
            attempts=int(r[8]),
            lease_until=self._ts_out(r[9]),
            detail=r[10],
            created_at=self._ts_req(r[11]),
            updated_at=self._ts_req(r[12]),
            next_attempt_at=self._ts_out(r[13]),
            version=None if r[14] is None else int(r[14]),
            public_key=r[15],
            fingerprint=r[16],
            issue_payload=load_json(r[17]),
        )

    def _token(self, r: Sequence[Any]) -> AgentTokenRecord:
        return AgentTokenRecord(
            name=str(r[0]),
            token_hash=str(r[1]),
            created_at=self._ts_req(r[2]),
            expires_at=self._ts_out(r[3]),
            uses_left=None if r[4] is None else int(r[4]),
            used=int(r[5]),
            revoked_at=self._ts_out(r[6]),
        )

    def agent_generations(self) -> tuple[int, int]:
        """(jobs_generation, agents_generation): one tiny query."""
        rows = self._query("SELECT jobs_generation, agents_generation FROM agent_meta WHERE id = 1")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    # ------------------------------------------------------------- tokens
    def create_agent_token(
        self, name: str, token_hash: str, *, expires_at: datetime | None, uses: int | None
    ) -> None:
        with self._agent_tx() as ex:
            n, _ = ex(
                f"INSERT INTO agent_tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, 0, NULL) "
                "ON CONFLICT (name) DO NOTHING",
                (name, token_hash, self._ts_in(self._now()), self._ts_in(expires_at), uses),
            )
        if n != 1:
            raise StateError(f"an agent token named {name!r} already exists")

    def agent_tokens(self) -> list[AgentTokenRecord]:
        rows = self._query(f"SELECT {_TOKEN_COLS} FROM agent_tokens ORDER BY name")
        return [self._token(r) for r in rows]

    def revoke_agent_token(self, name: str) -> bool:
        return (
            self._execute(
                "UPDATE agent_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (self._ts_in(self._now()), name),
            )
            == 1
        )

    def consume_agent_token(self, name: str, now: datetime) -> bool:
        """Count one use of a live token; False when it is revoked, expired or used up
        (a race for the last use has one winner)."""
        return (
            self._execute(
                "UPDATE agent_tokens SET used = used + 1 WHERE name = ? AND revoked_at IS NULL "
                "AND (expires_at IS NULL OR expires_at > ?) "
                "AND (uses_left IS NULL OR used < uses_left)",
                (name, self._ts_in(now)),
            )
            == 1
        )

    def refund_agent_token(self, name: str) -> None:
        """Give back a use counted for an enrollment that was then refused."""
        self._execute(
            "UPDATE agent_tokens SET used = used - 1 WHERE name = ? AND used > 0", (name,)
        )

    # ------------------------------------------------------------- agents
    def enroll_agent(
        self,
        name: str,
        public_key: str,
        labels: Mapping[str, str],
        facts: Mapping[str, str],
        *,
        token: str,
        now: datetime,
    ) -> tuple[AgentRecord, bool]:
        """Record a new agent, or return the existing one of that name when it has the
        same key (idempotent; labels and facts are updated). ``(record, created)``.
        ConflictError when the name is taken with another key or the agent is revoked."""
        new_id = uuid.uuid4().hex
        with self._agent_tx() as ex:
            n, _ = ex(
                f"INSERT INTO agents ({_AGENT_COLS}) VALUES (?, ?, ?, ?, ?, 'online', ?, ?, "
                "NULL, ?) ON CONFLICT (name) DO NOTHING",
                (
                    new_id,
                    name,
                    public_key,
                    dump_json(dict(labels)),
                    dump_json(dict(facts)),
                    self._ts_in(now),
                    self._ts_in(now),
                    token,
                ),
            )
            if n != 1:
                _, rows = ex(f"SELECT {_AGENT_COLS} FROM agents WHERE name = ?", (name,))
                old = self._agent(rows[0])
                if old.public_key != public_key:
                    raise ConflictError(
                        f"agent {name!r} is enrolled with another key; delete it first "
                        "(certctl agents delete NAME) to enroll it again"
                    )
                if old.status == "revoked":
                    raise ConflictError(f"agent {name!r} is revoked")
                ex(
                    "UPDATE agents SET labels = ?, facts = ?, last_seen = ?, status = 'online' "
                    "WHERE id = ?",
                    (dump_json(dict(labels)), dump_json(dict(facts)), self._ts_in(now), old.id),
                )
                ex(_BUMP_AGENTS, ())
            _, rows = ex(f"SELECT {_AGENT_COLS} FROM agents WHERE name = ?", (name,))
        return self._agent(rows[0]), n == 1

    def agents(self, *, status: str | None = None) -> list[AgentRecord]:
        sql = f"SELECT {_AGENT_COLS} FROM agents"
        params: tuple[Any, ...] = ()
        if status is not None:
            sql += " WHERE status = ?"
            params = (status,)
        return [self._agent(r) for r in self._query(sql + " ORDER BY name", params)]

    def agent(self, name: str) -> AgentRecord | None:
        rows = self._query(f"SELECT {_AGENT_COLS} FROM agents WHERE name = ?", (name,))
        return self._agent(rows[0]) if rows else None

    def agent_by_id(self, agent_id: str) -> AgentRecord | None:
        rows = self._query(f"SELECT {_AGENT_COLS} FROM agents WHERE id = ?", (agent_id,))
        return self._agent(rows[0]) if rows else None

    def record_heartbeats(
        self, beats: Sequence[tuple[str, datetime, Mapping[str, str] | None]]
    ) -> int:
        """``(agent id, seen at, facts or None when unchanged)`` for many agents in one
        statement; an offline agent heard from is online again. The number of rows."""
        if not beats:
            return 0
        if self._agent_pg:
            for part in chunks(beats, 10_000):
                self._execute(
                    "UPDATE agents a SET last_seen = t.seen, "
                    "facts = COALESCE(t.facts, a.facts), "
                    "status = CASE WHEN a.status = 'offline' THEN 'online' ELSE a.status END "
                    "FROM unnest(?::text[], ?::timestamptz[], ?::text[]) AS t(id, seen, facts) "
                    "WHERE a.id = t.id AND (a.last_seen IS NULL OR a.last_seen < t.seen)",
                    (
                        [b[0] for b in part],
                        [utc(b[1]) for b in part],
                        [None if b[2] is None else dump_json(dict(b[2])) for b in part],
                    ),
                )
            return len(beats)
        rows = [
            (
                self._ts_in(seen),
                None if facts is None else dump_json(dict(facts)),
                agent_id,
                self._ts_in(seen),
            )
            for agent_id, seen, facts in beats
        ]
        with self._agent_tx() as ex:
            for r in rows:
                ex(
                    "UPDATE agents SET last_seen = ?, facts = COALESCE(?, facts), "
                    "status = CASE WHEN status = 'offline' THEN 'online' ELSE status END "
                    "WHERE id = ? AND (last_seen IS NULL OR last_seen < ?)",
                    r,
                )
        return len(rows)

    def _release_jobs_of(self, ex: Exec, names: Sequence[str], now: datetime) -> int:
        """Re-queue the open jobs held by these agents (attempts kept); bumps the jobs
        generation when any moved. The job keeps its agent, so that agent resumes it
        (with the certificate already issued) if it comes back first."""
        moved = 0
        for part in chunks(list(names)):
            marks = ", ".join("?" * len(part))
            n, _ = ex(
                "UPDATE agent_jobs SET state = 'queued', lease_until = NULL, updated_at = ? "
                f"WHERE state IN ('leased', 'issued') AND agent IN ({marks})",
                (self._ts_in(now), *part),
            )
            moved += n
        if moved:
            self._work_available(ex)
        return moved

    def revoke_agent(self, name: str, now: datetime) -> bool:
        """Refuse the agent from now on (the server's cache follows within ~2 s); its
        jobs go back to the queue."""
        with self._agent_tx() as ex:
            n, _ = ex(
                "UPDATE agents SET status = 'revoked', revoked_at = ? "
                "WHERE name = ? AND status <> 'revoked'",
                (self._ts_in(now), name),
            )
            if n:
                ex(_BUMP_AGENTS, ())
                self._release_jobs_of(ex, [name], now)
        return n == 1

    def delete_agent(self, name: str, now: datetime) -> bool:
        """Forget the agent (its name may enroll again, with a new key)."""
        with self._agent_tx() as ex:
            n, _ = ex("DELETE FROM agents WHERE name = ?", (name,))
            if n:
                ex(_BUMP_AGENTS, ())
                self._release_jobs_of(ex, [name], now)
                ex(
                    "UPDATE agent_jobs SET agent = NULL, version = NULL, public_key = NULL, "
                    "issue_payload = NULL WHERE agent = ? AND state = 'queued'",
                    (name,),
                )
        return n == 1

    def sweep_offline_agents(
        self, cutoff: datetime, now: datetime
    ) -> tuple[list[AgentRecord], int]:
        """Mark online agents last heard from before ``cutoff`` offline and re-queue
        the jobs they held, in one transaction. ``(agents marked, jobs re-queued)``."""
        with self._agent_tx() as ex:
            _, rows = ex(
                "UPDATE agents SET status = 'offline' WHERE status = 'online' "
                f"AND COALESCE(last_seen, enrolled_at) < ? RETURNING {_AGENT_COLS}",
                (self._ts_in(cutoff),),
            )
            gone = sorted((self._agent(r) for r in rows), key=lambda a: a.name)
            moved = self._release_jobs_of(ex, [a.name for a in gone], now) if gone else 0
        return gone, moved

    # ------------------------------------------------------------- jobs
    def enqueue_agent_jobs(self, jobs: Sequence[AgentJobSpec]) -> list[str]:
        """Enqueue jobs; an identical open job (same certificate, placement and spec
        digest) is kept and its id returned. Older open jobs of the same placement with
        another digest are superseded (state dead). Ids in the order given."""
        if not jobs:
            return []
        now = self._now()
        ts = self._ts_in(now)
        ids: list[str] = []
        with self._agent_tx() as ex:
            open_rows: list[Sequence[Any]] = []
            certs = sorted({j.certificate for j in jobs})
            marks_state = ", ".join("?" * len(OPEN_STATES))
            for part in chunks(certs):
                marks = ", ".join("?" * len(part))
                _, rows = ex(
                    "SELECT id, certificate, placement, spec_digest FROM agent_jobs "
                    f"WHERE certificate IN ({marks}) AND state IN ({marks_state})",
                    (*part, *OPEN_STATES),
                )
                open_rows += rows
            existing = {(str(r[1]), str(r[2]), str(r[3])): str(r[0]) for r in open_rows}
            fresh = 0
            seen: dict[tuple[str, str, str], str] = {}
            for spec in jobs:
                digest = spec.digest()
                key = (spec.certificate, spec.placement, digest)
                job_id = existing.get(key) or seen.get(key)
                if job_id is None:
                    job_id = uuid.uuid4().hex
                    for (c, p, d), old_id in existing.items():
                        if c == spec.certificate and p == spec.placement and d != digest:
                            ex(
                                "UPDATE agent_jobs SET state = 'dead', detail = ?, "
                                "lease_until = NULL, updated_at = ? WHERE id = ? AND state IN "
                                f"({marks_state})",
                                (f"superseded by job {job_id}", ts, old_id, *OPEN_STATES),
                            )
                    ex(
                        f"INSERT INTO agent_jobs ({_JOB_COLS}) VALUES "
                        "(?, ?, ?, ?, ?, ?, 'queued', NULL, 0, NULL, NULL, ?, ?, NULL, NULL, "
                        "NULL, NULL, NULL)",
                        (
                            job_id,
                            spec.certificate,
                            spec.placement,
                            dump_json(dict(spec.selector)),
                            dump_json(dict(spec.job)),
                            digest,
                            ts,
                            ts,
                        ),
                    )
                    fresh += 1
                    seen[key] = job_id
                ids.append(job_id)
            if fresh:
                self._work_available(ex)
        return ids

    def agent_jobs(
        self,
        *,
        certificate: str | None = None,
        states: Sequence[str] | None = None,
        agent: str | None = None,
    ) -> list[AgentJobRecord]:
        where: list[str] = []
        params: list[Any] = []
        if certificate is not None:
            where.append("certificate = ?")
            params.append(certificate)
        if states is not None:
            if not states:
                return []
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params += list(states)
        if agent is not None:
            where.append("agent = ?")
            params.append(agent)
        sql = f"SELECT {_JOB_COLS} FROM agent_jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = self._query(sql + " ORDER BY created_at, id", params)
        return [self._job(r) for r in rows]

    def agent_job(self, job_id: str) -> AgentJobRecord | None:
        rows = self._query(f"SELECT {_JOB_COLS} FROM agent_jobs WHERE id = ?", (job_id,))
        return self._job(rows[0]) if rows else None

    def claimable_agent_jobs(self, now: datetime, limit: int = 1000) -> list[AgentJobRecord]:
        """Jobs an agent could lease now (queued, due for a retry, or whose lease ran
        out), oldest first."""
        t = self._ts_in(now)
        rows = self._query(
            f"SELECT {_JOB_COLS} FROM agent_jobs WHERE {_CLAIMABLE} "
            "ORDER BY created_at, id LIMIT ?",
            (t, t, limit),
        )
        return [self._job(r) for r in rows]

    def lease_agent_job(
        self, job_id: str, agent: str, now: datetime, until: datetime
    ) -> AgentJobRecord | None:
        """Lease a claimable job (or renew one ``agent`` holds) to ``agent``; None when
        another agent got it first. A job issued for another agent's key starts over
        (its CSR phase), one issued for this agent's resumes at deploy."""
        t = self._ts_in(now)
        with self._agent_tx() as ex:
            n, _ = ex(
                "UPDATE agent_jobs SET "
                "version = CASE WHEN agent = ? THEN version ELSE NULL END, "
                "public_key = CASE WHEN agent = ? THEN public_key ELSE NULL END, "
                "issue_payload = CASE WHEN agent = ? THEN issue_payload ELSE NULL END, "
                "state = CASE WHEN agent = ? AND version IS NOT NULL THEN 'issued' "
                "ELSE 'leased' END, "
                "agent = ?, lease_until = ?, updated_at = ? "
                f"WHERE id = ? AND ({_CLAIMABLE} OR (agent = ? AND state IN ('leased', 'issued'))) "
                # never to a revoked agent, whatever a server's cache says
                "AND NOT EXISTS (SELECT 1 FROM agents WHERE name = ? AND status = 'revoked')",
                (*[agent] * 5, self._ts_in(until), t, job_id, t, t, agent, agent),
            )
            if n != 1:
                return None
            _, rows = ex(f"SELECT {_JOB_COLS} FROM agent_jobs WHERE id = ?", (job_id,))
        return self._job(rows[0])

    def renew_agent_job(self, job_id: str, agent: str, until: datetime) -> bool:
        return (
            self._execute(
                "UPDATE agent_jobs SET lease_until = ? WHERE id = ? AND agent = ? "
                "AND state IN ('leased', 'issued')",
                (self._ts_in(until), job_id, agent),
            )
            == 1
        )

    def renew_agent_leases(self, agents: Sequence[str], until: datetime) -> int:
        """Extend the leases of every job these agents hold (they were heard from):
        one statement per 500 agents. The number of jobs renewed."""
        n = 0
        for part in chunks(sorted(set(agents))):
            marks = ", ".join("?" * len(part))
            n += self._execute(
                "UPDATE agent_jobs SET lease_until = ? WHERE state IN ('leased', 'issued') "
                f"AND agent IN ({marks}) AND lease_until < ?",
                (self._ts_in(until), *part, self._ts_in(until)),
            )
        return n

    def journal_agent_csr(
        self,
        job_id: str,
        agent: str,
        public_key: str,
        payload: Mapping[str, Any],
        until: datetime,
    ) -> bool:
        """Record, BEFORE the issuer acts, which key the job's certificate is for and the
        issuer's payload (an ACME order): a resubmission resumes it, never issues twice."""
        return (
            self._execute(
                "UPDATE agent_jobs SET public_key = ?, issue_payload = ?, version = NULL, "
                "lease_until = ?, updated_at = ? WHERE id = ? AND agent = ? "
                "AND state IN ('leased', 'issued')",
                (
                    public_key,
                    dump_json(dict(payload)),
                    self._ts_in(until),
                    self._ts_in(self._now()),
                    job_id,
                    agent,
                ),
            )
            == 1
        )

    def mark_agent_job_issued(self, job_id: str, agent: str, version: int, until: datetime) -> bool:
        return (
            self._execute(
                "UPDATE agent_jobs SET state = 'issued', version = ?, lease_until = ?, "
                "updated_at = ? WHERE id = ? AND agent = ? AND state IN ('leased', 'issued')",
                (version, self._ts_in(until), self._ts_in(self._now()), job_id, agent),
            )
            == 1
        )

    def finish_agent_job(
        self,
        job_id: str,
        agent: str,
        *,
        state: str,
        detail: str,
        fingerprint: str | None = None,
        attempts: int | None = None,
        next_attempt_at: datetime | None = None,
        restart: bool = False,
    ) -> bool:
        """Close (``deployed``, ``dead``) or re-queue (``failed``) a job ``agent``
        holds; ``restart`` forgets the issued certificate (the agent lost its key)."""
        reset = ", version = NULL, public_key = NULL, issue_payload = NULL" if restart else ""
        n = self._execute(
            "UPDATE agent_jobs SET state = ?, detail = ?, fingerprint = COALESCE(?, fingerprint), "
            "attempts = COALESCE(?, attempts), next_attempt_at = ?, lease_until = NULL, "
            f"updated_at = ?{reset} WHERE id = ? AND agent = ? "
            "AND state IN ('leased', 'issued')",
            (
                state,
                detail,
                fingerprint,
                attempts,
                self._ts_in(next_attempt_at),
                self._ts_in(self._now()),
                job_id,
                agent,
            ),
        )
        return n == 1


def public_key_digest(spki_der: bytes) -> str:
    """How a CSR's public key is recorded on its job: SHA-256 hex of the DER SPKI."""
    return hashlib.sha256(spki_der).hexdigest()

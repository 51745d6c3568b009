"""The state store interface. Two backends implement it with identical semantics:
:mod:`certctl.state.sqlite` (embedded default) and :mod:`certctl.state.postgres`.

Design rules:

* Reads the planner needs come in one call, :meth:`StateStore.snapshot`, served by a
  handful of batch queries (never one query per certificate).
* Every write goes through :meth:`StateStore.write` with a :class:`Batch`, which is
  applied in ONE transaction and bumps the store's ``generation`` counter. The
  executor groups many actions into one batch (group commit).
* Private keys are encrypted (AES-GCM) before they reach either database; the
  plaintext only exists in memory, wrapped in :class:`certctl.model.SecretBytes`.
* The apply lock names its holder; a second holder fails fast with
  :class:`certctl.errors.LockedError`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from certctl.agent.protocol import (
    AgentJobRecord,
    AgentJobSpec,
    AgentRecord,
    AgentTokenRecord,
)
from certctl.discovery.model import Finding
from certctl.model import (
    DeploymentRecord,
    SecretBytes,
    StateSnapshot,
    VersionRecord,
)


@dataclass(frozen=True)
class NewVersion:
    """A freshly issued certificate version to record (becomes the current one)."""

    record: VersionRecord  # version number assigned by the executor (previous + 1)
    cert_pem: bytes
    chain_pem: bytes
    key_pem: SecretBytes | None  # None when the key lives on the target
    revoke_on_remove: bool = False


@dataclass(frozen=True)
class IntentRecord:
    """Journal entry written BEFORE a side effect."""

    id: str  # uuid4 hex
    cert: str
    action: str  # issue | renew | deploy | revoke
    placement: str | None = None
    payload: Mapping[str, Any] = field(default_factory=dict)  # JSON-able, no secrets
    key_pem: SecretBytes | None = None  # the new key for an issue/renew, stored encrypted


@dataclass(frozen=True)
class CertUpdate:
    """Changes to a certificate row (created if missing)."""

    name: str
    failures: int | None = None
    next_attempt_at: datetime | None = None
    clear_next_attempt: bool = False
    spec_digest: str | None = None
    retired: bool | None = None
    force_renew: bool | None = None
    revoke_on_remove: bool | None = None


@dataclass(frozen=True)
class Revocation:
    cert: str
    version: int
    reason: str
    revoked_at: datetime


@dataclass(frozen=True)
class AuditEvent:
    event: str  # e.g. issue, renew, deploy, revoke, retire, apply.start, apply.finish
    cert: str | None = None
    placement: str | None = None
    run_id: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)  # JSON-able, no secrets
    at: datetime | None = None  # default: the store's clock


@dataclass
class Batch:
    """Writes applied together in one transaction, in this field order."""

    intents: list[IntentRecord] = field(default_factory=list)
    closed_intents: list[tuple[str, str]] = field(default_factory=list)  # (id, outcome)
    cert_updates: list[CertUpdate] = field(default_factory=list)
    versions: list[NewVersion] = field(default_factory=list)
    deployments: list[DeploymentRecord] = field(default_factory=list)
    revocations: list[Revocation] = field(default_factory=list)
    audit: list[AuditEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return any(
            (
                self.intents,
                self.closed_intents,
                self.cert_updates,
                self.versions,
                self.deployments,
                self.revocations,
                self.audit,
            )
        )


@dataclass(frozen=True)
class StoredIntent:
    """An open journal entry with its decrypted key (for resuming an issue)."""

    id: str
    cert: str
    action: str
    placement: str | None
    payload: Mapping[str, Any]
    key_pem: SecretBytes | None
    created_at: datetime


@dataclass(frozen=True)
class RunRecord:
    id: int
    kind: str
    holder: str
    started_at: datetime
    finished_at: datetime | None
    status: str  # running | ok | failed | crashed
    summary: Mapping[str, Any]


@dataclass(frozen=True)
class RunStats:
    """Runs of one kind and status: how many, how many finished, the total of their
    durations (s) and, per upper bound asked for, how many finished within it."""

    kind: str
    status: str
    count: int
    finished: int
    seconds: float
    within: tuple[int, ...]


@dataclass(frozen=True)
class NotificationRecord:
    """One notification to one notifier (migration 0003; see certctl.notify).

    ``key`` is the deduplication key (``expiring:www:<serial>:7``): a (key, notifier)
    pair is recorded once, so it is sent at most once however often a pass runs.
    ``status``: ``pending`` (due at ``next_attempt_at``), ``sent`` or ``dead``
    (dead-letter: gave up after too many attempts, or refused permanently)."""

    key: str
    notifier: str
    event: str
    cert: str | None
    payload: Mapping[str, Any]  # JSON-able, no secrets
    status: str = "pending"
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class StateStore(abc.ABC):
    """Abstract state store. See module docstring for the rules."""

    url: str

    # --- lifecycle -------------------------------------------------------
    @abc.abstractmethod
    def migrate(self) -> list[str]:
        """Apply pending migrations under a lock; return the names applied."""

    @abc.abstractmethod
    def schema_version(self) -> int:
        """Highest applied migration number (0 when none)."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # --- locking ---------------------------------------------------------
    @abc.abstractmethod
    def acquire_apply_lock(self, holder: str) -> None:
        """Take the apply lock or raise LockedError naming the current holder.

        The lock dies with the process (PostgreSQL session advisory lock; SQLite: a
        lock row tied to a pid + an OS file lock), so a SIGKILLed apply never leaves
        it stuck.
        """

    @abc.abstractmethod
    def release_apply_lock(self) -> None: ...

    # --- reads -----------------------------------------------------------
    @abc.abstractmethod
    def snapshot(self) -> StateSnapshot:
        """All certificates with their current version, all deployments, the open
        journal intents, and the generation counter -- in a few batch queries."""

    @abc.abstractmethod
    def versions(self, cert: str) -> list[VersionRecord]:
        """Every version of one certificate, newest first."""

    @abc.abstractmethod
    def material(self, cert: str, version: int) -> tuple[bytes, bytes, SecretBytes | None]:
        """(cert_pem, chain_pem, decrypted key or None) of one version."""

    @abc.abstractmethod
    def materials(
        self, keys: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], tuple[bytes, bytes, SecretBytes | None]]:
        """Batch form of :meth:`material`."""

    @abc.abstractmethod
    def certificate_pems(self, cert: str, version: int) -> tuple[bytes, bytes]:
        """(cert_pem, chain_pem) of one version, without touching (or decrypting) its key:
        for showing a certificate where the state key is not at hand."""

    @abc.abstractmethod
    def open_intents(self) -> list[StoredIntent]:
        """Open journal entries, with their keys decrypted, oldest first."""

    @abc.abstractmethod
    def runs(self, limit: int = 20) -> list[RunRecord]: ...

    @abc.abstractmethod
    def audit_log(self, limit: int = 100, cert: str | None = None) -> list[dict[str, Any]]:
        """Newest first: {id, at, event, cert, placement, run_id, detail}."""

    # --- writes ----------------------------------------------------------
    @abc.abstractmethod
    def write(self, batch: Batch) -> None:
        """Apply the batch in one transaction; bump the generation."""

    @abc.abstractmethod
    def begin_run(self, kind: str, holder: str, detail: Mapping[str, Any]) -> int: ...

    @abc.abstractmethod
    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None: ...

    # --- issuer vault (see certctl.connectors.IssuerVault) ---------------
    @abc.abstractmethod
    def get(self, issuer: str, key: str) -> bytes | None: ...

    @abc.abstractmethod
    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None: ...

    # --- server: read API, OCSP lookups, API keys (migration 0002) --------
    @abc.abstractmethod
    def generation(self) -> int:
        """The generation counter alone (one cheap query; bumped by every write)."""

    @abc.abstractmethod
    def find_serial(self, issuer: str, serial: str) -> VersionRecord | None:
        """The version ``issuer`` signed with ``serial`` (lower-case hex), or None."""

    @abc.abstractmethod
    def list_certificates(
        self,
        *,
        after: str | None,
        limit: int,
        issuer: str | None = None,
        status: str | None = None,
        expiring_before: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """A page of certificates ordered by name, starting after ``after``."""

    @abc.abstractmethod
    def list_deployments(
        self,
        *,
        after: tuple[str, str] | None,
        limit: int,
        cert: str | None = None,
        status: str | None = None,
    ) -> list[dict[str, Any]]:
        """A page of deployments ordered by (cert, placement), after ``after``."""

    @abc.abstractmethod
    def list_runs(
        self, *, before: int | None, limit: int, status: str | None = None
    ) -> list[RunRecord]:
        """A page of runs, newest first, with ids below ``before``."""

    @abc.abstractmethod
    def list_audit(
        self,
        *,
        before: int | None,
        limit: int,
        cert: str | None = None,
        event: str | None = None,
    ) -> list[dict[str, Any]]:
        """A page of audit events, newest first, with ids below ``before``."""

    @abc.abstractmethod
    def audit_counts(self) -> dict[str, int]:
        """How many audit events of each kind there are."""

    @abc.abstractmethod
    def run_stats(self, bounds: Sequence[float]) -> list[RunStats]:
        """Per (kind, status): counts and durations of the runs, for metrics."""

    @abc.abstractmethod
    def create_api_key(self, name: str, token_hash: str) -> None:
        """Record an API key (its SHA-256 hex); StateError if the name is taken."""

    @abc.abstractmethod
    def api_keys(self) -> list[tuple[str, str]]:
        """Every (name, token_hash)."""

    @abc.abstractmethod
    def delete_api_key(self, name: str) -> bool:
        """Remove a key; False when there was none of that name."""

    # --- notifications (migration 0003; certctl.notify) -------------------
    @abc.abstractmethod
    def enqueue_notifications(self, items: Sequence[NotificationRecord], now: datetime) -> int:
        """Record new (key, notifier) pairs as pending, due ``now``; pairs already
        recorded (in any status) are left alone. Returns how many were new."""

    @abc.abstractmethod
    def due_notifications(self, now: datetime, limit: int = 1000) -> list[NotificationRecord]:
        """Pending notifications due at ``now``, oldest first."""

    @abc.abstractmethod
    def claim_notification(self, key: str, notifier: str, now: datetime, until: datetime) -> bool:
        """Take a due pending notification for sending (its due time moves to
        ``until``, a lease); False when it is not due or another process took it."""

    @abc.abstractmethod
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
        """Record the outcome of one attempt (sent, pending for a retry, or dead)."""

    @abc.abstractmethod
    def list_notifications(
        self, *, status: str | None = None, limit: int = 1000
    ) -> list[NotificationRecord]:
        """Notifications, newest first (optionally of one status)."""

    # --- discovery findings (migration 0004; certctl.discovery) ----------
    @abc.abstractmethod
    def record_findings(self, findings: Sequence[Finding]) -> int:
        """Upsert findings keyed by (source, host, location, sni, fingerprint), in one
        transaction; a finding seen again gets its fields and ``seen_at`` updated.
        Returns how many findings were written."""

    @abc.abstractmethod
    def list_findings(
        self,
        *,
        source: str | None = None,
        host: str | None = None,
        fingerprint: str | None = None,
    ) -> list[Finding]:
        """Recorded findings (optionally of one source, host or leaf fingerprint),
        ordered by source, host, location, sni."""

    @abc.abstractmethod
    def issued_fingerprints(self, fingerprints: Sequence[str]) -> set[str]:
        """Those of ``fingerprints`` that are a version certctl recorded (batched)."""

    @abc.abstractmethod
    def issuer_chains(self) -> list[tuple[str, bytes]]:
        """Every distinct (issuer name, chain PEM) of the recorded versions: the CA
        certificates each inventory issuer has signed with."""

    # --- pull-mode agents (migration 0006; certctl.state.agents) ----------
    @abc.abstractmethod
    def agent_generations(self) -> tuple[int, int]:
        """(jobs_generation, agents_generation): bumped when agent work becomes
        available, and when an agent is revoked or deleted (one tiny query)."""

    @abc.abstractmethod
    def enqueue_agent_jobs(self, jobs: Sequence[AgentJobSpec]) -> list[str]:
        """Enqueue agent jobs in one transaction; an identical open job (same
        certificate, placement and spec digest) is kept and its id returned; an open job
        of the same placement with another digest is superseded. Ids in order given."""

    @abc.abstractmethod
    def agent_jobs(
        self,
        *,
        certificate: str | None = None,
        states: Sequence[str] | None = None,
        agent: str | None = None,
    ) -> list[AgentJobRecord]:
        """Agent jobs, oldest first (optionally of one certificate, states, agent)."""

    @abc.abstractmethod
    def agent_job(self, job_id: str) -> AgentJobRecord | None: ...

    @abc.abstractmethod
    def claimable_agent_jobs(self, now: datetime, limit: int = 1000) -> list[AgentJobRecord]:
        """Jobs an agent could lease now (queued, due again, or lease run out)."""

    @abc.abstractmethod
    def lease_agent_job(
        self, job_id: str, agent: str, now: datetime, until: datetime
    ) -> AgentJobRecord | None:
        """Lease (or renew) a job to ``agent``; None when another agent won it."""

    @abc.abstractmethod
    def renew_agent_job(self, job_id: str, agent: str, until: datetime) -> bool: ...

    @abc.abstractmethod
    def renew_agent_leases(self, agents: Sequence[str], until: datetime) -> int:
        """Extend the leases of the jobs these agents hold (batched)."""

    @abc.abstractmethod
    def journal_agent_csr(
        self, job_id: str, agent: str, public_key: str, payload: Mapping[str, Any], until: datetime
    ) -> bool:
        """Journal the CSR's key and the issuer payload before issuing."""

    @abc.abstractmethod
    def mark_agent_job_issued(
        self, job_id: str, agent: str, version: int, until: datetime
    ) -> bool: ...

    @abc.abstractmethod
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
        """Close (deployed, dead) or re-queue (failed) a job ``agent`` holds."""

    @abc.abstractmethod
    def create_agent_token(
        self, name: str, token_hash: str, *, expires_at: datetime | None, uses: int | None
    ) -> None:
        """Record a bootstrap token (its SHA-256 hex); StateError if the name is taken."""

    @abc.abstractmethod
    def agent_tokens(self) -> list[AgentTokenRecord]: ...

    @abc.abstractmethod
    def revoke_agent_token(self, name: str) -> bool: ...

    @abc.abstractmethod
    def consume_agent_token(self, name: str, now: datetime) -> bool:
        """Count one use of a live token; False when revoked, expired or used up."""

    @abc.abstractmethod
    def refund_agent_token(self, name: str) -> None: ...

    @abc.abstractmethod
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
        """Record an agent (or return the same-key one of that name): (record, created)."""

    @abc.abstractmethod
    def agents(self, *, status: str | None = None) -> list[AgentRecord]: ...

    @abc.abstractmethod
    def agent(self, name: str) -> AgentRecord | None: ...

    @abc.abstractmethod
    def agent_by_id(self, agent_id: str) -> AgentRecord | None: ...

    @abc.abstractmethod
    def record_heartbeats(
        self, beats: Sequence[tuple[str, datetime, Mapping[str, str] | None]]
    ) -> int:
        """(agent id, seen at, facts or None) of many agents in one statement."""

    @abc.abstractmethod
    def revoke_agent(self, name: str, now: datetime) -> bool: ...

    @abc.abstractmethod
    def delete_agent(self, name: str, now: datetime) -> bool: ...

    @abc.abstractmethod
    def sweep_offline_agents(
        self, cutoff: datetime, now: datetime
    ) -> tuple[list[AgentRecord], int]:
        """Mark agents silent since ``cutoff`` offline and re-queue their jobs."""

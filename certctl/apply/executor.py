"""The apply executor: carries a plan out with bounded concurrency, journaling intent
before every side effect and recording every outcome.

Per certificate, in order: issue/renew (journal key + issuer payload, then issue,
then record the version), then deploy to each placement (journal, stage, commit,
verify, record; restore on failure), or revoke / retire. Certificates run
concurrently up to ``concurrency``; one failure never stops unrelated actions.

Crash safety: an issue intent holds the new key (encrypted) and the issuer's payload
(e.g. the serial). A run killed at any point leaves either no intent (nothing
happened), an open intent (the next run resumes with the same key and payload, so
nothing is issued twice), or a recorded version. Files are only ever replaced by
rename, so a target never holds a half-written file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from certctl import pki
from certctl.apply.groupwriter import GroupWriter
from certctl.apply.records import new_version, settled
from certctl.connectors import Issuer, IssueRequest, Material, Staged, Target
from certctl.errors import CertctlError, PermanentError, TransientError
from certctl.faults import Failpoints
from certctl.model import (
    Action,
    ActionKind,
    Certificate,
    CertRecord,
    DeploymentRecord,
    Inventory,
    Plan,
    Profile,
    Reason,
    SecretBytes,
    StateSnapshot,
)
from certctl.plan.planner import profile_for, spec_digest
from certctl.state.base import (
    AuditEvent,
    Batch,
    CertUpdate,
    IntentRecord,
    NewVersion,
    Revocation,
    StateStore,
    StoredIntent,
)

log = logging.getLogger(__name__)

#: Field of an issue intent's journaled payload holding the spec it was made for.
SPEC_FIELD = "_certctl_spec"
#: At most this much of a failed command's output goes into a deploy.failed record.
OUTPUT_MAX = 800
#: Field of an issue intent for ``key_custody: target``: the placement whose host
#: makes (made) the key. Such an intent holds no key; a rerun asks the host again,
#: which reuses the pending key it left.
KEYGEN_FIELD = "_certctl_keygen"
T = TypeVar("T")


@dataclass(frozen=True)
class ApplySettings:
    concurrency: int = 25
    retries: int = 3  # attempts for TransientError within one run
    retry_base_s: float = 1.0
    max_retry_delay_s: float = 30.0
    backoff_base_s: int = 3600  # across runs: 1h * 2^(n-1)
    backoff_cap_s: int = 32 * 3600
    resume_max_age_s: int = 24 * 3600  # an older open issue intent is started afresh
    #: Set (from another thread, e.g. a signal handler) to stop between certificates:
    #: the certificates in flight finish, the rest are left for the next run.
    stop: threading.Event | None = field(default=None, compare=False)


@dataclass
class ActionResult:
    action: Action
    ok: bool
    error: str | None = None


@dataclass
class ApplyReport:
    run_id: int
    results: list[ActionResult] = field(default_factory=list)
    transactions: int = 0
    #: Certificates not started because the run was asked to stop (ApplySettings.stop).
    stopped: int = 0
    #: Agent-routed work handed to agents: (certificate, placement id, job id).
    agent_jobs: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def failed(self) -> list[ActionResult]:
        return [r for r in self.results if not r.ok]

    def done_counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in ActionKind}
        for r in self.results:
            if r.ok:
                out[r.action.kind.value] += 1
        return out


class Connectors(Protocol):
    """What the executor needs from the engine: connector instances by inventory name."""

    def issuer(self, name: str) -> Issuer: ...

    def target(self, name: str) -> Target: ...


def error_text(exc: BaseException) -> str:
    if isinstance(exc, CertctlError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Executor:
    def __init__(
        self,
        inventory: Inventory,
        snapshot: StateSnapshot,
        store: StateStore,
        connectors: Connectors,
        clock: Callable[[], datetime],
        settings: ApplySettings = ApplySettings(),
        *,
        holder: str = "certctl",
        on_progress: Callable[[int, int], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        scope: frozenset[str] | None = None,
    ) -> None:
        self.inv = inventory
        self.snapshot = snapshot
        self.store = store
        self.conns = connectors
        self.clock = clock
        self.settings = settings
        self.holder = holder
        self.on_progress = on_progress
        self.sleep = sleep
        self.writer = GroupWriter(store)
        self.run_id = 0
        self._done = 0
        self._total = 0
        self._resumable: dict[str, StoredIntent] = {}
        self._open_revokes: list[StoredIntent] = []
        self._deploy_slots = asyncio.Semaphore(max(1, settings.concurrency))
        self._deploy_intents: dict[tuple[str, str], str] = {}
        self._used_targets: dict[str, Target] = {}  # closed at the end of run()
        self._materials: dict[tuple[str, int], tuple[bytes, bytes, SecretBytes | None]] = {}
        self.faults = Failpoints()
        #: Certificates this run may recover journal intents of (None: all). A worker
        #: runs beside other workers and only touches the certificates it leased.
        self.scope = scope

    # ------------------------------------------------------------------ run
    async def run(self, plan: Plan) -> ApplyReport:
        self.run_id = await asyncio.to_thread(
            self.store.begin_run,
            "apply",
            self.holder,
            {"input_digest": plan.input_digest, "actions": len(plan.actions)},
        )
        report = ApplyReport(self.run_id)
        status = "failed"
        try:
            await self._recover(plan)
            await self._finish_open_revokes(report)
            groups = _group_by_cert(plan.actions)
            self._total = len(plan.actions)
            routed = [g for g in groups if self._agent_routed(g)]
            if routed:
                groups = [g for g in groups if not self._agent_routed(g)]
                await self._enqueue_agent_jobs(routed, report)
            queue: asyncio.Queue[list[Action]] = asyncio.Queue()
            for g in groups:
                queue.put_nowait(g)
            workers = [
                asyncio.create_task(self._worker(queue, report))
                for _ in range(max(1, min(self.settings.concurrency, len(groups) or 1)))
            ]
            await asyncio.gather(*workers)
            await self.writer.write(
                Batch(
                    audit=[
                        AuditEvent(
                            "apply.finish",
                            run_id=self.run_id,
                            detail={
                                "done": report.done_counts(),
                                "failed": len(report.failed),
                            },
                        )
                    ]
                )
            )
            status = "failed" if report.failed else "stopped" if report.stopped else "ok"
        finally:
            for used in self._used_targets.values():
                try:
                    await used.close()
                except Exception:
                    log.debug("closing a target failed", exc_info=True)
            report.transactions = self.writer.transactions
            summary = {"done": report.done_counts(), "failed": len(report.failed)}
            if report.stopped:
                summary["stopped"] = report.stopped
            await asyncio.to_thread(self.store.finish_run, self.run_id, status, summary)
        return report

    async def _recover(self, plan: Plan) -> None:
        """Resume what a killed run left half done.

        * An open issue/renew intent is resumed (same key, same issuer payload, so the
          CA does not issue twice) when the certificate is planned for issuance again
          and its spec is still the one the intent was made for; a stale intent (spec
          changed, or older than ``resume_max_age_s``) is closed as superseded.
        * An open revoke intent is finished: revocation is idempotent at the issuer,
          and the state must learn what the issuer may already have done.
        * Deploy intents are closed; deploys are re-planned from what targets hold.
        """
        intents = await asyncio.to_thread(self.store.open_intents)
        if self.scope is not None:
            intents = [it for it in intents if it.cert in self.scope]
        planned_issue = {
            a.cert for a in plan.actions if a.kind in (ActionKind.ISSUE, ActionKind.RENEW)
        }
        now = self.clock()
        close: list[tuple[str, str]] = []
        for it in intents:
            if it.action in ("issue", "renew"):
                if not self._still_resumable(it, now):
                    close.append((it.id, "superseded"))
                elif it.cert in planned_issue:
                    if it.cert in self._resumable:
                        close.append((self._resumable[it.cert].id, "superseded"))
                    self._resumable[it.cert] = it
                # else: kept open for the run that plans this certificate again
            elif it.action == "revoke":
                self._open_revokes.append(it)
            else:
                close.append((it.id, "interrupted"))
        if close:
            await self.writer.write(
                Batch(
                    closed_intents=close,
                    audit=[
                        AuditEvent(
                            "apply.recover",
                            run_id=self.run_id,
                            detail={"closed": len(close), "resumed": len(self._resumable)},
                        )
                    ],
                )
            )

    def _still_resumable(self, it: StoredIntent, now: datetime) -> bool:
        cert = self.inv.certificates.get(it.cert)
        if cert is None:
            return False
        if (KEYGEN_FIELD in it.payload) != (cert.key.custody == "target"):
            return False  # custody changed since (or a key-less intent of another kind)
        if it.key_pem is None and KEYGEN_FIELD not in it.payload:
            return False
        if now - it.created_at > timedelta(seconds=self.settings.resume_max_age_s):
            return False
        want = spec_digest(cert, profile_for(self.inv, cert))
        return it.payload.get(SPEC_FIELD) == want

    async def _finish_open_revokes(self, report: ApplyReport) -> None:
        """Finish revocations a killed run journaled: ask the issuer again (idempotent),
        then record what it confirmed."""
        for it in self._open_revokes:
            record = self.snapshot.certs.get(it.cert)
            serial = str(it.payload.get("serial", ""))
            reason = str(it.payload.get("reason", "unspecified"))
            cur = record.current if record is not None else None
            if cur is None or cur.serial != serial or cur.status == "revoked":
                await self.writer.write(Batch(closed_intents=[(it.id, "superseded")]))
                continue
            action = Action(
                ActionKind.REVOKE,
                it.cert,
                (Reason("resumed", "finishing a revocation an interrupted run started"),),
                details={
                    "revocation_reason": reason,
                    "version": cur.version,
                    "serial": cur.serial,
                    "retire": bool(it.payload.get("retire", False)),
                },
            )
            try:
                await self._revoke(action, intent_id=it.id)
                report.results.append(ActionResult(action, True))
            except Exception as exc:
                log.debug("resumed revoke %s failed", it.cert, exc_info=True)
                report.results.append(ActionResult(action, False, error_text(exc)))

    async def _worker(self, queue: asyncio.Queue[list[Action]], report: ApplyReport) -> None:
        stop = self.settings.stop
        while True:
            try:
                group = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if stop is not None and stop.is_set():
                report.stopped += 1  # not started: the next run plans it again
                continue
            await self._run_group(group, report)

    def _progress(self, n: int = 1) -> None:
        self._done += n
        if self.on_progress is not None:
            self.on_progress(self._done, self._total)

    # ------------------------------------------------------------ one certificate
    async def _run_group(self, actions: list[Action], report: ApplyReport) -> None:
        name = actions[0].cert
        issue = next((a for a in actions if a.kind in (ActionKind.ISSUE, ActionKind.RENEW)), None)
        deploys = [a for a in actions if a.kind is ActionKind.DEPLOY]
        others = [a for a in actions if a.kind in (ActionKind.REVOKE, ActionKind.RETIRE)]

        material: Material | None = None
        if issue is not None:
            try:
                material = await self._issue(issue, [d.placement or "" for d in deploys])
                report.results.append(ActionResult(issue, True))
            except Exception as exc:
                msg = error_text(exc)
                log.debug("issue %s failed", name, exc_info=True)
                await self._record_issue_failure(issue, exc)
                report.results.append(ActionResult(issue, False, msg))
                await self._skip_deploys(
                    deploys, f"not deployed: {issue.kind.value} failed", report
                )
                self._progress(1 + len(deploys))
                return
            self._progress()
        if deploys:
            if material is None:
                try:
                    material = await self._current_material(name)
                except Exception as exc:
                    await self._skip_deploys(deploys, error_text(exc), report)
                    self._progress(len(deploys))
                    return
            results = await asyncio.gather(
                *(self._bounded_deploy(d, material, journaled=issue is not None) for d in deploys)
            )
            report.results.extend(results)
            self._progress(len(deploys))
        for a in others:
            try:
                if a.kind is ActionKind.REVOKE:
                    await self._revoke(a)
                else:
                    await self._retire(a)
                report.results.append(ActionResult(a, True))
            except Exception as exc:
                log.debug("%s %s failed", a.kind.value, name, exc_info=True)
                report.results.append(ActionResult(a, False, error_text(exc)))
                await self.writer.write(
                    Batch(
                        audit=[
                            AuditEvent(
                                f"{a.kind.value}.failed",
                                cert=name,
                                run_id=self.run_id,
                                detail={"error": error_text(exc)},
                            )
                        ]
                    )
                )
            self._progress()

    async def _skip_deploys(self, deploys: list[Action], why: str, report: ApplyReport) -> None:
        """Deploys that cannot run still get a result and an audit event each."""
        for d in deploys:
            report.results.append(ActionResult(d, False, why))
        await self.writer.write(
            Batch(
                audit=[
                    AuditEvent(
                        "deploy.failed",
                        cert=d.cert,
                        placement=d.placement,
                        run_id=self.run_id,
                        detail={"error": why},
                    )
                    for d in deploys
                ]
            )
        )

    # ------------------------------------------------------------------ agents
    def _agent_routed(self, group: list[Action]) -> bool:
        cert = self.inv.certificates.get(group[0].cert)
        return (
            cert is not None
            and any(p.agent is not None for p in cert.placements)
            and any(a.kind in _AGENT_KINDS for a in group)
        )

    async def _enqueue_agent_jobs(self, groups: list[list[Action]], report: ApplyReport) -> None:
        """Agent-routed certificates: the agent makes the key, the server issues for
        its CSR and records the version and the deployment. Here: one job per
        placement, enqueued in one transaction (idempotent per spec), and audited."""
        from certctl.agent import client_routing as routing
        from certctl.agent.protocol import AgentJobSpec

        specs: list[AgentJobSpec] = []
        for group in groups:
            cert = self.inv.certificates[group[0].cert]
            specs.extend(routing.job_spec(cert, p) for p in cert.placements if p.agent)
        try:
            ids = await asyncio.to_thread(self.store.enqueue_agent_jobs, specs)
        except Exception as exc:
            msg = f"enqueuing agent jobs failed: {error_text(exc)}"
            for group in groups:
                report.results.extend(ActionResult(a, False, msg) for a in group)
                self._progress(len(group))
            return
        audit = []
        for spec, job_id in zip(specs, ids, strict=True):
            report.agent_jobs.append((spec.certificate, spec.placement, job_id))
            audit.append(
                AuditEvent(
                    "agent.enqueue",
                    cert=spec.certificate,
                    placement=spec.placement,
                    run_id=self.run_id,
                    detail={"job": job_id, "selector": dict(spec.selector)},
                )
            )
        await self.writer.write(Batch(audit=audit))
        for group in groups:
            self._progress(len(group))

    # ------------------------------------------------------------------ issue
    async def _issue(self, action: Action, placements: list[str]) -> Material:
        name = action.cert
        cert = self.inv.certificates[name]
        profile = profile_for(self.inv, cert)
        issuer = self.conns.issuer(cert.issuer)
        record = self.snapshot.certs.get(name)
        resumed = self._resumable.pop(name, None)

        previous = record.current if record is not None else None
        key_pem: SecretBytes | None
        payload: Mapping[str, Any]
        if cert.key.custody == "target":
            req, payload, intent_id = await self._target_key_request(
                action, cert, profile, issuer, record, resumed
            )
            key_pem = None
        elif cert.key.custody != "controller":
            raise PermanentError(f"{name}: unknown key custody {cert.key.custody!r}")
        elif resumed is not None and resumed.key_pem is not None:
            key = pki.load_key_pem(resumed.key_pem.reveal())
            key_pem = resumed.key_pem
            req = IssueRequest(cert, profile, key, key.public_key(), previous)
            payload = {k: v for k, v in resumed.payload.items() if k != SPEC_FIELD}
            intent_id = resumed.id
        else:
            key, key_pem = await self._new_or_reused_key(cert, record)
            req = IssueRequest(cert, profile, key, key.public_key(), previous)
            payload = await issuer.prepare(req)
            intent_id = uuid.uuid4().hex
            await self.writer.write(
                Batch(
                    intents=[
                        IntentRecord(
                            intent_id,
                            name,
                            action.kind.value,
                            None,
                            {**payload, SPEC_FIELD: spec_digest(cert, profile)},
                            key_pem,
                        )
                    ]
                )
            )

        journaled: dict[str, Any] = {"intent": intent_id, "payload": payload}
        keygen = {KEYGEN_FIELD: cert.placements[0].id} if cert.key.custody == "target" else {}

        async def rejournal(replacement: Mapping[str, Any]) -> None:
            """The issuer's payload changed (a new ACME order): journal the replacement,
            with the same key, before the issuer acts on it; retries use it too."""
            new_id = uuid.uuid4().hex
            spec = spec_digest(cert, profile)
            await self.writer.write(
                Batch(
                    intents=[
                        IntentRecord(
                            new_id,
                            name,
                            action.kind.value,
                            None,
                            {**replacement, SPEC_FIELD: spec, **keygen},
                            key_pem,
                        )
                    ],
                    closed_intents=[(str(journaled["intent"]), "replaced")],
                    audit=[
                        AuditEvent(
                            f"{action.kind.value}.payload_replaced",
                            cert=name,
                            run_id=self.run_id,
                        )
                    ],
                )
            )
            journaled["intent"], journaled["payload"] = new_id, dict(replacement)

        req = dataclasses.replace(req, journal=rejournal)
        self.faults.hit("after_issue_intent")
        issued = await self._with_retries(lambda: issuer.issue(req, journaled["payload"]))
        intent_id = str(journaled["intent"])
        self.faults.hit("after_issue")
        prev = record.current.version if record is not None and record.current else 0
        version = new_version(cert, profile, prev + 1, issued)
        deploy_intents = [
            IntentRecord(
                uuid.uuid4().hex,
                name,
                "deploy",
                pid,
                {"version": version.version, "fingerprint": version.fingerprint},
            )
            for pid in placements
        ]
        for it in deploy_intents:
            self._deploy_intents[(name, it.placement or "")] = it.id
        await self.writer.write(
            Batch(
                intents=deploy_intents,
                closed_intents=[(intent_id, "issued")],
                cert_updates=[settled(cert, profile)],
                versions=[
                    NewVersion(
                        version,
                        issued.cert_pem,
                        issued.chain_pem,
                        key_pem,
                        revoke_on_remove=cert.revoke_on_remove,
                    )
                ],
                audit=[
                    AuditEvent(
                        action.kind.value,
                        cert=name,
                        run_id=self.run_id,
                        detail={
                            "version": version.version,
                            "serial": version.serial,
                            "not_after": version.not_after.isoformat(),
                            "issuer": cert.issuer,
                            "reasons": [r.code for r in action.reasons],
                            "resumed": resumed is not None,
                        },
                    )
                ],
            )
        )
        self.faults.hit("after_version")
        return Material(
            name,
            version.version,
            version.fingerprint,
            issued.cert_pem,
            issued.chain_pem,
            key_pem,
            key_on_target=cert.key.custody == "target",
        )

    async def _target_key_request(
        self,
        action: Action,
        cert: Certificate,
        profile: Profile,
        issuer: Issuer,
        record: CertRecord | None,
        resumed: StoredIntent | None,
    ) -> tuple[IssueRequest, Mapping[str, Any], str]:
        """``key_custody: target``: journal, have the placement's target make the key
        on its host (or reuse the pending one a killed run left, or with rotation
        ``never`` the live one), check the CSR that comes back, then let the issuer
        prepare and journal its payload. Only the CSR ever reaches the controller."""
        name = cert.name
        if len(cert.placements) != 1:  # also refused at inventory load
            raise PermanentError(f"{name}: key custody 'target' needs exactly one placement")
        placement = cert.placements[0]
        target = self.conns.target(placement.target)
        self._used_targets[placement.target] = target
        if not target.generates_keys:
            raise PermanentError(
                f"{name}: key custody 'target' needs a target that generates keys on the "
                f"host; {placement.target!r} cannot"
            )
        spec = spec_digest(cert, profile)
        intent_id = resumed.id if resumed is not None else uuid.uuid4().hex
        if resumed is None:  # journal BEFORE the host makes a key
            await self.writer.write(
                Batch(
                    intents=[
                        IntentRecord(
                            intent_id,
                            name,
                            action.kind.value,
                            placement.id,
                            {SPEC_FIELD: spec, KEYGEN_FIELD: placement.id},
                        )
                    ]
                )
            )
        self.faults.hit("before_target_keygen")
        cur = record.current if record is not None else None
        reuse = (
            cert.key.rotation == "never"
            and cur is not None
            and cur.status == "active"
            and cur.key_spec == cert.key.id
            and cur.key_custody == "target"
        )
        csr = await self._with_retries(
            lambda: target.generate_key(placement, cert.key, cert.names, reuse=reuse)
        )
        self.faults.hit("after_target_keygen")
        pub = pki.csr_public_key(csr, cert.names, key_spec_id=cert.key.id)
        req = IssueRequest(cert, profile, None, pub, cur, csr_pem=csr)
        old = dict(resumed.payload) if resumed is not None else {}
        payload = {k: v for k, v in old.items() if k not in (SPEC_FIELD, KEYGEN_FIELD)}
        if not payload:
            payload = await issuer.prepare(req)
            new_id = uuid.uuid4().hex
            await self.writer.write(
                Batch(
                    intents=[
                        IntentRecord(
                            new_id,
                            name,
                            action.kind.value,
                            placement.id,
                            {**payload, SPEC_FIELD: spec, KEYGEN_FIELD: placement.id},
                        )
                    ],
                    closed_intents=[(intent_id, "replaced")],
                )
            )
            intent_id = new_id
        return req, payload, intent_id

    async def _new_or_reused_key(
        self, cert: Certificate, record: CertRecord | None
    ) -> tuple[Any, SecretBytes]:
        cur = record.current if record is not None else None
        if (
            cert.key.rotation == "never"
            and cur is not None
            and cur.status == "active"  # never reuse the key of a revoked certificate
            and cur.key_spec == cert.key.id
            and cur.key_custody == "controller"
        ):
            _, _, old = await asyncio.to_thread(self.store.material, cert.name, cur.version)
            if old is not None:
                return pki.load_key_pem(old.reveal()), old
        key = pki.generate_key(cert.key)
        return key, pki.key_to_pem(key)

    async def _record_issue_failure(self, action: Action, exc: BaseException) -> None:
        name = action.cert
        cert = self.inv.certificates[name]
        record = self.snapshot.certs.get(name)
        failures = (record.failures if record is not None else 0) + 1
        delay = min(self.settings.backoff_base_s * 2 ** (failures - 1), self.settings.backoff_cap_s)
        if isinstance(exc, TransientError) and exc.retry_after:
            delay = max(delay, int(exc.retry_after))
        closed = []
        resumed = self._resumable.pop(name, None)
        if resumed is not None:
            closed.append((resumed.id, "failed"))
        await self.writer.write(
            Batch(
                closed_intents=closed,
                cert_updates=[
                    CertUpdate(
                        name,
                        failures=failures,
                        next_attempt_at=self.clock() + timedelta(seconds=delay),
                        spec_digest=spec_digest(cert, profile_for(self.inv, cert)),
                    )
                ],
                audit=[
                    AuditEvent(
                        f"{action.kind.value}.failed",
                        cert=name,
                        run_id=self.run_id,
                        detail={"error": error_text(exc), "failures": failures},
                    )
                ],
            )
        )

    async def _with_retries(self, fn: Callable[[], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            try:
                return await fn()
            except TransientError as exc:
                attempt += 1
                if attempt >= self.settings.retries:
                    raise
                ra = exc.retry_after
                if ra is not None and ra > self.settings.max_retry_delay_s:
                    # Too long to wait in this run: fail now; the cross-run backoff is
                    # at least retry_after (_record_issue_failure).
                    raise
                delay = exc.retry_after or self.settings.retry_base_s * 2 ** (attempt - 1)
                await self.sleep(min(delay, self.settings.max_retry_delay_s))

    # ----------------------------------------------------------------- deploy
    async def _current_material(self, name: str) -> Material:
        record = self.snapshot.certs.get(name)
        if record is None or record.current is None:
            raise PermanentError(f"{name}: nothing issued to deploy")
        cur = record.current
        if (name, cur.version) in self._materials:
            cert_pem, chain_pem, key_pem = self._materials.pop((name, cur.version))
        else:
            cert_pem, chain_pem, key_pem = await asyncio.to_thread(
                self.store.material, name, cur.version
            )
        return Material(
            name,
            cur.version,
            cur.fingerprint,
            cert_pem,
            chain_pem,
            key_pem,
            key_on_target=cur.key_custody == "target",
        )

    def preload_materials(self, plan: Plan) -> None:
        """Batch-load what deploy-only actions need (one query, not one per action)."""
        wanted = set()
        issuing = {a.cert for a in plan.actions if a.kind in (ActionKind.ISSUE, ActionKind.RENEW)}
        for a in plan.actions:
            if a.kind is ActionKind.DEPLOY and a.cert not in issuing:
                rec = self.snapshot.certs.get(a.cert)
                if rec is not None and rec.current is not None:
                    wanted.add((a.cert, rec.current.version))
        self._materials = self.store.materials(sorted(wanted)) if wanted else {}

    async def _bounded_deploy(
        self, action: Action, material: Material, *, journaled: bool
    ) -> ActionResult:
        """Deploys share one cap, so a target on many hosts cannot exceed --concurrency."""
        async with self._deploy_slots:
            return await self._deploy(action, material, journaled=journaled)

    async def _deploy(self, action: Action, material: Material, *, journaled: bool) -> ActionResult:
        name = action.cert
        pid = action.placement or ""
        cert = self.inv.certificates[name]
        placement = next((p for p in cert.placements if p.id == pid), None)
        if placement is None:
            return ActionResult(action, False, f"{name}: no placement {pid!r} in the inventory")
        intent_id = self._deploy_intents.pop((name, pid), None) if journaled else None
        if intent_id is None:
            intent_id = uuid.uuid4().hex
            await self.writer.write(
                Batch(
                    intents=[
                        IntentRecord(
                            intent_id,
                            name,
                            "deploy",
                            pid,
                            {"version": material.version, "fingerprint": material.fingerprint},
                        )
                    ]
                )
            )
        target = self.conns.target(placement.target)
        self._used_targets[placement.target] = target
        staged: Staged | None = None
        step = "stage"
        verify_start = 0.0
        try:
            staged = await target.stage(placement, material)
            self.faults.hit("after_stage")
            step = "commit"
            files = await target.commit(staged)
            self.faults.hit("after_commit")
            step = "verify"
            verify_start = time.monotonic()
            await target.verify(staged)
            verification = _verification(staged, True, verify_start)
        except Exception as exc:
            msg = error_text(exc)
            log.debug("deploy %s -> %s failed", name, pid, exc_info=True)
            detail: dict[str, Any] = {"error": msg, "step": step}
            output = getattr(exc, "output", None)
            if isinstance(output, str) and output:  # trimmed, key-free (the target's job)
                detail["output"] = output[:OUTPUT_MAX]
            if step == "verify" and staged is not None:
                detail["verify"] = _verification(staged, False, verify_start)
            rollback_error = ""
            if staged is not None:
                try:
                    await target.rollback(staged)
                except Exception as rexc:
                    rollback_error = error_text(rexc)
            detail["rollback_error"] = rollback_error
            await self.writer.write(
                Batch(
                    closed_intents=[(intent_id, "failed")],
                    audit=[
                        AuditEvent(
                            "deploy.failed",
                            cert=name,
                            placement=pid,
                            run_id=self.run_id,
                            detail=detail,
                        )
                    ],
                )
            )
            return ActionResult(
                action, False, msg + (f"; rollback: {rollback_error}" if rollback_error else "")
            )
        record = DeploymentRecord(
            cert=name,
            placement=pid,
            version=material.version,
            fingerprint=material.fingerprint,
            files=files,
            status="deployed",
            deployed_at=self.clock(),
            config_digest=placement.config_digest(),
        )
        await self.writer.write(
            Batch(
                closed_intents=[(intent_id, "deployed")],
                deployments=[record],
                audit=[
                    AuditEvent(
                        "deploy",
                        cert=name,
                        placement=pid,
                        run_id=self.run_id,
                        detail={
                            "version": material.version,
                            "fingerprint": material.fingerprint,
                            "reasons": [r.code for r in action.reasons],
                            "verify": verification,
                        },
                    )
                ],
            )
        )
        return ActionResult(action, True)

    # ----------------------------------------------------------- revoke/retire
    async def _revoke(self, action: Action, *, intent_id: str | None = None) -> None:
        """Journal, revoke at the issuer, then record. With ``intent_id`` it finishes a
        revocation a killed run journaled (the issuer's revoke is idempotent)."""
        name = action.cert
        record = self.snapshot.certs.get(name)
        if record is None or record.current is None:
            raise PermanentError(f"{name}: nothing issued to revoke")
        cur = record.current
        reason = str(action.details.get("revocation_reason", "unspecified"))
        retire = bool(action.details.get("retire", False))
        issuer = self.conns.issuer(cur.issuer)
        if intent_id is None:
            intent_id = uuid.uuid4().hex
            payload = {"serial": cur.serial, "reason": reason, "retire": retire}
            await self.writer.write(
                Batch(intents=[IntentRecord(intent_id, name, "revoke", None, payload)])
            )
        self.faults.hit("after_revoke_intent")
        await self._with_retries(lambda: issuer.revoke(cur, reason))
        self.faults.hit("after_revoke")
        now = self.clock()
        await self.writer.write(
            Batch(
                closed_intents=[(intent_id, "revoked")],
                revocations=[Revocation(name, cur.version, reason, now)],
                cert_updates=[CertUpdate(name, retired=True)] if retire else [],
                audit=[
                    AuditEvent(
                        "revoke",
                        cert=name,
                        run_id=self.run_id,
                        detail={
                            "serial": cur.serial,
                            "version": cur.version,
                            "reason": reason,
                            "retired": retire,
                        },
                    )
                ],
            )
        )

    async def _retire(self, action: Action) -> None:
        await self.writer.write(
            Batch(
                cert_updates=[CertUpdate(action.cert, retired=True)],
                audit=[AuditEvent("retire", cert=action.cert, run_id=self.run_id)],
            )
        )


def _verification(staged: Staged, ok: bool, start: float) -> dict[str, Any]:
    """The verify outcome for the audit: ok, how long it took (ms) and what the target
    says it checked (e.g. the endpoint it probed)."""
    ms = max(0, round((time.monotonic() - start) * 1000))
    return {"ok": ok, "ms": ms, **staged.verify_detail}


_AGENT_KINDS = (ActionKind.ISSUE, ActionKind.RENEW, ActionKind.DEPLOY)


def _group_by_cert(actions: tuple[Action, ...]) -> list[list[Action]]:
    groups: dict[str, list[Action]] = {}
    for a in actions:
        groups.setdefault(a.cert, []).append(a)
    return list(groups.values())

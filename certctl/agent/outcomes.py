"""What an agent job's CSR and result do to the state (the agent API's write side).

* CSR: checked with the executor's ``pki.csr_public_key`` against the job's names and
  key type; the CSR's public key and the issuer's payload are journaled on the job row
  BEFORE the issuer acts; the version is recorded with no key (custody ``target``);
  the same public key again returns the recorded certificate.
* ``deployed``: the deployment row (with the placement's ``config_digest``) and a
  ``deploy`` audit event, so the next plan shows no change; then the job closes.
* ``failed``: one more attempt counted, re-queued after an exponential backoff with
  jitter, or ``dead`` after the last attempt; audited.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from certctl import pki
from certctl.agent import protocol as P
from certctl.agent.settings import AgentServerSettings
from certctl.apply.records import new_version, settled
from certctl.connectors import IssueRequest
from certctl.engine import Engine
from certctl.errors import CertctlError, PermanentError
from certctl.model import Certificate, DeploymentRecord
from certctl.pki import keys as pki_keys
from certctl.plan.planner import profile_for
from certctl.state.base import AuditEvent, Batch, NewVersion, StateStore

log = logging.getLogger("certctl.agent.server")


def job_names(job: Mapping[str, Any]) -> list[str]:
    names = job.get("names") or {}
    out: dict[str, None] = {}
    if names.get("common_name"):
        out[str(names["common_name"])] = None
    for n in list(names.get("dns") or ()) + list(names.get("ip") or ()):
        out.setdefault(str(n), None)
    return list(out)


class JobOutcomes:
    """Issuance for a job's CSR and the recording of its result. ``on_failed(agent,
    job id, retry at or None)`` is told of a failure counted during issuance."""

    def __init__(
        self,
        engine: Engine,
        store: StateStore,
        clock: Callable[[], datetime],
        settings: AgentServerSettings,
        on_failed: Callable[[str, str, datetime | None], None],
    ) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.settings = settings
        self.on_failed = on_failed
        self._inventory_reloaded = 0.0
        self._issue_sem = asyncio.Semaphore(settings.issue_concurrency)

    def certificate(self, rec: P.AgentJobRecord) -> Certificate:
        """The job's certificate in the inventory, re-read once when the server's copy
        does not know it or names it differently (an apply with a newer inventory)."""
        want = sorted(n.lower() for n in job_names(rec.job))
        for attempt in range(2):
            inv = self.engine.inventory()
            cert = inv.certificates.get(rec.certificate)
            if cert is not None and sorted(n.lower() for n in cert.names) == want:
                return cert
            if attempt == 0 and time.monotonic() - self._inventory_reloaded > 2.0:
                self._inventory_reloaded = time.monotonic()
                self._reload_inventory()
                continue
            break
        raise P.ProtocolError(
            409, f"job {rec.id} no longer matches certificate {rec.certificate} in the inventory"
        )

    def _reload_inventory(self) -> None:
        from certctl.inventory import load_inventory

        try:
            inv = load_inventory(self.engine.inventory_path, self.engine.get_registry())
        except CertctlError as exc:
            log.warning("agent API: inventory reload failed: %s", exc)
            return
        self.engine._inventory = inv
        self.engine._issuers.clear()

    async def issue_for(self, agent: str, rec: P.AgentJobRecord, csr: bytes) -> P.CsrResponse:
        key_spec = P.key_spec_of(rec.job.get("key") or {})
        names = job_names(rec.job)
        try:
            pub = pki.csr_public_key(csr, names, key_spec_id=key_spec.id)
        except pki.PKIError as exc:
            raise P.ProtocolError(400, f"CSR refused: {exc}") from None
        digest = hashlib.sha256(pki_keys.public_bytes(pub)).hexdigest()
        lease = self.clock() + timedelta(seconds=self.settings.lease_s)
        if rec.public_key == digest and rec.version is not None:  # idempotent repeat
            cert_pem, chain_pem = await asyncio.to_thread(
                self.store.certificate_pems, rec.certificate, rec.version
            )
            await asyncio.to_thread(self.store.renew_agent_job, rec.id, agent, lease)
            return {
                "certificate_pem": cert_pem.decode(),
                "chain_pem": chain_pem.decode(),
                "version": rec.version,
            }
        if rec.version is not None:  # issued, for another key: never a second certificate
            raise P.ProtocolError(
                409,
                f"job {rec.id}: a certificate was already issued for another key; "
                f"report the result ({P.KEY_LOST!r} if the key is gone) to start over",
            )
        cert = await asyncio.to_thread(self.certificate, rec)
        inv = self.engine.inventory()
        profile = profile_for(inv, cert)
        issuer = self.engine.issuer(cert.issuer)
        versions = await asyncio.to_thread(self.store.versions, cert.name)
        previous = versions[0] if versions else None
        req = IssueRequest(cert, profile, None, pub, previous, csr_pem=csr)
        if rec.public_key == digest and rec.issue_payload is not None:
            payload: Mapping[str, Any] = rec.issue_payload  # resume (same key, same order)
        else:
            payload = await issuer.prepare(req)
        # journal BEFORE the issuer acts: which key, and the issuer's payload
        if not await asyncio.to_thread(
            self.store.journal_agent_csr, rec.id, agent, digest, payload, lease
        ):
            raise P.ProtocolError(409, f"job {rec.id} is no longer leased to you")

        async def rejournal(replacement: Mapping[str, Any]) -> None:
            await asyncio.to_thread(
                self.store.journal_agent_csr, rec.id, agent, digest, replacement, lease
            )

        req = replace(req, journal=rejournal)
        async with self._issue_sem:
            try:
                issued = await issuer.issue(req, payload)
            except PermanentError as exc:
                nxt = await self.fail(agent, rec, f"issuance failed: {exc}", restart=True)
                self.on_failed(agent, rec.id, nxt)
                raise P.ProtocolError(409, f"issuance failed: {exc}") from None
        prev_no = previous.version if previous is not None else 0
        version = new_version(cert, profile, prev_no + 1, issued)
        kind = "renew" if previous is not None else "issue"
        await asyncio.to_thread(
            self.store.write,
            Batch(
                cert_updates=[settled(cert, profile)],
                versions=[
                    NewVersion(
                        version,
                        issued.cert_pem,
                        issued.chain_pem,
                        None,
                        revoke_on_remove=cert.revoke_on_remove,
                    )
                ],
                audit=[
                    AuditEvent(
                        kind,
                        cert=cert.name,
                        placement=rec.placement,
                        detail={
                            "version": version.version,
                            "serial": version.serial,
                            "not_after": version.not_after.isoformat(),
                            "issuer": cert.issuer,
                            "agent": agent,
                            "job": rec.id,
                            "key_custody": "agent",
                        },
                    )
                ],
            ),
        )
        await asyncio.to_thread(
            self.store.mark_agent_job_issued, rec.id, agent, version.version, lease
        )
        return {
            "certificate_pem": issued.cert_pem.decode(),
            "chain_pem": issued.chain_pem.decode(),
            "version": version.version,
        }

    async def deployed(
        self,
        agent: str,
        rec: P.AgentJobRecord,
        fingerprint: str | None,
        detail: str,
        verify: Mapping[str, Any] | None,
    ) -> None:
        if rec.version is None:
            raise P.ProtocolError(409, "no certificate was issued for this job (send the CSR)")
        versions = await asyncio.to_thread(self.store.versions, rec.certificate)
        v = next((x for x in versions if x.version == rec.version), None)
        if v is None:
            raise P.ProtocolError(409, "the job's certificate version is not in the state")
        if fingerprint is not None and fingerprint.lower() != v.fingerprint:
            raise P.ProtocolError(400, "fingerprint does not match the certificate issued")
        now = self.clock()
        config_digest = str(rec.job.get("config_digest") or "")
        if not config_digest:
            cert = self.engine.inventory().certificates.get(rec.certificate)
            for p in cert.placements if cert is not None else ():
                if p.id == rec.placement:
                    config_digest = p.config_digest()
        await asyncio.to_thread(
            self.store.write,
            Batch(
                deployments=[
                    DeploymentRecord(
                        rec.certificate,
                        rec.placement,
                        v.version,
                        v.fingerprint,
                        {},
                        status="deployed",
                        deployed_at=now,
                        config_digest=config_digest,
                    )
                ],
                audit=[
                    AuditEvent(
                        "deploy",
                        cert=rec.certificate,
                        placement=rec.placement,
                        detail={
                            "version": v.version,
                            "fingerprint": v.fingerprint,
                            "agent": agent,
                            "job": rec.id,
                            "detail": detail[:500],
                            "verify": dict(verify) if verify else None,
                        },
                    )
                ],
            ),
        )
        await asyncio.to_thread(
            lambda: self.store.finish_agent_job(
                rec.id,
                agent,
                state="deployed",
                detail=detail[:500] or "deployed",
                fingerprint=v.fingerprint,
            )
        )

    async def fail(
        self, agent: str, rec: P.AgentJobRecord, detail: str, *, restart: bool
    ) -> datetime | None:
        """Count a failed attempt: re-queue after the backoff, or dead after the last;
        returns when the job may run again (None: dead)."""
        attempts = rec.attempts + 1
        dead = attempts >= self.settings.max_attempts
        delay = min(
            self.settings.backoff_base_s * 2 ** (attempts - 1), self.settings.backoff_cap_s
        ) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret
        nxt = None if dead else self.clock() + timedelta(seconds=delay)
        state = "dead" if dead else "failed"
        await asyncio.to_thread(
            lambda: self.store.finish_agent_job(
                rec.id,
                agent,
                state=state,
                detail=detail or "failed",
                attempts=attempts,
                next_attempt_at=nxt,
                restart=restart,
            )
        )
        await asyncio.to_thread(
            self.store.write,
            Batch(
                audit=[
                    AuditEvent(
                        "deploy.failed" if not dead else "agent.job.dead",
                        cert=rec.certificate,
                        placement=rec.placement,
                        detail={
                            "error": detail[:500] or "failed",
                            "agent": agent,
                            "job": rec.id,
                            "attempts": attempts,
                            "retry_at": nxt.isoformat() if nxt else None,
                        },
                    )
                ]
            ),
        )
        return nxt

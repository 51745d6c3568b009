"""Connector conformance kit: checks every Target and every Issuer must pass.

A connector author writes a small harness for their connector and runs every check
in :data:`TARGET_CHECKS` / :data:`ISSUER_CHECKS` against it, e.g.::

    @pytest.mark.parametrize("check", conformance.TARGET_CHECKS, ids=conformance.check_id)
    def test_conformance(check, harness):
        asyncio.run(check(harness))

The checks only use the public contract of :mod:`certctl.connectors` (stage, commit,
verify, rollback, observe; prepare, issue, revoke) plus a harness-provided
``snapshot()`` of everything the target holds, so the same checks hold for files,
remote hosts or a load balancer.

Also here: :class:`StandInVault`, an in-memory stand-in for the state store's
``IssuerVault`` (the real one lives in ``certctl.state``), and :class:`FixedClock`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from certctl import pki
from certctl.connectors import Issuer, IssueRequest, Material, ObserveItem, Target
from certctl.model import (
    DeploymentRecord,
    FileRecord,
    Placement,
    TargetState,
    VersionRecord,
)

# --------------------------------------------------------------------- stand-ins


class StandInVault:
    """STAND-IN for ``certctl.state``'s IssuerVault: a dict in memory.

    Records which values were marked secret (the real store encrypts those) so tests
    can assert that CA keys are stored as secrets.
    """

    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}
        self.secret: dict[tuple[str, str], bool] = {}
        self.puts = 0

    def get(self, issuer: str, key: str) -> bytes | None:
        return self.data.get((issuer, key))

    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None:
        self.data[(issuer, key)] = bytes(value)
        self.secret[(issuer, key)] = secret
        self.puts += 1


class FixedClock:
    """A clock the test moves by hand."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or datetime(2031, 3, 1, 12, 0, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


# ------------------------------------------------------------------- targets


@dataclass
class TargetHarness:
    """What the target checks need.

    ``materials(i)`` gives distinct deployable versions (i = 1, 2, 3...) of one
    certificate; ``snapshot()`` returns a comparable picture of everything the target
    holds for the placement (including hidden/temporary files), used to prove that
    stage is invisible, rollback restores, and unchanged content is not rewritten.
    """

    target: Target
    placement: Placement
    materials: Callable[[int], Material]
    snapshot: Callable[[], Hashable | dict[str, Any]]
    cert: str = "conf"
    records: dict[int, DeploymentRecord] = field(default_factory=dict)

    async def deploy(self, version: int) -> DeploymentRecord:
        m = self.materials(version)
        staged = await self.target.stage(self.placement, m)
        files = await self.target.commit(staged)
        await self.target.verify(staged)
        rec = DeploymentRecord(self.cert, self.placement.id, m.version, m.fingerprint, files)
        self.records[version] = rec
        return rec

    def observe(self, expected: int | None, record: DeploymentRecord | None) -> Any:
        fp = self.materials(expected).fingerprint if expected is not None else None
        (obs,) = self.target.observe([ObserveItem(self.placement, self.cert, fp, record)])
        assert obs.cert == self.cert and obs.placement == self.placement.id
        return obs


async def check_observe_empty_is_missing(h: TargetHarness) -> None:
    obs = h.observe(1, None)
    assert obs.state is TargetState.MISSING, obs


async def check_stage_is_invisible_and_rollback_leaves_nothing(h: TargetHarness) -> None:
    before = h.snapshot()
    staged = await h.target.stage(h.placement, h.materials(1))
    assert h.observe(1, None).state is TargetState.MISSING
    await h.target.rollback(staged)
    assert h.snapshot() == before
    await h.target.rollback(staged)  # idempotent
    assert h.snapshot() == before


async def check_commit_then_observe_match(h: TargetHarness) -> None:
    rec = await h.deploy(1)
    assert rec.files, "commit must return the files it wrote"
    assert all(isinstance(f, FileRecord) for f in rec.files.values())
    obs = h.observe(1, rec)
    assert obs.state is TargetState.MATCH and obs.fingerprint == h.materials(1).fingerprint
    # without a record the target still recognises the certificate (planner: "not recorded")
    assert h.observe(1, None).state is TargetState.MATCH


async def check_unchanged_content_is_not_rewritten(h: TargetHarness) -> None:
    first = await h.deploy(1)
    snap = h.snapshot()
    again = await h.deploy(1)
    assert again.files == first.files
    assert h.snapshot() == snap


async def check_new_version_differs_then_deploys(h: TargetHarness) -> None:
    rec1 = await h.deploy(1)
    obs = h.observe(2, rec1)
    assert obs.state is TargetState.DIFFERS, obs
    assert obs.fingerprint == h.materials(1).fingerprint
    rec2 = await h.deploy(2)
    assert h.observe(2, rec2).state is TargetState.MATCH


async def check_rollback_after_commit_restores_previous(h: TargetHarness) -> None:
    rec1 = await h.deploy(1)
    before = h.observe(1, rec1)
    staged = await h.target.stage(h.placement, h.materials(2))
    await h.target.commit(staged)
    assert h.observe(2, None).state is TargetState.MATCH
    await h.target.rollback(staged)
    await h.target.rollback(staged)  # idempotent
    after = h.observe(1, None)
    assert after.state is TargetState.MATCH and after.fingerprint == before.fingerprint


async def check_rollback_of_first_deploy_removes_it(h: TargetHarness) -> None:
    before = h.snapshot()
    staged = await h.target.stage(h.placement, h.materials(1))
    await h.target.commit(staged)
    await h.target.rollback(staged)
    assert h.observe(1, None).state is TargetState.MISSING
    assert h.snapshot() == before


async def check_observe_is_batched_and_ordered(h: TargetHarness) -> None:
    rec = await h.deploy(1)
    items = [
        ObserveItem(h.placement, h.cert, h.materials(1).fingerprint, rec),
        ObserveItem(h.placement, h.cert, h.materials(2).fingerprint, rec),
    ]
    a, b = h.target.observe(items)
    assert a.state is TargetState.MATCH and b.state is TargetState.DIFFERS


TargetCheck = Callable[[TargetHarness], Coroutine[Any, Any, None]]
TARGET_CHECKS: list[TargetCheck] = [
    check_observe_empty_is_missing,
    check_stage_is_invisible_and_rollback_leaves_nothing,
    check_commit_then_observe_match,
    check_unchanged_content_is_not_rewritten,
    check_new_version_differs_then_deploys,
    check_rollback_after_commit_restores_previous,
    check_rollback_of_first_deploy_removes_it,
    check_observe_is_batched_and_ordered,
]


# ------------------------------------------------------------------- issuers


@dataclass
class IssuerHarness:
    """``request(names)`` builds an IssueRequest for a fresh key and those names."""

    issuer: Issuer
    request: Callable[[tuple[str, ...]], IssueRequest]


def _version(req: IssueRequest, issued: Any, issuer: str) -> VersionRecord:
    return VersionRecord(
        cert=req.cert.name,
        version=1,
        serial=issued.serial,
        not_before=issued.not_before,
        not_after=issued.not_after,
        fingerprint=issued.fingerprint,
        issuer=issuer,
        key_spec=req.cert.key.id,
        names=req.cert.names,
        profile_digest="",
    )


async def check_issue_matches_request(h: IssuerHarness) -> None:
    req = h.request(("conf.test", "alt.conf.test"))
    payload = await h.issuer.prepare(req)
    json.dumps(payload)  # journaled as JSON
    issued = await h.issuer.issue(req, payload)
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert pki.keys_match(req.private_key, leaf.public_key())
    assert pki.fingerprint(leaf) == issued.fingerprint
    assert pki.serial_hex(leaf.serial_number) == issued.serial == issued.serial.lower()
    assert leaf.not_valid_before_utc == issued.not_before
    assert leaf.not_valid_after_utc == issued.not_after
    assert set(req.cert.names) <= set(pki.sans(leaf))
    assert issued.cert_pem.count(b"BEGIN CERTIFICATE") == 1  # leaf only


async def check_issue_is_idempotent_for_one_payload(h: IssuerHarness) -> None:
    req = h.request(("idem.conf.test",))
    payload = await h.issuer.prepare(req)
    first = await h.issuer.issue(req, payload)
    # the journal round-trips the payload through JSON before a resumed issue
    again = await h.issuer.issue(req, json.loads(json.dumps(payload)))
    assert (again.serial, again.not_before, again.not_after) == (
        first.serial,
        first.not_before,
        first.not_after,
    )


async def check_distinct_payloads_give_distinct_serials(h: IssuerHarness) -> None:
    req = h.request(("two.conf.test",))
    a = await h.issuer.issue(req, await h.issuer.prepare(req))
    b = await h.issuer.issue(req, await h.issuer.prepare(req))
    assert a.serial != b.serial


async def check_revoke_is_idempotent(h: IssuerHarness) -> None:
    req = h.request(("revoke.conf.test",))
    issued = await h.issuer.issue(req, await h.issuer.prepare(req))
    version = _version(req, issued, h.issuer.name)
    await h.issuer.revoke(version, "keyCompromise")
    await h.issuer.revoke(version, "keyCompromise")
    await h.issuer.revoke(version, "superseded")  # already revoked: still fine


IssuerCheck = Callable[[IssuerHarness], Coroutine[Any, Any, None]]
ISSUER_CHECKS: list[IssuerCheck] = [
    check_issue_matches_request,
    check_issue_is_idempotent_for_one_payload,
    check_distinct_payloads_give_distinct_serials,
    check_revoke_is_idempotent,
]


def check_id(check: Callable[..., Any]) -> str:
    return check.__name__.removeprefix("check_")

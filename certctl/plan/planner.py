"""The planner: a pure function of (inventory, observed state, clock) -> Plan.

No I/O happens here; every decision about what to issue, renew, deploy, revoke or
retire -- and why -- is made in this module and testable with a fake clock.

Renewal checks run in a fixed order and every applicable reason is listed, the first
one being the primary (cert-manager's trigger order): not issued, issuer changed, key
spec changed, names changed, profile changed, forced, expired, past a random moment
inside the CA's suggested window (ARI, where the issuer offers it), inside the renewal
window. Issuing and deploying are separate actions: a new target, a missing or
changed file deploys the existing certificate without reissuing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from certctl.agent import client_routing as routing
from certctl.model import (
    Action,
    ActionKind,
    Certificate,
    CertRecord,
    DeploymentRecord,
    Inventory,
    Observed,
    Placement,
    Plan,
    Profile,
    Reason,
    TargetState,
    VersionRecord,
    stable_digest,
)
from certctl.plan import reasons as R

#: The renewal moment is pulled earlier by up to this fraction of the renewal window,
#: deterministically per certificate, so a fleet issued together does not renew together.
JITTER_FRACTION = 0.1
#: The renewal window (jitter included) covers at most this share of the lifetime.
MAX_WINDOW = 0.95

DEFAULT_PROFILE = Profile(name="default")
#: Key custody of a version adopted without its private key (``certctl adopt``): it is
#: tracked and renewed (with a new key) in its renewal window, but never deployed.
OBSERVED_CUSTODY = "observed"


@dataclass(frozen=True)
class PlanOptions:
    force: frozenset[str] = frozenset()  # certificate names to renew regardless
    only: frozenset[str] | None = None  # restrict the plan to these certificates


def profile_for(inv: Inventory, cert: Certificate) -> Profile:
    return inv.profiles.get(cert.profile) or DEFAULT_PROFILE


def profile_digest(cert: Certificate, profile: Profile) -> str:
    """What, besides names/issuer/key, shapes the issued certificate."""
    return stable_digest({"profile": profile.digest(), "ttl": cert.ttl_s})[:16]


def spec_digest(cert: Certificate, profile: Profile) -> str:
    """Changes to this digest lift an issuance backoff (the user fixed something)."""
    return stable_digest(
        {
            "issuer": cert.issuer,
            "key": cert.key.id,
            "names": sorted(cert.names),
            "profile": profile_digest(cert, profile),
        }
    )[:16]


def renewal_time(cert: Certificate, version: VersionRecord) -> datetime:
    """When this version should be renewed, jitter included."""
    lifetime = (version.not_after - version.not_before).total_seconds()
    rb = cert.renew_before
    if rb.seconds is not None:
        window = float(min(rb.seconds, lifetime))
    else:
        window = lifetime * (rb.fraction if rb.fraction is not None else 1 / 3)
    seed = hashlib.sha256(f"{cert.name}:{version.serial}".encode()).digest()
    jitter = int.from_bytes(seed[:8], "big") / 2**64 * JITTER_FRACTION * window
    # Never earlier than 5% into the lifetime: a window as long as the lifetime (a
    # large renew_before, or a leaf clamped by its CA's expiry) must not renew on
    # every run.
    return version.not_after - timedelta(seconds=min(window + jitter, lifetime * MAX_WINDOW))


def ari_renewal_time(
    cert: Certificate, version: VersionRecord, window: tuple[datetime, datetime]
) -> datetime:
    """A moment inside the CA's suggested window (RFC 9773 ARI), chosen uniformly at
    random but deterministically per certificate, version and window, so every plan
    agrees and a fleet spreads out over the window. The configured renewal window
    still applies too: whichever comes first renews."""
    start, end = window
    seed = hashlib.sha256(
        f"ari:{cert.name}:{version.serial}:{start.isoformat()}:{end.isoformat()}".encode()
    ).digest()
    frac = int.from_bytes(seed[:8], "big") / 2**64
    return start + (end - start) * frac


def plan(
    inv: Inventory,
    observed: Observed,
    now: datetime,
    options: PlanOptions = PlanOptions(),
) -> Plan:
    actions: list[Action] = []
    skipped: dict[str, str] = {}
    certs = observed.state.certs
    only = options.only

    for name in sorted(inv.certificates):
        if only is not None and name not in only:
            continue
        cert = inv.certificates[name]
        record = certs.get(name)
        actions.extend(_plan_certificate(inv, cert, record, observed, now, options, skipped))

    for name in sorted(certs):
        if name in inv.certificates or (only is not None and name not in only):
            continue
        record = certs[name]
        if record.retired:
            continue
        actions.append(_plan_removed(record))

    digest = stable_digest(
        {
            "inventory": inv.digest,
            "observed": observed.digest(),
            "force": sorted(options.force),
            "only": sorted(only) if only is not None else None,
        }
    )
    return Plan(
        actions=tuple(actions),
        input_digest=digest,
        created_at=now,
        skipped=skipped,
        options={
            "force": sorted(options.force),
            "only": sorted(only) if only is not None else None,
        },
    )


def options_of(p: Plan) -> PlanOptions:
    """The options a (saved) plan was made with."""
    only = p.options.get("only")
    return PlanOptions(
        force=frozenset(p.options.get("force") or ()),
        only=frozenset(only) if only is not None else None,
    )


def _plan_certificate(
    inv: Inventory,
    cert: Certificate,
    record: CertRecord | None,
    observed: Observed,
    now: datetime,
    options: PlanOptions,
    skipped: dict[str, str],
) -> list[Action]:
    current = record.current if record is not None and not record.retired else None

    if cert.revoked:
        if current is not None and current.status != "revoked":
            return [
                Action(
                    ActionKind.REVOKE,
                    cert.name,
                    (R.reason(R.REVOKED_IN_INVENTORY, reason=cert.revoke_reason),),
                    details={
                        "revocation_reason": cert.revoke_reason,
                        "version": current.version,
                        "serial": current.serial,
                        "retire": False,
                    },
                )
            ]
        return []

    waiting = _agent_waiting(cert, observed)
    if waiting is not None:  # an agent has the work in hand: no second job
        skipped[cert.name] = waiting
        return []

    profile = profile_for(inv, cert)
    window = observed.renewal_windows.get(cert.name)
    issue_reasons = list(_issue_reasons(cert, profile, record, current, now, options, window))
    if issue_reasons:
        held = None if cert.name in options.force else _backoff(cert, profile, record, now)
        if held is not None:
            skipped[cert.name] = held
            return []
        kind = ActionKind.ISSUE if current is None else ActionKind.RENEW
        details: dict[str, object] = {"names": list(cert.names), "issuer": cert.issuer}
        if cert.key.custody == "target" and cert.placements:
            details["key_custody"] = "target"  # the key is made on (and stays on) the host
            details["key_on"] = cert.placements[0].id
            if cert.placements[0].agent is not None:
                details["via_agent"] = describe_agent(cert.placements[0].agent)
        if current is not None:
            details.update(
                previous_version=current.version,
                previous_serial=current.serial,
                previous_not_after=current.not_after.isoformat(),
            )
        out = [Action(kind, cert.name, tuple(issue_reasons), details=details)]
        for p in cert.placements:
            out.append(
                Action(
                    ActionKind.DEPLOY,
                    cert.name,
                    (R.reason(R.NEW_VERSION),),
                    placement=p.id,
                    details=_agent_details(
                        p, {"target": p.target, "host": p.host, "after": kind.value}
                    ),
                )
            )
        return out

    assert current is not None
    if current.key_custody == OBSERVED_CUSTODY:
        return []  # adopted without its key (observe only): nothing to deploy until renewal
    out = []
    for p in cert.placements:
        why = _deploy_reason(cert.name, p.id, current, observed)
        if why is not None:
            out.append(
                Action(
                    ActionKind.DEPLOY,
                    cert.name,
                    (why,),
                    placement=p.id,
                    details=_agent_details(
                        p, {"target": p.target, "host": p.host, "version": current.version}
                    ),
                )
            )
    return out


def describe_agent(selector: Mapping[str, Any]) -> str:
    """``agent NAME`` or ``agents matching labels k=v os O`` (plans, messages)."""
    if "name" in selector:
        return f"agent {selector['name']}"
    parts = [f"{k}={v}" for k, v in sorted((selector.get("labels") or {}).items())]
    text = "agents matching " + (("labels " + ",".join(parts)) if parts else "any labels")
    if selector.get("os"):
        text += f" os {selector['os']}"
    return text


def _agent_details(p: Placement, details: dict[str, Any]) -> dict[str, Any]:
    if p.agent is not None:
        details["via_agent"] = describe_agent(p.agent)
        details["agent"] = dict(p.agent)
    return details


def _agent_waiting(cert: Certificate, observed: Observed) -> str | None:
    """Why an agent-routed certificate waits: an open job for its placement."""
    for p in cert.placements:
        if p.agent is None:
            continue
        job = observed.agent_jobs.get((cert.name, p.id))
        if job is not None and job[3] == routing.job_spec(cert, p).digest():
            job_id, state, agent, _ = job
            who = f"agent {agent}" if agent else describe_agent(p.agent)
            return f"waiting on {who}: job {job_id[:12]} for {p.id} is {state}"
    return None


def _issue_reasons(
    cert: Certificate,
    profile: Profile,
    record: CertRecord | None,
    current: VersionRecord | None,
    now: datetime,
    options: PlanOptions,
    ari: tuple[datetime, datetime] | None = None,
) -> Iterable[Reason]:
    if current is None:
        yield R.reason(R.NOT_ISSUED)
        return
    if current.status == "revoked":
        yield R.reason(R.CURRENT_REVOKED, serial=current.serial)
    if current.issuer != cert.issuer:
        yield R.reason(R.ISSUER_CHANGED, old=current.issuer, new=cert.issuer)
    if current.key_custody not in (cert.key.custody, OBSERVED_CUSTODY):  # a new key
        yield R.reason(
            R.KEY_CHANGED,
            old=f"{current.key_spec} (custody {current.key_custody})",
            new=f"{cert.key.id} (custody {cert.key.custody})",
        )
    elif current.key_spec != cert.key.id:
        yield R.reason(R.KEY_CHANGED, old=current.key_spec, new=cert.key.id)
    if sorted(current.names) != sorted(cert.names):
        added = sorted(set(cert.names) - set(current.names))
        removed = sorted(set(current.names) - set(cert.names))
        yield R.reason(R.NAMES_CHANGED, change=_names_change(added, removed))
    if current.profile_digest != profile_digest(cert, profile):
        yield R.reason(R.PROFILE_CHANGED, profile=profile.name)
    if cert.name in options.force or (record is not None and record.force_renew):
        yield R.reason(R.FORCED)
    if now >= current.not_after:
        yield R.reason(R.EXPIRED, not_after=current.not_after.isoformat())
    else:
        if ari is not None and now >= ari_renewal_time(cert, current, ari):
            yield R.reason(R.ARI_WINDOW, start=ari[0].isoformat(), end=ari[1].isoformat())
        due = renewal_time(cert, current)
        if now >= due:
            left = current.not_after - now
            yield R.reason(
                R.RENEWAL_WINDOW,
                left=_human(left),
                renew_before=cert.renew_before.describe(),
            )


def _backoff(
    cert: Certificate, profile: Profile, record: CertRecord | None, now: datetime
) -> str | None:
    """Hold back a certificate whose issuance keeps failing, unless its spec changed."""
    if record is None or record.failures <= 0 or record.next_attempt_at is None:
        return None
    if record.spec_digest is not None and record.spec_digest != spec_digest(cert, profile):
        return None
    if record.force_renew or now >= record.next_attempt_at:
        return None
    return (
        f"blocked until {record.next_attempt_at.isoformat()} "
        f"(backing off after {record.failures} failed attempt(s))"
    )


def _deploy_reason(
    cert: str, placement: str, current: VersionRecord, observed: Observed
) -> Reason | None:
    dep = observed.state.deployments.get((cert, placement))
    obs = observed.targets.get((cert, placement))
    if obs is not None:
        if obs.state is TargetState.MATCH:
            if dep is None or dep.fingerprint != current.fingerprint:
                return R.reason(R.NOT_RECORDED)
            return None
        if obs.state is TargetState.UNKNOWN:
            # Could not look: fall back to what the state recorded, so a deploy that
            # failed (or never happened) is not forgotten.
            return _deploy_reason_from_record(dep, current)
        if obs.state is TargetState.MISSING:
            if dep is None:
                return R.reason(R.NEW_TARGET)
            return R.reason(R.MISSING_ON_TARGET, detail=obs.detail or "files are missing")
        return R.reason(R.CONTENT_DIFFERS, detail=obs.detail or "content differs")
    # Not observed (the target cannot be read back): trust the deployment record.
    return _deploy_reason_from_record(dep, current)


def _deploy_reason_from_record(
    dep: DeploymentRecord | None, current: VersionRecord
) -> Reason | None:
    if dep is None:
        return R.reason(R.NEW_TARGET)
    if dep.status != "deployed":
        return R.reason(R.LAST_DEPLOY_FAILED)
    if dep.fingerprint != current.fingerprint:
        return R.reason(R.OUTDATED_ON_TARGET, version=dep.version)
    return None


def _plan_removed(record: CertRecord) -> Action:
    cur = record.current
    if record.revoke_on_remove and cur is not None and cur.status == "active":
        return Action(
            ActionKind.REVOKE,
            record.name,
            (R.reason(R.REMOVED_REVOKE),),
            details={
                "revocation_reason": "cessationOfOperation",
                "version": cur.version,
                "serial": cur.serial,
                "retire": True,
            },
        )
    return Action(ActionKind.RETIRE, record.name, (R.reason(R.REMOVED),))


def _names_change(added: list[str], removed: list[str]) -> str:
    parts = []
    if added:
        parts.append("+" + ", +".join(added))
    if removed:
        parts.append("-" + ", -".join(removed))
    return ", ".join(parts)


def _human(delta: timedelta) -> str:
    secs = int(delta.total_seconds())
    if secs >= 86400:
        return f"{secs // 86400}d"
    if secs >= 3600:
        return f"{secs // 3600}h"
    return f"{max(secs, 0) // 60}m"


def count_line(counts: Mapping[str, int]) -> str:
    return (
        f"Plan: {counts.get('issue', 0)} to issue, {counts.get('renew', 0)} to renew, "
        f"{counts.get('deploy', 0)} to deploy, {counts.get('revoke', 0)} to revoke, "
        f"{counts.get('retire', 0)} to retire."
    )

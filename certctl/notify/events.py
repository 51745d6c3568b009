"""Which notifications are due: a pure function of inventory, state and clock.

Expiry warnings: each certificate's current active version is checked against its
thresholds (days before ``not_after``; default 30, 14, 7, 0; a profile's
``expiry_warnings`` overrides the default and the owner's overrides the profile's).
Only the most urgent threshold crossed is reported, so a certificate first seen 5
days before expiry gets the 7-day warning, not three at once; a threshold as long as
the certificate's lifetime is ignored (a 30-day certificate is not "expiring" when
issued). The deduplication key names the certificate, its serial and the threshold: a
renewed certificate starts afresh.

Failures come from the audit log of the last apply run (``*.failed`` events), keyed
by run, event, certificate and placement.

Routing: a certificate's owner with a ``notify`` list gets exactly those notifiers;
otherwise every notifier gets it. Either way a notifier with an ``events`` list only
gets those kinds. Recipients (for e-mail) are the owner's and the team's addresses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from certctl.model import Certificate, Inventory, StateSnapshot

DEFAULT_THRESHOLDS: tuple[int, ...] = (30, 14, 7, 0)


@dataclass(frozen=True)
class Event:
    kind: str  # expiring | failed | issuer_unreachable | drift | ...
    key: str  # deduplication key
    title: str
    text: str
    severity: str = "warning"  # info | warning | critical
    cert: str | None = None
    facts: Mapping[str, Any] = field(default_factory=dict)  # JSON-able, no secrets


@dataclass(frozen=True)
class Delivery:
    """An event for one notifier, with the routed facts; ``payload`` is what the
    notifier receives (and what the state store keeps)."""

    notifier: str
    event: Event
    payload: Mapping[str, Any]


def thresholds_for(inv: Inventory, cert: Certificate) -> tuple[int, ...]:
    owner = inv.owners.get(cert.owner or "") or {}
    if owner.get("expiry_warnings"):
        return tuple(sorted((int(d) for d in owner["expiry_warnings"]), reverse=True))
    profile = inv.profiles.get(cert.profile)
    if profile is not None and profile.expiry_warnings:
        return profile.expiry_warnings
    return DEFAULT_THRESHOLDS


def expiry_events(inv: Inventory, snap: StateSnapshot, now: datetime) -> list[Event]:
    out: list[Event] = []
    for name in sorted(inv.certificates):
        cert = inv.certificates[name]
        rec = snap.certs.get(name)
        if cert.revoked or rec is None or rec.retired or rec.current is None:
            continue
        cur = rec.current
        if cur.status != "active":
            continue
        left = cur.not_after - now
        lifetime = cur.not_after - cur.not_before
        crossed = [
            t
            for t in thresholds_for(inv, cert)
            if left <= timedelta(days=t) and timedelta(days=t) < lifetime
        ]
        if not crossed:
            continue
        threshold = min(crossed)
        days = left.total_seconds() / 86400
        if left <= timedelta(0):
            title = f"Certificate {name} has expired"
            text = f"{name} ({cur.names[0] if cur.names else name}) expired at {cur.not_after}."
            severity = "critical"
        else:
            whole = int(days)
            title = f"Certificate {name} expires in {whole} day{'s' if whole != 1 else ''}"
            text = (
                f"{name} ({cur.names[0] if cur.names else name}) expires at "
                f"{cur.not_after} (warning threshold {threshold} days); serial {cur.serial}, "
                f"issuer {cur.issuer}."
            )
            severity = "warning" if threshold <= 7 else "info"
        out.append(
            Event(
                kind="expiring",
                key=f"expiring:{name}:{cur.serial}:{threshold}",
                title=title,
                text=text,
                severity=severity,
                cert=name,
                facts={
                    "threshold_days": threshold,
                    "days_left": round(days, 2),
                    "not_after": cur.not_after.isoformat(),
                    "serial": cur.serial,
                    "issuer": cur.issuer,
                },
            )
        )
    return out


def failure_events(run_id: int, audit: Iterable[Mapping[str, Any]]) -> list[Event]:
    """``*.failed`` audit events of one run (renewal, issue, deploy, revoke)."""
    out: list[Event] = []
    for row in audit:
        event = str(row.get("event", ""))
        if row.get("run_id") != run_id or not event.endswith(".failed"):
            continue
        action = event[: -len(".failed")]
        cert = row.get("cert")
        placement = row.get("placement")
        detail = row.get("detail") or {}
        error = str(detail.get("error", "failed"))[:500]
        where = f" on {placement}" if placement else ""
        out.append(
            Event(
                kind="failed",
                key=f"failed:{run_id}:{action}:{cert or ''}:{placement or ''}",
                title=f"{action} of {cert}{where} failed",
                text=f"{action} of certificate {cert}{where} failed in apply run {run_id}: {error}",
                severity="critical" if action in ("issue", "renew") else "warning",
                cert=str(cert) if cert else None,
                facts={"action": action, "run_id": run_id, "placement": placement, "error": error},
            )
        )
    return out


def issuer_unreachable_event(issuer: str, where: str, error: str, now: datetime) -> Event:
    """One per issuer per UTC day while it stays unreachable."""
    return Event(
        kind="issuer_unreachable",
        key=f"issuer_unreachable:{issuer}:{now.date().isoformat()}",
        title=f"Issuer {issuer} is unreachable",
        text=f"certctl could not reach issuer {issuer} at {where}: {error}",
        severity="critical",
        facts={"issuer": issuer, "endpoint": where, "error": error},
    )


def route(inv: Inventory, events: Sequence[Event]) -> list[Delivery]:
    out: list[Delivery] = []
    every = sorted(inv.notifiers)
    for ev in events:
        cert = inv.certificates.get(ev.cert or "") if ev.cert else None
        owner_name = cert.owner if cert is not None else None
        owner = inv.owners.get(owner_name or "") or {}
        team_name = owner.get("team")
        team = inv.teams.get(team_name or "") or {}
        names = list(owner.get("notify") or ()) or every
        recipients = [a for a in (owner.get("email"), team.get("email")) if a]
        if not team.get("email"):
            recipients += list(team.get("members") or ())
        payload: dict[str, Any] = {
            "key": ev.key,
            "event": ev.kind,
            "title": ev.title,
            "text": ev.text,
            "severity": ev.severity,
            "cert": ev.cert,
            "owner": owner_name,
            "team": team_name,
            "recipients": list(dict.fromkeys(recipients)),
            **ev.facts,
        }
        for n in names:
            spec = inv.notifiers.get(n)
            if spec is None:
                continue
            wanted = spec.get("events")
            if wanted and ev.kind not in wanted:
                continue
            out.append(Delivery(n, ev, payload))
    return out

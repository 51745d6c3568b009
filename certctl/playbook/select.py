"""Which certificates a playbook step acts on. Pure: inventory + one state snapshot +
the clock in, sorted certificate names out (no query per certificate).

The universe is the inventory's certificates (an operation needs a certificate's
spec: its issuer, key, placements). Facts about what was issued come from the
snapshot's current version: ``issuer`` is the issuer that signed the current version
(the inventory's issuer when nothing is issued yet), ``issuer_changed`` compares the
two, ``expiring_within`` and ``issued_before`` (the version's notBefore) need a current
version, ``key_algorithm`` is the current version's key (else the inventory's).
Retired versions count as not issued.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from fnmatch import fnmatchcase

from certctl.model import Certificate, Inventory, StateSnapshot, VersionRecord
from certctl.playbook.spec import Selector


def _current(snap: StateSnapshot, name: str) -> VersionRecord | None:
    rec = snap.certs.get(name)
    if rec is None or rec.retired:
        return None
    return rec.current


def current_version(snap: StateSnapshot, name: str) -> VersionRecord | None:
    """The current version of ``name`` (None: never issued, or retired)."""
    return _current(snap, name)


def _any(values: Iterable[str | None], wanted: Sequence[str]) -> bool:
    have = {v for v in values if v}
    return any(w in have for w in wanted)


def _key_matches(key_id: str, wanted: Sequence[str]) -> bool:
    return any(key_id == w or key_id.startswith(w + "-") for w in wanted)


def matches(
    inv: Inventory, cert: Certificate, cur: VersionRecord | None, sel: Selector, now: datetime
) -> bool:
    if sel.names and not any(fnmatchcase(cert.name, p) for p in sel.names):
        return False
    if sel.issuer and (cur.issuer if cur else cert.issuer) not in sel.issuer:
        return False
    if sel.issuer_changed is not None and (
        (cur is not None and cur.issuer != cert.issuer) != sel.issuer_changed
    ):
        return False
    if sel.profile and cert.profile not in sel.profile:
        return False
    if sel.owner and cert.owner not in sel.owner:
        return False
    if sel.team:
        team = inv.owners.get(cert.owner or "", {}).get("team")
        if team is None or str(team) not in sel.team:
            return False
    if sel.tag and not _any(cert.tags, sel.tag):
        return False
    if sel.host and not _any((p.host for p in cert.placements), sel.host):
        return False
    if sel.target and not _any((p.target for p in cert.placements), sel.target):
        return False
    if sel.expiring_within_s is not None and (
        cur is None or cur.not_after - now > timedelta(seconds=sel.expiring_within_s)
    ):
        return False
    if sel.issued_before is not None and (cur is None or cur.not_before >= sel.issued_before):
        return False
    return not (
        sel.key_algorithm
        and not _key_matches(cur.key_spec if cur else cert.key.id, sel.key_algorithm)
    )


def select(inv: Inventory, snap: StateSnapshot, sel: Selector | None, now: datetime) -> list[str]:
    """Names of the inventory certificates matching ``sel`` (all without one), sorted."""
    out = []
    for name in sorted(inv.certificates):
        cert = inv.certificates[name]
        if sel is None or matches(inv, cert, _current(snap, name), sel, now):
            out.append(name)
    return out


def parse_limit(limit: str | None) -> tuple[list[str], list[str]] | None:
    """``--limit 'web-*,api-*,!web-test'``: globs to keep and globs (``!``) to drop."""
    if limit is None:
        return None
    keep: list[str] = []
    drop: list[str] = []
    for part in limit.replace(":", ",").split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("!"):
            if part[1:]:
                drop.append(part[1:])
        else:
            keep.append(part)
    return keep, drop


def apply_limit(names: Sequence[str], limit: tuple[list[str], list[str]] | None) -> list[str]:
    if limit is None:
        return list(names)
    keep, drop = limit
    return [
        n
        for n in names
        if (not keep or any(fnmatchcase(n, p) for p in keep))
        and not any(fnmatchcase(n, p) for p in drop)
    ]

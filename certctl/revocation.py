"""Choosing what a bulk ``certctl revoke`` revokes. Pure: inventory + state in, a list
of candidates out, so ``--dry-run`` lists exactly what the real run revokes.

Filters are ``key=value``; keys: ``issuer`` (the issuer that signed the current
version, from the state, so certificates already removed from the inventory match
too), ``profile``, ``owner``, ``team`` (the owner's team), ``target``, ``host``
(inventory). Different keys must all match; repeating a key matches any of its values.
Explicit names, when given, are a further condition.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from certctl.errors import CertctlError
from certctl.model import Certificate, Inventory, StateSnapshot, VersionRecord

FILTER_KEYS = ("issuer", "profile", "owner", "team", "target", "host")


@dataclass(frozen=True)
class Candidate:
    name: str
    version: VersionRecord


def parse_filters(items: Iterable[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not value or key not in FILTER_KEYS:
            raise CertctlError(
                f"bad filter {item!r}: use KEY=VALUE with KEY one of {', '.join(FILTER_KEYS)}"
            )
        out.setdefault(key, set()).add(value)
    return out


def _values(key: str, spec: Certificate | None, version: VersionRecord, inv: Inventory) -> set[str]:
    if key == "issuer":
        return {version.issuer}
    if spec is None:
        return set()
    if key == "profile":
        return {spec.profile}
    if key == "owner":
        return {spec.owner} if spec.owner else set()
    if key == "team":
        owner: Mapping[str, object] = inv.owners.get(spec.owner or "", {})
        team = owner.get("team")
        return {str(team)} if team else set()
    if key == "target":
        return {p.target for p in spec.placements}
    if key == "host":
        return {p.host for p in spec.placements if p.host}
    raise CertctlError(f"unknown filter key {key!r}")


def select(
    inv: Inventory,
    snap: StateSnapshot,
    names: Sequence[str],
    filters: Mapping[str, set[str]],
) -> list[Candidate]:
    """Certificates whose current version is not revoked yet and that match, by name."""
    if not names and not filters:
        raise CertctlError("name the certificates to revoke, or give at least one --filter")
    unknown = [n for n in names if n not in snap.certs]
    if unknown:
        raise CertctlError(f"not in the state (never issued): {', '.join(sorted(unknown))}")
    wanted = set(names)
    out: list[Candidate] = []
    for name in sorted(snap.certs):
        rec = snap.certs[name]
        cur = rec.current
        if cur is None or cur.status == "revoked":
            continue
        if wanted and name not in wanted:
            continue
        spec = inv.certificates.get(name)
        if all(_values(k, spec, cur, inv) & vs for k, vs in filters.items()):
            out.append(Candidate(name, cur))
    return out

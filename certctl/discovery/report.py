"""``certctl discovered``: recorded findings, classified, filtered, summarised.

Categories (each finding may be in several):

* ``expired`` / ``expiring``: ``not_after`` has passed / falls within the window;
* ``self-signed``: issuer equals subject and the signature verifies with its own key;
* ``weak``: RSA under 2048 bits, EC under 256 bits, any DSA key, or (for a
  certificate that is not self-signed: a root's self-signature is never checked by
  clients) an MD2/MD5/SHA-1 signature;
* ``unknown-issuer``: not signed by a CA certificate of the inventory's issuers.
  Those CA certificates are every certificate in the chains certctl recorded for
  its issued versions (that covers ACME CAs and their intermediates), the local-CA
  issuers' own root and intermediate from the issuer vault, and a local CA's
  configured ``cert_file``. A finding is "known" when one of them verifies its
  signature; failing that, when its issuer name equals the subject of a CA
  certificate seen in an ACME issuer's chains (an ACME CA rotates intermediates, so
  a name match is the best that can be done there);
* ``not-in-inventory``: its fingerprint is no certificate version in the state.

Only the latest sighting of each place counts (:func:`current`): when a rescan finds
another certificate in the same file or on the same endpoint, the one it replaced is
no longer listed (its row stays in the state, as history).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from certctl.discovery import parse
from certctl.discovery.model import Finding
from certctl.model import Inventory
from certctl.state.base import StateStore

CATEGORIES = (
    "expired",
    "expiring",
    "self-signed",
    "weak",
    "unknown-issuer",
    "not-in-inventory",
)
_WEAK_SIGNATURES = ("md2", "md5", "sha1")


@dataclass(frozen=True)
class Known:
    """What the inventory and state know: CA certificates (by subject), ACME CA
    names, and the fingerprints of issued versions."""

    cas: Mapping[x509.Name, tuple[x509.Certificate, ...]]
    acme_names: frozenset[str]
    issued: frozenset[str]


def _certs(pem: bytes) -> list[x509.Certificate]:
    try:
        with parse.quiet():
            return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def known_context(inv: Inventory, store: StateStore, findings: Sequence[Finding]) -> Known:
    cas: dict[x509.Name, list[x509.Certificate]] = {}
    acme: set[str] = set()

    def add(cert: x509.Certificate) -> None:
        bucket = cas.setdefault(cert.subject, [])
        if cert not in bucket:
            bucket.append(cert)

    for issuer, chain_pem in store.issuer_chains():
        spec = inv.issuers.get(issuer)
        for cert in _certs(chain_pem):
            add(cert)
            if spec is not None and spec.type != "local_ca":
                acme.add(cert.subject.rfc4514_string())
    for name in sorted(inv.issuers):
        spec = inv.issuers[name]
        if spec.type != "local_ca":
            continue
        for label in ("root", "intermediate"):
            raw = store.get(name, f"{label}/cert.pem")
            if raw:
                for cert in _certs(raw):
                    add(cert)
            level = spec.config.get(label)
            cert_file = level.get("cert_file") if isinstance(level, Mapping) else None
            if isinstance(cert_file, str):
                path = Path(cert_file).expanduser()
                path = path if path.is_absolute() else inv.root / path
                try:
                    for cert in _certs(path.read_bytes()):
                        add(cert)
                except OSError:
                    pass  # an unreadable CA file is the issuer's problem, reported there
    issued = store.issued_fingerprints([f.fingerprint for f in findings])
    return Known({k: tuple(v) for k, v in cas.items()}, frozenset(acme), frozenset(issued))


def _issuer_known(f: Finding, known: Known) -> bool:
    try:
        with parse.quiet():
            leaf = x509.load_pem_x509_certificate(f.chain_pem.encode())
    except ValueError:
        return False
    for ca in known.cas.get(leaf.issuer, ()):
        try:
            leaf.verify_directly_issued_by(ca)
            return True
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
    return f.issuer in known.acme_names


def _place(f: Finding) -> tuple[str, str, str, str]:
    """Where a finding was seen: a file (a store's ``#alias``/bundle's ``#N`` suffix
    dropped) or an endpoint with its SNI."""
    location = f.location
    if f.source == "file":
        base, sep, suffix = location.rpartition("#")
        if sep and base and "/" not in suffix:
            location = base
    return f.source, f.host, location, f.sni or ""


def current(findings: Iterable[Finding]) -> list[Finding]:
    """The findings of the latest sighting of each place: a certificate that a later
    scan found replaced (another certificate in the same file, served on the same
    endpoint) is history, not something to report. Order kept."""
    items = list(findings)
    latest: dict[tuple[str, str, str, str], datetime] = {}
    for f in items:
        place = _place(f)
        if place not in latest or f.seen_at > latest[place]:
            latest[place] = f.seen_at
    return [f for f in items if f.seen_at >= latest[_place(f)]]


def is_weak(f: Finding) -> bool:
    if f.key_algorithm == "rsa" and f.key_size < 2048:
        return True
    if f.key_algorithm == "ec" and f.key_size < 256:
        return True
    if f.key_algorithm == "dsa":
        return True
    sig = f.signature_algorithm.lower()
    return not f.self_signed and any(s in sig for s in _WEAK_SIGNATURES)


def categories(f: Finding, now: datetime, window: timedelta, known: Known) -> list[str]:
    out: list[str] = []
    if f.not_after <= now:
        out.append("expired")
    elif f.not_after <= now + window:
        out.append("expiring")
    if f.self_signed:
        out.append("self-signed")
    if is_weak(f):
        out.append("weak")
    if not _issuer_known(f, known):
        out.append("unknown-issuer")
    if f.fingerprint not in known.issued:
        out.append("not-in-inventory")
    return out


@dataclass(frozen=True)
class Row:
    finding: Finding
    categories: tuple[str, ...]


def classify(
    findings: Iterable[Finding], now: datetime, window: timedelta, known: Known
) -> list[Row]:
    return [Row(f, tuple(categories(f, now, window, known))) for f in findings]


def select(rows: Sequence[Row], wanted: Sequence[str]) -> list[Row]:
    """Rows in every wanted category (``expiring`` also takes expired ones)."""

    def has(row: Row, cat: str) -> bool:
        if cat == "expiring":
            return "expiring" in row.categories or "expired" in row.categories
        return cat in row.categories

    return [r for r in rows if all(has(r, c) for c in wanted)]


def summary(rows: Sequence[Row]) -> dict[str, int]:
    out = {"findings": len(rows)}
    out["file"] = sum(1 for r in rows if r.finding.source == "file")
    out["network"] = sum(1 for r in rows if r.finding.source == "network")
    for cat in CATEGORIES:
        out[cat] = sum(1 for r in rows if cat in r.categories)
    out["with-key"] = sum(1 for r in rows if r.finding.key_path or r.finding.key_in_store)
    return out


def finding_json(f: Finding, cats: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "source": f.source,
        "host": f.host,
        "location": f.location,
        "sni": f.sni,
        "format": f.format,
        "fingerprint": f.fingerprint,
        "subject": f.subject,
        "sans": list(f.sans),
        "issuer": f.issuer,
        "serial": f.serial,
        "not_before": f.not_before.isoformat(),
        "not_after": f.not_after.isoformat(),
        "key_algorithm": f.key_algorithm,
        "key_size": f.key_size,
        "signature_algorithm": f.signature_algorithm,
        "self_signed": f.self_signed,
        "key_path": f.key_path,
        "key_in_store": f.key_in_store,
        "chain_length": f.chain_pem.count("-----BEGIN CERTIFICATE-----"),
        "seen_at": f.seen_at.isoformat(),
        **({"categories": list(cats)} if cats else {}),
    }


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Text from certificates (a scanned server chooses its subject) made safe for a
    terminal: control characters, escape sequences' introducers among them, shown
    as ``\\xNN``."""
    return _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def key_label(f: Finding) -> str:
    return f"{f.key_algorithm}-{f.key_size}" if f.key_size else f.key_algorithm


def render(rows: Sequence[Row], total: Sequence[Row], fmt: str, window_days: float) -> str:
    counts = summary(total)
    if fmt == "json":
        doc = {
            "summary": counts,
            "expiring_window_days": window_days,
            "findings": [finding_json(r.finding, r.categories) for r in rows],
        }
        return json.dumps(doc, indent=2, sort_keys=True) + "\n"
    lines: list[str] = []
    for r in rows:
        f = r.finding
        where = f"{f.host}:{f.location}" if f.host != "local" else f.location
        sni = f" (SNI {f.sni})" if f.sni else ""
        key = f", key {f.key_path}" if f.key_path else (", key in store" if f.key_in_store else "")
        flags = f"  [{', '.join(r.categories)}]" if r.categories else ""
        lines.append(
            f"{f.source:<7} {printable(where + sni)}\n"
            f"        {printable(f.subject)}  expires {f.not_after:%Y-%m-%d}  "
            f"{key_label(f)}{printable(key)}{flags}"
        )
    lines.append(
        f"Listed {len(rows)} of {counts['findings']} findings ({counts['file']} in files, "
        f"{counts['network']} on the network): {counts['expired']} expired, "
        f"{counts['expiring']} expiring within {window_days:g}d, {counts['self-signed']} "
        f"self-signed, {counts['weak']} weak, {counts['unknown-issuer']} unknown issuer, "
        f"{counts['not-in-inventory']} not in inventory, {counts['with-key']} with their key."
    )
    return "\n".join(lines) + "\n"

"""``certctl drift``: what every declared TLS endpoint actually serves.

Endpoints come from two places: each placement whose target has ``verify:
{endpoint, sni}`` (rendered per certificate and host at load time), and the
inventory's ``endpoints:`` kind (``name: {endpoint: host:port, sni: name,
certificate: cert-name}``). Each is probed once (:func:`certctl.observe.probe.
probe_many`) and classified by the pure :func:`classify`, in this order:

``unreachable`` (no TLS handshake: refused, timed out, handshake failed), ``expired``
(the served leaf's notAfter has passed), ``name_mismatch`` (the leaf does not cover
the SNI name), ``other_certificate`` (not the current version certctl issued), ``ok``.

Only ``ok`` is not drift. Key material never appears: only certificates are read.
"""

from __future__ import annotations

import ipaddress
import json
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509

from certctl import pki
from certctl.errors import UnsafeValueError
from certctl.model import Inventory, StateSnapshot, TargetState
from certctl.observe.probe import ProbeResult, ProbeTarget, probe_many
from certctl.observe.targets import observe_targets

OK = "ok"
UNREACHABLE = "unreachable"
EXPIRED = "expired"
NAME_MISMATCH = "name_mismatch"
OTHER_CERTIFICATE = "other_certificate"
STATUSES = (OK, OTHER_CERTIFICATE, EXPIRED, NAME_MISMATCH, UNREACHABLE)
DEFAULT_TIMEOUT = 5.0


def parse_endpoint(value: Any) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port)."""
    if not isinstance(value, str):
        raise UnsafeValueError("an endpoint must be 'host:port'")
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UnsafeValueError(f"endpoint {value!r} must be 'host:port'")
    return host, int(port)


@dataclass(frozen=True)
class Expectation:
    """One endpoint to check, and what it should serve."""

    name: str  # report key: "cert placement" or the endpoints: entry name
    source: str  # "target" | "endpoints"
    target: ProbeTarget
    cert: str | None = None
    placement: str | None = None
    fingerprint: str | None = None  # the current version's; None = not issued / unknown
    timeout: float = DEFAULT_TIMEOUT

    @property
    def endpoint(self) -> str:
        h = self.target.host
        return f"[{h}]:{self.target.port}" if ":" in h else f"{h}:{self.target.port}"


@dataclass(frozen=True)
class Finding:
    expectation: Expectation
    status: str
    detail: str
    served: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        e = self.expectation
        return {
            "name": e.name,
            "source": e.source,
            "endpoint": e.endpoint,
            "sni": e.target.sni,
            "certificate": e.cert,
            "placement": e.placement,
            "expected_fingerprint": e.fingerprint,
            "status": self.status,
            "detail": self.detail,
            "served": dict(self.served) or None,
        }


def expectations(
    inv: Inventory, snap: StateSnapshot, *, timeout: float = DEFAULT_TIMEOUT
) -> list[Expectation]:
    """Every endpoint the inventory declares, with the fingerprint it should serve."""

    def current(cert: str | None) -> str | None:
        rec = snap.certs.get(cert) if cert else None
        if rec is None or rec.retired or rec.current is None:
            return None
        return rec.current.fingerprint

    out: list[Expectation] = []
    for name in sorted(inv.certificates):
        cert = inv.certificates[name]
        for p in cert.placements:
            if p.agent is not None:  # the agent verifies it where it is (see its result)
                continue
            verify = p.config.get("verify")
            if not isinstance(verify, Mapping) or not verify.get("endpoint"):
                continue
            host, port = parse_endpoint(verify["endpoint"])
            out.append(
                Expectation(
                    f"{name} {p.id}",
                    "target",
                    ProbeTarget(host, port, verify.get("sni") or None),
                    cert=name,
                    placement=p.id,
                    fingerprint=current(name),
                    timeout=timeout,
                )
            )
    for name in sorted(inv.endpoints):
        ep = inv.endpoints[name]
        host, port = parse_endpoint(ep["endpoint"])
        cert_name = ep.get("certificate")
        t = ep.get("timeout")
        out.append(
            Expectation(
                name,
                "endpoints",
                ProbeTarget(host, port, ep.get("sni") or None),
                cert=cert_name,
                fingerprint=current(cert_name),
                timeout=float(t) if isinstance(t, int | float) else timeout,
            )
        )
    return out


def _served_names(cert: x509.Certificate) -> list[str]:
    names = pki.sans(cert)
    if names:
        return names
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return [str(a.value) for a in cns]


def covers(names: Sequence[str], hostname: str) -> bool:
    """RFC 6125 matching: exact (case-insensitive), a wildcard for one left-most
    label, IP addresses compared as addresses."""
    try:
        ip = ipaddress.ip_address(hostname.strip("[]"))
    except ValueError:
        ip = None
    want = hostname.rstrip(".").lower()
    for n in names:
        if ip is not None:
            try:
                if ipaddress.ip_address(n) == ip:
                    return True
            except ValueError:
                pass
            continue
        n = n.rstrip(".").lower()
        if n == want:
            return True
        if n.startswith("*.") and "." in want:
            head, _, rest = want.partition(".")
            if head and rest == n[2:]:
                return True
    return False


def classify(exp: Expectation, result: ProbeResult, now: datetime) -> Finding:
    """Pure: what one probe result means against what was expected."""
    if result.der is None:
        return Finding(exp, UNREACHABLE, result.error or "no certificate")
    try:
        cert = x509.load_der_x509_certificate(result.der)
    except ValueError:
        return Finding(exp, UNREACHABLE, "the endpoint presented an unparsable certificate")
    fp = pki.fingerprint(cert)
    names = _served_names(cert)
    served = {
        "fingerprint": fp,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": pki.serial_hex(cert.serial_number),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "names": names,
    }
    if cert.not_valid_after_utc <= now:
        return Finding(
            exp, EXPIRED, f"serves a certificate that expired at {served['not_after']}", served
        )
    sni = exp.target.sni
    if sni and not covers(names, sni):
        return Finding(
            exp,
            NAME_MISMATCH,
            f"serves a certificate for {', '.join(names[:4]) or 'no names'}, not {sni}",
            served,
        )
    if exp.fingerprint is not None and fp != exp.fingerprint:
        return Finding(
            exp,
            OTHER_CERTIFICATE,
            f"serves another certificate ({fp[:16]}…, {served['subject']}, issued by "
            f"{served['issuer']}, expires {served['not_after']}), not the current "
            f"version of {exp.cert} ({exp.fingerprint[:16]}…)",
            served,
        )
    if exp.cert is not None and exp.fingerprint is None:
        return Finding(
            exp, OK, f"{exp.cert} is not issued yet; the certificate served is valid", served
        )
    return Finding(exp, OK, "serves the expected certificate", served)


def check(
    exps: Sequence[Expectation],
    now: datetime,
    *,
    concurrency: int = 64,
    threads: int = 1,
) -> list[Finding]:
    """Probe every expectation (grouped by timeout) and classify the answers."""
    findings: list[Finding | None] = [None] * len(exps)
    by_timeout: dict[float, list[int]] = {}
    for i, e in enumerate(exps):
        by_timeout.setdefault(e.timeout, []).append(i)
    for timeout, idx in by_timeout.items():
        results = probe_many(
            [exps[i].target for i in idx],
            timeout=timeout,
            concurrency=concurrency,
            threads=threads,
        )
        for i, r in zip(idx, results, strict=True):
            findings[i] = classify(exps[i], r, now)
    return [f for f in findings if f is not None]


@dataclass(frozen=True)
class FileFinding:
    cert: str
    placement: str
    state: str  # missing | differs | unknown
    detail: str

    def to_json(self) -> dict[str, str]:
        return {
            "certificate": self.cert,
            "placement": self.placement,
            "state": self.state,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class DriftReport:
    checked_at: datetime
    findings: tuple[Finding, ...]
    files: tuple[FileFinding, ...] = ()
    files_checked: int | None = None  # None: read-back was skipped

    @property
    def drifted(self) -> bool:
        return any(f.status != OK for f in self.findings) or bool(self.files)

    def counts(self) -> dict[str, int]:
        c = Counter(f.status for f in self.findings)
        return {s: c.get(s, 0) for s in STATUSES}

    def to_json(self) -> dict[str, Any]:
        return {
            "checked_at": self.checked_at.isoformat(),
            "drift": self.drifted,
            "summary": {"endpoints": len(self.findings), **self.counts()},
            "endpoints": [f.to_json() for f in self.findings],
            "files_checked": self.files_checked,
            "files": [f.to_json() for f in self.files],
        }


def summary_line(report: DriftReport) -> str:
    c = report.counts()
    parts = [f"{len(report.findings)} endpoints: {c[OK]} ok"]
    parts += [f"{c[s]} {s.replace('_', ' ')}" for s in STATUSES[1:] if c[s]]
    line = ", ".join(parts)
    if report.files_checked is not None:
        line += f"; {report.files_checked} placements read back, {len(report.files)} drifted"
    return ("Drift: " if report.drifted else "No drift: ") + line + "."


def render_text(report: DriftReport) -> str:
    lines = []
    for f in report.findings:
        if f.status == OK:
            continue
        e = f.expectation
        sni = f" (SNI {e.target.sni})" if e.target.sni else ""
        lines.append(f"  ! {e.name}: {e.endpoint}{sni} {f.status}: {f.detail}")
    for ff in report.files:
        lines.append(f"  ! {ff.cert} {ff.placement}: files {ff.state}: {ff.detail}")
    lines.append(summary_line(report))
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: DriftReport, limit: int = 200) -> str:
    out = [f"**{summary_line(report)}**", ""]
    bad = [f for f in report.findings if f.status != OK]
    if bad:
        out += ["| endpoint | SNI | status | certificate | detail |", "|---|---|---|---|---|"]
        for f in bad[:limit]:
            e = f.expectation
            out.append(
                f"| `{_md(e.endpoint)}` | {_md(e.target.sni or '-')} | {f.status} | "
                f"{_md(e.cert or '-')} | {_md(f.detail)} |"
            )
        if len(bad) > limit:
            out.append(f"\n…and {len(bad) - limit} more (see `certctl drift --format json`).")
        out.append("")
    if report.files:
        out += ["<details><summary>Deployed files that drifted</summary>", ""]
        out += [
            f"- `{_md(f.cert)}` {_md(f.placement)}: {f.state}: {_md(f.detail)}"
            for f in report.files[:limit]
        ]
        out += ["", "</details>", ""]
    return "\n".join(out)


def run(
    inv: Inventory,
    snap: StateSnapshot,
    now: datetime,
    target_for: Callable[[str], Any] | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    concurrency: int = 64,
    threads: int = 1,
) -> DriftReport:
    """Probe the endpoints and, with ``target_for`` (the engine's target factory),
    read back every placement's files as ``plan`` does."""
    findings = check(
        expectations(inv, snap, timeout=timeout), now, concurrency=concurrency, threads=threads
    )
    files: list[FileFinding] = []
    checked: int | None = None
    if target_for is not None:
        observed = observe_targets(inv, snap, target_for)
        checked = len(observed)
        for (cert, pid), o in sorted(observed.items()):
            if o.state is not TargetState.MATCH:
                files.append(FileFinding(cert, pid, o.state.value, o.detail))
    return DriftReport(now, tuple(findings), tuple(files), checked)


def render(report: DriftReport, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(report.to_json(), indent=2) + "\n"
    if fmt == "markdown":
        return render_markdown(report)
    return render_text(report)

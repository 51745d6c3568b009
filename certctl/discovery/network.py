"""``certctl discover network``: TLS handshakes with every address of some CIDRs on
some ports; each endpoint's served chain becomes a finding.

Address space: :func:`expand` refuses, unless ``allow_reserved``, any range that
touches "this network" (0.0.0.0/8, ::), link-local (169.254.0.0/16, fe80::/10),
multicast (224.0.0.0/4, ff00::/8) or the reserved block with the limited broadcast
(240.0.0.0/4, 255.255.255.255), also when written as IPv4-mapped IPv6 (::ffff:a.b.c.d
reaches the IPv4 address). Loopback (127.0.0.0/8, ::1) is allowed: scanning
the controller's own services is legitimate and harmless. A range's network and
broadcast addresses (IPv4, prefix up to /30, loopback excepted) are left out. The
total is capped (``max_addresses``) before anything is expanded, so a typo such as
``10.0.0.0/8`` fails at once with a clear message instead of running for hours.

Probing: one asyncio loop, ``concurrency`` workers (so at most that many connections
in flight, and memory flat for any scan size), each probe
bounded by ``timeout`` (connect + handshake). No trust check is made (discovery
wants what is served, trusted or not). The served chain is read with
``SSLObject.get_unverified_chain()`` (public from Python 3.13; on 3.10-3.12 the same
method of the underlying ``_ssl`` object, which CPython has had since 3.10); where
neither exists only the leaf (``getpeercert(binary_form=True)``) is recorded.

SNI: an address is first probed with the first name known for it (from the
inventory: targets' ``verify`` endpoints and ``endpoints:``, or certificates
placed on the host with that address), else with the first ``--sni`` name, else
with none. Endpoints that completed a handshake are then probed again with each
remaining name, so a name-based virtual host serving other certificates shows up.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from certctl.discovery import parse
from certctl.discovery.model import Finding, Problem
from certctl.errors import CertctlError

DEFAULT_MAX_ADDRESSES = 65_536
DEFAULT_CONCURRENCY = 256
#: Address-port pairs per scan: a /16 on 16 ports fits; ``--ports 1-65535`` over a
#: range (billions of probes) does not.
DEFAULT_MAX_PROBES = 1 << 20
DEFAULT_TIMEOUT = 3.0
_ENCODING_DER = 2  # _ssl.ENCODING_DER

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REFUSED: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/8"), "'this network' range (0.0.0.0/8)"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local range (169.254.0.0/16)"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast range (224.0.0.0/4)"),
    (ipaddress.ip_network("240.0.0.0/4"), "reserved/broadcast range (240.0.0.0/4)"),
    (ipaddress.ip_network("::/128"), "unspecified address (::)"),
    (ipaddress.ip_network("fe80::/10"), "link-local range (fe80::/10)"),
    (ipaddress.ip_network("ff00::/8"), "multicast range (ff00::/8)"),
)
_LOOPBACK_V4 = ipaddress.IPv4Network("127.0.0.0/8")
#: IPv4-mapped IPv6 addresses (::ffff:a.b.c.d) reach the IPv4 address itself.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _refusal(net: IPNetwork) -> str | None:
    """What refused range ``net`` touches, if any; an IPv4-mapped IPv6 range is
    judged by the IPv4 range it maps to."""
    if isinstance(net, ipaddress.IPv6Network) and net.overlaps(_MAPPED):
        if not net.subnet_of(_MAPPED):
            return "IPv4-mapped range (::ffff:0:0/96, all of IPv4)"
        v4 = ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        what = _refusal(v4)
        return f"{what}, IPv4-mapped" if what else None
    for bad, what in _REFUSED:
        if net.version == bad.version and net.overlaps(bad):
            return what
    return None


class ScanRefused(CertctlError):
    """A scan request outside what is allowed (reserved range, too many addresses)."""


def parse_ports(text: str) -> tuple[int, ...]:
    """``443,8443,9000-9010`` -> ports (sorted, unique)."""
    out: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ScanRefused(
                f"--ports: {part!r} is not a port or a range such as 9000-9010"
            ) from None
        if not (0 < a < 65536 and 0 < b < 65536):
            raise ScanRefused(f"--ports: {part!r} is outside 1..65535")
        if a > b:
            raise ScanRefused(f"--ports: {part!r} is a range from high to low (write {b}-{a})")
        out.update(range(a, b + 1))
    if not out:
        raise ScanRefused("--ports: no port given")
    return tuple(sorted(out))


def check_sni(names: Sequence[str]) -> tuple[str, ...]:
    """``--sni`` names, checked before the scan: a name TLS cannot send would
    otherwise fail the probe of every live endpoint (and record nothing)."""
    for name in names:
        if not name.strip():
            raise ScanRefused("--sni: an empty name")
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            raise ScanRefused(
                f"--sni {name!r}: an IP address is never sent as SNI (RFC 6066); give a host name"
            )
        try:
            name.encode("idna")
        except UnicodeError as exc:
            raise ScanRefused(f"--sni {name[:80]!r}: not a valid host name ({exc})") from None
    return tuple(names)


def check_probes(addresses: int, ports: int, max_probes: int) -> None:
    """Refuse a scan of more than ``max_probes`` address-port pairs."""
    if addresses * ports > max_probes:
        raise ScanRefused(
            f"the scan covers {addresses} addresses x {ports} ports = {addresses * ports} "
            f"probes, more than --max-probes {max_probes}"
        )


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    nets: list[IPNetwork] = []
    for text in cidrs:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ScanRefused(
                f"{text!r} is not an IP address or CIDR range (such as 10.0.0.0/24)"
            ) from None
    return nets


def expand(
    cidrs: Sequence[str],
    *,
    allow_reserved: bool = False,
    max_addresses: int = DEFAULT_MAX_ADDRESSES,
) -> list[IPAddress]:
    """Every address to probe, in order, duplicates removed. Raises
    :class:`ScanRefused` for a refused range or a total over ``max_addresses``."""
    nets = parse_networks(cidrs)
    if not allow_reserved:
        for net in nets:
            what = _refusal(net)
            if what is not None:
                raise ScanRefused(
                    f"{net} touches the {what}: refused (pass --allow-reserved to scan it)"
                )
    total = sum(n.num_addresses for n in nets)
    if total > max_addresses:
        raise ScanRefused(
            f"the scan covers {total} addresses, more than --max-addresses {max_addresses}"
        )
    seen: set[IPAddress] = set()
    out: list[IPAddress] = []
    for net in nets:
        skip_edges = (
            isinstance(net, ipaddress.IPv4Network)
            and net.prefixlen <= 30
            and not net.subnet_of(_LOOPBACK_V4)
        )
        for addr in net:
            if skip_edges and addr in (net.network_address, net.broadcast_address):
                continue
            if addr not in seen:
                seen.add(addr)
                out.append(addr)
    return out


def endpoint_text(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


@dataclass(frozen=True)
class Options:
    ports: tuple[int, ...]
    timeout: float = DEFAULT_TIMEOUT
    concurrency: int = DEFAULT_CONCURRENCY
    sni: tuple[str, ...] = ()
    known_names: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class NetResult:
    findings: list[Finding] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    probes: int = 0
    refused: int = 0
    timed_out: int = 0
    tls: int = 0  # handshakes that returned a certificate


_CTX: list[ssl.SSLContext] = []


def _context() -> ssl.SSLContext:
    if not _CTX:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Discovery must see old servers too (and report them), so TLS 1.0 stays
        # allowed here; Python flags the setting itself as deprecated.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
        with contextlib.suppress(ssl.SSLError):
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        _CTX.append(ctx)
    return _CTX[0]


def served_chain(obj: Any) -> list[bytes]:
    """The certificates the peer sent (leaf first, DER), from an SSL object."""
    getter = getattr(obj, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(obj, "_sslobj", None), "get_unverified_chain", None)
    chain: list[bytes] = []
    if getter is not None:
        try:
            for item in getter() or ():
                chain.append(item if isinstance(item, bytes) else item.public_bytes(_ENCODING_DER))
        except (ssl.SSLError, ValueError, AttributeError):
            chain = []
    if not chain:
        leaf = obj.getpeercert(binary_form=True)
        if leaf:
            chain = [leaf]
    return chain


async def probe(
    address: str, port: int, sni: str | None, timeout: float
) -> tuple[str, list[bytes] | str | None]:
    """("tls", chain) | ("refused", None) | ("timeout", None) | ("error", reason)."""
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                address,
                port,
                ssl=_context(),
                server_hostname=sni or "",
                ssl_handshake_timeout=timeout,
            ),
            timeout,
        )
    except ConnectionRefusedError:
        return "refused", None
    except TimeoutError:
        return "timeout", None
    except ssl.SSLError as exc:
        return "error", f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return "error", reason or type(exc).__name__
    try:
        obj = writer.get_extra_info("ssl_object")
        chain = served_chain(obj) if obj is not None else []
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), min(timeout, 1.0))
    if not chain:
        return "error", "the endpoint presented no certificate"
    return "tls", chain


async def scan_async(addresses: Sequence[IPAddress], opts: Options, seen_at: datetime) -> NetResult:
    """Probe every (address, port); ``concurrency`` workers pull from one iterator, so
    memory stays flat however many probes the scan holds."""
    result = NetResult()
    answered: list[tuple[str, int, str | None]] = []

    def names_for(address: str) -> list[str]:
        names = list(opts.known_names.get(address, ()))
        names += [n for n in opts.sni if n not in names]
        return names

    async def one(address: str, port: int, sni: str | None) -> None:
        status, value = await probe(address, port, sni, opts.timeout)
        result.probes += 1
        where = endpoint_text(address, port)
        if status == "refused":
            result.refused += 1
        elif status == "timeout":
            result.timed_out += 1
        elif status == "error":
            result.problems.append(Problem("local", where, str(value)))
        elif isinstance(value, list):
            result.tls += 1
            answered.append((address, port, sni))
            try:
                finding, _ = parse.make_finding(
                    value,
                    source="network",
                    host="local",
                    location=where,
                    sni=sni,
                    fmt="tls",
                    seen_at=seen_at,
                )
            except Exception as exc:  # hostile content must not end the scan
                reason = f"unparsable certificate: {type(exc).__name__}"
                result.problems.append(Problem("local", where, reason))
                return
            result.findings.append(finding)

    async def run(jobs: Iterator[tuple[str, int, str | None]], count: int) -> None:
        async def worker() -> None:
            for address, port, sni in jobs:  # next() never awaits: safe to share
                await one(address, port, sni)

        await asyncio.gather(*(worker() for _ in range(max(1, min(opts.concurrency, count)))))

    def first() -> Iterator[tuple[str, int, str | None]]:
        for addr in addresses:
            a = str(addr)
            names = names_for(a)
            for port in opts.ports:
                yield a, port, names[0] if names else None

    await run(first(), len(addresses) * len(opts.ports))
    again = [
        (address, port, name)
        for address, port, sent in list(answered)
        for name in names_for(address)
        if name != sent
    ]
    await run(iter(again), len(again))
    result.findings.sort(key=lambda f: (f.location, f.sni or ""))
    result.problems.sort(key=lambda p: p.location)
    return result


def scan(addresses: Sequence[IPAddress], opts: Options, seen_at: datetime) -> NetResult:
    return asyncio.run(scan_async(addresses, opts, seen_at))


def known_names(inv: Any, expectations: Sequence[Any]) -> dict[str, tuple[str, ...]]:
    """address -> SNI names the inventory knows for it: the SNI of each declared
    endpoint whose host is an IP address, and the common names of certificates placed
    on an inventory host whose address is an IP address."""
    names: dict[str, list[str]] = {}

    def add(address: str, name: str | None) -> None:
        if not name:
            return
        try:
            key = str(ipaddress.ip_address(address.strip("[]")))
        except ValueError:
            return
        bucket = names.setdefault(key, [])
        if name not in bucket:
            bucket.append(name)

    for e in expectations:
        add(e.target.host, e.target.sni)
    for cname in sorted(inv.certificates):
        cert = inv.certificates[cname]
        for p in cert.placements:
            host = inv.hosts.get(p.host) if p.host else None
            if host is not None and host.address:
                add(host.address, cert.common_name)
    return {k: tuple(v) for k, v in names.items()}

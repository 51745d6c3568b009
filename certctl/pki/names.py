"""Name classification for subjectAltName entries.

A certificate's names are written in the inventory as plain strings; here each is
classified as an IP address, an email address, a URI or a DNS name, and turned into
the matching :mod:`cryptography` GeneralName.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from cryptography import x509

from certctl.pki.errors import PKIError

DNS = "dns"
IP = "ip"
EMAIL = "email"
URI = "uri"


def classify_name(name: str) -> str:
    """``ip`` (v4/v6 literal), ``email`` (has ``@``), ``uri`` (has ``://``), else ``dns``."""
    if "://" in name:
        return URI
    if "@" in name:
        return EMAIL
    if name[:1].isdigit() or ":" in name:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            pass
        else:
            return IP
    return DNS


def general_name(name: str) -> x509.GeneralName:
    """The GeneralName for ``name`` according to :func:`classify_name`."""
    if not name or "\x00" in name or any(c in name for c in "\r\n"):
        raise PKIError(f"invalid name {name!r}")
    kind = classify_name(name)
    try:
        if kind == IP:
            return x509.IPAddress(ipaddress.ip_address(name))
        if kind == EMAIL:
            return x509.RFC822Name(name)
        if kind == URI:
            return x509.UniformResourceIdentifier(name)
        return x509.DNSName(_a_label(name))
    except ValueError as exc:
        raise PKIError(f"invalid {kind} name {name!r}: {exc}") from exc


def general_names(names: Iterable[str]) -> list[x509.GeneralName]:
    """GeneralNames for ``names``, duplicates dropped, order kept."""
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for n in names:
        if n not in seen:
            seen.add(n)
            out.append(general_name(n))
    return out


def _a_label(name: str) -> str:
    if name.isascii():
        return name
    try:
        prefix = ""
        if name.startswith("*."):
            prefix, name = "*.", name[2:]
        return prefix + name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise PKIError(f"invalid DNS name {name!r}: {exc}") from exc


def name_value(gn: x509.GeneralName) -> str:
    """A GeneralName back to the plain string the inventory would use."""
    if isinstance(gn, x509.IPAddress):
        return str(gn.value)
    if isinstance(gn, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
        return str(gn.value)
    return str(gn)

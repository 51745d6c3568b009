"""Syntax of the names a certificate may carry (common name and SANs).

A name is one of:

* a DNS name: labels of letters, digits and ``-`` (not at either end), 1-63
  characters each, 253 in all, the last label not all digits; optionally a leading
  ``*.`` wildcard label followed by at least two labels (``*.example.com``, never
  ``*.com`` or ``a*.example.com``);
* an IPv4 or IPv6 address (no zone index);
* an e-mail address ``local@dns-name``, only for profiles with the
  ``emailProtection`` EKU.

Anything else -- spaces, shell metacharacters, underscores, trailing dots -- is an
"invalid name". Checking happens after templates are rendered, so it sees the name
that would go into the certificate.
"""

from __future__ import annotations

import ipaddress
import re

from certctl.inventory.yamlload import quote

MAX_NAME = 253
MAX_LABEL = 63
#: X.509 upper bound for a commonName attribute (RFC 5280 ub-common-name).
MAX_COMMON_NAME = 64

_DNS = re.compile(
    r"(?:\*\.)?(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
_LABEL_CHARS = re.compile(r"[A-Za-z0-9-]+")
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}")


def name_problem(
    name: str, *, allow_email: bool = False, allow_wildcard: bool = True
) -> str | None:
    """Why ``name`` cannot go into a certificate, or ``None`` when it can."""
    if not name:
        return "invalid name '' (empty)"
    if len(name) > MAX_NAME:
        return f"name is too long ({len(name)} characters, at most {MAX_NAME})"
    if _DNS.fullmatch(name) is not None:
        labels = name.split(".")
        if labels[0] == "*":
            if not allow_wildcard:
                return f"invalid name {quote(name)} (a wildcard is not allowed here)"
            if len(labels) < 3:
                return (
                    f"invalid wildcard {quote(name)} (a wildcard needs at least two labels "
                    "after '*.', as in *.example.com)"
                )
        if labels[-1].isdigit():
            return _ip_problem(name)
        return None
    if ":" in name or name.replace(".", "").isdigit():
        return _ip_problem(name)
    if "@" in name:
        return _email_problem(name, allow_email)
    return _dns_problem(name, allow_wildcard)


def _ip_problem(name: str) -> str | None:
    if "%" in name:
        return f"invalid name {quote(name)} (an IP address with a zone index)"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return f"invalid name {quote(name)} (neither an IP address nor a DNS name)"
    return None


def _email_problem(name: str, allow_email: bool) -> str | None:
    local, _, domain = name.rpartition("@")
    if (
        _LOCAL_PART.fullmatch(local) is None
        or _DNS.fullmatch(domain) is None
        or domain.startswith("*")
        or domain.split(".")[-1].isdigit()
    ):
        return f"invalid name {quote(name)}"
    if not allow_email:
        return (
            f"invalid name {quote(name)} (e-mail addresses need a profile with the "
            "emailProtection EKU)"
        )
    return None


def _dns_problem(name: str, allow_wildcard: bool) -> str:
    """Explain why a name that looks like a DNS name is not one."""
    labels = name.split(".")
    if "*" in name:
        if not allow_wildcard:
            return f"invalid name {quote(name)} (a wildcard is not allowed here)"
        if labels[0] != "*" or "*" in ".".join(labels[1:]):
            return (
                f"invalid wildcard {quote(name)} (only a whole leftmost '*' label is "
                "allowed, as in *.example.com)"
            )
        labels = labels[1:]
        if not labels:
            return f"invalid wildcard {quote(name)} (as in *.example.com)"
    for label in labels:
        if label and _LABEL_CHARS.fullmatch(label) is None:
            return f"invalid name {quote(name)}"
    for label in labels:
        if not label:
            return f"invalid name {quote(name)} (empty label)"
        if len(label) > MAX_LABEL:
            return (
                f"invalid name {quote(name)} (label {quote(label, 20)} is longer than "
                f"{MAX_LABEL} characters)"
            )
        if label.startswith("-") or label.endswith("-"):
            return f"invalid name {quote(name)} (a label cannot start or end with '-')"
    return f"invalid name {quote(name)}"  # pragma: no cover - the regex covers the rest

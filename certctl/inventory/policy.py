"""Profile and policy rules, checked against every certificate.

A certificate's **profile** constrains the certificates that use it: ``allowed_keys``,
``allowed_issuers``, ``max_ttl`` and ``san_patterns`` (regular expressions, each
name must match one). **Policies** are organisation-wide and apply to *all*
certificates: ``allowed_keys``, ``allowed_issuers``, ``max_ttl``, ``san_allow``
(exact names, or ``*.suffix`` for any name at any depth below ``suffix``) and
``san_regex``. Within a policy every rule that is set must hold.

Regular expressions must match the *whole* name (``re.fullmatch``), so an allow
pattern ``example\\.com`` does not also allow ``example.com.evil.net``. Names compare
case-insensitively, as DNS does.

Rules are compiled once per load (:class:`Rules`); :meth:`Rules.check` returns
``(field, message)`` pairs and the loader turns the field into a file location.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from certctl.inventory.values import format_duration, key_allowed
from certctl.inventory.yamlload import quote
from certctl.model import KeySpec, Policy, Profile

#: Where a problem is: "key", "issuer", "ttl", or where the name was written (the
#: loader's own marker, passed through).
Field = Any


@dataclass(frozen=True)
class Subject:
    """What the rules look at in a certificate."""

    key: KeySpec
    issuer: str
    ttl_s: int
    names: Sequence[tuple[Field, str]]  # (where, name): common name first, then the SANs


@dataclass
class Rules:
    """The compiled rules of one profile or policy."""

    label: str  # "profile 'tls'" / "policy 'baseline'"
    allowed_keys: tuple[str, ...] = ()
    allowed_issuers: tuple[str, ...] = ()
    max_ttl_s: int | None = None
    patterns: list[re.Pattern[str]] = field(default_factory=list)
    pattern_rule: str = ""  # "san_patterns" / "san_regex"
    exact: frozenset[str] | None = None  # san_allow exact names (lower case)
    suffixes: tuple[str, ...] = ()  # san_allow "*.x" entries as ".x"
    allow_listing: str = ""

    @classmethod
    def for_profile(cls, profile: Profile) -> Rules:
        return cls(
            label=f"profile {quote(profile.name)}",
            allowed_keys=profile.allowed_keys,
            allowed_issuers=profile.allowed_issuers,
            max_ttl_s=profile.max_ttl_s,
            patterns=[re.compile(p, re.IGNORECASE) for p in profile.san_patterns],
            pattern_rule="san_patterns",
        )

    @classmethod
    def for_policy(cls, policy: Policy) -> Rules:
        rules = cls(
            label=f"policy {quote(policy.name)}",
            allowed_keys=policy.allowed_keys,
            allowed_issuers=policy.allowed_issuers,
            max_ttl_s=policy.max_ttl_s,
            patterns=[re.compile(p, re.IGNORECASE) for p in policy.san_regex],
            pattern_rule="san_regex",
        )
        if policy.san_allow:
            rules.exact = frozenset(a.lower() for a in policy.san_allow if not a.startswith("*."))
            rules.suffixes = tuple(a[1:].lower() for a in policy.san_allow if a.startswith("*."))
            rules.allow_listing = _listing(policy.san_allow)
        return rules

    def check(self, subject: Subject) -> list[tuple[Field, str]]:
        out: list[tuple[Field, str]] = []
        if not key_allowed(subject.key, self.allowed_keys):
            out.append(
                (
                    "key",
                    f"key {subject.key.id} is not allowed by {self.label} "
                    f"(allowed_keys: {_listing(self.allowed_keys)})",
                )
            )
        if self.allowed_issuers and subject.issuer not in self.allowed_issuers:
            out.append(
                (
                    "issuer",
                    f"issuer {quote(subject.issuer)} is not allowed by {self.label} "
                    f"(allowed_issuers: {_listing(self.allowed_issuers)})",
                )
            )
        if self.max_ttl_s is not None and subject.ttl_s > self.max_ttl_s:
            out.append(
                (
                    "ttl",
                    f"ttl {format_duration(subject.ttl_s)} is longer than {self.label} allows "
                    f"(max_ttl {format_duration(self.max_ttl_s)})",
                )
            )
        if self.exact is not None or self.patterns:
            for where, name in subject.names:
                message = self._name_problem(name)
                if message:
                    out.append((where, message))
        return out

    def _name_problem(self, name: str) -> str | None:
        lower = name.lower()
        if (
            self.exact is not None
            and lower not in self.exact
            and not any(lower.endswith(s) and len(lower) > len(s) for s in self.suffixes)
        ):
            return (
                f"name {quote(name)} is not allowed by {self.label} "
                f"(san_allow: {self.allow_listing})"
            )
        if self.patterns and not any(p.fullmatch(name) for p in self.patterns):
            return f"name {quote(name)} does not match any {self.pattern_rule} of {self.label}"
        return None


def _listing(items: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")

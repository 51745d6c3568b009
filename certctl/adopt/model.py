"""What an import or adoption proposes, before anything is written.

A source (a certbot directory, an acme.sh home, discovery findings) is turned into
:class:`Candidate` certificates plus :class:`IssuerDraft` / :class:`TargetDraft`
definitions; :mod:`certctl.adopt.seed` then writes them as inventory YAML, validates
the whole inventory with them, and seeds the state. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509

from certctl import pki
from certctl.errors import CertctlError
from certctl.model import SecretBytes
from certctl.plan.planner import OBSERVED_CUSTODY

#: ``VersionRecord.key_custody`` of an adopted version whose private key certctl does
#: not hold: "observe only" until its next renewal (see certctl.plan.planner).
OBSERVED = OBSERVED_CUSTODY


class AdoptError(CertctlError):
    """An import or adoption cannot go ahead; nothing was changed."""


@dataclass(frozen=True)
class IssuerDraft:
    """An issuer definition to emit (``new``) or one the inventory already has."""

    name: str
    config: dict[str, Any]
    comment: str
    new: bool = True


@dataclass
class TargetDraft:
    name: str
    config: dict[str, Any]
    comment: str
    has_key: bool = True  # its files include the key certctl read (findings)


@dataclass(frozen=True)
class Takeover:
    """A symlink (certbot's ``live/NAME/x.pem``) replaced by a regular file with the
    same bytes and mode, so that the ``file`` target, which never writes through a
    symlink, can manage it. ``link`` is the symlink's own text (for undo)."""

    path: str
    link: str
    data: SecretBytes = field(repr=False)
    mode: int


@dataclass
class Candidate:
    """One certificate to adopt."""

    name: str
    source: str  # where it came from, for the YAML comment and the audit event
    leaf: x509.Certificate
    cert_pem: bytes  # the leaf as found (byte-exact: fullchain = cert + chain)
    chain_pem: bytes
    key_pem: SecretBytes | None  # None: observe only until its next renewal
    key: dict[str, Any]  # the inventory `key:` mapping
    issuer: IssuerDraft
    targets: list[TargetDraft] = field(default_factory=list)
    renew_before: str | None = None
    endpoint: dict[str, Any] | None = None  # network findings: an `endpoints:` entry
    takeovers: list[Takeover] = field(default_factory=list)
    disable: list[str] = field(default_factory=list)  # files renamed to *.certctl-imported
    notes: list[str] = field(default_factory=list)  # warnings, repeated in the YAML

    @property
    def fingerprint(self) -> str:
        return pki.fingerprint(self.leaf)

    @property
    def names(self) -> list[str]:
        """Common name (when it is one of the SANs, else the first SAN) first."""
        return names_of(self.leaf)

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc


def names_of(leaf: x509.Certificate) -> list[str]:
    sans = pki.sans(leaf)
    cn = [
        a.value
        for a in leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
        if isinstance(a.value, str)
    ]
    out: dict[str, None] = {}
    if cn and (not sans or cn[0] in sans):
        out[cn[0]] = None
    for s in sans:
        out.setdefault(s, None)
    return list(out)


def check_names(leaf: x509.Certificate) -> list[str]:
    """The certificate's names, if every one is a name the inventory accepts."""
    from certctl.inventory.names import name_problem

    names = names_of(leaf)
    if not names:
        raise AdoptError("the certificate names nothing (no subject alternative name)")
    for n in names:
        problem = name_problem(n, allow_email=True)
        if problem:
            raise AdoptError(f"the certificate's {problem}")
    return names


def is_ca(leaf: x509.Certificate) -> bool:
    bc = pki.basic_constraints(leaf)
    return bc is not None and bc.ca


def key_mapping(public_key: object, *, reuse: bool = False) -> dict[str, Any]:
    """The inventory ``key:`` for a certificate's public key; AdoptError when certctl
    cannot issue that kind of key (it would have to change it at once)."""
    try:
        kid = pki.key_spec_id(public_key)
    except pki.PKIError as exc:
        raise AdoptError(
            f"{exc}: certctl issues ECDSA P-256/P-384, RSA 2048-4096 and Ed25519"
        ) from None
    out: dict[str, Any]
    if kid.startswith("ecdsa-p"):
        out = {"type": "ecdsa", "curve": "P-" + kid[len("ecdsa-p") :]}
    elif kid.startswith("rsa-"):
        size = int(kid[4:])
        if size not in (2048, 3072, 4096):
            raise AdoptError(f"an RSA key of {size} bits: certctl issues RSA 2048, 3072 or 4096")
        out = {"type": "rsa", "size": size}
    else:
        out = {"type": kid}
    if reuse:
        out["rotation"] = "never"
    return out


def key_id(mapping: dict[str, Any]) -> str:
    t = mapping["type"]
    if t == "ecdsa":
        return "ecdsa-p" + str(mapping["curve"])[2:]
    if t == "rsa":
        return f"rsa-{mapping['size']}"
    return str(t)


def safe_name(text: str) -> str:
    """An inventory name (letters, digits, ``._-``, starting with a letter or digit)."""
    out = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in text)
    out = out.lstrip("._-") or "adopted"
    return out[:120]

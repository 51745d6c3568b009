"""The finding: one certificate discovery saw, in a file or served by a TLS endpoint.

This module is the contract between discovery (which records findings) and adoption
(which reads them): fields may be added with defaults, never renamed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Finding:
    """A certificate found by ``certctl discover``.

    ``chain_pem`` holds certificates only (the leaf first, then the chain as found);
    a private key is never part of a finding, only the path of the one matching it.
    """

    source: str  # "file" | "network"
    host: str  # inventory host name, or "local" for the controller
    # file: absolute path (for PKCS#12/JKS also a "#alias" suffix when the store holds
    # several); network: "ADDRESS:PORT" (IPv6 "[..]:PORT")
    location: str
    sni: str | None  # network: the SNI sent, else None
    format: str  # "pem" | "der" | "pkcs12" | "jks" | "tls"
    fingerprint: str  # sha256 hex (lowercase, no colons) of the leaf DER
    subject: str  # RFC 4514 string
    sans: tuple[str, ...]  # "DNS:x", "IP:1.2.3.4", "email:..", "URI:.." in certificate order
    issuer: str  # RFC 4514 string
    serial: str  # hex, lowercase, no leading zeros
    not_before: datetime  # aware UTC
    not_after: datetime  # aware UTC
    key_algorithm: str  # "rsa" | "ec" | "ed25519" | "ed448" | "dsa" | "other"
    key_size: int  # bits (curve size for EC)
    self_signed: bool
    # file findings: path of the matching private key beside it (matched by public key,
    # not by name), else None
    key_path: str | None
    chain_pem: str  # leaf then chain as found (PEM, certificates only, never a key)
    seen_at: datetime
    signature_algorithm: str = field(default="")  # e.g. "sha256WithRSAEncryption"
    # PKCS#12/JKS: the store holds this certificate's private key itself (key_path
    # stays None: the key is inside the store, behind its password)
    key_in_store: bool = field(default=False)


SOURCES = ("file", "network")
FORMATS = ("pem", "der", "pkcs12", "jks", "tls")
KEY_ALGORITHMS = ("rsa", "ec", "ed25519", "ed448", "dsa", "other")


@dataclass(frozen=True)
class Problem:
    """A file or endpoint discovery could not read; reported, never fatal."""

    host: str
    location: str
    reason: str  # e.g. "too large (1073741824 bytes > 1048576)", "symlink loop"

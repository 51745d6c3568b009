"""Certificate revocation lists (RFC 5280 section 5) over :mod:`cryptography`.

Pure: the caller hands in the CA, the entries, the CRL number and the clock's times.
The output is DER. ``unspecified`` revocations carry no reasonCode extension, as
RFC 5280 5.3.1 asks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certctl.pki.errors import PKIError
from certctl.pki.keys import PrivateKey, signing_hash

#: RFC 5280 reason names -> cryptography's ReasonFlags.
REASONS = MappingProxyType(
    {
        "unspecified": x509.ReasonFlags.unspecified,
        "keyCompromise": x509.ReasonFlags.key_compromise,
        "cACompromise": x509.ReasonFlags.ca_compromise,
        "affiliationChanged": x509.ReasonFlags.affiliation_changed,
        "superseded": x509.ReasonFlags.superseded,
        "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
        "certificateHold": x509.ReasonFlags.certificate_hold,
        "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
        "aACompromise": x509.ReasonFlags.aa_compromise,
    }
)


@dataclass(frozen=True)
class RevokedEntry:
    """One revoked certificate: serial (int), when, and the RFC 5280 reason name."""

    serial: int
    revoked_at: datetime
    reason: str


def reason_flag(reason: str) -> x509.ReasonFlags:
    try:
        return REASONS[reason]
    except KeyError:
        raise PKIError(f"unknown revocation reason {reason!r}") from None


def authority_key_identifier(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_crl(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    entries: Iterable[RevokedEntry],
    *,
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> bytes:
    """A DER CRL signed by ``ca_key`` listing ``entries``."""
    if next_update <= this_update:
        raise PKIError("a CRL's nextUpdate must come after its thisUpdate")
    revoked: list[x509.RevokedCertificate] = []
    for e in entries:
        b = x509.RevokedCertificateBuilder(
            serial_number=e.serial,
            revocation_date=e.revoked_at.astimezone(UTC).replace(microsecond=0),
        )
        if e.reason != "unspecified":
            b = b.add_extension(x509.CRLReason(reason_flag(e.reason)), False)
        revoked.append(b.build())
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=ca_cert.subject,
        last_update=this_update.astimezone(UTC).replace(microsecond=0),
        next_update=next_update.astimezone(UTC).replace(microsecond=0),
        revoked_certificates=revoked,
        extensions=[
            x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(number)),
            x509.Extension(
                x509.AuthorityKeyIdentifier.oid, False, authority_key_identifier(ca_cert)
            ),
        ],
    )
    try:
        crl = builder.sign(ca_key, signing_hash(ca_key))
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot sign the CRL: {exc}") from None
    return crl.public_bytes(serialization.Encoding.DER)


def crl_number(der: bytes) -> int:
    """The CRL number of a DER CRL (for checks and tests)."""
    crl = x509.load_der_x509_crl(der)
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)

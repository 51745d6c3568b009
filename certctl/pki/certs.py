"""Certificates, chains, CSRs and serials over :mod:`cryptography`.

Pure functions: no I/O, no clock. Library exceptions are translated into
:class:`certctl.pki.errors.PKIError`.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from certctl.pki import keys, names
from certctl.pki.errors import PKIError

#: Inventory EKU names -> OIDs. Dotted OIDs are accepted as well.
EKU_OIDS: Mapping[str, x509.ObjectIdentifier] = MappingProxyType(
    {
        "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
        "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
        "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
        "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
        "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
        "ocspSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
        "anyExtendedKeyUsage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    }
)
_EKU_NAMES: Mapping[str, str] = MappingProxyType(
    {oid.dotted_string: name for name, oid in EKU_OIDS.items()}
)
_OID_RE = re.compile(r"^[0-2](\.[0-9]+)+$")

#: The longest common name X.509 allows (ub-common-name).
MAX_CN = 64


# --------------------------------------------------------------------- serials


def random_serial() -> int:
    """A random positive 128-bit serial number (at least 64 bits of entropy, RFC 5280)."""
    while True:
        n = secrets.randbits(128)
        if n:
            return n


def serial_hex(serial: int) -> str:
    """Lower-case hex without leading zeros (the form stored in state)."""
    return format(serial, "x")


def random_serial_hex() -> str:
    return serial_hex(random_serial())


def parse_serial(text: object) -> int:
    """A positive serial from its hex form (optionally ``:``-separated)."""
    if not isinstance(text, str):
        raise PKIError(f"serial must be a hex string, got {type(text).__name__}")
    clean = text.replace(":", "").strip().lower()
    if not clean or len(clean) > 40 or any(c not in "0123456789abcdef" for c in clean):
        raise PKIError(f"invalid serial {text!r}: expected up to 20 bytes of hex")
    value = int(clean, 16)
    if value <= 0:
        raise PKIError(f"invalid serial {text!r}: must be positive")
    return value


# ------------------------------------------------------------- certificates


def fingerprint(cert: x509.Certificate) -> str:
    """sha256 hex of the DER encoding."""
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert_pem(data: bytes) -> x509.Certificate:
    """The first certificate in ``data`` (other PEM blocks, e.g. a key, are skipped)."""
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise PKIError("not a PEM certificate") from exc


def parse_pem_chain(data: bytes) -> list[x509.Certificate]:
    """Every certificate in ``data``, in order; ``[]`` for empty input.

    Non-certificate PEM blocks (a private key in a combined file) are skipped.
    """
    if not data.strip():
        return []
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise PKIError("no PEM certificate found") from exc


def chain_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def is_self_signed(cert: x509.Certificate) -> bool:
    """Subject == issuer and the signature verifies with the certificate's own key."""
    return cert.subject == cert.issuer and signed_by(cert, cert)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``cert``'s signature verifies with ``issuer``'s public key."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def eku_oid(name: str) -> x509.ObjectIdentifier:
    """OID for an EKU name (``serverAuth``...) or a dotted OID string."""
    oid = EKU_OIDS.get(name)
    if oid is not None:
        return oid
    if _OID_RE.match(name):
        return x509.ObjectIdentifier(name)
    raise PKIError(f"unknown extended key usage {name!r} (known: {', '.join(EKU_OIDS)})")


def eku_name(oid: x509.ObjectIdentifier) -> str:
    return _EKU_NAMES.get(oid.dotted_string, oid.dotted_string)


def _ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> Any:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    value = _ext(cert, x509.BasicConstraints)
    return value if isinstance(value, x509.BasicConstraints) else None


def key_usage(cert: x509.Certificate) -> x509.KeyUsage | None:
    value = _ext(cert, x509.KeyUsage)
    return value if isinstance(value, x509.KeyUsage) else None


def sans(cert: x509.Certificate) -> list[str]:
    """Subject alternative names as plain strings (DNS, IP, email, URI), in order."""
    value = _ext(cert, x509.SubjectAlternativeName)
    if not isinstance(value, x509.SubjectAlternativeName):
        return []
    return [names.name_value(gn) for gn in value]


def _key_usage_names(ku: x509.KeyUsage) -> list[str]:
    out = []
    for attr in (
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ):
        if getattr(ku, attr):
            out.append(attr)
    if ku.key_agreement:
        if ku.encipher_only:
            out.append("encipher_only")
        if ku.decipher_only:
            out.append("decipher_only")
    return out


def _urls(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    crl: list[str] = []
    ocsp: list[str] = []
    dps = _ext(cert, x509.CRLDistributionPoints)
    if isinstance(dps, x509.CRLDistributionPoints):
        for dp in dps:
            for gn in dp.full_name or ():
                if isinstance(gn, x509.UniformResourceIdentifier):
                    crl.append(gn.value)
    aia = _ext(cert, x509.AuthorityInformationAccess)
    if isinstance(aia, x509.AuthorityInformationAccess):
        for ad in aia:
            if ad.access_method == AuthorityInformationAccessOID.OCSP and isinstance(
                ad.access_location, x509.UniformResourceIdentifier
            ):
                ocsp.append(ad.access_location.value)
    return crl, ocsp


def describe(cert: x509.Certificate) -> dict[str, Any]:
    """Non-secret facts about ``cert``, JSON-able (ISO times, hex serial)."""
    bc = basic_constraints(cert)
    ku = key_usage(cert)
    eku = _ext(cert, x509.ExtendedKeyUsage)
    crl, ocsp = _urls(cert)
    try:
        key_type = keys.key_spec_id(cert.public_key())
    except PKIError:
        key_type = type(cert.public_key()).__name__
    sig = cert.signature_algorithm_oid
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": serial_hex(cert.serial_number),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sans": sans(cert),
        "key_type": key_type,
        "is_ca": bool(bc is not None and bc.ca),
        "key_usage": _key_usage_names(ku) if ku is not None else [],
        "ekus": [eku_name(o) for o in eku] if isinstance(eku, x509.ExtendedKeyUsage) else [],
        "signature_algorithm": getattr(sig, "_name", sig.dotted_string),
        "fingerprint_sha256": fingerprint(cert),
        "crl_urls": crl,
        "ocsp_urls": ocsp,
    }


# ---------------------------------------------------------------------- CSRs


def subject_attributes(
    common_name: str | None,
    *,
    organization: str | None = None,
    organizational_unit: str | None = None,
    country: str | None = None,
) -> list[x509.NameAttribute[str]]:
    """Subject attributes (C, O, OU, CN); the CN is left out when longer than X.509
    allows (the SAN carries the name then)."""
    attrs: list[x509.NameAttribute[str]] = []
    try:
        if country:
            attrs.append(x509.NameAttribute(NameOID.COUNTRY_NAME, country))
        if organization:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        if organizational_unit:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit))
        if common_name and len(common_name) <= MAX_CN:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    except ValueError as exc:
        raise PKIError(f"invalid subject: {exc}") from exc
    return attrs


def subject_name(
    common_name: str | None,
    *,
    organization: str | None = None,
    organizational_unit: str | None = None,
    country: str | None = None,
) -> x509.Name:
    """A subject Name from :func:`subject_attributes`."""
    return x509.Name(
        subject_attributes(
            common_name,
            organization=organization,
            organizational_unit=organizational_unit,
            country=country,
        )
    )


def build_csr(
    key: keys.PrivateKey,
    names_: Sequence[str],
    *,
    common_name: str | None = None,
    organization: str | None = None,
    country: str | None = None,
) -> x509.CertificateSigningRequest:
    """A CSR for ``names_`` (all go in the SAN; the CN is ``common_name`` or the first)."""
    if not names_ and not common_name:
        raise PKIError("a CSR needs at least one name")
    cn = common_name if common_name is not None else names_[0]
    all_names = [cn, *names_] if common_name is not None else list(names_)
    subject = subject_name(cn, organization=organization, country=country)
    builder = x509.CertificateSigningRequestBuilder(subject_name=subject).add_extension(
        x509.SubjectAlternativeName(names.general_names(all_names)),
        critical=len(subject) == 0,
    )
    try:
        return builder.sign(key, keys.signing_hash(key))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"cannot sign CSR: {exc}") from exc


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_public_key(
    pem: bytes, names_: Sequence[str], *, key_spec_id: str | None = None
) -> keys.PublicKey:
    """The public key of a CSR made elsewhere (a key generated on a target host), after
    checking it: one PEM CSR, a valid self-signature, exactly ``names_`` in its SAN (and
    a CN, when present, among them), and -- with ``key_spec_id`` -- the wanted key type."""
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise PKIError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PKIError("the CSR's signature does not verify")
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        got = {names.name_value(g).lower() for g in ext.value}
    except x509.ExtensionNotFound:
        got = set()
    want = {names.name_value(g).lower() for g in names.general_names(names_)}
    if got != want:
        raise PKIError(f"the CSR names {sorted(got)}, not the certificate's names {sorted(want)}")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if any(str(a.value).lower() not in want for a in cns):
        raise PKIError("the CSR's common name is not one of the certificate's names")
    try:
        pub = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PKIError(f"unsupported CSR key: {exc}") from exc
    if key_spec_id is not None and keys.key_spec_id(pub) != key_spec_id:
        raise PKIError(f"the CSR's key is {keys.key_spec_id(pub)}, not {key_spec_id}")
    return pub  # type: ignore[return-value]


def same_public_key(a: object, b: object) -> bool:
    """Whether two public keys are the same key (DER SubjectPublicKeyInfo)."""
    try:
        return keys.public_bytes(a) == keys.public_bytes(b)  # type: ignore[arg-type]
    except (AttributeError, TypeError, ValueError):
        return False

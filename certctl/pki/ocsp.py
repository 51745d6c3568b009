"""OCSP (RFC 6960) requests and responses over :mod:`cryptography`'s ``x509.ocsp``.

Pure: parsing, the responder certificate, and signing of responses. Which serials are
good, revoked or unknown is decided by the caller (the server), as is caching.

Responses are signed by a dedicated responder certificate issued by the CA (EKU
OCSPSigning, ``id-pkix-ocsp-nocheck``), never by the CA key itself, so the CA key is
needed only when the responder certificate is rotated.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certctl.pki.certs import random_serial
from certctl.pki.crl import authority_key_identifier, reason_flag
from certctl.pki.errors import PKIError
from certctl.pki.keys import PrivateKey, signing_hash

#: Largest OCSP request accepted (a real one is ~100 bytes; a few extensions at most).
MAX_REQUEST_BYTES = 8192

_HASHES = {
    "sha1": hashlib.sha1,
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}


class MalformedRequest(PKIError):
    """The bytes are not one well-formed OCSP request (answer ``malformedRequest``)."""


@dataclass(frozen=True)
class Request:
    """What the responder needs from a request."""

    serial: int
    hash_name: str  # sha1, sha256...
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    nonce: bytes | None


@dataclass(frozen=True)
class Signer:
    """The responder certificate and its key (the key never prints)."""

    cert: x509.Certificate
    key: PrivateKey

    def __repr__(self) -> str:
        return f"Signer(cert serial {self.cert.serial_number:x})"


def parse_request(der: bytes) -> Request:
    """Parse one DER OCSP request; :class:`MalformedRequest` for anything else."""
    if not der or len(der) > MAX_REQUEST_BYTES:
        raise MalformedRequest("empty or oversized OCSP request")
    try:
        req = ocsp.load_der_ocsp_request(der)
        alg = req.hash_algorithm
        serial = req.serial_number
        name_hash = req.issuer_name_hash
        key_hash = req.issuer_key_hash
        nonce: bytes | None = None
        for ext in req.extensions:
            if isinstance(ext.value, x509.OCSPNonce):
                nonce = ext.value.nonce
    except Exception as exc:  # cryptography raises ValueError and friends on junk
        raise MalformedRequest(f"not an OCSP request ({type(exc).__name__})") from None
    if alg.name not in _HASHES or serial < 0:
        raise MalformedRequest("unsupported hash algorithm or negative serial")
    return Request(serial, alg.name, name_hash, key_hash, nonce)


def _spki_key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents (what issuerKeyHash hashes)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def header(buf: bytes, pos: int) -> tuple[int, int]:  # -> (content start, length)
        first = buf[pos + 1]
        if first < 0x80:
            return pos + 2, first
        n = first & 0x7F
        return pos + 2 + n, int.from_bytes(buf[pos + 2 : pos + 2 + n], "big")

    start, _ = header(spki, 0)  # outer SEQUENCE
    alg_start, alg_len = header(spki, start)  # AlgorithmIdentifier
    bits_start, bits_len = header(spki, alg_start + alg_len)  # BIT STRING
    return spki[bits_start + 1 : bits_start + bits_len]  # drop the unused-bits byte


def issuer_hashes(ca: x509.Certificate, hash_name: str) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of ``ca`` under ``hash_name``."""
    h = _HASHES[hash_name]
    return h(ca.subject.public_bytes()).digest(), h(_spki_key_bits(ca)).digest()


def build_responder_cert(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    responder_key: PrivateKey,
    *,
    issuer_label: str,
    not_before: datetime,
    lifetime: timedelta,
) -> x509.Certificate:
    """A responder certificate: EKU OCSPSigning, id-pkix-ocsp-nocheck, CA:false."""
    pub = responder_key.public_key()
    not_after = min(not_before + lifetime, ca_cert.not_valid_after_utc)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{issuer_label} OCSP Responder"[:64])]
    )
    builder = x509.CertificateBuilder(
        issuer_name=ca_cert.subject,
        subject_name=subject,
        public_key=pub,
        serial_number=random_serial(),
        not_valid_before=not_before.astimezone(UTC).replace(microsecond=0),
        not_valid_after=not_after,
    )
    builder = (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), False)
        .add_extension(x509.OCSPNoCheck(), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), False)
        .add_extension(authority_key_identifier(ca_cert), False)
    )
    try:
        return builder.sign(ca_key, signing_hash(ca_key))
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot sign the OCSP responder certificate: {exc}") from None


def error_response(status: ocsp.OCSPResponseStatus) -> bytes:
    """An unsigned error response (malformedRequest, unauthorized, internalError...)."""
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER
    )


MALFORMED = error_response(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
UNAUTHORIZED = error_response(ocsp.OCSPResponseStatus.UNAUTHORIZED)
TRY_LATER = error_response(ocsp.OCSPResponseStatus.TRY_LATER)


def build_response(
    req: Request,
    signer: Signer,
    *,
    status: str,  # good | revoked | unknown
    this_update: datetime,
    next_update: datetime,
    revoked_at: datetime | None = None,
    reason: str | None = None,
) -> bytes:
    """A signed successful response for ``req`` (nonce echoed when it had one)."""
    cert_status = {
        "good": ocsp.OCSPCertStatus.GOOD,
        "revoked": ocsp.OCSPCertStatus.REVOKED,
        "unknown": ocsp.OCSPCertStatus.UNKNOWN,
    }[status]
    rev_time = None
    rev_reason = None
    if status == "revoked":
        assert revoked_at is not None
        rev_time = revoked_at.astimezone(UTC).replace(microsecond=0)
        if reason and reason != "unspecified":
            rev_reason = reason_flag(reason)
    algorithm = {
        "sha1": hashes.SHA1(),  # noqa: S303 - OCSP CertIDs use SHA-1 (RFC 6960)
        "sha224": hashes.SHA224(),
        "sha256": hashes.SHA256(),
        "sha384": hashes.SHA384(),
        "sha512": hashes.SHA512(),
    }[req.hash_name]
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response_by_hash(
            issuer_name_hash=req.issuer_name_hash,
            issuer_key_hash=req.issuer_key_hash,
            serial_number=req.serial,
            algorithm=algorithm,
            cert_status=cert_status,
            this_update=this_update.astimezone(UTC).replace(microsecond=0),
            next_update=next_update.astimezone(UTC).replace(microsecond=0),
            revocation_time=rev_time,
            revocation_reason=rev_reason,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
        .certificates([signer.cert])
    )
    if req.nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(req.nonce), False)
    try:
        resp = builder.sign(signer.key, signing_hash(signer.key))
    except (ValueError, TypeError) as exc:
        raise PKIError(f"cannot sign the OCSP response: {exc}") from None
    return resp.public_bytes(serialization.Encoding.DER)

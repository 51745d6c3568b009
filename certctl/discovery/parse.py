"""Recognise and read certificate files: PEM, DER, PKCS#12, JKS; build findings.

Content decides, not the file name: :func:`sniff` looks at the first bytes only, so
a walk skips non-candidates after one small read. :func:`parse` then reads what
the file holds:

* PEM: every ``CERTIFICATE`` block, and unencrypted private keys (for matching the
  certificates beside them; only the public half's digest is kept);
* DER: a certificate (a truncated one is reported), a private key, or a PKCS#12;
* PKCS#12: opened without a password, then with each password given; when none
  fits the file is reported "encrypted: wrong or missing password";
* JKS/JCEKS: see :mod:`certctl.discovery.jks` (certificates are in clear there).

Several certificates in one file are split into chains (a certificate followed by
its issuer stays in one chain; a bundle of unrelated roots gives one finding per
root, the location suffixed ``#N``, N the 1-based position of its leaf).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning

from certctl.discovery import jks
from certctl.discovery.model import Finding

HEAD = 4096  # bytes sniffed before deciding to read a file whole
#: A PKCS#12 declaring more key-derivation iterations than this is not opened: each
#: password tried would cost that many hash rounds (2**31 of them run for many
#: minutes), so a hostile file could stall the scan. Real stores use 2,048 to 600,000.
MAX_PKCS12_ITERATIONS = 1_000_000

_CERT_LABELS = {b"CERTIFICATE", b"X509 CERTIFICATE"}
_KEY_LABELS = {b"PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY", b"DSA PRIVATE KEY"}
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def sniff(head: bytes) -> str | None:
    """The kind of a file from its first bytes (at least :data:`HEAD` of them when
    the file is that long): "pem", "der" (certificate, key or PKCS#12), "jks", or
    None for a file that holds none of them."""
    if head[:4] in (jks.MAGIC_JKS, jks.MAGIC_JCEKS):
        return "jks"
    if b"-----BEGIN " in head:
        return "pem"
    if _der_kind(head) is not None:
        return "der"
    return None


def _der_header(data: bytes, pos: int) -> tuple[int, int, int] | None:
    """(tag, header length, content length) of the DER element at ``pos``."""
    if pos + 2 > len(data):
        return None
    tag, first = data[pos], data[pos + 1]
    if first < 0x80:
        return tag, 2, first
    n = first & 0x7F
    if n == 0 or n > 4 or pos + 2 + n > len(data):
        return None
    return tag, 2 + n, int.from_bytes(data[pos + 2 : pos + 2 + n], "big")


def _der_kind(data: bytes) -> str | None:
    """What ``data`` starts like in DER: "cert", "pkcs12", "key", or None."""
    outer = _der_header(data, 0)
    if outer is None or outer[0] != 0x30 or outer[2] < 16:
        return None
    pos = outer[1]
    inner = _der_header(data, pos)
    if inner is None:
        return None
    tag, hl, length = inner
    if tag == 0x30:  # tbsCertificate: [0] version or the serial INTEGER comes first
        first = data[pos + hl : pos + hl + 1]
        return "cert" if first in (b"\xa0", b"\x02") else None
    if tag == 0x02 and length == 1:
        value = data[pos + hl]
        after = data[pos + hl + 1 : pos + hl + 2]
        if value == 3 and after == b"\x30":
            return "pkcs12"
        if (value == 0 and after in (b"\x30", b"\x02")) or (value == 1 and after == b"\x04"):
            return "key"
    return None


@dataclass
class Parsed:
    """What one file holds: chains (each becomes a finding), the public-key digests of
    the unencrypted private keys in it, and the problem, if it could not be read."""

    chains: list[tuple[str | None, str, list[bytes], bool]] = field(default_factory=list)
    # (location suffix, format, DER certificates leaf first, key inside the store)
    key_ids: list[str] = field(default_factory=list)
    problem: str | None = None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Old and odd certificates (a zero or negative serial, ...) are what discovery
    meets; the library's deprecation warnings about them are not the user's business
    (the certificates are still reported, and classified)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        yield


def parse(data: bytes, passwords: Sequence[str] = ()) -> Parsed:
    """Read a whole (size-capped) file. Never raises for bad content: it becomes
    ``problem`` (a file that only looks like a candidate gives an empty result)."""
    with quiet():
        return _parse(data, passwords)


def _parse(data: bytes, passwords: Sequence[str]) -> Parsed:
    kind = sniff(data[:HEAD])
    if kind == "pem":
        return _parse_pem(data)
    if kind == "jks":
        return _parse_jks(data, passwords)
    if kind == "der":
        return _parse_der(data, passwords)
    return Parsed()


def pem_blocks(data: bytes) -> Iterator[tuple[bytes, bytes, bytes] | None]:
    """(label, body, whole block) of each PEM block, in order; None for a block with
    no END line (the scan stops there). Linear in the input: every search moves
    forward, so a hostile file of BEGIN lines costs one pass, not one per line."""
    pos = 0
    while (begin := data.find(b"-----BEGIN ", pos)) >= 0:
        label_end = data.find(b"-----", begin + 11, begin + 11 + 80)
        if label_end < 0:
            pos = begin + 11
            continue
        label = data[begin + 11 : label_end]
        end = data.find(b"-----END ", label_end + 5)
        if end < 0:
            yield None
            return
        close = data.find(b"-----", end + 9, end + 9 + 80)
        stop = close + 5 if close >= 0 else end + 9
        if data[end + 9 : close] == label:
            yield label, data[label_end + 5 : end], data[begin:stop]
        else:
            yield label, b"", b""  # mismatched END: malformed
        pos = stop


def _parse_pem(data: bytes) -> Parsed:
    out = Parsed()
    certs: list[bytes] = []
    bad = 0
    truncated = False
    for block in pem_blocks(data):
        if block is None:
            truncated = True
            break
        label, body, whole = block
        if label in _CERT_LABELS:
            try:
                der = base64.b64decode(b"".join(body.split()), validate=True)
                x509.load_der_x509_certificate(der)
            except (binascii.Error, ValueError):
                bad += 1
                continue
            certs.append(der)
        elif label in _KEY_LABELS and whole and b"ENCRYPTED" not in body[:200]:
            key_id = _key_id_pem(whole)
            if key_id is not None:
                out.key_ids.append(key_id)
    if truncated:
        out.problem = "truncated PEM: a block has no END line"
    elif bad:
        out.problem = f"{bad} malformed certificate block(s) in PEM"
    out.chains = [(None, "pem", chain, False) for chain in split_chains(certs)]
    _suffix(out, certs)
    return out


def _key_id_pem(block: bytes) -> str | None:
    try:
        key = serialization.load_pem_private_key(block, None, unsafe_skip_rsa_key_validation=True)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    return hashlib.sha256(key.public_key().public_bytes(*_SPKI)).hexdigest()


def _parse_der(data: bytes, passwords: Sequence[str]) -> Parsed:
    kind = _der_kind(data)
    outer = _der_header(data, 0)
    declared = (outer[1] + outer[2]) if outer is not None else 0
    if kind == "cert":
        if declared > len(data):
            return Parsed(problem=f"truncated DER certificate ({len(data)} of {declared} bytes)")
        try:
            x509.load_der_x509_certificate(data[:declared])
        except ValueError as exc:
            return Parsed(problem=f"malformed DER certificate: {_short(exc)}")
        return Parsed(chains=[(None, "der", [data[:declared]], False)])
    if kind == "key":
        try:
            key = serialization.load_der_private_key(
                data[:declared], None, unsafe_skip_rsa_key_validation=True
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return Parsed()
        return Parsed(key_ids=[hashlib.sha256(key.public_key().public_bytes(*_SPKI)).hexdigest()])
    if kind == "pkcs12":
        if declared > len(data):
            return Parsed(problem=f"truncated PKCS#12 ({len(data)} of {declared} bytes)")
        return _parse_pkcs12(data, passwords)
    return Parsed()


def pkcs12_iterations(data: bytes) -> int:
    """The largest iteration count a PKCS#12 declares (its MAC's, and its bags'
    PBE/PBKDF2 parameters, wherever they are: every SEQUENCE holding an OCTET STRING
    (the salt) then an INTEGER is read as one). DER and BER (indefinite lengths,
    constructed OCTET STRINGs) are walked, OCTET STRINGs that hold DER too; the walk
    is bounded in depth and in elements, and gives up quietly on what it cannot read
    (the library then judges the file)."""
    best = 0
    budget = [50_000]

    def element(buf: bytes, pos: int, end: int) -> tuple[int, int, int, int] | None:
        """(tag, content start, content end, next position) of the element at pos."""
        budget[0] -= 1
        if budget[0] < 0 or pos + 2 > end:
            return None
        tag, first = buf[pos], buf[pos + 1]
        if tag & 0x1F == 0x1F:
            return None  # high tag numbers: none in PKCS#12
        if first == 0x80:  # BER indefinite length: children up to end-of-contents
            if not tag & 0x20:
                return None
            p = pos + 2
            while p + 2 <= end and buf[p : p + 2] != b"\0\0":
                child = element(buf, p, end)
                if child is None:
                    return None
                p = child[3]
            return (tag, pos + 2, p, p + 2) if p + 2 <= end else None
        n = first & 0x7F if first & 0x80 else 0
        if n > 4 or pos + 2 + n > end:
            return None
        length = int.from_bytes(buf[pos + 2 : pos + 2 + n], "big") if n else first
        start = pos + 2 + n
        return (tag, start, start + length, start + length) if start + length <= end else None

    def walk(buf: bytes, pos: int, end: int, depth: int) -> None:
        nonlocal best
        if depth > 24:
            return
        kinds: list[int] = []
        while pos < end:
            el = element(buf, pos, end)
            if el is None:
                return
            tag, start, stop, pos = el
            if tag == 0x02 and kinds and kinds[-1] == 0x04:
                best = max(best, int.from_bytes(buf[start:stop], "big", signed=True))
            kinds.append(tag)
            if tag == 0x24:  # BER constructed OCTET STRING: its pieces, joined
                pieces = bytearray()
                p = start
                while p < stop:
                    piece = element(buf, p, stop)
                    if piece is None or piece[0] != 0x04:
                        break
                    pieces += buf[piece[1] : piece[2]]
                    p = piece[3]
                if pieces[:1] == b"\x30":
                    walk(bytes(pieces), 0, len(pieces), depth + 1)
                kinds[-1] = 0x04
            elif tag & 0x20 or (tag == 0x04 and buf[start : start + 1] == b"\x30"):
                walk(buf, start, stop, depth + 1)  # constructed, or DER in an OCTET STRING

    walk(data, 0, len(data), 0)
    return best


def _parse_pkcs12(data: bytes, passwords: Sequence[str]) -> Parsed:
    iterations = pkcs12_iterations(data)
    if iterations > MAX_PKCS12_ITERATIONS:
        return Parsed(
            problem=f"PKCS#12 not opened: it declares {iterations} iterations of key "
            f"derivation (more than {MAX_PKCS12_ITERATIONS}: a file that would stall the scan)"
        )
    p12 = None
    for password in (None, b"", *(p.encode() for p in passwords)):
        try:
            p12 = pkcs12.load_pkcs12(data, password)
            break
        except (ValueError, TypeError):
            continue
        except UnsupportedAlgorithm as exc:
            return Parsed(problem=f"PKCS#12 uses an unsupported algorithm: {_short(exc)}")
    if p12 is None:
        return Parsed(problem="encrypted: wrong or missing password (PKCS#12)")
    der = serialization.Encoding.DER
    extra = [c.certificate.public_bytes(der) for c in p12.additional_certs]
    if p12.cert is not None:
        chain = [p12.cert.certificate.public_bytes(der), *extra]
        return Parsed(chains=[(None, "pkcs12", chain, p12.key is not None)])
    out = Parsed(chains=[(None, "pkcs12", c, False) for c in split_chains(extra)])
    _suffix(out, extra)
    return out


def _parse_jks(data: bytes, passwords: Sequence[str]) -> Parsed:
    try:
        store = jks.read(data, passwords)
    except jks.JKSFormatError as exc:
        return Parsed(problem=f"Java keystore: {exc}")
    out = Parsed()
    several = len(store.entries) > 1
    for e in store.entries:
        out.chains.append((f"#{e.alias}" if several else None, "jks", list(e.chain), e.private_key))
    if store.note:
        out.problem = store.note
    elif store.verified is False:
        out.problem = "keystore integrity not verified: no given password matches"
    return out


def _suffix(out: Parsed, certs: Sequence[bytes]) -> None:
    """Name each chain ``#N`` (its leaf's position) when a file holds several."""
    if len(out.chains) < 2:
        return
    index = {der: i + 1 for i, der in reversed(list(enumerate(certs)))}
    out.chains = [(f"#{index[c[0]]}", fmt, c, k) for (_, fmt, c, k) in out.chains]


def split_chains(ders: Sequence[bytes]) -> list[list[bytes]]:
    """Consecutive certificates where each one issued the one before form a chain;
    anything else starts a new one."""
    chains: list[list[bytes]] = []
    prev: x509.Certificate | None = None
    for der in ders:
        cert = x509.load_der_x509_certificate(der)
        chained = prev is not None and prev.issuer == cert.subject != prev.subject
        if chained and chains:
            chains[-1].append(der)
        else:
            chains.append([der])
        prev = cert
    return chains


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


# ------------------------------------------------------------------ findings


def pem_of(der: bytes) -> str:
    b64 = base64.b64encode(der).decode()
    lines = "\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return f"-----BEGIN CERTIFICATE-----\n{lines}\n-----END CERTIFICATE-----\n"


def key_info(cert: x509.Certificate) -> tuple[str, int, str | None]:
    """(algorithm, size in bits, SPKI sha256) of a certificate's public key."""
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "other", 0, None
    key_id = hashlib.sha256(pub.public_bytes(*_SPKI)).hexdigest()
    if isinstance(pub, rsa.RSAPublicKey):
        return "rsa", pub.key_size, key_id
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ec", pub.curve.key_size, key_id
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519", 256, key_id
    if isinstance(pub, ed448.Ed448PublicKey):
        return "ed448", 456, key_id
    if isinstance(pub, dsa.DSAPublicKey):
        return "dsa", pub.key_size, key_id
    return "other", 0, key_id


def is_self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except InvalidSignature:
        return False
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # same names, signature not checkable here (SHA-1 and older are refused by
        # the library): take the names' word
        return True
    return True


def sans_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    except ValueError:
        return ()  # a malformed extension: the names are unknown, not fatal
    out: list[str] = []
    for name in ext.value:
        if isinstance(name, x509.DNSName):
            out.append(f"DNS:{name.value}")
        elif isinstance(name, x509.IPAddress):
            out.append(f"IP:{name.value}")
        elif isinstance(name, x509.RFC822Name):
            out.append(f"email:{name.value}")
        elif isinstance(name, x509.UniformResourceIdentifier):
            out.append(f"URI:{name.value}")
    return tuple(out)


def _name(n: x509.Name) -> str:
    try:
        return n.rfc4514_string()
    except ValueError:
        return repr(n)


def make_finding(
    chain: Sequence[bytes],
    *,
    source: str,
    host: str,
    location: str,
    sni: str | None,
    fmt: str,
    seen_at: datetime,
    key_path: str | None = None,
    key_in_store: bool = False,
) -> tuple[Finding, str | None]:
    """The finding for a chain (leaf first, DER) and the leaf's public-key digest."""
    with quiet():
        return _make_finding(
            chain, source, host, location, sni, fmt, seen_at, key_path, key_in_store
        )


def _make_finding(
    chain: Sequence[bytes],
    source: str,
    host: str,
    location: str,
    sni: str | None,
    fmt: str,
    seen_at: datetime,
    key_path: str | None,
    key_in_store: bool,
) -> tuple[Finding, str | None]:
    leaf_der = chain[0]
    cert = x509.load_der_x509_certificate(leaf_der)
    algorithm, size, key_id = key_info(cert)
    try:
        sig = cert.signature_algorithm_oid._name
    except Exception:  # pragma: no cover - an OID cryptography cannot name
        sig = ""
    finding = Finding(
        source=source,
        host=host,
        location=location,
        sni=sni,
        format=fmt,
        fingerprint=hashlib.sha256(leaf_der).hexdigest(),
        subject=_name(cert.subject),
        sans=sans_of(cert),
        issuer=_name(cert.issuer),
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        key_algorithm=algorithm,
        key_size=size,
        self_signed=is_self_signed(cert),
        key_path=key_path,
        chain_pem="".join(pem_of(d) for d in chain),
        seen_at=seen_at,
        signature_algorithm=sig,
        key_in_store=key_in_store,
    )
    return finding, key_id

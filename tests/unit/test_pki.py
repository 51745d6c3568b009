"""certctl.pki: keys, PEM round trips, chains, CSRs, names, serials, describe."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from certctl import pki
from certctl.errors import PermanentError
from certctl.model import KeySpec, SecretBytes

SPECS = [
    (KeySpec("ecdsa", 256), "ecdsa-p256", ec.EllipticCurvePrivateKey),
    (KeySpec("ecdsa", 384), "ecdsa-p384", ec.EllipticCurvePrivateKey),
    (KeySpec("rsa", 2048), "rsa-2048", rsa.RSAPrivateKey),
    (KeySpec("ed25519", 256), "ed25519", ed25519.Ed25519PrivateKey),
]


@pytest.mark.parametrize(("spec", "ident", "cls"), SPECS, ids=[s[1] for s in SPECS])
def test_generate_serialise_load_round_trip(spec: KeySpec, ident: str, cls: type) -> None:
    key = pki.generate_key(spec)
    assert isinstance(key, cls)
    assert pki.key_spec_id(key) == ident == spec.id
    assert pki.key_spec_id(key.public_key()) == ident
    pem = pki.key_to_pem(key)
    assert isinstance(pem, SecretBytes)
    assert "PRIVATE KEY" not in repr(pem) and "PRIVATE KEY" not in f"{pem}"
    assert pem.reveal().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    again = pki.load_key_pem(pem.reveal())
    assert pki.keys_match(again, key.public_key())
    assert pki.key_to_pem(again) == pem
    assert pki.load_key_pem(pem) is not None  # SecretBytes accepted too


@pytest.mark.parametrize("size", [3072, 4096])
def test_large_rsa_sizes_are_supported(size: int) -> None:
    assert pki.key_spec_id(pki.generate_key(KeySpec("rsa", size))) == f"rsa-{size}"


@pytest.mark.parametrize(
    "spec", [KeySpec("ecdsa", 521), KeySpec("rsa", 1024), KeySpec("dsa", 2048)], ids=str
)
def test_unsupported_specs_are_refused(spec: KeySpec) -> None:
    with pytest.raises(pki.PKIError):
        pki.generate_key(spec)


def test_key_spec_parsing() -> None:
    assert pki.key_spec("ecdsa-p384") == KeySpec("ecdsa", 384)
    assert pki.key_spec("RSA-3072") == KeySpec("rsa", 3072)
    assert pki.key_spec("ed25519") == KeySpec("ed25519", 256)
    with pytest.raises(pki.PKIError):
        pki.key_spec("ecdsa-pfoo")


def test_load_key_errors_are_translated_and_do_not_echo_input() -> None:
    secretish = b"-----BEGIN PRIVATE KEY-----\nTOPSECRETMATERIAL\n-----END PRIVATE KEY-----\n"
    with pytest.raises(pki.PKIError) as err:
        pki.load_key_pem(secretish)
    assert isinstance(err.value, PermanentError)
    assert "TOPSECRET" not in str(err.value)
    # an unsupported key type (DSA) is refused clearly
    dsa_key = dsa.generate_private_key(2048)
    pem = dsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(pki.PKIError, match="unsupported"):
        pki.load_key_pem(pem)


def test_encrypted_key_needs_its_password() -> None:
    key = pki.generate_key(KeySpec())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    assert pki.keys_match(pki.load_key_pem(pem, b"pw"), key.public_key())
    with pytest.raises(pki.PKIError):
        pki.load_key_pem(pem)
    with pytest.raises(pki.PKIError):
        pki.load_key_pem(pem, b"wrong")


def test_signing_hash_follows_the_key() -> None:
    assert isinstance(pki.signing_hash(pki.generate_key(KeySpec("ecdsa", 256))), hashes.SHA256)
    assert isinstance(pki.signing_hash(pki.generate_key(KeySpec("ecdsa", 384))), hashes.SHA384)
    assert pki.signing_hash(pki.generate_key(KeySpec("ed25519"))) is None
    assert isinstance(pki.signing_hash(pki.generate_key(KeySpec("rsa", 2048))), hashes.SHA256)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("www.example.com", "dns"),
        ("*.example.com", "dns"),
        ("10.0.0.1", "ip"),
        ("2001:db8::1", "ip"),
        ("ops@example.com", "email"),
        ("spiffe://example.org/ns/web", "uri"),
        ("1example.com", "dns"),
        ("999.1.1.1", "dns"),
    ],
)
def test_classify_name(name: str, kind: str) -> None:
    assert pki.classify_name(name) == kind


def test_general_names() -> None:
    gns = pki.general_names(["a.test", "10.1.2.3", "a.test", "me@a.test", "bücher.test"])
    assert gns == [
        x509.DNSName("a.test"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.RFC822Name("me@a.test"),
        x509.DNSName("xn--bcher-kva.test"),
    ]
    with pytest.raises(pki.PKIError):
        pki.general_name("bad\nname")


def test_serials() -> None:
    seen = {pki.random_serial() for _ in range(200)}
    assert len(seen) == 200 and all(0 < s < 2**128 for s in seen)
    assert max(seen).bit_length() > 100  # really random-sized, not small counters
    text = pki.random_serial_hex()
    assert text == text.lower() and pki.serial_hex(pki.parse_serial(text)) == text
    assert pki.parse_serial("0A:0b") == 0x0A0B
    for bad in ("", "zz", "0", "-1", "1" * 41, 5):
        with pytest.raises(pki.PKIError):
            pki.parse_serial(bad)


def _self_signed(key: pki.PrivateKey, cn: str, *, ca: bool = True) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime(2030, 1, 1, tzinfo=UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(pki.random_serial())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("a.test"), x509.RFC822Name("x@a.test")]),
            critical=False,
        )
        .sign(key, pki.signing_hash(key))
    )


def test_pem_chain_round_trip_and_fingerprint() -> None:
    k1, k2 = pki.generate_key(KeySpec()), pki.generate_key(KeySpec("ed25519"))
    c1, c2 = _self_signed(k1, "one"), _self_signed(k2, "two")
    pem = pki.cert_pem(c1) + pki.cert_pem(c2)
    assert pki.parse_pem_chain(pem) == [c1, c2]
    assert pki.chain_pem([c1, c2]) == pem
    assert pki.parse_pem_chain(b"") == [] and pki.parse_pem_chain(b"\n") == []
    # a combined file: the key block is skipped
    combined = pki.cert_pem(c1) + pki.key_to_pem(k1).reveal()
    assert pki.parse_pem_chain(combined) == [c1]
    assert pki.load_cert_pem(combined) == c1
    fp = pki.fingerprint(c1)
    assert fp == c1.fingerprint(hashes.SHA256()).hex() and len(fp) == 64
    with pytest.raises(pki.PKIError):
        pki.parse_pem_chain(b"garbage")
    with pytest.raises(pki.PKIError):
        pki.load_cert_pem(b"garbage")
    assert pki.is_self_signed(c1) and pki.signed_by(c1, c1) and not pki.signed_by(c1, c2)


def test_build_csr() -> None:
    key = pki.generate_key(KeySpec("ecdsa", 384))
    csr = pki.build_csr(key, ["www.example.com", "10.0.0.1", "example.com"])
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.example.com"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.com", "example.com"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA384)
    assert b"CERTIFICATE REQUEST" in pki.csr_pem(csr)
    ed = pki.build_csr(pki.generate_key(KeySpec("ed25519")), ["a.test"], common_name="x" * 80)
    assert len(ed.subject) == 0  # CN too long for X.509: left to the SAN (then critical)
    assert ed.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    with pytest.raises(pki.PKIError):
        pki.build_csr(key, [])


def test_describe_has_facts_and_no_secrets() -> None:
    key = pki.generate_key(KeySpec())
    cert = _self_signed(key, "desc.test", ca=False)
    info = pki.describe(cert)
    assert info["subject"] == "CN=desc.test"
    assert info["serial"] == pki.serial_hex(cert.serial_number)
    assert info["sans"] == ["a.test", "x@a.test"]
    assert info["key_type"] == "ecdsa-p256"
    assert info["is_ca"] is False
    assert info["fingerprint_sha256"] == pki.fingerprint(cert)
    assert info["not_before"].startswith("2030-01-01T00:00:00")
    assert info["crl_urls"] == [] and info["ocsp_urls"] == [] and info["ekus"] == []
    assert "PRIVATE" not in repr(info)


def test_eku_names() -> None:
    assert pki.eku_name(pki.eku_oid("serverAuth")) == "serverAuth"
    assert pki.eku_oid("1.2.3.4").dotted_string == "1.2.3.4"
    with pytest.raises(pki.PKIError, match="unknown extended key usage"):
        pki.eku_oid("serverauth")

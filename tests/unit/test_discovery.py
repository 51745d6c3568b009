"""Discovery's pure parts: content sniffing and parsing of certificate files, the JKS
reader, address-range expansion with its refusals and cap, and the categories of
``certctl discovered``."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from certctl.discovery import jks, network, parse, report
from certctl.discovery.model import Finding
from tests.integration.discovery_support import CA, key_pem, make_cert, new_key, pem

NOW = datetime(2026, 6, 1, tzinfo=UTC)
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("Unit Root")


def _finding(chain: list[bytes]) -> Finding:
    f, _ = parse.make_finding(
        chain, source="file", host="local", location="/x", sni=None, fmt="pem", seen_at=NOW
    )
    return f


def test_pem_chain_is_one_finding_with_its_fields(ca: CA) -> None:
    leaf, key = ca.issue("www.unit.test")
    data = b"some text before\n" + pem(leaf) + pem(ca.cert) + key_pem(key)
    assert parse.sniff(data[: parse.HEAD]) == "pem"
    p = parse.parse(data)
    assert p.problem is None and len(p.chains) == 1
    suffix, fmt, chain, in_store = p.chains[0]
    assert suffix is None and fmt == "pem" and len(chain) == 2 and not in_store
    f, key_id = parse.make_finding(
        chain, source="file", host="local", location="/a", sni=None, fmt=fmt, seen_at=NOW
    )
    assert f.fingerprint == hashlib.sha256(leaf.public_bytes(DER)).hexdigest()
    assert f.subject == "CN=www.unit.test" and f.issuer == "CN=Unit Root"
    assert f.sans == ("DNS:www.unit.test",)
    assert f.serial == format(leaf.serial_number, "x")
    assert f.key_algorithm == "ec" and f.key_size == 256 and not f.self_signed
    assert f.not_after == leaf.not_valid_after_utc
    assert f.chain_pem.count("BEGIN CERTIFICATE") == 2 and "PRIVATE" not in f.chain_pem
    # the private key in the same file is matched by its public key
    assert key_id is not None and p.key_ids == [key_id]


def test_bundle_of_unrelated_roots_gives_one_finding_each(ca: CA) -> None:
    other = CA.new("Other Root")
    p = parse.parse(pem(ca.cert) + pem(other.cert))
    assert [c[0] for c in p.chains] == ["#1", "#2"]
    assert all(len(c[2]) == 1 for c in p.chains)


def test_der_certificate_and_truncated_der(ca: CA) -> None:
    der = ca.issue("der.unit.test")[0].public_bytes(DER)
    assert parse.sniff(der) == "der"
    assert len(parse.parse(der).chains) == 1
    truncated = parse.parse(der[: len(der) // 2])
    assert truncated.chains == [] and "truncated DER certificate" in (truncated.problem or "")


def test_der_key_is_matched_not_reported(ca: CA) -> None:
    _, key = ca.issue("k.unit.test")
    der = key.private_bytes(DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    p = parse.parse(der)
    assert p.chains == [] and p.problem is None and len(p.key_ids) == 1


def test_pkcs12_with_password_and_with_a_wrong_one(ca: CA) -> None:
    leaf, key = ca.issue("p12.unit.test")
    enc = serialization.BestAvailableEncryption(b"s3cret")
    data = pkcs12.serialize_key_and_certificates(b"web", key, leaf, [ca.cert], enc)
    assert parse.sniff(data[: parse.HEAD]) == "der"
    wrong = parse.parse(data, ["nope"])
    assert wrong.chains == [] and wrong.problem == "encrypted: wrong or missing password (PKCS#12)"
    assert parse.parse(data).problem == wrong.problem
    ok = parse.parse(data, ["nope", "s3cret"])
    assert ok.problem is None
    (_, fmt, chain, in_store) = ok.chains[0]
    assert fmt == "pkcs12" and in_store and len(chain) == 2
    assert chain[0] == leaf.public_bytes(DER)


def _jks(entries: list[tuple[int, str, list[bytes]]], password: str) -> bytes:
    def utf(s: str) -> bytes:
        b = s.encode()
        return struct.pack(">H", len(b)) + b

    body = jks.MAGIC_JKS + struct.pack(">II", 2, len(entries))
    for tag, alias, certs in entries:
        body += struct.pack(">I", tag) + utf(alias) + struct.pack(">Q", 0)
        if tag == 1:
            body += struct.pack(">I", 5) + b"\x01\x02\x03\x04\x05"  # "encrypted key"
            body += struct.pack(">I", len(certs))
        for c in certs:
            body += utf("X.509") + struct.pack(">I", len(c)) + c
    digest = hashlib.sha1(password.encode("utf-16-be") + b"Mighty Aphrodite" + body).digest()
    return body + digest


def test_jks_reader_lists_entries_and_checks_the_digest(ca: CA) -> None:
    leaf = ca.issue("jks.unit.test")[0].public_bytes(DER)
    root = ca.cert.public_bytes(DER)
    data = _jks([(1, "web", [leaf, root]), (2, "root", [root])], "changeit")
    store = jks.read(data, ["changeit"])
    assert store.verified is True
    assert [(e.alias, len(e.chain), e.private_key) for e in store.entries] == [
        ("web", 2, True),
        ("root", 1, False),
    ]
    assert jks.read(data).verified is None and jks.read(data, ["x"]).verified is False
    p = parse.parse(data)
    assert [(c[0], c[1], c[3]) for c in p.chains] == [
        ("#web", "jks", True),
        ("#root", "jks", False),
    ]
    assert "Mighty" not in repr(p)
    bad = parse.parse(data[:40])
    assert bad.chains == [] and "truncated keystore" in (bad.problem or "")


def test_non_candidates_are_skipped_quietly() -> None:
    for blob in (b"", b"hello world\n" * 100, bytes(range(256)) * 10, b"\x30\x03\x02\x01\x00"):
        assert parse.sniff(blob[: parse.HEAD]) is None
        assert parse.parse(blob).chains == [] and parse.parse(blob).problem is None


def test_truncated_pem_is_reported(ca: CA) -> None:
    text = pem(ca.cert)
    p = parse.parse(text[: len(text) // 2])
    assert p.chains == [] and "truncated PEM" in (p.problem or "")


# ------------------------------------------------------------------ network


@pytest.mark.parametrize(
    "cidr",
    ["224.0.0.0/4", "239.1.2.3", "0.0.0.0/8", "0.0.0.0", "255.255.255.255", "240.0.0.0/4",
     "169.254.10.0/24", "ff02::1", "fe80::/64", "::", "0.0.0.0/0"],
)  # fmt: skip
def test_reserved_ranges_are_refused_without_the_flag(cidr: str) -> None:
    with pytest.raises(network.ScanRefused, match="--allow-reserved"):
        network.expand([cidr], max_addresses=1 << 40)
    if "/" not in cidr or int(cidr.split("/")[1]) >= (16 if "." in cidr else 112):
        assert network.expand([cidr], allow_reserved=True)  # the flag lets it through


def test_expand_loopback_private_ranges_and_the_cap() -> None:
    assert len(network.expand(["127.0.0.0/20"])) == 4096  # loopback: every address
    lan = network.expand(["10.1.2.0/24"])
    assert len(lan) == 254 and str(lan[0]) == "10.1.2.1" and str(lan[-1]) == "10.1.2.254"
    assert [str(a) for a in network.expand(["10.0.0.5", "10.0.0.5/32"])] == ["10.0.0.5"]
    with pytest.raises(network.ScanRefused, match="16777216 addresses, more than"):
        network.expand(["10.0.0.0/8"])
    assert len(network.expand(["10.0.0.0/16"], max_addresses=65536)) == 65534
    with pytest.raises(network.ScanRefused, match="not an IP address or CIDR"):
        network.expand(["www.example.com"])


def test_parse_ports() -> None:
    assert network.parse_ports("443, 8443,9000-9002") == (443, 8443, 9000, 9001, 9002)
    for bad in ("0", "70000", "abc", "10-5", ""):
        with pytest.raises(network.ScanRefused, match="--ports"):
            network.parse_ports(bad)


# ------------------------------------------------------------------ discovered


def test_categories(ca: CA) -> None:
    now = datetime.now(UTC)
    known = report.Known({ca.cert.subject: (ca.cert,)}, frozenset(), frozenset())
    window = timedelta(days=30)

    good = _finding([ca.issue("ok.unit.test", days=200)[0].public_bytes(DER)])
    assert report.categories(good, now, window, known) == ["not-in-inventory"]
    issued = report.Known(known.cas, frozenset(), frozenset({good.fingerprint}))
    assert report.categories(good, now, window, issued) == []

    soon = _finding([ca.issue("soon.unit.test", days=10)[0].public_bytes(DER)])
    assert "expiring" in report.categories(soon, now, window, known)

    weak_key = rsa.generate_private_key(65537, 1024)
    weak = make_cert("weak.unit.test", weak_key, issuer=(ca.cert, ca.key))
    cats = report.categories(_finding([weak.public_bytes(DER)]), now, window, known)
    assert "weak" in cats and "unknown-issuer" not in cats

    # (cryptography refuses to sign with SHA-1, so the finding is edited instead)
    sha1 = dataclasses.replace(good, signature_algorithm="sha1WithRSAEncryption")
    assert report.is_weak(sha1) and not report.is_weak(good)
    assert not report.is_weak(dataclasses.replace(sha1, self_signed=True))  # a root's own

    stray_key = new_key()
    stray = make_cert("stray.unit.test", stray_key)  # self-signed, not from the inventory
    sf = _finding([stray.public_bytes(DER)])
    assert sf.self_signed
    assert {"self-signed", "unknown-issuer"} <= set(report.categories(sf, now, window, known))

    # the same issuer name but another key: not the inventory's CA
    impostor = CA(make_cert("Unit Root", new_key(), ca=True), new_key())
    fake = make_cert("fake.unit.test", new_key(), issuer=(impostor.cert, impostor.key))
    assert "unknown-issuer" in report.categories(
        _finding([fake.public_bytes(DER)]), now, window, known
    )
    rows = report.classify([good, soon, sf], now, window, known)
    assert [r.finding for r in report.select(rows, ["self-signed"])] == [sf]
    assert report.summary(rows)["not-in-inventory"] == 3


def test_finding_of_expired_certificate(ca: CA) -> None:
    old = make_cert(
        "old.unit.test",
        new_key(),
        issuer=(ca.cert, ca.key),
        not_before=datetime.now(UTC) - timedelta(days=100),
        days=10,
    )
    f = _finding([old.public_bytes(DER)])
    known = report.Known({}, frozenset(), frozenset())
    assert "expired" in report.categories(f, datetime.now(UTC), timedelta(days=30), known)
    assert isinstance(x509.load_pem_x509_certificate(f.chain_pem.encode()), x509.Certificate)


def test_hostile_pem_costs_one_pass() -> None:
    begins = b"-----BEGIN CERTIFICATE-----\n" * 37_000  # 1 MiB of BEGIN lines, no END
    t0 = time.perf_counter()
    p = parse.parse(begins)
    assert p.chains == [] and p.problem == "truncated PEM: a block has no END line"
    junk = b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n" * 18_000
    q = parse.parse(junk)
    assert q.chains == [] and q.problem == "18000 malformed certificate block(s) in PEM"
    mismatched = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END PRIVATE KEY-----\n"
    assert parse.parse(mismatched).problem == "1 malformed certificate block(s) in PEM"
    assert time.perf_counter() - t0 < 5  # quadratic scanning would take minutes

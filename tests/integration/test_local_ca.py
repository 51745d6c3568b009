"""The built-in local_ca issuer, with real crypto and real chain verification.

Stand-in: the CA's durable storage is :class:`tests.conformance.StandInVault` (a dict
in memory) instead of the state store's IssuerVault, which is tested on its own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certctl import pki
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, IssuedCert, IssueRequest, Registry
from certctl.errors import PermanentError
from certctl.model import Certificate, KeySpec, Profile, VersionRecord
from certctl_connectors.issuers.local_ca import LocalCAIssuer, duration_s
from tests import conformance
from tests.conformance import FixedClock, IssuerHarness, StandInVault

DAY = 86400
ROOT_ONLY = {"root": {"common_name": "Test Root", "key": {"type": "ecdsa", "curve": "P-256"}}}
WITH_INTERMEDIATE = {
    "root": {
        "common_name": "Test Root",
        "key": {"type": "ecdsa", "curve": "P-384"},
        "ttl": "3650d",
    },
    "intermediate": {"common_name": "Test Issuing CA", "key": {"type": "ecdsa", "curve": "P-256"}},
    "public_base_url": "https://pki.test/",
    "organization": "Example Org",
    "country": "DE",
}


def ctx(tmp_path: Path, vault: StandInVault | None = None, clock: FixedClock | None = None) -> Any:
    return ConnectorContext(
        inventory_root=tmp_path,
        clock=clock or FixedClock(),
        vault=vault if vault is not None else StandInVault(),
        syncer=BatchSyncer("none"),
    )


def request(
    names: tuple[str, ...] = ("www.test",),
    *,
    key: KeySpec = KeySpec("ecdsa", 256),  # noqa: B008 - frozen, immutable
    ekus: tuple[str, ...] = ("serverAuth",),
    ttl_s: int = 30 * DAY,
    max_ttl_s: int | None = 90 * DAY,
) -> IssueRequest:
    cert = Certificate(
        name=names[0].split(".")[0],
        common_name=names[0],
        sans=names[1:],
        issuer="ca",
        profile="p",
        key=key,
        ttl_s=ttl_s,
    )
    private = pki.generate_key(key)
    return IssueRequest(
        cert, Profile("p", ekus=ekus, max_ttl_s=max_ttl_s), private, private.public_key()
    )


def issue(
    ca: LocalCAIssuer, req: IssueRequest, payload: Mapping[str, Any] | None = None
) -> IssuedCert:
    issued: IssuedCert = asyncio.run(
        ca.issue(req, asyncio.run(ca.prepare(req)) if payload is None else payload)
    )
    return issued


def leaf_of(issued: IssuedCert) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_pem)


def ext(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_class(cls)


# ------------------------------------------------------------------ conformance


@pytest.mark.parametrize("config", [ROOT_ONLY, WITH_INTERMEDIATE], ids=["root", "intermediate"])
@pytest.mark.parametrize("check", conformance.ISSUER_CHECKS, ids=conformance.check_id)
def test_conformance(
    tmp_path: Path, config: dict[str, Any], check: conformance.IssuerCheck
) -> None:
    ca = LocalCAIssuer("ca", config, ctx(tmp_path))
    asyncio.run(check(IssuerHarness(ca, lambda names: request(names))))


def test_registered_as_builtin() -> None:
    assert Registry().load_builtin().issuers["local_ca"] is LocalCAIssuer


# -------------------------------------------------------------- chain + facts


@pytest.mark.parametrize("config", [ROOT_ONLY, WITH_INTERMEDIATE], ids=["root", "intermediate"])
def test_leaf_verifies_against_its_chain(tmp_path: Path, config: dict[str, Any]) -> None:
    clock = FixedClock()
    ca = LocalCAIssuer("ca", config, ctx(tmp_path, clock=clock))
    issued = issue(ca, request(("www.test", "api.test", "10.1.2.3")))
    leaf = leaf_of(issued)
    root = x509.load_pem_x509_certificate(issued.root_pem)
    chain = pki.parse_pem_chain(issued.chain_pem)
    assert len(chain) == (1 if "intermediate" in config else 0)
    builder = verification.PolicyBuilder().store(verification.Store([root])).time(clock.now)
    for name in (
        x509.DNSName("api.test"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
    ):
        verified = builder.build_server_verifier(name).verify(leaf, chain)
        assert verified[-1] == root
    assert ca.ca_certificate() == (chain[0] if chain else root)


def test_client_certificates_verify_as_clients(tmp_path: Path) -> None:
    clock = FixedClock()
    ca = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path, clock=clock))
    issued = issue(ca, request(("svc.test",), ekus=("clientAuth",)))
    root = x509.load_pem_x509_certificate(issued.root_pem)
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(clock.now)
        .build_client_verifier()
    )
    verified = verifier.verify(leaf_of(issued), pki.parse_pem_chain(issued.chain_pem))
    assert verified.subjects is not None


def test_leaf_extensions_for_a_tls_server(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path))
    issued = issue(ca, request(("www.test", "10.0.0.1", "ops@test.example")))
    leaf = leaf_of(issued)
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.test"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]
    assert san.get_values_for_type(x509.RFC822Name) == ["ops@test.example"]
    ski = ext(leaf, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())
    inter = pki.parse_pem_chain(issued.chain_pem)[0]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(inter, x509.SubjectKeyIdentifier).value.digest
    info = pki.describe(leaf)
    assert info["crl_urls"] == ["https://pki.test/crl/ca.crl"]
    assert info["ocsp_urls"] == ["https://pki.test/ocsp/ca"]
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.test"
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Example Org"
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)  # P-256 intermediate
    assert issued.root_pem and b"BEGIN CERTIFICATE" in issued.chain_pem


@pytest.mark.parametrize(
    ("key", "ekus", "want"),
    [
        (KeySpec("rsa", 2048), ("serverAuth",), {"digital_signature", "key_encipherment"}),
        (KeySpec("rsa", 2048), ("clientAuth",), {"digital_signature", "key_encipherment"}),
        (KeySpec("ecdsa", 256), ("clientAuth",), {"digital_signature"}),
        (KeySpec("ed25519"), ("serverAuth",), {"digital_signature"}),
        (
            KeySpec("ecdsa", 384),
            ("emailProtection",),
            {"digital_signature", "content_commitment", "key_agreement"},
        ),
        (
            KeySpec("rsa", 2048),
            ("emailProtection",),
            {"digital_signature", "content_commitment", "key_encipherment"},
        ),
        (KeySpec("ed25519"), ("emailProtection",), {"digital_signature", "content_commitment"}),
        (KeySpec("ecdsa", 256), ("codeSigning",), {"digital_signature"}),
    ],
    ids=lambda v: getattr(v, "id", None) or "-".join(v) if not isinstance(v, set) else "",
)
def test_key_usage_fits_eku_and_key_type(
    tmp_path: Path, key: KeySpec, ekus: tuple[str, ...], want: set[str]
) -> None:
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path))
    leaf = leaf_of(
        issue(
            ca, request(("me@mail.test" if "email" in ekus[0] else "k.test",), key=key, ekus=ekus)
        )
    )
    assert set(pki.describe(leaf)["key_usage"]) == want
    assert [pki.eku_name(o) for o in ext(leaf, x509.ExtendedKeyUsage).value] == list(ekus)
    assert pki.key_spec_id(leaf.public_key()) == key.id


def test_time_stamping_eku_is_critical(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path))
    leaf = leaf_of(issue(ca, request(("tsa.test",), ekus=("timeStamping",))))
    assert ext(leaf, x509.ExtendedKeyUsage).critical


def test_validity_is_capped_by_the_profile_and_backdated(tmp_path: Path) -> None:
    clock = FixedClock()
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, clock=clock))
    req = request(ttl_s=365 * DAY, max_ttl_s=90 * DAY)
    payload = asyncio.run(ca.prepare(req))
    assert datetime.fromisoformat(payload["not_before"]) == clock.now - timedelta(minutes=1)
    issued = issue(ca, req, payload)
    assert issued.not_before == clock.now - timedelta(minutes=1)
    assert issued.not_after - issued.not_before == timedelta(days=90)
    short = issue(ca, request(ttl_s=7 * DAY, max_ttl_s=90 * DAY))
    assert short.not_after - short.not_before == timedelta(days=7)
    uncapped = issue(ca, request(ttl_s=400 * DAY, max_ttl_s=None))
    assert uncapped.not_after - uncapped.not_before == timedelta(days=400)


def test_leaf_never_outlives_its_ca(tmp_path: Path) -> None:
    config = {"root": {"common_name": "Short Root", "ttl": "10d"}}
    ca = LocalCAIssuer("ca", config, ctx(tmp_path))
    issued = issue(ca, request(ttl_s=30 * DAY))
    root = x509.load_pem_x509_certificate(issued.root_pem)
    assert issued.not_after == root.not_valid_after_utc


def test_same_payload_gives_the_same_certificate(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path))
    req = request(("idem.test", "b.test"))
    payload = asyncio.run(ca.prepare(req))
    a = issue(ca, req, payload)
    b = issue(ca, req, json.loads(json.dumps(payload)))
    assert a == b  # byte-identical (deterministic ECDSA): a resumed issue is no new cert
    assert a.serial == payload["serial"]
    other = issue(ca, req)
    assert other.serial != a.serial


def test_payload_without_serial_gets_one(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path))
    assert issue(ca, request(), {}).serial


@pytest.mark.parametrize(
    ("root_key", "algo"),
    [({"type": "ecdsa", "curve": "P-384"}, hashes.SHA384), ({"type": "ed25519"}, None)],
)
def test_signature_hash_follows_the_ca_key(
    tmp_path: Path, root_key: dict[str, Any], algo: type | None
) -> None:
    ca = LocalCAIssuer("ca", {"root": {"common_name": "R", "key": root_key}}, ctx(tmp_path))
    leaf = leaf_of(issue(ca, request()))
    if algo is None:
        assert leaf.signature_hash_algorithm is None
    else:
        assert isinstance(leaf.signature_hash_algorithm, algo)
    root = x509.load_pem_x509_certificate(issue(ca, request()).root_pem)
    assert pki.signed_by(leaf, root)


def test_rsa_ca(tmp_path: Path) -> None:
    ca = LocalCAIssuer(
        "ca", {"root": {"common_name": "R", "key": {"type": "rsa", "size": 2048}}}, ctx(tmp_path)
    )
    issued = issue(ca, request())
    assert pki.signed_by(leaf_of(issued), x509.load_pem_x509_certificate(issued.root_pem))


def test_long_common_name_goes_to_the_san_only(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path))
    long_name = "a" * 60 + ".example.test"
    leaf = leaf_of(issue(ca, request((long_name,))))
    assert len(leaf.subject) == 0
    san = ext(leaf, x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.DNSName) == [long_name]


def test_unknown_eku_is_a_permanent_error(tmp_path: Path) -> None:
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path))
    with pytest.raises(PermanentError, match="unknown extended key usage"):
        issue(ca, request(ekus=("serverauth",)))


# ------------------------------------------------------------- CA persistence


def test_ca_is_generated_once_and_reloaded_from_the_vault(tmp_path: Path) -> None:
    vault = StandInVault()
    first = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path, vault))
    a = issue(first, request())
    assert vault.secret[("ca", "root/key.pem")] is True
    assert vault.secret[("ca", "intermediate/key.pem")] is True
    assert vault.secret[("ca", "root/cert.pem")] is False
    assert b"PRIVATE KEY" in vault.data[("ca", "root/key.pem")]
    puts = vault.puts
    issue(first, request())
    second = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path, vault))
    b = issue(second, request())
    assert vault.puts == puts  # nothing regenerated
    assert (a.root_pem, a.chain_pem) == (b.root_pem, b.chain_pem)
    # another issuer name is another CA
    other = LocalCAIssuer("other", WITH_INTERMEDIATE, ctx(tmp_path, vault))
    assert issue(other, request()).root_pem != a.root_pem


def test_ca_is_cached_in_the_instance(tmp_path: Path) -> None:
    class CountingVault(StandInVault):
        gets = 0

        def get(self, issuer: str, key: str) -> bytes | None:
            CountingVault.gets += 1
            return super().get(issuer, key)

    ca = LocalCAIssuer("ca", WITH_INTERMEDIATE, ctx(tmp_path, CountingVault()))
    issue(ca, request())
    gets = CountingVault.gets
    for _ in range(5):
        issue(ca, request())
    assert CountingVault.gets == gets


def test_half_generated_ca_is_replaced(tmp_path: Path) -> None:
    vault = StandInVault()
    key = pki.generate_key(KeySpec())
    vault.put("ca", "root/key.pem", pki.key_to_pem(key).reveal(), secret=True)  # no cert: crash
    issued = issue(LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, vault)), request())
    root = x509.load_pem_x509_certificate(issued.root_pem)
    assert pki.keys_match(pki.load_key_pem(vault.data[("ca", "root/key.pem")]), root.public_key())


def test_stored_ca_that_no_longer_matches_the_config_is_refused(tmp_path: Path) -> None:
    vault = StandInVault()
    issue(LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, vault)), request())
    changed = {"root": {"common_name": "Another Root", "key": {"type": "ecdsa", "curve": "P-256"}}}
    with pytest.raises(PermanentError, match="does not match the configuration"):
        issue(LocalCAIssuer("ca", changed, ctx(tmp_path, vault)), request())


# ------------------------------------------------------------ sub-CA from PEM


def _ca_files(
    tmp_path: Path,
    *,
    ca: bool = True,
    cert_sign: bool = True,
    path_length: int | None = None,
    wrong_key: bool = False,
    expired: bool = False,
    with_chain: bool = True,
) -> tuple[x509.Certificate, x509.Certificate]:
    """An external root and a sub-CA it signed, written as PEM files under tmp_path."""
    now = FixedClock().now
    root_key = pki.generate_key(KeySpec("ecdsa", 384))
    root_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "External Root")])
    root = (
        x509.CertificateBuilder(
            issuer_name=root_name,
            subject_name=root_name,
            public_key=root_key.public_key(),
            serial_number=pki.random_serial(),
            not_valid_before=now - timedelta(days=10),
            not_valid_after=now + timedelta(days=3000),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), False)
        .sign(root_key, hashes.SHA384())
    )
    sub_key = pki.generate_key(KeySpec("ecdsa", 256))
    sub_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Team Sub CA")])
    end = now - timedelta(days=1) if expired else now + timedelta(days=1000)
    sub = (
        x509.CertificateBuilder(
            issuer_name=root_name,
            subject_name=sub_name,
            public_key=sub_key.public_key(),
            serial_number=pki.random_serial(),
            not_valid_before=now - timedelta(days=5),
            not_valid_after=end,
        )
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, cert_sign, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(sub_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), False
        )
        .sign(root_key, hashes.SHA384())
    )
    pem = pki.cert_pem(sub) + (pki.cert_pem(root) if with_chain else b"")
    (tmp_path / "pki").mkdir(exist_ok=True)
    (tmp_path / "pki/sub.pem").write_bytes(pem)
    key = pki.generate_key(KeySpec()) if wrong_key else sub_key
    (tmp_path / "pki/sub.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    return root, sub


SUB = {"root": {"cert_file": "pki/sub.pem", "key_file": "pki/sub.key", "key_password": "s3cret"}}


@pytest.mark.parametrize("with_intermediate", [False, True])
def test_sub_ca_from_pem_files_is_used(tmp_path: Path, with_intermediate: bool) -> None:
    root, sub = _ca_files(tmp_path)
    config: dict[str, Any] = dict(SUB)
    if with_intermediate:
        config["intermediate"] = {"common_name": "Generated Issuing CA"}
    clock = FixedClock()
    vault = StandInVault()
    ca = LocalCAIssuer("team", config, ctx(tmp_path, vault, clock))
    issued = issue(ca, request(("svc.test",)))
    chain = pki.parse_pem_chain(issued.chain_pem)
    assert chain[-1] == sub and len(chain) == (2 if with_intermediate else 1)
    assert x509.load_pem_x509_certificate(issued.root_pem) == root
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(clock.now)
        .build_server_verifier(x509.DNSName("svc.test"))
    )
    assert verifier.verify(leaf_of(issued), chain)[-1] == root
    # the loaded CA's key never goes to the vault
    assert ("team", "root/key.pem") not in vault.data


def test_sub_ca_without_its_root_in_the_file(tmp_path: Path) -> None:
    _, sub = _ca_files(tmp_path, with_chain=False)
    issued = issue(LocalCAIssuer("team", SUB, ctx(tmp_path)), request())
    assert issued.root_pem == b"" and pki.parse_pem_chain(issued.chain_pem) == [sub]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ca": False}, "not a CA certificate (it lacks BasicConstraints CA:true)"),
        ({"cert_sign": False}, "KeyUsage lacks keyCertSign"),
        ({"wrong_key": True}, "private key does not match the certificate"),
        ({"expired": True}, "expired on"),
    ],
    ids=["ca-false", "no-keycertsign", "key-mismatch", "expired"],
)
def test_unusable_sub_ca_is_refused_clearly(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    _ca_files(tmp_path, **kwargs)
    ca = LocalCAIssuer("team", SUB, ctx(tmp_path))
    with pytest.raises(PermanentError) as err:
        issue(ca, request())
    assert message in str(err.value)
    assert "pki/sub.pem" in str(err.value) and "team" in str(err.value)


def test_sub_ca_with_path_length_zero_cannot_have_an_intermediate(tmp_path: Path) -> None:
    _ca_files(tmp_path, path_length=0)
    config = {**SUB, "intermediate": {"common_name": "Nope"}}
    with pytest.raises(PermanentError, match="pathLenConstraint 0"):
        issue(LocalCAIssuer("team", config, ctx(tmp_path)), request())
    issue(LocalCAIssuer("team", SUB, ctx(tmp_path)), request())  # signing leaves is fine


def test_sub_ca_errors_for_missing_files_and_wrong_password(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="cannot read"):
        issue(LocalCAIssuer("team", SUB, ctx(tmp_path)), request())
    _ca_files(tmp_path)
    bad = {"root": {**SUB["root"], "key_password": "wrong"}}
    with pytest.raises(PermanentError, match="wrong password"):
        issue(LocalCAIssuer("team", bad, ctx(tmp_path)), request())


# -------------------------------------------------------------------- revoke


def test_revocations_are_recorded_for_crl_and_ocsp(tmp_path: Path) -> None:
    clock = FixedClock()
    vault = StandInVault()
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, vault, clock))
    req = request()
    issued = issue(ca, req)
    version = VersionRecord(
        cert=req.cert.name,
        version=3,
        serial=issued.serial,
        not_before=issued.not_before,
        not_after=issued.not_after,
        fingerprint=issued.fingerprint,
        issuer="ca",
        key_spec="ecdsa-p256",
        names=req.cert.names,
        profile_digest="",
    )
    asyncio.run(ca.revoke(version, "keyCompromise"))
    clock.advance(hours=1)
    asyncio.run(ca.revoke(version, "superseded"))  # idempotent: the first record stands
    assert ca.revoked_serials() == [issued.serial]
    rec = ca.revocation(issued.serial)
    assert rec is not None
    assert rec["reason"] == "keyCompromise" and rec["version"] == 3
    assert datetime.fromisoformat(rec["revoked_at"]) == clock.now - timedelta(hours=1)
    # a fresh instance (another process) sees the same
    again = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, vault, clock))
    assert again.revoked_serials() == [issued.serial]
    with pytest.raises(PermanentError, match="unknown revocation reason"):
        asyncio.run(ca.revoke(version, "because"))


def test_revoke_finishes_a_half_recorded_revocation(tmp_path: Path) -> None:
    vault = StandInVault()
    ca = LocalCAIssuer("ca", ROOT_ONLY, ctx(tmp_path, vault))
    now = datetime(2031, 1, 1, tzinfo=UTC)
    version = VersionRecord("c", 1, "abc", now, now, "f", "ca", "ecdsa-p256", ("c",), "")
    vault.put("ca", "revoked/abc", b'{"reason": "unspecified"}', secret=False)  # crash here
    asyncio.run(ca.revoke(version, "superseded"))
    assert ca.revoked_serials() == ["abc"]
    assert ca.revocation("ABC") == {"reason": "unspecified"}


# -------------------------------------------------------------------- config


def test_config_schema_accepts_the_bundled_inventories() -> None:
    schema = LocalCAIssuer.config_schema
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    demo = {
        "type": "local_ca",
        "root": {
            "common_name": "certctl Demo Root CA",
            "key": {"type": "ecdsa", "curve": "P-384"},
            "ttl": "3650d",
        },
        "intermediate": {
            "common_name": "certctl Demo Issuing CA 1",
            "key": {"type": "ecdsa", "curve": "P-256"},
            "ttl": "1825d",
        },
        "public_base_url": "https://pki.demo.internal",
    }
    for ok in (demo, ROOT_ONLY, WITH_INTERMEDIATE, SUB, {"root": {"common_name": "Test Root"}}):
        assert list(v.iter_errors(ok)) == [], ok
    for bad in (
        {},
        {"root": {"common_name": "x"}, "extra": 1},
        {"root": {"common_name": "x", "cert_file": "a.pem", "key_file": "a.key"}},
        {"root": {"cert_file": "a.pem"}},
        {"root": {"common_name": "x", "key": {"type": "ecdsa", "curve": "P-521"}}},
        {"root": {"common_name": "x", "key": {"type": "rsa", "curve": "P-256"}}},
        {"root": {"common_name": "x", "ttl": "10 days"}},
        {"root": {"common_name": "x"}, "public_base_url": "ftp://x"},
        {"root": {"common_name": "x"}, "country": "Germany"},
    ):
        assert list(v.iter_errors(bad)), bad


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3650d", 3650 * DAY), ("12h", 43200), ("1d12h", DAY + 43200), (90, 90), ("2w", 14 * DAY)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert duration_s(text, "ttl") == seconds


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="needs a common_name"):
        LocalCAIssuer("ca", {"root": {}}, ctx(tmp_path))
    with pytest.raises(PermanentError, match="not a duration"):
        LocalCAIssuer("ca", {"root": {"common_name": "x", "ttl": "soon"}}, ctx(tmp_path))

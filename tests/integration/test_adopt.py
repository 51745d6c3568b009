"""`certctl adopt` over real discovery findings (certctl.discovery.files scanning real
files, recorded in the real state store): full adoption with the key, observe-only
adoption without it, issuer matching against the inventory's local CA, endpoints."""

from __future__ import annotations

import datetime as dt
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certctl import pki
from certctl.cli import cli
from certctl.discovery import files as disc
from certctl.discovery.model import Finding
from certctl.engine import Engine
from certctl.model import ActionKind

INV = """
issuers:
  ca:
    type: local_ca
    root: {common_name: Adopt Test Root, key: {type: ecdsa, curve: P-256}, ttl: 3650d}
targets:
  out: {type: file, root: out, cert_path: "{{ cert.name }}.pem", key_path: "{{ cert.name }}.key"}
certificates:
  seed: {common_name: seed.adopt.test, issuer: ca, targets: [out]}
"""


def _run(inv: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)
    return res.exit_code, res.output


def _setup(tmp_path: Path) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    """An inventory whose local CA exists (one apply), and that CA's key and cert."""
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "base.yaml").write_text(INV)
    assert _run(inv, "apply", "--auto-approve")[0] == 0
    eng = Engine(inv)
    try:
        ca_cert = pki.load_cert_pem(eng.store().get("ca", "root/cert.pem") or b"")
        raw = eng.store().get("ca", "root/key.pem")
        assert raw is not None
        ca_key = serialization.load_pem_private_key(raw, None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    finally:
        eng.close()
    return inv, ca_cert, ca_key


def _leaf(
    name: str, signer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, days: int = 90
) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) of a leaf made outside certctl (signed by ``signer``, or
    self-signed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC) - timedelta(days=1)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, sign_key = (signer[0].subject, signer[1]) if signer else (subject, key)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(sign_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _record(inv: Path, findings: list[Finding]) -> None:
    eng = Engine(inv)
    try:
        eng.store().record_findings(findings)
    finally:
        eng.close()


def _discover(inv: Path, root: Path) -> list[Finding]:
    result = disc.scan_local([str(root)], disc.Options(), datetime.now(UTC))
    _record(inv, result.findings)
    return result.findings


def _finding(
    name: str,
    cert_pem: bytes,
    *,
    host: str,
    location: str,
    source: str = "file",
    sni: str | None = None,
    fmt: str = "pem",
    self_signed: bool = False,
    key_path: str | None = None,
    chain_pem: str | None = None,
) -> Finding:
    """A finding of the EC P-256 leaf in ``cert_pem`` (for ``name``), as discovery
    records one; the chain defaults to the leaf alone."""
    leaf = pki.load_cert_pem(cert_pem)
    return Finding(
        source=source,
        host=host,
        location=location,
        sni=sni,
        format=fmt,
        fingerprint=pki.fingerprint(leaf),
        subject=leaf.subject.rfc4514_string(),
        sans=(f"DNS:{name}",),
        issuer=leaf.issuer.rfc4514_string(),
        serial=pki.serial_hex(leaf.serial_number),
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        key_algorithm="ec",
        key_size=256,
        self_signed=self_signed,
        key_path=key_path,
        chain_pem=cert_pem.decode() if chain_pem is None else chain_pem,
        seen_at=datetime.now(UTC),
    )


def test_adopt_file_finding_with_key_then_plan_has_no_changes(tmp_path: Path) -> None:
    inv, ca_cert, ca_key = _setup(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cert_pem, key_pem = _leaf("old.adopt.test", (ca_cert, ca_key))
    (legacy / "old.crt").write_bytes(cert_pem)
    (legacy / "old.key").write_bytes(key_pem)
    (legacy / "old.key").chmod(0o600)
    findings = _discover(inv, legacy)
    (f,) = [f for f in findings if f.location.endswith("old.crt")]
    assert f.key_path == str(legacy / "old.key")

    code, out = _run(inv, "adopt", "--finding", f.fingerprint)
    assert code == 0, out
    (written,) = inv.glob("adopted-*.yaml")
    doc = yaml.safe_load(written.read_text())
    entry = doc["certificates"]["old.adopt.test"]
    assert entry["issuer"] == "ca"  # the inventory's local CA signed it
    assert "issuers" not in doc
    target = doc["targets"][entry["targets"][0]]
    assert target == {
        "type": "file",
        "root": str(legacy),
        "cert_path": "old.crt",
        "key_path": "old.key",
    }
    assert "  # from file finding\n  # local:" + str(legacy / "old.crt") in written.read_text()

    code, out = _run(inv, "plan", "--detailed-exitcode")
    assert code == 0, out
    assert (legacy / "old.crt").read_bytes() == cert_pem
    assert (legacy / "old.key").read_bytes() == key_pem

    # the finding is certctl's now: adopting everything again adopts nothing
    code, out = _run(inv, "adopt", "--all")
    assert code == 1 and "already managed" in out, out


def test_adopt_without_key_is_observe_only_until_renewal(tmp_path: Path) -> None:
    inv, ca_cert, ca_key = _setup(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cert_pem, _ = _leaf("nokey.adopt.test", (ca_cert, ca_key), days=30)
    (legacy / "nokey.pem").write_bytes(cert_pem)
    _discover(inv, legacy)

    code, out = _run(inv, "adopt", "--all", "--out", str(inv / "adopted.yaml"))
    assert code == 0, out
    assert "adopted nokey.adopt.test (observe only until its next renewal)" in out
    text = (inv / "adopted.yaml").read_text()
    assert "OBSERVE ONLY until its next renewal" in text
    # the renewal will deploy a new key: the operator is told the target lacks a key file
    assert f"add key_path (where the service reads its key) to the target for {legacy}" in out
    assert _run(inv, "plan", "--detailed-exitcode")[0] == 0

    eng = Engine(inv)
    try:
        cur = eng.store().snapshot().certs["nokey.adopt.test"].current
        assert cur is not None and cur.key_custody == "observed"
        assert eng.store().material("nokey.adopt.test", cur.version)[2] is None
        not_after = cur.not_after
    finally:
        eng.close()

    # even when the file is gone, certctl cannot (and does not try to) redeploy it
    (legacy / "nokey.pem").unlink()
    code, out = _run(inv, "plan", "--detailed-exitcode")
    assert code == 0, out
    # nor does a playbook's redeploy: it says why and leaves the certificate alone
    book = tmp_path / "redeploy.yaml"
    book.write_text(
        "name: redeploy-all\ndescription: redeploy\nsteps:\n"
        "  - name: redeploy\n    action: redeploy\n    select: {name: '*'}\n"
    )
    code, out = _run(inv, "run", str(book), "--yes")
    assert code == 0, out
    assert "nokey.adopt.test: observe only (adopted without its key); not redeployed" in out
    assert not (legacy / "nokey.pem").exists()

    # in its renewal window: a new key, issued by the matched CA, deployed
    later = not_after - timedelta(days=3)
    eng = Engine(inv, clock=lambda: later)
    try:
        plan, _ = eng.plan()
        (renew,) = [a for a in plan.actions if a.kind is ActionKind.RENEW]
        assert renew.cert == "nokey.adopt.test" and renew.details["issuer"] == "ca"
        _, report = eng.apply()
        assert report is not None and not report.failed, [r.error for r in report.failed]
        cur = eng.store().snapshot().certs["nokey.adopt.test"].current
        assert cur is not None and cur.key_custody == "controller" and cur.version == 2
    finally:
        eng.close()
    new = pki.load_cert_pem((legacy / "nokey.pem").read_bytes())
    assert pki.fingerprint(new) == cur.fingerprint


def test_unknown_issuer_and_endpoint_findings_keep_the_inventory_valid(tmp_path: Path) -> None:
    inv, _, _ = _setup(tmp_path)
    cert_pem, _ = _leaf("self.adopt.test", None)
    # a network finding as discovery's TLS probe records it (recorded by the test)
    finding = _finding(
        "self.adopt.test",
        cert_pem,
        source="network",
        host="local",
        location="127.0.0.1:8443",
        sni="self.adopt.test",
        fmt="tls",
        self_signed=True,
    )
    _record(inv, [finding])
    code, out = _run(inv, "adopt", "--all", "--out", str(inv / "net.yaml"))
    assert code == 0, out
    assert "no target: certctl does not know where this certificate's files are" in out
    doc = yaml.safe_load((inv / "net.yaml").read_text())
    assert doc["certificates"]["self.adopt.test"]["issuer"] == "unassigned"
    assert doc["issuers"]["unassigned"]["type"] == "acme"
    assert doc["endpoints"]["self.adopt.test"] == {
        "endpoint": "127.0.0.1:8443",
        "certificate": "self.adopt.test",
        "sni": "self.adopt.test",
    }
    assert _run(inv, "validate")[0] == 0
    assert _run(inv, "plan", "--detailed-exitcode")[0] == 0


def test_adopt_needs_a_selection_and_refuses_unknown_fingerprints(tmp_path: Path) -> None:
    inv, _, _ = _setup(tmp_path)
    code, out = _run(inv, "adopt")
    assert code == 1 and "--finding" in out
    code, out = _run(inv, "adopt", "--finding", "ab" * 32)
    assert code == 1 and "no such finding" in out
    assert sorted(p.name for p in inv.glob("*.yaml")) == ["base.yaml"]


def test_finding_on_another_host_gets_an_ssh_target_and_is_observe_only(tmp_path: Path) -> None:
    inv, ca_cert, ca_key = _setup(tmp_path)
    (inv / "hosts.yaml").write_text(
        "hosts:\n  web1: {address: 127.0.0.1, vars: {ssh_port: 9, ssh_connect_timeout: 2}}\n"
    )
    cert_pem, _ = _leaf("remote.adopt.test", (ca_cert, ca_key))
    finding = _finding(
        "remote.adopt.test",
        cert_pem,
        host="web1",
        location="/etc/ssl/remote.pem",
        key_path="/etc/ssl/remote.key",
    )
    _record(inv, [finding])  # as discovery's SSH scan records it
    code, out = _run(inv, "adopt", "--host", "web1", "--all", "--out", str(inv / "r.yaml"))
    assert code == 0, out
    assert "observe only" in out
    doc = yaml.safe_load((inv / "r.yaml").read_text())
    entry = doc["certificates"]["remote.adopt.test"]
    assert entry["issuer"] == "ca"
    assert doc["targets"][entry["targets"][0]] == {
        "type": "ssh",
        "hosts": ["web1"],
        "root": "/etc/ssl",
        "cert_path": "remote.pem",
        "key_path": "remote.key",
    }
    assert _run(inv, "plan", "--detailed-exitcode")[0] == 0


def test_key_changed_since_discovery_is_observe_only_and_never_stored(tmp_path: Path) -> None:
    """Discovery matched old.key; since then it was replaced by another key. Adoption
    must not store (or deploy) that key as the certificate's: observe only."""
    inv, ca_cert, ca_key = _setup(tmp_path)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    cert_pem, key_pem = _leaf("moved.adopt.test", (ca_cert, ca_key))
    (legacy / "moved.crt").write_bytes(cert_pem)
    (legacy / "moved.key").write_bytes(key_pem)
    (legacy / "moved.key").chmod(0o600)
    (f,) = [f for f in _discover(inv, legacy) if f.location.endswith("moved.crt")]
    assert f.key_path is not None
    _, other_key = _leaf("other.adopt.test", None)
    (legacy / "moved.key").write_bytes(other_key)

    code, out = _run(inv, "adopt", "--finding", f.fingerprint, "--out", str(inv / "m.yaml"))
    assert code == 0, out
    assert "moved.key is not the private key of the certificate" in out, out
    assert "observe only" in out and "PRIVATE KEY" not in out
    eng = Engine(inv)
    try:
        cur = eng.store().snapshot().certs["moved.adopt.test"].current
        assert cur is not None and cur.key_custody == "observed"
        assert eng.store().material("moved.adopt.test", cur.version)[2] is None
    finally:
        eng.close()
    assert _run(inv, "plan", "--detailed-exitcode")[0] == 0
    assert (legacy / "moved.key").read_bytes() == other_key


def test_remote_full_chain_and_combined_files_keep_their_roles(tmp_path: Path) -> None:
    """A file on another host holding the chain is a fullchain_path (a renewal must
    write the chain back, or clients lose it); one holding the key too is a
    combined_path (not a cert_path and a key_path naming the same file)."""
    inv, ca_cert, ca_key = _setup(tmp_path)
    (inv / "hosts.yaml").write_text(
        "hosts:\n  web1: {address: 127.0.0.1, vars: {ssh_port: 9, ssh_connect_timeout: 2}}\n"
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM).decode()
    findings = []
    for name, key_beside in (("chain.adopt.test", None), ("combo.adopt.test", "same")):
        cert_pem, _ = _leaf(name, (ca_cert, ca_key))
        location = f"/etc/ssl/{name}.pem"
        findings.append(
            _finding(
                name,
                cert_pem,
                host="web1",
                location=location,
                key_path=location if key_beside else None,
                chain_pem=cert_pem.decode() + ca_pem,
            )
        )
    _record(inv, findings)
    code, out = _run(inv, "adopt", "--host", "web1", "--all", "--out", str(inv / "r.yaml"))
    assert code == 0, out
    doc = yaml.safe_load((inv / "r.yaml").read_text())
    t_chain = doc["targets"][doc["certificates"]["chain.adopt.test"]["targets"][0]]
    t_combo = doc["targets"][doc["certificates"]["combo.adopt.test"]["targets"][0]]
    assert {k: v for k, v in t_chain.items() if k.endswith("_path")} == {
        "fullchain_path": "chain.adopt.test.pem"
    }
    assert {k: v for k, v in t_combo.items() if k.endswith("_path")} == {
        "combined_path": "combo.adopt.test.pem"
    }
    assert "to the target for web1:/etc/ssl/chain.adopt.test.pem" in out
    assert "to the target for web1:/etc/ssl/combo.adopt.test.pem" not in out
    assert _run(inv, "plan", "--detailed-exitcode")[0] == 0

"""`certctl import acme.sh` over an acme.sh home directory.

acme.sh is not packaged in Debian (and this machine reaches no other source), so the
directory is a layout built by the test from acme.sh's documented format:
``<domain>/<domain>.conf`` (``Le_*`` assignments, some base64-wrapped), ``<domain>.cer``,
``<domain>.key``, ``ca.cer``, ``fullchain.cer``, ``<domain>_ecc/`` for ECDSA, and the
``--install-cert`` copies with ``Le_ReloadCmd``. Everything certctl does with it is
real: inventory load, state store, planner, file targets.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certctl.cli import cli
from certctl.engine import Engine
from certctl.model import ActionKind

API = "https://acme.example.test/directory"


def _b64(text: str) -> str:
    return (
        "__ACME_BASE64__START_" + base64.b64encode(text.encode()).decode() + "__ACME_BASE64__END_"
    )


@dataclass
class Layout:
    home: Path
    install: Path
    inv: Path
    ca_pem: bytes


def _issue(
    names: list[str], key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, ca: tuple[Any, Any]
) -> bytes:
    ca_cert, ca_key = ca
    now = datetime.now(UTC) - timedelta(days=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=90))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _domain_dir(
    home: Path, dirname: str, domain: str, cert: bytes, key: bytes, ca: bytes, conf: str
) -> Path:
    d = home / dirname
    d.mkdir()
    (d / f"{domain}.cer").write_bytes(cert)
    (d / f"{domain}.key").write_bytes(key)
    (d / f"{domain}.key").chmod(0o600)
    (d / "ca.cer").write_bytes(ca)
    (d / "fullchain.cer").write_bytes(cert + ca)
    (d / f"{domain}.conf").write_text(conf)
    return d


@pytest.fixture
def layout_built_by_test(tmp_path: Path) -> Layout:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme.sh test CA")])
    now = datetime.now(UTC) - timedelta(days=2)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    home = tmp_path / "acme.sh"
    home.mkdir()
    (home / "account.conf").write_text("LOG_FILE='/dev/null'\n")
    (home / "ca").mkdir()
    install = tmp_path / "nginx" / "ssl"
    install.mkdir(parents=True)
    hook_log = tmp_path / "reload.log"

    # RSA 2048, installed for nginx with a reload command (base64, as acme.sh stores it)
    a_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    a_cert = _issue(["a.test", "www.a.test"], a_key, (ca_cert, ca_key))
    a_conf = "\n".join(
        [
            "Le_Domain='a.test'",
            "Le_Alt='www.a.test'",
            "Le_Webroot='/var/www/a'",
            "Le_PreHook=''",
            "Le_Keylength='2048'",
            f"Le_API='{API}'",
            f"Le_RealCertPath='{install}/a.test.cer'",
            f"Le_RealCACertPath='{install}/ca.cer'",
            f"Le_RealKeyPath='{install}/a.test.key'",
            f"Le_RealFullChainPath='{install}/a.test.fullchain.cer'",
            f"Le_ReloadCmd='{_b64(f'echo reloaded >> {hook_log}')}'",
            "Le_NextRenewTime='1800000000'",
            "",
        ]
    )
    _domain_dir(home, "a.test", "a.test", a_cert, _key_pem(a_key), ca_pem, a_conf)
    (install / "a.test.cer").write_bytes(a_cert)
    (install / "ca.cer").write_bytes(ca_pem)
    (install / "a.test.fullchain.cer").write_bytes(a_cert + ca_pem)
    (install / "a.test.key").write_bytes(_key_pem(a_key))
    (install / "a.test.key").chmod(0o600)

    # ECDSA P-256 in <domain>_ecc, dns-01 through a dns plugin, no install paths
    b_key = ec.generate_private_key(ec.SECP256R1())
    b_cert = _issue(["b.test"], b_key, (ca_cert, ca_key))
    b_conf = (
        "Le_Domain='b.test'\nLe_Alt='no'\nLe_Webroot='dns_cf'\nLe_Keylength='ec-256'\n"
        f"Le_API='{API}'\nLe_DeployHook='haproxy,'\n"
    )
    _domain_dir(home, "b.test_ecc", "b.test", b_cert, _key_pem(b_key), ca_pem, b_conf)
    return Layout(home, install, tmp_path / "inventory", ca_pem)


def _run(inv: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)
    return res.exit_code, res.output


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_import_acmesh_layout_built_by_test_then_no_changes(layout_built_by_test: Layout) -> None:
    lay = layout_built_by_test
    before = {**_digests(lay.home), **_digests(lay.install)}
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home))
    assert code == 0, out
    (written,) = lay.inv.glob("adopted-*.yaml")
    doc = yaml.safe_load(written.read_text())
    a, b = doc["certificates"]["a.test"], doc["certificates"]["b.test"]
    assert (a["common_name"], a["sans"]) == ("a.test", ["www.a.test"])
    assert a["key"] == {"type": "rsa", "size": 2048}
    assert b["key"] == {"type": "ecdsa", "curve": "P-256"} and "sans" not in b
    ia, ib = doc["issuers"][a["issuer"]], doc["issuers"][b["issuer"]]
    assert ia["directory"] == ib["directory"] == API
    assert ia["challenge"] == {"type": "http-01", "webroot": {"path": "/var/www/a"}}
    assert ib["challenge"]["type"] == "dns-01"  # a placeholder hook, with a note
    assert "NOTE: acme.sh answered dns-01 with 'dns_cf'" in written.read_text()
    assert "acme.sh deploy hook(s) 'haproxy'" in written.read_text().replace("\n  # ", " ")
    ta = doc["targets"][a["targets"][0]]
    assert ta == {
        "type": "command",
        "root": str(lay.install),
        "cert_path": "a.test.cer",
        "chain_path": "ca.cer",
        "key_path": "a.test.key",
        "fullchain_path": "a.test.fullchain.cer",
        "validate": [],
        "reload": [
            "env",
            f"CERT_PATH={lay.install}/a.test.cer",
            f"CERT_KEY_PATH={lay.install}/a.test.key",
            f"CA_CERT_PATH={lay.install}/ca.cer",
            f"CERT_FULLCHAIN_PATH={lay.install}/a.test.fullchain.cer",
            "Le_Domain=a.test",
            "sh",
            "-c",
            f"echo reloaded >> {lay.install.parent.parent / 'reload.log'}",
        ],
    }
    tb = doc["targets"][b["targets"][0]]
    assert tb["type"] == "file" and tb["root"] == str(lay.home / "b.test_ecc")

    code, out = _run(lay.inv, "plan", "--detailed-exitcode")
    assert code == 0, out
    # the same bytes everywhere; only the domains' confs renamed (out of acme.sh's cron)
    after = {**_digests(lay.home), **_digests(lay.install)}
    assert {k.removesuffix(".certctl-imported"): v for k, v in after.items()} == before

    # in the renewal window the plan renews through the emitted issuer
    eng = Engine(lay.inv, clock=lambda: datetime.now(UTC) + timedelta(days=80))
    try:
        plan, _ = eng.plan()
        renews = {a.cert: a.details["issuer"] for a in plan.actions if a.kind is ActionKind.RENEW}
        assert renews == {"a.test": a["issuer"], "b.test": b["issuer"]}
    finally:
        eng.close()


def test_acmesh_hostile_configuration_refuses_only_that_domain(
    layout_built_by_test: Layout,
) -> None:
    lay = layout_built_by_test
    conf = lay.home / "b.test_ecc" / "b.test.conf"
    conf.write_text(conf.read_text() + "Le_Alt='other.test'\n")  # names disagree
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home))
    assert code == 1, out
    assert "b.test.conf:" in out and "Le_Domain/Le_Alt" in out
    assert "adopted a.test" in out and "adopted b.test" not in out
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0

    conf.write_bytes(b"Le_Domain='b.test'\nLe_Keylength='ec-256\nLe_API='x'\n")
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home), "--domain", "b.test")
    assert code == 1 and "b.test.conf:2: unterminated quoted value" in out, out
    conf.write_bytes(b"Le_Domain='b.test'\nLe_API='\xff'\n")
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home), "--domain", "b.test")
    assert code == 1 and "b.test.conf:2: not UTF-8" in out, out
    # a key that is not the certificate's (a.test given back to acme.sh first)
    (lay.home / "a.test" / "a.test.conf.certctl-imported").rename(
        lay.home / "a.test" / "a.test.conf"
    )
    (lay.home / "a.test" / "a.test.key").write_bytes(
        _key_pem(ec.generate_private_key(ec.SECP256R1()))
    )
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home), "--prefix", "x-")
    assert code == 1 and "is not the private key of the certificate" in out, out
    assert "PRIVATE KEY" not in out


def test_rsa_and_ecc_certificates_of_one_domain_get_distinct_names(
    layout_built_by_test: Layout,
) -> None:
    lay = layout_built_by_test
    ca_cert = x509.load_pem_x509_certificate(lay.ca_pem)
    # the CA key is not kept: a self-issued stand-in for the ECC twin is enough here
    key = ec.generate_private_key(ec.SECP384R1())
    cert = _issue(["a.test", "www.a.test"], key, (ca_cert, key))
    conf = f"Le_Domain='a.test'\nLe_Alt='www.a.test'\nLe_Keylength='ec-384'\nLe_API='{API}'\n"
    _domain_dir(lay.home, "a.test_ecc", "a.test", cert, _key_pem(key), lay.ca_pem, conf)
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home), "--domain", "a.test")
    assert code == 0, out
    (written,) = lay.inv.glob("adopted-*.yaml")
    doc = yaml.safe_load(written.read_text())
    assert sorted(doc["certificates"]) == ["a.test", "a.test-2"]
    assert doc["certificates"]["a.test-2"]["key"] == {"type": "ecdsa", "curve": "P-384"}
    assert len(doc["targets"]) == 2
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0


def test_reload_command_gets_acme_sh_variables_naming_the_deployed_files(
    layout_built_by_test: Layout, tmp_path: Path
) -> None:
    """acme.sh runs Le_ReloadCmd with CERT_PATH, CERT_KEY_PATH, CA_CERT_PATH,
    CERT_FULLCHAIN_PATH and Le_Domain exported (e.g. `cat "$CERT_KEY_PATH"
    "$CERT_FULLCHAIN_PATH" > haproxy.pem`); the emitted reload must set them, to the
    files certctl deploys (the install paths), or the command builds a broken file."""
    import subprocess

    lay = layout_built_by_test
    out = tmp_path / "env.txt"
    cmd = f'echo "$CERT_PATH|$CERT_KEY_PATH|$CA_CERT_PATH|$CERT_FULLCHAIN_PATH|$Le_Domain" > {out}'
    conf = lay.home / "a.test" / "a.test.conf"
    lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("Le_ReloadCmd=")]
    conf.write_text("\n".join([*lines, f"Le_ReloadCmd='{_b64(cmd)}'", ""]))
    code, text = _run(lay.inv, "import", "acme.sh", str(lay.home), "--domain", "a.test")
    assert code == 0, text
    eng = Engine(lay.inv)
    try:
        (placement,) = eng.inventory().certificates["a.test"].placements
        reload = list(placement.config["reload"])
    finally:
        eng.close()
    subprocess.run(reload, check=True, timeout=30, env={"PATH": "/usr/bin:/bin"})
    i = lay.install
    assert out.read_text().strip() == (
        f"{i}/a.test.cer|{i}/a.test.key|{i}/ca.cer|{i}/a.test.fullchain.cer|a.test"
    )
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0


def test_directory_name_cannot_inject_yaml_through_the_header_comment(
    layout_built_by_test: Layout, tmp_path: Path
) -> None:
    """The header comment quotes the imported directory; a newline in that path must
    not end the comment and start inventory YAML."""
    lay = layout_built_by_test
    odd = tmp_path / "acme\nhosts: {injected: {address: 192.0.2.1}}\n#"
    lay.home.rename(odd)
    code, out = _run(lay.inv, "import", "acme.sh", str(odd), "--domain", "a.test")
    assert code == 0, out
    (written,) = lay.inv.glob("adopted-*.yaml")
    assert "hosts" not in yaml.safe_load(written.read_text())
    eng = Engine(lay.inv)
    try:
        assert "injected" not in eng.inventory().hosts
    finally:
        eng.close()


def test_missing_install_file_refuses_only_that_domain(layout_built_by_test: Layout) -> None:
    lay = layout_built_by_test
    (lay.install / "ca.cer").unlink()  # removed after acme.sh --install-cert
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home))
    assert code == 1, out
    assert f"{lay.install / 'ca.cer'}" in out and "No such file" in out, out
    assert "adopted b.test" in out and "adopted a.test" not in out
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0


def test_imported_domains_are_taken_from_acme_sh_cron(layout_built_by_test: Layout) -> None:
    """acme.sh --cron renews every <domain>/<domain>.conf it finds; left in place it
    would renew and reinstall what certctl now renews (two renewers fight). Like
    certbot's renewal conf, an imported domain's conf is renamed; a refused one stays."""
    lay = layout_built_by_test
    (lay.home / "b.test_ecc" / "b.test.key").write_bytes(b"not a key")  # b is refused
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home))
    assert code == 1 and "adopted a.test" in out, out
    assert not (lay.home / "a.test" / "a.test.conf").exists()
    assert (lay.home / "a.test" / "a.test.conf.certctl-imported").is_file()
    assert (lay.home / "b.test_ecc" / "b.test.conf").is_file()
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0


def test_relative_ca_bundle_is_emitted_as_the_file_meant(
    layout_built_by_test: Layout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issuer resolves a relative ca_bundle against the inventory directory; the
    operator typed it relative to where they stand."""
    lay = layout_built_by_test
    (tmp_path / "private-ca.pem").write_bytes(lay.ca_pem)
    monkeypatch.chdir(tmp_path)
    code, out = _run(
        lay.inv,
        "import",
        "acme.sh",
        str(lay.home),
        "--domain",
        "a.test",
        "--dry-run",
        "--ca-bundle",
        "private-ca.pem",
    )
    assert code == 0, out
    doc = yaml.safe_load(out[out.index("issuers:") :])
    (issuer,) = doc["issuers"].values()
    assert issuer["ca_bundle"] == str(tmp_path / "private-ca.pem")


def test_stale_install_path_refuses_only_that_domain(layout_built_by_test: Layout) -> None:
    """An install path that no longer holds the certificate (a failed --install-cert,
    a hand copy) refuses that domain, not the whole import."""
    lay = layout_built_by_test
    (lay.install / "a.test.fullchain.cer").write_bytes(lay.ca_pem)
    code, out = _run(lay.inv, "import", "acme.sh", str(lay.home))
    assert code == 1, out
    assert "a.test.fullchain.cer does not hold the adopted certificate" in out, out
    assert "adopted b.test" in out and "adopted a.test" not in out
    assert _run(lay.inv, "plan", "--detailed-exitcode")[0] == 0

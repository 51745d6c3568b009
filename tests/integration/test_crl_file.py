"""The local CA's ``crl_file`` and ``certctl crl``, with the real ``certctl`` command
(a subprocess) and ``openssl crl -verify`` as the relying party, on both backends.

The CA certificate the relying party trusts is read from the state (never the key).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from certctl.engine import Engine
from certctl.errors import PermanentError
from certctl.model import VersionRecord
from certctl_connectors.issuers.local_ca import LocalCAIssuer
from tests.conformance import StandInVault
from tests.integration.test_local_ca import ROOT_ONLY, ctx, issue, request

INVENTORY = """
defaults:
  issuer: ca
  profile: tls
  ttl: 30d
  key: {type: ecdsa, curve: P-256}
issuers:
  ca:
    type: local_ca
    root: {common_name: CRL File Root CA, key: {type: ecdsa, curve: P-256}}
    crl_file: pki/crl/ca.crl
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d}
targets:
  files:
    type: file
    root: out
    cert_path: "{{ cert.name }}/cert.pem"
certificates:
  www: {common_name: www.crl.test, targets: [files]}
  api: {common_name: api.crl.test, targets: [files]}
  old: {common_name: old.crl.test, targets: [files], revoke_on_remove: true}
"""


class Inv:
    def __init__(self, root: Path, state: str | None) -> None:
        self.root = root
        self.dir = root / "inventory"
        self.dir.mkdir()
        (self.dir / "certctl.yaml").write_text(INVENTORY, encoding="utf-8")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
        if state is not None:
            self.env["CERTCTL_STATE"] = state
        self.state = state

    @property
    def crl_file(self) -> Path:
        return self.dir / "pki" / "crl" / "ca.crl"

    def certctl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "certctl", "-i", str(self.dir), *args],
            capture_output=True,
            env=self.env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        r = self.certctl(*args)
        assert r.returncode == 0, r.stderr.decode()
        return r

    def ca_pem(self) -> Path:
        engine = Engine(inventory_path=self.dir, state_url=self.state)
        try:
            pem = engine.store().get("ca", "root/cert.pem")
        finally:
            engine.close()
        assert pem is not None
        path = self.root / "ca.pem"
        path.write_bytes(pem)
        return path

    def serial(self, name: str) -> int:
        pem = (self.dir / "out" / name / "cert.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem).serial_number

    def openssl_crl(self, path: Path, inform: str = "DER") -> tuple[str, set[int]]:
        """openssl's text of the CRL (after it verified the signature) and its serials."""
        proc = subprocess.run(
            ["openssl", "crl", "-inform", inform, "-in", str(path), "-CAfile",
             str(self.ca_pem()), "-verify", "-noout", "-text"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "verify OK" in proc.stderr + proc.stdout
        serials = {int(m, 16) for m in re.findall(r"Serial Number: ([0-9A-Fa-f]+)", proc.stdout)}
        return proc.stdout, serials


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def inv(request: pytest.FixtureRequest, tmp_path: Path) -> Inv:
    state = None
    if request.param == "postgres":
        make_pg_db: Callable[[], str] = request.getfixturevalue("make_pg_db")
        state = make_pg_db()
    i = Inv(tmp_path, state)
    i.ok("apply", "--auto-approve")
    return i


def test_revoke_writes_a_crl_file_openssl_verifies(inv: Inv) -> None:
    assert not inv.crl_file.exists()  # nothing revoked yet: nothing published
    r = inv.ok("revoke", "www", "--reason", "keyCompromise", "--yes")
    assert b"FAILED" not in r.stderr
    text, serials = inv.openssl_crl(inv.crl_file)
    assert serials == {inv.serial("www")}
    assert "Key Compromise" in text
    assert oct(inv.crl_file.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in inv.crl_file.parent.iterdir()] == ["ca.crl"]  # no temps left
    first = x509.load_der_x509_crl(inv.crl_file.read_bytes())

    # `certctl crl`: the same CRL (nothing changed since), to stdout or to a file
    out = inv.ok("crl", "ca")
    assert out.stdout == inv.crl_file.read_bytes()
    assert b"1 revoked" in out.stderr and str(inv.crl_file).encode() in out.stderr
    pem = inv.root / "ca.pem.crl"
    inv.ok("crl", "ca", "--pem", "--out", str(pem))
    assert pem.read_bytes().startswith(b"-----BEGIN X509 CRL-----")
    assert inv.openssl_crl(pem, "PEM")[1] == {inv.serial("www")}

    # a file deleted (or never written by a killed run) is written again by `certctl crl`
    inv.crl_file.unlink()
    inv.ok("crl", "ca", "--out", str(inv.root / "again.crl"))
    assert inv.crl_file.read_bytes() == (inv.root / "again.crl").read_bytes()

    # apply revoking what the inventory removed (revoke_on_remove) rewrites it too
    www_serial = inv.serial("www")
    old_serial = inv.serial("old")
    yaml = (inv.dir / "certctl.yaml").read_text(encoding="utf-8")
    yaml = yaml.replace(
        "  old: {common_name: old.crl.test, targets: [files], revoke_on_remove: true}\n", ""
    )
    (inv.dir / "certctl.yaml").write_text(yaml, encoding="utf-8")
    inv.ok("apply", "--auto-approve")
    _, serials = inv.openssl_crl(inv.crl_file)
    assert serials == {www_serial, old_serial}
    second = x509.load_der_x509_crl(inv.crl_file.read_bytes())
    number = x509.CRLNumber
    assert (
        second.extensions.get_extension_for_class(number).value.crl_number
        > first.extensions.get_extension_for_class(number).value.crl_number
    )
    assert inv.serial("api") not in serials


def test_crl_command_errors(tmp_path: Path) -> None:
    i = Inv(tmp_path, None)
    i.ok("apply", "--auto-approve")
    r = i.certctl("crl", "nope")
    assert r.returncode == 1 and b"unknown issuer 'nope'" in r.stderr


def test_crl_file_must_stay_under_the_inventory_root(tmp_path: Path) -> None:
    i = Inv(tmp_path, None)
    yaml = (i.dir / "certctl.yaml").read_text(encoding="utf-8")
    for bad in ("../escape.crl", "/etc/escape.crl", "pki/../../escape.crl", "~/x.crl"):
        (i.dir / "certctl.yaml").write_text(
            yaml.replace("crl_file: pki/crl/ca.crl", f"crl_file: {bad!r}"), encoding="utf-8"
        )
        r = i.certctl("validate")
        assert r.returncode == 1, bad
        assert b"crl_file" in r.stderr and b"relative to the inventory root" in r.stderr, bad
    # a symlink below the root that points outside is refused when writing
    (i.dir / "certctl.yaml").write_text(yaml, encoding="utf-8")
    outside = tmp_path / "outside"
    outside.mkdir()
    (i.dir / "pki").symlink_to(outside, target_is_directory=True)
    i.ok("apply", "--auto-approve")
    r = i.certctl("revoke", "www", "--yes")
    assert r.returncode == 1
    assert b"FAILED to publish" in r.stderr and b"symlink" in r.stderr
    assert b"Revoked www" in r.stdout  # the revocation itself stands
    assert list(outside.iterdir()) == []


def test_confined_path_and_after_run_with_the_issuer_alone(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="escapes"):
        LocalCAIssuer("ca", {**ROOT_ONLY, "crl_file": "a/../../b"}, ctx(tmp_path))
    vault = StandInVault()
    ca = LocalCAIssuer("ca", {**ROOT_ONLY, "crl_file": "crl/ca.crl"}, ctx(tmp_path, vault))
    assert ca.crl_path == tmp_path / "crl" / "ca.crl"
    ca.after_run()
    assert not ca.crl_path.exists()  # nothing revoked: nothing to publish
    req = request(("h.test",))
    issued = issue(ca, req)
    version = VersionRecord(
        req.cert.name, 1, issued.serial, issued.not_before, issued.not_after,
        issued.fingerprint, "ca", "ecdsa-p256", req.cert.names, "",
    )  # fmt: skip
    asyncio.run(ca.revoke(version, "superseded"))
    ca.after_run()
    crl = x509.load_der_x509_crl(ca.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None
    mtime = ca.crl_path.stat().st_mtime_ns
    ca.after_run()  # nothing new: not rewritten
    assert ca.crl_path.stat().st_mtime_ns == mtime
    # a resumed revocation (already recorded) still republishes a lost file
    ca.crl_path.unlink()
    asyncio.run(ca.revoke(version, "superseded"))
    ca.after_run()
    assert ca.crl_path.read_bytes() == ca.crl()

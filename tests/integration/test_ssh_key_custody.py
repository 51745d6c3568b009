"""``key_custody: target``: the key is made on the host over SSH, only the CSR comes back.

Real parts: OpenSSH's sshd and nginx on loopback (:mod:`tests.integration.ssh_support`),
the host's ``openssl``, the local CA, the SQLite state store and the ``certctl`` CLI
(for the SIGKILL crash test). The sshd runs on this machine, so the tests read the key
the host made straight from disk to compare it with what nginx serves.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certctl import pki
from certctl.engine import Engine
from certctl.errors import InventoryError
from certctl.model import KeySpec, Placement
from certctl.plan.planner import PlanOptions
from certctl.plan.render import render_text
from certctl_connectors.targets.ssh import ServiceTarget
from tests.integration.ssh_support import Nginx, Sshd
from tests.integration.test_ssh_target import ctx, probe, run, write_inventory


def custody_inventory(inv: Path, sshd: Sshd, nginx: Nginx, rotation: str = "always") -> None:
    write_inventory(inv, sshd, nginx)
    text = (inv / "inventory.yaml").read_text()
    text = text.replace(
        "key: {type: ecdsa, curve: P-256}",
        f"key: {{type: ecdsa, curve: P-256, custody: target, rotation: {rotation}}}",
    )
    assert "custody: target" in text
    (inv / "inventory.yaml").write_text(text)


def spki(obj: object) -> bytes:
    return obj.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def host_key_spki(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return spki(key.public_key())


def served_cert(engine: Engine) -> x509.Certificate:
    cur = engine.store().snapshot().certs["web"].current
    assert cur is not None
    cert_pem, _chain, key_pem = engine.store().material("web", cur.version)
    assert key_pem is None  # certctl holds no key for this certificate
    return pki.load_cert_pem(cert_pem)


def key_body(path: Path) -> bytes:
    """The base64 body of a PEM key: what a leak into a file would contain."""
    lines = path.read_bytes().splitlines()
    return b"".join(line for line in lines if not line.startswith(b"-----"))


def assert_not_in_state(inv: Path, *keys: Path) -> None:
    blobs = [p.read_bytes() for p in (inv / ".certctl").rglob("*") if p.is_file()]
    for k in keys:
        body = key_body(k)
        der = serialization.load_pem_private_key(k.read_bytes(), None).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for blob in blobs:
            assert body[:40] not in blob and der[-32:] not in blob


def test_key_made_on_host_nginx_serves_it_and_renewal_rotates_it(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx)
    key_file = nginx.certdir / "web.key"
    initial_key = key_file.read_bytes()
    engine = Engine(inv, sync_mode="none")
    try:
        plan, _ = engine.plan()
        issue = plan.actions[0]
        assert issue.details["key_custody"] == "target" and issue.details["key_on"] == "edge@box"
        assert "issue web (key made on edge@box)" in render_text(plan)
        _, report = engine.apply()
        assert report is not None and not report.failed, report.failed
        cert = served_cert(engine)
        assert probe(nginx.port) == pki.fingerprint(cert)  # nginx serves it
        assert spki(cert.public_key()) == host_key_spki(key_file)  # for the host's key
        assert key_file.read_bytes() != initial_key
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert (nginx.certdir / "web.key.bak.1").read_bytes() == initial_key
        assert not [n for n in os.listdir(nginx.certdir) if ".certctl-" in n]
        snap = engine.store().snapshot().certs["web"].current
        assert snap is not None and snap.key_custody == "target"
        assert engine.plan()[0].actions == ()  # observe compares public halves on the host

        first_key = key_file.read_bytes()
        _, report = engine.apply(options=PlanOptions(force=frozenset({"web"})))
        assert report is not None and not report.failed, report.failed
        renewed = served_cert(engine)
        assert renewed.serial_number != cert.serial_number
        assert probe(nginx.port) == pki.fingerprint(renewed)
        assert spki(renewed.public_key()) == host_key_spki(key_file)
        assert key_file.read_bytes() != first_key  # rotation always: a new key
        assert (nginx.certdir / "web.key.bak.1").read_bytes() == first_key
        assert engine.plan()[0].actions == ()
    finally:
        engine.close()
    assert_not_in_state(inv, key_file, nginx.certdir / "web.key.bak.1")


def test_rotation_never_reuses_the_hosts_key(tmp_path: Path, sshd: Sshd, nginx: Nginx) -> None:
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx, rotation="never")
    key_file = nginx.certdir / "web.key"
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None and not report.failed, report.failed
        first = served_cert(engine)
        key = key_file.read_bytes()
        _, report = engine.apply(options=PlanOptions(force=frozenset({"web"})))
        assert report is not None and not report.failed, report.failed
        renewed = served_cert(engine)
        assert renewed.serial_number != first.serial_number
        assert key_file.read_bytes() == key  # the same key, a new CSR from it
        assert spki(renewed.public_key()) == spki(first.public_key())
        assert probe(nginx.port) == pki.fingerprint(renewed)
    finally:
        engine.close()


def test_failed_validation_keeps_old_key_live_and_new_key_pending_for_the_rerun(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx)
    key_file = nginx.certdir / "web.key"
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None and not report.failed
        served = probe(nginx.port)
        live_key = key_file.read_bytes()
        nginx.extra.write_text("this_is_not_a_directive on;\n")  # `nginx -t` now fails
        _, report = engine.apply(options=PlanOptions(force=frozenset({"web"})))
        assert report is not None
        (failed,) = report.failed
        assert "validate failed" in (failed.error or "")
        assert "PRIVATE KEY" not in (failed.error or "")
        assert key_file.read_bytes() == live_key  # the old pair is still live
        assert probe(nginx.port) == served
        pending = nginx.certdir / ".web.key.certctl-pending"
        new_cert = served_cert(engine)
        assert spki(new_cert.public_key()) == host_key_spki(pending)

        nginx.extra.write_text("")  # fixed: the rerun deploys the pending key with its cert
        _, report = engine.apply()
        assert report is not None and not report.failed, report.failed
        assert spki(new_cert.public_key()) == host_key_spki(key_file)
        assert probe(nginx.port) == pki.fingerprint(new_cert)
        assert not pending.exists()
    finally:
        engine.close()


CLI_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}


def cli(
    inv: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(inv), *args],
        capture_output=True,
        text=True,
        env={**CLI_ENV, **(env or {})},
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize(
    "failpoint", ["before_target_keygen", "after_target_keygen", "after_issue"]
)
def test_sigkill_around_key_generation_never_makes_two_keys(
    tmp_path: Path, sshd: Sshd, nginx: Nginx, failpoint: str
) -> None:
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx)
    key_file = nginx.certdir / "web.key"
    initial = key_file.read_bytes()
    pending = nginx.certdir / ".web.key.certctl-pending"
    r = cli(inv, "apply", "--auto-approve", env={"CERTCTL_FAILPOINTS": f"{failpoint}=1"})
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    assert key_file.read_bytes() == initial  # nothing live changed
    made = pending.read_bytes() if pending.exists() else None
    assert (made is None) == (failpoint == "before_target_keygen")
    r = cli(inv, "apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    if made is not None:
        assert key_file.read_bytes() == made  # the key the killed run made, not another
    with sqlite3.connect(inv / ".certctl" / "state.db") as db:
        (versions,) = db.execute(
            "SELECT COUNT(*) FROM certificate_versions WHERE cert = 'web'"
        ).fetchone()
        (keys,) = db.execute(
            "SELECT (SELECT COUNT(*) FROM journal WHERE key_enc IS NOT NULL)"
            " + (SELECT COUNT(*) FROM certificate_versions WHERE key_enc IS NOT NULL)"
        ).fetchone()
    assert versions == 1 and keys == 0
    engine = Engine(inv, sync_mode="none")
    try:
        cert = served_cert(engine)
        assert spki(cert.public_key()) == host_key_spki(key_file)
        assert probe(nginx.port) == pki.fingerprint(cert)
        assert engine.plan()[0].actions == ()
    finally:
        engine.close()


@pytest.mark.parametrize("where", ["local", "ssh-sudo"])
def test_generate_key_is_idempotent_and_csr_names_match(
    tmp_path: Path, sshd: Sshd, where: str
) -> None:
    """Locally (same code without SSH) and through sudo over SSH: a second call
    reuses the pending key."""
    config = {"root": str(tmp_path / "out"), "fullchain_path": "c.pem", "key_path": "k.pem"}
    if where == "local":
        placement = Placement("svc", "ssh", None, config)
    else:
        placement = Placement("svc", "ssh", "box", config, sshd.connection(sudo=True))
    target = ServiceTarget("svc", ctx(tmp_path))
    names = ["a.custody.test", "b.custody.test", "10.1.2.3"]

    async def twice() -> tuple[bytes, bytes]:
        one = await target.generate_key(placement, KeySpec(), names, reuse=False)
        two = await target.generate_key(placement, KeySpec(), names, reuse=False)
        return one, two

    one, two = run(target, twice())
    pub1 = pki.csr_public_key(one, names, key_spec_id="ecdsa-p256")
    pub2 = pki.csr_public_key(two, names, key_spec_id="ecdsa-p256")
    assert spki(pub1) == spki(pub2)
    pending = tmp_path / "out" / ".k.pem.certctl-pending"
    assert pending.stat().st_mode & 0o777 == 0o600
    assert spki(pub1) == host_key_spki(pending)
    assert not (tmp_path / "out" / "k.pem").exists()  # not live until a deploy commits
    with pytest.raises(pki.PKIError, match="names"):
        pki.csr_public_key(one, ["a.custody.test"])
    with pytest.raises(pki.PKIError, match="not ecdsa-p384"):
        pki.csr_public_key(one, names, key_spec_id="ecdsa-p384")
    rsa = run(
        target,
        target.generate_key(
            dataclasses.replace(placement, config={**config, "key_path": "r.pem"}),
            KeySpec("rsa", 2048, custody="target"),
            names[:1],
            reuse=False,
        ),
    )
    assert pki.key_spec_id(pki.csr_public_key(rsa, names[:1])) == "rsa-2048"


def test_target_custody_is_validated_at_inventory_load(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx)
    text = (inv / "inventory.yaml").read_text()
    two = text.replace("hosts: [box]", "hosts: [box, box2]").replace(
        "groups:", "  box2: {address: 127.0.0.1, vars: {ssh_port: 22}}\ngroups:"
    )
    (inv / "inventory.yaml").write_text(two)
    with pytest.raises(InventoryError, match="exactly one placement"):
        Engine(inv).inventory()
    combined = text.replace(
        'key_path: "{{ cert.name }}.key"', 'combined_path: "{{ cert.name }}.pem"'
    )
    assert combined != text
    (inv / "inventory.yaml").write_text(combined)
    with pytest.raises(InventoryError, match="key_path"):
        Engine(inv).inventory()
    (inv / "inventory.yaml").write_text(text)  # the good one loads
    assert Engine(inv).inventory().certificates["web"].key.custody == "target"


def test_renewals_never_read_a_host_key_back(
    tmp_path: Path, sshd: Any, nginx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rotating backups must not read the oldest backup (a host-made private key) to
    the controller; found in review: every renewal from the second on did."""
    import certctl.transport.ssh as transport
    from certctl.plan.planner import PlanOptions

    reads: list[tuple[str, bool]] = []
    for name in dir(transport):
        cls = getattr(transport, name)
        if isinstance(cls, type) and "read" in cls.__dict__:
            original = cls.__dict__["read"]

            async def recording_read(self: Any, path: str, _o: Any = original) -> bytes:
                data: bytes = await _o(self, path)
                reads.append((path, b"PRIVATE KEY" in data))
                return data

            monkeypatch.setattr(cls, "read", recording_read)
    assert any(
        "read" in getattr(transport, n).__dict__
        for n in dir(transport)
        if isinstance(getattr(transport, n), type)
    )
    inv = tmp_path / "inv"
    custody_inventory(inv, sshd, nginx)
    engine = Engine(inv, sync_mode="none")
    try:
        for _ in range(3):
            _, report = engine.apply(options=PlanOptions(force=frozenset({"web"})))
            assert report is not None and not report.failed
    finally:
        engine.close()
    assert [p for p, has_key in reads if has_key] == []

"""Regressions found in review, each through the real CLI (a subprocess)."""

from __future__ import annotations

import signal
import subprocess
import sys

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.e2e.conftest import Workspace, certs_yaml

WWW = "common_name: www.e2e.test\ntargets: [files]"


def leaf(ws: Workspace, name: str = "www") -> x509.Certificate:
    return x509.load_pem_x509_certificate((ws.inv / f"out/files/{name}/cert.pem").read_bytes())


def key_bytes(ws: Workspace, name: str = "www") -> bytes:
    return (ws.inv / f"out/files/{name}/key.pem").read_bytes()


def test_an_intent_made_for_an_old_spec_is_not_resumed(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    r = ws.run("apply", "--auto-approve", env={"CERTCTL_FAILPOINTS": "after_issue_intent=1"})
    assert r.code == -signal.SIGKILL
    # the user changes the key type before the rerun: the journaled P-256 key must
    # not be used for what is now an RSA certificate
    ws.write(
        "certs.yaml",
        certs_yaml({"www": WWW + "\nkey: {type: rsa, size: 3072}\nsans: [b.e2e.test]"}),
    )
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err
    cert = leaf(ws)
    assert isinstance(cert.public_key(), rsa.RSAPublicKey)
    key = serialization.load_pem_private_key(key_bytes(ws), None)
    assert key.public_key() == cert.public_key()
    with ws.db() as db:
        rows = db.execute("SELECT key_spec FROM certificate_versions").fetchall()
        open_intents = db.execute("SELECT count(*) FROM journal WHERE closed_at IS NULL")
        assert open_intents.fetchone()[0] == 0
    assert rows == [("rsa-3072",)]
    assert ws.run("plan", "--detailed-exitcode").code == 0


def test_a_revocation_killed_after_the_ca_confirmed_is_finished(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    assert ws.run("apply", "--auto-approve").code == 0
    r = ws.run(
        "revoke",
        "www",
        "--reason",
        "keyCompromise",
        "--yes",
        env={"CERTCTL_FAILPOINTS": "after_revoke=1"},
    )
    assert r.code == -signal.SIGKILL
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err
    with ws.db() as db:
        first = db.execute(
            "SELECT status, revocation_reason FROM certificate_versions WHERE version = 1"
        ).fetchone()
    assert first == ("revoked", "keyCompromise")
    assert "1 revoked" in r.out
    # the next plan replaces it
    r = ws.run("plan")
    assert "-/+ renew www  (current certificate" in r.out and "is revoked" in r.out


def test_rotation_never_does_not_reuse_a_revoked_key(workspace: Workspace) -> None:
    ws = workspace
    body = WWW + "\nkey: {type: ecdsa, curve: P-256, rotation: never}"
    ws.write("certs.yaml", certs_yaml({"www": body}))
    assert ws.run("apply", "--auto-approve").code == 0
    before = key_bytes(ws)
    assert ws.run("revoke", "www", "--reason", "keyCompromise", "--yes").code == 0
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0 and "1 renewed" in r.out, r.out + r.err
    assert key_bytes(ws) != before
    assert isinstance(leaf(ws).public_key(), ec.EllipticCurvePublicKey)


def test_relative_inventory_path_deploys(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    proc = subprocess.run(
        [sys.executable, "-m", "certctl", "-i", ".", "apply", "--auto-approve"],
        capture_output=True,
        text=True,
        cwd=ws.inv,
        env=ws.env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (ws.inv / "out/files/www/cert.pem").exists()


def test_revoke_on_remove_added_after_issuance_is_honoured(workspace: Workspace) -> None:
    ws = workspace
    other = "common_name: other.e2e.test\ntargets: [files]"
    ws.write("certs.yaml", certs_yaml({"www": WWW, "other": other}))
    assert ws.run("apply", "--auto-approve").code == 0
    ws.write("certs.yaml", certs_yaml({"www": WWW + "\nrevoke_on_remove: true", "other": other}))
    assert ws.run("apply", "--auto-approve").code == 0  # nothing to do, but flags are synced
    ws.write("certs.yaml", certs_yaml({"other": other}))
    r = ws.run("plan")
    assert "- revoke www  (removed from the inventory; revoke_on_remove is set)" in r.out


def test_usage_errors_exit_1_not_2(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    for args in (["plan", "--detailed-exitcode", "--format", "yaml"], ["plan", "--bogus"]):
        r = ws.run(*args)
        assert r.code == 1, (args, r.code)
        assert "Traceback" not in r.err
    r = ws.run("apply", str(ws.root))  # a directory, not a plan file
    assert r.code == 1 and "cannot read the plan file" in r.err and "Traceback" not in r.err


def test_saved_plan_with_force_renew_applies(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    assert ws.run("apply", "--auto-approve").code == 0
    plan_file = ws.root / "forced.json"
    r = ws.run("plan", "--force-renew", "www", "--out", str(plan_file))
    assert r.code == 0, r.err
    r = ws.run("apply", str(plan_file))
    assert r.code == 0, r.err
    assert "1 renewed" in r.out


def test_show_works_without_the_state_key(workspace: Workspace) -> None:
    """`show` prints the certificate only, so it must not need (or decrypt) the key."""
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    assert ws.run("apply", "--auto-approve").code == 0
    (ws.inv / ".certctl" / "state.key").rename(ws.root / "elsewhere.key")
    r = ws.run("show", "www")
    assert r.code == 0, r.err
    assert "www.e2e.test" in r.out and "PRIVATE KEY" not in r.out

"""The whole lifecycle through the real CLI: validate, plan, apply, change, revoke."""

from __future__ import annotations

import json
import os
import stat

from cryptography import x509

from tests.e2e.conftest import MakeCerts, Workspace, certs_yaml

WWW = """
common_name: www.e2e.test
sans: [e2e.test]
targets: [files]
"""
API = """
common_name: api.e2e.test
targets: [files]
revoke_on_remove: true
"""


def versions(ws: Workspace, cert: str) -> int:
    with ws.db() as db:
        return int(
            db.execute(
                "SELECT count(*) FROM certificate_versions WHERE cert = ?", (cert,)
            ).fetchone()[0]
        )


def test_full_lifecycle(workspace: Workspace, make_certs: MakeCerts) -> None:
    ws = workspace
    ws.write("certs.yaml", make_certs({"www": WWW, "api": API}))

    r = ws.run("validate")
    assert r.code == 0, r.err
    assert "valid: 2 certificates" in r.out

    r = ws.run("plan", "--detailed-exitcode")
    assert r.code == 2, r.err
    assert "+ issue www  (never issued)" in r.out
    assert "Plan: 2 to issue, 0 to renew, 2 to deploy, 0 to revoke, 0 to retire." in r.out

    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err + r.out
    assert "2 issued" in r.out and "2 deployed" in r.out
    leaf = (ws.root / "inventory/out/files/www/cert.pem").read_bytes()
    cert = x509.load_pem_x509_certificate(leaf)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(sans.get_values_for_type(x509.DNSName)) == ["e2e.test", "www.e2e.test"]
    key_file = ws.root / "inventory/out/files/www/key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    # the state directory is not committed with the inventory
    assert (ws.inv / ".certctl" / ".gitignore").read_text().strip() == "*"

    r = ws.run("plan", "--detailed-exitcode")
    assert r.code == 0, r.out + r.err
    assert "No changes" in r.out

    # change the SANs: renew with that reason
    ws.write(
        "certs.yaml",
        make_certs({"www": WWW.replace("[e2e.test]", "[e2e.test, m.e2e.test]"), "api": API}),
    )
    r = ws.run("plan", "--detailed-exitcode")
    assert r.code == 2
    assert "-/+ renew www  (names changed: +m.e2e.test)" in r.out
    assert "Plan: 0 to issue, 1 to renew, 1 to deploy" in r.out
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err
    assert versions(ws, "www") == 2

    # add a target: deploys the existing certificate, no reissue
    ws.write(
        "certs.yaml",
        make_certs(
            {
                "www": WWW.replace("[e2e.test]", "[e2e.test, m.e2e.test]").replace(
                    "[files]", "[files, combined]"
                ),
                "api": API,
            }
        ),
    )
    r = ws.run("plan", "--format", "json")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert [
        (a["kind"], a["cert"], a["placement"], a["reasons"][0]["code"]) for a in data["actions"]
    ] == [("deploy", "www", "combined", "new_target")]
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err
    assert versions(ws, "www") == 2
    combined = (ws.root / "inventory/out/combined/www.pem").read_bytes()
    assert combined.count(b"BEGIN CERTIFICATE") >= 1 and b"PRIVATE KEY" in combined

    # remove a certificate with revoke_on_remove: the plan revokes it
    ws.write(
        "certs.yaml",
        make_certs(
            {
                "www": WWW.replace("[e2e.test]", "[e2e.test, m.e2e.test]").replace(
                    "[files]", "[files, combined]"
                )
            }
        ),
    )
    r = ws.run("plan", "--format", "markdown", "--detailed-exitcode")
    assert r.code == 2
    assert "| - revoke | 1 |" in r.out
    r = ws.run("plan")
    assert "- revoke api  (removed from the inventory; revoke_on_remove is set)" in r.out
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err
    with ws.db() as db:
        row = db.execute(
            "SELECT status, revocation_reason FROM certificate_versions WHERE cert = 'api'"
        ).fetchone()
    assert row == ("revoked", "cessationOfOperation")
    assert ws.run("plan", "--detailed-exitcode").code == 0

    # status and show never print key material
    r = ws.run("status", "--format", "json")
    rows = {row["name"]: row for row in json.loads(r.out)}
    assert rows["www"]["version"] == 2 and rows["api"]["status"] == "retired"
    r = ws.run("show", "www")
    assert r.code == 0 and "www.e2e.test" in r.out
    for res in (r, ws.run("status"), ws.run("plan", "--format", "json")):
        assert "PRIVATE KEY" not in res.out + res.err


def test_saved_plan_applies_and_stale_plan_is_refused(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    r = ws.run("plan", "--out", str(ws.root / "p.json"))
    assert r.code == 0
    saved = (ws.root / "p.json").read_text()
    assert "PRIVATE KEY" not in saved
    # something changes between plan and apply
    ws.write("certs.yaml", certs_yaml({"www": WWW, "api": API}))
    r = ws.run("apply", str(ws.root / "p.json"))
    assert r.code == 1
    assert "stale" in r.err
    assert not (ws.root / "inventory/out").exists()  # nothing was done
    r = ws.run("plan", "--out", str(ws.root / "p2.json"))
    r = ws.run("apply", str(ws.root / "p2.json"))
    assert r.code == 0, r.err
    assert "2 issued" in r.out


def test_apply_without_tty_needs_approval(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    r = ws.run("apply")
    assert r.code == 1
    assert "--auto-approve" in r.err
    assert not (ws.root / "inventory/out").exists()


def test_renew_force_and_manual_revoke(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    assert ws.run("apply", "--auto-approve").code == 0
    r = ws.run("renew", "www")
    assert r.code == 0 and "No changes" in r.out
    r = ws.run("renew", "www", "--force")
    assert r.code == 0, r.err
    assert "1 renewed" in r.out and versions(ws, "www") == 2
    r = ws.run("revoke", "www", "--reason", "keyCompromise", "--yes")
    assert r.code == 0, r.err
    r = ws.run("plan")
    assert "is revoked" in r.out  # the next plan replaces it
    r = ws.run("revoke", "nope", "--yes")
    assert r.code == 1 and "nope" in r.err


def test_second_apply_is_refused_while_locked(workspace: Workspace) -> None:
    import subprocess
    import sys
    import time

    ws = workspace
    ws.write("certs.yaml", certs_yaml({"www": WWW}))
    assert ws.run("db", "upgrade").code == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from certctl.state import open_store;"
            "s = open_store(None, inventory_root=Path(sys.argv[1]));"
            "s.acquire_apply_lock('ci-job-42');"
            "print('locked', flush=True); time.sleep(60)",
            str(ws.inv),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=ws.env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        r = ws.run("apply", "--auto-approve")
        assert r.code == 1
        assert "ci-job-42" in r.err
        assert time.monotonic() - t0 < 30
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert ws.run("apply", "--auto-approve").code == 0

"""Regression tests from a hostile review of playbooks: ``--limit`` that would silently
select everything or nothing, a CA-compromise run that must not issue certificates that
were never issued, and a CA-compromise run killed between revocation and replacement
whose rerun must converge (real local CA, file targets, SQLite, a real SIGKILL)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from certctl.playbook import runner, spec
from tests.integration.test_playbook import block, current, fleet, unblock


def test_an_empty_limit_is_refused_not_read_as_everything(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    before = current(store)
    for limit in ("", ",", " , ", "!"):
        r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes", "--limit", limit)
        assert r.exit_code != 0 and "--limit" in r.output and "no pattern" in r.output, r.output
    assert current(store) == before  # nothing was revoked
    store.close()


def test_a_limit_matching_no_certificate_is_refused(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    before = current(store)
    r = f.cli("run", "renew-expiring", "-e", "days=90", "--limit", "cl,c9*")
    assert r.exit_code != 0 and "matches no certificate" in r.output, r.output
    assert "'cl,c9*'" in r.output
    r = f.cli("run", "renew-expiring", "-e", "days=90", "--limit", "c1,!c1", "--check")
    assert r.exit_code != 0 and "matches no certificate" in r.output, r.output
    # an exclusion alone keeps the rest (Ansible's meaning), and a match is fine
    r = f.cli("run", "renew-expiring", "-e", "days=90", "--limit", "!c1", "--check")
    assert r.exit_code == 0 and "2 certificate(s) selected" in r.output, r.output
    assert current(store) == before
    store.close()


def test_ca_compromise_does_not_issue_certificates_never_issued(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=2)
    store = f.store()
    # A certificate added to the inventory but not applied yet: nothing of it was
    # issued by the compromised CA, so the emergency run must not issue it (from
    # that CA!) either.
    f.certs["fresh"] = "common_name: fresh.pb.test, targets: [files]"
    f.write()
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes")
    assert r.exit_code == 0, r.output
    assert "2 certificate(s) selected" in r.output, r.output
    after = current(store)
    assert "fresh" not in after or after["fresh"] is None
    assert not (f.dir / "out" / "fresh").exists()
    for n in ("c1", "c2"):
        assert store.versions(n)[1].status == "revoked" and after[n].status == "active"
    store.close()


def test_ca_compromise_killed_between_revoke_and_replace_converges_on_rerun(
    tmp_path: Path,
) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    before = current(store)
    f.write(issuer="ca2")
    cmd = [sys.executable, "-m", "certctl", "-i", str(f.dir), "run", "ca-compromise",
           "-e", "issuer=ca", "--yes"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        # The canary was revoked; its replacement plan is shown: kill the run now.
        if "renew c1" in line and "is revoked" in line:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    mid = current(store)
    assert [v.status for v in store.versions("c1") if v.serial == before["c1"].serial] == [
        "revoked"
    ]
    assert mid["c2"] == before["c2"] and mid["c3"] == before["c3"]  # later batch untouched
    # The rerun finishes the job: every old version revoked once, every certificate
    # replaced from the new CA and deployed, nothing left for apply.
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes")
    assert r.exit_code == 0, r.output
    after = current(store)
    for n in before:
        assert after[n].issuer == "ca2" and after[n].status == "active"
        revoked = [v for v in store.versions(n) if v.status == "revoked"]
        assert [v.serial for v in revoked] == [before[n].serial]
        assert f.leaf(n).issuer.rfc4514_string() == "CN=Playbook Root Two"
    assert "No changes" in f.cli("plan").output
    store.close()


def test_a_failed_replacement_deploy_says_how_to_finish_and_apply_does(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    f.write(issuer="ca2")

    def echo(line: str) -> None:
        if line.startswith("  BATCH 2/"):
            block(f, "c2")  # c2's host breaks after the canary

    eng = f.engine()
    pb = spec.load("ca-compromise", {"issuer": "ca"})
    result = runner.PlaybookRunner(eng, pb, yes=True, echo=echo).run()
    eng.close()
    assert not result.ok and result.stopped is not None
    assert "c2" in result.stopped and "certctl apply" in result.stopped
    # c2's replacement is issued (from ca2) but not deployed: a rerun no longer
    # selects it (nothing is issued by ca any more) ...
    assert current(store)["c2"].issuer == "ca2"
    unblock(f, "c2")
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes")
    assert r.exit_code == 0 and "0 certificate(s) selected" in r.output, r.output
    # ... and apply, as the stop message says, finishes it.
    r = f.cli("apply", "--auto-approve")
    assert r.exit_code == 0 and "1 deployed" in r.output, r.output
    assert f.leaf("c2").issuer.rfc4514_string() == "CN=Playbook Root Two"
    assert "No changes" in f.cli("plan").output
    store.close()


def test_the_gate_message_shows_the_real_percentage(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    with socket.socket() as s:  # a port nothing listens on: c2's endpoint is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f.write(extra=f"endpoints:\n  c2-live: {{endpoint: '127.0.0.1:{port}', certificate: c2}}\n")
    book = tmp_path / "b.yaml"
    book.write_text(
        "name: gate\nsteps:\n"
        "  - {name: check, action: verify, select: {name: '*'}, max_fail_percentage: 33}\n",
        encoding="utf-8",
    )
    # 1 of 3 is 33.33%: above 33, so the run stops, and says 33.33%, not "33% > 33".
    r = f.cli("run", str(book))
    assert r.exit_code == 1 and "(33.33% > max_fail_percentage 33)" in r.output, r.output
    assert "1 failed (33.33%)" in r.output
    book.write_text(book.read_text().replace("33}", "33.34}"), encoding="utf-8")
    r = f.cli("run", str(book))
    assert "STOPPED" not in r.output and r.exit_code == 1, r.output


def test_ca_compromise_warns_when_the_replacement_comes_from_the_same_ca(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=2)
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--check")
    assert r.exit_code == 0 and "WARNING: c1, c2: the inventory still names" in r.output
    f.write(issuer="ca2")
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--check")
    assert r.exit_code == 0 and "WARNING" not in r.output, r.output

"""`certctl run` as a user runs it: the real command in a subprocess, no terminal."""

from __future__ import annotations

from tests.e2e.conftest import MakeCerts, Workspace

BAD = """name: bad
steps:
  - name: one
    action: renew
    selekt: {name: '*'}
    serial: 150%
"""


def test_run_lists_checks_refuses_bad_input_and_runs(
    workspace: Workspace, make_certs: MakeCerts
) -> None:
    workspace.write(
        "certs.yaml",
        make_certs({f"w{i}": f"common_name: w{i}.e2e.test\ntargets: [files]" for i in range(3)}),
    )
    assert workspace.run("apply", "--auto-approve").code == 0

    listed = workspace.run("run", "--list")
    assert listed.code == 0
    assert [line.split()[0] for line in listed.out.splitlines()] == [
        "ca-compromise",
        "move-issuer",
        "renew-expiring",
        "rotate-profile-keys",
        "verify-endpoints",
    ]

    def generation() -> int:
        with workspace.db() as db:
            return int(db.execute("SELECT count(*) FROM audit").fetchone()[0])

    events = generation()
    check = workspace.run("run", "ca-compromise", "-e", "issuer=ca", "--check")
    assert check.code == 0, check.err
    assert "- revoke w0  (revoked by a playbook (cACompromise))" in check.out

    (workspace.root / "bad.yaml").write_text(BAD, encoding="utf-8")
    bad = workspace.run("run", str(workspace.root / "bad.yaml"))
    assert bad.code == 1 and "Traceback" not in bad.err
    assert "bad.yaml:5:5: steps[0].selekt: unknown key 'selekt'" in bad.err
    assert "bad.yaml:6:13: steps[0].serial:" in bad.err

    missing = workspace.run("run", "ca-compromise")
    assert missing.code == 1 and "'issuer' is undefined" in missing.err

    no_tty = workspace.run("run", "ca-compromise", "-e", "issuer=ca")
    assert no_tty.code == 1 and "pass --yes" in no_tty.err
    assert generation() == events  # nothing above wrote anything

    done = workspace.run("run", "renew-expiring", "-e", "days=60", "--limit", "w1")
    assert done.code == 0, done.out + done.err
    assert "1 certificate(s) selected" in done.out and "RECAP: 1 of 1 step(s) run" in done.out
    with workspace.db() as db:
        kinds = [r[0] for r in db.execute("SELECT kind FROM runs ORDER BY id")]
    assert kinds[-2:] == ["playbook", "apply"]  # the batch's apply run inside the playbook run

"""``certctl daemon`` as a subprocess: SIGTERM mid-apply, restart, converge.

The apply is made slow with real work, not a mock: 30 certificates deployed by a
service target (type ``ssh``, local placement) whose reload command is ``sleep 0.1``,
and whose commits are serialised per host -- so the apply takes seconds and the test
can signal it while deployments are being recorded.
"""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
import time

from tests.e2e.conftest import Workspace, certs_yaml

N = 30
SLOW_TARGET = """
targets:
  slow:
    type: ssh
    root: out/slow
    fullchain_path: "{{ cert.name }}.pem"
    key_path: "{{ cert.name }}.key"
    reload: [sleep, "0.1"]
"""
QUIET = ("--interval-drift", "3600", "--interval-housekeeping", "3600")


def _setup(ws: Workspace) -> None:
    ws.write("slow.yaml", SLOW_TARGET)
    ws.write(
        "certs.yaml",
        certs_yaml(
            {f"c{i:02d}": f"common_name: c{i:02d}.e2e.test\ntargets: [slow]" for i in range(N)}
        ),
    )


def _start(ws: Workspace, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "certctl", "-i", str(ws.inv), "daemon", *args],
        cwd=ws.root,
        env=ws.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _count(ws: Workspace, sql: str) -> int:
    db = ws.inv / ".certctl" / "state.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _wait_for_deployments(ws: Workspace, proc: subprocess.Popen[str], at_least: int) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = _count(ws, "SELECT count(*) FROM deployments WHERE status = 'deployed'")
        if n >= at_least:
            return n
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the daemon deployed nothing within 60 s")


def _converged(ws: Workspace) -> None:
    """Every certificate issued exactly once and deployed; the plan is clean."""
    assert _count(ws, "SELECT count(*) FROM certificate_versions") == N
    assert _count(ws, "SELECT count(DISTINCT cert) FROM certificate_versions") == N
    assert _count(ws, "SELECT count(*) FROM deployments WHERE status = 'deployed'") == N
    assert _count(ws, "SELECT count(*) FROM journal WHERE closed_at IS NULL") == 0
    plan = ws.run("plan", "--detailed-exitcode")
    assert plan.code == 0, plan.out + plan.err
    for i in range(N):
        assert (ws.inv / "out" / "slow" / f"c{i:02d}.pem").exists()


def test_sigterm_mid_apply_stops_between_certificates_and_a_restart_converges(
    workspace: Workspace,
) -> None:
    ws = workspace
    _setup(ws)
    proc = _start(ws, "--interval-apply", "3600", "--concurrency", "2", *QUIET)
    seen = _wait_for_deployments(ws, proc, 3)
    assert seen < N  # really mid-apply
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM: stopping once the tick in flight has finished" in err
    # The certificates in flight were finished; the others were not started.
    m = re.search(r"apply: run 1: (\d+) issued, 0 renewed, (\d+) deployed", err)
    assert m, err
    issued, deployed = int(m[1]), int(m[2])
    assert seen <= issued == deployed < N
    assert f"apply: stopped early: {N - issued} certificate(s) not started" in err
    assert err.rstrip().endswith("certctl daemon stopped")
    assert _count(ws, "SELECT count(*) FROM runs WHERE kind = 'apply' AND status = 'stopped'") == 1
    assert _count(ws, "SELECT count(*) FROM certificate_versions") == issued
    assert _count(ws, "SELECT count(*) FROM journal WHERE closed_at IS NULL") == 0
    again = _start(ws, "--once")
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert f"apply: run 2: {N - issued} issued, 0 renewed, {N - issued} deployed" in err
    assert "certctl daemon started" in err and "(once)" in err
    _converged(ws)
    assert "PRIVATE KEY" not in out + err


def test_second_sigterm_exits_at_once_and_the_journal_lets_a_restart_converge(
    workspace: Workspace,
) -> None:
    ws = workspace
    _setup(ws)
    proc = _start(ws, "--interval-apply", "3600", *QUIET)
    _wait_for_deployments(ws, proc, 3)
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    head = ""
    while "SIGTERM: stopping" not in head:  # signals do not queue: wait for the first
        line = proc.stderr.readline()
        assert line, head
        head += line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    err = head + err
    assert proc.returncode == 143, err
    assert "SIGTERM again: exiting now" in err
    assert _count(ws, "SELECT count(*) FROM deployments WHERE status = 'deployed'") < N
    again = _start(ws, "--once", *QUIET)
    _, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    _converged(ws)


def test_once_with_a_failing_loop_exits_1_and_a_broken_inventory_fails_at_start(
    workspace: Workspace,
) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"a": "common_name: a.e2e.test\ntargets: [files]"}))
    ws.write(
        "endpoints.yaml",
        "endpoints:\n  gone: {endpoint: '127.0.0.1:9', sni: a.e2e.test, timeout: 1}\n",
    )
    res = ws.run("daemon", "--once")
    assert res.code == 0, res.err  # drift found is reported, not a failure of the loop
    assert "drift: Drift: 1 endpoints: 0 ok, 1 unreachable" in res.err
    assert (ws.inv / "out" / "files" / "a" / "cert.pem").exists()
    rows = ws.db().execute("SELECT detail FROM audit WHERE event = 'drift.found'").fetchall()
    assert len(rows) == 1 and "gone" in rows[0][0]
    ws.write("certs.yaml", "certificates:\n  b: {common_name: b.e2e.test, issuer: nope}\n")
    bad = ws.run("daemon", "--once")
    assert bad.code == 1
    assert "certs.yaml:2:" in bad.err and "nope" in bad.err


def _read_until(proc: subprocess.Popen[str], needle: str) -> str:
    """stderr lines up to the one holding ``needle`` (the daemon logs to stderr)."""
    assert proc.stderr is not None
    seen = ""
    while needle not in seen:
        line = proc.stderr.readline()
        assert line, f"the daemon ended before saying {needle!r}:\n{seen}"
        seen += line
    return seen


def test_watch_replans_on_change_and_watch_apply_applies(workspace: Workspace) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"a": "common_name: a.e2e.test\ntargets: [files]"}))
    proc = _start(ws, "--watch", "--watch-debounce", "0.2", "--interval-apply", "3600", *QUIET)
    try:
        _read_until(proc, "watch on change")
        _wait_for_deployments(ws, proc, 1)  # the apply loop's first tick
        two = {
            "a": "common_name: a.e2e.test\ntargets: [files]",
            "b": "common_name: b.e2e.test\ntargets: [files]",
        }
        ws.write("certs.yaml", certs_yaml(two))
        seen = _read_until(proc, "watch: inventory changed")
        assert "watch: inventory changed: Plan: 1 to issue, 0 to renew, 1 to deploy" in seen
        # A broken edit is reported with file:line; the daemon keeps running.
        ws.write("certs.yaml", "certificates:\n  c: {common_name: c.e2e.test, issuer: nope}\n")
        seen = _read_until(proc, "watch: tick failed")
        assert "certs.yaml:2:" in seen
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert not (ws.inv / "out" / "files" / "b").exists()  # --watch alone only plans

    ws.write("certs.yaml", certs_yaml({"a": "common_name: a.e2e.test\ntargets: [files]"}))
    proc = _start(
        ws, "--watch-apply", "--watch-debounce", "0.2", "--interval-apply", "3600", *QUIET
    )
    try:
        _read_until(proc, "apply: nothing to do")  # the apply loop's first tick is done
        ws.write("certs.yaml", certs_yaml(two))
        _read_until(proc, "1 issued")
        assert (ws.inv / "out" / "files" / "b" / "cert.pem").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err

"""`certctl apply --via-workers` end to end: real worker processes, a local CA, file
targets and a per-test PostgreSQL. Also the leader's apply loop (plan + enqueue) and
the clear refusal on SQLite."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from tests.e2e.conftest import MakeCerts, Workspace
from tests.e2e.worker_support import assert_issued_by_stored_ca, stop_all

CERTS = 6


def _certs(make_certs: MakeCerts) -> str:
    return make_certs(
        {f"c{i}": f"common_name: c{i}.e2e.test\ntargets: [files, combined]" for i in range(CERTS)}
    )


@contextmanager
def _workers(
    ws: Workspace, url: str, n: int, *extra: str
) -> Iterator[list[subprocess.Popen[bytes]]]:
    logs = [(ws.root / f"worker{i}.log").open("wb") for i in range(n)]
    cmd = [sys.executable, "-m", "certctl", "-i", str(ws.inv), "--state", url, "worker"]
    cmd += ["--poll", "0.2", *extra]
    procs = [
        subprocess.Popen(cmd, env=ws.env, cwd=ws.root, stdout=subprocess.DEVNULL, stderr=log)
        for log in logs
    ]
    try:
        yield procs
    finally:
        stop_all(procs, 60)
        for log in logs:
            log.close()


def _logs(ws: Workspace) -> str:
    """The workers' logs, for failure messages."""
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted(ws.root.glob("*.log"))
    )


def _queue(url: str) -> str:
    """The jobs and the leader's audit trail, for failure messages."""
    with psycopg.connect(url) as conn:
        jobs = conn.execute(
            "SELECT id, kind, state, attempts, leased_by, last_error, updated_at FROM jobs "
            "ORDER BY id"
        ).fetchall()
        audit = conn.execute(
            "SELECT at, event, detail FROM audit WHERE event LIKE 'leader.%' ORDER BY id"
        ).fetchall()
    return "\n".join(["--- jobs", *map(str, jobs), "--- leader", *map(str, audit)])


def _one(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_apply_via_workers_issues_and_deploys_each_certificate_once(
    workspace: Workspace, make_certs: MakeCerts, make_pg_db: Callable[[], str]
) -> None:
    url = make_pg_db()
    workspace.write("certs.yaml", _certs(make_certs))
    with _workers(workspace, url, 2, "--no-leader", "--kinds", "apply", "--batch", "1") as procs:
        r = workspace.run(
            "--state", url, "apply", "--via-workers", "--auto-approve", "--timeout", "120"
        )
        assert r.code == 0, r.out + r.err + _logs(workspace)
        assert f"Queued {CERTS} certificate job(s)" in r.out
        assert f"{CERTS} certificate job(s) done, 0 failed, 0 dead." in r.out
        assert all(p.poll() is None for p in procs)  # the workers keep running
        again = workspace.run("--state", url, "apply", "--via-workers", "--auto-approve")
        assert again.code == 0 and "No changes" in again.out, again.out + again.err
        listing = workspace.run("--state", url, "workers", "--format", "json")
        assert listing.code == 0, listing.err
        data = json.loads(listing.out)
        assert sorted(w["pid"] for w in data["workers"]) == sorted(p.pid for p in procs)
        assert {w["status"] for w in data["workers"]} == {"live"}
        assert data["jobs"]["done"] == CERTS and data["leader"] is None  # --no-leader
    for i in range(CERTS):
        assert (workspace.inv / "out" / "files" / f"c{i}" / "fullchain.pem").is_file()
        assert (workspace.inv / "out" / "combined" / f"c{i}.pem").is_file()
    plan = workspace.run("--state", url, "plan", "--detailed-exitcode")
    assert plan.code == 0 and "No changes" in plan.out, plan.out + plan.err
    # Issued once and deployed once each: counted in the audit log and versions.
    assert _one(url, "SELECT count(*) FROM audit WHERE event = 'issue'") == CERTS
    assert _one(url, "SELECT count(*) FROM certificate_versions") == CERTS
    assert _one(url, "SELECT count(*) FROM audit WHERE event = 'deploy'") == 2 * CERTS
    assert _one(url, "SELECT count(*) FROM jobs WHERE kind = 'apply' AND state = 'done'") == CERTS
    assert _one(url, "SELECT count(*) FROM runs WHERE status = 'ok'") >= 1
    assert _one(url, "SELECT count(*) FROM journal WHERE closed_at IS NULL") == 0
    # Two workers issued from one CA created on first use: it was created once (under
    # the workers' issuer lock), so every leaf chains to the CA the state keeps.
    assert_issued_by_stored_ca(url, workspace.inv / "out" / "files", CERTS)


def test_the_leader_plans_and_enqueues_and_the_workers_apply(
    workspace: Workspace, make_certs: MakeCerts, make_pg_db: Callable[[], str]
) -> None:
    url = make_pg_db()
    workspace.write("certs.yaml", _certs(make_certs))
    loops = ("--leader-loops", "apply", "--interval-apply", "0.5", "--leader-lease", "2")
    with _workers(workspace, url, 2, "--kinds", "apply", *loops):
        # Watch the queue (a cheap query), not `certctl plan` in a loop: each plan is a
        # process start-up that, on a loaded machine, takes CPU from the workers.
        deadline = time.monotonic() + 180
        while True:
            try:
                settled = _one(
                    url,
                    "SELECT count(*) FILTER (WHERE state = 'done') >= "
                    f"{CERTS} AND count(*) FILTER (WHERE state IN ('queued', 'leased')) = 0 "
                    "FROM jobs WHERE kind = 'apply'",
                )
            except psycopg.errors.UndefinedTable:  # the workers have not migrated yet
                settled = 0
            if settled:
                plan = workspace.run("--state", url, "plan", "--detailed-exitcode")
                if plan.code == 0:
                    break
            assert time.monotonic() < deadline, _logs(workspace) + _queue(url)
            time.sleep(0.2)
    assert _one(url, "SELECT count(*) FROM audit WHERE event = 'issue'") == CERTS
    assert _one(url, "SELECT count(*) FROM audit WHERE event = 'leader.elected'") >= 1
    assert _one(url, "SELECT count(*) FROM jobs WHERE kind = 'apply' AND state = 'done'") >= CERTS


def test_workers_refuse_sqlite_and_change_nothing(
    workspace: Workspace, make_certs: MakeCerts
) -> None:
    workspace.write("certs.yaml", _certs(make_certs))
    r = workspace.run("apply", "--via-workers", "--auto-approve")
    assert r.code == 1
    assert "apply --via-workers needs a PostgreSQL state store" in r.err
    assert "Traceback" not in r.err
    assert not (workspace.inv / "out").exists()
    w = workspace.run("worker", "--drain")
    assert w.code == 1 and "certctl worker needs a PostgreSQL state store" in w.err
    status = workspace.run("status", "--format", "json")
    assert status.code == 0 and status.out.strip() == "[]"


def test_a_worker_killed_mid_issue_loses_nothing_and_issues_nothing_twice(
    workspace: Workspace, make_certs: MakeCerts, make_pg_db: Callable[[], str]
) -> None:
    """Worker A SIGKILLs itself right after the CA signed (before the version is
    recorded); its jobs' leases expire and worker B resumes them from the journal:
    every certificate is issued once (the same serial and key) and deployed."""
    url = make_pg_db()
    workspace.write("certs.yaml", _certs(make_certs))
    env = {**workspace.env, "CERTCTL_FAILPOINTS": "after_issue=2"}
    base = [sys.executable, "-m", "certctl", "-i", str(workspace.inv), "--state", url, "worker"]
    opts = ["--no-leader", "--kinds", "apply", "--lease", "2", "--poll", "0.2"]
    with (workspace.root / "a.log").open("wb") as log:
        a = subprocess.Popen(
            [*base, *opts, "--batch", str(CERTS)], env=env, cwd=workspace.root, stderr=log
        )
        try:
            r = workspace.run(
                "--state", url, "apply", "--via-workers", "--auto-approve", "--timeout", "0"
            )
            assert f"Queued {CERTS} certificate job(s)" in r.out, r.out + r.err
            assert a.wait(timeout=120) == -signal.SIGKILL
        finally:
            if a.poll() is None:
                a.kill()
                a.wait()
    assert _one(url, "SELECT count(*) FROM jobs WHERE state = 'leased'") == CERTS
    assert _one(url, "SELECT count(*) FROM journal WHERE closed_at IS NULL") >= 1
    with (workspace.root / "b.log").open("wb") as log:
        b = subprocess.run(
            [*base, *opts, "--drain"],
            env=workspace.env,
            cwd=workspace.root,
            stderr=log,
            timeout=120,
        )
    assert b.returncode == 0, (workspace.root / "b.log").read_text()
    assert _one(url, "SELECT count(*) FROM jobs WHERE state = 'done'") == CERTS
    assert _one(url, "SELECT count(*) FROM jobs WHERE attempts = 2") == CERTS
    assert _one(url, "SELECT count(*) FROM certificate_versions") == CERTS
    assert _one(url, "SELECT count(*) FROM audit WHERE event = 'issue'") == CERTS
    assert _one(url, "SELECT count(*) FROM journal WHERE closed_at IS NULL") == 0
    # A's executor run died with it; B's reap marked it crashed.
    assert _one(url, "SELECT count(*) FROM runs WHERE status = 'running'") == 0
    assert _one(url, "SELECT count(*) FROM runs WHERE status = 'crashed'") == 1
    plan = workspace.run("--state", url, "plan", "--detailed-exitcode")
    assert plan.code == 0 and "No changes" in plan.out, plan.out + plan.err

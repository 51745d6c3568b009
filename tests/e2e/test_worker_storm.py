"""Four real `certctl worker` processes drain 10,000 jobs while one of them is killed
with SIGKILL mid-batch: every job's side effect happens exactly once (counted in
``job_effects``, not read from the jobs' status), the dead worker's leased jobs are
taken over once their lease expires, and the survivors exit cleanly (``--drain``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import psycopg

from certctl.state import open_store
from certctl.workers.queue import JobQueue, NewJob

JOBS = 10_000
LEASE_S = 2.0


def _start(url: str, inv: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    cmd = [sys.executable, "-m", "certctl", "-i", str(inv), "--state", url, "worker"]
    cmd += ["--no-leader", "--kinds", "noop", "--drain", "--batch", "100"]
    cmd += ["--lease", str(LEASE_S), "--poll", "0.1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _one(conn: psycopg.Connection[tuple[int, ...]], sql: str, *args: object) -> int:
    row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


def test_four_workers_sigkill_one_every_job_exactly_once(
    make_pg_db: Callable[[], str], tmp_path: Path
) -> None:
    url = make_pg_db()
    inv = tmp_path / "inventory"
    inv.mkdir()
    open_store(url, inventory_root=inv).close()
    with JobQueue(url, "producer") as q:
        # ~0.2 ms of "work" per job: the workers hold leases most of the time, so
        # the SIGKILL lands mid-batch.
        # Held back (run_after in an hour) until all four workers run: on a loaded
        # machine one process can take seconds longer to start than the others.
        jobs = [NewJob("noop", {"i": i, "sleep_ms": 0.2}, delay_s=3600) for i in range(JOBS)]
        ids = q.enqueue(jobs)
    assert len(ids) == JOBS
    logs = [(tmp_path / f"w{i}.log").open("wb") for i in range(4)]
    procs = [_start(url, inv, log) for log in logs]
    victim = procs[0]
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            deadline = time.monotonic() + 120
            while _one(conn, "SELECT count(*) FROM workers WHERE stopped_at IS NULL") < 4:
                assert time.monotonic() < deadline, "the workers did not start"
                assert all(p.poll() is None for p in procs), "a worker exited at start"
                time.sleep(0.05)
            conn.execute("UPDATE jobs SET run_after = now()")
            conn.execute("NOTIFY certctl_jobs")
            while _one(conn, "SELECT count(*) FROM job_effects") < JOBS // 5:
                assert time.monotonic() < deadline, "the workers made no progress"
                time.sleep(0.02)
            # Kill the victim while it holds leased jobs: freeze it, look, and only
            # kill it when the frozen victim holds some (else let it run a moment).
            pattern = f"%:{victim.pid}:%"
            held_sql = "SELECT count(*) FROM jobs WHERE state = 'leased' AND leased_by LIKE %s"
            # A statement the victim sent before it froze may still run (and commit)
            # on its server backends: look only once they are all idle. (A fixed
            # pause is not enough on a loaded machine: a completion that landed after
            # the look showed up as an "orphaned" job done by the victim.)
            busy_sql = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
                "AND state IS DISTINCT FROM 'idle'"
            )
            while True:
                victim.send_signal(signal.SIGSTOP)
                settle = time.monotonic() + 2
                while _one(conn, busy_sql, pattern) > 0 and time.monotonic() < settle:
                    time.sleep(0.002)
                if _one(conn, busy_sql, pattern) == 0 and _one(conn, held_sql, pattern) > 0:
                    break
                victim.send_signal(signal.SIGCONT)
                assert time.monotonic() < deadline, "the victim never held a lease"
                time.sleep(0.003)
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            orphaned = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM jobs WHERE state = 'leased' AND leased_by LIKE %s",
                    (pattern,),
                ).fetchall()
            ]
            for p in procs[1:]:
                assert p.wait(timeout=120) == 0, (tmp_path / "w1.log").read_text()
            effects = _one(conn, "SELECT count(*) FROM job_effects")
            distinct = _one(conn, "SELECT count(DISTINCT job_id) FROM job_effects")
            done = _one(conn, "SELECT count(*) FROM jobs WHERE state = 'done'")
            assert (effects, distinct, done) == (JOBS, JOBS, JOBS)
            assert (
                _one(conn, "SELECT count(*) FROM job_effects e JOIN jobs j ON j.id = e.job_id")
                == JOBS
            )
            # The victim's leased jobs (if its last batch was not committed) were taken
            # over by another worker on a second attempt, once.
            if orphaned:
                rows = conn.execute(
                    "SELECT job_id, worker, attempt FROM job_effects WHERE job_id = ANY(%s)",
                    (orphaned,),
                ).fetchall()
                assert len(rows) == len(orphaned)
                assert all(f":{victim.pid}:" not in str(w) for _, w, _ in rows)
                assert all(int(a) >= 2 for _, _, a in rows)
            # (A survivor starved of CPU past its lease may have had jobs taken over
            # too: more retries, still each side effect once.)
            took_over = _one(conn, "SELECT count(*) FROM jobs WHERE attempts >= 2")
            assert took_over >= len(orphaned)
            assert orphaned, "the SIGKILL landed between batches; nothing was taken over"
            # Every surviving worker did part of the work (the victim may have been
            # killed before its first batch committed).
            workers = {str(w) for (w,) in conn.execute("SELECT DISTINCT worker FROM job_effects")}
            for p in procs[1:]:
                assert any(f":{p.pid}:" in w for w in workers), workers
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

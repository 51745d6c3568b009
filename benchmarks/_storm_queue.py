"""Benchmark part: job queue throughput with 1 and with 4 ``certctl worker`` processes.

For each worker count: start the workers (real ``python -m certctl worker --no-leader
--kinds noop`` processes, idle and listening), enqueue 10,000 ``noop`` jobs in one
statement, due one second later, and measure on the database's clock from the moment
they became due to the last completion (the ``job_effects`` row each completion
writes in its own statement). Checks on the way that every job's side effect happened
exactly once. Worker start-up (interpreter + imports) is therefore not counted: it is
the queue that is measured, claim in batches of 100 (``FOR UPDATE SKIP LOCKED``) +
complete in batches.

Needs PostgreSQL on 127.0.0.1:5432 (or CERTCTL_BENCH_PG); a throwaway database is
created and dropped. Alone: ``python benchmarks/_storm_queue.py`` prints
``RESULT queue_jobs_per_s_1w=... queue_jobs_per_s_4w=...``. Target: >= 10,000 jobs/s
with 4 workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from certctl.state import open_store
from certctl.workers.queue import JobQueue, NewJob

JOBS = int(os.environ.get("CERTCTL_BENCH_QUEUE_JOBS", "10000"))
DUE_IN_S = 1.0


def _base() -> str:
    return os.environ.get("CERTCTL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432").rstrip("/")


def _start_workers(url: str, inv: Path, n: int) -> list[subprocess.Popen[bytes]]:
    cmd = [sys.executable, "-m", "certctl", "-i", str(inv), "--state", url, "worker"]
    cmd += ["--no-leader", "--kinds", "noop", "--batch", "100", "--poll", "0.02"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    return [
        subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(n)
    ]


def _wait_ready(
    conn: psycopg.Connection[object], n: int, procs: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM workers WHERE stopped_at IS NULL").fetchone()
        if row is not None and int(str(row[0])) >= n:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a worker exited before it was ready")
        time.sleep(0.05)
    raise RuntimeError(f"{n} worker(s) not ready within 120 s")


def _measure(url: str, inv: Path, n: int) -> float:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("TRUNCATE jobs, job_effects, workers")
        procs = _start_workers(url, inv, n)
        try:
            _wait_ready(conn, n, procs)
            with JobQueue(url, "bench", application_name="certctl bench") as queue:
                queue.enqueue([NewJob("noop", {"i": i}, delay_s=DUE_IN_S) for i in range(JOBS)])
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                row = conn.execute("SELECT count(*) FROM job_effects").fetchone()
                if row is not None and int(str(row[0])) >= JOBS:
                    break
                time.sleep(0.05)
            else:
                raise RuntimeError("the workers did not finish within 300 s")
            row = conn.execute(
                "SELECT count(*), count(DISTINCT job_id), "
                "EXTRACT(EPOCH FROM max(at) - (SELECT min(run_after) FROM jobs)) "
                "FROM job_effects"
            ).fetchone()
            assert row is not None
            effects, distinct, seconds = int(str(row[0])), int(str(row[1])), float(str(row[2]))
            done = conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()
            if effects != JOBS or distinct != JOBS or done is None or int(str(done[0])) != JOBS:
                raise RuntimeError(f"not exactly once: {effects} effects, {distinct} distinct")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    rate = JOBS / max(seconds, 1e-6)
    print(
        f"queue: {n} worker(s): {JOBS} jobs in {seconds:.3f} s = {rate:,.0f} jobs/s "
        f"(each side effect exactly once)",
        flush=True,
    )
    return rate


def run() -> dict[str, float]:
    base = _base()
    name = f"certctl_bench_queue_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{base}/{name}"
    try:
        with tempfile.TemporaryDirectory(prefix="certctl-bench-queue-") as tmp:
            inv = Path(tmp)
            open_store(url, inventory_root=inv).close()  # migrations (0005: the queue)
            out = {}
            for n in (1, 4):
                out[f"queue_jobs_per_s_{n}w"] = _measure(url, inv, n)
            return out
    finally:
        with psycopg.connect(f"{base}/postgres", autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    figures = run()
    print("RESULT " + " ".join(f"{k}={v:.0f}" for k, v in figures.items()), flush=True)

"""Benchmark part: work latency through pull-mode agents.

``certctl serve`` (subprocess) on PostgreSQL with the local CA, ``CERTCTL_BENCH_LAT_AGENTS``
(default 4) ``certctl agent run`` processes, each with its own state directory and one
certificate routed to it by name (a file target under a temp directory). After a
warm-up apply that issues and deploys all of them, ``CERTCTL_BENCH_LAT_JOBS`` (default
100) forced renewals run one after another, round-robin over the certificates. Each
is timed from the start of ``certctl apply`` (the engine's ``apply``, in this process:
load, plan, enqueue the job) until the agent's result is recorded as deployed (after
its verify: files read back) -- key made on the agent, CSR, issuance by the server,
deploy, report. The state is polled every 5 ms for that.

Needs PostgreSQL on 127.0.0.1:5432 (or CERTCTL_BENCH_PG); a throwaway database is
created and dropped. Alone: ``python benchmarks/_storm_latency.py`` prints the figures
as it goes and ``RESULT work_latency_s=... work_latency_p95_s=...``. Target: median
under 2 s (agents long-poll: no fixed polling interval).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

from certctl.agent.client import enroll
from certctl.agent.client_state import AgentState
from certctl.engine import Engine
from certctl.plan.planner import PlanOptions

JOBS = int(os.environ.get("CERTCTL_BENCH_LAT_JOBS", "100"))
AGENTS = int(os.environ.get("CERTCTL_BENCH_LAT_AGENTS", "4"))
POLL_S = 0.005


def _base() -> str:
    return os.environ.get("CERTCTL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432").rstrip("/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inventory(out: Path, n: int) -> str:
    hosts = "".join(f"  edge{i}: {{agent: edge{i}}}\n" for i in range(n))
    targets = "".join(
        f"  files{i}:\n    type: file\n    hosts: edge{i}\n    root: {out}/edge{i}\n"
        f'    fullchain_path: "{{{{ cert.name }}}}.pem"\n'
        f'    key_path: "{{{{ cert.name }}}}.key"\n'
        for i in range(n)
    )
    certs = "".join(
        f"  c{i}: {{common_name: c{i}.bench.test, targets: [files{i}]}}\n" for i in range(n)
    )
    return (
        "defaults: {issuer: ca, ttl: 30d, key: {type: ecdsa, curve: P-256}}\n"
        "issuers:\n  ca: {type: local_ca, root: {common_name: Latency Bench CA}}\n"
        f"hosts:\n{hosts}targets:\n{targets}certificates:\n{certs}"
    )


def _wait_deployed(engine: Engine, job_ids: list[str], timeout: float = 120) -> None:
    store = engine.store()
    deadline = time.monotonic() + timeout
    left = set(job_ids)
    while left:
        for job_id in list(left):
            rec = store.agent_job(job_id)
            if rec is not None and rec.state == "deployed":
                left.discard(job_id)
            elif rec is not None and rec.state == "dead":
                raise SystemExit(f"agent job {job_id} died: {rec.detail}")
        if not left:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"agent jobs not deployed within {timeout:g} s: {sorted(left)}")
        time.sleep(POLL_S)


def run() -> dict[str, float]:
    base = _base()
    db = f"certctl_bench_lat_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = f"{base}/{db}"
    procs: list[subprocess.Popen[bytes]] = []
    saved_key = os.environ.get("CERTCTL_STATE_KEY")
    try:
        with tempfile.TemporaryDirectory(prefix="certctl-lat-") as tmp:
            root = Path(tmp)
            inv = root / "inv"
            inv.mkdir()
            (inv / "main.yaml").write_text(_inventory(root / "out", AGENTS), encoding="utf-8")
            state_key = base64.b64encode(os.urandom(32)).decode()
            env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
            env["CERTCTL_STATE_KEY"] = state_key
            os.environ["CERTCTL_STATE_KEY"] = state_key
            cmd = [sys.executable, "-m", "certctl", "-i", str(inv), "--state", url]
            port = _free_port()
            server_url = f"http://127.0.0.1:{port}"
            serve_log = (root / "serve.log").open("wb")
            procs.append(
                subprocess.Popen(
                    [*cmd, "serve", "--port", str(port)],
                    env=env,
                    stdout=serve_log,
                    stderr=subprocess.STDOUT,
                )
            )
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{server_url}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("certctl serve did not start")
                time.sleep(0.1)
            made = subprocess.run(
                [*cmd, "agent-token", "create", "bench", "--uses", str(AGENTS)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            found = re.search(r"cctla_[A-Za-z0-9_-]+", made.stdout + made.stderr)
            if found is None:
                raise SystemExit("no agent token was printed")
            for i in range(AGENTS):
                state_dir = root / "agents" / f"edge{i}"
                asyncio.run(
                    enroll(
                        AgentState(state_dir),
                        server=server_url,
                        token=found.group(0),
                        name=f"edge{i}",
                        labels={},
                    )
                )
                log = (root / f"agent{i}.log").open("wb")
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "certctl", "agent", "run",
                         "--state-dir", str(state_dir)],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )  # fmt: skip
            print(f"  serve + {AGENTS} agents on PostgreSQL started", flush=True)

            engine = Engine(inventory_path=inv, state_url=url)
            try:
                t = time.perf_counter()
                _, report = engine.apply()
                assert report is not None and len(report.agent_jobs) == AGENTS
                _wait_deployed(engine, [j for _, _, j in report.agent_jobs])
                print(
                    f"  warm-up: {AGENTS} certificates issued and deployed through agents in "
                    f"{time.perf_counter() - t:.2f} s",
                    flush=True,
                )
                latencies: list[float] = []
                apply_s: list[float] = []
                for n in range(JOBS):
                    name = f"c{n % AGENTS}"
                    opts = PlanOptions(force=frozenset([name]), only=frozenset([name]))
                    t = time.perf_counter()
                    _, report = engine.apply(options=opts)
                    apply_s.append(time.perf_counter() - t)
                    assert report is not None and len(report.agent_jobs) == 1, report
                    _wait_deployed(engine, [report.agent_jobs[0][2]])
                    latencies.append(time.perf_counter() - t)
                    if (n + 1) % 20 == 0:
                        recent = latencies[-20:]
                        print(
                            f"  {n + 1:>4} jobs: median {statistics.median(recent):.3f} s, "
                            f"max {max(recent):.3f} s (last 20)",
                            flush=True,
                        )
                versions = sum(len(engine.store().versions(f"c{i}")) for i in range(AGENTS))
            finally:
                engine.close()
            lat = sorted(latencies)
            figures = {
                "work_latency_s": statistics.median(lat),
                "work_latency_p95_s": lat[max(0, int(len(lat) * 0.95) - 1)],
                "work_latency_max_s": lat[-1],
                "apply_s": statistics.median(apply_s),
                "jobs": float(len(lat)),
                "versions": float(versions),
            }
            print(
                f"  work latency over {len(lat)} jobs: median {figures['work_latency_s']:.3f} s, "
                f"p95 {figures['work_latency_p95_s']:.3f} s, max {lat[-1]:.3f} s "
                f"(of which apply itself: median {figures['apply_s']:.3f} s); "
                f"{versions} versions issued",
                flush=True,
            )
            return figures
    finally:
        if saved_key is None:  # the in-process engine used it; leave the caller's as it was
            os.environ.pop("CERTCTL_STATE_KEY", None)
        else:
            os.environ["CERTCTL_STATE_KEY"] = saved_key
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    figures = run()
    keys = ("work_latency_s", "work_latency_p95_s", "apply_s")
    print("RESULT " + " ".join(f"{k}={figures[k]:.4g}" for k in keys), flush=True)


if __name__ == "__main__":
    main()

"""Benchmark part: heartbeat storm against ``certctl serve`` on PostgreSQL.

5,000 agents are enrolled (their public keys bulk-inserted: enrollment speed is not
what is measured), ``certctl serve`` runs as a subprocess, and a separate driver
process sends signed ``POST /agent/v1/heartbeat`` requests (every agent in turn,
each request signed with that agent's own Ed25519 key and a fresh nonce) over
HTTP/1.1 keep-alive connections: ``CERTCTL_BENCH_HB_CONC`` connections (default 64),
each sending its next request as soon as the previous answer arrived (bounded
concurrency, no pipelining). After a 3 s warm-up the driver measures for
``CERTCTL_BENCH_HB_SECONDS`` (default 15) and prints the figures every second; the
latency is from just before the request is written to the end of the response.
``CERTCTL_BENCH_HB_PROFILE=FILE`` runs the server under cProfile (slower) into FILE.

The driver is a minimal asyncio HTTP/1.1 client (a hand-written request line and
``Content-Length`` parsing), not httpx: httpx costs ~0.5 ms of CPU per request, which
on a 2-core machine shared with the server would measure the client, not the server.

Needs PostgreSQL on 127.0.0.1:5432 (or CERTCTL_BENCH_PG); a throwaway database is
created and dropped. Alone: ``python benchmarks/_storm_heartbeat.py`` prints
``RESULT heartbeat_per_s=... heartbeat_p99_ms=...``. Target: >= 1,000 req/s with
p99 < 250 ms.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from certctl.agent import protocol as P

AGENTS = int(os.environ.get("CERTCTL_BENCH_HB_AGENTS", "5000"))
SECONDS = float(os.environ.get("CERTCTL_BENCH_HB_SECONDS", "15"))
CONC = int(os.environ.get("CERTCTL_BENCH_HB_CONC", "64"))
WARMUP = 3.0
FACTS = {"hostname": "h", "os": "linux", "arch": "x86_64", "version": "bench", "ip": "10.0.0.1"}

INVENTORY = """
issuers: {ca: {type: local_ca, root: {common_name: Heartbeat Bench CA}}}
defaults: {issuer: ca}
certificates: {}
"""


def _base() -> str:
    return os.environ.get("CERTCTL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432").rstrip("/")


def _key(i: int) -> ed25519.Ed25519PrivateKey:
    """Agent i's key, derived from its number, so the driver needs no key file."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"certctl-bench-agent-%d" % i).digest()
    )


def _agent_id(i: int) -> str:
    return hashlib.sha256(b"certctl-bench-id-%d" % i).hexdigest()[:32]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(sorted_ms: list[float], p: float) -> float:
    if not sorted_ms:
        return float("nan")
    return sorted_ms[min(len(sorted_ms) - 1, int(p / 100 * len(sorted_ms)))]


# ----------------------------------------------------------------- driver process
async def _drive(port: int, agents: int, seconds: float, conc: int) -> dict[str, float]:
    path = P.HEARTBEAT_PATH
    body = json.dumps({"facts": FACTS}).encode()
    keys = [_key(i) for i in range(agents)]
    ids = [_agent_id(i) for i in range(agents)]
    counter = 0
    lat: list[float] = []
    errors = 0
    measuring = False
    stop = False
    done_in_window = 0

    async def conn_loop() -> None:
        nonlocal counter, errors, done_in_window
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not stop:
                i = counter % agents
                counter += 1
                h = P.sign_request(keys[i], ids[i], "POST", path, body, time.time())
                head = (
                    f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    + "".join(f"{k}: {v}\r\n" for k, v in h.items())
                    + "\r\n"
                ).encode()
                t0 = time.perf_counter()
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:].strip())
                if length:
                    await reader.readexactly(length)
                t1 = time.perf_counter()
                if not status_line.startswith(b"HTTP/1.1 200"):
                    errors += 1
                    if not status_line:
                        raise ConnectionError("server closed the connection")
                if measuring:
                    lat.append((t1 - t0) * 1000.0)
                    done_in_window += 1
        finally:
            writer.close()

    tasks = [asyncio.create_task(conn_loop()) for _ in range(conc)]
    await asyncio.sleep(WARMUP)
    measuring = True
    start = time.perf_counter()
    last_n, last_t = 0, start
    while (now := time.perf_counter()) - start < seconds:
        await asyncio.sleep(1.0)
        now = time.perf_counter()
        n = done_in_window
        window = sorted(lat[last_n:])
        print(
            f"  {now - start:5.1f} s: {(n - last_n) / (now - last_t):7.0f} req/s  "
            f"p50 {_pct(window, 50):6.1f} ms  p95 {_pct(window, 95):6.1f} ms  "
            f"p99 {_pct(window, 99):6.1f} ms  "
            f"errors {errors}",
            flush=True,
        )
        last_n, last_t = n, now
    measuring = False
    elapsed = time.perf_counter() - start
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    ms = sorted(lat)
    return {
        "heartbeat_per_s": len(ms) / elapsed,
        "heartbeat_p50_ms": _pct(ms, 50),
        "heartbeat_p95_ms": _pct(ms, 95),
        "heartbeat_p99_ms": _pct(ms, 99),
        "heartbeat_errors": float(errors),
    }


# ----------------------------------------------------------------- orchestration
def _enroll_bulk(url: str, agents: int) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    facts = json.dumps(FACTS)
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY agents (id, name, public_key, labels, facts, status, enrolled_at, last_seen) "
            "FROM STDIN"
        ) as copy:
            for i in range(agents):
                raw = (
                    _key(i)
                    .public_key()
                    .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                )
                pub = base64.b64encode(raw).decode()
                copy.write_row(
                    (_agent_id(i), f"bench-{i:05d}", pub, "{}", facts, "online", now, None)
                )
        conn.execute("UPDATE agent_meta SET agents_generation = agents_generation + 1 WHERE id = 1")


def run() -> dict[str, float]:
    base = _base()
    db = f"certctl_bench_hb_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = f"{base}/{db}"
    server: subprocess.Popen[str] | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="certctl-hb-") as tmp:
            inv = Path(tmp) / "inv"
            inv.mkdir()
            (inv / "main.yaml").write_text(INVENTORY, encoding="utf-8")
            env = {**os.environ, "CERTCTL_STATE_KEY": base64.b64encode(os.urandom(32)).decode()}
            cmd = [sys.executable, "-m", "certctl", "-i", str(inv), "--state", url]
            subprocess.run([*cmd, "db", "upgrade"], check=True, env=env, capture_output=True)
            t = time.perf_counter()
            _enroll_bulk(url, AGENTS)
            print(f"  {AGENTS} agents enrolled in {time.perf_counter() - t:.1f} s", flush=True)
            port = _free_port()
            serve = [*cmd, "serve", "--port", str(port), "--agent-offline-after", "0"]
            prof = os.environ.get("CERTCTL_BENCH_HB_PROFILE")  # write a cProfile of the server
            if prof:
                serve[1:1] = ["-m", "cProfile", "-o", prof]
            server = subprocess.Popen(
                serve,
                env=env,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)
            print(
                f"  driving {CONC} keep-alive connections for {SECONDS:g} s "
                f"(after {WARMUP:g} s warm-up) from a separate process",
                flush=True,
            )
            driver = subprocess.run(
                [sys.executable, __file__, "--drive", str(port)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            lines = driver.stdout.rstrip().splitlines()
            for line in lines[:-1]:
                print(line, flush=True)
            figures: dict[str, float] = json.loads(lines[-1])
            # the heartbeats reached the database (batched flush, ~1 s)
            time.sleep(1.5)
            with psycopg.connect(url) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM agents WHERE last_seen > now() - interval '60 seconds'"
                ).fetchone()
            figures["heartbeat_agents_recorded"] = float(row[0] if row else 0)
            print(
                f"  heartbeat: {figures['heartbeat_per_s']:.0f} req/s sustained, "
                f"p50 {figures['heartbeat_p50_ms']:.1f} ms, "
                f"p95 {figures['heartbeat_p95_ms']:.1f} ms, "
                f"p99 {figures['heartbeat_p99_ms']:.1f} ms, "
                f"{figures['heartbeat_errors']:.0f} errors; "
                f"{figures['heartbeat_agents_recorded']:.0f} agents' heartbeats recorded",
                flush=True,
            )
            return figures
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--drive":
        figures = asyncio.run(_drive(int(sys.argv[2]), AGENTS, SECONDS, CONC))
        print(json.dumps(figures), flush=True)
        return
    figures = run()
    keys = ("heartbeat_per_s", "heartbeat_p50_ms", "heartbeat_p95_ms", "heartbeat_p99_ms")
    print("RESULT " + " ".join(f"{k}={figures[k]:.4g}" for k in keys), flush=True)


if __name__ == "__main__":
    main()

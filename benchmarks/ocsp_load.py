"""Benchmark: ``certctl serve`` under load (OCSP, CRL generation, read API).

* OCSP: sustained GET responses/s served from the response cache, measured by a load
  generator in its own process (raw asyncio HTTP/1.1 keep-alive clients, many
  connections) against ``certctl serve`` running as a subprocess; p50/p95/p99 latency.
* CRL: time to generate (build + sign) a CRL of 100,000 revoked entries (in memory:
  no state store involved, so it is measured once).
* Read API: ``/api/v1/certificates?limit=500`` (first page of 10,000) uncached, and
  with a matching ``If-None-Match`` (304): requests/s for each.

OCSP and the read API run once per state backend (``--state``): the embedded SQLite,
and PostgreSQL in a throwaway database created on ``--pg`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, or ``CERTCTL_BENCH_PG``) and
dropped afterwards. Each backend prints its own figures and a ``<backend>:`` summary
line. The last line is

    RESULT ocsp_per_s=... ocsp_p99_ms=... crl_100k_s=... api_page_per_s=... api_304_per_s=...

with, when both backends ran, the WORSE of the two for each figure (the lower rate,
the higher p99), so a target met by RESULT is met on both.

Usage: python benchmarks/ocsp_load.py [--state sqlite|postgres|both] [--pg URL]
       [--seconds S] [--connections N]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from certctl import pki
from certctl.engine import Engine
from certctl.model import KeySpec, SecretBytes, VersionRecord
from certctl.pki import crl as crl_pki
from certctl.server.auth import hash_token, new_token
from certctl.state.base import Batch, NewVersion

INVENTORY = """
defaults: {issuer: ca, profile: tls, ttl: 30d, key: {type: ecdsa, curve: P-256}}
issuers:
  ca:
    type: local_ca
    root: {common_name: Bench Root CA, key: {type: ecdsa, curve: P-256}, ttl: 3650d}
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d}
targets:
  files: {type: file, root: out, cert_path: "{{ cert.name }}/cert.pem",
          key_path: "{{ cert.name }}/key.pem"}
certificates:
  www: {common_name: www.bench.test, targets: [files]}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


# ------------------------------------------------------------ load generator


async def _client(
    port: int, request: bytes, until: float, lat: list[float], counts: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            status = int(head.split(b" ", 2)[1])
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            counts[0 if status in (200, 304) else 1] += 1
    finally:
        writer.close()


def _load_process(
    port: int, request: bytes, seconds: float, conns: int, out: multiprocessing.Queue[object]
) -> None:
    async def main() -> tuple[list[float], list[int]]:
        lat: list[float] = []
        counts = [0, 0]
        warm_until = time.perf_counter() + 0.5
        await asyncio.gather(
            *(_client(port, request, warm_until, [], [0, 0]) for _ in range(conns))
        )
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, request, until, lat, counts) for _ in range(conns)))
        return lat, counts

    out.put(asyncio.run(main()))


def load(port: int, request: bytes, seconds: float, conns: int) -> tuple[float, list[float], int]:
    """(responses/s, latencies in s, error responses) from a separate process."""
    q: multiprocessing.Queue[object] = multiprocessing.Queue()
    p = multiprocessing.Process(target=_load_process, args=(port, request, seconds, conns, q))
    p.start()
    lat, counts = q.get(timeout=seconds + 120)  # type: ignore[misc]
    p.join()
    return counts[0] / seconds, lat, counts[1]


# ------------------------------------------------------------------ parts


def bench_crl(n: int) -> float:
    key = pki.generate_key(KeySpec("ecdsa", 256))
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "CRL bench CA")])
    now = datetime.now(UTC)
    ca = (
        x509.CertificateBuilder(
            issuer_name=name,
            subject_name=name,
            public_key=key.public_key(),
            serial_number=1,
            not_valid_before=now,
            not_valid_after=now + timedelta(days=1),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    reasons = list(crl_pki.REASONS)
    entries = [
        crl_pki.RevokedEntry(pki.random_serial(), now - timedelta(seconds=i), reasons[i % 9])
        for i in range(n)
    ]
    t0 = time.perf_counter()
    der = crl_pki.build_crl(
        ca, key, entries, number=7, this_update=now, next_update=now + timedelta(days=7)
    )
    took = time.perf_counter() - t0
    assert len(x509.load_der_x509_crl(der)) == n
    print(f"CRL: {n} entries, {len(der) / 1e6:.1f} MB DER, generated in {took:.2f} s")
    return took


def seed_api_certs(engine: Engine, n: int) -> None:
    """Write n certificate versions straight into the state (the API only reads rows)."""
    now = datetime.now(UTC)
    versions = [
        NewVersion(
            VersionRecord(
                f"bulk-{i:05d}", 1, f"{i + 1:032x}", now, now + timedelta(days=30 + i % 60),
                "f" * 64, "other", "ecdsa-p256", (f"h{i}.bench.test",), "",
            ),
            b"-----BEGIN CERTIFICATE-----\n", b"", SecretBytes(b"k"),
        )
        for i in range(n)
    ]  # fmt: skip
    engine.store().write(Batch(versions=versions))


def ocsp_get_request(ca_pem: bytes, cert_pem: bytes, port: int) -> bytes:
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf = x509.load_pem_x509_certificate(cert_pem)
    der = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(leaf, ca, hashes.SHA1())
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    path = f"/.well-known/pki/ocsp/ca/{base64.b64encode(der).decode()}"
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()


@contextmanager
def pg_database(base_url: str) -> Iterator[str]:
    """A throwaway database on the server of ``base_url``, dropped afterwards."""
    import psycopg

    db = f"certctl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    try:
        yield f"{base_url.rsplit('/', 1)[0]}/{db}"
    finally:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def run_backend(label: str, state: str | None, args: argparse.Namespace) -> dict[str, float]:
    """OCSP and read-API figures against ``certctl serve`` on one state backend."""
    print(f"== {label}", flush=True)
    with tempfile.TemporaryDirectory(prefix="certctl-bench-") as tmp:
        inv = Path(tmp) / "inventory"
        inv.mkdir()
        (inv / "certctl.yaml").write_text(INVENTORY, encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
        if state is not None:
            env["CERTCTL_STATE"] = state
        cmd = [sys.executable, "-m", "certctl", "-i", str(inv)]
        subprocess.run([*cmd, "apply", "--auto-approve"], check=True, env=env,
                       capture_output=True)  # fmt: skip
        engine = Engine(inventory_path=inv, state_url=state)
        seed_api_certs(engine, args.api_certs)
        token = new_token()
        engine.store().create_api_key("bench", hash_token(token))
        ca_pem = engine.store().get("ca", "root/cert.pem")
        assert ca_pem is not None
        engine.close()
        cert_pem = (inv / "out" / "www" / "cert.pem").read_bytes()

        port = free_port()
        server = subprocess.Popen(
            [*cmd, "serve", "--port", str(port), "--ip-rate", "1e9", "--key-rate", "1e9",
             "--burst", "1000000000"],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1):
                        break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.1)

            req = ocsp_get_request(ca_pem, cert_pem, port)
            rate, lat, errors = load(port, req, args.seconds, args.connections)
            p50, p95, p99 = (pct(lat, p) * 1000 for p in (0.5, 0.95, 0.99))
            print(
                f"OCSP GET (cached), {args.connections} connections, {args.seconds:g} s: "
                f"{rate:.0f} responses/s, p50 {p50:.1f} ms, p95 {p95:.1f} ms, "
                f"p99 {p99:.1f} ms, {errors} errors"
            )

            auth = f"Authorization: Bearer {token}\r\n"
            page = (
                f"GET /api/v1/certificates?limit=500 HTTP/1.1\r\nHost: x\r\n{auth}\r\n"
            ).encode()
            import httpx

            first = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/certificates?limit=500",
                headers={"Authorization": f"Bearer {token}"},
            )
            assert first.status_code == 200 and len(first.json()["items"]) == 500
            etag = first.headers["etag"]
            api_rate, api_lat, api_err = load(port, page, args.seconds, 4)
            print(
                f"API page of 500 (of {args.api_certs + 1}), uncached, 4 connections: "
                f"{api_rate:.0f} req/s, p99 {pct(api_lat, 0.99) * 1000:.1f} ms, "
                f"{api_err} errors"
            )
            cond = (
                f"GET /api/v1/certificates?limit=500 HTTP/1.1\r\nHost: x\r\n{auth}"
                f"If-None-Match: {etag}\r\n\r\n"
            ).encode()
            nm_rate, nm_lat, nm_err = load(port, cond, args.seconds, 16)
            print(
                f"API page with matching ETag (304), 16 connections: {nm_rate:.0f} req/s, "
                f"p99 {pct(nm_lat, 0.99) * 1000:.1f} ms, {nm_err} errors"
            )
        finally:
            server.terminate()
            server.wait(30)
    figures = {
        "ocsp_per_s": rate,
        "ocsp_p99_ms": p99,
        "api_page_per_s": api_rate,
        "api_304_per_s": nm_rate,
    }
    print(
        f"{label}: ocsp_per_s={rate:.0f} ocsp_p99_ms={p99:.1f} "
        f"api_page_per_s={api_rate:.0f} api_304_per_s={nm_rate:.0f}",
        flush=True,
    )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--crl-entries", type=int, default=100_000)
    ap.add_argument("--api-certs", type=int, default=10_000)
    ap.add_argument("--state", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument(
        "--pg",
        default=os.environ.get("CERTCTL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL server URL (a database on it is created and dropped).",
    )
    args = ap.parse_args()

    crl_s = bench_crl(args.crl_entries)
    results: list[dict[str, float]] = []
    if args.state in ("sqlite", "both"):
        results.append(run_backend("sqlite", None, args))
    if args.state in ("postgres", "both"):
        with pg_database(args.pg) as url:
            results.append(run_backend("postgres", url, args))
    worse = {
        key: (max if key.endswith("_ms") else min)(r[key] for r in results) for key in results[0]
    }
    print(
        f"RESULT ocsp_per_s={worse['ocsp_per_s']:.0f} ocsp_p99_ms={worse['ocsp_p99_ms']:.1f} "
        f"crl_100k_s={crl_s:.2f} api_page_per_s={worse['api_page_per_s']:.0f} "
        f"api_304_per_s={worse['api_304_per_s']:.0f}"
    )


if __name__ == "__main__":
    main()

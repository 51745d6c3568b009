"""Drift probe benchmark: 2,000 TLS endpoints on loopback, probed as `certctl drift` does.

One nginx (Debian's /usr/sbin/nginx, own prefix and config in a temp directory)
listens on 4 loopback ports; the 2,000 endpoints are 500 SNI names on each
(``h0000.bench.test`` ...), all served a ``*.bench.test`` ECDSA P-256 certificate
signed by a throwaway CA. The probe is :func:`certctl.observe.drift.check` -- the
code `certctl drift` runs: TLS handshake with SNI, leaf read, parse and classify --
at the CLI's defaults (64 in flight, 2 threads) and at other settings.

Timeouts: 20 more endpoints point at a listener that accepts TCP and never answers
the handshake, with a 1 s timeout; the run checks each reports "timed out after 1s"
and that they add about one timeout to the wall time, not 20.

The PR-review figure: two inventories of 10,000 certificates (the second with 300
changed, 100 added and 100 removed) are loaded and diffed by
``certctl.review.diff_inventories`` when that module exists (else ``nan``).

Last line: ``RESULT probes_per_s=... diff_10k_s=...``.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certctl.observe import drift
from certctl.observe.probe import ProbeTarget

NGINX = "/usr/sbin/nginx"
LISTENERS = 4
ENDPOINTS = 2000
BLACKHOLED = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_certs(d: Path) -> tuple[Path, Path, str]:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*.bench.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.bench.test")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = d / "leaf.pem", d / "leaf.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file, leaf.fingerprint(hashes.SHA256()).hex()


def start_nginx(d: Path, ports: list[int], cert: Path, key: Path) -> subprocess.Popen[bytes]:
    for sub in ("logs", "tmp"):
        (d / sub).mkdir(exist_ok=True)
    tmp = d / "tmp"
    servers = "".join(
        f"  server {{ listen 127.0.0.1:{p} ssl; ssl_certificate {cert}; "
        f"ssl_certificate_key {key}; return 200 'ok'; }}\n"
        for p in ports
    )
    conf = d / "nginx.conf"
    conf.write_text(
        "daemon off;\nworker_processes 1;\n"
        f"pid {d / 'nginx.pid'};\nerror_log {d / 'logs' / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n  access_log off;\n  ssl_session_cache off;\n  ssl_session_tickets off;\n"
        f"  client_body_temp_path {tmp}/b; proxy_temp_path {tmp}/p; fastcgi_temp_path {tmp}/f;\n"
        f"  uwsgi_temp_path {tmp}/u; scgi_temp_path {tmp}/s;\n{servers}}}\n"
    )
    proc = subprocess.Popen(
        [NGINX, "-p", str(d), "-c", str(conf), "-e", str(d / "logs" / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    for p in ports:
        while True:
            try:
                socket.create_connection(("127.0.0.1", p), 1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("nginx did not start") from None
                time.sleep(0.05)
    return proc


def expectations(ports: list[int], fp: str, timeout: float) -> list[drift.Expectation]:
    return [
        drift.Expectation(
            f"h{i:04d}",
            "endpoints",
            ProbeTarget("127.0.0.1", ports[i % len(ports)], f"h{i:04d}.bench.test"),
            cert=f"h{i:04d}",
            fingerprint=fp,
            timeout=timeout,
        )
        for i in range(ENDPOINTS)
    ]


def probe_rate(exps: list[drift.Expectation], concurrency: int, threads: int) -> float:
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    found = drift.check(exps, now, concurrency=concurrency, threads=threads)
    wall = time.perf_counter() - t0
    bad = [f for f in found if f.status != drift.OK]
    if bad:
        raise SystemExit(f"{len(bad)} probes were not ok, e.g. {bad[0].detail}")
    return len(exps) / wall


def diff_10k(work: Path) -> tuple[float, str]:
    try:
        from certctl import review
    except ImportError:
        return math.nan, "certctl.review is not there yet"
    from certctl.connectors import default_registry
    from certctl.inventory import load_inventory

    base_text = (
        "issuers:\n  ca:\n    type: local_ca\n"
        "    root: {common_name: Bench Root, key: {type: ecdsa, curve: P-256}}\n"
        "defaults: {issuer: ca}\n"
        "targets:\n  files: {type: file, root: out, cert_path: '{{ cert.name }}.pem'}\n"
    )

    def write(d: Path, names: range, changed: set[int]) -> None:
        d.mkdir()
        (d / "base.yaml").write_text(base_text)
        lines = ["certificates:"]
        for i in names:
            ttl = "  ttl: 30d\n" if i in changed else ""
            lines.append(
                f"  c{i:05d}:\n    common_name: c{i:05d}.bench.test\n"
                f"    targets: [files]\n  {ttl}".rstrip()
            )
        (d / "certs.yaml").write_text("\n".join(lines) + "\n")

    write(work / "rev1", range(10_000), set())
    write(work / "rev2", range(100, 10_100), set(range(1000, 1300)))
    t0 = time.perf_counter()
    a = load_inventory(work / "rev1", default_registry(work / "rev1"))
    b = load_inventory(work / "rev2", default_registry(work / "rev2"))
    t1 = time.perf_counter()
    d = review.diff_inventories(a, b)
    t2 = time.perf_counter()
    note = f"load both {t1 - t0:.2f}s + diff {t2 - t1:.2f}s ({type(d).__name__})"
    return t2 - t0, note


def main() -> None:
    if not os.path.exists(NGINX):
        raise SystemExit(f"{NGINX} is not installed")
    work = Path(tempfile.mkdtemp(prefix="certctl-drift-bench-"))
    proc = None
    try:
        cert, key, fp = make_certs(work)
        ports = [free_port() for _ in range(LISTENERS)]
        proc = start_nginx(work, ports, cert, key)
        exps = expectations(ports, fp, timeout=5.0)
        drift.check(exps[:100], datetime.now(UTC))  # warm up
        print(
            f"{ENDPOINTS} endpoints: {LISTENERS} nginx listeners x "
            f"{ENDPOINTS // LISTENERS} SNI names, ECDSA P-256, {os.cpu_count()} CPUs"
        )
        rates = {}
        for conc, threads in ((64, 2), (64, 1), (32, 4), (128, 2)):
            rate = probe_rate(exps, conc, threads)
            rates[(conc, threads)] = rate
            print(f"  concurrency {conc:4d}, threads {threads}: {rate:7.0f} probes/s")
        default = rates[(64, 2)]
        print(f"probes/s at certctl drift's defaults (64 in flight, 2 threads): {default:.0f}")

        # Timeouts honoured: endpoints that accept TCP and never answer TLS.
        with socket.socket() as hole:
            hole.bind(("127.0.0.1", 0))
            hole.listen(BLACKHOLED + 8)
            hp = int(hole.getsockname()[1])
            silent = [
                drift.Expectation(
                    f"s{i}", "endpoints", ProbeTarget("127.0.0.1", hp, "x.test"), timeout=1.0
                )
                for i in range(BLACKHOLED)
            ]
            t0 = time.perf_counter()
            found = drift.check(exps + silent, datetime.now(UTC), concurrency=64, threads=2)
            wall = time.perf_counter() - t0
        timed_out = [f for f in found if f.detail == "timed out after 1s"]
        ok = [f for f in found if f.status == drift.OK]
        print(
            f"with {BLACKHOLED} silent endpoints (1 s timeout): {len(ok)} ok, "
            f"{len(timed_out)} timed out after 1s, wall {wall:.2f}s "
            f"(vs {ENDPOINTS / default:.2f}s without)"
        )
        if len(timed_out) != BLACKHOLED or len(ok) != ENDPOINTS:
            raise SystemExit("timeouts were not honoured")

        diff_s, note = diff_10k(work)
        print(f"diff of two 10,000-certificate revisions: {diff_s:.2f}s ({note})")
        print(f"RESULT probes_per_s={default:.0f} diff_10k_s={diff_s:.2f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

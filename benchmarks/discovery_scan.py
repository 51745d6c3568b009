"""Benchmark: discovery over the network and over the file system.

Network: a few dozen real TLS listeners (asyncio ssl servers in one child process,
see tests/integration/discovery_support.py) on addresses spread over 127.0.0.0/20,
on two ports chosen free on every address. The whole /20 (4,096 addresses) is
scanned on both ports (8,192 probes) with the defaults of ``certctl discover
network``; every listener must be found with its served chain, and nothing else.

Files: a few hundred distinct certificates (EC and RSA) written 20,000 times as a
PEM/DER mix over 40 directories, plus a key beside one certificate in each
directory; the scan (walk, sniff, read, parse, key matching) is timed, then
recording the findings in a fresh SQLite state store.

Prints each figure; the last line is

    RESULT scan_addresses_per_s=... files_per_s=... listeners_found=N/M scan_s=... files_scan_s=...

Targets: the /20 on two ports in under 10 s; at least 2,000 files/s.
Usage: python benchmarks/discovery_scan.py [--listeners 36] [--files 20000] [--distinct 300]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes, serialization

from certctl.discovery import files, network
from certctl.state.sqlite import SQLiteStore
from tests.integration.discovery_support import CA, Listener, TLSListeners, free_ports, key_pem, pem


def bench_network(work: Path, count: int) -> tuple[float, float, int]:
    ca = CA.new("Bench Root")
    ports = free_ports(2)
    listeners: list[Listener] = []
    expected: dict[str, str] = {}
    for i in range(count):
        # spread over the /20: 127.0.x.y with x in 0..15
        address = f"127.0.{(i * 7) % 16}.{(i * 37) % 254 + 1}"
        port = ports[i % 2]
        cert, key = ca.issue(f"svc{i}.bench.test")
        cf, kf = work / f"l{i}.pem", work / f"l{i}.key"
        cf.write_bytes(pem(cert) + pem(ca.cert))
        kf.write_bytes(key_pem(key))
        listeners.append(Listener(address, port, str(cf), str(kf)))
        expected[f"{address}:{port}"] = cert.fingerprint(hashes.SHA256()).hex()
    with TLSListeners(listeners):
        addresses = network.expand(["127.0.0.0/20"])
        opts = network.Options(ports=tuple(ports))
        t0 = time.perf_counter()
        res = network.scan(addresses, opts, datetime.now(UTC))
        elapsed = time.perf_counter() - t0
    found = {f.location: f.fingerprint for f in res.findings}
    ok = sum(1 for loc, fp in expected.items() if found.get(loc) == fp)
    chains = sum(1 for f in res.findings if f.chain_pem.count("BEGIN CERTIFICATE") == 2)
    extra = sorted(set(found) - set(expected))
    print(
        f"network: {len(addresses)} addresses x {len(ports)} ports = {res.probes} probes "
        f"in {elapsed:.2f}s: {len(addresses) / elapsed:.0f} addresses/s, "
        f"{res.probes / elapsed:.0f} probes/s; listeners found {ok}/{len(expected)} "
        f"(with chain: {chains}); refused {res.refused}, timed out {res.timed_out}, "
        f"problems {len(res.problems)}, unexpected {extra[:5]}",
        flush=True,
    )
    if ok != len(expected) or extra:
        print("FAILED: not every listener was found exactly", flush=True)
    return len(addresses) / elapsed, elapsed, ok


def bench_files(work: Path, n: int, distinct: int) -> tuple[float, float]:
    ca = CA.new("Bench Files Root")
    t0 = time.perf_counter()
    made = [
        ca.issue(f"f{i}.bench.test", "rsa2048" if i % 10 == 0 else "ec") for i in range(distinct)
    ]
    ders = [c.public_bytes(serialization.Encoding.DER) for c, _ in made]
    pems = [pem(c) + pem(ca.cert) for c, _ in made]
    print(
        f"files: {distinct} distinct certificates made in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    root = work / "tree"
    dirs = 40
    for d in range(dirs):
        (root / f"d{d:02}").mkdir(parents=True)
        (root / f"d{d:02}" / "server.key").write_bytes(key_pem(made[d % distinct][1]))
    t0 = time.perf_counter()
    for i in range(n):
        d = root / f"d{i % dirs:02}"
        j = i % distinct
        if i % 2:
            (d / f"c{i}.der").write_bytes(ders[j])
        else:
            (d / f"c{i}.crt").write_bytes(pems[j])
    print(f"files: {n} certificate files written in {time.perf_counter() - t0:.1f}s", flush=True)
    os.sync()
    t0 = time.perf_counter()
    res = files.scan_local([str(root)], files.Options(), datetime.now(UTC))
    elapsed = time.perf_counter() - t0
    matched = sum(1 for f in res.findings if f.key_path)
    print(
        f"files: {res.files} files ({len(res.findings)} findings, {matched} matched to a key, "
        f"{len(res.problems)} problems) in {elapsed:.2f}s: {res.files / elapsed:.0f} files/s",
        flush=True,
    )
    store = SQLiteStore(work / "state.db", key_dir=work, clock=lambda: datetime.now(UTC))
    store.migrate()
    t0 = time.perf_counter()
    store.record_findings(res.findings)
    rec = time.perf_counter() - t0
    again = time.perf_counter()
    store.record_findings(res.findings)  # a rescan: every row an update
    rec2 = time.perf_counter() - again
    print(
        f"files: recorded {len(res.findings)} findings in {rec:.2f}s (rescan upsert {rec2:.2f}s)",
        flush=True,
    )
    store.close()
    if len(res.findings) != n:
        print(f"FAILED: {len(res.findings)} findings for {n} files", flush=True)
    return res.files / elapsed, elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listeners", type=int, default=36)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--distinct", type=int, default=300)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="certctl-discovery-bench-"))
    try:
        rate, scan_s, found = bench_network(work, args.listeners)
        files_rate, files_s = bench_files(work, args.files, args.distinct)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"RESULT scan_addresses_per_s={rate:.0f} files_per_s={files_rate:.0f} "
        f"listeners_found={found}/{args.listeners} scan_s={scan_s:.2f} files_scan_s={files_s:.2f}"
    )


if __name__ == "__main__":
    main()

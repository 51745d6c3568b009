"""Benchmark: one certificate deployed over SSH to N host entries (default 200).

A real sshd on a loopback port (the test suite's own: generated host key, authorized
client key, MaxStartups/MaxSessions raised) stands behind N inventory hosts; each host
entry has its own target root, and certctl opens one SSH connection per host entry
as it would for N machines. The full ``certctl apply`` path runs (issue once, then per
host: stage over SFTP, rename, directory sync command, read-back verification,
deployment recorded in the SQLite state), first with ``--concurrency 1``
(sequential), then with ``--concurrency C`` (default 50), in the same run.

Prints its figures; the last line is

    RESULT deploys_per_s=... sequential_per_s=... ratio=...

Usage: python benchmarks/ssh_fanout.py [--hosts N] [--concurrency C]

Note: every remote command starts the login user's shell; a heavy ``~/.bashrc``
(e.g. ``pyenv init``) adds its start-up time to every deploy.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from certctl.apply.executor import ApplySettings
from certctl.engine import Engine
from tests.integration.ssh_support import Sshd


def write_inventory(inv: Path, sshd: Sshd, hosts: int, roots: Path) -> None:
    inv.mkdir(parents=True)
    ssh = sshd.ssh_vars(max_sessions=4)
    lines = [
        "defaults: {issuer: ca, profile: tls, ttl: 30d, key: {type: ecdsa, curve: P-256}}",
        "issuers:",
        "  ca: {type: local_ca, root: {common_name: Fanout Root}}",
        "profiles:",
        "  tls: {ekus: [serverAuth], max_ttl: 90d}",
        "hosts:",
        *(f"  h{i:03d}: {{address: 127.0.0.1}}" for i in range(hosts)),
        "groups:",
        "  fleet:",
        f"    hosts: [{', '.join(f'h{i:03d}' for i in range(hosts))}]",
        "    vars:",
        "      ssh: {" + ", ".join(f"{k}: {v!r}" for k, v in ssh.items()) + "}",
        "targets:",
        "  tls:",
        "    type: ssh",
        "    hosts: fleet",
        f'    root: "{roots}/{{{{ host.name }}}}"',
        '    fullchain_path: "{{ cert.name }}.pem"',
        '    key_path: "{{ cert.name }}.key"',
        "certificates:",
        "  www: {common_name: www.fanout.test, targets: [tls]}",
    ]
    (inv / "inventory.yaml").write_text("\n".join(lines) + "\n")


def run(base: Path, sshd: Sshd, hosts: int, concurrency: int, label: str) -> float:
    inv = base / f"inv-{label}"
    write_inventory(inv, sshd, hosts, base / f"roots-{label}")
    engine = Engine(inv, sync_mode="batch")
    try:
        engine.inventory()
        start = time.perf_counter()
        _, report = engine.apply(settings=ApplySettings(concurrency=concurrency))
        elapsed = time.perf_counter() - start
        assert report is not None
        deployed = report.done_counts()["deploy"]
        if report.failed or deployed != hosts:
            first = report.failed[0].error if report.failed else "?"
            raise SystemExit(f"{label}: {len(report.failed)} failed, e.g. {first}")
    finally:
        engine.close()
    rate = hosts / elapsed
    print(
        f"{label:>10}: {hosts} hosts deployed in {elapsed:.2f}s "
        f"(concurrency {concurrency}) = {rate:.1f} deploys/s"
    )
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=50)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="certctl-fanout-"))
    sshd = Sshd(base / "sshd")
    try:
        seq = run(base, sshd, args.hosts, 1, "sequential")
        conc = run(base, sshd, args.hosts, args.concurrency, "concurrent")
    finally:
        sshd.stop()
        shutil.rmtree(base, ignore_errors=True)
    print(f"RESULT deploys_per_s={conc:.1f} sequential_per_s={seq:.1f} ratio={conc / seq:.2f}")


if __name__ == "__main__":
    main()

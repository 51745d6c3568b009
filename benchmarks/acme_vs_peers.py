"""Benchmark: certificates per second from one local Pebble, certctl vs certbot vs lego.

One Pebble (Debian package; PEBBLE_VA_ALWAYS_VALID=1, PEBBLE_VA_NOSLEEP=1,
PEBBLE_WFE_NONCEREJECT=0) and pebble-challtestsrv are started on loopback ports.
Then, in the same run, N certificates (default 100) for distinct names are issued:

* by certctl: one ``apply`` of an inventory with N certificates on an ``acme`` issuer
  (http-01 through the built-in responder; the VA does not connect under
  ALWAYS_VALID) deployed to files, key + certificate durable, state in SQLite;
* by certbot (Debian package): N ``certbot certonly --webroot`` runs, 10 processes
  at a time, each slot with its own config dir and an account registered beforehand;
* by lego (Debian package): N ``lego run --http.webroot`` runs, 10 at a time, each
  slot with its own path and an account made by a warm-up issuance beforehand.

Account registration is outside every timed section. Prints each figure; the last
line is

    RESULT certctl_per_s=... certbot_per_s=... lego_per_s=... ratio_certbot=... ratio_lego=...

Usage: python benchmarks/acme_vs_peers.py [--certs N] [--procs 10]
Installs certbot/lego with apt-get when missing (needs root).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from certctl.apply.executor import ApplySettings
from certctl.engine import Engine
from tests.integration.acme_support import Pebble, start_pebble


def ensure_tools() -> None:
    missing = [t for t in ("certbot", "lego", "pebble") if shutil.which(t) is None]
    if not missing:
        return
    if os.geteuid() != 0:
        sys.exit(f"missing {missing}: install the Debian packages certbot, lego, pebble")
    print(f"installing {missing} with apt-get", flush=True)
    subprocess.run(["apt-get", "update", "-qq"], check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "certbot", "lego", "pebble"],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        stdout=subprocess.DEVNULL,
    )


def bench_certctl(peb: Pebble, work: Path, n: int, concurrency: int) -> float:
    inv = work / "certctl"
    inv.mkdir()
    certs = "".join(
        f"  c{i}: {{common_name: certctl-{i}.bench.example.com, targets: [files]}}\n"
        for i in range(n)
    )
    (inv / "inv.yaml").write_text(
        f"""
defaults: {{issuer: pebble, profile: tls, ttl: 30d, key: {{type: ecdsa, curve: P-256}}}}
issuers:
  pebble:
    type: acme
    directory: {peb.directory}
    ca_bundle: {peb.ca_bundle}
    email: bench@example.com
    terms_of_service_agreed: true
    max_concurrent_orders: {concurrency}
    challenge: {{type: http-01, responder: {{listen: "127.0.0.1:{peb.http_port}"}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 3650d}}
targets:
  files:
    type: file
    root: out
    fullchain_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
certificates:
{certs}""",
        encoding="utf-8",
    )
    # warm-up outside the timed section: account key + registration (one-off per issuer)
    warm = Engine(inventory_path=inv)
    try:
        issuer = warm.issuer("pebble")
        asyncio.run(issuer._ensure_account())  # type: ignore[attr-defined]
    finally:
        warm.close()
    eng = Engine(inventory_path=inv)
    try:
        t0 = time.perf_counter()
        _, report = eng.apply(settings=ApplySettings(concurrency=concurrency))
        elapsed = time.perf_counter() - t0
    finally:
        eng.close()
    assert report is not None
    if report.failed:
        sys.exit(f"certctl: {len(report.failed)} failed: {report.failed[0].error}")
    got = len(list((inv / "out").glob("*.pem")))
    assert got == n, got
    return elapsed


def run_pool(cmds: list[list[str]], env: dict[str, str], procs: int) -> float:
    def one(cmd: list[str]) -> None:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed: {(r.stderr or r.stdout)[-800:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(procs) as pool:
        list(pool.map(one, cmds))
    return time.perf_counter() - t0


def bench_certbot(peb: Pebble, work: Path, n: int, procs: int) -> float:
    base = work / "certbot"
    webroot = base / "webroot"
    webroot.mkdir(parents=True)
    env = {**os.environ, "REQUESTS_CA_BUNDLE": peb.ca_bundle}

    def args(slot: int) -> list[str]:
        d = base / f"slot{slot}"
        return [
            "certbot",
            "--non-interactive",
            "--agree-tos",
            "-m",
            "bench@example.com",
            "--server",
            peb.directory,
            "--config-dir",
            str(d / "config"),
            "--work-dir",
            str(d / "work"),
            "--logs-dir",
            str(d / "logs"),
        ]

    run_pool([[*args(s), "register"] for s in range(procs)], env, procs)
    cmds = [
        [
            *args(i % procs),
            "certonly",
            "--webroot",
            "-w",
            str(webroot),
            "--key-type",
            "ecdsa",
            "-d",
            f"certbot-{i}.bench.example.com",
        ]
        for i in range(n)
    ]
    # each slot's runs go one after another (certbot locks its config dir)
    by_slot = [[c for j, c in enumerate(cmds) if j % procs == s] for s in range(procs)]
    return _run_slots(by_slot, env)


def _run_slots(by_slot: list[list[list[str]]], env: dict[str, str]) -> float:
    def slot(cmds: list[list[str]]) -> None:
        for cmd in cmds:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise RuntimeError(f"{cmd[0]} failed: {(r.stderr or r.stdout)[-800:]}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(by_slot)) as pool:
        list(pool.map(slot, by_slot))
    return time.perf_counter() - t0


def bench_lego(peb: Pebble, work: Path, n: int, procs: int) -> float:
    base = work / "lego"
    webroot = base / "webroot"
    webroot.mkdir(parents=True)
    env = {**os.environ, "LEGO_CA_CERTIFICATES": peb.ca_bundle}

    def args(slot: int, name: str) -> list[str]:
        return [
            "lego",
            "--accept-tos",
            "--email",
            "bench@example.com",
            "--server",
            peb.directory,
            "--path",
            str(base / f"slot{slot}"),
            "--key-type",
            "ec256",
            "--http",
            "--http.webroot",
            str(webroot),
            "--domains",
            name,
            "run",
        ]

    # warm-up: one issuance per slot registers its account
    run_pool([args(s, f"lego-warm-{s}.bench.example.com") for s in range(procs)], env, procs)
    by_slot = [
        [args(s, f"lego-{i}.bench.example.com") for i in range(n) if i % procs == s]
        for s in range(procs)
    ]
    return _run_slots(by_slot, env)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=100)
    ap.add_argument("--procs", type=int, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    opts = ap.parse_args()
    ensure_tools()
    n = opts.certs
    work = Path(tempfile.mkdtemp(prefix="certctl-acme-bench-"))
    peb = start_pebble(always_valid=True, nonce_reject=0)
    try:
        t = bench_certctl(peb, work, n, opts.concurrency)
        certctl_rate = n / t
        print(f"certctl: {n} certificates in {t:.2f}s = {certctl_rate:.1f}/s", flush=True)
        t = bench_certbot(peb, work, n, opts.procs)
        certbot_rate = n / t
        print(
            f"certbot x{opts.procs}: {n} certificates in {t:.2f}s = {certbot_rate:.2f}/s",
            flush=True,
        )
        t = bench_lego(peb, work, n, opts.procs)
        lego_rate = n / t
        print(f"lego x{opts.procs}: {n} certificates in {t:.2f}s = {lego_rate:.2f}/s", flush=True)
    finally:
        peb.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"RESULT certctl_per_s={certctl_rate:.1f} certbot_per_s={certbot_rate:.2f} "
        f"lego_per_s={lego_rate:.2f} ratio_certbot={certctl_rate / certbot_rate:.1f} "
        f"ratio_lego={certctl_rate / lego_rate:.1f}"
    )


if __name__ == "__main__":
    main()

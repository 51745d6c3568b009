"""Benchmark: load + validate + plan and apply of 10,000 certificates.

For each state backend (embedded SQLite, then PostgreSQL on 127.0.0.1:5432 in a
throwaway database): plan with everything new, apply 10,000 new P-256 local-CA
certificates deployed to files (fullchain + key per certificate, durable: synced
before rename), then plan again with everything up to date. Prints the figures as it
goes; the last line is

    RESULT plan_10k_s=... apply_per_s_sqlite=... apply_per_s_postgres=... peak_rss_mb=...

``plan_10k_s`` is the slowest plan case seen (fresh process state: inventory load,
schema/reference/policy validation, state snapshot, file read-back, planning).

Usage: python benchmarks/core_10k.py [--certs N] [--concurrency N] [--pg URL]
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from certctl.apply.executor import ApplySettings
from certctl.engine import Engine


def write_inventory(root: Path, n: int) -> None:
    (root / "certctl.yaml").write_text(
        """
defaults:
  issuer: bench-ca
  profile: tls
  ttl: 30d
  key: {type: ecdsa, curve: P-256}
issuers:
  bench-ca:
    type: local_ca
    root: {common_name: Bench Root CA, key: {type: ecdsa, curve: P-256}, ttl: 3650d}
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d, allowed_keys: [ecdsa-p256]}
policies:
  names: {san_allow: ["*.bench.internal"]}
targets:
  files:
    type: file
    root: deployed
    fullchain_path: "{{ cert.name }}.fullchain.pem"
    key_path: "{{ cert.name }}.key"
""",
        encoding="utf-8",
    )
    lines = ["certificates:"]
    for i in range(n):
        name = f"c{i:05d}"
        lines.append(f"  {name}:")
        lines.append(f"    common_name: {name}.bench.internal")
        lines.append(f"    sans: [{name}-alt.bench.internal, {name}-b.bench.internal]")
        lines.append("    targets: [files]")
    (root / "certificates.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_plan(inv: Path, state: str | None, label: str) -> tuple[float, int]:
    gc.collect()
    eng = Engine(inventory_path=inv, state_url=state)
    t0 = time.perf_counter()
    plan, _ = eng.plan()
    dt = time.perf_counter() - t0
    eng.close()
    print(f"  plan ({label}): {dt:.3f} s, {len(plan.actions)} actions", flush=True)
    return dt, len(plan.actions)


def run_backend(
    name: str, state: str | None, n: int, concurrency: int, work: Path
) -> tuple[float, float]:
    inv = work / "inventory"
    inv.mkdir()
    write_inventory(inv, n)
    print(f"[{name}] {n} certificates, inventory in {inv}", flush=True)
    t_new, actions = time_plan(inv, state, "all new")
    assert actions == 2 * n, actions

    eng = Engine(inventory_path=inv, state_url=state)
    t0 = time.perf_counter()
    _, report = eng.apply(settings=ApplySettings(concurrency=concurrency))
    dt = time.perf_counter() - t0
    assert report is not None and not report.failed, report and report.failed[:3]
    eng.close()
    per_s = n / dt
    print(
        f"  apply: {dt:.2f} s for {n} certificates = {per_s:.0f} certificates/s "
        f"({report.transactions} state transactions, concurrency {concurrency})",
        flush=True,
    )
    t_same, actions = time_plan(inv, state, "all up to date")
    assert actions == 0, actions
    print(f"  peak RSS so far: {rss_mb():.0f} MB", flush=True)
    return max(t_new, t_same), per_s


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=25)
    ap.add_argument(
        "--pg",
        default=os.environ.get("CERTCTL_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
    )
    args = ap.parse_args()

    # Work directories are removed only at the end: deleting 20,000 files just before
    # the next backend's apply makes ext4 inode allocation slow for a while
    # ("recently deleted" inodes), which would be charged to the second backend.
    works = [Path(tempfile.mkdtemp(prefix=f"certctl-bench-{b}-")) for b in ("sqlite", "pg")]
    try:
        return _run(args, works)
    finally:
        for w in works:
            shutil.rmtree(w, ignore_errors=True)


def _run(args: argparse.Namespace, works: list[Path]) -> int:
    plan_s, sqlite_rate = run_backend("sqlite", None, args.certs, args.concurrency, works[0])

    import psycopg

    db = f"certctl_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    base = args.pg.rsplit("/", 1)[0]
    try:
        plan_pg, pg_rate = run_backend(
            "postgres", f"{base}/{db}", args.certs, args.concurrency, works[1]
        )
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    plan_s = max(plan_s, plan_pg)
    print(
        f"RESULT plan_10k_s={plan_s:.2f} apply_per_s_sqlite={sqlite_rate:.0f} "
        f"apply_per_s_postgres={pg_rate:.0f} peak_rss_mb={rss_mb():.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

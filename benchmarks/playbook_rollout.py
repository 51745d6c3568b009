"""Benchmark: what batching a rollout through a playbook costs, and selection at scale.

1. Selection: ``certctl.playbook.select`` over a synthetic 10,000-certificate
   inventory and snapshot (every selector kind in one step), best of 5.
2. Rollout: N certificates (default 300; CERTCTL_BENCH_PLAYBOOK_N) issued by the
   local CA to a file target on SQLite, then renewed three ways, each timed:
   a playbook ``renew`` with ``serial: "100%"`` (one batch, one executor run: the
   floor), with ``serial: "10%"`` (10 batches), and the same with
   ``verify: true`` (every batch's files read back). The difference is the price of
   the health gate: one snapshot, target read-back, planner call and executor run
   per batch.

Alone: ``python benchmarks/playbook_rollout.py`` prints its figures and ends with
``RESULT select_10k_ms=... n=... one_batch_s=... playbook_s=... playbook_verify_s=...``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner

from certctl.cli import cli
from certctl.model import (
    Certificate,
    CertRecord,
    Inventory,
    Placement,
    StateSnapshot,
    VersionRecord,
)
from certctl.playbook import select as sel
from certctl.playbook.spec import Selector

N = int(os.environ.get("CERTCTL_BENCH_PLAYBOOK_N", "300"))
NOW = datetime.now(UTC)


def selection_ms() -> float:
    certs = {}
    records = {}
    for i in range(10_000):
        name = f"svc-{i:05d}"
        certs[name] = Certificate(
            name=name,
            common_name=f"{name}.bench.test",
            issuer="old" if i % 2 else "new",
            profile="tls",
            owner="web" if i % 3 else "api",
            tags=("web",) if i % 5 else ("pci",),
            placements=(Placement("files", "file", host=f"h{i % 50}"),),
        )
        records[name] = CertRecord(
            name,
            VersionRecord(
                name,
                1,
                f"{i:x}",
                NOW - timedelta(days=60),
                NOW + timedelta(days=i % 90),
                "f" * 64,
                "old",
                "ecdsa-p256",
                (f"{name}.bench.test",),
                "p",
            ),
        )
    inv = Inventory(
        Path("."),
        certs,
        {},
        {},
        owners={"web": {"team": "sre"}, "api": {"team": "backend"}},
    )
    snap = StateSnapshot(records, {})
    selector = Selector(
        names=("svc-*",),
        issuer=("old",),
        issuer_changed=True,
        team=("sre",),
        tag=("web",),
        host=tuple(f"h{i}" for i in range(0, 50, 2)),
        expiring_within_s=30 * 86400,
        key_algorithm=("ecdsa",),
    )
    best = float("inf")
    found = 0
    for _ in range(5):
        t0 = time.perf_counter()
        found = len(sel.select(inv, snap, selector, NOW))
        best = min(best, time.perf_counter() - t0)
    print(f"selection over 10,000 certificates: {best * 1000:.1f} ms ({found} selected)")
    return best * 1000


INV = """
issuers: {ca: {type: local_ca, root: {common_name: Bench Root}}}
profiles: {tls: {ekus: [serverAuth], max_ttl: 90d}}
defaults: {issuer: ca, profile: tls, ttl: 30d}
targets:
  files:
    type: file
    root: out
    fullchain_path: "{{ cert.name }}.pem"
    key_path: "{{ cert.name }}.key"
certificates:
"""

BOOK = """
name: bench
steps:
  - name: renew all
    action: renew
    select: {name: "*"}
    serial: "10%"
    verify: VERIFY
"""


def timed(inv: Path, *args: str) -> float:
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)
    took = time.perf_counter() - t0
    if r.exit_code != 0:
        print(r.output, file=sys.stderr)
        raise SystemExit(f"certctl {' '.join(args)} failed")
    return took


def main() -> None:
    select_ms = selection_ms()
    with tempfile.TemporaryDirectory(prefix="certctl-bench-pb-") as tmp:
        inv = Path(tmp) / "inv"
        inv.mkdir()
        body = "".join(
            f"  c{i:04d}: {{common_name: c{i:04d}.bench.test, targets: [files]}}\n"
            for i in range(N)
        )
        (inv / "inventory.yaml").write_text(INV + body, encoding="utf-8")
        first = timed(inv, "apply", "--auto-approve")
        print(f"{N} certificates issued and deployed by apply: {first:.2f} s")
        book = Path(tmp) / "bench.yaml"
        book.write_text(BOOK.replace("VERIFY", "false"), encoding="utf-8")
        # The floor: one forced renewal of everything in one batch (one executor run).
        all_book = Path(tmp) / "all.yaml"
        all_book.write_text(
            BOOK.replace('serial: "10%"', 'serial: "100%"').replace("VERIFY", "false"),
            encoding="utf-8",
        )
        apply_s = timed(inv, "run", str(all_book))
        print(f"renew all {N} in one batch (one executor run): {apply_s:.2f} s")
        playbook_s = timed(inv, "run", str(book))
        print(f"renew all {N} in 10 batches of 10%: {playbook_s:.2f} s")
        book.write_text(BOOK.replace("VERIFY", "true"), encoding="utf-8")
        verify_s = timed(inv, "run", str(book))
        print(f"renew all {N} in 10 verified batches: {verify_s:.2f} s")
    print(
        f"RESULT select_10k_ms={select_ms:.1f} n={N} one_batch_s={apply_s:.2f} "
        f"playbook_s={playbook_s:.2f} playbook_verify_s={verify_s:.2f}"
    )


if __name__ == "__main__":
    main()

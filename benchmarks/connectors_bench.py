"""Benchmark: the built-in local_ca issuer and file target on their own.

* issue: P-256 leaves from a local CA (root + intermediate) including key generation
  and PKCS#8 serialisation, one thread, one event loop;
* deploy: stage + commit of N placements (fullchain + key each) into one directory,
  concurrency 25, with the BatchSyncer in ``batch`` (syncfs per group) and ``each``
  (fsync per file) modes;
* observe: read-back of those placements (stat only, everything matches).

The vault is an in-memory dict (the CA is generated once, then cached). Prints its
figures; the last line is ``RESULT issue_per_s=... deploy_batch_per_s=... ...``.

Usage: python benchmarks/connectors_bench.py [--issues N] [--placements N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from certctl import pki
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, IssueRequest, Material, ObserveItem
from certctl.model import Certificate, DeploymentRecord, KeySpec, Placement, Profile
from certctl_connectors.issuers.local_ca import LocalCAIssuer
from certctl_connectors.targets.file import FileTarget


class DictVault:
    def __init__(self) -> None:
        self.data: dict[tuple[str, str], bytes] = {}

    def get(self, issuer: str, key: str) -> bytes | None:
        return self.data.get((issuer, key))

    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None:
        self.data[(issuer, key)] = value


def clock() -> datetime:
    return datetime(2031, 1, 1, tzinfo=UTC)


def bench_issue(n: int, root: Path) -> tuple[float, list[Material]]:
    ctx = ConnectorContext(root, clock, DictVault(), BatchSyncer("none"))
    ca = LocalCAIssuer(
        "bench",
        {
            "root": {"common_name": "Bench Root", "key": {"type": "ecdsa", "curve": "P-384"}},
            "intermediate": {"common_name": "Bench Issuing CA"},
            "public_base_url": "https://pki.bench.internal",
        },
        ctx,
    )
    profile = Profile("tls", ekus=("serverAuth",), max_ttl_s=90 * 86400)
    certs = [
        Certificate(
            f"c{i:05d}",
            f"c{i:05d}.bench.internal",
            sans=(f"c{i:05d}-alt.bench.internal", f"c{i:05d}-b.bench.internal"),
            issuer="bench",
        )
        for i in range(n)
    ]
    spec = KeySpec()

    async def run() -> list[Material]:
        out = []
        for c in certs:
            key = pki.generate_key(spec)
            key_pem = pki.key_to_pem(key)
            req = IssueRequest(c, profile, key, key.public_key())
            issued = await ca.issue(req, await ca.prepare(req))
            out.append(
                Material(c.name, 1, issued.fingerprint, issued.cert_pem, issued.chain_pem, key_pem)
            )
        return out

    ca.load()  # CA generation is a one-off, not part of the per-leaf figure
    t0 = time.perf_counter()
    materials = asyncio.run(run())
    return n / (time.perf_counter() - t0), materials


def bench_deploy(
    materials: list[Material], root: Path, mode: str
) -> tuple[float, int, FileTarget, list[ObserveItem]]:
    syncer = BatchSyncer(mode)
    ctx = ConnectorContext(root, clock, DictVault(), syncer)
    target = FileTarget("files", ctx)
    placements = [
        Placement(
            "files",
            "file",
            None,
            {
                "root": f"deployed-{mode}",
                "fullchain_path": f"{m.cert}.fullchain.pem",
                "key_path": f"{m.cert}.key",
            },
        )
        for m in materials
    ]
    records: list[DeploymentRecord] = []

    async def one(p: Placement, m: Material, sem: asyncio.Semaphore) -> None:
        async with sem:
            staged = await target.stage(p, m)
            files = await target.commit(staged)
            records.append(DeploymentRecord(m.cert, p.id, 1, m.fingerprint, files))

    async def run() -> None:
        sem = asyncio.Semaphore(25)
        await asyncio.gather(*(one(p, m, sem) for p, m in zip(placements, materials, strict=True)))

    t0 = time.perf_counter()
    asyncio.run(run())
    rate = len(materials) / (time.perf_counter() - t0)
    by_cert = {r.cert: r for r in records}
    items = [
        ObserveItem(p, m.cert, m.fingerprint, by_cert[m.cert])
        for p, m in zip(placements, materials, strict=True)
    ]
    return rate, syncer.groups, target, items


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--issues", type=int, default=10_000)
    ap.add_argument("--placements", type=int, default=1_000)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="certctl-conn-bench-", dir=args.dir))
    try:
        issue_rate, materials = bench_issue(args.issues, work)
        print(f"issue: {issue_rate:.0f} P-256 leaves/s (key generation included, 1 thread)")
        subset = materials[: args.placements]
        batch_rate, groups, target, items = bench_deploy(subset, work, "batch")
        print(
            f"deploy (batch sync): {batch_rate:.0f} placements/s stage+commit "
            f"({len(subset)} placements, 2 files each, {groups} sync groups)"
        )
        each_rate, _, _, _ = bench_deploy(subset, work, "each")
        print(f"deploy (fsync each file): {each_rate:.0f} placements/s")
        t0 = time.perf_counter()
        obs = target.observe(items)
        obs_rate = len(items) / (time.perf_counter() - t0)
        assert all(o.state.value == "match" for o in obs)
        print(f"observe: {obs_rate:.0f} placements/s (stat only, all matching)")
        print(
            f"RESULT issue_per_s={issue_rate:.0f} deploy_batch_per_s={batch_rate:.0f} "
            f"deploy_each_per_s={each_rate:.0f} observe_per_s={obs_rate:.0f}"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

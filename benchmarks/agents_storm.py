"""Agents and workers at scale: heartbeat storm, work latency, queue throughput.

Runs the three parts one after the other, each in its own module (so each can also be
run alone), and prints their figures as they go. Needs PostgreSQL on 127.0.0.1:5432
(or CERTCTL_BENCH_PG) like the other benchmarks.

Last line:
    RESULT heartbeat_per_s=… heartbeat_p99_ms=… work_latency_s=… queue_jobs_per_s_4w=…

Targets (2-core machine): ≥ 1,000 heartbeats/s with p99 < 250 ms; median work latency
< 2 s; ≥ 10,000 queue jobs/s with 4 workers.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _storm_heartbeat
import _storm_latency
import _storm_queue

KEYS = ("heartbeat_per_s", "heartbeat_p99_ms", "work_latency_s", "queue_jobs_per_s_4w")


def _fmt(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4g}"


def main() -> None:
    figures: dict[str, float] = {}
    for part in (_storm_heartbeat, _storm_latency, _storm_queue):
        name = part.__name__.removeprefix("_storm_")
        print(f"== {name}", flush=True)
        figures.update(part.run())
    extra = sorted(k for k in figures if k not in KEYS)
    line = " ".join(f"{k}={_fmt(figures[k])}" for k in (*KEYS, *extra) if k in figures)
    print(f"RESULT {line}", flush=True)


if __name__ == "__main__":
    main()

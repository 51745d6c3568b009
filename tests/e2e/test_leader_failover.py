"""Leader election among real `certctl worker` processes on one PostgreSQL.

Three workers campaign; each runs this module's ``leader_loops`` (``--loops-from``)
while it leads: a loop whose every tick records (worker, start, end) on the
database's clock. The leader is killed with SIGKILL: another worker takes the loops
over within the leader lease, and no two ticks of different workers ever overlap.
Then the new leader is stopped cleanly (SIGTERM): it hands the lease back and the
last worker takes over at once. Every change is in the audit log.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import psycopg

from certctl.daemon.scheduler import Loop
from certctl.state import open_store
from tests.e2e.worker_support import stop_all

LEASE_S = 3.0
#: The followers' campaign interval (LeaderRunner.retry_s).
RETRY_S = 1.0
#: Process scheduling on a loaded machine (the measured bounds are asserted with it).
SLACK_S = 2.0
ROOT = Path(__file__).resolve().parents[2]


def leader_loops(ctx: Any) -> list[Loop]:
    """Loaded by the workers (``--loops-from tests.e2e.test_leader_failover``)."""

    def tick() -> None:
        with psycopg.connect(ctx.state_url, autocommit=True) as conn:
            row = conn.execute(
                "INSERT INTO probe_ticks (holder, started) VALUES (%s, clock_timestamp()) "
                "RETURNING id",
                (ctx.holder,),
            ).fetchone()
            assert row is not None
            time.sleep(0.15)
            conn.execute("UPDATE probe_ticks SET ended = clock_timestamp() WHERE id = %s", row)

    return [Loop("probe", 0.2, tick)]


def _start(url: str, inv: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    env["PYTHONPATH"] = str(ROOT)
    cmd = [sys.executable, "-m", "certctl", "-i", str(inv), "--state", url, "worker"]
    cmd += ["--kinds", "noop", "--leader-loops", "none"]
    cmd += ["--loops-from", "tests.e2e.test_leader_failover", "--leader-lease", str(LEASE_S)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, cwd=ROOT)


def _holder(
    conn: psycopg.Connection[Any], deadline: float, other_than: str | None, since: Any = None
) -> str:
    """The holder of the first tick since ``since`` not by ``other_than`` (waits)."""
    while True:
        row = conn.execute(
            "SELECT holder FROM probe_ticks WHERE holder IS DISTINCT FROM %s "
            "AND ended IS NOT NULL AND (%s::timestamptz IS NULL OR started >= %s) "
            "ORDER BY id LIMIT 1",
            (other_than, since, since),
        ).fetchone()
        if row is not None:
            return str(row[0])
        assert time.monotonic() < deadline, "no leader ran the loop in time"
        time.sleep(0.05)


def _all_running(conn: psycopg.Connection[Any], n: int) -> None:
    """Wait until ``n`` workers registered (each campaigns from then on)."""
    deadline = time.monotonic() + 60
    while True:
        row = conn.execute("SELECT count(*) FROM workers WHERE stopped_at IS NULL").fetchone()
        if row is not None and int(row[0]) >= n:
            return
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.05)


def _elected(conn: psycopg.Connection[Any], holder: str, since: Any) -> tuple[Any, Any]:
    """(at, previous holder) of ``holder``'s first election since ``since`` (the audit
    log, database clock)."""
    row = conn.execute(
        "SELECT at, detail->>'previous' FROM audit WHERE event = 'leader.elected' "
        "AND detail->>'holder' = %s AND at >= %s ORDER BY id LIMIT 1",
        (holder, since),
    ).fetchone()
    assert row is not None, f"no election of {holder} in the audit log"
    return row[0], row[1]


def _seconds(conn: psycopg.Connection[Any], later: Any, earlier: Any) -> float:
    row = conn.execute(
        "SELECT EXTRACT(EPOCH FROM %s::timestamptz - %s::timestamptz)", (later, earlier)
    ).fetchone()
    assert row is not None
    return float(row[0])


def _setup(make_pg_db: Callable[[], str], tmp_path: Path) -> tuple[str, Path]:
    """(state URL, inventory) of a fresh database with the probe loop's table."""
    url = make_pg_db()
    inv = tmp_path / "inventory"
    inv.mkdir()
    open_store(url, inventory_root=inv).close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE probe_ticks (id bigserial PRIMARY KEY, holder text NOT NULL, "
            "started timestamptz NOT NULL, ended timestamptz)"
        )
    return url, inv


def _pid(holder: str) -> int:
    return int(holder.split(":")[-2])


def test_leader_failover_within_the_lease_and_no_overlap(
    make_pg_db: Callable[[], str], tmp_path: Path
) -> None:
    url, inv = _setup(make_pg_db, tmp_path)
    logs = [(tmp_path / f"w{i}.log").open("wb") for i in range(3)]
    procs = [_start(url, inv, log) for log in logs]
    by_pid = {p.pid: p for p in procs}
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            _all_running(conn, 3)
            deadline = time.monotonic() + 60
            first = _holder(conn, deadline, None)
            time.sleep(0.5)  # a few ticks of the first leader
            by_pid[_pid(first)].send_signal(signal.SIGKILL)
            by_pid[_pid(first)].wait(timeout=10)
            row = conn.execute(
                "SELECT clock_timestamp(), lease_until, holder FROM leader WHERE id = 1"
            ).fetchone()
            assert row is not None
            killed_at, lease_until, holder = row
            second = _holder(conn, time.monotonic() + 60, first, killed_at)
            elected_at, previous = _elected(conn, second, killed_at)
            # The follower waited for the dead leader's lease (never two leaders) ...
            if holder == first:
                assert _seconds(conn, elected_at, lease_until) >= 0
            # ... and took over within the lease plus one campaign interval.
            failover = _seconds(conn, elected_at, killed_at)
            row = conn.execute(
                "SELECT EXTRACT(EPOCH FROM min(started) - %s) FROM probe_ticks WHERE holder = %s",
                (killed_at, second),
            ).fetchone()
            assert row is not None
            print(f"failover after SIGKILL: elected {failover:.2f}s, first tick {row[0]:.2f}s")
            assert 0 < failover < LEASE_S + RETRY_S + SLACK_S, f"failover took {failover:.2f}s"
            assert previous == first
            time.sleep(0.5)
            # A clean stop hands the lease back: the last worker takes over at once.
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            assert row is not None
            stopped_at = row[0]
            by_pid[_pid(second)].send_signal(signal.SIGTERM)
            assert by_pid[_pid(second)].wait(timeout=30) == 0
            third = _holder(conn, time.monotonic() + 60, second, stopped_at)
            assert third not in (first, second)
            elected_at, previous = _elected(conn, third, stopped_at)
            assert previous == second
            row = conn.execute(
                "SELECT at FROM audit WHERE event = 'leader.resigned' AND detail->>'holder' = %s",
                (second,),
            ).fetchone()
            assert row is not None, "the stopped leader did not hand the lease back"
            # Handed back: the follower took over at its next campaign, not a lease later.
            handover = _seconds(conn, elected_at, row[0])
            print(f"handover after a clean stop: {handover:.2f}s")
            assert 0 <= handover < RETRY_S + SLACK_S, f"handover took {handover:.2f}s"
            time.sleep(0.3)
            # No two ticks of different workers overlap (the killed leader's last tick
            # may not have recorded its end: it ended at the kill).
            ticks = conn.execute(
                "SELECT holder, started, COALESCE(ended, %s) FROM probe_ticks ORDER BY started",
                (killed_at,),
            ).fetchall()
            assert len({h for h, _, _ in ticks}) == 3
            for (h1, _s1, e1), (h2, s2, _e2) in itertools.pairwise(ticks):
                assert h1 == h2 or e1 <= s2, f"{h1} and {h2} ran the loop at the same time"
            events = conn.execute(
                "SELECT event, detail FROM audit WHERE event LIKE 'leader.%%' ORDER BY id"
            ).fetchall()
            elected = [d["holder"] for e, d in events if e == "leader.elected"]
            assert elected.index(first) < elected.index(second) < elected.index(third)
    finally:
        stop_all(procs, 30)
        for log in logs:
            log.close()


def test_a_frozen_leader_is_evicted_and_starts_no_new_tick_when_it_wakes(
    make_pg_db: Callable[[], str], tmp_path: Path
) -> None:
    """SIGSTOP keeps the leader's session (and advisory lock) open: a follower ends
    that session once the lease is a lease overdue, and takes over; the woken leader
    finds its lease gone and starts no further tick."""
    url, inv = _setup(make_pg_db, tmp_path)
    logs = [(tmp_path / f"w{i}.log").open("wb") for i in range(2)]
    procs = [_start(url, inv, log) for log in logs]
    by_pid = {p.pid: p for p in procs}
    frozen = None
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            _all_running(conn, 2)
            first = _holder(conn, time.monotonic() + 60, None)
            frozen = by_pid[_pid(first)]
            frozen.send_signal(signal.SIGSTOP)
            row = conn.execute("SELECT clock_timestamp()").fetchone()
            assert row is not None
            stopped_at = row[0]
            second = _holder(conn, time.monotonic() + 60, first, stopped_at)
            elected_at, previous = _elected(conn, second, stopped_at)
            assert previous == first
            took = _seconds(conn, elected_at, stopped_at)
            print(f"failover from a frozen leader: {took:.2f}s")
            # Evicted once its lease is a lease overdue, then taken at the next campaign.
            assert took < 2 * LEASE_S + RETRY_S + SLACK_S + 1.0, f"took {took:.2f}s"
            frozen.send_signal(signal.SIGCONT)
            time.sleep(1.5)  # a leader that carried on would tick ~7 times meanwhile
            # The tick the freeze interrupted may finish (and, if frozen before its
            # INSERT, record its start late): at most that one, never a new one.
            row = conn.execute(
                "SELECT count(*) FROM probe_ticks WHERE holder = %s AND started > "
                "(SELECT min(started) FROM probe_ticks WHERE holder = %s)",
                (first, second),
            ).fetchone()
            assert row is not None and int(row[0]) <= 1, "the woken leader started ticks"
            assert frozen.poll() is None  # it carries on as a follower
            events = [
                (str(e), d.get("holder"))
                for e, d in conn.execute(
                    "SELECT event, detail FROM audit WHERE event LIKE 'leader.%%' ORDER BY id"
                ).fetchall()
            ]
            evicted = events.index(("leader.evicted", first))
            assert events.index(("leader.elected", second)) > evicted
    finally:
        if frozen is not None and frozen.poll() is None:
            frozen.send_signal(signal.SIGCONT)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                assert p.wait(timeout=30) == 0
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()

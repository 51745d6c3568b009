"""The ``worker`` and ``workers`` commands (registered by :mod:`certctl.cli`)."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

import click

from certctl.apply.executor import ApplySettings
from certctl.daemon.runner import Daemon, DaemonConfig
from certctl.daemon.scheduler import Loop
from certctl.engine import Engine
from certctl.errors import LockedError
from certctl.plan.planner import count_line
from certctl.workers import applyjobs
from certctl.workers.leader import (
    LeaderContext,
    LeaderRunner,
    Leadership,
    load_loop_modules,
)
from certctl.workers.queue import JobQueue, connect, require_postgres
from certctl.workers.worker import Handler, NoopHandler, Worker, WorkerSettings, worker_id

log = logging.getLogger("certctl.workers")

#: Job kinds a worker can take (``--kinds``).
KINDS = ("apply", "noop")


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


def _say(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    click.echo(f"{stamp} {message}", err=True)


def enqueue_tick(ctx: LeaderContext) -> Callable[[], None]:
    """The leader's apply loop: plan, and enqueue what is due for the workers."""

    def tick() -> None:
        eng = ctx.engine()
        try:
            sub = applyjobs.submit(eng, holder=f"{ctx.holder} (leader)")
        except LockedError as exc:
            ctx.say(f"apply: skipped this tick: {exc}")
            return
        finally:
            eng.close()
        if sub is None:
            return
        ctx.say(
            f"apply: queued {len(sub.job_ids)} job(s) for the workers: "
            f"{count_line(sub.plan.counts())}"
        )

    return tick


def prune_tick(ctx: LeaderContext) -> Callable[[], None]:
    """The leader's queue housekeeping: forget done jobs after 7 days, failed and dead
    ones after 30."""

    def tick() -> None:
        with JobQueue(ctx.state_url, ctx.holder, application_name="certctl leader") as queue:
            n = queue.prune()
        if n:
            ctx.say(f"queue-prune: deleted {n} old job(s)")

    return tick


def _leader_loops(
    ctx: LeaderContext,
    config: DaemonConfig,
    wanted: tuple[str, ...] | None,
    modules: tuple[str, ...],
) -> Callable[[], list[Loop]]:
    """The daemon's loops (``wanted``; None: all of them) with the apply loop turned
    into plan + enqueue, the queue housekeeping, and the loops of ``modules``."""

    def make() -> list[Loop]:
        daemon = Daemon(config, say=ctx.say)
        out = []
        for lp in daemon.loops():
            if wanted is not None and lp.name not in wanted:
                continue
            if lp.name == "apply":  # the workers apply; the leader plans and enqueues
                lp = Loop("apply", lp.interval, enqueue_tick(ctx))
            out.append(lp)
        out.append(Loop("queue-prune", 3600.0, prune_tick(ctx)))
        return out + load_loop_modules(ctx, modules)

    return make


def _parse_loops(text: str, known: list[str]) -> tuple[str, ...] | None:
    if text.strip() == "all":
        return None
    if text.strip() in ("", "none"):
        return ()
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise click.BadParameter(
            f"unknown loop(s) {', '.join(unknown)}; choose from {', '.join(known)}, "
            "'all' or 'none'",
            param_hint="--leader-loops",
        )
    return names


@click.command("worker")
@click.option("--no-leader", is_flag=True, help="Only take jobs; never run the scheduled loops.")
@click.option(
    "--kinds",
    default=",".join(KINDS),
    show_default=True,
    help="Job kinds to take (comma-separated).",
)
@click.option("--batch", default=100, show_default=True, type=click.IntRange(1, 10000))
@click.option(
    "--lease",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.5, 3600),
    help="Job lease (s), renewed every lease/3 while a batch runs.",
)
@click.option(
    "--leader-lease",
    default=6.0,
    show_default=True,
    type=click.FloatRange(0.5, 600),
    help="Leader lease (s): the longest a failover waits.",
)
@click.option("--poll", default=1.0, show_default=True, type=click.FloatRange(0.01, 60))
@click.option("--concurrency", default=25, show_default=True, type=click.IntRange(1, 10000))
@click.option("--drain", is_flag=True, help="Exit once no job is queued or leased.")
@click.option(
    "--leader-loops",
    "loops_text",
    default="all",
    show_default=True,
    help="Daemon loops the leader runs: 'all', 'none' or names (apply,drift,...).",
)
@click.option(
    "--loops-from",
    "loop_modules",
    multiple=True,
    metavar="MODULE",
    help="Also run MODULE.leader_loops(ctx) on the leader (repeatable).",
)
@click.option("--interval-apply", default=300.0, show_default=True, type=click.FloatRange(0.01))
@click.option("--interval-drift", default=600.0, show_default=True, type=click.FloatRange(0.01))
@click.pass_context
def worker_cmd(
    ctx: click.Context,
    no_leader: bool,
    kinds: str,
    batch: int,
    lease: float,
    leader_lease: float,
    poll: float,
    concurrency: int,
    drain: bool,
    loops_text: str,
    loop_modules: tuple[str, ...],
    interval_apply: float,
    interval_drift: float,
) -> None:
    """Take jobs from the PostgreSQL job queue (apply jobs from `apply --via-workers`
    and the leader) until SIGTERM/SIGINT; unless --no-leader, also campaign to lead
    and, while leading, run the scheduled loops (only one worker leads at a time)."""
    eng = _engine(ctx)
    url = require_postgres(eng.state_url, "certctl worker")
    wanted_kinds = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in wanted_kinds if k not in KINDS]
    if unknown or not wanted_kinds:
        raise click.BadParameter(
            f"unknown job kind(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(KINDS)}",
            param_hint="--kinds",
        )
    config = DaemonConfig(
        inventory_path=eng.inventory_path,
        state_url=url,
        interval_apply=interval_apply,
        interval_drift=interval_drift,
        concurrency=concurrency,
    )
    known = [lp.name for lp in Daemon(config).loops()]
    loops = _parse_loops(loops_text, known)
    if "apply" in wanted_kinds:
        eng.inventory()  # a broken inventory fails at start, with file:line
    eng.store()  # opens and migrates the state (0005 creates the queue tables)
    eng.close()  # the worker's parts open the connections they need
    ident = worker_id()
    handlers: list[Handler] = []
    if "noop" in wanted_kinds:
        handlers.append(NoopHandler())
    if "apply" in wanted_kinds:
        handlers.append(
            applyjobs.ApplyHandler(
                eng.inventory_path,
                url,
                holder=ident,
                settings=ApplySettings(concurrency=concurrency),
                say=_say,
            )
        )
    stop = threading.Event()
    leader: LeaderRunner | None = None
    leader_thread: threading.Thread | None = None
    if not no_leader:
        lctx = LeaderContext(eng.inventory_path, url, ident, say=_say)
        make_loops = _leader_loops(lctx, config, loops, loop_modules)
        leader = LeaderRunner(Leadership(url, ident, leader_lease), make_loops, say=_say)
        leader_thread = threading.Thread(
            target=leader.run, args=(stop,), name="certctl-leader", daemon=True
        )
    worker = Worker(
        url,
        handlers,
        WorkerSettings(batch=batch, lease_s=lease, poll_s=poll, drain=drain),
        ident=ident,
        say=_say,
        is_leader=(lambda: leader.leading) if leader is not None else (lambda: False),
    )
    signals = {"n": 0}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals["n"] += 1
        if signals["n"] > 1:
            _say("signal again: exiting now; leases expire and other workers take the jobs")
            os._exit(143)
        _say(f"{signal.Signals(signum).name}: stopping after the batch in flight")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _say(
        f"certctl worker {ident} started: kinds {', '.join(wanted_kinds)}, batch {batch}, "
        f"lease {lease:g}s"
        + (
            ""
            if no_leader
            else f", leader candidate ({', '.join(known if loops is None else loops) or 'none'})"
        )
    )
    if leader_thread is not None:
        leader_thread.start()
    try:
        done = worker.run(stop)
    finally:
        stop.set()
        if leader_thread is not None:
            leader_thread.join(timeout=60)
    _say(f"certctl worker {ident} stopped: {done} job(s) done, {worker.failed} failed")


@click.command("workers")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.option(
    "--stale-after",
    default=60.0,
    show_default=True,
    type=click.FloatRange(1),
    help="A worker silent this long (s) is listed as stale.",
)
@click.pass_context
def workers_cmd(ctx: click.Context, fmt: str, stale_after: float) -> None:
    """List workers (live, stale, stopped), the leader and the job queue's counts."""
    eng = _engine(ctx)
    url = require_postgres(eng.state_url, "certctl workers")
    eng.store()
    conn = connect(url, "certctl workers")
    try:
        rows = conn.execute(
            "SELECT id, host, pid, started_at, heartbeat_at, leader, jobs_done, stopped_at, "
            "EXTRACT(EPOCH FROM now() - heartbeat_at) FROM workers "
            "WHERE stopped_at IS NULL OR stopped_at > now() - interval '1 day' "
            "ORDER BY started_at"
        ).fetchall()
        lead = conn.execute(
            "SELECT holder, term, since, lease_until, lease_until > now() FROM leader WHERE id = 1"
        ).fetchone()
    finally:
        conn.close()
    with JobQueue(url, "certctl workers", application_name="certctl workers") as queue:
        counts = queue.counts()
    workers = [
        {
            "id": r[0],
            "host": r[1],
            "pid": r[2],
            "started_at": r[3].isoformat(),
            "heartbeat_age_s": round(float(r[8]), 1),
            "status": "stopped" if r[7] else ("stale" if float(r[8]) > stale_after else "live"),
            "leader": bool(r[5]) and not r[7],
            "jobs_done": int(r[6]),
        }
        for r in rows
    ]
    leader = None
    if lead is not None and lead[0] is not None:
        leader = {
            "holder": lead[0],
            "term": int(lead[1]),
            "since": lead[2].isoformat() if lead[2] else None,
            "lease_valid": bool(lead[4]),
        }
    if fmt == "json":
        click.echo(json.dumps({"workers": workers, "leader": leader, "jobs": counts}, indent=2))
        return
    for w in workers:
        mark = " (leader)" if w["leader"] else ""
        click.echo(
            f"{w['status']:<8} {w['id']}{mark}  jobs {w['jobs_done']}  "
            f"heartbeat {w['heartbeat_age_s']}s ago"
        )
    if leader is not None:
        state = "lease valid" if leader["lease_valid"] else "lease expired"
        click.echo(f"leader: {leader['holder']} (term {leader['term']}, {state})")
    click.echo("jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))


COMMANDS: list[click.Command] = [worker_cmd, workers_cmd]

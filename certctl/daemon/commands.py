"""The ``drift``, ``daemon`` and ``hooks`` commands (registered by :mod:`certctl.cli`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

import click

from certctl.daemon import hooks as hooks_mod
from certctl.daemon.runner import Daemon, DaemonConfig
from certctl.daemon.scheduler import Scheduler
from certctl.daemon.watch import InventoryWatch
from certctl.engine import Engine
from certctl.observe import drift as drift_mod


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


@click.command("drift")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text")
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.05, 600),
    help="Seconds per probe (connect + TLS handshake).",
)
@click.option("--concurrency", default=64, show_default=True, type=click.IntRange(1, 4096))
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1, 64))
@click.option("--endpoints-only", is_flag=True, help="Do not read back deployed files.")
@click.pass_context
def drift_cmd(
    ctx: click.Context,
    fmt: str,
    timeout: float,
    concurrency: int,
    threads: int,
    endpoints_only: bool,
) -> None:
    """Probe every TLS endpoint the inventory declares (targets' verify settings and
    `endpoints:`) and read back deployed files. Exit 0 no drift, 2 drift, 1 error."""
    eng = _engine(ctx)
    inv = eng.inventory()
    snap = eng.store().snapshot()
    report = drift_mod.run(
        inv,
        snap,
        datetime.now(UTC),
        None if endpoints_only else eng.target,
        timeout=timeout,
        concurrency=concurrency,
        threads=threads,
    )
    click.echo(drift_mod.render(report, fmt), nl=False)
    if report.drifted:
        sys.exit(2)


def _say(message: str) -> None:
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    click.echo(f"{stamp} {message}", err=True)


async def _run(daemon: Daemon, once: bool) -> Scheduler:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(name: str) -> None:
        if stop.is_set():
            _say(f"{name} again: exiting now; the journal lets the next run resume")
            os._exit(143)
        _say(f"{name}: stopping once the tick in flight has finished")
        daemon.stopping.set()  # an apply in flight stops between certificates
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    sched = Scheduler(
        daemon.loops(), on_error=lambda name, msg: _say(f"{name}: tick failed: {msg}")
    )
    names = ", ".join(
        f"{lp.name} every {lp.interval:g}s" if lp.initial else f"{lp.name} on change"
        for lp in sched.loops
    )
    watch = None
    if daemon.config.watch and not once:
        delay = daemon.config.watch_debounce
        watch = InventoryWatch(daemon.config.inventory_path, lambda: sched.trigger("watch", delay))
        watch.start()
    _say(f"certctl daemon started (pid {os.getpid()}): {names}" + (" (once)" if once else ""))
    try:
        await sched.run(stop, once=once)
    finally:
        if watch is not None:
            watch.stop()
    return sched


@click.command("daemon")
@click.option("--once", is_flag=True, help="Run every loop once, then exit (cron, CI).")
@click.option("--interval-apply", default=300.0, show_default=True, type=click.FloatRange(0.01))
@click.option("--interval-drift", default=600.0, show_default=True, type=click.FloatRange(0.01))
@click.option(
    "--interval-housekeeping", default=3600.0, show_default=True, type=click.FloatRange(0.01)
)
@click.option("--interval-git", default=60.0, show_default=True, type=click.FloatRange(0.01))
@click.option("--interval-notify", default=300.0, show_default=True, type=click.FloatRange(0.01))
@click.option("--git", "git_url", metavar="URL_OR_PATH", help="Reconcile from this repository.")
@click.option("--branch", default="main", show_default=True, help="Branch to follow (--git).")
@click.option("--git-path", default="", help="Inventory path inside the repository (--git).")
@click.option("--concurrency", default=25, show_default=True, type=click.IntRange(1, 10000))
@click.option("--drift-timeout", default=5.0, show_default=True, type=click.FloatRange(0.05, 600))
@click.option("--watch", is_flag=True, help="Re-plan when inventory files change.")
@click.option("--watch-apply", is_flag=True, help="With --watch: apply instead of plan.")
@click.option(
    "--watch-debounce",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0.0, 600),
    help="Seconds of quiet after a change before re-planning.",
)
@click.option(
    "--agent-offline-after",
    default=90.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds of silence after which an agent is offline, its jobs re-queued (0: off).",
)
@click.pass_context
def daemon_cmd(
    ctx: click.Context,
    once: bool,
    interval_apply: float,
    interval_drift: float,
    interval_housekeeping: float,
    interval_git: float,
    interval_notify: float,
    git_url: str | None,
    branch: str,
    git_path: str,
    concurrency: int,
    drift_timeout: float,
    watch: bool,
    watch_apply: bool,
    watch_debounce: float,
    agent_offline_after: float,
) -> None:
    """Reconcile continuously: apply due work, probe for drift and keep CRLs fresh,
    each loop on its own interval (±10% jitter). SIGTERM/SIGINT stop it once the tick
    in flight has finished (an apply stops between certificates: those in flight
    finish, the rest wait for the next run; a second signal exits at once). With
    --git, -i names the daemon's directory: state in .certctl/ there, the branch
    fetched into .certctl/git/, and each new commit checked (a broken one is
    reported, not applied) and applied."""
    eng = _engine(ctx)
    config = DaemonConfig(
        inventory_path=eng.inventory_path,
        state_url=eng.state_url,
        interval_apply=interval_apply,
        interval_drift=interval_drift,
        interval_housekeeping=interval_housekeeping,
        interval_git=interval_git,
        interval_notify=interval_notify,
        concurrency=concurrency,
        drift_timeout=drift_timeout,
        git_url=git_url,
        git_branch=branch,
        git_path=git_path,
        watch=watch or watch_apply,
        watch_apply=watch_apply,
        watch_debounce=watch_debounce,
        agent_offline_after=agent_offline_after,
        interval_agents=max(0.5, min(15.0, agent_offline_after / 3)),
    )
    if git_url is not None and config.watch:
        raise click.UsageError("--watch follows local files; with --git the branch is the source")
    if git_url is None:
        eng.inventory()  # a broken inventory fails at start, with file:line
    daemon = Daemon(config, say=_say)
    sched = asyncio.run(_run(daemon, once))
    failed = [lp for lp in sched.loops if lp.failures]
    _say(
        "certctl daemon stopped"
        + (f"; failed: {', '.join(lp.name for lp in failed)}" if failed else "")
    )
    if once and failed:
        sys.exit(1)


@click.group("hooks")
def hooks_group() -> None:
    """Git hooks that run certctl after a commit or merge."""


@hooks_group.command("install")
@click.option("--apply", "do_apply", is_flag=True, help="Also apply (--auto-approve).")
@click.option("--force", is_flag=True, help="Replace hooks certctl did not write.")
@click.pass_context
def hooks_install(ctx: click.Context, do_apply: bool, force: bool) -> None:
    """Write post-merge and post-commit hooks into the inventory's repository."""
    eng = _engine(ctx)
    state = eng.state_url
    # A path is written into the hook; a URL (it may hold a password) is not: the hook
    # then uses CERTCTL_STATE from the environment, like any certctl command.
    state = str(Path(state).expanduser().absolute()) if state and "://" not in state else None
    for path in hooks_mod.install(eng.inventory_path, apply=do_apply, force=force, state=state):
        click.echo(f"wrote {path}")


COMMANDS = (drift_cmd, daemon_cmd, hooks_group)

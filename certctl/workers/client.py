"""``certctl apply --via-workers``: submit the plan as jobs and wait, showing progress.

Exit status as ``apply``: 0 when every job is done, 1 when one failed, died or the
wait timed out (the jobs stay queued; the workers carry on).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click

from certctl.engine import Engine, default_holder
from certctl.errors import StalePlanError
from certctl.model import Plan
from certctl.plan.confirm import confirm_plan
from certctl.plan.planner import PlanOptions, options_of
from certctl.plan.render import render_text
from certctl.workers import applyjobs
from certctl.workers.queue import FINAL, JobQueue, connect

POLL_S = 0.5


def _saved_check(saved: Plan, auto_approve: bool) -> Callable[[Plan], bool]:
    """A saved plan must still be the plan (same digest, same actions)."""
    show = confirm_plan(auto_approve)

    def check(fresh: Plan) -> bool:
        if saved.input_digest != fresh.input_digest or [a.id for a in saved.actions] != [
            a.id for a in fresh.actions
        ]:
            raise StalePlanError(
                "the saved plan is stale: the inventory, the state or the targets changed "
                "since it was made; run `certctl plan` again"
            )
        return show(fresh)

    return check


def live_workers(url: str, within_s: float = 60.0) -> int:
    conn = connect(url, "certctl apply")
    try:
        row = conn.execute(
            "SELECT count(*) FROM workers WHERE stopped_at IS NULL "
            "AND heartbeat_at > now() - %s * interval '1 second'",
            (within_s,),
        ).fetchone()
    finally:
        conn.close()
    return int(row[0]) if row else 0


def apply_via_workers(
    eng: Engine, saved: Plan | None, auto_approve: bool, timeout: float | None
) -> None:
    options = options_of(saved) if saved is not None else PlanOptions()
    confirm = _saved_check(saved, auto_approve) if saved is not None else confirm_plan(auto_approve)
    sub = applyjobs.submit(eng, holder=default_holder(), options=options, confirm=confirm)
    if sub is None:
        plan, _ = eng.plan(options)
        if plan.actions:
            click.echo("Apply cancelled.")
        else:
            click.echo(render_text(plan), nl=False)
        return
    url = eng.state_url
    assert url is not None
    ids = sub.job_ids
    click.echo(f"Queued {len(ids)} certificate job(s) for the workers (batch {sub.batch}).")
    if live_workers(url) == 0:
        click.echo(
            "  no live `certctl worker` is running: the jobs wait in the queue until one starts",
            err=True,
        )
    counts = _wait(url, ids, timeout)
    done, failed, dead = counts["done"], counts["failed"], counts["dead"]
    pending = len(ids) - done - failed - dead
    with JobQueue(url, "certctl apply", application_name="certctl apply") as queue:
        problems = queue.problems(ids) if failed or dead else []
    click.echo(
        f"Apply via workers: {done} certificate job(s) done, {failed} failed, {dead} dead"
        + (f", {pending} still pending" if pending else "")
        + "."
    )
    for job_id, state, error in problems:
        click.echo(f"  {state.upper()} job {job_id}: {error}", err=True)
    if pending:
        click.echo(
            f"  timed out after {timeout:g}s; the pending jobs stay queued and the workers "
            "carry on (see `certctl workers`)",
            err=True,
        )
    if failed or dead or pending:
        sys.exit(1)


def _wait(url: str, ids: list[int], timeout: float | None) -> dict[str, int]:
    """Poll the jobs' states until all are final or ``timeout``; a progress bar on a
    terminal."""
    total = len(ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    progress = None
    task = None
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        task = progress.add_task("workers", total=total)
        progress.start()
    last_line = 0.0
    try:
        with JobQueue(url, "certctl apply", application_name="certctl apply") as queue:
            while True:
                counts = queue.counts(ids)
                final = sum(counts[s] for s in FINAL)
                if progress is not None and task is not None:
                    progress.update(
                        task,
                        completed=final,
                        description=(
                            f"workers: {counts['done']} done, {counts['failed']} failed, "
                            f"{counts['leased']} running"
                        ),
                    )
                elif time.monotonic() - last_line >= 5.0:
                    last_line = time.monotonic()
                    click.echo(
                        f"  {final}/{total}: {counts['done']} done, {counts['failed']} failed, "
                        f"{counts['dead']} dead, {counts['leased']} running",
                        err=True,
                    )
                if final >= total:
                    return counts
                if deadline is not None and time.monotonic() >= deadline:
                    return counts
                time.sleep(POLL_S)
    finally:
        if progress is not None:
            progress.stop()

"""The ``certctl`` command line. Thin: parse, call the engine, render, exit code.

Exit codes: 0 success (or no changes with ``--detailed-exitcode``), 1 error or a failed
action, 2 changes present (``plan --detailed-exitcode``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from certctl import __version__
from certctl.apply.executor import ApplyReport, ApplySettings
from certctl.engine import Engine, default_holder
from certctl.errors import CertctlError
from certctl.model import Plan
from certctl.pki import crl
from certctl.plan.confirm import confirm_plan
from certctl.plan.planner import PlanOptions, count_line
from certctl.plan.render import plan_from_json, render, render_json, render_text

#: RFC 5280 reason names, as `--reason` accepts them.
REVOCATION_REASONS = tuple(crl.REASONS)


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


class _Group(click.Group):
    """Turns every CertctlError into one clear line on stderr and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CertctlError as exc:
            _fail(str(exc))
        finally:
            eng = ctx.obj.get("engine") if isinstance(ctx.obj, dict) else None
            if isinstance(eng, Engine):
                eng.close()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-i",
    "--inventory",
    "inventory",
    type=click.Path(path_type=Path),
    default=Path("inventory"),
    show_default=True,
    help="Inventory file or directory.",
)
@click.option(
    "--state",
    "state",
    envvar="CERTCTL_STATE",
    default=None,
    help="State store URL (postgresql://... or a SQLite path). "
    "Default: SQLite in .certctl/ next to the inventory. Env: CERTCTL_STATE.",
)
@click.option("--pool-size", default=4, show_default=True, help="PostgreSQL pool size.")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(__version__, prog_name="certctl")
@click.pass_context
def cli(
    ctx: click.Context, inventory: Path, state: str | None, pool_size: int, verbose: int
) -> None:
    """Declarative certificate lifecycle: YAML inventory -> plan -> apply."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(verbose, 2), format="%(levelname)s %(name)s: %(message)s"
    )
    # HTTP client libraries log full request URLs at INFO/DEBUG; a notifier's webhook
    # URL is itself a secret (Slack, Teams), so they stay at WARNING whatever -v says.
    for noisy in ("httpx", "httpcore", "urllib3", "acme.client"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ctx.ensure_object(dict)
    ctx.obj["engine"] = Engine(inventory_path=inventory, state_url=state, pool_size=pool_size)


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.obj["engine"]
    assert isinstance(eng, Engine)
    return eng


@cli.command()
@click.pass_context
def validate(ctx: click.Context) -> None:
    """Load and check the inventory (schema, references, policies). Changes nothing."""
    inv = _engine(ctx).inventory()
    placements = sum(len(c.placements) for c in inv.certificates.values())
    click.echo(
        f"{_engine(ctx).inventory_path}: valid: {len(inv.certificates)} certificates, "
        f"{len(inv.issuers)} issuers, {len(inv.targets)} targets ({placements} placements), "
        f"{len(inv.files)} files"
    )


@cli.command("plan")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text")
@click.option("--out", type=click.Path(path_type=Path), help="Save the plan (JSON) for apply.")
@click.option(
    "--detailed-exitcode", is_flag=True, help="Exit 0 with no changes, 2 with changes, 1 on error."
)
@click.option("--force-renew", "force", multiple=True, help="Plan a renewal of NAME regardless.")
@click.option(
    "--base",
    "base_rev",
    metavar="REV",
    help="PR review: also compare with the inventory at git revision REV (certctl.review).",
)
@click.pass_context
def plan_cmd(
    ctx: click.Context,
    fmt: str,
    out: Path | None,
    detailed_exitcode: bool,
    force: tuple[str, ...],
    base_rev: str | None,
) -> None:
    """Show what apply would do, and why."""
    eng = _engine(ctx)
    if base_rev is not None:
        plan = _plan_against_base(eng, base_rev, fmt, PlanOptions(frozenset(force)))
    else:
        _check_names(eng, force)
        plan, _ = eng.plan(PlanOptions(force=frozenset(force)))
        click.echo(render(plan, fmt), nl=False)
    if out is not None:
        try:
            out.write_text(render_json(plan), encoding="utf-8")
        except OSError as exc:
            raise CertctlError(f"cannot write the plan to {out}: {exc.strerror}") from None
        click.echo(f"\nSaved the plan to {out}; apply it with: certctl apply {out}", err=True)
    if detailed_exitcode and plan.has_changes:
        sys.exit(2)


def _plan_against_base(eng: Engine, base_rev: str, fmt: str, options: PlanOptions) -> Plan:
    """`plan --base REV`: the real plan, rendered as a review against REV (exit 1 when
    the working-tree inventory does not load)."""
    from certctl import review
    from certctl.errors import InventoryError
    from certctl.plan.planner import plan as make_plan

    registry = eng.get_registry()
    try:
        head = eng.inventory()
    except InventoryError as exc:
        repo, _ = review.repo_location(eng.inventory_path)
        commit = review.resolve_commit(repo, base_rev)
        result = review.Review(
            "certctl plan",
            f"{base_rev} ({commit[:12]})",
            "working tree",
            None,
            tuple(str(p) for p in exc.problems),
        )
        click.echo(review.render_review(result, fmt), nl=False)
        sys.exit(1)
    _check_names(eng, tuple(options.force))
    plan, observed = eng.plan(options)
    result = review.review_plan(
        eng.inventory_path,
        base_rev,
        head,
        plan,
        lambda inv: make_plan(inv, observed, plan.created_at, options),
        registry,
    )
    click.echo(review.render_review(result, fmt), nl=False)
    return plan


def _check_names(eng: Engine, names: tuple[str, ...]) -> None:
    inv = eng.inventory()
    unknown = [n for n in names if n not in inv.certificates]
    if unknown:
        raise CertctlError(f"unknown certificate(s): {', '.join(unknown)}")


def _progress_callback() -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    if not sys.stderr.isatty():
        return None, lambda: None
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
    task = progress.add_task("applying", total=None)

    def update(done: int, total: int) -> None:
        # Started on the first report, i.e. after the confirmation prompt is answered.
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done, total=total)

    return update, progress.stop


def _print_report(plan: Plan, report: ApplyReport) -> None:
    done = report.done_counts()
    click.echo(
        f"Apply complete: {done['issue']} issued, {done['renew']} renewed, "
        f"{done['deploy']} deployed, {done['revoke']} revoked, {done['retire']} retired; "
        f"{len(report.failed)} failed. (run {report.run_id})"
    )
    for r in report.failed:
        a = r.action
        where = f" -> {a.placement}" if a.placement else ""
        click.echo(f"  FAILED {a.kind.value} {a.cert}{where}: {r.error}", err=True)


@cli.command("diff")
@click.argument("base_rev", metavar="REV1")
@click.argument("head_rev", metavar="REV2")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text")
@click.pass_context
def diff_cmd(ctx: click.Context, base_rev: str, head_rev: str, fmt: str) -> None:
    """PR review: what changing the inventory from git revision REV1 to REV2 does
    (certificates added, removed, changed; implied actions; risky effects). Exit 1
    when the inventory at REV2 does not load."""
    from certctl import review

    eng = _engine(ctx)
    result = review.review_revisions(eng.inventory_path, base_rev, head_rev, eng.get_registry())
    click.echo(review.render_review(result, fmt), nl=False)
    if result.failed:
        sys.exit(1)


@cli.command()
@click.argument("planfile", required=False, type=click.Path(path_type=Path, exists=True))
@click.option("--auto-approve", is_flag=True, help="Do not ask for confirmation.")
@click.option("--concurrency", default=25, show_default=True, type=click.IntRange(1, 10000))
@click.option(
    "--agent-wait",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    metavar="SECONDS",
    help="Wait this long for agent-routed work to be deployed (0: hand it over and exit).",
)
@click.option(
    "--via-workers",
    is_flag=True,
    help="PostgreSQL: queue one job per certificate for `certctl worker` processes and wait.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(0),
    default=None,
    help="With --via-workers: stop waiting after this many seconds (exit 1; jobs stay queued).",
)
@click.pass_context
def apply(
    ctx: click.Context,
    planfile: Path | None,
    auto_approve: bool,
    concurrency: int,
    agent_wait: float,
    via_workers: bool = False,
    timeout: float | None = None,
) -> None:
    """Carry out the plan (or a saved PLANFILE, refused if stale)."""
    eng = _engine(ctx)
    saved = None
    if planfile is not None:
        try:
            text = planfile.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CertctlError(f"cannot read the plan file {planfile}: {reason}") from None
        saved = plan_from_json(text, str(planfile))
    if via_workers:  # certctl.workers.client: PostgreSQL only, a clear error otherwise
        from certctl.workers.client import apply_via_workers

        apply_via_workers(eng, saved, auto_approve or saved is not None, timeout)
        return
    if timeout is not None:
        raise click.UsageError("--timeout goes with --via-workers")
    _run_apply(
        eng, saved, PlanOptions(), auto_approve or saved is not None, concurrency, agent_wait
    )


def _run_apply(
    eng: Engine,
    saved: Plan | None,
    options: PlanOptions,
    auto_approve: bool,
    concurrency: int,
    agent_wait: float = 0.0,
) -> None:
    confirm = confirm_plan(auto_approve)
    update, stop = _progress_callback()
    try:
        plan, report = eng.apply(
            saved,
            options=options,
            settings=ApplySettings(concurrency=concurrency),
            holder=default_holder(),
            confirm=confirm,
            on_progress=update,
        )
    finally:
        stop()
    if report is None:
        if plan.actions:
            click.echo("Apply cancelled.")
        else:
            click.echo(render_text(plan), nl=False)
        return
    _print_report(plan, report)
    _print_publish_problems(eng.publish_problems)
    agents_failed = False
    if report.agent_jobs:
        from certctl.agent.client_commands import follow_agent_jobs

        agents_failed = follow_agent_jobs(eng, report.agent_jobs, agent_wait)
    if report.failed or eng.publish_problems or agents_failed:
        sys.exit(1)


def _print_publish_problems(problems: list[str]) -> None:
    for p in problems:
        click.echo(f"  FAILED to publish: {p}", err=True)


@cli.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Renew even if not due.")
@click.option("--concurrency", default=25, show_default=True, type=click.IntRange(1, 10000))
@click.pass_context
def renew(ctx: click.Context, name: str, force: bool, concurrency: int) -> None:
    """Renew one certificate now if due (or always with --force), and deploy it."""
    eng = _engine(ctx)
    _check_names(eng, (name,))
    opts = PlanOptions(force=frozenset([name]) if force else frozenset(), only=frozenset([name]))
    _run_apply(eng, None, opts, True, concurrency)


@cli.command()
@click.argument("names", nargs=-1)
@click.option("--reason", type=click.Choice(REVOCATION_REASONS), default="unspecified")
@click.option(
    "--filter",
    "filters",
    multiple=True,
    metavar="KEY=VALUE",
    help="Revoke in bulk: issuer, profile, owner, team, target or host (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="List what would be revoked; change nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def revoke(
    ctx: click.Context,
    names: tuple[str, ...],
    reason: str,
    filters: tuple[str, ...],
    dry_run: bool,
    yes: bool,
) -> None:
    """Revoke the current certificate of each NAME (or of every certificate matching
    the filters) through its issuer; state and audit record it once the issuer has."""
    import asyncio

    from certctl import revocation
    from certctl.apply.executor import Executor
    from certctl.model import Action, ActionKind, Reason

    eng = _engine(ctx)
    wanted = revocation.parse_filters(filters)
    store = eng.store()
    inv = eng.inventory()
    if dry_run:
        chosen = revocation.select(inv, store.snapshot(), names, wanted)
        for c in chosen:
            click.echo(
                f"would revoke {c.name} serial {c.version.serial} (issuer {c.version.issuer}, "
                f"expires {c.version.not_after.isoformat()}) for {reason}"
            )
        click.echo(f"{len(chosen)} certificate(s) would be revoked (dry run: nothing changed).")
        return
    store.acquire_apply_lock(default_holder())
    try:
        # Select under the lock: a concurrent renewal cannot slip in between.
        snap = store.snapshot()
        if len(names) == 1 and not wanted:
            rec = snap.certs.get(names[0])
            if rec is not None and rec.current is not None and rec.current.status == "revoked":
                click.echo(f"{names[0]}: serial {rec.current.serial} is already revoked")
                return
        chosen = revocation.select(inv, snap, names, wanted)
        if not chosen:
            click.echo("Nothing to revoke.")
            return
        if not yes:
            listing = ", ".join(f"{c.name} ({c.version.serial})" for c in chosen[:20])
            more = f" and {len(chosen) - 20} more" if len(chosen) > 20 else ""
            if not sys.stdin.isatty():
                raise CertctlError(
                    f"revoking {len(chosen)} certificate(s) needs confirmation: pass --yes "
                    "(see the list with --dry-run)"
                )
            click.confirm(f"Revoke {listing}{more} for {reason}?", abort=True)
        actions = tuple(
            Action(
                ActionKind.REVOKE,
                c.name,
                (Reason("forced", f"revoked by hand ({reason})"),),
                details={
                    "revocation_reason": reason,
                    "version": c.version.version,
                    "retire": False,
                },
            )
            for c in chosen
        )
        plan = Plan(actions=actions, input_digest="", created_at=eng.clock())
        ex = Executor(inv, snap, store, eng, eng.clock, holder=default_holder())
        report = asyncio.run(ex.run(plan))
        problems = eng.after_run()  # e.g. rewrite the issuer's crl_file, under the lock
    finally:
        store.release_apply_lock()
    failed = {r.action.cert: r.error for r in report.failed}
    for c in chosen:
        if c.name not in failed:
            click.echo(f"Revoked {c.name} serial {c.version.serial} ({reason}).")
    for name, error in failed.items():
        click.echo(f"  FAILED revoke {name}: {error}", err=True)
    _print_publish_problems(problems)
    if failed or problems:
        sys.exit(1)
    click.echo(
        "The next plan issues replacements unless the inventory marks them `revoked: true`."
    )


def _cert_status(rec_current: Any, now: datetime, retired: bool) -> str:
    if retired:
        return "retired"
    if rec_current is None:
        return "not issued"
    if rec_current.status == "revoked":
        return "revoked"
    if rec_current.not_after <= now:
        return "expired"
    return "valid"


@cli.command("crl")
@click.argument("issuer")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write it to FILE.")
@click.option("--pem", is_flag=True, help="PEM instead of DER.")
@click.pass_context
def crl_cmd(ctx: click.Context, issuer: str, out: Path | None, pem: bool) -> None:
    """Print (or write to FILE) ISSUER's current CRL, regenerated when a revocation
    happened or half its validity passed; also rewrites the issuer's crl_file."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    eng = _engine(ctx)
    if issuer not in eng.inventory().issuers:
        raise CertctlError(f"unknown issuer {issuer!r}")
    conn = eng.issuer(issuer)
    publish = getattr(conn, "publish_crl", None)
    if not callable(publish):
        raise CertctlError(f"issuer {issuer} ({type(conn).type_name}) does not publish a CRL")
    der = publish()
    assert isinstance(der, bytes)
    parsed = x509.load_der_x509_crl(der)
    data = parsed.public_bytes(Encoding.PEM) if pem else der
    number = parsed.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    nxt = parsed.next_update_utc.isoformat() if parsed.next_update_utc else "-"
    where = getattr(conn, "crl_path", None)
    click.echo(
        f"CRL {number} of {issuer}: {len(parsed)} revoked, next update {nxt}"
        + (f"; crl_file {where}" if where else ""),
        err=True,
    )
    if out is not None:
        try:
            out.write_bytes(data)
        except OSError as exc:
            raise CertctlError(f"cannot write {out}: {exc.strerror}") from None
        return
    if not pem and sys.stdout.isatty():
        raise CertctlError("a DER CRL is binary: pass --out FILE or --pem")
    sys.stdout.buffer.write(data)
    sys.stdout.flush()


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def status(ctx: click.Context, fmt: str) -> None:
    """What the state store knows: every certificate, version, expiry, deployments."""
    eng = _engine(ctx)
    snap = eng.store().snapshot()
    now = datetime.now(UTC)
    deployed: dict[str, int] = {}
    for (cert, _), dep in snap.deployments.items():
        if dep.status == "deployed":
            deployed[cert] = deployed.get(cert, 0) + 1
    rows = []
    for name in sorted(snap.certs):
        rec = snap.certs[name]
        cur = rec.current
        rows.append(
            {
                "name": name,
                "status": _cert_status(cur, now, rec.retired),
                "version": cur.version if cur else None,
                "serial": cur.serial if cur else None,
                "issuer": cur.issuer if cur else None,
                "not_after": cur.not_after.isoformat() if cur else None,
                "days_left": (cur.not_after - now).days if cur else None,
                "deployments": deployed.get(name, 0),
                "failures": rec.failures,
            }
        )
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No certificates in state yet. Run `certctl plan` and `certctl apply`.")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"certctl state ({len(rows)} certificates)", box=None)
    for col, _ in STATUS_COLUMNS:
        table.add_column(col, no_wrap=True)
    for r in rows:
        cells = []
        for _, key in STATUS_COLUMNS:
            value = r[key]
            if key == "not_after" and value is not None:
                value = str(value)[:10]
            cells.append("-" if value is None else str(value))
        table.add_row(*cells)
    Console(width=max(100, Console().width)).print(table)


#: (header, row key) of `certctl status`'s table.
STATUS_COLUMNS = (
    ("NAME", "name"),
    ("STATUS", "status"),
    ("VERSION", "version"),
    ("ISSUER", "issuer"),
    ("EXPIRES", "not_after"),
    ("DAYS LEFT", "days_left"),
    ("TARGETS", "deployments"),
    ("FAILURES", "failures"),
)


@cli.command()
@click.argument("name")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def show(ctx: click.Context, name: str, fmt: str) -> None:
    """Decode NAME's current certificate (never its key) and list its versions."""
    from cryptography import x509

    from certctl import pki

    eng = _engine(ctx)
    store = eng.store()
    versions = store.versions(name)
    if not versions:
        raise CertctlError(f"{name}: not in state (never issued)")
    cur = versions[0]
    cert_pem, chain_pem = store.certificate_pems(name, cur.version)
    info = pki.describe(x509.load_pem_x509_certificate(cert_pem))
    snap = store.snapshot()
    deps = [
        {
            "placement": d.placement,
            "version": d.version,
            "status": d.status,
            "files": {role: f.path for role, f in d.files.items()},
        }
        for (c, _), d in sorted(snap.deployments.items())
        if c == name
    ]
    version_rows = [
        {
            "version": v.version,
            "serial": v.serial,
            "status": v.status,
            "not_after": v.not_after.isoformat(),
            "fingerprint": v.fingerprint,
        }
        for v in versions
    ]
    data = {
        "name": name,
        "certificate": info,
        "chain_length": len(pki.parse_pem_chain(chain_pem)) if chain_pem else 0,
        "versions": version_rows,
        "deployments": deps,
    }
    if fmt == "json":
        click.echo(json.dumps(data, indent=2, default=str))
        return
    click.echo(f"{name} (version {cur.version}, {cur.status})")
    for key, value in info.items():
        click.echo(f"  {key}: {value}")
    click.echo("  versions:")
    for v in version_rows:
        click.echo(f"    v{v['version']} serial {v['serial']} {v['status']} until {v['not_after']}")
    click.echo("  deployments:")
    for d in deps:
        click.echo(f"    {d['placement']}: v{d['version']} {d['status']}")


@cli.command("notify")
@click.option("--dry-run", is_flag=True, help="Show what would be sent; send and record nothing.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def notify_cmd(ctx: click.Context, dry_run: bool, fmt: str) -> None:
    """One notification pass: expiry warnings, failures of the last apply, unreachable
    issuers; deduplicated, retried with backoff, dead-lettered (certctl.notify).
    Exit 1 when a notification was dead-lettered in this pass."""
    from certctl import notify

    report = notify.run_once(_engine(ctx), dry_run=dry_run)
    if fmt == "json":
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
    elif dry_run:
        for d in report.would_send:
            click.echo(f"would send {d.event.key} -> {d.notifier}: {d.event.title}")
        click.echo(f"{len(report.would_send)} notification(s) would be sent (dry run).")
    else:
        for key, name in report.sent:
            click.echo(f"sent {key} -> {name}")
        for key, name, error in report.retrying:
            click.echo(f"  retrying {key} -> {name}: {error}", err=True)
        for key, name, error in report.dead:
            click.echo(f"  DEAD {key} -> {name}: {error}", err=True)
        click.echo(
            f"{len(report.events)} event(s), {report.new} new notification(s); "
            f"{len(report.sent)} sent, {len(report.retrying)} to retry, "
            f"{len(report.dead)} dead-lettered."
        )
    if report.dead:
        sys.exit(1)


@cli.command("notifications")
@click.option("--status", type=click.Choice(["pending", "sent", "dead"]), default=None)
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
@click.pass_context
def notifications_cmd(ctx: click.Context, status: str | None, limit: int, fmt: str) -> None:
    """List notifications: sent, pending (with their next attempt) and dead-letter."""
    rows = _engine(ctx).store().list_notifications(status=status, limit=limit)
    if fmt == "json":
        data = [
            {
                "key": r.key,
                "notifier": r.notifier,
                "event": r.event,
                "cert": r.cert,
                "status": r.status,
                "attempts": r.attempts,
                "next_attempt_at": r.next_attempt_at.isoformat() if r.next_attempt_at else None,
                "last_error": r.last_error,
                "created_at": r.created_at.isoformat() if r.created_at else None,
                "updated_at": r.updated_at.isoformat() if r.updated_at else None,
                "title": r.payload.get("title"),
            }
            for r in rows
        ]
        click.echo(json.dumps(data, indent=2))
        return
    if not rows:
        click.echo("No notifications recorded.")
        return
    for r in rows:
        nxt = (
            f" next {r.next_attempt_at:%Y-%m-%d %H:%M}"
            if r.status == "pending" and r.next_attempt_at
            else ""
        )
        err = f" ({r.last_error})" if r.last_error else ""
        click.echo(f"{r.status:<7} {r.notifier:<16} {r.key} attempts={r.attempts}{nxt}{err}")


@cli.group()
def db() -> None:
    """State store maintenance."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply pending schema migrations (under a lock)."""
    from certctl.state import describe_url

    eng = _engine(ctx.find_root())
    store = eng.store()
    applied = store.migrate()
    where = describe_url(eng.state_url or "") if eng.state_url else "embedded SQLite"
    if applied:
        click.echo(f"{where}: applied {', '.join(applied)}")
    click.echo(f"{where}: schema version {store.schema_version()}")


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), help="PEM chain.")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), help="PEM key.")
@click.option("--ip-rate", default=20.0, show_default=True, help="Read API req/s per IP.")
@click.option("--key-rate", default=50.0, show_default=True, help="Read API req/s per key.")
@click.option("--burst", default=40, show_default=True, help="Burst allowance of both limits.")
@click.option(
    "--agent-offline-after",
    default=90.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds of silence after which an agent is offline and its jobs re-queued (0: "
    "leave the sweep to the daemon).",
)
@click.pass_context
def serve(
    ctx: click.Context,
    host: str,
    port: int,
    tls_cert: str | None,
    tls_key: str | None,
    ip_rate: float,
    key_rate: float,
    burst: int,
    agent_offline_after: float,
) -> None:
    """Serve CRL and OCSP of local-CA issuers, /healthz, /readyz, /metrics and the
    read API (/api/v1/..., API key required) until SIGINT/SIGTERM."""
    from certctl.agent.service import AgentServerSettings
    from certctl.server.app import ServerSettings, run
    from certctl.server.build import build_app

    if (tls_cert is None) != (tls_key is None):
        raise CertctlError("--tls-cert and --tls-key go together")
    settings = ServerSettings(
        host=host,
        port=port,
        tls_cert=tls_cert,
        tls_key=tls_key,
        ip_rate=ip_rate,
        ip_burst=burst,
        key_rate=key_rate,
        key_burst=burst,
    )
    agents = AgentServerSettings(
        offline_after=agent_offline_after,
        sweep_interval=max(0.5, min(15.0, agent_offline_after / 3)),
    )
    app, issuers = build_app(_engine(ctx), settings, agents)
    scheme = "https" if tls_cert else "http"
    served = ", ".join(issuers) or "none"
    click.echo(f"certctl serve on {scheme}://{host}:{port} (CRL/OCSP for: {served})", err=True)
    run(app, settings)


@cli.group()
def apikey() -> None:
    """API keys of the read API (only their SHA-256 is stored)."""


@apikey.command("create")
@click.argument("name")
@click.pass_context
def apikey_create(ctx: click.Context, name: str) -> None:
    """Create key NAME and print its token (shown once, never stored)."""
    from certctl.server.auth import hash_token, new_token

    token = new_token()
    _engine(ctx.find_root()).store().create_api_key(name, hash_token(token))
    click.echo(token)
    click.echo(f"Created API key {name!r}. Keep the token: it is not shown again.", err=True)


@apikey.command("list")
@click.pass_context
def apikey_list(ctx: click.Context) -> None:
    """List the API key names."""
    for name, _ in _engine(ctx.find_root()).store().api_keys():
        click.echo(name)


@apikey.command("delete")
@click.argument("name")
@click.pass_context
def apikey_delete(ctx: click.Context, name: str) -> None:
    """Delete key NAME."""
    if not _engine(ctx.find_root()).store().delete_api_key(name):
        raise CertctlError(f"no API key named {name!r}")
    click.echo(f"Deleted API key {name!r}.")


# Commands that live with their feature; each module exports ``COMMANDS``.
_COMMAND_MODULES = (
    "certctl.daemon.commands",  # drift, daemon, hooks
    "certctl.playbook.commands",  # run
    "certctl.discovery.commands",  # discover, discovered
    "certctl.adopt.commands",  # adopt, import
    "certctl.workers.commands",  # worker
    "certctl.agent.admin_commands",  # agents, agent-token
    "certctl.agent.client_commands",  # agent
)


def _add_feature_commands() -> None:
    import importlib

    for module in _COMMAND_MODULES:
        for command in importlib.import_module(module).COMMANDS:
            cli.add_command(command)


_add_feature_commands()


def main() -> None:
    """Entry point. Usage errors exit 1: exit code 2 means "changes present"."""
    try:
        cli.main(prog_name="certctl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)


__all__ = ["cli", "count_line", "main"]

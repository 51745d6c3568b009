"""The ``run`` command (registered by :mod:`certctl.cli`): ``certctl run PLAYBOOK``."""

from __future__ import annotations

import sys

import click

from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.playbook import runner, spec


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


def _confirm(prompt: str) -> bool:
    return bool(click.confirm(prompt, default=False))


@click.command("run")
@click.argument("playbook", required=False, metavar="PLAYBOOK")
@click.option("--check", is_flag=True, help="Show the plan of every step; change nothing.")
@click.option(
    "--limit",
    metavar="PATTERN",
    help="Only certificates whose name matches: globs separated by ',' ('!glob' excludes).",
)
@click.option(
    "-e",
    "--extra-vars",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="Set a playbook variable (overrides vars:; repeatable).",
)
@click.option("--yes", is_flag=True, help="Answer yes to the playbook's pause steps.")
@click.option("--list", "list_", is_flag=True, help="List the bundled playbooks.")
@click.option("--concurrency", default=25, show_default=True, type=click.IntRange(1, 10000))
@click.pass_context
def run_cmd(
    ctx: click.Context,
    playbook: str | None,
    check: bool,
    limit: str | None,
    extra: tuple[str, ...],
    yes: bool,
    list_: bool,
    concurrency: int,
) -> None:
    """Run a playbook: a YAML file, or the name of a bundled one (see --list).

    Steps run in order; each selects certificates and renews, rotates keys,
    redeploys, revokes, verifies, notifies or pauses, in batches (`serial`) behind a
    health gate (`max_fail_percentage`). Every run is recorded in the audit log.
    Exit 0 when every step succeeded, 1 on an error or a stop."""
    if list_:
        for name, description in spec.bundled().items():
            first = description.strip().splitlines()[0] if description.strip() else ""
            click.echo(f"{name:<22} {first}")
        return
    if playbook is None:
        raise CertctlError("name a playbook file or a bundled playbook (see: certctl run --list)")
    pb = spec.load(playbook, spec.parse_extra_vars(extra))
    run = runner.PlaybookRunner(
        _engine(ctx),
        pb,
        check=check,
        limit=limit,
        yes=yes,
        interactive=sys.stdin.isatty(),
        concurrency=concurrency,
        echo=click.echo,
        confirm=_confirm,
    )
    result = run.run()
    if not result.ok:
        sys.exit(1)


COMMANDS: list[click.Command] = [run_cmd]

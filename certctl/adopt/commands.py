"""The ``adopt`` and ``import certbot|acme.sh`` commands (registered by :mod:`certctl.cli`).

Each writes a NEW inventory file (default ``<inventory>/adopted-<UTC time>.yaml``),
validates the whole inventory with it, then seeds the state so that the next plan
is "no changes". Exit 0 when everything found was adopted, 1 when something was
refused (the rest is still adopted, as printed) or nothing could be.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import click

from certctl.adopt import seed
from certctl.adopt.model import AdoptError, Candidate
from certctl.adopt.sources import Report, ToolImport
from certctl.engine import Engine


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


_out = click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="The new inventory file (default: <inventory>/adopted-<UTC time>.yaml). "
    "Never overwritten.",
)
_prefix = click.option(
    "--prefix", default="", help="Prefix for every emitted name (when names collide)."
)
_dry = click.option(
    "--dry-run", is_flag=True, help="Print the YAML that would be written; change nothing."
)
_ca_bundle = click.option(
    "--ca-bundle",
    default=None,
    # absolute: the issuer reads a relative ca_bundle from the inventory directory
    type=click.Path(exists=True, dir_okay=False, resolve_path=True),
    help="CA bundle the emitted ACME issuers verify their server with (private ACME CAs).",
)


def _finish(
    ctx: click.Context,
    cands: list[Candidate],
    report: Report,
    header: Sequence[str],
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> None:
    eng = _engine(ctx)
    for r in report.refused:
        click.echo(f"refused: {r}", err=True)
    for n in report.notes:
        click.echo(f"note: {n}", err=True)
    if not cands:
        click.echo("Nothing to adopt.", err=True)
        ctx.exit(1)
    try:
        outcome = seed.run(eng, cands, header=header, out=out, prefix=prefix, dry_run=dry_run)
    except AdoptError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    if dry_run:
        click.echo(outcome.yaml_text, nl=False)
        for name in outcome.resumed:
            click.echo(f"# would finish adopting {name} (already in the inventory)", err=True)
    else:
        if outcome.path is not None:
            click.echo(f"Wrote {outcome.path}")
        for name in outcome.resumed:
            click.echo(f"Finished adopting {name} (an earlier run was interrupted)")
        for c in cands:
            what = " (observe only until its next renewal)" if c.key_pem is None else ""
            click.echo(f"  adopted {c.name}{what}")
            for n in c.notes:
                click.echo(f"    note: {n}")
        click.echo("Next: certctl plan (it should say: No changes).")
    if report.refused:
        ctx.exit(1)


def _import(
    ctx: click.Context,
    imp: ToolImport,
    only: tuple[str, ...],
    header: Sequence[str],
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> None:
    """Reads ``imp``'s candidates (only those named, when any are), then :func:`_finish`."""
    try:
        cands = imp.candidates(set(only) if only else None)
    except AdoptError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    _finish(ctx, cands, imp.report, header, out, prefix, dry_run)


@click.group("import")
def import_group() -> None:
    """Import certificates another tool manages (certbot, acme.sh), without reissuing."""


@import_group.command("certbot")
@click.argument(
    "directory",
    required=False,
    default="/etc/letsencrypt",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--lineage", "lineages", multiple=True, help="Only these lineages (repeatable).")
@_ca_bundle
@_out
@_prefix
@_dry
@click.pass_context
def certbot_cmd(
    ctx: click.Context,
    directory: Path,
    lineages: tuple[str, ...],
    ca_bundle: str | None,
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> None:
    """Import certbot lineages from DIRECTORY (default /etc/letsencrypt): renewal/*.conf,
    live/ and archive/. Takes the lineages over from certbot (see the docs)."""
    from certctl.adopt.certbot import CertbotImport

    imp = CertbotImport(directory, ca_bundle=ca_bundle)
    header = [
        f"Imported by `certctl import certbot {imp.dir}`.",
        "certctl now renews and deploys these lineages: their live/ symlinks were replaced by",
        "regular files with the same bytes, their renewal/*.conf renamed *.conf.certctl-imported.",
    ]
    _import(ctx, imp, lineages, header, out, prefix, dry_run)


@import_group.command("acme.sh")
@click.argument(
    "directory",
    required=False,
    default="~/.acme.sh",
    type=click.Path(file_okay=False, path_type=Path),
)
@click.option("--domain", "domains", multiple=True, help="Only these domains (repeatable).")
@_ca_bundle
@_out
@_prefix
@_dry
@click.pass_context
def acmesh_cmd(
    ctx: click.Context,
    directory: Path,
    domains: tuple[str, ...],
    ca_bundle: str | None,
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> None:
    """Import acme.sh certificates from DIRECTORY (default ~/.acme.sh): each
    <domain>[_ecc]/<domain>.conf with its files and install paths. Takes the domains
    over from acme.sh (their .conf is renamed *.conf.certctl-imported)."""
    from certctl.adopt.acmesh import AcmeShImport

    imp = AcmeShImport(directory, ca_bundle=ca_bundle)
    header = [
        f"Imported by `certctl import acme.sh {imp.dir}`.",
        "certctl now renews and deploys these domains: their <domain>.conf was renamed",
        "<domain>.conf.certctl-imported, so acme.sh --cron no longer renews them.",
    ]
    _import(ctx, imp, domains, header, out, prefix, dry_run)


@click.command("adopt")
@click.option(
    "--finding",
    "fingerprints",
    multiple=True,
    help="SHA-256 fingerprint of a finding (repeatable).",
)
@click.option("--all", "all_", is_flag=True, help="Every finding (of --host, if given).")
@click.option("--host", default=None, help="Only findings on this inventory host ('local').")
@_out
@_prefix
@_dry
@click.pass_context
def adopt_cmd(
    ctx: click.Context,
    fingerprints: tuple[str, ...],
    all_: bool,
    host: str | None,
    out: Path | None,
    prefix: str,
    dry_run: bool,
) -> None:
    """Turn discovery findings (certctl discover) into inventory entries and state."""
    from certctl.adopt.findings import FindingsAdoption

    if not fingerprints and not all_:
        click.echo("error: name findings with --finding FINGERPRINT, or use --all", err=True)
        ctx.exit(1)
    eng = _engine(ctx)
    try:
        imp = FindingsAdoption(eng)
        cands = imp.candidates(fingerprints=fingerprints, host=host)
    except AdoptError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(1)
    header = [f"Adopted by `certctl adopt` from {len(cands)} discovery finding(s)."]
    _finish(ctx, cands, imp.report, header, out, prefix, dry_run)


COMMANDS: list[click.Command] = [import_group, adopt_cmd]

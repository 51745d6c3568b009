"""The ``discover`` (files, network) and ``discovered`` commands (registered by
:mod:`certctl.cli`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from certctl.discovery import files, network, report
from certctl.discovery.model import Finding, Problem
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.inventory.values import parse_duration
from certctl.model import Inventory

_SIZE = re.compile(r"^\s*([0-9]+)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
MAX_HOSTS_AT_ONCE = 16


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size such as 1MiB, 512K or 65536")
    unit = (m.group(2) or "").lower()[:1]
    size = int(m.group(1)) * _UNITS[unit]
    if size <= 0:
        raise click.BadParameter("must be positive")
    return size


def _passwords(envs: Sequence[str], password_files: Sequence[Path]) -> tuple[str, ...]:
    out: list[str] = []
    for name in envs:
        value = os.environ.get(name)
        if value is None:
            raise CertctlError(f"--password-env {name}: the environment variable is not set")
        out.append(value)
    for path in password_files:
        try:
            text = path.read_text()
        except OSError as exc:
            raise CertctlError(f"--password-file {path}: {exc.strerror}") from None
        out += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    return tuple(out)


def _host_names(inv: Inventory, hosts: Sequence[str], groups: Sequence[str]) -> list[str]:
    names: list[str] = []
    for h in hosts:
        if h not in inv.hosts:
            raise CertctlError(f"--host {h}: no such host in the inventory")
        names.append(h)
    for g in groups:
        group = inv.groups.get(g)
        if group is None:
            raise CertctlError(f"--group {g}: no such group in the inventory")
        names += list(group.hosts)
    return list(dict.fromkeys(names))


async def _scan_hosts(
    inv: Inventory,
    names: Sequence[str],
    paths: Sequence[str],
    opts: files.Options,
    eng: Engine,
    concurrency: int,
) -> files.ScanResult:
    from certctl.transport.ssh import SSHPool, settings_for

    pool = SSHPool()
    gate = asyncio.Semaphore(MAX_HOSTS_AT_ONCE)
    seen_at = eng.clock()

    async def one(name: str) -> files.ScanResult:
        async with gate:
            try:
                io = pool.host(settings_for(files.host_connection(inv, name)))
                return await files.scan_remote(io, paths, opts, seen_at, concurrency=concurrency)
            except CertctlError as exc:
                return files.ScanResult(problems=[Problem(name, "-", str(exc))])

    try:
        parts = await asyncio.gather(*(one(n) for n in names))
    finally:
        await pool.close()
    out = files.ScanResult()
    for part in parts:
        out.extend(part)
    return out


def _print_scan(
    findings: Sequence[Finding],
    problems: Sequence[Problem],
    recorded: int,
    fmt: str,
    counts: dict[str, Any],
) -> None:
    if fmt == "json":
        doc = {
            "summary": {
                **counts,
                "findings": len(findings),
                "problems": len(problems),
                "recorded": recorded,
            },
            "findings": [report.finding_json(f) for f in findings],
            "problems": [
                {"host": p.host, "location": p.location, "reason": p.reason} for p in problems
            ],
        }
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    for f in findings:
        where = f"{f.host}:{f.location}" if f.host != "local" else f.location
        sni = f" (SNI {f.sni})" if f.sni else ""
        key = f", key {f.key_path}" if f.key_path else (", key in store" if f.key_in_store else "")
        click.echo(
            f"+ {report.printable(where + sni)}: {report.printable(f.subject)}, "
            f"expires {f.not_after:%Y-%m-%d}, {report.key_label(f)}{report.printable(key)}"
        )
    for p in problems:
        where = f"{p.host}:{p.location}" if p.host != "local" else p.location
        click.echo(f"! {report.printable(where)}: {report.printable(p.reason)}")
    extra = ", ".join(f"{v} {k}" for k, v in counts.items())
    click.echo(
        f"{len(findings)} certificates found, {len(problems)} problems ({extra}); "
        f"{recorded} findings recorded."
    )


@click.group("discover")
def discover() -> None:
    """Find certificates in files and on the network and record them in the state
    (see `certctl discovered`)."""


@discover.command("files")
@click.argument("paths", nargs=-1, required=True)
@click.option("--host", "hosts", multiple=True, help="Walk on inventory host H (over SSH).")
@click.option("--group", "groups", multiple=True, help="Walk on every host of group G.")
@click.option(
    "--max-size",
    default="1MiB",
    show_default=True,
    help="Larger files are reported, not read.",
)
@click.option("--follow-symlinks", is_flag=True, help="Follow directory symlinks (local).")
@click.option(
    "--password-env",
    "password_envs",
    multiple=True,
    metavar="VAR",
    help="Try the password in environment variable VAR on PKCS#12/JKS files.",
)
@click.option(
    "--password-file",
    "password_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Try each line of FILE as a password.",
)
@click.option(
    "--exclude",
    "excludes",
    multiple=True,
    metavar="GLOB",
    help="Skip paths matching GLOB (default: /proc /sys /dev).",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Operations in flight per remote host.",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def discover_files(
    ctx: click.Context,
    paths: tuple[str, ...],
    hosts: tuple[str, ...],
    groups: tuple[str, ...],
    max_size: str,
    follow_symlinks: bool,
    password_envs: tuple[str, ...],
    password_files: tuple[Path, ...],
    excludes: tuple[str, ...],
    concurrency: int,
    fmt: str,
) -> None:
    """Walk PATHS for PEM, DER, PKCS#12 and JKS certificates (content sniffed, not
    judged by name). Oversized, unreadable and looping entries are reported."""
    eng = _engine(ctx)
    opts = files.Options(
        max_size=parse_size(max_size),
        follow_symlinks=follow_symlinks,
        passwords=_passwords(password_envs, password_files),
        excludes=tuple(excludes) if excludes else files.DEFAULT_EXCLUDES,
    )
    if hosts or groups:
        inv = eng.inventory()
        names = _host_names(inv, hosts, groups)
        result = asyncio.run(_scan_hosts(inv, names, paths, opts, eng, concurrency))
    else:
        result = files.scan_local(paths, opts, eng.clock())
    recorded = eng.store().record_findings(result.findings)
    _print_scan(
        result.findings,
        result.problems,
        recorded,
        fmt,
        {"files": result.files, "skipped": result.skipped},
    )


@discover.command("network")
@click.argument("cidrs", nargs=-1, required=True)
@click.option("--ports", default="443", show_default=True, help="Ports: 443,8443,9000-9010.")
@click.option("--sni", "sni", multiple=True, help="Also send SNI NAME (repeatable).")
@click.option(
    "--timeout",
    default=network.DEFAULT_TIMEOUT,
    show_default=True,
    type=click.FloatRange(0.05, 120),
    help="Seconds per probe (connect + TLS handshake).",
)
@click.option(
    "--concurrency",
    default=network.DEFAULT_CONCURRENCY,
    show_default=True,
    type=click.IntRange(1, 8192),
    help="Probes in flight.",
)
@click.option(
    "--max-addresses",
    default=network.DEFAULT_MAX_ADDRESSES,
    show_default=True,
    type=click.IntRange(1),
    help="Refuse scans covering more addresses.",
)
@click.option(
    "--max-probes",
    default=network.DEFAULT_MAX_PROBES,
    show_default=True,
    type=click.IntRange(1),
    help="Refuse scans of more address-port pairs.",
)
@click.option(
    "--allow-reserved",
    is_flag=True,
    help="Allow multicast, link-local, reserved and 'this network' ranges.",
)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def discover_network(
    ctx: click.Context,
    cidrs: tuple[str, ...],
    ports: str,
    sni: tuple[str, ...],
    timeout: float,
    concurrency: int,
    max_addresses: int,
    max_probes: int,
    allow_reserved: bool,
    fmt: str,
) -> None:
    """TLS handshakes with every address of CIDRS on --ports; records each endpoint's
    served chain. Loopback is allowed; reserved ranges need --allow-reserved."""
    from certctl.observe import drift

    eng = _engine(ctx)
    port_list = network.parse_ports(ports)
    sni = network.check_sni(sni)
    addresses = network.expand(cidrs, allow_reserved=allow_reserved, max_addresses=max_addresses)
    network.check_probes(len(addresses), len(port_list), max_probes)
    inv = eng.inventory()
    store = eng.store()
    known = network.known_names(inv, drift.expectations(inv, store.snapshot()))
    opts = network.Options(
        ports=port_list, timeout=timeout, concurrency=concurrency, sni=sni, known_names=known
    )
    result = network.scan(addresses, opts, eng.clock())
    recorded = store.record_findings(result.findings)
    _print_scan(
        result.findings,
        result.problems,
        recorded,
        fmt,
        {
            "addresses": len(addresses),
            "probes": result.probes,
            "refused": result.refused,
            "timed out": result.timed_out,
        },
    )


@click.command("discovered")
@click.option(
    "--expiring",
    metavar="DURATION",
    default=None,
    help="Only certificates expiring within DURATION (30d, 12h), expired ones included.",
)
@click.option("--self-signed", "self_signed", is_flag=True, help="Only self-signed ones.")
@click.option("--weak", is_flag=True, help="Only weak keys or signatures.")
@click.option("--unknown-issuer", is_flag=True, help="Only those no inventory issuer signed.")
@click.option(
    "--not-in-inventory", is_flag=True, help="Only those that are no version certctl issued."
)
@click.option("--source", type=click.Choice(["file", "network"]), default=None)
@click.option("--host", default=None, help="Only findings of this host ('local': controller).")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text")
@click.pass_context
def discovered(
    ctx: click.Context,
    expiring: str | None,
    self_signed: bool,
    weak: bool,
    unknown_issuer: bool,
    not_in_inventory: bool,
    source: str | None,
    host: str | None,
    fmt: str,
) -> None:
    """List recorded discovery findings (filters combine: all must hold) and a
    summary by category over every finding of the source/host asked for."""
    window_s = 30 * 86400
    if expiring is not None:
        seconds, problem = parse_duration(expiring)
        if problem is not None or seconds is None:
            raise click.BadParameter(problem or "invalid", param_hint="--expiring")
        window_s = seconds
    eng = _engine(ctx)
    inv = eng.inventory()
    store = eng.store()
    findings = report.current(store.list_findings(source=source, host=host))
    known = report.known_context(inv, store, findings)
    rows = report.classify(findings, eng.clock(), timedelta(seconds=window_s), known)
    wanted = [
        cat
        for cat, on in (
            ("expiring", expiring is not None),
            ("self-signed", self_signed),
            ("weak", weak),
            ("unknown-issuer", unknown_issuer),
            ("not-in-inventory", not_in_inventory),
        )
        if on
    ]
    shown = report.select(rows, wanted)
    click.echo(report.render(shown, rows, fmt, window_s / 86400), nl=False)


COMMANDS: list[click.Command] = [discover, discovered]

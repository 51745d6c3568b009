"""``certctl agents [list|show|revoke|delete]`` and ``certctl agent-token
[create|list|revoke]`` (registered by :mod:`certctl.cli`)."""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timedelta
from typing import Any

import click

from certctl.agent.protocol import NAME_RE, OPEN_STATES, AgentRecord
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.inventory.values import parse_duration

TOKEN_PREFIX = "cctla_"  # noqa: S105 - a prefix, not a secret


def _engine(ctx: click.Context) -> Engine:
    eng = ctx.find_root().obj["engine"]
    assert isinstance(eng, Engine)
    return eng


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "never"
    s = int((now - then).total_seconds())
    if s < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit} ago"
    return f"{s}s ago"


def _agent_doc(a: AgentRecord, open_jobs: int) -> dict[str, Any]:
    return {
        "name": a.name,
        "id": a.id,
        "status": a.status,
        "last_seen": a.last_seen.isoformat() if a.last_seen else None,
        "enrolled_at": a.enrolled_at.isoformat(),
        "revoked_at": a.revoked_at.isoformat() if a.revoked_at else None,
        "labels": dict(a.labels),
        "facts": dict(a.facts),
        "open_jobs": open_jobs,
    }


@click.group("agents", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="JSON output (with `list`).")
@click.pass_context
def agents_group(ctx: click.Context, as_json: bool) -> None:
    """Enrolled pull-mode agents: status and last heartbeat (default: list)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(agents_list, as_json=as_json)


@agents_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
@click.option(
    "--status", type=click.Choice(["online", "offline", "revoked"]), help="Only this status."
)
@click.pass_context
def agents_list(ctx: click.Context, as_json: bool = False, status: str | None = None) -> None:
    """List agents with their last heartbeat and status."""
    eng = _engine(ctx)
    store = eng.store()
    agents = store.agents(status=status)
    held: dict[str, int] = {}
    for j in store.agent_jobs(states=("leased", "issued")):
        if j.agent:
            held[j.agent] = held.get(j.agent, 0) + 1
    if as_json:
        click.echo(json.dumps([_agent_doc(a, held.get(a.name, 0)) for a in agents], indent=2))
        return
    if not agents:
        click.echo("No agents enrolled.")
        return
    now = eng.clock()
    rows = [("NAME", "STATUS", "LAST SEEN", "HOST", "OS/ARCH", "VERSION", "IP", "JOBS", "LABELS")]
    for a in agents:
        f = a.facts
        rows.append(
            (
                a.name,
                a.status,
                _age(now, a.last_seen),
                f.get("hostname", ""),
                f"{f.get('os', '')}/{f.get('arch', '')}",
                f.get("version", ""),
                f.get("ip", ""),
                str(held.get(a.name, 0)),
                ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@agents_group.command("show")
@click.argument("name")
@click.pass_context
def agents_show(ctx: click.Context, name: str) -> None:
    """One agent, with its open jobs (JSON)."""
    store = _engine(ctx).store()
    a = store.agent(name)
    if a is None:
        raise CertctlError(f"no agent named {name!r}")
    jobs = [j for j in store.agent_jobs(states=OPEN_STATES) if j.agent == name]
    doc = _agent_doc(a, sum(1 for j in jobs if j.state in ("leased", "issued")))
    doc["jobs"] = [
        {
            "id": j.id,
            "certificate": j.certificate,
            "placement": j.placement,
            "state": j.state,
            "attempts": j.attempts,
            "lease_until": j.lease_until.isoformat() if j.lease_until else None,
            "detail": j.detail,
        }
        for j in jobs
    ]
    click.echo(json.dumps(doc, indent=2))


@agents_group.command("revoke")
@click.argument("name")
@click.pass_context
def agents_revoke(ctx: click.Context, name: str) -> None:
    """Refuse agent NAME from now on (servers follow within about a second); the jobs
    it held go back to the queue."""
    eng = _engine(ctx)
    if not eng.store().revoke_agent(name, eng.clock()):
        if eng.store().agent(name) is None:
            raise CertctlError(f"no agent named {name!r}")
        click.echo(f"Agent {name!r} was already revoked.")
        return
    _audit(eng, "agent.revoke", {"agent": name})
    click.echo(f"Revoked agent {name!r}.")


@agents_group.command("delete")
@click.argument("name")
@click.pass_context
def agents_delete(ctx: click.Context, name: str) -> None:
    """Forget agent NAME (it may enroll again with a new key and a bootstrap token)."""
    eng = _engine(ctx)
    if not eng.store().delete_agent(name, eng.clock()):
        raise CertctlError(f"no agent named {name!r}")
    _audit(eng, "agent.delete", {"agent": name})
    click.echo(f"Deleted agent {name!r}.")


def _audit(eng: Engine, event: str, detail: dict[str, Any]) -> None:
    from certctl.state.base import AuditEvent, Batch

    eng.store().write(Batch(audit=[AuditEvent(event, detail=detail)]))


# ----------------------------------------------------------------- tokens
@click.group("agent-token")
def token_group() -> None:
    """Bootstrap tokens agents enroll with (only their SHA-256 is stored)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@token_group.command("create")
@click.argument("name")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime (30m, 24h, 7d...).")
@click.option("--uses", type=click.IntRange(1), help="How many enrollments (default: any).")
@click.pass_context
def token_create(ctx: click.Context, name: str, ttl: str, uses: int | None) -> None:
    """Create bootstrap token NAME and print it (shown once, never stored)."""
    if not NAME_RE.fullmatch(name):
        raise click.BadParameter("must match [a-z0-9][a-z0-9._-]{0,62}", param_hint="NAME")
    seconds, problem = parse_duration(ttl)
    if seconds is None:
        raise click.BadParameter(problem or "invalid duration", param_hint="--ttl")
    eng = _engine(ctx)
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    expires = eng.clock() + timedelta(seconds=seconds)
    eng.store().create_agent_token(name, hash_token(token), expires_at=expires, uses=uses)
    _audit(eng, "agent_token.create", {"token": name, "expires_at": expires.isoformat()})
    click.echo(token)
    click.echo(
        f"Created agent token {name!r} (expires {expires.isoformat()}, "
        f"{'any number of' if uses is None else uses} enrollment(s)). "
        "Keep it: it is not shown again.",
        err=True,
    )


@token_group.command("list")
@click.pass_context
def token_list(ctx: click.Context) -> None:
    """Bootstrap tokens and their state (never the tokens themselves)."""
    eng = _engine(ctx)
    now = eng.clock()
    tokens = eng.store().agent_tokens()
    if not tokens:
        click.echo("No agent tokens.")
        return
    for t in tokens:
        if t.revoked_at is not None:
            state = "revoked"
        elif t.expires_at is not None and t.expires_at <= now:
            state = "expired"
        elif t.uses_left is not None and t.used >= t.uses_left:
            state = "used up"
        else:
            state = "active"
        limit = "unlimited" if t.uses_left is None else str(t.uses_left)
        expires = t.expires_at.isoformat() if t.expires_at else "never"
        click.echo(f"{t.name}\t{state}\tused {t.used}/{limit}\texpires {expires}")


@token_group.command("revoke")
@click.argument("name")
@click.pass_context
def token_revoke(ctx: click.Context, name: str) -> None:
    """Revoke bootstrap token NAME (agents already enrolled keep working)."""
    eng = _engine(ctx)
    if not eng.store().revoke_agent_token(name):
        raise CertctlError(f"no active agent token named {name!r}")
    _audit(eng, "agent_token.revoke", {"token": name})
    click.echo(f"Revoked agent token {name!r}.")


COMMANDS: list[click.Command] = [agents_group, token_group]

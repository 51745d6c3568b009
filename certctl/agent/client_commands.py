"""``certctl agent enroll`` and ``certctl agent run`` (registered by :mod:`certctl.cli`).

The agent needs no inventory and no state store: these commands never touch the
root group's Engine, so ``-i``/``--state`` are irrelevant to them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from certctl.agent.client_state import DEFAULT_STATE_DIR, AgentState
from certctl.errors import CertctlError

_STATE_DIR = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    envvar="CERTCTL_AGENT_STATE_DIR",
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="Directory (0700) for the credential and the job journal. Env: CERTCTL_AGENT_STATE_DIR.",
)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        out[key] = value
    return out


async def _enroll(
    state_dir: Path,
    server: str,
    token: str,
    name: str,
    labels: dict[str, str],
    ca: str | None,
    insecure_http: bool = False,
) -> str:
    from certctl.agent.client import enroll

    cred = await enroll(
        AgentState(state_dir),
        server=server,
        token=token,
        name=name,
        labels=labels,
        ca_file=ca,
        insecure_http=insecure_http,
    )
    return cred.agent_id


_INSECURE_HTTP = click.option(
    "--insecure-http",
    is_flag=True,
    help="Allow a plain http:// server that is not on this host (token and jobs unencrypted).",
)


@click.group("agent")
def agent() -> None:
    """The pull-mode agent: runs on a host the controller cannot reach, takes its
    work from `certctl serve`, makes keys locally and deploys with the same targets."""


@agent.command("enroll")
@click.option("--server", required=True, envvar="CERTCTL_AGENT_SERVER", help="Server base URL.")
@click.option(
    "--token",
    required=True,
    envvar="CERTCTL_AGENT_TOKEN",
    help="Bootstrap token (`certctl agent-token create`). Env: CERTCTL_AGENT_TOKEN.",
)
@click.option("--name", required=True, help="This agent's name ([a-z0-9][a-z0-9._-]*).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Routing label.")
@click.option("--ca-file", type=click.Path(dir_okay=False), help="CA bundle to trust (PEM).")
@_INSECURE_HTTP
@_STATE_DIR
def enroll_cmd(
    server: str,
    token: str,
    name: str,
    labels: tuple[str, ...],
    ca_file: str | None,
    insecure_http: bool,
    state_dir: Path,
) -> None:
    """Enroll once with a bootstrap token; the credential is stored 0600."""
    agent_id = asyncio.run(
        _enroll(state_dir, server, token, name, _labels(labels), _abs(ca_file), insecure_http)
    )
    click.echo(f"Enrolled agent {name!r} (id {agent_id}); credential in {state_dir}.")


@agent.command("run")
@_STATE_DIR
@click.option("--heartbeat", default=30.0, show_default=True, help="Seconds between heartbeats.")
@click.option(
    "--wait",
    default=25,
    show_default=True,
    type=click.IntRange(0, 60),
    help="Long-poll wait (seconds).",
)
@click.option("--backoff-cap", default=300.0, show_default=True, help="Longest backoff (seconds).")
@click.option("--server", envvar="CERTCTL_AGENT_SERVER", help="Enroll first if needed: server.")
@click.option("--token", envvar="CERTCTL_AGENT_TOKEN", help="Enroll first if needed: token.")
@click.option("--name", help="Enroll first if needed: agent name.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--ca-file", type=click.Path(dir_okay=False))
@_INSECURE_HTTP
@click.option("--max-jobs", type=int, default=None, hidden=True)
def run_cmd(
    state_dir: Path,
    heartbeat: float,
    wait: int,
    backoff_cap: float,
    server: str | None,
    token: str | None,
    name: str | None,
    labels: tuple[str, ...],
    ca_file: str | None,
    insecure_http: bool,
    max_jobs: int | None,
) -> None:
    """Heartbeat, long-poll for work, deploy, report; until SIGTERM (exit 0).

    With --server/--token/--name it enrolls first when the state directory holds no
    credential yet (convenient for a systemd unit)."""
    from certctl.agent.client import AgentSettings, run_agent

    logging.getLogger("certctl.agent").setLevel(
        min(logging.INFO, logging.getLogger().getEffectiveLevel())
    )
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    state = AgentState(state_dir)
    if not state.has_credential():
        if not (server and token and name):
            raise CertctlError(
                f"no credential in {state_dir}: run `certctl agent enroll` first, or pass "
                "--server, --token and --name"
            )
        asyncio.run(
            _enroll(state_dir, server, token, name, _labels(labels), _abs(ca_file), insecure_http)
        )
    settings = AgentSettings(heartbeat_s=heartbeat, wait_s=wait, backoff_cap_s=backoff_cap)
    run_agent(state_dir, settings, max_jobs=max_jobs)


def follow_agent_jobs(eng: Any, jobs: Sequence[tuple[str, str, str]], wait_s: float) -> bool:
    """After an apply: list the agent jobs it handed out and, with ``--agent-wait``,
    follow them until deployed/dead or the wait is over. True when one is dead."""
    from certctl.agent.client_wait import wait_for_jobs

    click.echo(f"Handed {len(jobs)} job(s) to agents:")
    store = eng.store()
    ids = [j for _, _, j in jobs]
    seen = wait_for_jobs(store, ids, wait_s)
    failed = False
    for cert, placement, job_id in jobs:
        rec = seen.get(job_id)
        state = rec.state if rec is not None else "unknown"
        who = f" by agent {rec.agent}" if rec is not None and rec.agent else ""
        line = f"  {state:<8} {cert} -> {placement}{who} (job {job_id[:12]})"
        if rec is not None and rec.state in ("failed", "dead") and rec.detail:
            line += f": {rec.detail[:200]}"
        click.echo(line)
        failed = failed or state == "dead"
    pending = sum(1 for j in ids if j not in seen or seen[j].state not in ("deployed", "dead"))
    if pending:
        click.echo(
            f"{pending} agent job(s) still pending; `certctl plan` shows them as waiting."
            if wait_s > 0
            else "Agents pick the work up now; follow it with `certctl agents` or "
            "`certctl apply --agent-wait SECONDS`."
        )
    return failed


def _abs(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else None


COMMANDS: list[click.Command] = [agent]

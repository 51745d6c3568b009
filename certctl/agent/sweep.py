"""The offline sweep: agents silent for longer than a threshold are marked offline,
the jobs they held go back to the queue (attempts kept), and a notification goes out.

The marking is one conditional ``UPDATE ... RETURNING`` in the same transaction as
the re-queue, so however many processes sweep (the daemon, ``certctl serve``), each
agent going offline is reported by exactly one of them; the notification's
deduplication key (agent name + the last time it was heard from) makes it at most
once per outage even when a pass is repeated.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from certctl import notify
from certctl.agent.protocol import AgentRecord
from certctl.notify.dispatch import NotifySettings
from certctl.state.base import AuditEvent, Batch


@dataclass
class SweepReport:
    offline: list[AgentRecord] = field(default_factory=list)
    requeued: int = 0
    notified: int = 0  # (event, notifier) pairs newly recorded


def offline_events(agents: list[AgentRecord], now: datetime) -> list[notify.Event]:
    out = []
    for a in agents:
        seen = a.last_seen or a.enrolled_at
        out.append(
            notify.Event(
                kind="agent_offline",
                key=f"agent_offline:{a.name}:{seen.isoformat()}",
                title=f"Agent {a.name} is offline",
                text=(
                    f"certctl agent {a.name} ({a.facts.get('hostname') or '?'}, "
                    f"{a.facts.get('ip') or '?'}) has not been heard from since "
                    f"{seen.isoformat()}; its jobs went back to the queue."
                ),
                severity="warning",
                facts={
                    "agent": a.name,
                    "last_seen": seen.isoformat(),
                    "hostname": a.facts.get("hostname"),
                    "ip": a.facts.get("ip"),
                    "labels": dict(a.labels),
                },
            )
        )
    return out


async def sweep_async(engine: Any, now: datetime, offline_after: timedelta) -> SweepReport:
    """One pass (``engine``: an :class:`~certctl.engine.Engine`)."""
    store = engine.store()
    gone, moved = await asyncio.to_thread(store.sweep_offline_agents, now - offline_after, now)
    report = SweepReport(gone, moved)
    if not gone:
        return report
    await asyncio.to_thread(
        store.write,
        Batch(
            audit=[
                AuditEvent(
                    "agent.offline",
                    detail={
                        "agent": a.name,
                        "last_seen": (a.last_seen or a.enrolled_at).isoformat(),
                        "threshold_s": offline_after.total_seconds(),
                    },
                    at=now,
                )
                for a in gone
            ]
            + ([AuditEvent("agent.requeued", detail={"jobs": moved}, at=now)] if moved else [])
        ),
    )
    events = offline_events(gone, now)
    nr = await notify.run_once_async(
        engine, now, settings=NotifySettings(probe_issuers=False), extra_events=events
    )
    report.notified = nr.new
    return report


def sweep(engine: Any, now: datetime, offline_after: timedelta) -> SweepReport:
    """One pass, synchronously (the daemon's loop)."""
    return asyncio.run(sweep_async(engine, now, offline_after))

"""``certctl apply --agent-wait``: follow the agent jobs an apply handed out until each
is deployed or dead, or the wait is over (one query per round, not one per job)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from certctl.agent.protocol import OPEN_STATES, AgentJobRecord
from certctl.state.base import StateStore

FINAL_STATES = ("deployed", "dead")


def wait_for_jobs(
    store: StateStore,
    job_ids: Sequence[str],
    timeout_s: float,
    *,
    on_change: Callable[[AgentJobRecord], None] | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    first_interval_s: float = 0.02,
    max_interval_s: float = 0.5,
) -> dict[str, AgentJobRecord]:
    """The last seen record of each job (missing ids: not found). Polls quickly at
    first (a job usually finishes within a second), then every ``max_interval_s``."""
    wanted = set(job_ids)
    deadline = monotonic() + timeout_s
    seen: dict[str, AgentJobRecord] = {}
    interval = first_interval_s
    done: set[str] = set()

    def note(job: AgentJobRecord) -> None:
        old = seen.get(job.id)
        if on_change is not None and (old is None or old.state != job.state):
            on_change(job)
        seen[job.id] = job

    while True:
        open_ids = set()
        for job in store.agent_jobs(states=OPEN_STATES):  # the open set stays small
            if job.id in wanted:
                open_ids.add(job.id)
                note(job)
        for job_id in sorted(wanted - open_ids - done):  # left the open set: read once
            rec = store.agent_job(job_id)
            if rec is not None:
                note(rec)
                if rec.state in FINAL_STATES:
                    done.add(job_id)
        if all(j in seen and seen[j].state in FINAL_STATES for j in wanted):
            return seen
        left = deadline - monotonic()
        if left <= 0:
            return seen
        sleep(min(interval, left))
        interval = min(max_interval_s, interval * 1.5)

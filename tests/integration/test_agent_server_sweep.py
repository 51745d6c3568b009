"""The offline sweep with a fake clock: agents silent past the threshold go offline
once, their leased jobs are re-queued (attempts kept), and a real webhook receiver
gets one notification per outage."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certctl.agent import sweep
from certctl.agent.protocol import AgentJobSpec
from certctl.daemon.runner import Daemon, DaemonConfig
from certctl.engine import Engine
from tests.integration.test_notify import Receiver, receiver  # noqa: F401  (fixture)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FACTS = {"hostname": "h1", "os": "linux", "arch": "arm64", "version": "1", "ip": "10.1.1.1"}


def _inventory(tmp_path: Path, receiver: Receiver) -> Path:  # noqa: F811
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(
        f"""
issuers: {{ca: {{type: local_ca, root: {{common_name: Sweep CA}}}}}}
defaults: {{issuer: ca}}
certificates: {{}}
notifiers:
  hook: {{type: webhook, url: "{receiver.url("/hook")}", events: [agent_offline]}}
""",
        encoding="utf-8",
    )
    return inv


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_sweep_marks_offline_requeues_and_notifies_once(
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    inv = _inventory(tmp_path, receiver)
    state = (
        str(tmp_path / "s.db") if backend == "sqlite" else request.getfixturevalue("make_pg_db")()
    )
    now = {"t": T0}
    clock: Callable[[], datetime] = lambda: now["t"]  # noqa: E731
    eng = Engine(inventory_path=inv, state_url=state, clock=clock)
    try:
        store = eng.store()
        store.enroll_agent("quiet", "K1", {}, FACTS, token="t", now=T0)
        chatty, _ = store.enroll_agent("chatty", "K2", {}, FACTS, token="t", now=T0)
        (jid,) = store.enqueue_agent_jobs(
            [AgentJobSpec("c", "c@x", {"name": "quiet"}, {"target": {"type": "file"}})]
        )
        assert store.lease_agent_job(jid, "quiet", T0, T0 + timedelta(seconds=600))
        store.record_heartbeats([(chatty.id, T0 + timedelta(seconds=80), None)])

        after = timedelta(seconds=90)
        # not yet: 89 s of silence
        report = asyncio.run(sweep.sweep_async(eng, T0 + timedelta(seconds=89), after))
        assert report.offline == [] and receiver.at("/hook") == []

        report = asyncio.run(sweep.sweep_async(eng, T0 + timedelta(seconds=100), after))
        assert [a.name for a in report.offline] == ["quiet"] and report.requeued == 1
        assert store.agent("quiet").status == "offline"
        assert store.agent("chatty").status == "online"
        job = store.agent_job(jid)
        assert job is not None and (job.state, job.attempts, job.lease_until) == ("queued", 0, None)
        (hook,) = receiver.at("/hook")
        payload = json.loads(hook.body)
        assert payload["event"] == "agent_offline" and payload["agent"] == "quiet"
        assert "quiet" in payload["title"]

        # a second pass (or a second sweeping process) reports nothing new
        report = asyncio.run(sweep.sweep_async(eng, T0 + timedelta(seconds=200), after))
        assert [a.name for a in report.offline] == ["chatty"]
        assert [json.loads(h.body)["agent"] for h in receiver.at("/hook")] == ["quiet", "chatty"]
        events = [e["event"] for e in store.list_audit(before=None, limit=20)]
        assert events.count("agent.offline") == 2 and "agent.requeued" in events
    finally:
        eng.close()


def test_daemon_runs_the_sweep(tmp_path: Path, receiver: Receiver) -> None:  # noqa: F811
    inv = _inventory(tmp_path, receiver)
    eng = Engine(inventory_path=inv)
    try:
        old = datetime.now(UTC) - timedelta(seconds=30)
        eng.store().enroll_agent("gone", "K1", {}, FACTS, token="t", now=old)
    finally:
        eng.close()
    said: list[str] = []
    daemon = Daemon(DaemonConfig(inventory_path=inv, agent_offline_after=10), say=said.append)
    assert "agents" in [loop.name for loop in daemon.loops()]
    daemon.agents_tick()
    assert said == ["agents: gone is offline (silent for more than 0:00:10)"]
    assert [json.loads(h.body)["agent"] for h in receiver.at("/hook")] == ["gone"]
    daemon.agents_tick()
    assert len(said) == 1

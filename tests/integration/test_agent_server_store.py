"""The agent tables of the state store (migration 0006), on both real backends."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certctl.agent.protocol import AgentJobSpec
from certctl.errors import StateError
from certctl.state import open_store
from certctl.state.agents import ConflictError
from certctl.state.base import StateStore

T0 = datetime(2026, 1, 1, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sqlite", "postgres"])
def env(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[StateStore, Clock, Callable[[], StateStore]]]:
    clock = Clock()
    if request.param == "sqlite":
        url = str(tmp_path / "state.db")
    else:
        url = request.getfixturevalue("make_pg_db")()
    opened: list[StateStore] = []

    def another() -> StateStore:
        s = open_store(url, inventory_root=tmp_path, clock=clock)
        opened.append(s)
        return s

    store = another()
    yield store, clock, another
    for s in opened:
        s.close()


def spec(cert: str = "www", placement: str = "www@web", target: str = "a") -> AgentJobSpec:
    return AgentJobSpec(
        certificate=cert,
        placement=placement,
        selector={"name": "edge1"},
        job={"version_hint": None, "target": {"type": "file", "config": {"x": target}}},
    )


def test_enqueue_is_idempotent_and_supersedes(env) -> None:
    store, _clock, _ = env
    g0 = store.agent_generations()[0]
    a, b = store.enqueue_agent_jobs([spec(), spec(placement="www@web2")])
    assert a != b
    assert store.enqueue_agent_jobs([spec()]) == [a]  # identical open job: same id
    assert store.agent_generations()[0] == g0 + 1  # the no-op did not bump
    (c,) = store.enqueue_agent_jobs([spec(target="b")])  # changed spec: a new job
    assert c != a
    states = {j.id: j.state for j in store.agent_jobs(certificate="www")}
    assert states == {a: "dead", b: "queued", c: "queued"}
    assert "superseded" in (store.agent_job(a).detail or "")
    assert {j.id for j in store.agent_jobs(states=["queued"])} == {b, c}


def test_lease_has_one_winner_and_resume(env) -> None:
    store, _clock, another = env
    (jid,) = store.enqueue_agent_jobs([spec()])
    until = T0 + timedelta(seconds=120)
    others = [another() for _ in range(4)]
    won: list[str] = []

    def grab(s: StateStore, name: str) -> None:
        if s.lease_agent_job(jid, name, T0, until) is not None:
            won.append(name)

    threads = [threading.Thread(target=grab, args=(s, f"a{i}")) for i, s in enumerate(others)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    holder = won[0]
    assert store.claimable_agent_jobs(T0) == []
    # the holder asks again (a restart): it gets the job back
    again = store.lease_agent_job(jid, holder, T0, until)
    assert again is not None and again.state == "leased" and again.agent == holder
    # issued for the holder, then its lease runs out: another agent starts over at csr
    assert store.journal_agent_csr(jid, holder, "pk1", {"order": "x"}, until)
    assert store.mark_agent_job_issued(jid, holder, 3, until)
    late = until + timedelta(seconds=1)
    assert [j.id for j in store.claimable_agent_jobs(late)] == [jid]
    taken = store.lease_agent_job(jid, "other", late, late + timedelta(seconds=120))
    assert taken is not None
    assert (taken.state, taken.version, taken.public_key, taken.issue_payload) == (
        "leased",
        None,
        None,
        None,
    )
    # the old holder has lost it
    assert not store.renew_agent_job(jid, holder, late + timedelta(seconds=60))
    assert not store.finish_agent_job(jid, holder, state="deployed", detail="")
    assert store.finish_agent_job(jid, "other", state="deployed", detail="ok", fingerprint="f")
    assert store.agent_job(jid).state == "deployed"


def test_failed_job_waits_for_its_retry_time(env) -> None:
    store, _clock, _ = env
    (jid,) = store.enqueue_agent_jobs([spec()])
    assert store.lease_agent_job(jid, "edge1", T0, T0 + timedelta(seconds=120))
    retry = T0 + timedelta(seconds=60)
    assert store.finish_agent_job(
        jid, "edge1", state="failed", detail="boom", attempts=1, next_attempt_at=retry
    )
    assert store.claimable_agent_jobs(T0 + timedelta(seconds=59)) == []
    (j,) = store.claimable_agent_jobs(retry)
    assert (j.attempts, j.detail) == (1, "boom")


def test_tokens_uses_expiry_revocation(env) -> None:
    store, _clock, _ = env
    store.create_agent_token("t1", "ab" * 32, expires_at=T0 + timedelta(hours=1), uses=2)
    with pytest.raises(StateError, match="already exists"):
        store.create_agent_token("t1", "cd" * 32, expires_at=None, uses=None)
    assert store.consume_agent_token("t1", T0)
    assert store.consume_agent_token("t1", T0)
    assert not store.consume_agent_token("t1", T0)  # used up
    store.refund_agent_token("t1")
    assert not store.consume_agent_token("t1", T0 + timedelta(hours=2))  # expired
    assert store.revoke_agent_token("t1")
    assert not store.consume_agent_token("t1", T0)  # revoked
    (tok,) = store.agent_tokens()
    assert tok.used == 1 and tok.revoked_at is not None and tok.token_hash == "ab" * 32


def test_enroll_heartbeat_sweep_revoke_delete(env) -> None:
    store, _clock, _ = env
    facts = {"hostname": "h", "os": "linux", "arch": "x86_64", "version": "1", "ip": "10.0.0.1"}
    a, created = store.enroll_agent("edge1", "KEY1", {"site": "a"}, facts, token="t", now=T0)
    assert created and a.status == "online"
    again, created = store.enroll_agent("edge1", "KEY1", {}, facts, token="t", now=T0)
    assert not created and again.id == a.id
    with pytest.raises(ConflictError, match="another key"):
        store.enroll_agent("edge1", "KEY2", {}, facts, token="t", now=T0)
    b, _ = store.enroll_agent("edge2", "KEY3", {}, facts, token="t", now=T0)

    (jid,) = store.enqueue_agent_jobs([spec()])
    assert store.lease_agent_job(jid, "edge1", T0, T0 + timedelta(seconds=120))
    store.record_heartbeats(
        [(b.id, T0 + timedelta(seconds=100), {**facts, "ip": "10.0.0.9"}), (a.id, T0, None)]
    )
    assert store.agent("edge2").facts["ip"] == "10.0.0.9"
    g = store.agent_generations()[0]
    gone, moved = store.sweep_offline_agents(
        T0 + timedelta(seconds=50), T0 + timedelta(seconds=140)
    )
    assert [x.name for x in gone] == ["edge1"] and moved == 1
    assert store.agent("edge1").status == "offline" and store.agent("edge2").status == "online"
    job = store.agent_job(jid)
    assert (job.state, job.agent) == ("queued", "edge1")  # re-queued, attempts kept
    assert store.agent_generations()[0] == g + 1
    assert store.sweep_offline_agents(T0 + timedelta(seconds=50), T0) == ([], 0)  # once
    # a heartbeat brings it back online
    store.record_heartbeats([(a.id, T0 + timedelta(seconds=150), None)])
    assert store.agent("edge1").status == "online"

    ga = store.agent_generations()[1]
    assert store.revoke_agent("edge1", T0)
    assert not store.revoke_agent("edge1", T0)
    assert store.agent_generations()[1] == ga + 1
    with pytest.raises(ConflictError, match="revoked"):
        store.enroll_agent("edge1", "KEY1", {}, facts, token="t", now=T0)
    assert store.delete_agent("edge1", T0)
    new, created = store.enroll_agent("edge1", "KEY2", {}, facts, token="t", now=T0)
    assert created and new.id != a.id
    assert [x.name for x in store.agents()] == ["edge1", "edge2"]


def test_heard_from_agents_keep_their_leases(env) -> None:
    store, _clock, _ = env
    a, b = store.enqueue_agent_jobs([spec(), spec(placement="www@web2")])
    short = T0 + timedelta(seconds=10)
    assert store.lease_agent_job(a, "edge1", T0, short)
    assert store.lease_agent_job(b, "edge2", T0, short)
    long = T0 + timedelta(seconds=120)
    assert store.renew_agent_leases(["edge1", "edge1"], long) == 1
    assert store.renew_agent_leases(["edge1"], long) == 0  # already that long
    later = T0 + timedelta(seconds=11)
    assert [j.id for j in store.claimable_agent_jobs(later)] == [b]

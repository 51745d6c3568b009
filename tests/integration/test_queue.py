"""The PostgreSQL job queue (certctl.workers.queue) against a real PostgreSQL: claims,
leases, completion tokens, retries, dead jobs, deduplication, and the worker loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from certctl.state import open_store
from certctl.workers.queue import JobQueue, NewJob, Outcome, require_postgres
from certctl.workers.worker import NoopHandler, Worker, WorkerSettings

EFFECTS = NoopHandler.effects


@pytest.fixture
def url(make_pg_db: Callable[[], str], tmp_path: Path) -> str:
    u = make_pg_db()
    open_store(u, inventory_root=tmp_path).close()  # migrations
    return u


@pytest.fixture
def queues(url: str) -> Iterator[Callable[[str], JobQueue]]:
    made: list[JobQueue] = []

    def make(worker: str) -> JobQueue:
        q = JobQueue(url, worker)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def _scalar(url: str, sql: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def test_concurrent_claims_never_share_a_job(url: str, queues: Callable[[str], JobQueue]) -> None:
    producer = queues("producer")
    ids = producer.enqueue([NewJob("noop", {"i": i}) for i in range(1000)])
    assert len(set(ids)) == 1000
    claimed: dict[str, list[int]] = {}

    def drain(name: str) -> None:
        q = JobQueue(url, name)
        try:
            mine: list[int] = []
            while jobs := q.claim(["noop"], 37, 30):
                mine += [j.id for j in jobs]
                q.finish([Outcome(j, "done") for j in jobs], effects=EFFECTS)
            claimed[name] = mine
        finally:
            q.close()

    threads = [threading.Thread(target=drain, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for mine in claimed.values() for i in mine]
    assert sorted(every) == sorted(ids)  # each job claimed by exactly one worker
    assert _scalar(url, "SELECT count(*) FROM job_effects") == 1000
    assert producer.counts(ids)["done"] == 1000


def test_expired_lease_is_taken_over_and_the_late_completion_refused(
    url: str, queues: Callable[[str], JobQueue]
) -> None:
    producer, slow, fast = queues("p"), queues("slow"), queues("fast")
    (job_id,) = producer.enqueue([NewJob("noop")])
    (held,) = slow.claim(["noop"], 10, 0.3)
    assert held.attempt == 1
    assert fast.claim(["noop"], 10, 30) == []  # leased: not claimable
    time.sleep(0.5)
    assert fast.reap() == {job_id: "queued"}
    (taken,) = fast.claim(["noop"], 10, 30)
    assert (taken.id, taken.attempt) == (job_id, 2)
    # The stalled worker wakes up and completes: refused, no side effect.
    assert slow.finish([Outcome(held, "done")], effects=EFFECTS) == {}
    assert slow.renew([held], 30) == set()
    assert fast.finish([Outcome(taken, "done")], effects=EFFECTS) == {job_id: "done"}
    assert _scalar(url, "SELECT count(*) FROM job_effects") == 1
    assert _scalar(url, "SELECT attempt FROM job_effects") == 2


def test_renewed_lease_is_not_reaped(url: str, queues: Callable[[str], JobQueue]) -> None:
    producer, worker, other = queues("p"), queues("w"), queues("o")
    producer.enqueue([NewJob("noop")])
    # Renewed past its first lease (1.2 s > 1 s); each renewal leaves 1 s, ample
    # on a loaded machine for the next statement.
    jobs = worker.claim(["noop"], 10, 1.0)
    for _ in range(4):
        time.sleep(0.3)
        assert worker.renew(jobs, 1.0) == {jobs[0].id}
    assert other.reap() == {}
    assert worker.finish([Outcome(jobs[0], "done")]) == {jobs[0].id: "done"}


def test_retries_back_off_then_the_job_dies_with_its_last_error(
    url: str, queues: Callable[[str], JobQueue]
) -> None:
    producer, w = queues("p"), queues("w")
    (job_id,) = producer.enqueue([NewJob("noop", max_attempts=2)])
    (j1,) = w.claim(["noop"], 1, 30)
    assert w.finish([Outcome(j1, "retry", error="boom 1", delay_s=1.5)]) == {job_id: "queued"}
    assert w.claim(["noop"], 1, 30) == []  # backing off
    time.sleep(1.6)
    (j2,) = w.claim(["noop"], 1, 30)
    assert j2.attempt == 2
    assert w.finish([Outcome(j2, "retry", error="boom 2")]) == {job_id: "dead"}
    assert producer.problems([job_id]) == [(job_id, "dead", "boom 2")]


def test_release_does_not_count_an_attempt(url: str, queues: Callable[[str], JobQueue]) -> None:
    producer, w = queues("p"), queues("w")
    producer.enqueue([NewJob("noop", max_attempts=1)])
    for _ in range(3):
        (j,) = w.claim(["noop"], 1, 30)
        assert j.attempt == 1
        w.finish([Outcome(j, "release")])
    (j,) = w.claim(["noop"], 1, 30)
    assert w.finish([Outcome(j, "done")]) == {j.id: "done"}


def test_dedupe_key_while_pending_only(url: str, queues: Callable[[str], JobQueue]) -> None:
    producer, w = queues("p"), queues("w")
    a = producer.enqueue([NewJob("noop", dedupe_key="apply:www"), NewJob("noop")])
    b = producer.enqueue([NewJob("noop", dedupe_key="apply:www")])
    assert b == [a[0]]  # the pending job, not a second one
    assert producer.counts()["queued"] == 2
    jobs = w.claim(["noop"], 10, 30)
    w.finish([Outcome(j, "done") for j in jobs])
    c = producer.enqueue([NewJob("noop", dedupe_key="apply:www")])
    assert c[0] not in a  # done: the same work may be queued again


def test_claim_only_takes_the_kinds_asked_for(url: str, queues: Callable[[str], JobQueue]) -> None:
    producer, w = queues("p"), queues("w")
    producer.enqueue([NewJob("apply", {"cert": "x"}), NewJob("noop")])
    jobs = w.claim(["noop"], 10, 30)
    assert [j.kind for j in jobs] == ["noop"]


def test_a_draining_worker_ignores_jobs_of_kinds_it_does_not_take(url: str) -> None:
    """`certctl worker --drain --kinds noop` exits once the noop jobs are done, even
    while apply jobs (for other workers) wait in the queue."""
    q = JobQueue(url, "producer")
    try:
        q.enqueue([NewJob("apply", {"cert": "x"}), NewJob("noop")])
        settings = WorkerSettings(poll_s=0.05, lease_s=5, drain=True)
        w = Worker(url, [NoopHandler()], settings, say=lambda _: None)
        stop = threading.Event()
        t = threading.Thread(target=w.run, args=(stop,))
        t.start()
        t.join(timeout=15)
        stop.set()
        t.join(timeout=30)
        assert w.done == 1
        assert q.counts() == {"queued": 1, "leased": 0, "done": 1, "failed": 0, "dead": 0}
        assert _scalar(url, "SELECT count(*) FROM workers WHERE stopped_at IS NOT NULL") == 1
        assert _scalar(url, "SELECT EXTRACT(EPOCH FROM stopped_at - started_at) FROM workers") < 10
    finally:
        q.close()


def test_worker_loop_drains_retries_and_records_failures(url: str) -> None:
    q = JobQueue(url, "producer")
    try:
        q.enqueue(
            [NewJob("noop", {"i": i}) for i in range(250)]
            + [NewJob("noop", {"fail": "once"}), NewJob("noop", {"fail": "permanent"})]
            + [NewJob("noop", {"fail": "always"}, max_attempts=2)]
        )
        settings = WorkerSettings(batch=50, lease_s=5, poll_s=0.05, drain=True, retry_base_s=0)
        w = Worker(url, [NoopHandler()], settings)
        done = w.run(threading.Event())
        assert done == 251
        assert q.counts() == {"queued": 0, "leased": 0, "done": 251, "failed": 1, "dead": 1}
        assert _scalar(url, "SELECT count(DISTINCT job_id) FROM job_effects") == 251
        assert _scalar(url, "SELECT count(*) FROM job_effects") == 251
        assert _scalar(url, "SELECT count(*) FROM workers WHERE stopped_at IS NOT NULL") == 1
    finally:
        q.close()


def test_idle_worker_wakes_on_notify(url: str) -> None:
    """A worker waiting with a long poll interval takes new work at once (NOTIFY)."""
    stop = threading.Event()
    w = Worker(url, [NoopHandler()], WorkerSettings(poll_s=30, lease_s=60))
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    try:
        time.sleep(0.5)  # idle, waiting on LISTEN
        q = JobQueue(url, "producer")
        started = time.monotonic()
        ids = q.enqueue([NewJob("noop")])
        while q.counts(ids)["done"] < 1 and time.monotonic() - started < 10:
            time.sleep(0.01)
        took = time.monotonic() - started
        q.close()
        # Far below the 30 s poll (the slack is for a loaded machine).
        assert took < 5.0, f"took {took:.2f}s: the NOTIFY did not wake the worker"
    finally:
        stop.set()
        t.join(timeout=40)
    assert not t.is_alive()


def test_workers_need_postgresql() -> None:
    with pytest.raises(Exception, match="needs a PostgreSQL state store"):
        require_postgres(None, "certctl worker")
    with pytest.raises(Exception, match=r"SQLite \(/tmp/x.db\)"):
        require_postgres("/tmp/x.db", "certctl worker")
    assert require_postgres("postgresql://h/db", "x") == "postgresql://h/db"


def test_worker_survives_losing_its_database_connection(url: str) -> None:
    stop = threading.Event()
    w = Worker(url, [NoopHandler()], WorkerSettings(poll_s=0.1, lease_s=5), say=lambda _: None)
    t = threading.Thread(target=w.run, args=(stop,))
    t.start()
    q = JobQueue(url, "producer")
    try:
        first = q.enqueue([NewJob("noop") for _ in range(50)])
        deadline = time.monotonic() + 20
        while q.counts(first)["done"] < 50:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (f"certctl worker {w.id}",),
            ).fetchone()
        assert row is not None
        killed = int(row[0])
        assert killed >= 1
        second = q.enqueue([NewJob("noop") for _ in range(50)])
        while q.counts(second)["done"] < 50:
            assert time.monotonic() < deadline, "the worker did not come back"
            time.sleep(0.05)
    finally:
        stop.set()
        t.join(timeout=30)
        q.close()
    assert not t.is_alive() and w.done == 100
    assert _scalar(url, "SELECT count(*) FROM job_effects") == 100


def test_prune_forgets_old_final_jobs_only(url: str, queues: Callable[[str], JobQueue]) -> None:
    q = queues("p")
    ids = q.enqueue([NewJob("noop") for _ in range(3)])
    jobs = q.claim(["noop"], 2, 30)
    q.finish([Outcome(jobs[0], "done"), Outcome(jobs[1], "failed", error="x")])
    q.conn.execute("UPDATE jobs SET updated_at = now() - interval '10 days'")
    assert q.prune() == 1  # the old done job; failed ones are kept 30 days
    assert q.counts(ids) == {"queued": 1, "leased": 0, "done": 0, "failed": 1, "dead": 0}

"""Apply jobs (certctl.workers.applyjobs) against a real PostgreSQL, local CA and file
targets: the apply lock between workers and a plain apply, and the re-check of each
job against the worker's own plan (already done, partly done, stale)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from certctl.engine import Engine
from certctl.errors import LockedError
from certctl.plan.planner import profile_for, spec_digest
from certctl.state.base import Batch, CertUpdate
from certctl.workers import applyjobs
from certctl.workers.queue import Job, JobQueue, Outcome
from tests.e2e.conftest import BASE, certs_yaml
from tests.e2e.worker_support import assert_issued_by_stored_ca


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    root = tmp_path / "inventory"
    root.mkdir()
    (root / "base.yaml").write_text(BASE, encoding="utf-8")
    (root / "certs.yaml").write_text(
        certs_yaml(
            {
                "c0": "common_name: c0.e2e.test\ntargets: [files, combined]",
                "c1": "common_name: c1.e2e.test\ntargets: [files]",
            }
        ),
        encoding="utf-8",
    )
    return root


@pytest.fixture
def url(make_pg_db: Callable[[], str]) -> str:
    return make_pg_db()


@pytest.fixture
def engines(inv: Path, url: str) -> Iterator[Callable[[], Engine]]:
    made: list[Engine] = []

    def make() -> Engine:
        eng = Engine(inventory_path=inv, state_url=url)
        made.append(eng)
        return eng

    yield make
    for e in made:
        e.close()


def _claim(url: str, worker: str) -> tuple[JobQueue, list[Job]]:
    q = JobQueue(url, worker)
    return q, q.claim(["apply"], 100, 60)


def _run_as_w1(inv: Path, url: str) -> dict[str, Outcome]:
    """Worker w1 claims the apply jobs and runs them: each outcome by certificate."""
    handler = applyjobs.ApplyHandler(inv, url, holder="w1")
    q, jobs = _claim(url, "w1")
    try:
        return {str(o.job.payload["cert"]): o for o in handler.run(jobs)}
    finally:
        handler.close()
        q.close()


def test_plain_apply_fails_fast_while_a_worker_runs_a_batch(
    url: str, engines: Callable[[], Engine]
) -> None:
    engines().store()  # migrate
    a = applyjobs.SharedApplyLock(url, "host:1:aaa")
    b = applyjobs.SharedApplyLock(url, "host:2:bbb")
    try:
        assert a.acquire() and b.acquire()  # workers share the lock
        with pytest.raises(LockedError, match="worker host:"):
            engines().apply(holder="alice@laptop")
        a.release()
        b.release()
        plan, report = engines().apply(holder="alice@laptop")  # free again
        assert report is not None and not report.failed and plan.actions
    finally:
        a.close()
        b.close()


def test_a_batch_is_put_back_untried_while_a_plain_apply_holds_the_lock(
    url: str, inv: Path, engines: Callable[[], Engine]
) -> None:
    sub = applyjobs.submit(engines(), holder="submitter")
    assert sub is not None and len(sub.job_ids) == 2
    plain = engines().store()
    plain.acquire_apply_lock("bob@box (plain apply)")
    handler = applyjobs.ApplyHandler(inv, url, holder="w1", lock_wait_s=0.3)
    q, jobs = _claim(url, "w1")
    try:
        outcomes = handler.run(jobs)
        assert {o.status for o in outcomes} == {"release"}
        assert q.finish(outcomes) == {j.id: "queued" for j in jobs}
        assert not (inv / "out").exists()  # nothing was done
        plain.release_apply_lock()
        q.conn.execute("UPDATE jobs SET run_after = now()")
        jobs = q.claim(["apply"], 100, 60)
        assert [j.attempt for j in jobs] == [1, 1]  # the release did not count
        outcomes = handler.run(jobs)
        assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
        assert q.finish(outcomes) == {j.id: "done" for j in jobs}
        assert (inv / "out" / "files" / "c0" / "fullchain.pem").is_file()
    finally:
        handler.close()
        q.close()


def test_a_batch_claimed_just_before_the_enqueuer_lets_go_of_the_lock_waits_for_it(
    url: str, inv: Path, engines: Callable[[], Engine]
) -> None:
    """The enqueue commits (and its NOTIFY wakes the workers) while the submitter
    still holds the apply lock: a worker that claims at once must wait the moment
    out, not put the batch back for seconds (which, with a leader re-planning every
    few seconds under the lock, can starve the jobs)."""
    sub = applyjobs.submit(engines(), holder="submitter")
    assert sub is not None
    plain = engines().store()
    plain.acquire_apply_lock("leader (apply loop)")
    releaser = threading.Timer(0.5, plain.release_apply_lock)
    handler = applyjobs.ApplyHandler(inv, url, holder="w1")
    q, jobs = _claim(url, "w1")
    try:
        releaser.start()
        outcomes = handler.run(jobs)
        assert [o.status for o in outcomes] == ["done", "done"], [o.error for o in outcomes]
        assert q.finish(outcomes) == {j.id: "done" for j in jobs}
    finally:
        releaser.join()
        handler.close()
        q.close()


def test_jobs_are_rechecked_against_the_workers_own_plan(
    url: str, inv: Path, engines: Callable[[], Engine]
) -> None:
    sub = applyjobs.submit(engines(), holder="submitter")
    assert sub is not None
    # Meanwhile a plain apply did everything, then one deployed file went missing
    # (as if a worker had died between deploys).
    _, report = engines().apply(holder="plain")
    assert report is not None and not report.failed
    (inv / "out" / "files" / "c0" / "fullchain.pem").unlink()
    handler = applyjobs.ApplyHandler(inv, url, holder="w1")
    q, jobs = _claim(url, "w1")
    try:
        by_cert = {str(o.job.payload["cert"]): o for o in handler.run(jobs)}
        assert by_cert["c1"].status == "done"
        assert by_cert["c1"].result == {"already_done": True}
        c0 = by_cert["c0"]
        assert c0.status == "done", c0.error
        assert c0.result is not None and c0.result["done"] == ["deploy:c0:files"]
        q.finish(list(by_cert.values()))
    finally:
        handler.close()
        q.close()
    assert (inv / "out" / "files" / "c0" / "fullchain.pem").is_file()
    store = engines().store()
    assert [v.version for v in store.versions("c0")] == [1]  # redeployed, not reissued


def test_a_job_whose_certificate_now_needs_more_is_stale(
    url: str, inv: Path, engines: Callable[[], Engine]
) -> None:
    sub = applyjobs.submit(engines(), holder="submitter")
    assert sub is not None
    # The inventory changes after the plan was approved: c1 gets a second target.
    text = (inv / "certs.yaml").read_text(encoding="utf-8")
    (inv / "certs.yaml").write_text(
        text.replace(
            "c1.e2e.test\n    targets: [files]", "c1.e2e.test\n    targets: [files, combined]"
        ),
        encoding="utf-8",
    )
    outcomes = _run_as_w1(inv, url)
    assert outcomes["c0"].status == "done"
    assert outcomes["c1"].status == "failed"
    assert "stale" in (outcomes["c1"].error or "")
    assert "deploy:c1:combined" in (outcomes["c1"].error or "")
    assert not (inv / "out" / "files" / "c1").exists()  # nothing done for the stale job


def _slow_ca_submitted(tmp_path: Path, url: str, certs: int) -> Path:
    """An inventory of ``certs`` certificates (c0, c1, ...) from a CA not made yet,
    with a slow RSA-4096 root, submitted as apply jobs; its directory."""
    root = tmp_path / "slowca"
    root.mkdir()
    (root / "base.yaml").write_text(
        BASE.replace(
            "root: {common_name: E2E Root CA, key: {type: ecdsa, curve: P-256}, ttl: 3650d}",
            "root: {common_name: E2E Root CA, key: {type: rsa, size: 4096}, ttl: 3650d}",
        ),
        encoding="utf-8",
    )
    (root / "certs.yaml").write_text(
        certs_yaml(
            {f"c{i}": f"common_name: c{i}.e2e.test\ntargets: [files]" for i in range(certs)}
        ),
        encoding="utf-8",
    )
    eng = Engine(inventory_path=root, state_url=url)
    try:
        assert applyjobs.submit(eng, holder="submitter") is not None
    finally:
        eng.close()
    return root


def test_two_workers_on_a_fresh_ca_create_it_once(url: str, tmp_path: Path) -> None:
    """The CA is made on first use; two workers issuing at the same moment must not
    each make their own (a slow RSA-4096 root widens the window)."""
    root = _slow_ca_submitted(tmp_path, url, 2)
    handlers = [applyjobs.ApplyHandler(root, url, holder=f"w{i}") for i in range(2)]
    claims = [JobQueue(url, f"w{i}") for i in range(2)]
    batches = [q.claim(["apply"], 1, 60) for q in claims]
    assert [len(b) for b in batches] == [1, 1]
    results: list[list[Outcome]] = [[], []]
    barrier = threading.Barrier(2)

    def work(i: int) -> None:
        barrier.wait()
        results[i] = handlers[i].run(batches[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    finally:
        for h in handlers:
            h.close()
        for q in claims:
            q.close()
    assert [o.status for r in results for o in r] == ["done", "done"]
    assert_issued_by_stored_ca(url, root / "out" / "files", 2)


def test_a_job_whose_certificate_backs_off_fails_with_the_reason(
    url: str, inv: Path, engines: Callable[[], Engine]
) -> None:
    sub = applyjobs.submit(engines(), holder="submitter")
    assert sub is not None
    eng = engines()
    c1 = eng.inventory().certificates["c1"]
    spec = spec_digest(c1, profile_for(eng.inventory(), c1))
    later = datetime.now(UTC) + timedelta(hours=1)
    eng.store().write(
        Batch(cert_updates=[CertUpdate("c1", failures=1, next_attempt_at=later, spec_digest=spec)])
    )
    outcomes = _run_as_w1(inv, url)
    assert outcomes["c0"].status == "done"
    assert outcomes["c1"].status == "failed"
    assert outcomes["c1"].result is not None and "held_back" in outcomes["c1"].result
    assert not (inv / "out" / "files" / "c1").exists()


def test_a_worker_whose_lease_expired_mid_apply_keeps_the_certificate_to_itself(
    url: str, tmp_path: Path
) -> None:
    """Worker A stalls past its lease while applying c0 (simulated: its lease is
    expired in the table while it works); worker B reaps and claims the job. B must
    not act on c0 while A still does: it puts the job back untried, and c0 is issued
    once (one version, one CA signature)."""
    # A slow RSA-4096 root keeps A busy (inside the issuer section) long enough.
    root = _slow_ca_submitted(tmp_path, url, 1)
    qa, qb = JobQueue(url, "wA"), JobQueue(url, "wB")
    ha = applyjobs.ApplyHandler(root, url, holder="wA")
    hb = applyjobs.ApplyHandler(root, url, holder="wB")
    a_out: list[Outcome] = []
    try:
        jobs_a = qa.claim(["apply"], 10, 60)
        assert len(jobs_a) == 1
        a = threading.Thread(target=lambda: a_out.extend(ha.run(jobs_a)))
        a.start()
        try:
            # Wait until A is inside the issuer section (making the slow CA).
            deadline = time.monotonic() + 60
            while not qb.conn.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND classid = %s AND objid = 4",
                (applyjobs._LOCK_CLASS,),
            ).fetchone()[0]:
                assert time.monotonic() < deadline and a.is_alive(), "A never got busy"
                time.sleep(0.005)
            # A stalls past its lease: B reaps the job and claims it.
            qb.conn.execute("UPDATE jobs SET lease_until = now() - interval '1 second'")
            assert qb.reap() == {jobs_a[0].id: "queued"}
            jobs_b = qb.claim(["apply"], 10, 60)
            assert [j.attempt for j in jobs_b] == [2]
            b_out = hb.run(jobs_b)
            assert [o.status for o in b_out] == ["release"], [o.error for o in b_out]
            assert "another worker" in (b_out[0].error or "")
            assert qb.finish(b_out) == {jobs_b[0].id: "queued"}
        finally:
            a.join(timeout=120)
        assert [o.status for o in a_out] == ["done"], [o.error for o in a_out]
        # A's completion is refused: its lease was lost meanwhile.
        assert qa.finish(a_out) == {}
        # The job comes back (attempt 2 again: the release did not count); the
        # certificate is done already, so the job completes without acting.
        qb.conn.execute("UPDATE jobs SET run_after = now()")
        jobs_b = qb.claim(["apply"], 10, 60)
        b_out = hb.run(jobs_b)
        assert [(o.status, o.result) for o in b_out] == [("done", {"already_done": True})]
        assert qb.finish(b_out) == {jobs_b[0].id: "done"}
    finally:
        ha.close()
        hb.close()
        qa.close()
        qb.close()
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT count(*) FROM certificate_versions").fetchone()
        assert row is not None and row[0] == 1
        row = conn.execute("SELECT count(*) FROM audit WHERE event = 'issue'").fetchone()
        assert row is not None and row[0] == 1

"""One ``certctl worker`` process: claims jobs in batches, hands each batch to the
handler of its kind, records the outcomes in one statement, and keeps its leases
alive from a heartbeat thread while a long batch runs.

A handler is a small object (see :class:`Handler`): ``kind`` names the jobs it
takes; ``run(jobs)`` returns one :class:`~certctl.workers.queue.Outcome` per job; and
``effects`` is an optional SQL fragment the queue runs in the completion statement
(the database side effect that must happen exactly once). An exception from ``run``
is a retry of every job in the batch, with the error recorded.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import psycopg

from certctl.errors import CertctlError, StateError
from certctl.workers.queue import Job, JobQueue, Outcome

log = logging.getLogger("certctl.workers")


class Handler(Protocol):
    kind: str
    effects: str

    def run(self, jobs: Sequence[Job]) -> list[Outcome]: ...

    def close(self) -> None: ...


class NoopHandler:
    """The ``noop`` job kind: does nothing, except its side effect -- a row in
    ``job_effects`` written in the statement that completes the job (so it happens
    exactly once). Tests and the queue benchmark use it. Payload (all optional):
    ``sleep_ms`` (per job), ``fail``: ``once`` (first attempt fails), ``always``
    (every attempt: the job ends dead) or ``permanent`` (failed at once)."""

    kind = "noop"
    effects = (
        ", fx AS (INSERT INTO job_effects (job_id, worker, attempt) "
        "SELECT id, %(w)s, attempt FROM accepted WHERE state = 'done')"
    )

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        pause = sum(float(j.payload.get("sleep_ms", 0) or 0) for j in jobs)
        if pause > 0:
            time.sleep(pause / 1000)
        out = []
        for j in jobs:
            fail = j.payload.get("fail")
            if fail == "always" or (fail == "once" and j.attempt == 1):
                delay = float(j.payload.get("retry_s", 0) or 0)
                out.append(Outcome(j, "retry", error="noop: failing as asked", delay_s=delay))
            elif fail == "permanent":
                out.append(Outcome(j, "failed", error="noop: failing for good as asked"))
            else:
                out.append(Outcome(j, "done", {"attempt": j.attempt}))
        return out

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSettings:
    batch: int = 100  # jobs per claim
    lease_s: float = 30.0  # renewed every lease/3 while a batch runs
    poll_s: float = 1.0  # idle: re-check this often even without a NOTIFY
    drain: bool = False  # exit once no job is queued or leased
    retry_base_s: float = 5.0  # a failed batch is retried after base * 2^(attempt-1)
    retry_cap_s: float = 600.0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """Runs until ``stop`` is set (or, with ``drain``, the queue is empty)."""

    def __init__(
        self,
        url: str,
        handlers: Sequence[Handler],
        settings: WorkerSettings = WorkerSettings(),
        *,
        ident: str | None = None,
        say: Callable[[str], None] = log.info,
        is_leader: Callable[[], bool] = lambda: False,
    ) -> None:
        kinds = [h.kind for h in handlers]
        if len(set(kinds)) != len(kinds):
            raise CertctlError(f"duplicate job handlers: {kinds}")
        self.url = url
        self.handlers: Mapping[str, Handler] = {h.kind: h for h in handlers}
        self.settings = settings
        self.id = ident or worker_id()
        self.say = say
        self.is_leader = is_leader
        self.done = 0
        self.failed = 0
        self._inflight: list[Job] = []
        self._mutex = threading.Lock()

    # ------------------------------------------------------------ heartbeat
    def _heartbeat(self, stop: threading.Event) -> None:
        """Renew the leases of the batch in flight and the worker's heartbeat."""
        s = self.settings
        every = max(0.2, s.lease_s / 3)
        queue: JobQueue | None = None
        while not stop.wait(every):
            try:
                if queue is None:
                    queue = JobQueue(self.url, self.id, application_name="certctl heartbeat")
                with self._mutex:
                    jobs = list(self._inflight)
                held = queue.renew(jobs, s.lease_s)
                if len(held) < len(jobs):
                    log.warning(
                        "worker %s lost the lease of %d job(s); their results will be refused",
                        self.id,
                        len(jobs) - len(held),
                    )
                queue.conn.execute(
                    "UPDATE workers SET heartbeat_at = now(), jobs_done = %s, leader = %s "
                    "WHERE id = %s",
                    (self.done, self.is_leader(), self.id),
                )
            except Exception as exc:  # the database is away: try again next beat
                log.warning("worker %s: heartbeat failed: %s", self.id, exc)
                if queue is not None:
                    queue.close()
                    queue = None
        if queue is not None:
            queue.close()

    # ------------------------------------------------------------ main loop
    def run(self, stop: threading.Event) -> int:
        """Process jobs; returns how many completed (done) here. A lost database
        connection is retried (1 s, doubling to 30 s) until ``stop``; what this worker
        held meanwhile is reaped by the others once its lease expires."""
        beat_stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(beat_stop,), name="certctl-heartbeat", daemon=True
        )
        queue: JobQueue | None = JobQueue(self.url, self.id)  # fail fast at start
        delay = 1.0
        try:
            while not stop.is_set():
                try:
                    if queue is None:
                        queue = JobQueue(self.url, self.id)
                        self.say(f"worker {self.id}: reconnected to the job queue")
                    self._register(queue)
                    delay = 1.0
                    if not beat.is_alive():
                        beat.start()
                    self._loop(queue, stop)
                    return self.done
                except StateError as exc:
                    self.say(f"worker {self.id}: {exc}; retrying in {delay:g}s")
                    if queue is not None:
                        queue.close()
                        queue = None
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
            return self.done
        finally:
            beat_stop.set()
            if beat.is_alive():
                beat.join(timeout=5)
            if queue is not None:
                try:
                    queue.conn.execute(
                        "UPDATE workers SET stopped_at = now(), heartbeat_at = now(), "
                        "jobs_done = %s, leader = false WHERE id = %s",
                        (self.done, self.id),
                    )
                except Exception:
                    log.debug("could not record the worker's stop", exc_info=True)
                queue.close()
            for h in self.handlers.values():
                h.close()

    def _register(self, queue: JobQueue) -> None:
        try:
            queue.conn.execute(
                "INSERT INTO workers (id, host, pid, started_at, heartbeat_at) "
                "VALUES (%s, %s, %s, now(), now()) "
                "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                (self.id, socket.gethostname(), os.getpid()),
            )
            # Keep the table small: forget workers gone for a week.
            queue.conn.execute("DELETE FROM workers WHERE heartbeat_at < now() - interval '7 days'")
        except psycopg.Error as exc:
            raise StateError(f"job queue {queue.where}: register the worker: {exc}") from None

    def _loop(self, queue: JobQueue, stop: threading.Event) -> None:
        s = self.settings
        kinds = sorted(self.handlers)
        reap_every = max(0.1, s.lease_s / 2)
        next_reap = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= next_reap:
                queue.reap()
                next_reap = now + reap_every
            jobs = queue.claim(kinds, s.batch, s.lease_s)
            if not jobs:
                if s.drain and queue.pending(kinds) == 0:  # (others' kinds may wait)
                    return
                wait = s.poll_s if not s.drain else min(s.poll_s, reap_every)
                self._idle(queue, stop, min(wait, max(0.05, next_reap - time.monotonic())))
                continue
            self._process(queue, jobs)

    @staticmethod
    def _idle(queue: JobQueue, stop: threading.Event, seconds: float) -> None:
        """Wait for a NOTIFY, ``seconds`` at most, in slices so a stop is seen soon."""
        end = time.monotonic() + seconds
        while not stop.is_set():
            left = end - time.monotonic()
            if left <= 0 or queue.wait(min(left, 0.25)):
                return

    def _process(self, queue: JobQueue, jobs: list[Job]) -> None:
        by_kind: dict[str, list[Job]] = {}
        for j in jobs:
            by_kind.setdefault(j.kind, []).append(j)
        with self._mutex:
            self._inflight = list(jobs)
        try:
            for kind, group in by_kind.items():
                handler = self.handlers[kind]
                try:
                    outcomes = handler.run(group)
                except Exception as exc:
                    msg = (
                        str(exc)
                        if isinstance(exc, CertctlError)
                        else f"{type(exc).__name__}: {exc}"
                    )
                    log.warning(
                        "worker %s: %d %s job(s) failed: %s", self.id, len(group), kind, msg
                    )
                    outcomes = [
                        Outcome(j, "retry", error=msg[:2000], delay_s=self._backoff(j))
                        for j in group
                    ]
                accepted = queue.finish(outcomes, effects=handler.effects)
                self.done += sum(1 for st in accepted.values() if st == "done")
                self.failed += sum(1 for st in accepted.values() if st in ("failed", "dead"))
        finally:
            with self._mutex:
                self._inflight = []

    def _backoff(self, job: Job) -> float:
        s = self.settings
        return float(min(s.retry_base_s * 2 ** max(0, job.attempt - 1), s.retry_cap_s))

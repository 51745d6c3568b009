"""Apply through the workers: ``certctl apply --via-workers`` enqueues one ``apply``
job per certificate; workers re-plan each job's certificate and execute it.

Producer (:func:`submit`): under the apply lock, plan as ``apply`` does, then enqueue
one job per certificate with its action ids and the plan digest; the dedupe key
``apply:<cert>`` means a second submit while the first is pending waits for the same
job instead of doing the work twice. The lock is released once the jobs are queued.

Worker (:class:`ApplyHandler`), per claimed batch:

1. Take the apply lock in *shared* mode (``pg_advisory_lock_shared`` on the key the
   plain ``apply`` takes exclusively, waiting up to ``lock_wait_s``: a submitter's
   NOTIFY wakes the workers while it still holds the lock). Workers share it with
   each other; a plain ``certctl apply`` (exclusive) therefore fails fast with
   "locked by ... worker" while a batch runs, and a batch claimed while a plain apply
   runs is released (put back, the attempt not counted) and tried again two seconds
   later. Then take the batch's per-certificate locks: each certificate is one job
   under one lease, but a worker that stalled past its lease still acts on its
   certificates when it wakes; its session's certificate locks keep the job's next
   holder off them (that job is put back untried).
2. Load the inventory (re-read when its files change) and plan the batch's
   certificates against the current state and targets (``PlanOptions.only``).
3. Re-check each job like a saved plan is re-checked: the fresh actions of its
   certificate must be among the job's actions. None left: the job was already done
   (a worker died after acting but before recording the job): done. Some left: those
   run (e.g. the deploys after an issue that a dead worker finished). Other actions:
   the inventory or state changed since the plan was approved: the job fails as stale.
4. Execute through the :class:`~certctl.apply.executor.Executor` (journal, resume,
   backoff, audit), limited to the batch's certificates (``scope``: intents of
   certificates other workers hold are not touched), then release the shared lock.

The executor's side effects on CAs and targets are at-least-once across a worker
crash and made idempotent by its journal (a resumed issuance re-signs the same
certificate; deploys are re-planned from what the target holds).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from certctl.apply.executor import ApplySettings, Executor
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.model import Action, ActionKind, Plan, StateSnapshot
from certctl.plan.planner import PlanOptions
from certctl.workers.queue import Job, JobQueue, NewJob, Outcome, connect, require_postgres

log = logging.getLogger("certctl.workers")

KIND = "apply"
#: The advisory lock of ``apply`` (see certctl.state.postgres): class 'cert', object 1.
_LOCK_CLASS = 0x63657274
_LOCK_APPLY = 1
#: Serializes issuer-state changes among workers (see SharedApplyLock.issuer_section).
_LOCK_ISSUERS = 4
#: Per-certificate locks (class 'cerc', object hashtext(cert)), held by the worker
#: applying the certificate for as long as it acts on it (see ApplyHandler.run).
_LOCK_CERTS = 0x63657263
#: A batch that met a plain apply holding the lock is put back for this long.
RELEASE_DELAY_S = 2.0


@dataclass(frozen=True)
class Submission:
    plan: Plan
    batch: str
    job_ids: list[int]


def group_by_cert(actions: Sequence[Action]) -> dict[str, list[Action]]:
    out: dict[str, list[Action]] = {}
    for a in actions:
        out.setdefault(a.cert, []).append(a)
    return out


def submit(
    eng: Engine,
    *,
    holder: str,
    options: PlanOptions = PlanOptions(),
    confirm: Callable[[Plan], bool] | None = None,
    max_attempts: int = 3,
) -> Submission | None:
    """Plan under the apply lock and enqueue one job per certificate; None when the
    plan is empty or ``confirm`` declined."""
    url = require_postgres(eng.state_url, "apply --via-workers")
    eng.inventory()  # a broken inventory fails before anything else
    store = eng.store()
    store.acquire_apply_lock(holder)
    try:
        plan, observed = eng.plan(options)
        if not plan.actions:
            return None
        if confirm is not None and not confirm(plan):
            return None
        eng._sync_flags(observed)  # as apply does: flags the planner needs from state
        batch = f"apply-{uuid.uuid4().hex[:12]}"
        jobs = [
            NewJob(
                KIND,
                {
                    "cert": cert,
                    "actions": [a.id for a in acts],
                    "digest": plan.input_digest,
                    "force": cert in options.force,
                },
                dedupe_key=f"{KIND}:{cert}",
                max_attempts=max_attempts,
            )
            for cert, acts in group_by_cert(plan.actions).items()
        ]
        with JobQueue(url, holder, application_name="certctl apply") as queue:
            ids = queue.enqueue(jobs, batch=batch)
        return Submission(plan, batch, ids)
    finally:
        store.release_apply_lock()


class _Section:
    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn: psycopg.Connection[Any] | None = conn

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, _LOCK_ISSUERS))


class SharedApplyLock:
    """The apply lock in shared mode, on a connection of its own (kept between
    batches); its application name tells a blocked ``apply`` who holds it."""

    def __init__(self, url: str, holder: str) -> None:
        self.url = url
        self.holder = holder
        self._conn: psycopg.Connection[Any] | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the shared apply lock, waiting up to ``wait_s`` for an exclusive
        holder to let go (a submitter's enqueue wakes the workers while it still
        holds the lock; the leader's apply loop holds it while it plans)."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, f"certctl apply: worker {self.holder}")
        conn = self._conn
        try:
            if wait_s <= 0:
                row = conn.execute(
                    "SELECT pg_try_advisory_lock_shared(%s, %s)", (_LOCK_CLASS, _LOCK_APPLY)
                ).fetchone()
                return bool(row and row[0])
            try:
                # lock_timeout for this wait only (SET LOCAL); the session lock
                # outlives the transaction.
                with conn.transaction():
                    conn.execute(
                        "SELECT set_config('lock_timeout', %s, true)",
                        (f"{max(1, int(wait_s * 1000))}ms",),
                    )
                    conn.execute(
                        "SELECT pg_advisory_lock_shared(%s, %s)", (_LOCK_CLASS, _LOCK_APPLY)
                    )
            except psycopg.errors.LockNotAvailable:
                return False
            return True
        except psycopg.Error:
            self.close()
            raise

    @contextlib.contextmanager
    def issuer_section(self) -> Iterator[_Section]:
        """Exclusive among workers (advisory lock ``cert``/4, waited for): issuer state
        that is read, changed and written back (a local CA made on first use, the
        revocation index, the CRL number) is touched by one worker at a time. The
        section may be left early with ``release()``."""
        assert self._conn is not None
        section = _Section(self._conn)
        self._conn.execute("SELECT pg_advisory_lock(%s, %s)", (_LOCK_CLASS, _LOCK_ISSUERS))
        try:
            yield section
        finally:
            section.release()

    def lock_certs(self, certs: Sequence[str]) -> set[str]:
        """Take the per-certificate locks of ``certs`` that are free (one statement);
        returns the certificates now held by this session."""
        assert self._conn is not None
        rows = self._conn.execute(
            "SELECT c FROM unnest(%s::text[]) AS c WHERE pg_try_advisory_lock(%s, hashtext(c))",
            (list(certs), _LOCK_CERTS),
        ).fetchall()
        return {str(r[0]) for r in rows}

    def unlock_certs(self, certs: Sequence[str]) -> None:
        if self._conn is None or not certs:
            return
        try:
            self._conn.execute(
                "SELECT pg_advisory_unlock(%s, hashtext(c)) FROM unnest(%s::text[]) AS c",
                (_LOCK_CERTS, list(certs)),
            )
        except psycopg.Error:
            self.close()  # ending the session releases them in any case

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(
                "SELECT pg_advisory_unlock_shared(%s, %s)", (_LOCK_CLASS, _LOCK_APPLY)
            )
        except psycopg.Error:
            self.close()  # ending the session releases it in any case

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


def _signature(eng: Engine) -> tuple[Any, ...]:
    """Changes when an inventory file (or the directory's list of files) changes."""
    inv = eng.inventory()
    out: list[Any] = []
    for f in (*inv.files, str(eng.inventory_path)):
        try:
            st = os.stat(f)
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    return tuple(out)


class ApplyHandler:
    """The ``apply`` job kind (see the module docstring)."""

    kind = KIND
    effects = ""

    def __init__(
        self,
        inventory_path: Path,
        state_url: str,
        *,
        holder: str,
        settings: ApplySettings = ApplySettings(),
        say: Callable[[str], None] = log.info,
        lock_wait_s: float = 5.0,
    ) -> None:
        self.inventory_path = inventory_path
        #: How long a batch waits for a plain apply (or the leader's plan + enqueue)
        #: to let go of the apply lock before it is put back.
        self.lock_wait_s = lock_wait_s
        self.state_url = state_url
        self.holder = holder
        self.settings = settings
        self.say = say
        self._eng: Engine | None = None
        self._sig: tuple[Any, ...] = ()
        self._lock = SharedApplyLock(state_url, holder)

    def _engine(self) -> Engine:
        if self._eng is not None:
            try:
                changed = _signature(self._eng) != self._sig
            except CertctlError:
                changed = True
            if changed:
                self._eng.close()
                self._eng = None
        if self._eng is None:
            eng = Engine(inventory_path=self.inventory_path, state_url=self.state_url)
            try:
                eng.inventory()
                self._sig = _signature(eng)
            except BaseException:
                eng.close()
                raise
            self._eng = eng
        return self._eng

    def close(self) -> None:
        self._lock.close()
        if self._eng is not None:
            self._eng.close()
            self._eng = None

    @staticmethod
    def _warm_issuers(eng: Engine, todo: Sequence[Action], state: StateSnapshot) -> None:
        """Load each issuer the actions use (a local CA is created and stored on first
        use) while no other worker does the same; errors are left to the executor."""
        names: set[str] = set()
        inv = eng.inventory()
        for a in todo:
            if a.kind in (ActionKind.ISSUE, ActionKind.RENEW) and a.cert in inv.certificates:
                names.add(inv.certificates[a.cert].issuer)
            elif a.kind is ActionKind.REVOKE:
                rec = state.certs.get(a.cert)
                if rec is not None and rec.current is not None:
                    names.add(rec.current.issuer)
        for name in sorted(names):
            try:
                load = getattr(eng.issuer(name), "load", None)
                if callable(load):
                    load()
            except Exception:
                log.debug("loading issuer %s failed", name, exc_info=True)

    def run(self, jobs: Sequence[Job]) -> list[Outcome]:
        if not self._lock.acquire(self.lock_wait_s):
            self.say(
                f"worker {self.holder}: {len(jobs)} apply job(s) put back for "
                f"{RELEASE_DELAY_S:g}s: a plain apply holds the apply lock"
            )
            return [
                Outcome(
                    j,
                    "release",
                    error="a plain apply holds the apply lock",
                    delay_s=RELEASE_DELAY_S,
                )
                for j in jobs
            ]
        try:
            return self._run_locked(jobs)
        finally:
            self._lock.release()

    def _run_locked(self, jobs: Sequence[Job]) -> list[Outcome]:
        eng = self._engine()
        by_cert: dict[str, Job] = {}
        outcomes: list[Outcome] = []
        for j in jobs:
            cert = j.payload.get("cert")
            if not isinstance(cert, str) or cert in by_cert:
                outcomes.append(Outcome(j, "failed", error="malformed apply job (no cert)"))
                continue
            by_cert[cert] = j
        if not by_cert:
            return outcomes
        # The lease alone does not keep a certificate to one worker: a worker that
        # stalled past its lease (GC pause, frozen VM) still acts on it when it wakes,
        # while the job's next holder starts on it too. The certificate's lock, held
        # by the session of the worker acting on it (and freed when that process
        # dies), does: a job whose certificate is still held is put back untried.
        held = self._lock.lock_certs(sorted(by_cert))
        for cert in sorted(set(by_cert) - held):
            outcomes.append(
                Outcome(
                    by_cert.pop(cert),
                    "release",
                    error=f"{cert}: another worker is still applying this certificate "
                    "(its lease expired while it worked)",
                    delay_s=RELEASE_DELAY_S,
                )
            )
        try:
            return self._run_held(eng, by_cert, outcomes)
        finally:
            self._lock.unlock_certs(sorted(held))

    def _run_held(
        self, eng: Engine, by_cert: dict[str, Job], outcomes: list[Outcome]
    ) -> list[Outcome]:
        if not by_cert:
            return outcomes
        force = frozenset(c for c, j in by_cert.items() if j.payload.get("force"))
        fresh, observed = eng.plan(PlanOptions(force=force, only=frozenset(by_cert)))
        fresh_by_cert = group_by_cert(fresh.actions)
        todo: list[Action] = []
        running: dict[str, Job] = {}
        for cert, j in by_cert.items():
            wanted = {str(a) for a in j.payload.get("actions", [])}
            now = fresh_by_cert.get(cert, [])
            if not now and cert in fresh.skipped:  # backing off after a failure
                why = fresh.skipped[cert]
                outcomes.append(Outcome(j, "failed", {"held_back": why}, error=f"{cert}: {why}"))
            elif not now:
                outcomes.append(Outcome(j, "done", {"already_done": True}))
            elif {a.id for a in now} <= wanted:
                todo.extend(now)
                running[cert] = j
            else:
                extra = sorted({a.id for a in now} - wanted)
                outcomes.append(
                    Outcome(
                        j,
                        "failed",
                        {"stale": extra},
                        error=f"{cert}: stale: the plan now wants {', '.join(extra)}, which "
                        "the submitted plan did not; run apply again",
                    )
                )
        if not todo:
            return outcomes
        plan = Plan(tuple(todo), fresh.input_digest, fresh.created_at, options=fresh.options)
        ex = Executor(
            eng.inventory(),
            observed.state,
            eng.store(),
            eng,
            eng.clock,
            self.settings,
            holder=f"worker {self.holder}",
            scope=frozenset(running),
        )
        ex.preload_materials(plan)
        revokes = any(a.kind is ActionKind.REVOKE for a in todo)
        with self._lock.issuer_section() as section:
            self._warm_issuers(eng, todo, observed.state)
            if not revokes:
                section.release()  # issuing in parallel is safe once the CA is loaded
            report = asyncio.run(ex.run(plan))
            problems = eng.after_run()
        for p in problems:
            self.say(f"worker: FAILED to publish: {p}")
        results: dict[str, list[Any]] = {}
        for r in report.results:
            results.setdefault(r.action.cert, []).append(r)
        for cert, j in running.items():
            rs = results.get(cert, [])
            failed = [r for r in rs if not r.ok]
            summary = {
                "run_id": report.run_id,
                "done": sorted(r.action.id for r in rs if r.ok),
                "failed": {r.action.id: r.error for r in failed},
            }
            if failed:
                msg = "; ".join(f"{r.action.id}: {r.error}" for r in failed)
                outcomes.append(Outcome(j, "failed", summary, error=msg[:2000]))
            else:
                outcomes.append(Outcome(j, "done", summary))
        return outcomes

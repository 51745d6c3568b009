"""Leader election among ``certctl worker`` processes, and the loops the leader runs.

The leader holds two things at once:

* a session advisory lock (``pg_try_advisory_lock``) on a connection kept for as long
  as it leads: when the process dies, PostgreSQL ends the session and frees the lock
  at once;
* the lease row ``leader`` (holder, term, lease_until), renewed every lease/3. A
  follower becomes leader only when it gets the advisory lock AND the lease has
  expired (or was handed back by a leader that stopped cleanly). The lease covers a
  leader that lost its connection but still runs: it stops its loops when a renewal
  fails, and it never starts a tick once its own (conservatively measured) lease may
  have run out, so its successor, which waits for the lease to expire, never runs a
  loop at the same time.

Failover after a crash therefore takes at most one lease (default 6 s) plus the
followers' retry interval (1 s). A hung leader keeps its session, hence the lock: once
its lease is a lease overdue, a follower ends that session (``pg_terminate_backend``)
and takes over at its next try. Every change is in the audit log
(``leader.elected`` with the previous holder and the term, ``leader.resigned``,
``leader.lost``).

Loops: the leader runs a :class:`~certctl.daemon.scheduler.Scheduler` over the loops
:mod:`certctl.workers.commands` assembles: the daemon's loops (apply -- which plans
and enqueues apply jobs for the workers instead of applying itself --, drift,
housekeeping, notify, agents...), the queue housekeeping, and the loops of every
module named in :data:`LOOP_MODULES` (or passed with ``certctl worker --loops-from
MODULE``). Such a module exports::

    def leader_loops(ctx: certctl.workers.leader.LeaderContext) -> list[Loop]:
        return [Loop("agents-offline", 30.0, lambda: mark_silent_agents(ctx.engine()))]

Each tick runs in the scheduler's single tick thread; a tick should open what it needs
(``ctx.engine()`` gives a fresh Engine; close it) and must not assume it runs again on
the same process: after a failover the next tick runs on another one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from certctl.daemon.scheduler import Loop, Scheduler
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.workers.queue import connect

log = logging.getLogger("certctl.workers")

_LOCK_CLASS = 0x63657274
#: Advisory lock object ids: 1 apply, 2 migrations (certctl.state.postgres), 3 leader,
#: 4 issuer state among workers (certctl.workers.applyjobs).
_LOCK_LEADER = 3

#: Modules whose ``leader_loops(ctx)`` add loops only the leader runs.
LOOP_MODULES: tuple[str, ...] = ()

_TAKE = """
UPDATE leader l SET holder = %(h)s, term = l.term + 1, since = now(),
    lease_until = now() + %(lease)s * interval '1 second'
FROM (SELECT holder AS previous FROM leader WHERE id = 1) p
WHERE l.id = 1 AND (l.lease_until IS NULL OR l.lease_until < now() OR l.holder = %(h)s)
RETURNING l.term, p.previous
"""
_RENEW = """
UPDATE leader SET lease_until = now() + %(lease)s * interval '1 second'
WHERE id = 1 AND holder = %(h)s AND term = %(t)s
RETURNING 1
"""
_FROZEN = """
SELECT l.pid, d.holder FROM pg_locks l, leader d
WHERE d.id = 1 AND d.lease_until < now() - %(grace)s * interval '1 second'
  AND l.locktype = 'advisory' AND l.granted AND l.classid = %(cls)s AND l.objid = %(obj)s
  AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
LIMIT 1
"""
_AUDIT = "INSERT INTO audit (at, event, detail) VALUES (now(), %s, %s::jsonb)"


@dataclass
class LeaderContext:
    """What a leader loop gets: where the inventory and state are, and a way to say
    things (to the worker's log)."""

    inventory_path: Path
    state_url: str
    holder: str
    say: Callable[[str], None] = log.warning
    settings: dict[str, Any] = field(default_factory=dict)

    def engine(self) -> Engine:
        """A fresh Engine (the caller closes it): an edited inventory is re-read."""
        return Engine(inventory_path=self.inventory_path, state_url=self.state_url)


def load_loop_modules(ctx: LeaderContext, modules: Sequence[str]) -> list[Loop]:
    out: list[Loop] = []
    for name in (*LOOP_MODULES, *modules):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise CertctlError(f"cannot load leader loops from {name!r}: {exc}") from None
        factory = getattr(module, "leader_loops", None)
        if not callable(factory):
            raise CertctlError(f"module {name!r} has no leader_loops(ctx) function")
        out.extend(factory(ctx))
    return out


class Leadership:
    """The advisory lock + lease of one candidate (used from one thread at a time)."""

    def __init__(self, url: str, holder: str, lease_s: float) -> None:
        self.url = url
        self.holder = holder
        self.lease_s = lease_s
        self.term: int | None = None
        #: time.monotonic() until which this process may be sure it leads.
        self.valid_until = 0.0
        self._conn: psycopg.Connection[Any] | None = None

    def _audit(self, event: str, detail: dict[str, Any]) -> None:
        assert self._conn is not None
        self._conn.execute(_AUDIT, (event, json.dumps(detail, sort_keys=True)))

    def try_acquire(self) -> bool:
        """Become leader if the lock is free and the lease expired."""
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url, f"certctl leader candidate {self.holder}")
        conn = self._conn
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_CLASS, _LOCK_LEADER)
        ).fetchone()
        if not row or not row[0]:
            self._evict_if_frozen(conn)
            return False
        started = time.monotonic()
        with conn.transaction():
            took = conn.execute(_TAKE, {"h": self.holder, "lease": self.lease_s}).fetchone()
            if took is not None:
                self.term = int(took[0])
                self._audit(
                    "leader.elected",
                    {"holder": self.holder, "term": self.term, "previous": took[1]},
                )
        if took is None:  # the previous leader's lease still runs: wait it out
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, _LOCK_LEADER))
            return False
        self.valid_until = started + self.lease_s
        return True

    def _evict_if_frozen(self, conn: psycopg.Connection[Any]) -> None:
        """The lock is held but the lease expired more than a lease ago: the leader
        hangs (frozen, stopped) with its session still open. End that session so the
        lock is freed; the hung process, should it wake, finds its renewal refused and
        starts no tick (its own lease ran out long before). Needs the right to signal
        the leader's backend (same role, or pg_signal_backend)."""
        row = conn.execute(
            _FROZEN, {"grace": self.lease_s, "cls": _LOCK_CLASS, "obj": _LOCK_LEADER}
        ).fetchone()
        if row is None:
            return
        pid, holder = int(row[0]), row[1]
        try:
            ended = conn.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone()
        except psycopg.Error as exc:
            log.warning(
                "leader %s does not renew its lease; cannot end its session: %s", holder, exc
            )
            return
        if ended and ended[0]:
            log.warning("leader %s stopped renewing its lease: ended its session", holder)
            self._audit("leader.evicted", {"holder": holder, "by": self.holder, "backend": pid})

    def renew(self) -> bool:
        if self._conn is None or self.term is None:
            return False
        started = time.monotonic()
        try:
            row = self._conn.execute(
                _RENEW, {"h": self.holder, "lease": self.lease_s, "t": self.term}
            ).fetchone()
        except psycopg.Error as exc:
            log.warning("leader %s: lease renewal failed: %s", self.holder, exc)
            self.drop()
            return False
        if row is None:
            self.drop()
            return False
        self.valid_until = started + self.lease_s
        return True

    def resign(self) -> None:
        """Hand the lease back at once (clean stop): a follower takes over within its
        retry interval instead of waiting for the lease to expire."""
        if self._conn is not None and self.term is not None:
            with contextlib.suppress(psycopg.Error):
                with self._conn.transaction():
                    self._conn.execute(
                        "UPDATE leader SET lease_until = now() "
                        "WHERE id = 1 AND holder = %s AND term = %s",
                        (self.holder, self.term),
                    )
                    self._audit("leader.resigned", {"holder": self.holder, "term": self.term})
                self._conn.execute("SELECT pg_advisory_unlock(%s, %s)", (_LOCK_CLASS, _LOCK_LEADER))
        self.term = None
        self.valid_until = 0.0

    def lost(self) -> None:
        """Record (best effort) that this leader lost its lease, and let go."""
        if self._conn is not None and self.term is not None and not self._conn.closed:
            with contextlib.suppress(psycopg.Error):
                self._audit("leader.lost", {"holder": self.holder, "term": self.term})
        self.drop()

    def drop(self) -> None:
        self.term = None
        self.valid_until = 0.0
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        self.drop()


class LeaderRunner:
    """Campaigns for leadership and, while leading, runs the loops (in its own thread
    with its own event loop: see :meth:`run`)."""

    def __init__(
        self,
        leadership: Leadership,
        loops: Callable[[], list[Loop]],
        *,
        retry_s: float = 1.0,
        say: Callable[[str], None] = log.warning,
    ) -> None:
        self.lead = leadership
        self.loops = loops
        self.retry_s = retry_s
        self.say = say
        self.leading = False
        self.terms = 0

    def run(self, stop: threading.Event) -> None:
        """Thread target: campaign until ``stop`` is set."""
        asyncio.run(self._main(stop))

    async def _main(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                won = await asyncio.to_thread(self.lead.try_acquire)
            except (psycopg.Error, CertctlError) as exc:
                log.warning("leader election: %s", exc)
                self.lead.drop()
                won = False
            if not won:
                await _wait_thread_event(stop, self.retry_s)
                continue
            self.terms += 1
            self.leading = True
            self.say(f"leader: {self.lead.holder} leads (term {self.lead.term})")
            try:
                await self._lead(stop)
            finally:
                self.leading = False
                if stop.is_set():
                    await asyncio.to_thread(self.lead.resign)
                    self.say("leader: stepped down (stopping)")
                else:
                    await asyncio.to_thread(self.lead.lost)
                    self.say("leader: lost the lease; the loops stopped")
        self.lead.close()

    async def _lead(self, stop: threading.Event) -> None:
        term_stop = asyncio.Event()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="certctl-leader-tick")

        async def guarded(lp: Loop) -> object:
            # Never start a tick this process cannot be sure to lead through.
            if time.monotonic() >= self.lead.valid_until:
                term_stop.set()
                raise CertctlError("leader lease not renewed in time; tick skipped")
            return await asyncio.get_running_loop().run_in_executor(pool, lp.tick)

        async def keep() -> None:
            every = max(0.1, self.lead.lease_s / 3)
            next_renew = time.monotonic() + every
            while not term_stop.is_set():
                if stop.is_set():
                    term_stop.set()
                    return
                if time.monotonic() >= next_renew:
                    if not await asyncio.to_thread(self.lead.renew):
                        term_stop.set()
                        return
                    next_renew = time.monotonic() + every
                await asyncio.sleep(0.05)

        keeper = asyncio.create_task(keep())
        try:
            loops = self.loops()
            if loops:
                await Scheduler(loops, run_tick=guarded).run(term_stop)
            else:  # nothing to run: hold the leadership until stopped or lost
                await term_stop.wait()
        finally:
            term_stop.set()
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            pool.shutdown(wait=True)


async def _wait_thread_event(event: threading.Event, timeout: float) -> None:
    end = time.monotonic() + timeout
    while not event.is_set() and time.monotonic() < end:
        await asyncio.sleep(min(0.05, max(0.0, end - time.monotonic())))

"""The daemon's scheduler: named loops, each on its own interval with jitter.

Rules:

* Every loop's first tick is due at start, in the order the loops are given (a loop
  with ``initial=False`` waits one interval, or until :meth:`Scheduler.trigger`).
* :meth:`Scheduler.trigger` makes a loop due after a delay, from any thread; calling
  it on every event debounces (the inventory watch uses it).
* A loop's next tick is due one *jittered* interval (``interval * (1 ± jitter)``,
  drawn from the injected RNG) after its previous tick started -- or, when that tick
  ran longer, as soon as it ended. Missed ticks are dropped, never caught up in a
  burst, and a loop never overlaps its own previous tick.
* Ticks run one at a time in one worker thread (the engine and its state store are
  not shared between threads), so loops never overlap each other either; the event
  loop stays free to receive signals while a tick runs.
* ``stop`` (an :class:`asyncio.Event`, set by SIGTERM/SIGINT) ends the scheduler at
  the next point between ticks: a tick in flight always finishes.

The clock, the sleep and the RNG are injected, so tests drive the schedule with a
fake clock and never sleep.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger("certctl.daemon")

JITTER = 0.1


@dataclass
class Loop:
    name: str
    interval: float  # seconds
    tick: Callable[[], object]  # runs in the worker thread; exceptions are logged
    #: False: the first tick is due one interval after start, not at start (a loop
    #: that only runs when :meth:`Scheduler.trigger` calls for it).
    initial: bool = True
    next_at: float = 0.0
    runs: int = 0
    failures: int = 0
    last_error: str | None = field(default=None, repr=False)


async def _sleep(delay: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), max(delay, 0.0))


class _Wake:
    """Ends a sleep early when :meth:`Scheduler.trigger` moved a loop's due time."""

    def __init__(self) -> None:
        self.event = asyncio.Event()


class Scheduler:
    def __init__(
        self,
        loops: Sequence[Loop],
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        jitter: float = JITTER,
        sleep: Callable[[float, asyncio.Event], Awaitable[None]] = _sleep,
        run_tick: Callable[[Loop], Awaitable[object]] | None = None,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        names = [lp.name for lp in loops]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate loop names: {names}")
        for lp in loops:
            if lp.interval <= 0:
                raise ValueError(f"loop {lp.name}: interval must be positive")
        self.loops = list(loops)
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()  # noqa: S311 - jitter, not secrets
        self.jitter = jitter
        self.sleep = sleep
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: _Wake | None = None
        self.run_tick = run_tick or self._in_worker
        self.on_error = on_error or (lambda name, msg: log.error("%s: tick failed: %s", name, msg))

    def jittered(self, interval: float) -> float:
        return interval * (1.0 + self.rng.uniform(-self.jitter, self.jitter))

    async def _in_worker(self, lp: Loop) -> object:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="certctl-tick")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lp.tick)

    async def _tick(self, lp: Loop) -> None:
        started = self.clock()
        before = lp.next_at
        try:
            await self.run_tick(lp)
            lp.last_error = None
        except Exception as exc:  # one loop's failure never stops the daemon
            lp.failures += 1
            lp.last_error = str(exc) or type(exc).__name__
            self.on_error(lp.name, lp.last_error)
        lp.runs += 1
        ended = self.clock()
        scheduled = max(started + self.jittered(lp.interval), ended)
        if lp.next_at != before:  # triggered while it ran: the earlier of the two
            scheduled = max(min(lp.next_at, scheduled), ended)
        lp.next_at = scheduled

    def trigger(self, name: str, delay: float) -> None:
        """Make loop ``name`` due ``delay`` seconds from now (later calls replace
        earlier ones: calling it on every event debounces). Thread-safe."""
        lp = next(lp for lp in self.loops if lp.name == name)
        loop = self._loop

        def move() -> None:
            lp.next_at = self.clock() + delay
            if self._wake is not None:
                self._wake.event.set()

        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if loop is None or loop.is_closed() or here is loop:
            move()
        else:  # another thread (the watchdog observer's)
            loop.call_soon_threadsafe(move)

    async def _nap(self, delay: float, stop: asyncio.Event) -> None:
        if self.sleep is not _sleep or self._wake is None:
            await self.sleep(delay, stop)
            return
        wake = self._wake.event
        wake.clear()
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
        try:
            await asyncio.wait(waiters, timeout=max(delay, 0.0), return_when="FIRST_COMPLETED")
        finally:
            for w in waiters:
                w.cancel()

    async def run(self, stop: asyncio.Event, *, once: bool = False) -> None:
        """Run until ``stop`` is set (or, with ``once``, until every loop ran once)."""
        self._loop = asyncio.get_running_loop()
        self._wake = _Wake()
        try:
            start = self.clock()
            for lp in self.loops:
                lp.next_at = start if lp.initial else start + lp.interval
            while not stop.is_set():
                now = self.clock()
                due = [lp for lp in self.loops if lp.next_at <= now]
                if not due:
                    await self._nap(min(lp.next_at for lp in self.loops) - now, stop)
                    continue
                due.sort(key=lambda lp: lp.next_at)  # stable: given order breaks ties
                for lp in due:
                    if stop.is_set() or (once and lp.runs):
                        continue
                    await self._tick(lp)
                if once and all(lp.runs for lp in self.loops if lp.initial):
                    return
        finally:
            self._loop = None
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

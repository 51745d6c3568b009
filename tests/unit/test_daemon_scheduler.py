"""The daemon scheduler with a fake clock: jitter, no overlap, once, stop, failures."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable

import pytest

from certctl.daemon.scheduler import Loop, Scheduler


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float, stop: asyncio.Event) -> None:
        assert delay > 0
        self.sleeps.append(delay)
        self.t += delay


def make(
    clock: FakeClock,
    specs: dict[str, tuple[float, Callable[[int], float]]],
    log: list[tuple[str, float, float]],
    stop_after: int,
    stop: asyncio.Event,
) -> Scheduler:
    """Loops named by ``specs`` (interval, duration of the n-th tick); each tick is
    logged (name, start, end) and advances the fake clock by its duration."""
    loops = []
    for name, (interval, duration) in specs.items():

        def tick(name: str = name, duration: Callable[[int], float] = duration) -> None:
            n = sum(1 for e in log if e[0] == name)
            start = clock.t
            clock.t += duration(n)
            log.append((name, start, clock.t))
            if len(log) >= stop_after:
                stop.set()

        loops.append(Loop(name, interval, tick))

    async def direct(lp: Loop) -> object:
        return lp.tick()

    return Scheduler(loops, clock=clock, rng=random.Random(7), sleep=clock.sleep, run_tick=direct)


def test_each_loop_runs_on_its_interval_with_jitter_and_never_overlaps() -> None:
    clock = FakeClock()
    log: list[tuple[str, float, float]] = []
    stop = asyncio.Event()
    sched = make(
        clock,
        {
            "apply": (100.0, lambda n: 250.0 if n == 3 else 5.0),  # the 4th tick overruns
            "drift": (30.0, lambda n: 1.0),
            "housekeeping": (1000.0, lambda n: 0.5),
        },
        log,
        stop_after=120,
        stop=stop,
    )
    asyncio.run(sched.run(stop))
    # First ticks at start, in the order given.
    assert [e[0] for e in log[:3]] == ["apply", "drift", "housekeeping"]
    # Ticks never overlap at all (one worker), let alone their own previous tick.
    for (_, _, end), (_, start, _) in itertools.pairwise(log):
        assert start >= end
    for name, interval in (("apply", 100.0), ("drift", 30.0), ("housekeeping", 1000.0)):
        ticks = [e for e in log if e[0] == name]
        assert len(ticks) >= 2, name
        gaps = []
        for prev, cur in itertools.pairwise(ticks):
            gap = cur[1] - prev[1]
            if prev[2] - prev[1] > interval * 1.1:  # overran: next one right after it
                assert cur[1] - prev[2] < 30.0 * 1.1 + 5.0
                continue
            # Due at start + interval*(1±10%); it may wait for another loop's tick.
            assert interval * 0.9 - 1e-9 <= gap, (name, gap)
            assert gap <= interval * 1.1 + 250.0, (name, gap)
            gaps.append(gap)
        if name == "drift":
            assert len(set(round(g, 6) for g in gaps)) > 3  # jitter varies
            assert min(gaps) < 30.0 < max(gaps)
    overrun = [e for e in log if e[0] == "apply"][3]
    assert overrun[2] - overrun[1] == 250.0
    nxt = [e for e in log if e[0] == "apply"][4]
    assert nxt[1] >= overrun[2]  # no catch-up burst: one tick after the overrun


def test_jitter_is_within_ten_percent_and_comes_from_the_injected_rng() -> None:
    a = Scheduler([Loop("x", 60.0, lambda: None)], rng=random.Random(1))
    b = Scheduler([Loop("x", 60.0, lambda: None)], rng=random.Random(1))
    values = [a.jittered(60.0) for _ in range(500)]
    assert values == [b.jittered(60.0) for _ in range(500)]
    assert all(54.0 <= v <= 66.0 for v in values)
    assert min(values) < 55.0 and max(values) > 65.0


def test_once_runs_every_loop_once_and_failures_do_not_stop_the_others() -> None:
    clock = FakeClock()
    ran: list[str] = []

    def boom() -> None:
        ran.append("bad")
        raise RuntimeError("issuer unreachable")

    loops = [
        Loop("bad", 10.0, boom),
        Loop("good", 10.0, lambda: ran.append("good")),
    ]

    async def direct(lp: Loop) -> object:
        return lp.tick()

    sched = Scheduler(loops, clock=clock, rng=random.Random(3), sleep=clock.sleep, run_tick=direct)
    asyncio.run(sched.run(asyncio.Event(), once=True))
    assert ran == ["bad", "good"]
    assert loops[0].failures == 1 and loops[0].last_error == "issuer unreachable"
    assert loops[1].failures == 0
    assert clock.sleeps == []


def test_stop_set_during_a_tick_lets_it_finish_and_starts_no_other() -> None:
    clock = FakeClock()
    stop = asyncio.Event()
    ran: list[str] = []

    def first() -> None:
        ran.append("first")
        stop.set()  # SIGTERM arrives while this tick runs
        ran.append("first finished")

    loops = [Loop("a", 5.0, first), Loop("b", 5.0, lambda: ran.append("b"))]

    async def direct(lp: Loop) -> object:
        return lp.tick()

    sched = Scheduler(loops, clock=clock, sleep=clock.sleep, run_tick=direct)
    asyncio.run(sched.run(stop))
    assert ran == ["first", "first finished"]


def test_ticks_run_in_one_worker_thread_and_invalid_loops_are_refused() -> None:
    import threading

    seen: set[int] = set()
    stop = asyncio.Event()

    def tick() -> None:
        seen.add(threading.get_ident())

    loops = [Loop("a", 0.01, tick), Loop("b", 0.01, tick)]
    sched = Scheduler(loops)
    asyncio.run(sched.run(stop, once=True))
    assert len(seen) == 1 and threading.get_ident() not in seen
    with pytest.raises(ValueError, match="duplicate"):
        Scheduler([Loop("a", 1, tick), Loop("a", 2, tick)])
    with pytest.raises(ValueError, match="positive"):
        Scheduler([Loop("a", 0, tick)])


def test_trigger_debounces_and_a_triggered_loop_waits_for_it() -> None:
    clock = FakeClock()
    stop = asyncio.Event()
    ran: list[tuple[str, float]] = []
    loops = [
        Loop("apply", 100.0, lambda: ran.append(("apply", clock.t))),
        Loop("watch", 10_000.0, lambda: ran.append(("watch", clock.t)), initial=False),
    ]

    async def direct(lp: Loop) -> object:
        return lp.tick()

    sched: Scheduler

    async def sleep(delay: float, stop: asyncio.Event) -> None:
        # Three saves in a burst while the daemon sleeps after its first ticks; the
        # real sleep returns when a trigger wakes it, so this one does too.
        if not clock.sleeps:
            clock.sleeps.append(0.0)
            for _ in range(3):
                clock.t += 0.2
                sched.trigger("watch", 1.0)  # each save pushes the re-plan later
            return
        clock.sleeps.append(delay)
        clock.t += delay
        if clock.t > 1350:
            stop.set()

    sched = Scheduler(loops, clock=clock, rng=random.Random(5), sleep=sleep, run_tick=direct)
    asyncio.run(sched.run(stop))
    watch = [t for name, t in ran if name == "watch"]
    assert watch == [pytest.approx(1000.0 + 0.6 + 1.0)]  # once, 1 s after the last save
    assert ran[0] == ("apply", 1000.0)  # the watch loop did not run at start
    assert sum(1 for name, _ in ran if name == "apply") >= 3

"""In-run retries of the executor (``Executor._with_retries``) with a fake sleep.

A TransientError whose ``retry_after`` is longer than ``max_retry_delay_s`` is not
slept on and retried in this run: the action fails at once, and the cross-run
backoff (at least ``retry_after``) takes over.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from certctl.apply.executor import ApplySettings, Executor
from certctl.errors import PermanentError, TransientError
from certctl.model import Inventory, StateSnapshot


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def executor(settings: ApplySettings, sleep: FakeSleep) -> Executor:
    # _with_retries touches neither the inventory, the state nor the connectors
    inv: Any = Inventory.__new__(Inventory)
    snap: Any = StateSnapshot.__new__(StateSnapshot)
    return Executor(inv, snap, None, None, lambda: datetime.now(UTC), settings, sleep=sleep)  # type: ignore[arg-type]


class Flaky:
    def __init__(self, errors: list[Exception]) -> None:
        self.errors = errors
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_long_retry_after_fails_at_once_without_sleeping() -> None:
    sleep = FakeSleep()
    ex = executor(ApplySettings(retries=5, max_retry_delay_s=30), sleep)
    fn = Flaky([TransientError("rate limited", retry_after=3600)])
    with pytest.raises(TransientError) as err:
        asyncio.run(ex._with_retries(fn))
    assert err.value.retry_after == 3600
    assert fn.calls == 1 and sleep.calls == []


def test_short_retry_after_is_waited_out_in_the_run() -> None:
    sleep = FakeSleep()
    ex = executor(ApplySettings(retries=5, max_retry_delay_s=30), sleep)
    fn = Flaky([TransientError("503", retry_after=2), TransientError("503", retry_after=30)])
    assert asyncio.run(ex._with_retries(fn)) == "ok"
    assert fn.calls == 3 and sleep.calls == [2, 30]


def test_no_retry_after_backs_off_exponentially_capped() -> None:
    sleep = FakeSleep()
    ex = executor(ApplySettings(retries=4, retry_base_s=10, max_retry_delay_s=25), sleep)
    fn = Flaky([TransientError("timeout") for _ in range(3)])
    assert asyncio.run(ex._with_retries(fn)) == "ok"
    assert sleep.calls == [10, 20, 25]


def test_long_retry_after_after_a_short_one_stops_there() -> None:
    sleep = FakeSleep()
    ex = executor(ApplySettings(retries=5, max_retry_delay_s=30), sleep)
    fn = Flaky([TransientError("503", retry_after=1), TransientError("429", retry_after=31)])
    with pytest.raises(TransientError, match="429"):
        asyncio.run(ex._with_retries(fn))
    assert fn.calls == 2 and sleep.calls == [1]


def test_permanent_errors_are_not_retried() -> None:
    sleep = FakeSleep()
    ex = executor(ApplySettings(retries=5), sleep)
    fn = Flaky([PermanentError("no")])
    with pytest.raises(PermanentError):
        asyncio.run(ex._with_retries(fn))
    assert fn.calls == 1 and sleep.calls == []

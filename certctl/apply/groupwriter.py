"""Group commit: many concurrent actions share one state transaction.

Each action awaits :meth:`GroupWriter.write` with its part of a :class:`Batch`; the
writer merges every part that arrives while the previous transaction is in flight
into the next one. An action only proceeds once its part is durable, so "journal
intent before side effect" holds, at a cost of one commit per group instead of one
per action.
"""

from __future__ import annotations

import asyncio

from certctl.state.base import Batch, StateStore


def merge(parts: list[Batch]) -> Batch:
    out = Batch()
    for p in parts:
        out.intents.extend(p.intents)
        out.closed_intents.extend(p.closed_intents)
        out.cert_updates.extend(p.cert_updates)
        out.versions.extend(p.versions)
        out.deployments.extend(p.deployments)
        out.revocations.extend(p.revocations)
        out.audit.extend(p.audit)
    return out


class GroupWriter:
    def __init__(self, store: StateStore, *, max_parts: int = 1000) -> None:
        self._store = store
        self._max_parts = max_parts
        self._pending: list[tuple[Batch, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self.transactions = 0

    async def write(self, part: Batch) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((part, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_loop())
        await fut

    async def _flush_loop(self) -> None:
        while self._pending:
            # Let every runnable task add its part before we cut the group.
            await asyncio.sleep(0)
            group = self._pending[: self._max_parts]
            del self._pending[: self._max_parts]
            try:
                await asyncio.to_thread(self._store.write, merge([p for p, _ in group]))
                self.transactions += 1
            except Exception as exc:
                if len(group) == 1:
                    _settle(group, exc)
                else:
                    # One bad part must not fail its neighbours: retry them one by one
                    # so only the part that really fails gets the error.
                    for part, fut in group:
                        try:
                            await asyncio.to_thread(self._store.write, part)
                            self.transactions += 1
                        except Exception as part_exc:
                            _settle([(part, fut)], part_exc)
                        else:
                            _settle([(part, fut)], None)
                continue
            except BaseException as exc:
                _settle(group, exc)
                raise
            _settle(group, None)


def _settle(group: list[tuple[Batch, asyncio.Future[None]]], exc: BaseException | None) -> None:
    for _, fut in group:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(None)
        else:
            fut.set_exception(exc)

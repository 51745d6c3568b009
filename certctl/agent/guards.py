"""Bounded in-memory guards of the agent API: the replay cache and the rate-limited
log of refused requests."""

from __future__ import annotations

import collections
import logging
import time

log = logging.getLogger("certctl.agent.server")


class ReplayCache:
    """Nonces seen within the window, in arrival order; bounded (``add`` returns None
    when full, so a flood cannot make the server forget nonces it must refuse)."""

    def __init__(self, window: float, limit: int) -> None:
        self.window = window
        self.limit = limit
        self._seen: dict[str, float] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()

    def __len__(self) -> int:
        return len(self._seen)

    def add(self, nonce: str, now: float, until: float | None = None) -> bool | None:
        """True when new (now remembered), False when seen within the window, None when
        the cache is full. ``until``: remember it at least until then (a request dated
        ahead of the server's clock stays acceptable until its own time + the skew)."""
        order, seen = self._order, self._seen
        while order and order[0][0] <= now:
            _, old = order.popleft()
            if seen.get(old, now + 1) <= now:
                del seen[old]
        exp = seen.get(nonce)
        if exp is not None and exp > now:
            return False
        if len(seen) >= self.limit:
            return None
        exp = max(now + self.window, until if until is not None else now)
        seen[nonce] = exp
        order.append((exp, nonce))
        return True


class RateLog:
    """At most one log line per reason per ``every`` seconds (with a count of the
    rest), so a flood of bad requests cannot flood the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warn(self, reason: str, msg: str) -> None:
        now = time.monotonic()
        if now - self._last.get(reason, -1e9) >= self.every:
            skipped = self._quiet.pop(reason, 0)
            extra = f" ({skipped} more since the last report)" if skipped else ""
            log.warning("%s%s", msg, extra)
            self._last[reason] = now
        else:
            self._quiet[reason] = self._quiet.get(reason, 0) + 1

"""Failpoints: deterministic crash injection for the crash-safety tests.

``CERTCTL_FAILPOINTS="after_issue_intent=3,after_commit=1"`` makes the process SIGKILL
itself the 3rd time it passes ``after_issue_intent``. Unset (always, in production)
a failpoint is one dict lookup. Tests use it to prove that a run killed at any point
is finished by the next run without issuing twice or leaving half-written files.
"""

from __future__ import annotations

import os
import signal


class Failpoints:
    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("CERTCTL_FAILPOINTS", "") if spec is None else spec
        self._left: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, _, count = part.partition("=")
            self._left[name] = int(count or "1")

    def __bool__(self) -> bool:
        return bool(self._left)

    def hit(self, name: str) -> None:
        if name not in self._left:
            return
        self._left[name] -= 1
        if self._left[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

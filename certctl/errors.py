"""The error hierarchy.

Every error certctl raises on purpose derives from :class:`CertctlError`. The CLI
prints such errors as one clear message (never a traceback) and exits 1.

Subclasses carry meaning the caller acts on:

* :class:`InventoryError` -- the user's YAML is wrong; carries one or more
  :class:`Problem` records, each naming file, line, column and the path.
* :class:`TransientError` -- worth retrying, optionally after ``retry_after`` seconds
  (a CA answering 429/5xx, a dropped connection).
* :class:`PermanentError` -- retrying will not help (a CA refusing the request).
* :class:`LockedError` -- another apply holds the state lock; names the holder.
* :class:`StalePlanError` -- a saved plan no longer matches its inputs.

Third-party exceptions are translated at the connector boundary with
``raise ... from exc`` so callers only ever see these types.
"""

from __future__ import annotations

from dataclasses import dataclass


class CertctlError(Exception):
    """Root of every error certctl raises deliberately."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the inventory, located as precisely as we can."""

    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    path: str | None = None  # e.g. "certificates.www.sans[2]"

    def __str__(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += ": "
        field = f"{self.path}: " if self.path else ""
        return f"{where}{field}{self.message}"


class InventoryError(CertctlError):
    """The inventory is invalid. Holds every problem found, in file order."""

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class SecretError(CertctlError):
    """A secret reference could not be resolved. Names the reference, never a value."""


class StateError(CertctlError):
    """The state store failed or holds something unexpected."""


class LockedError(StateError):
    """Another process holds the apply lock."""

    def __init__(self, holder: str) -> None:
        self.holder = holder
        super().__init__(f"state is locked by another apply: {holder}")


class StalePlanError(CertctlError):
    """A saved plan was made against inputs that have changed since."""


class ConnectorError(CertctlError):
    """A connector (issuer, target, notifier) failed."""


class TransientError(ConnectorError):
    """A failure worth retrying, after ``retry_after`` seconds when the peer said so."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(ConnectorError):
    """A failure that retrying will not cure."""


class UnsafeValueError(CertctlError):
    """A value (path, argument) was rejected because it is unsafe to use."""

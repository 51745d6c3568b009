"""Notifications: expiry warnings, failures, unreachable issuers (and drift, from the
daemon), routed to owners and teams, deduplicated, retried, dead-lettered.

* :mod:`.events` -- pure: which events the inventory, the state and the clock give,
  and which notifiers (and recipients) each goes to.
* :mod:`.dispatch` -- one pass: record each (deduplication key, notifier) once in the
  state store, send what is due, retry with backoff, dead-letter after N attempts.

``run_once(engine, now)`` is the entry point (``certctl notify``, the daemon).
"""

from certctl.notify.dispatch import NotifyReport, NotifySettings, run_once, run_once_async
from certctl.notify.events import DEFAULT_THRESHOLDS, Delivery, Event

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Delivery",
    "Event",
    "NotifyReport",
    "NotifySettings",
    "run_once",
    "run_once_async",
]

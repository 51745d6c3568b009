"""One notification pass: collect events, record each (key, notifier) once, send what
is due, retry with backoff, dead-letter after ``max_attempts``.

Deduplication lives in the state store: ``enqueue_notifications`` inserts a (key,
notifier) pair only if it was never recorded, so however often a pass runs -- from
cron, the daemon, two machines at once -- each notification is sent at most once
(a sending process first *claims* the row with a lease, so two passes never send the
same row together). A failed attempt is retried ``backoff_base_s * 2^(n-1)`` later
(capped, at least the service's Retry-After); a permanent refusal (HTTP 4xx, SMTP 5xx,
a notifier no longer in the inventory) or the last allowed attempt moves the row to
``dead``, listed by ``certctl notifications --status dead``.

Error texts recorded and shown are the notifier's own messages (which never contain
URLs, keys or passwords) or an exception's type name.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

from certctl.connectors import ConnectorContext, Notifier, Registry
from certctl.errors import CertctlError, PermanentError, TransientError
from certctl.model import Inventory
from certctl.notify import events as E
from certctl.state.base import NotificationRecord, StateStore

log = logging.getLogger(__name__)


class EngineLike(Protocol):
    """What a pass needs from :class:`certctl.engine.Engine`."""

    def inventory(self) -> Inventory: ...

    def store(self) -> StateStore: ...

    def get_registry(self) -> Registry: ...

    def context(self) -> ConnectorContext: ...

    def clock(self) -> datetime: ...


@dataclass(frozen=True)
class NotifySettings:
    max_attempts: int = 5
    backoff_base_s: float = 60.0
    backoff_cap_s: float = 3600.0
    lease_s: float = 300.0  # a claimed row is not sent by another pass meanwhile
    concurrency: int = 8
    probe_issuers: bool = True
    probe_timeout_s: float = 5.0


@dataclass
class NotifyReport:
    events: list[E.Event] = field(default_factory=list)
    deliveries: list[E.Delivery] = field(default_factory=list)  # routed this pass
    new: int = 0  # (key, notifier) pairs recorded for the first time
    sent: list[tuple[str, str]] = field(default_factory=list)
    retrying: list[tuple[str, str, str]] = field(default_factory=list)  # key, notifier, error
    dead: list[tuple[str, str, str]] = field(default_factory=list)
    would_send: list[E.Delivery] = field(default_factory=list)  # dry run

    def to_json(self) -> dict[str, Any]:
        return {
            "events": len(self.events),
            "new": self.new,
            "sent": [{"key": k, "notifier": n} for k, n in self.sent],
            "retrying": [{"key": k, "notifier": n, "error": e} for k, n, e in self.retrying],
            "dead": [{"key": k, "notifier": n, "error": e} for k, n, e in self.dead],
            "would_send": [
                {"key": d.event.key, "notifier": d.notifier, "title": d.event.title}
                for d in self.would_send
            ],
        }


def backoff(attempts: int, settings: NotifySettings, retry_after: float | None = None) -> float:
    delay = min(settings.backoff_cap_s, settings.backoff_base_s * 2 ** max(attempts - 1, 0))
    return float(max(delay, retry_after or 0.0))


def collect_events(
    inv: Inventory, store: StateStore, now: datetime, unreachable: Sequence[E.Event] = ()
) -> list[E.Event]:
    found = E.expiry_events(inv, store.snapshot(), now)
    last_apply = next(
        (r for r in store.list_runs(before=None, limit=50) if r.kind == "apply"), None
    )
    if last_apply is not None:
        found += E.failure_events(last_apply.id, store.audit_log(limit=10_000))
    return found + list(unreachable)


async def probe_issuers(inv: Inventory, now: datetime, timeout: float) -> list[E.Event]:
    """A TCP connect to each issuer's service URL (``directory``, ``url`` or ``server``
    in its config); issuers without one (the local CA) are always reachable."""

    async def one(name: str, url: str) -> E.Event | None:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            return None
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as exc:
            why = (
                "timed out"
                if isinstance(exc, TimeoutError)
                else (exc.strerror or type(exc).__name__)
            )
            return E.issuer_unreachable_event(name, f"{host}:{port}", why, now)
        writer.close()
        return None

    checks = []
    for name in sorted(inv.issuers):
        cfg = inv.issuers[name].config
        url = next(
            (v for k in ("directory", "url", "server") if isinstance(v := cfg.get(k), str)), None
        )
        if url and "://" in url:
            checks.append(one(name, url))
    results = await asyncio.gather(*checks)
    return [r for r in results if r is not None]


def run_once(
    engine: EngineLike,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    settings: NotifySettings = NotifySettings(),
    extra_events: Sequence[E.Event] = (),
) -> NotifyReport:
    """One pass (synchronous; the daemon may call :func:`run_once_async` instead)."""
    return asyncio.run(
        run_once_async(engine, now, dry_run=dry_run, settings=settings, extra_events=extra_events)
    )


async def run_once_async(
    engine: EngineLike,
    now: datetime | None = None,
    *,
    dry_run: bool = False,
    settings: NotifySettings = NotifySettings(),
    extra_events: Sequence[E.Event] = (),
) -> NotifyReport:
    now = now if now is not None else engine.clock()
    inv = engine.inventory()
    store = engine.store()
    unreachable: list[E.Event] = []
    if settings.probe_issuers:
        unreachable = await probe_issuers(inv, now, settings.probe_timeout_s)
    found = await asyncio.to_thread(collect_events, inv, store, now, unreachable)
    found += list(extra_events)
    report = NotifyReport(events=found, deliveries=E.route(inv, found))
    if dry_run:
        known = {(r.key, r.notifier) for r in store.list_notifications(limit=1_000_000)}
        report.would_send = [d for d in report.deliveries if (d.event.key, d.notifier) not in known]
        return report
    records = [
        NotificationRecord(d.event.key, d.notifier, d.event.kind, d.event.cert, d.payload)
        for d in report.deliveries
    ]
    report.new = await asyncio.to_thread(store.enqueue_notifications, records, now)
    due = await asyncio.to_thread(store.due_notifications, now)
    notifiers: dict[str, Notifier] = {}
    sem = asyncio.Semaphore(settings.concurrency)

    async def send(rec: NotificationRecord) -> None:
        async with sem:
            lease = now + timedelta(seconds=settings.lease_s)
            claimed = await asyncio.to_thread(
                store.claim_notification, rec.key, rec.notifier, now, lease
            )
            if not claimed:
                return
            attempts = rec.attempts + 1
            try:
                notifier = notifiers.get(rec.notifier) or _make(engine, inv, rec.notifier)
                notifiers[rec.notifier] = notifier
                await notifier.notify(rec.event, rec.payload)
            except Exception as exc:  # every failure is recorded, none stops the pass
                error = _error_text(exc)
                permanent = isinstance(exc, PermanentError)
                if permanent or attempts >= settings.max_attempts:
                    report.dead.append((rec.key, rec.notifier, error))
                    status, nxt = "dead", None
                else:
                    report.retrying.append((rec.key, rec.notifier, error))
                    after = exc.retry_after if isinstance(exc, TransientError) else None
                    status = "pending"
                    nxt = now + timedelta(seconds=backoff(attempts, settings, after))
                log.info("notification %s -> %s: %s (%s)", rec.key, rec.notifier, status, error)
                await asyncio.to_thread(
                    store.finish_notification,
                    rec.key,
                    rec.notifier,
                    status=status,
                    attempts=attempts,
                    next_attempt_at=nxt,
                    error=error,
                    now=now,
                )
                return
            report.sent.append((rec.key, rec.notifier))
            await asyncio.to_thread(
                store.finish_notification,
                rec.key,
                rec.notifier,
                status="sent",
                attempts=attempts,
                next_attempt_at=None,
                error=None,
                now=now,
            )

    await asyncio.gather(*(send(r) for r in due))
    return report


def _make(engine: EngineLike, inv: Inventory, name: str) -> Notifier:
    spec = inv.notifiers.get(name)
    if spec is None:
        raise PermanentError(f"notifier {name} is no longer in the inventory")
    cls = engine.get_registry().notifiers.get(str(spec.get("type")))
    if cls is None:
        raise PermanentError(f"notifier {name}: unknown type {spec.get('type')!r}")
    return cls(name, spec, engine.context())


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, CertctlError):
        return str(exc)[:500]
    return type(exc).__name__

"""Prometheus metrics read from the state store at scrape time (no module state)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from certctl.state.base import RunStats, StateStore
from certctl.state.common import cert_status

EXPIRING_WINDOW = timedelta(days=30)
STATUSES = ("active", "revoked", "retired", "not_issued", "expired")
#: Upper bounds (s) of the run duration histogram's buckets.
RUN_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class StateCollector(Collector):
    """Certificates by status, expiring soon, per-certificate expiry, audit counts,
    failing issuance, the last run of each kind, runs by status and their durations."""

    def __init__(self, store: StateStore, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # collected at scrape time only

    def collect(
        self,
    ) -> Iterator[GaugeMetricFamily | CounterMetricFamily | HistogramMetricFamily]:
        now = self._clock()
        snap = self._store.snapshot()
        by_status = dict.fromkeys(STATUSES, 0)
        expiring = 0
        failing = 0
        not_after = GaugeMetricFamily(
            "certctl_certificate_not_after_seconds",
            "Expiry of each certificate's current version (Unix time).",
            labels=["name", "issuer"],
        )
        for name, rec in snap.certs.items():
            cur = rec.current
            status = cert_status(rec.retired, cur.status if cur else None)
            if status == "active" and cur is not None and cur.not_after <= now:
                status = "expired"
            by_status[status] = by_status.get(status, 0) + 1
            if rec.failures:
                failing += 1
            if cur is not None and not rec.retired:
                not_after.add_metric([name, cur.issuer], cur.not_after.timestamp())
                if status == "active" and cur.not_after - now <= EXPIRING_WINDOW:
                    expiring += 1
        g = GaugeMetricFamily(
            "certctl_certificates", "Certificates in the state by status.", labels=["status"]
        )
        for status, n in sorted(by_status.items()):
            g.add_metric([status], n)
        yield g
        yield GaugeMetricFamily(
            "certctl_certificates_expiring",
            "Active certificates expiring within 30 days.",
            value=expiring,
        )
        yield GaugeMetricFamily(
            "certctl_certificates_failing",
            "Certificates whose last issuance attempt failed (in backoff).",
            value=failing,
        )
        yield not_after
        deployed = GaugeMetricFamily(
            "certctl_deployments", "Deployments by status.", labels=["status"]
        )
        counts: dict[str, int] = {}
        for dep in snap.deployments.values():
            counts[dep.status] = counts.get(dep.status, 0) + 1
        for status, n in sorted(counts.items()):
            deployed.add_metric([status], n)
        yield deployed
        events = CounterMetricFamily(
            "certctl_events",
            "Audit log events by kind (issue, renew, deploy, revoke, *.failed ...).",
            labels=["event"],
        )
        for event, n in sorted(self._store.audit_counts().items()):
            events.add_metric([event], n)
        yield events
        last = GaugeMetricFamily(
            "certctl_last_run_duration_seconds",
            "Duration of the last finished run of each kind.",
            labels=["kind", "status"],
        )
        seen: set[str] = set()
        for run in self._store.list_runs(before=None, limit=200):
            if run.finished_at is None or run.kind in seen:
                continue
            seen.add(run.kind)
            last.add_metric(
                [run.kind, run.status], (run.finished_at - run.started_at).total_seconds()
            )
        yield last
        yield from _run_families(self._store.run_stats(RUN_BUCKETS))


def _run_families(
    stats: list[RunStats],
) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
    """``certctl_runs_total{kind,status}`` and ``certctl_run_duration_seconds{kind}``
    (runs that finished ok or failed; a crashed run's end is when it was found)."""
    runs = CounterMetricFamily(
        "certctl_runs", "Runs recorded in the state, by kind and status.", labels=["kind", "status"]
    )
    timed: dict[str, tuple[int, float, list[int]]] = {}
    for st in stats:
        runs.add_metric([st.kind, st.status], st.count)
        if st.status in ("ok", "failed"):
            n, total, within = timed.get(st.kind, (0, 0.0, [0] * len(RUN_BUCKETS)))
            timed[st.kind] = (
                n + st.finished,
                total + st.seconds,
                [a + b for a, b in zip(within, st.within, strict=True)],
            )
    yield runs
    hist = HistogramMetricFamily(
        "certctl_run_duration_seconds",
        "Durations of finished runs (ok or failed), by kind.",
        labels=["kind"],
    )
    for kind, (n, total, within) in sorted(timed.items()):
        buckets = [(_bound(b), float(c)) for b, c in zip(RUN_BUCKETS, within, strict=True)]
        hist.add_metric([kind], [*buckets, ("+Inf", float(n))], total)
    yield hist


def _bound(b: float) -> str:
    return str(float(b))

"""``certctl daemon``: the loops (git, apply, drift, housekeeping) and their ticks.

Each tick builds a fresh :class:`~certctl.engine.Engine` (so an edited inventory is
re-read) and closes it at the end. The apply tick is ``certctl apply --auto-approve``
under the apply lock; another holder makes it skip the tick. In git mode the git tick
fetches the branch and, for a new head commit, loads it in a scratch directory first:
a commit that breaks the inventory is reported (file:line) and audited as
``git.rejected``, and the commit in force stays checked out and keeps being applied.
A head older than the last applied commit (an ancestor of it) or not descending
from it is refused. Every applied commit is audited as ``git.applied`` with the run
id of its apply; the last one is read back from the audit log, so the rule survives
restarts and holds across machines sharing a PostgreSQL state.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certctl import notify
from certctl.apply.executor import ApplySettings
from certctl.connectors import default_registry
from certctl.daemon.gitsource import GitSource, redact_url
from certctl.daemon.scheduler import Loop
from certctl.engine import Engine, default_holder
from certctl.errors import CertctlError, InventoryError, LockedError
from certctl.inventory import load_inventory
from certctl.observe import drift
from certctl.plan.planner import count_line
from certctl.state.base import AuditEvent, Batch

log = logging.getLogger("certctl.daemon")

#: The watch loop's interval: in practice it only runs when a change triggers it.
WATCH_INTERVAL = 365 * 86400.0
GIT_APPLIED = "git.applied"
GIT_REJECTED = "git.rejected"
DRIFT_FOUND = "drift.found"


@dataclass
class DaemonConfig:
    inventory_path: Path
    state_url: str | None = None
    interval_apply: float = 300.0
    interval_drift: float = 600.0
    interval_housekeeping: float = 3600.0
    interval_git: float = 60.0
    interval_notify: float = 300.0
    concurrency: int = 25
    drift_timeout: float = 5.0
    drift_concurrency: int = 64
    git_url: str | None = None
    git_branch: str = "main"
    git_path: str = ""
    watch: bool = False  # re-plan when inventory files change
    watch_apply: bool = False  # ... and apply
    watch_debounce: float = 1.0
    #: Agents silent this long (s) are marked offline, their jobs re-queued (0: off).
    agent_offline_after: float = 90.0
    interval_agents: float = 15.0


@dataclass
class Daemon:
    config: DaemonConfig
    say: Callable[[str], None] = log.warning
    holder: str = field(default_factory=lambda: default_holder() + " (daemon)")
    git: GitSource | None = None
    _drifted: frozenset[str] | None = None
    _reported: set[str] = field(default_factory=set)
    _last_drift: drift.DriftReport | None = None
    #: Set on SIGTERM: an apply in flight stops between certificates.
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        c = self.config
        if c.git_url is not None:
            home = c.inventory_path.expanduser().absolute()
            home.mkdir(parents=True, exist_ok=True)
            state_dir = home / ".certctl"
            state_dir.mkdir(mode=0o700, exist_ok=True)
            if c.state_url is None:
                c.state_url = str(state_dir / "state.db")
            self.git = GitSource(c.git_url, c.git_branch, state_dir / "git", c.git_path)

    # ------------------------------------------------------------ engine
    def engine(self) -> Engine | None:
        """A fresh engine, or None in git mode before any commit was checked out."""
        c = self.config
        path = self.git.inventory_path if self.git is not None else c.inventory_path
        if self.git is not None and not path.exists():
            return None
        return Engine(inventory_path=path, state_url=c.state_url)

    def loops(self) -> list[Loop]:
        c = self.config
        out = []
        if self.git is not None:
            out.append(Loop("git", c.interval_git, self.git_tick))
        out += [
            Loop("apply", c.interval_apply, self.apply_tick),
            Loop("drift", c.interval_drift, self.drift_tick),
            Loop("housekeeping", c.interval_housekeeping, self.housekeeping_tick),
            Loop("notify", c.interval_notify, self.notify_tick),
        ]
        if c.agent_offline_after > 0:
            out.append(Loop("agents", c.interval_agents, self.agents_tick))
        if c.watch:  # only runs when the inventory watch triggers it
            out.append(Loop("watch", WATCH_INTERVAL, self.watch_tick, initial=False))
        return out

    # ------------------------------------------------------------ watch
    def watch_tick(self) -> None:
        """The inventory changed: apply (``watch_apply``) or plan and say what it
        would do. A broken edit fails the tick with file:line."""
        if self.config.watch_apply:
            self.apply_tick()
            return
        eng = self.engine()
        if eng is None:
            return
        try:
            plan, _ = eng.plan()
            self.say(f"watch: inventory changed: {count_line(plan.counts())}")
        finally:
            eng.close()

    # ------------------------------------------------------------ apply
    def _apply(self, eng: Engine) -> tuple[int | None, int]:
        """Apply what is due: (run id or None when there was nothing to do, failures)."""
        settings = ApplySettings(concurrency=self.config.concurrency, stop=self.stopping)
        _, report = eng.apply(settings=settings, holder=self.holder)
        if report is None:
            return None, 0
        done = report.done_counts()
        self.say(
            f"apply: run {report.run_id}: {done['issue']} issued, {done['renew']} renewed, "
            f"{done['deploy']} deployed, {done['revoke']} revoked, {done['retire']} retired; "
            f"{len(report.failed)} failed"
        )
        if report.stopped:
            self.say(
                f"apply: stopped early: {report.stopped} certificate(s) not started, "
                "left for the next run"
            )
        for r in report.failed:
            a = r.action
            where = f" -> {a.placement}" if a.placement else ""
            self.say(f"apply: FAILED {a.kind.value} {a.cert}{where}: {r.error}")
        for p in eng.publish_problems:
            self.say(f"apply: FAILED to publish: {p}")
        return report.run_id, len(report.failed) + len(eng.publish_problems)

    def apply_tick(self) -> None:
        eng = self.engine()
        if eng is None:
            self.say("apply: no good commit checked out yet; nothing to apply")
            return
        try:
            run_id, failed = self._apply(eng)
            if run_id is None:
                self.say("apply: nothing to do")
        except LockedError as exc:
            self.say(f"apply: skipped this tick: {exc}")
            return
        finally:
            eng.close()
        if failed:
            raise CertctlError(f"{failed} action(s) failed")

    # ------------------------------------------------------------ drift
    def drift_tick(self) -> drift.DriftReport | None:
        eng = self.engine()
        if eng is None:
            return None
        try:
            inv = eng.inventory()
            snap = eng.store().snapshot()
            report = drift.run(
                inv,
                snap,
                eng.clock(),
                eng.target,
                timeout=self.config.drift_timeout,
                concurrency=self.config.drift_concurrency,
                threads=2,
            )
            bad = frozenset(
                [f.expectation.name for f in report.findings if f.status != drift.OK]
                + [f"{f.cert} {f.placement}" for f in report.files]
            )
            if bad != self._drifted:  # audit and say it when the set changes
                self.say("drift: " + drift.summary_line(report))
                if bad:
                    eng.store().write(
                        Batch(
                            audit=[
                                AuditEvent(
                                    DRIFT_FOUND,
                                    detail={
                                        "counts": report.counts(),
                                        "files": len(report.files),
                                        "drifted": sorted(bad)[:100],
                                    },
                                )
                            ]
                        )
                    )
                self._drifted = bad
            self._last_drift = report
            return report
        finally:
            eng.close()

    # ------------------------------------------------------------ notify
    def notify_tick(self) -> None:
        """One notification pass: expiry warnings, failures, unreachable issuers, and
        the endpoints the last drift probe found drifted (deduplicated per endpoint
        and what it served, so a drift is told once until it changes)."""
        eng = self.engine()
        if eng is None:
            return
        try:
            report = notify.run_once(eng, eng.clock(), extra_events=self._drift_events())
            if report.sent or report.dead:
                self.say(f"notify: {len(report.sent)} sent, {len(report.dead)} dead-lettered")
        finally:
            eng.close()

    def _drift_events(self) -> list[notify.Event]:
        out: list[notify.Event] = []
        report = self._last_drift
        for f in report.findings if report is not None else ():
            if f.status == drift.OK:
                continue
            e = f.expectation
            served = str(f.served.get("fingerprint") or f.status)
            out.append(
                notify.Event(
                    kind="drift",
                    key=f"drift:{e.name}:{served}",
                    title=f"drift at {e.endpoint}: {f.status}",
                    text=f.detail,
                    severity="warning",
                    cert=e.cert,
                    facts={"endpoint": e.endpoint, "sni": e.target.sni, "status": f.status},
                )
            )
        return out

    # ------------------------------------------------------------ agents
    def agents_tick(self) -> None:
        """The offline sweep (see :mod:`certctl.agent.sweep`): agents silent longer
        than ``agent_offline_after`` go offline, their jobs back to the queue, and a
        notification goes out."""
        from datetime import timedelta

        from certctl.agent import sweep

        eng = self.engine()
        if eng is None:
            return
        try:
            after = timedelta(seconds=self.config.agent_offline_after)
            report = sweep.sweep(eng, eng.clock(), after)
            for a in report.offline:
                self.say(f"agents: {a.name} is offline (silent for more than {after})")
            if report.requeued:
                self.say(f"agents: {report.requeued} job(s) re-queued")
        finally:
            eng.close()

    # ------------------------------------------------------------ housekeeping
    def housekeeping_tick(self) -> None:
        """Keep each CA's CRL file fresh (it is otherwise only rewritten after a
        revocation or by ``certctl crl``) and remove git scratch space."""
        if self.git is not None:
            self.git.cleanup()
        eng = self.engine()
        if eng is None:
            return
        try:
            inv = eng.inventory()
            for name in sorted(inv.issuers):
                if not inv.issuers[name].config.get("crl_file"):
                    continue
                conn = eng.issuer(name)
                publish = getattr(conn, "publish_crl", None)
                if callable(publish):
                    try:
                        publish()
                    except CertctlError as exc:
                        self.say(f"housekeeping: CRL of {name}: {exc}")
        finally:
            eng.close()

    # ------------------------------------------------------------ git
    def _audit(self, eng: Engine, event: str, detail: dict[str, Any]) -> None:
        eng.store().write(Batch(audit=[AuditEvent(event, detail=detail)]))

    def last_applied(self, eng: Engine) -> str | None:
        rows = eng.store().list_audit(before=None, limit=1, event=GIT_APPLIED)
        if not rows:
            return None
        commit = (rows[0].get("detail") or {}).get("commit")
        return commit if isinstance(commit, str) else None

    def _state_engine(self) -> Engine:
        """An engine for state access alone (before any commit is checked out, the
        store is opened with the work dir as its inventory root)."""
        assert self.git is not None
        return Engine(inventory_path=self.git.workdir, state_url=self.config.state_url)

    def git_tick(self) -> str | None:
        """Fetch; apply a new head commit. Returns the commit applied, if any."""
        git = self.git
        assert git is not None
        head = git.fetch()
        meta = self._state_engine()
        try:
            last = self.last_applied(meta)
            if last == head:
                if not git.inventory_path.exists():  # e.g. the work dir was wiped
                    git.checkout(head)
                return None
            if last is not None:
                known = git.has_commit(last)
                if known and git.is_ancestor(head, last):
                    self._once(
                        head,
                        f"git: refusing to go back: {git.branch} is at {head[:12]}, an older "
                        f"commit than the last applied {last[:12]}",
                    )
                    return None
                if not known or not git.is_ancestor(last, head):
                    self._once(
                        head,
                        f"git: refusing {head[:12]}: it does not descend from the last applied "
                        f"{last[:12]} ({git.branch} was rewritten)",
                    )
                    return None
            problem = self._validate(head)
            if problem is not None:
                if head not in self._reported:
                    self._audit(meta, GIT_REJECTED, {"commit": head, "error": problem[:4000]})
                self._once(
                    head,
                    f"git: commit {head[:12]} breaks the inventory and is not applied "
                    f"(still in force: {last[:12] if last else 'nothing'}):\n{problem}",
                )
                return None
        finally:
            meta.close()
        git.checkout(head)
        eng = self.engine()
        assert eng is not None
        try:
            run_id, failed = self._apply(eng)
            self._audit(
                eng,
                GIT_APPLIED,
                {
                    "commit": head,
                    "previous": last,
                    "branch": git.branch,
                    "url": redact_url(git.url),
                    "subject": git.subject(head),
                    "run_id": run_id,
                    "failed": failed,
                },
            )
        finally:
            eng.close()
        self.say(f"git: applied {head[:12]} ({git.branch})")
        if failed:
            raise CertctlError(f"commit {head[:12]}: {failed} action(s) failed")
        return head

    def _once(self, head: str, message: str) -> None:
        """Fail the tick the first time ``head`` is refused (so ``--once`` exits 1 and
        the daemon says it once); later ticks on the same head stay quiet."""
        if head not in self._reported:
            self._reported.add(head)
            raise CertctlError(message)

    def _validate(self, sha: str) -> str | None:
        """None when commit ``sha`` loads as an inventory, else the problems with
        file:line relative to the repository."""
        assert self.git is not None
        path = self.git.export_candidate(sha)
        try:
            if not path.exists():
                return f"{self.git.subdir or '.'}: no such directory in commit {sha[:12]}"
            root = path if path.is_dir() else path.parent
            load_inventory(path, default_registry(root))
        except InventoryError as exc:
            text = str(exc)
            cand = str(self.git.candidate_dir)
            for prefix in (cand + os.sep, os.path.relpath(cand) + os.sep):
                text = text.replace(prefix, "")
            return text
        finally:
            self.git.cleanup()
        return None

"""Running a playbook: steps in order, each over its selection in batches, each batch
through the planner and the executor, behind a health gate; recorded in the audit log.

Operations are the existing machinery, not re-implementations:

* ``renew``: the planner with the batch forced (``PlanOptions(force=, only=)``), as
  ``certctl renew --force`` does; the executor carries the plan out.
* ``rotate_keys``: the same forced renewal over an inventory in which the batch's key
  spec says ``rotation: always``, so even ``rotation: never`` certificates (and keys
  made on the target) get a fresh key.
* ``redeploy``: deploy actions of the current version to every placement of the batch.
* ``revoke``: revoke actions (as ``certctl revoke``) with the step's reason; with
  ``replace: true`` the planner then plans the replacement of each revoked
  certificate (reason "current version revoked") and the executor issues and deploys.
* ``verify``: :mod:`certctl.observe.drift` over the batch: every TLS endpoint probed,
  every placement's files read back.
* ``notify``: one message through a named notifier.
* ``pause``: ask the operator; ``--yes`` answers yes; without a terminal and without
  ``--yes`` a playbook with a pause step is refused before anything runs.

A real run takes the apply lock for its whole length. Each batch is planned from a
fresh snapshot, executed (an ``apply`` run of its own, linked from the batch's audit
event) and, with ``verify: true``, verified. A certificate fails when any of its
actions fails or its verification does; when the failed share of a batch exceeds
``max_fail_percentage`` (default 0) the run stops there: later batches and steps are
not touched, the stop is audited and the exit code is 1.

``--check`` plans every batch of every step from one snapshot and prints the plan the
executor would be given; it writes nothing (no lock, no run, no audit).
"""

from __future__ import annotations

import asyncio
import dataclasses
import getpass
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certctl import __version__
from certctl.apply.executor import ApplyReport, ApplySettings, Executor
from certctl.engine import Engine, default_holder
from certctl.errors import CertctlError
from certctl.model import (
    Action,
    ActionKind,
    Inventory,
    Observed,
    Plan,
    Reason,
    StateSnapshot,
)
from certctl.observe import drift
from certctl.observe.targets import observe_targets
from certctl.plan.planner import OBSERVED_CUSTODY, PlanOptions
from certctl.plan.planner import plan as make_plan
from certctl.plan.render import LEGEND, render_text
from certctl.playbook import select as sel_mod
from certctl.playbook.spec import Playbook, Step, batch_sizes
from certctl.state.base import AuditEvent, Batch

PLAN_HEADER = "certctl will perform the following actions:\n"
#: At most this many certificate names go into one audit event's detail.
AUDIT_NAMES = 1000


@dataclass
class BatchResult:
    index: int
    certificates: list[str]
    failed: dict[str, str] = field(default_factory=dict)
    apply_runs: list[int] = field(default_factory=list)
    actions: int = 0

    @property
    def failed_percentage(self) -> float:
        return 100.0 * len(self.failed) / len(self.certificates) if self.certificates else 0.0


@dataclass
class RunResult:
    run_id: int | None
    ok: bool
    stopped: str | None = None  # why the run stopped early
    steps_run: int = 0
    changed: int = 0  # certificates acted on without failure
    failed: int = 0


class Stop(Exception):
    """The run stops here (health gate, a declined pause, a failed notify)."""


def git_revision(path: str) -> dict[str, Any] | None:
    """``{commit, dirty}`` of the file when it lies in a git checkout, else None."""
    p = Path(path)
    if not p.is_file():
        return None
    where = str(p.resolve().parent)
    try:
        head = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--", p.resolve().name],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def current_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return os.environ.get("USER", "unknown")


def batches_of(names: Sequence[str], step: Step) -> list[list[str]]:
    out: list[list[str]] = []
    start = 0
    for size in batch_sizes(step.serial, len(names)):
        out.append(list(names[start : start + size]))
        start += size
    return out


def rotated(inv: Inventory, names: Sequence[str]) -> Inventory:
    """The inventory with ``rotation: always`` for ``names`` (a forced fresh key)."""
    certs = dict(inv.certificates)
    for n in names:
        c = certs[n]
        certs[n] = dataclasses.replace(c, key=dataclasses.replace(c.key, rotation="always"))
    return dataclasses.replace(inv, certificates=certs)


def subset(inv: Inventory, names: Sequence[str]) -> Inventory:
    wanted = set(names)
    return dataclasses.replace(
        inv,
        certificates={n: c for n, c in inv.certificates.items() if n in wanted},
        endpoints={k: v for k, v in inv.endpoints.items() if v.get("certificate") in wanted},
    )


def as_revoked(snap: StateSnapshot, names: Sequence[str]) -> StateSnapshot:
    """The snapshot as it will be once ``names`` are revoked (to plan replacements
    under ``--check`` without revoking anything)."""
    certs = dict(snap.certs)
    for n in names:
        rec = certs.get(n)
        if rec is not None and rec.current is not None:
            cur = dataclasses.replace(rec.current, status="revoked")
            certs[n] = dataclasses.replace(rec, current=cur)
    return dataclasses.replace(snap, certs=certs)


def observe_only(snap: StateSnapshot, names: Sequence[str]) -> list[str]:
    """Those of ``names`` whose current version was adopted without its key."""
    out = []
    for n in names:
        rec = snap.certs.get(n)
        cur = rec.current if rec is not None else None
        if cur is not None and cur.key_custody == OBSERVED_CUSTODY:
            out.append(n)
    return out


def redeploy_actions(inv: Inventory, snap: StateSnapshot, names: Sequence[str]) -> list[Action]:
    out = []
    for n in names:
        rec = snap.certs.get(n)
        if rec is None or rec.retired or rec.current is None or rec.current.status == "revoked":
            continue
        if rec.current.key_custody == OBSERVED_CUSTODY:
            continue  # adopted without its key: nothing to deploy until it is renewed
        for p in inv.certificates[n].placements:
            out.append(
                Action(
                    ActionKind.DEPLOY,
                    n,
                    (Reason("forced", "redeploy requested by a playbook"),),
                    placement=p.id,
                    details={"target": p.target, "host": p.host, "version": rec.current.version},
                )
            )
    return out


def revoke_actions(snap: StateSnapshot, names: Sequence[str], reason: str) -> list[Action]:
    out = []
    for n in names:
        rec = snap.certs.get(n)
        cur = rec.current if rec is not None and not rec.retired else None
        if cur is None or cur.status == "revoked":
            continue
        out.append(
            Action(
                ActionKind.REVOKE,
                n,
                (Reason("forced", f"revoked by a playbook ({reason})"),),
                details={
                    "revocation_reason": reason,
                    "version": cur.version,
                    "serial": cur.serial,
                    "retire": False,
                },
            )
        )
    return out


def indent(text: str, prefix: str = "      ") -> str:
    return "".join(prefix + line if line.strip() else line for line in text.splitlines(True))


class PlaybookRunner:
    def __init__(
        self,
        engine: Engine,
        playbook: Playbook,
        *,
        check: bool = False,
        limit: str | None = None,
        yes: bool = False,
        interactive: bool = False,
        concurrency: int = 25,
        echo: Callable[[str], None] = print,
        confirm: Callable[[str], bool] | None = None,
    ) -> None:
        self.eng = engine
        self.pb = playbook
        self.check = check
        self.limit = sel_mod.parse_limit(limit)
        self.limit_text = limit
        self.yes = yes
        self.interactive = interactive
        self.settings = ApplySettings(concurrency=concurrency)
        self.echo = echo
        self.confirm = confirm
        self.holder = default_holder()
        self.run_id: int | None = None
        self.result = RunResult(None, True)
        self._check_snap: StateSnapshot | None = None

    # ------------------------------------------------------------------ run
    def run(self) -> RunResult:
        inv = self.eng.inventory()
        self.pb.check_inventory(inv)
        self._check_limit(inv)
        pauses = [s for s in self.pb.steps if s.action == "pause"]
        if pauses and not (self.check or self.yes or self.interactive):
            raise CertctlError(
                f"{pauses[0].label} pauses for confirmation: run on a terminal or pass --yes "
                "(nothing was run)"
            )
        store = self.eng.store()
        git = git_revision(self.pb.path)
        rev = f", git {git['commit'][:12]}{' (modified)' if git['dirty'] else ''}" if git else ""
        mode = " --check: nothing will be changed" if self.check else ""
        self.echo(
            f"PLAYBOOK [{self.pb.name}] {self.pb.source} (sha256 {self.pb.sha256[:12]}{rev}){mode}"
        )
        self.echo("\n" + LEGEND.rstrip("\n"))
        if self.check:
            self._check_snap = store.snapshot()
            for step in self.pb.steps:
                self._step(inv, step)
            self.echo(f"\nCHECK complete: {len(self.pb.steps)} step(s) planned; nothing changed.")
            return self.result
        store.acquire_apply_lock(self.holder)
        try:
            detail = {
                "playbook": self.pb.name,
                "path": self.pb.source,
                "sha256": self.pb.sha256,
                "git": git,
                "user": current_user(),
                "vars": self.pb.redacted_vars(),
                "limit": self.limit_text,
                "certctl": __version__,
            }
            self.run_id = store.begin_run("playbook", self.holder, detail)
            self.result.run_id = self.run_id
            status = "failed"
            try:
                self._audit("playbook.start", detail)
                for step in self.pb.steps:
                    self._step(inv, step)
                    self.result.steps_run += 1
                status = "ok" if self.result.ok else "failed"
            except Stop as stop:
                self.result.ok = False
                self.result.stopped = str(stop)
                self.result.steps_run += 1
            finally:
                summary = {
                    "steps_run": self.result.steps_run,
                    "steps": len(self.pb.steps),
                    "changed": self.result.changed,
                    "failed": self.result.failed,
                    "stopped": self.result.stopped,
                }
                self._audit("playbook.finish", {**summary, "status": status})
                store.finish_run(self.run_id, status, summary)
        finally:
            try:
                # Publish what the run changed (e.g. the issuer's CRL file), under the lock.
                for problem in self.eng.after_run():
                    self.result.ok = False
                    self.echo(f"  FAILED to publish: {problem}")
            finally:
                store.release_apply_lock()
        if self.result.stopped:
            self.echo(f"\nSTOPPED: {self.result.stopped}")
        self.echo(
            f"\nRECAP: {self.result.steps_run} of {len(self.pb.steps)} step(s) run, "
            f"{self.result.changed} certificate(s) done, {self.result.failed} failed "
            f"(run {self.run_id})."
        )
        return self.result

    def _check_limit(self, inv: Inventory) -> None:
        """An empty ``--limit`` (``--limit "$UNSET"``) is not "everything", and one that
        matches no certificate of the inventory is a typo: both refused, nothing run."""
        if self.limit is None:
            return
        keep, drop = self.limit
        if not keep and not drop:
            raise CertctlError(
                f"--limit {self.limit_text!r}: no pattern given (leave --limit out to act "
                "on every certificate the steps select); nothing was run"
            )
        if not sel_mod.apply_limit(sorted(inv.certificates), self.limit):
            raise CertctlError(
                f"--limit {self.limit_text!r} matches no certificate of the inventory; "
                "nothing was run"
            )

    def _audit(self, event: str, detail: Mapping[str, Any]) -> None:
        if self.check or self.run_id is None:
            return
        self.eng.store().write(
            Batch(audit=[AuditEvent(event, run_id=self.run_id, detail=dict(detail))])
        )

    def _snapshot(self) -> StateSnapshot:
        if self._check_snap is not None:
            return self._check_snap
        return self.eng.store().snapshot()

    # ----------------------------------------------------------------- steps
    def _step(self, inv: Inventory, step: Step) -> None:
        header = f"\nSTEP {step.index}/{len(self.pb.steps)} [{step.name}] {step.action}"
        if step.action == "pause":
            self.echo(header)
            self._pause(step)
            return
        snap = self._snapshot()
        names = sel_mod.apply_limit(
            sel_mod.select(inv, snap, step.select, self.eng.clock()), self.limit
        )
        if step.action == "notify":
            self.echo(header)
            self._notify(inv, step, names)
            return
        if step.action == "revoke":
            # Only what was issued can be revoked; a certificate never issued must
            # not be issued by the replacement either (from the very issuer named).
            names = [n for n in names if sel_mod.current_version(snap, n) is not None]
        batches = batches_of(names, step)
        sizes = ", ".join(str(len(b)) for b in batches) or "-"
        sel = step.select.describe() if step.select is not None else "everything"
        extra = ""
        if step.action == "revoke":
            extra = f", reason {step.reason}" + (", then replace" if step.replace else "")
        if step.action == "rotate_keys":
            extra = ", fresh keys"
        self.echo(
            f"{header}{extra}: {len(names)} certificate(s) selected ({sel}); "
            f"batches: {sizes}; max_fail_percentage {step.max_fail_percentage:g}"
        )
        self._audit(
            "playbook.step",
            {
                "step": step.index,
                "name": step.name,
                "action": step.action,
                "selected": len(names),
                "certificates": names[:AUDIT_NAMES],
                "batches": [len(b) for b in batches],
            },
        )
        if not names:
            self.echo("  nothing selected")
            return
        if step.action == "revoke" and step.replace and step.reason == "cACompromise":
            same = [
                n
                for n in names
                if (cur := sel_mod.current_version(snap, n)) is not None
                and cur.issuer == inv.certificates[n].issuer
            ]
            if same:
                more = f" and {len(same) - 10} more" if len(same) > 10 else ""
                shown = ", ".join(same[:10]) + more
                self.echo(
                    f"  WARNING: {shown}: the inventory still names the issuer that signed "
                    "the revoked version, so the replacement comes from that CA again "
                    "(point them at another issuer first, unless that CA was re-keyed)"
                )
        for i, batch in enumerate(batches, start=1):
            self.echo(f"  BATCH {i}/{len(batches)}: {', '.join(batch)}")
            result = BatchResult(i, batch)
            if self.check:
                self._check_batch(inv, step, batch)
                continue
            self._run_batch(inv, step, result)
            self._finish_batch(step, result, len(batches))

    def _finish_batch(self, step: Step, result: BatchResult, total: int) -> None:
        ok = len(result.certificates) - len(result.failed)
        self.result.changed += ok
        self.result.failed += len(result.failed)
        pct = result.failed_percentage
        for name, error in sorted(result.failed.items()):
            self.echo(f"    FAILED {name}: {error}")
        self.echo(
            f"    batch {result.index}/{total}: {ok} ok, {len(result.failed)} failed "
            f"({round(pct, 2):g}%)"
        )
        detail = {
            "step": step.index,
            "batch": result.index,
            "batches": total,
            "certificates": result.certificates[:AUDIT_NAMES],
            "failed": dict(sorted(result.failed.items())[:AUDIT_NAMES]),
            "failed_percentage": round(pct, 2),
            "apply_runs": result.apply_runs,
        }
        self._audit("playbook.batch", detail)
        if result.failed and step.ignore_errors:
            return
        if result.failed:
            self.result.ok = False
        if pct > step.max_fail_percentage:
            why = (
                f"{step.label} batch {result.index}/{total}: {len(result.failed)} of "
                f"{len(result.certificates)} certificate(s) failed ({round(pct, 2):g}% > "
                f"max_fail_percentage {step.max_fail_percentage:g}): "
                f"{', '.join(sorted(result.failed))}; later batches and steps were not run"
            )
            if step.action == "revoke" and step.replace:
                why += (
                    ". Once the cause is fixed, a rerun replaces what is still revoked; a "
                    "replacement already issued (now from another issuer, so no longer "
                    "selected) is deployed by `certctl apply`"
                )
            self._audit(
                "playbook.stop",
                {
                    "step": step.index,
                    "batch": result.index,
                    "failed": sorted(result.failed)[:AUDIT_NAMES],
                    "reason": "max_fail_percentage exceeded",
                },
            )
            raise Stop(why)

    # ------------------------------------------------------------ one batch
    def _observed(self, inv: Inventory, snap: StateSnapshot, batch: Sequence[str]) -> Observed:
        """Target read-back for the batch only (forced renewals need no ARI window),
        with the engine's view of open agent jobs where it has one (the planner waits
        on those instead of handing an agent the same work twice)."""
        sub = subset(inv, batch)
        jobs_for = getattr(self.eng, "_open_agent_jobs", None)
        extra: dict[str, Any] = {"agent_jobs": jobs_for(sub)} if callable(jobs_for) else {}
        return Observed(snap, observe_targets(sub, snap, self.eng.target), **extra)

    def _renew_plan(
        self, inv: Inventory, snap: StateSnapshot, batch: Sequence[str], force: bool
    ) -> Plan:
        names = frozenset(batch)
        opts = PlanOptions(force=names if force else frozenset(), only=names)
        return make_plan(inv, self._observed(inv, snap, batch), self.eng.clock(), opts)

    def _show(self, plan: Plan) -> None:
        """The planner's text rendering, without the legend (printed once) and header."""
        text = render_text(plan)
        if text.startswith(LEGEND):
            text = text[len(LEGEND) :].replace(PLAN_HEADER, "", 1).lstrip("\n")
        self.echo(indent(text).rstrip("\n"))

    def _check_batch(self, inv: Inventory, step: Step, batch: list[str]) -> None:
        snap = self._snapshot()
        now = self.eng.clock()
        if step.action in ("renew", "rotate_keys"):
            run_inv = rotated(inv, batch) if step.action == "rotate_keys" else inv
            self._show(self._renew_plan(run_inv, snap, batch, force=True))
        elif step.action == "redeploy":
            self._show(Plan(tuple(redeploy_actions(inv, snap, batch)), "", now))
        elif step.action == "revoke":
            self._show(Plan(tuple(revoke_actions(snap, batch, step.reason)), "", now))
            if step.replace:
                self.echo("      then, to replace them:")
                self._show(self._renew_plan(inv, as_revoked(snap, batch), batch, force=False))
        elif step.action == "verify":
            self._describe_verify(inv, snap, batch)
        if step.verify:
            self.echo("      then verify:")
            self._describe_verify(inv, snap, batch)

    def _describe_verify(self, inv: Inventory, snap: StateSnapshot, batch: Sequence[str]) -> None:
        sub = subset(inv, batch)
        exps = drift.expectations(sub, snap)
        placements = sum(len(c.placements) for c in sub.certificates.values())
        self.echo(
            f"      would probe {len(exps)} endpoint(s) and read back {placements} placement(s)"
        )

    def _execute(
        self, inv: Inventory, plan: Plan, result: BatchResult, snap: StateSnapshot
    ) -> None:
        if not plan.actions:
            return
        self._show(plan)
        ex = Executor(
            inv, snap, self.eng.store(), self.eng, self.eng.clock, self.settings, holder=self.holder
        )
        ex.preload_materials(plan)
        report: ApplyReport = asyncio.run(ex.run(plan))
        result.apply_runs.append(report.run_id)
        result.actions += len(plan.actions)
        for r in report.failed:
            where = f" -> {r.action.placement}" if r.action.placement else ""
            result.failed.setdefault(r.action.cert, f"{r.action.kind.value}{where}: {r.error}")

    def _run_batch(self, inv: Inventory, step: Step, result: BatchResult) -> None:
        batch = result.certificates
        store = self.eng.store()
        if step.action in ("renew", "rotate_keys"):
            run_inv = rotated(inv, batch) if step.action == "rotate_keys" else inv
            snap = store.snapshot()
            self._execute(run_inv, self._renew_plan(run_inv, snap, batch, True), result, snap)
        elif step.action == "redeploy":
            snap = store.snapshot()
            for name in observe_only(snap, batch):
                self.echo(f"  {name}: observe only (adopted without its key); not redeployed")
            plan = Plan(tuple(redeploy_actions(inv, snap, batch)), "", self.eng.clock())
            self._execute(inv, plan, result, snap)
        elif step.action == "revoke":
            snap = store.snapshot()
            plan = Plan(tuple(revoke_actions(snap, batch, step.reason)), "", self.eng.clock())
            self._execute(inv, plan, result, snap)
            if step.replace:
                todo = [n for n in batch if n not in result.failed]
                snap = store.snapshot()
                self._execute(inv, self._renew_plan(inv, snap, todo, False), result, snap)
        if step.action == "verify" or step.verify:
            todo = [n for n in batch if n not in result.failed]
            for name, why in self._verify(inv, todo, step.timeout).items():
                result.failed.setdefault(name, f"verify: {why}")

    def _verify(self, inv: Inventory, names: Sequence[str], timeout: float) -> dict[str, str]:
        """Probe the endpoints and read back the files of ``names``: cert -> problem."""
        if not names:
            return {}
        snap = self.eng.store().snapshot()
        report = drift.run(
            subset(inv, names), snap, self.eng.clock(), self.eng.target, timeout=timeout
        )
        out: dict[str, str] = {}
        for f in report.findings:
            if f.status != drift.OK and f.expectation.cert:
                e = f.expectation
                out.setdefault(e.cert or "", f"{e.endpoint} {f.status}: {f.detail}")
        for ff in report.files:
            out.setdefault(ff.cert, f"{ff.placement} files {ff.state}: {ff.detail}")
        checked = len(report.findings)
        self.echo(
            f"    verified {len(names)} certificate(s): {checked} endpoint(s) probed, "
            f"{report.files_checked or 0} placement(s) read back, {len(out)} with problems"
        )
        return out

    # ------------------------------------------------------ notify and pause
    def _notify(self, inv: Inventory, step: Step, names: list[str]) -> None:
        assert step.notifier is not None
        text = step.message
        if self.check:
            self.echo(f"  would send to {step.notifier}: {text}")
            return
        spec = inv.notifiers[step.notifier]
        cls = self.eng.get_registry().notifiers.get(str(spec.get("type")))
        payload = {
            "key": f"playbook:{self.run_id}:{step.index}",
            "event": "playbook",
            "title": f"certctl playbook {self.pb.name}: {step.name}",
            "text": text,
            "severity": "info",
            "cert": None,
            "recipients": [],
            "playbook": self.pb.name,
            "run_id": self.run_id,
            "certificates": names[:AUDIT_NAMES],
        }
        error = None
        try:
            if cls is None:
                raise CertctlError(f"notifier {step.notifier}: unknown type {spec.get('type')!r}")
            notifier = cls(step.notifier, spec, self.eng.context())
            asyncio.run(notifier.notify("playbook", payload))
        except Exception as exc:
            error = str(exc)[:500] if isinstance(exc, CertctlError) else type(exc).__name__
        self._audit(
            "playbook.notify",
            {"step": step.index, "notifier": step.notifier, "ok": error is None, "error": error},
        )
        if error is None:
            self.echo(f"  sent to {step.notifier}")
            return
        self.echo(f"  FAILED to notify {step.notifier}: {error}")
        if not step.ignore_errors:
            self.result.ok = False
            raise Stop(f"{step.label}: notifier {step.notifier} failed: {error}")

    def _pause(self, step: Step) -> None:
        if self.check:
            self.echo(f"  would pause: {step.prompt}")
            return
        if self.yes:
            self.echo(f"  {step.prompt} yes (--yes)")
            answer = True
        else:
            assert self.confirm is not None
            answer = self.confirm(step.prompt)
        self._audit("playbook.pause", {"step": step.index, "continue": answer, "yes": self.yes})
        if not answer:
            raise Stop(f"{step.label}: the operator declined to continue")

"""The engine wires inventory, state, connectors, planner and executor together.

The CLI (and later the daemon) call these methods; they hold no policy of their own.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from certctl.apply.executor import ApplyReport, ApplySettings, Executor
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, Issuer, Registry, Target, default_registry
from certctl.errors import CertctlError, InventoryError, PermanentError, StalePlanError
from certctl.inventory import load_inventory
from certctl.model import Inventory, Observed, Plan
from certctl.observe.ari import observe_renewal_windows
from certctl.observe.targets import observe_targets
from certctl.plan.planner import PlanOptions, options_of, plan
from certctl.state import open_store
from certctl.state.base import Batch, CertUpdate, StateStore


def utcnow() -> datetime:
    return datetime.now(UTC)


def default_holder() -> str:
    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


@dataclass
class Engine:
    inventory_path: Path
    state_url: str | None = None
    clock: Callable[[], datetime] = utcnow
    pool_size: int = 4
    registry: Registry | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    sync_mode: str = "batch"

    _inventory: Inventory | None = None
    _store: StateStore | None = None
    _issuers: dict[str, Issuer] = field(default_factory=dict)
    _targets: dict[str, Target] = field(default_factory=dict)
    _ctx: ConnectorContext | None = None
    #: What :meth:`after_run` reported after the last :meth:`apply`.
    publish_problems: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------- pieces
    def __post_init__(self) -> None:
        # Absolute from the start: connectors confine paths under the inventory root,
        # and `-i .` must behave like `-i /abs/path`.
        self.inventory_path = self.inventory_path.expanduser().absolute()

    @property
    def root(self) -> Path:
        p = self.inventory_path
        if not p.exists():
            raise InventoryError(f"{p}: no such file or directory")
        return p if p.is_dir() else p.parent

    def get_registry(self) -> Registry:
        if self.registry is None:
            self.registry = default_registry(self.root)
        return self.registry

    def inventory(self) -> Inventory:
        if self._inventory is None:
            if not self.inventory_path.exists():
                raise InventoryError(f"{self.inventory_path}: no such file or directory")
            self._inventory = load_inventory(self.inventory_path, self.get_registry())
        return self._inventory

    def store(self) -> StateStore:
        if self._store is None:
            self._store = open_store(
                self.state_url, inventory_root=self.root, pool_size=self.pool_size, clock=self.clock
            )
        return self._store

    def context(self) -> ConnectorContext:
        if self._ctx is None:
            self._ctx = ConnectorContext(
                inventory_root=self.root,
                clock=self.clock,
                vault=self.store(),
                syncer=BatchSyncer(mode=self.sync_mode),
                settings=self.settings,
            )
        return self._ctx

    def issuer(self, name: str) -> Issuer:
        if name not in self._issuers:
            spec = self.inventory().issuers.get(name)
            if spec is None:
                raise PermanentError(
                    f"issuer {name!r} is no longer in the inventory: restore its definition "
                    "so certctl can revoke what it issued"
                )
            cls = self.get_registry().issuers[spec.type]
            self._issuers[name] = cls(name, spec.config, self.context())
        return self._issuers[name]

    def target(self, name: str) -> Target:
        if name not in self._targets:
            spec = self.inventory().targets[name]
            cls = self.get_registry().targets[spec.type]
            self._targets[name] = cls(name, self.context())
        return self._targets[name]

    def after_run(self) -> list[str]:
        """Let each issuer a run used publish what changed (see ``Issuer.after_run``);
        returns the problems (the run itself already succeeded or failed)."""
        problems: list[str] = []
        for name in sorted(self._issuers):
            try:
                self._issuers[name].after_run()
            except CertctlError as exc:
                problems.append(f"issuer {name}: {exc}")
        return problems

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # ------------------------------------------------------------- operations
    def observe(self) -> Observed:
        inv = self.inventory()
        snap = self.store().snapshot()
        windows = observe_renewal_windows(inv, snap, self.issuer, self.get_registry())
        return Observed(
            snap, observe_targets(inv, snap, self.target), windows, self._open_agent_jobs(inv)
        )

    def _open_agent_jobs(
        self, inv: Inventory
    ) -> dict[tuple[str, str], tuple[str, str, str | None, str]]:
        """Open agent jobs of the agent-routed placements (one query; none without)."""
        if not any(p.agent is not None for c in inv.certificates.values() for p in c.placements):
            return {}
        from certctl.agent.protocol import OPEN_STATES

        out: dict[tuple[str, str], tuple[str, str, str | None, str]] = {}
        for job in self.store().agent_jobs(states=OPEN_STATES):  # oldest first: newest wins
            out[(job.certificate, job.placement)] = (job.id, job.state, job.agent, job.spec_digest)
        return out

    def plan(self, options: PlanOptions = PlanOptions()) -> tuple[Plan, Observed]:
        observed = self.observe()
        return plan(self.inventory(), observed, self.clock(), options), observed

    def _sync_flags(self, observed: Observed) -> None:
        """Record inventory flags the planner later needs from state alone (a removed
        certificate is no longer in the inventory to say it wants revoking)."""
        inv = self.inventory()
        updates = [
            CertUpdate(name, revoke_on_remove=cert.revoke_on_remove)
            for name, cert in inv.certificates.items()
            if (rec := observed.state.certs.get(name)) is not None
            and rec.revoke_on_remove != cert.revoke_on_remove
        ]
        if updates:
            self.store().write(Batch(cert_updates=updates))

    def apply(
        self,
        saved: Plan | None = None,
        *,
        options: PlanOptions = PlanOptions(),
        settings: ApplySettings = ApplySettings(),
        holder: str | None = None,
        confirm: Callable[[Plan], bool] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Plan, ApplyReport | None]:
        """Lock, re-observe, check a saved plan is current, then execute."""
        self.inventory()  # a broken inventory fails before the state is even opened
        store = self.store()
        store.acquire_apply_lock(holder or default_holder())
        try:
            if saved is not None:
                options = options_of(saved)
            fresh, observed = self.plan(options)
            if saved is not None and (
                saved.input_digest != fresh.input_digest
                or [a.id for a in saved.actions] != [a.id for a in fresh.actions]
            ):
                raise StalePlanError(
                    "the saved plan is stale: the inventory, the state or the targets changed "
                    "since it was made; run `certctl plan` again"
                )
            self._sync_flags(observed)
            # A saved plan was just checked to match the fresh one action for action;
            # execute the fresh one so an edited plan file cannot smuggle in details.
            todo = fresh
            if not todo.actions and not observed.state.intents:
                return todo, None
            if confirm is not None and todo.actions and not confirm(todo):
                return todo, None
            ex = Executor(
                self.inventory(),
                observed.state,
                store,
                self,
                self.clock,
                settings,
                holder=holder or default_holder(),
                on_progress=on_progress,
            )
            ex.preload_materials(todo)
            report = asyncio.run(ex.run(todo))
            self.publish_problems = self.after_run()
            return todo, report
        finally:
            store.release_apply_lock()

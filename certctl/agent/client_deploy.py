"""Deploying an agent job on this machine with certctl's own target connectors.

The job carries the placement's rendered target config (``target: {type, config}``);
the agent builds a local :class:`~certctl.model.Placement` (no host: the ``ssh``
target and its presets -- nginx, haproxy, apache... -- then run through
:class:`certctl.transport.local.LocalHost`, the ``file`` target writes directly), checks
it with the connector's own ``check_placement`` (so hostile values are refused here
too), then runs the executor's sequence: stage, commit (validate + reload), verify,
and on any failure rollback. The key is handed over in memory
(:class:`~certctl.connectors.Material` with ``key_pem``), exactly as the agentless
path does.

``{env: NAME}`` / ``{file: PATH}`` values in the config become
:class:`~certctl.model.Secret` references resolved on this host.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from certctl import pki
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, Material, Registry, Staged, default_registry
from certctl.errors import CertctlError
from certctl.model import KeySpec, Placement, Secret, SecretBytes

log = logging.getLogger("certctl.agent")
OUTPUT_MAX = 800


class _NoVault:
    """Targets do not use the issuer vault; the agent has none."""

    def get(self, issuer: str, key: str) -> bytes | None:
        return None

    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None:
        raise CertctlError("the agent keeps no issuer vault")


@dataclass(frozen=True)
class DeployOutcome:
    ok: bool
    detail: str
    fingerprint: str | None = None
    verify: dict[str, Any] | None = None


def secrets_of(value: Any, base: Path) -> Any:
    """A config with ``{env: X}`` / ``{file: X}`` turned into Secret references."""
    if isinstance(value, Mapping):
        if len(value) == 1:
            ((k, v),) = value.items()
            if k == "env" and isinstance(v, str):
                return Secret("env", v)
            if k == "file" and isinstance(v, str):
                return Secret("file", v, base_dir=base)
        return {str(k): secrets_of(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [secrets_of(v, base) for v in value]
    return value


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Deployer:
    """Runs target connectors locally (one instance per agent)."""

    def __init__(self, root: Path, registry: Registry | None = None) -> None:
        self.root = root
        self._registry = registry
        self.ctx = ConnectorContext(
            inventory_root=root,
            clock=_utcnow,
            vault=_NoVault(),
            syncer=BatchSyncer(mode="batch"),
            settings={},
        )

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = default_registry(None)
        return self._registry

    def placement(self, job: Mapping[str, Any]) -> Placement:
        target = job.get("target") or {}
        ttype = str(target.get("type", ""))
        config = target.get("config") or {}
        if not isinstance(config, Mapping):
            raise CertctlError("the job's target config is not an object")
        name = str(job.get("placement", "")).split("@", 1)[0] or ttype
        return Placement(name, ttype, None, secrets_of(config, self.root), {})

    def reusable_key(self, job: Mapping[str, Any], spec: KeySpec) -> SecretBytes | None:
        """Rotation ``never``: the key already deployed for this placement (its
        ``key_path`` under an absolute ``root``), when it is of the wanted type."""
        try:
            config = (job.get("target") or {}).get("config") or {}
            root, rel = config.get("root"), config.get("key_path")
            if not isinstance(root, str) or not isinstance(rel, str) or not root.startswith("/"):
                return None
            path = Path(root) / rel
            data = path.read_bytes()
            key = pki.load_key_pem(data)
            if pki.key_spec_id(key) != spec.id:
                return None
            return SecretBytes(data)
        except (OSError, CertctlError, ValueError, TypeError, AttributeError):
            return None

    async def deploy(
        self,
        job: Mapping[str, Any],
        cert_pem: bytes,
        chain_pem: bytes,
        key_pem: SecretBytes,
        version: int,
    ) -> DeployOutcome:
        try:
            placement = self.placement(job)
            cls = self.registry.targets.get(placement.type)
            if cls is None:
                known = ", ".join(sorted(self.registry.targets))
                return DeployOutcome(
                    False, f"unknown target type {placement.type!r} (this agent has: {known})"
                )
            problems = cls.check_placement(placement, self.root)
            if problems:
                return DeployOutcome(False, "; ".join(" ".join(str(p).split()) for p in problems))
            leaf = pki.load_cert_pem(cert_pem)
            if not pki.keys_match(pki.load_key_pem(key_pem), leaf.public_key()):
                return DeployOutcome(False, "the certificate is not for this job's key")
            fingerprint = pki.fingerprint(leaf)
        except CertctlError as exc:
            return DeployOutcome(False, str(exc))
        material = Material(
            str(job.get("certificate", "")),
            version,
            fingerprint,
            cert_pem,
            chain_pem,
            key_pem,
        )
        target = cls(placement.target, self.ctx)
        staged: Staged | None = None
        step = "stage"
        start = time.monotonic()
        try:
            staged = await target.stage(placement, material)
            step = "commit"
            await target.commit(staged)
            step = "verify"
            start = time.monotonic()
            await target.verify(staged)
            verify = {"ok": True, "ms": _ms(start), **staged.verify_detail}
            return DeployOutcome(True, "deployed", fingerprint, verify)
        except Exception as exc:
            msg = str(exc) if isinstance(exc, CertctlError) else f"{type(exc).__name__}: {exc}"
            log.debug("deploy %s failed at %s", placement.id, step, exc_info=True)
            detail = f"{step} failed: {msg}"
            output = getattr(exc, "output", None)
            if isinstance(output, str) and output:
                detail += f"; output: {output[:OUTPUT_MAX]}"
            verify_rec = None
            if step == "verify" and staged is not None:
                verify_rec = {"ok": False, "ms": _ms(start), **staged.verify_detail}
            if staged is not None:
                try:
                    await target.rollback(staged)
                except Exception as rexc:
                    detail += f"; rollback failed: {type(rexc).__name__}: {rexc}"
            return DeployOutcome(False, detail, None, verify_rec)
        finally:
            try:
                await target.close()
            except Exception:
                log.debug("closing the target failed", exc_info=True)


def _ms(start: float) -> int:
    return max(0, round((time.monotonic() - start) * 1000))

"""Connector interfaces (one small interface per role) and the connector registry.

An **issuer** turns a key + request into a certificate and can revoke it.
A **target** puts a certificate (and maybe its key) somewhere and reads back what is
there. A **notifier** tells people about events (later issues).

Connectors are found, in sorted order, in: the built-in ``certctl_connectors`` package
(the project's top-level ``connectors/`` folder), an operator's ``connectors/`` folder
beside the inventory (loaded by path under a private module name), and installed
packages exposing the ``certctl.connectors`` entry-point group. Each connector module
lists its classes in a module-level ``CONNECTORS`` list. Two connectors with the same
role and type name are a hard error naming both modules.

This module does no I/O itself and imports nothing that does.
"""

from __future__ import annotations

import abc
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar, Protocol

from certctl.errors import CertctlError
from certctl.model import (
    Certificate,
    DeploymentRecord,
    FileRecord,
    KeySpec,
    Placement,
    Profile,
    SecretBytes,
    TargetObservation,
    VersionRecord,
)

Clock = Callable[[], datetime]


class IssuerVault(Protocol):
    """Durable per-issuer storage (CA keys and certificates, CRL numbers...).

    Values marked ``secret`` are encrypted at rest by the state store.
    """

    def get(self, issuer: str, key: str) -> bytes | None: ...

    def put(self, issuer: str, key: str, value: bytes, *, secret: bool) -> None: ...


class FileSyncer(Protocol):
    """Batches durability: many concurrent writers share one sync of the filesystem."""

    async def sync_files(self, paths: Sequence[str]) -> None: ...

    async def sync_dirs(self, paths: Sequence[str]) -> None: ...


@dataclass
class ConnectorContext:
    """What connectors get from the engine. No module-level state anywhere."""

    inventory_root: Path
    clock: Clock
    vault: IssuerVault
    syncer: FileSyncer
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Scratch space connectors of one engine share (e.g. one SSH connection pool per
    #: event loop for all SSH targets), keyed by a name the connector module owns.
    shared: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Issuers


@dataclass(frozen=True)
class IssueRequest:
    """What an issuer needs to issue one certificate.

    ``private_key`` is a ``cryptography`` private key object (it never prints its
    material); issuers that need a CSR build one with :func:`certctl.pki.build_csr`.

    With ``key_custody: target`` the key was made on the target host: ``private_key``
    is None, ``csr_pem`` holds the CSR the host signed (already checked by the executor
    with :func:`certctl.pki.csr_public_key`: valid signature, exactly the certificate's
    names) and ``public_key`` is its key. An issuer issues for ``public_key``; one that
    submits a CSR (ACME) sends ``csr_pem`` as it is.
    """

    cert: Certificate
    profile: Profile
    private_key: Any
    public_key: Any
    #: The version this issuance replaces (a renewal), if any (ACME ``replaces``).
    previous: VersionRecord | None = None
    #: The CSR from the target host (``key_custody: target``); None otherwise.
    csr_pem: bytes | None = field(default=None, repr=False)
    #: Set by the executor once the payload is journaled: an issuer whose payload
    #: stopped being usable (an ACME order that went invalid) journals its
    #: replacement through this before any side effect on it (e.g. finalize).
    journal: Callable[[Mapping[str, Any]], Awaitable[None]] | None = field(
        default=None, compare=False, repr=False
    )


@dataclass(frozen=True)
class IssuedCert:
    cert_pem: bytes  # leaf only
    chain_pem: bytes  # intermediates up to (not including) the root; may be empty
    serial: str  # hex, lower case
    not_before: datetime
    not_after: datetime
    fingerprint: str  # sha256 hex of the leaf DER
    root_pem: bytes = b""


class Issuer(abc.ABC):
    """Issues and revokes certificates for one configured issuer.

    Contract:

    * :meth:`prepare` (async) runs before any certificate is issued and returns a small
      JSON-able payload that the engine journals before it calls :meth:`issue` (e.g.
      the serial the local CA will use, the ACME order URL: creating an order that is
      never finalized is harmless, finalizing one twice is not). If the process dies,
      the next run calls :meth:`issue` with the same payload and the same key, so the
      CA must not issue twice for one payload.
    * :meth:`issue` must be idempotent for a given payload.
    * :meth:`revoke` must be idempotent: revoking a revoked certificate succeeds.
    * Raise :class:`certctl.errors.TransientError` (with ``retry_after`` when known) or
      :class:`certctl.errors.PermanentError`; translate library exceptions with
      ``raise ... from``.
    """

    type_name: ClassVar[str]
    #: JSON Schema (draft 2020-12) for this issuer's config (without ``type``).
    config_schema: ClassVar[Mapping[str, Any]] = {"type": "object"}

    def __init__(self, name: str, config: Mapping[str, Any], ctx: ConnectorContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx

    async def prepare(self, req: IssueRequest) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert: ...

    @abc.abstractmethod
    async def revoke(self, version: VersionRecord, reason: str) -> None: ...

    def renewal_windows(
        self, versions: Sequence[VersionRecord]
    ) -> Mapping[str, tuple[datetime, datetime]]:
        """The CA's suggested renewal window (RFC 9773 ARI) for each version it has one
        for, by certificate name. Called while observing (synchronously, in one batch
        per issuer); must not raise for a single certificate. Default: none."""
        return {}

    def after_run(self) -> None:
        """Called once after an apply or ``certctl revoke`` run (under the apply lock)
        for each issuer the run used, to publish what the run changed (the local CA
        rewrites its ``crl_file``). Raise a CertctlError when that fails."""
        return None


# ---------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Material:
    """What gets deployed: a certificate version, its chain, and maybe its key."""

    cert: str
    version: int
    fingerprint: str
    cert_pem: bytes
    chain_pem: bytes
    key_pem: SecretBytes | None
    #: ``key_custody: target``: the key is on the host (``key_pem`` is None); the
    #: target swaps in the key :meth:`Target.generate_key` left pending there.
    key_on_target: bool = False

    @property
    def fullchain_pem(self) -> bytes:
        return self.cert_pem + self.chain_pem


@dataclass
class Staged:
    """A deployment that a target has prepared but not yet made visible."""

    placement: Placement
    material: Material
    data: dict[str, Any] = field(default_factory=dict)  # connector-private
    #: What :meth:`Target.verify` checked (JSON-able, no secrets), e.g. the endpoint
    #: probed; the executor records it with the outcome and duration.
    verify_detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ObserveItem:
    placement: Placement
    cert: str
    expected_fingerprint: str | None  # current version's fingerprint, if any
    record: DeploymentRecord | None  # last recorded deployment, if any


class Target(abc.ABC):
    """Puts certificates somewhere and reads back what is there.

    Contract (the executor calls, in order, per placement):

    * :meth:`stage` prepares everything without changing what is live (temp files).
      Safe to repeat; a stage that is never committed leaves nothing visible behind
      once :meth:`rollback` ran.
    * :meth:`commit` makes the staged content live atomically (rename), keeping
      backups of what it replaces, and returns the files written. Unchanged content
      is not rewritten.
    * :meth:`verify` checks the live result (read-back, later endpoint probes).
    * :meth:`rollback` restores what was there before :meth:`commit` (or just cleans a
      stage); idempotent.
    * :meth:`observe` reads back, in one batch, what each placement has now.
    """

    type_name: ClassVar[str]
    config_schema: ClassVar[Mapping[str, Any]] = {"type": "object"}

    def __init__(self, name: str, ctx: ConnectorContext) -> None:
        self.name = name
        self.ctx = ctx

    @classmethod
    def check_placement(cls, placement: Placement, inventory_root: Path) -> list[str]:
        """Validate a rendered placement config; returns problems (empty when fine).

        Called at inventory load, so hostile values are refused before any change.
        """
        return []

    @abc.abstractmethod
    async def stage(self, placement: Placement, material: Material) -> Staged: ...

    @abc.abstractmethod
    async def commit(self, staged: Staged) -> dict[str, FileRecord]: ...

    async def verify(self, staged: Staged) -> None:
        return None

    @abc.abstractmethod
    async def rollback(self, staged: Staged) -> None: ...

    @abc.abstractmethod
    def observe(self, items: Sequence[ObserveItem]) -> list[TargetObservation]: ...

    #: Whether :meth:`generate_key` is implemented (``key_custody: target``).
    generates_keys: ClassVar[bool] = False

    @classmethod
    def check_key_custody(cls, placement: Placement, inventory_root: Path) -> list[str]:
        """Problems with using this placement for ``key_custody: target`` (called at
        inventory load for such certificates; empty when fine)."""
        if not cls.generates_keys:
            return [f"a {cls.type_name} target cannot generate keys on the host"]
        return []

    async def generate_key(
        self, placement: Placement, spec: KeySpec, names: Sequence[str], *, reuse: bool
    ) -> bytes:
        """``key_custody: target``: make a private key ON the placement's host (it never
        leaves it) and return a PEM CSR for ``names`` signed with it.

        The key is left *pending* (not live) until :meth:`commit` of a
        :class:`Material` with ``key_on_target`` swaps it in. Idempotent: a pending key
        a killed run left is reused, so a rerun never makes a second key. With ``reuse``
        (rotation ``never``) the live key is used when there is one.
        """
        raise NotImplementedError(f"a {self.type_name} target cannot generate keys")

    async def close(self) -> None:
        """Release what this instance holds in the running event loop (connections);
        the executor calls it once at the end of a run. Idempotent."""
        return None


class Notifier(abc.ABC):
    """Sends one notification somewhere (webhook, Slack, e-mail...); see certctl.notify.

    Contract: :meth:`notify` delivers one message or raises. ``event`` is the event kind
    (``expiring``, ``failed``, ``drift``, ``issuer_unreachable``...); ``payload`` holds
    JSON-able facts with no secrets: ``key`` (the deduplication key, stable across
    retries -- pass it on where the service deduplicates, e.g. PagerDuty's
    ``dedup_key``), ``title``, ``text``, ``severity`` (info|warning|critical), ``cert``,
    ``owner``, ``team`` and ``recipients`` (routed e-mail addresses). Secrets in the
    config (:class:`certctl.model.Secret`) are revealed only while sending and never
    appear in messages or exceptions. Raise :class:`certctl.errors.TransientError`
    (retried with backoff) or :class:`certctl.errors.PermanentError` (dead-lettered).
    """

    type_name: ClassVar[str]
    config_schema: ClassVar[Mapping[str, Any]] = {"type": "object"}

    def __init__(self, name: str, config: Mapping[str, Any], ctx: ConnectorContext) -> None:
        self.name = name
        self.config = config
        self.ctx = ctx

    @abc.abstractmethod
    async def notify(self, event: str, payload: Mapping[str, Any]) -> None: ...


# ---------------------------------------------------------------------------
# Registry


class RegistryError(CertctlError):
    pass


_ROLES: dict[str, type] = {"issuers": Issuer, "targets": Target, "notifiers": Notifier}


@dataclass
class Registry:
    issuers: dict[str, type[Issuer]] = field(default_factory=dict)
    targets: dict[str, type[Target]] = field(default_factory=dict)
    notifiers: dict[str, type[Notifier]] = field(default_factory=dict)
    origins: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, cls: type, origin: str) -> None:
        for role, base in _ROLES.items():
            if isinstance(cls, type) and issubclass(cls, base):
                table: dict[str, Any] = getattr(self, role)
                name = cls.type_name  # type: ignore[attr-defined]
                if name in table:
                    first = self.origins[(role, name)]
                    raise RegistryError(
                        f"duplicate {role[:-1]} connector {name!r}: defined in {first} "
                        f"and in {origin}"
                    )
                table[name] = cls
                self.origins[(role, name)] = origin
                return
        raise RegistryError(f"{origin}: {cls!r} is not an Issuer, Target or Notifier")

    def add_module(self, module: Any) -> None:
        for cls in getattr(module, "CONNECTORS", ()):
            self.add(cls, module.__name__)

    def load_builtin(self) -> Registry:
        for role in sorted(_ROLES):
            pkg = importlib.import_module(f"certctl_connectors.{role}")
            for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
                self.add_module(importlib.import_module(f"{pkg.__name__}.{info.name}"))
        return self

    def load_dir(self, directory: Path) -> Registry:
        """Load an operator's ``connectors/`` folder (``*.py`` files, sorted) by path."""
        for path in sorted(directory.rglob("*.py")):
            mod_name = "certctl_local_connectors." + "_".join(
                path.relative_to(directory).with_suffix("").parts
            )
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                continue
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
            self.add_module(module)
        return self

    def load_entry_points(self) -> Registry:
        from importlib.metadata import entry_points

        for ep in sorted(entry_points(group="certctl.connectors"), key=lambda e: e.name):
            self.add_module(ep.load())
        return self


def default_registry(inventory_root: Path | None = None) -> Registry:
    """Built-ins, then installed entry points, then the inventory's own connectors/."""
    reg = Registry().load_builtin().load_entry_points()
    if inventory_root is not None and (inventory_root / "connectors").is_dir():
        reg.load_dir(inventory_root / "connectors")
    return reg


def names(items: Sequence[Any]) -> list[str]:
    return sorted(getattr(i, "type_name", str(i)) for i in items)

"""Typed, frozen model of the inventory, of observed state, and of plans.

Everything here is plain data: no I/O, no third-party imports beyond the standard
library. The planner (``certctl.plan``) is a pure function over these types.

Secrets (passwords, HMAC keys, private keys in memory) are wrapped in
:class:`Secret` / :class:`SecretBytes`, whose ``repr``/``str``/``format`` never show
the value, so they cannot leak into logs, plan output, audit or tracebacks.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from certctl.errors import SecretError

# ---------------------------------------------------------------------------
# Secrets


class Secret:
    """A reference to a secret value, resolved only when :meth:`reveal` is called.

    ``kind`` is ``env`` (an environment variable), ``file`` (a file's content, trailing
    newline stripped; relative paths resolve against ``base_dir``) or ``value`` (an
    inline literal, discouraged but supported). The value is never part of ``repr``,
    ``str``, ``format``, equality or pickling.
    """

    __slots__ = ("_base_dir", "_literal", "kind", "ref")

    def __init__(
        self, kind: str, ref: str, base_dir: Path | None = None, literal: str | None = None
    ) -> None:
        if kind not in ("env", "file", "value"):
            raise ValueError(f"unknown secret kind {kind!r}")
        self.kind = kind
        self.ref = ref if kind != "value" else "<inline>"
        self._base_dir = base_dir
        self._literal = literal

    def reveal(self) -> str:
        if self.kind == "value":
            assert self._literal is not None
            return self._literal
        if self.kind == "env":
            value = os.environ.get(self.ref)
            if value is None:
                raise SecretError(f"secret env:{self.ref} is not set in the environment")
            return value
        path = Path(self.ref).expanduser()
        if not path.is_absolute() and self._base_dir is not None:
            path = self._base_dir / path
        try:
            return path.read_text(encoding="utf-8").rstrip("\n")
        except OSError as exc:
            raise SecretError(f"secret file:{self.ref} cannot be read: {exc.strerror}") from None

    def describe(self) -> str:
        return f"{self.kind}:{self.ref}"

    def __repr__(self) -> str:
        return f"Secret({self.describe()})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and (self.kind, self.ref) == (other.kind, other.ref)

    def __hash__(self) -> int:
        return hash((self.kind, self.ref))

    def __reduce__(self) -> Any:
        raise TypeError("Secret values cannot be pickled")


class SecretBytes:
    """Key material in memory (e.g. a PEM private key). Never printed, never pickled."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return f"SecretBytes(<{len(self._value)} bytes redacted>)"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretBytes) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("SecretBytes cannot be pickled")


# ---------------------------------------------------------------------------
# Inventory


@dataclass(frozen=True, slots=True)
class Location:
    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


NO_LOCATION = Location("<none>", 0, 0)


@dataclass(frozen=True, slots=True)
class KeySpec:
    """What key a certificate wants.

    ``algorithm`` is ``ecdsa``, ``rsa`` or ``ed25519``. ``size`` is the curve size for
    ECDSA (256 or 384), the modulus size for RSA, 256 for Ed25519.
    ``rotation``: ``always`` (new key on each renewal) or ``never`` (reuse).
    ``custody``: ``controller`` (certctl keeps it, encrypted) or ``target``.
    """

    algorithm: str = "ecdsa"
    size: int = 256
    rotation: str = "always"
    custody: str = "controller"

    @property
    def id(self) -> str:
        """Stable identifier: ``ecdsa-p256``, ``rsa-3072``, ``ed25519``."""
        if self.algorithm == "ecdsa":
            return f"ecdsa-p{self.size}"
        if self.algorithm == "rsa":
            return f"rsa-{self.size}"
        return self.algorithm


@dataclass(frozen=True, slots=True)
class RenewBefore:
    """Renew when less than this remains: a fraction of the lifetime or a duration."""

    fraction: float | None = 1 / 3
    seconds: int | None = None

    def describe(self) -> str:
        if self.seconds is not None:
            return f"{self.seconds}s"
        return f"{round((self.fraction or 0) * 100)}%"


@dataclass(frozen=True)
class Profile:
    name: str
    ekus: tuple[str, ...] = ("serverAuth",)
    max_ttl_s: int | None = None
    allowed_keys: tuple[str, ...] = ()  # e.g. ("ecdsa-p256", "rsa-3072+"); empty = any
    allowed_issuers: tuple[str, ...] = ()  # empty = any
    san_patterns: tuple[str, ...] = ()  # regexes every name must match one of; empty = any
    location: Location = NO_LOCATION
    #: Days before expiry at which to notify (certctl.notify); empty = the default.
    expiry_warnings: tuple[int, ...] = ()

    def digest(self) -> str:
        """What about the profile changes the issued certificate (used for renewals)."""
        return stable_digest({"ekus": sorted(self.ekus), "max_ttl_s": self.max_ttl_s})[:16]


@dataclass(frozen=True)
class Policy:
    """An organisation-wide rule set applied at validation time."""

    name: str
    allowed_keys: tuple[str, ...] = ()
    max_ttl_s: int | None = None
    allowed_issuers: tuple[str, ...] = ()
    san_allow: tuple[str, ...] = ()  # exact names or ``*.suffix`` (any depth)
    san_regex: tuple[str, ...] = ()
    location: Location = NO_LOCATION


@dataclass(frozen=True)
class Issuer:
    name: str
    type: str
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    location: Location = NO_LOCATION


@dataclass(frozen=True)
class Host:
    name: str
    address: str | None = None
    vars: Mapping[str, Any] = field(default_factory=dict, compare=False)
    location: Location = NO_LOCATION
    #: Reached through a pull-mode agent: ``{"name": N}`` or ``{"labels": {..}, "os": O}``.
    agent: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Group:
    name: str
    hosts: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict, compare=False)
    location: Location = NO_LOCATION


@dataclass(frozen=True)
class TargetDef:
    """A target as written in the inventory (templates not yet rendered)."""

    name: str
    type: str
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    hosts: tuple[str, ...] = ()  # resolved host names (groups expanded); empty = local
    location: Location = NO_LOCATION


@dataclass(frozen=True)
class Placement:
    """One certificate bound to one target (on one host): the unit of deployment.

    ``config`` is the target's configuration rendered for this certificate and host
    (paths templated, group/host vars merged); it is what the target connector gets.
    ``connection`` says how to reach the host: its ``name``, ``address`` and merged
    ``vars`` (empty for a local placement); e.g. SSH targets read ``vars.ssh`` there.
    """

    target: str
    type: str
    host: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    connection: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    #: Agent-routed (``agent:`` on the target or its host): the selector of the agents
    #: that deploy it, ``{"name": N}`` or ``{"labels": {..}, "os": O|None}``; no SSH.
    agent: Mapping[str, Any] | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return self.target if self.host is None else f"{self.target}@{self.host}"

    def config_digest(self) -> str:
        return stable_digest(self.config)[:16]


@dataclass(frozen=True)
class Certificate:
    name: str
    common_name: str
    sans: tuple[str, ...] = ()
    issuer: str = ""
    profile: str = ""
    key: KeySpec = KeySpec()
    ttl_s: int = 90 * 86400
    renew_before: RenewBefore = RenewBefore()
    placements: tuple[Placement, ...] = ()
    owner: str | None = None
    tags: tuple[str, ...] = ()
    revoke_on_remove: bool = False
    revoked: bool = False
    revoke_reason: str = "unspecified"
    location: Location = NO_LOCATION

    @property
    def names(self) -> tuple[str, ...]:
        """Common name first, then SANs, without duplicates (order preserved)."""
        seen: dict[str, None] = {self.common_name: None}
        for san in self.sans:
            seen.setdefault(san, None)
        return tuple(seen)


@dataclass(frozen=True)
class Inventory:
    root: Path  # directory the inventory lives in (file's parent, or the directory)
    certificates: Mapping[str, Certificate]
    issuers: Mapping[str, Issuer]
    profiles: Mapping[str, Profile]
    policies: Mapping[str, Policy] = field(default_factory=dict)
    hosts: Mapping[str, Host] = field(default_factory=dict)
    groups: Mapping[str, Group] = field(default_factory=dict)
    targets: Mapping[str, TargetDef] = field(default_factory=dict)
    owners: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    notifiers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: TLS endpoints ``certctl drift`` probes besides the targets' ``verify`` ones:
    #: name -> {endpoint: "host:port", sni?, certificate?, timeout?}.
    endpoints: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: Teams as written (``email``, ``members``); owners name them (notification routing).
    teams: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    files: tuple[str, ...] = ()
    digest: str = ""  # sha256 over the inventory files' bytes, in load order


# ---------------------------------------------------------------------------
# Observed state (what the state store and the targets say)


@dataclass(frozen=True, slots=True)
class VersionRecord:
    """One issued certificate version as recorded in state."""

    cert: str
    version: int
    serial: str  # hex, lower case
    not_before: datetime
    not_after: datetime
    fingerprint: str  # sha256 hex of the DER certificate
    issuer: str
    key_spec: str  # KeySpec.id
    names: tuple[str, ...]
    profile_digest: str
    status: str = "active"  # active | superseded | revoked
    key_custody: str = "controller"
    revoked_at: datetime | None = None
    revocation_reason: str | None = None


@dataclass(frozen=True, slots=True)
class CertRecord:
    """A certificate as state knows it."""

    name: str
    current: VersionRecord | None
    revoke_on_remove: bool = False
    retired: bool = False
    failures: int = 0  # consecutive failed issuance attempts
    next_attempt_at: datetime | None = None  # backoff: do not retry before this
    spec_digest: str | None = None  # spec at the time of the last failure (backoff reset)
    force_renew: bool = False  # set by `certctl renew NAME --force`


@dataclass(frozen=True, slots=True)
class FileRecord:
    path: str
    sha256: str
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    cert: str
    placement: str  # Placement.id
    version: int
    fingerprint: str  # certificate fingerprint deployed
    files: Mapping[str, FileRecord]  # role -> file ("cert", "chain", "fullchain", "key", ...)
    status: str = "deployed"  # deployed | failed
    deployed_at: datetime | None = None
    config_digest: str = ""


class TargetState(enum.StrEnum):
    MATCH = "match"  # what is on the target is the current version
    MISSING = "missing"  # nothing (or part of the files) on the target
    DIFFERS = "differs"  # something else is on the target
    UNKNOWN = "unknown"  # could not look (unreachable); the plan does not act on it


@dataclass(frozen=True, slots=True)
class TargetObservation:
    cert: str
    placement: str
    state: TargetState
    fingerprint: str | None = None  # certificate fingerprint found on the target, if any
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OpenIntent:
    """A journal entry whose side effect may or may not have happened (crash recovery)."""

    id: str
    run_id: int
    cert: str
    action: str  # issue | renew | deploy | revoke
    placement: str | None
    payload: Mapping[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class StateSnapshot:
    """Everything the planner needs from the state store, loaded in a few batch queries."""

    certs: Mapping[str, CertRecord]
    deployments: Mapping[tuple[str, str], DeploymentRecord]  # (cert, placement id)
    intents: tuple[OpenIntent, ...] = ()
    generation: int = 0  # bumped by every write; part of the plan's input digest


@dataclass(frozen=True)
class Observed:
    state: StateSnapshot
    targets: Mapping[tuple[str, str], TargetObservation] = field(default_factory=dict)
    #: The CA's suggested renewal window (RFC 9773 ARI) for a certificate's current
    #: version, by certificate name (only where the issuer offers one).
    renewal_windows: Mapping[str, tuple[datetime, datetime]] = field(default_factory=dict)
    #: Open agent jobs by (certificate, placement id): ``(job id, state, agent, spec
    #: digest)`` (state queued | leased | issued | failed); the plan waits on them.
    agent_jobs: Mapping[tuple[str, str], tuple[str, str, str | None, str]] = field(
        default_factory=dict
    )

    def digest(self) -> str:
        obs = sorted(
            (k[0], k[1], v.state.value, v.fingerprint or "") for k, v in self.targets.items()
        )
        doc: dict[str, Any] = {"generation": self.state.generation, "targets": obs}
        if self.agent_jobs:
            doc["agent_jobs"] = sorted((k[0], k[1], v[0]) for k, v in self.agent_jobs.items())
        if self.renewal_windows:
            doc["renewal_windows"] = sorted(
                (k, s.isoformat(), e.isoformat()) for k, (s, e) in self.renewal_windows.items()
            )
        return stable_digest(doc)


# ---------------------------------------------------------------------------
# Plans


class ActionKind(enum.StrEnum):
    ISSUE = "issue"
    RENEW = "renew"
    DEPLOY = "deploy"
    REVOKE = "revoke"
    RETIRE = "retire"


@dataclass(frozen=True, slots=True)
class Reason:
    code: str  # machine-readable, see certctl.plan.reasons
    message: str  # one human sentence

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    cert: str
    reasons: tuple[Reason, ...]
    placement: str | None = None  # deploy: Placement.id
    # Non-secret facts for renderers and the executor (old serial, names, ...).
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def id(self) -> str:
        return f"{self.kind.value}:{self.cert}" + (f":{self.placement}" if self.placement else "")


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    input_digest: str
    created_at: datetime
    skipped: Mapping[str, str] = field(default_factory=dict)  # cert -> why held back (backoff)
    # What the plan was asked for (``force``, ``only``), so a saved plan re-plans alike.
    options: Mapping[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out = {k.value: 0 for k in ActionKind}
        for a in self.actions:
            out[a.kind.value] += 1
        return out

    @property
    def has_changes(self) -> bool:
        return bool(self.actions)


# ---------------------------------------------------------------------------
# helpers


def stable_digest(obj: Any) -> str:
    """sha256 hex over a canonical JSON form (sorted keys, Secrets by reference)."""
    return hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    ).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Secret):
        return {"secret": obj.describe()}
    if isinstance(obj, SecretBytes):
        return "<redacted>"
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot digest {type(obj).__name__}")

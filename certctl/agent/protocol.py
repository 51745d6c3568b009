"""The pull-mode agent protocol: what ``certctl agent`` and ``certctl serve`` say to
each other. Pure (no I/O): constants, the JSON shapes, request signing and checking,
and the job records both the server and the planner/executor use.

Transport: HTTP(S), JSON bodies, every path under :data:`PREFIX` (``/agent/v1``).
Errors are ``{"error": "<message>"}`` with 400 (bad request), 401 (authentication),
403 (revoked / not yours), 404, 409 (job not leased to you), 413 (body too large),
429 (+ ``Retry-After``) or 5xx.

Identity: at enrollment the agent makes an Ed25519 key pair; the private key is its
credential (kept 0600 in its state directory), the server stores only the public key.
Every request after enrollment carries four headers (:data:`HEADER_AGENT`,
:data:`HEADER_TIME`, :data:`HEADER_NONCE`, :data:`HEADER_SIGNATURE`); the signature
covers :func:`signing_bytes`: the method, the path with its query, the time, the nonce
and the SHA-256 of the body. The server refuses (401) an unknown agent, a bad
signature, a time more than :data:`MAX_SKEW` seconds off, or a nonce seen within
:data:`NONCE_WINDOW` seconds; (403) a revoked agent.

Endpoints (see the TypedDicts below for the bodies):

1. ``POST /agent/v1/enroll`` (unsigned) :class:`EnrollRequest` -> 201 (200 when the
   same name re-enrolls with the same key) :class:`EnrollResponse`.
2. ``POST /agent/v1/heartbeat`` :class:`HeartbeatRequest` -> 200 :class:`HeartbeatResponse`.
3. ``GET /agent/v1/work?wait=SECONDS`` (0..:data:`MAX_WAIT`) -> 200 :class:`WorkResponse`
   or 204 when nothing came within ``wait``. A job already leased to the agent comes
   first (resume after a restart); a lease lasts :data:`LEASE_SECONDS` and any request
   about the job renews it.
4. ``POST /agent/v1/jobs/{id}/csr`` :class:`CsrRequest` -> 200 :class:`CsrResponse`
   (idempotent: the same public key again returns the same certificate).
5. ``POST /agent/v1/jobs/{id}/result`` :class:`ResultRequest` -> 200 ``{}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypedDict

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from certctl.model import KeySpec

# --------------------------------------------------------------------- constants
PREFIX = "/agent/v1"
ENROLL_PATH = PREFIX + "/enroll"
HEARTBEAT_PATH = PREFIX + "/heartbeat"
WORK_PATH = PREFIX + "/work"


def csr_path(job_id: str) -> str:
    return f"{PREFIX}/jobs/{job_id}/csr"


def result_path(job_id: str) -> str:
    return f"{PREFIX}/jobs/{job_id}/result"


HEADER_AGENT = "X-Certctl-Agent"
HEADER_TIME = "X-Certctl-Time"
HEADER_NONCE = "X-Certctl-Nonce"
HEADER_SIGNATURE = "X-Certctl-Signature"

SIGNING_CONTEXT = b"certctl-agent-v1"
MAX_SKEW = 300  # seconds a request's time may differ from the server's
NONCE_WINDOW = 300  # seconds a nonce is remembered (>= MAX_SKEW, so a replay is caught)
NONCE_RE = re.compile(r"[0-9a-f]{32}")
NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
AGENT_ID_RE = re.compile(r"[0-9a-f]{32}")
JOB_ID_RE = re.compile(r"[0-9a-f]{32}")

MAX_WAIT = 60  # longest long poll (seconds)
LEASE_SECONDS = 120  # a leased job returns to the queue this long after the last word
HEARTBEAT_INTERVAL = 30  # seconds between an agent's heartbeats (default)
OFFLINE_AFTER = 90  # an agent silent this long is offline (3 heartbeats; default)
MAX_BODY = 256 * 1024  # bytes; larger request bodies are refused with 413
MAX_ATTEMPTS = 5  # failed results before a job is dead
MAX_DETAIL = 4000  # characters of a result's detail kept

KEY_LOST = "key lost"  # detail of a failed result when the journaled key is gone
#: The ``key_custody`` of a version issued for an agent's CSR. The inventory compiles
#: agent-routed certificates to this custody (``KeySpec.custody``), so the planner sees
#: no key change once the server has recorded the version (with the certificate's
#: ``key.id``, names and ``planner.profile_digest``).
VERSION_CUSTODY = "target"

# Job states. queued -> leased -> (issued ->) deployed; failed (re-queued after a
# backoff) or dead (gave up). "issued": a certificate was issued for the job's CSR
# and the deployment is not yet reported.
JobState = Literal["queued", "leased", "issued", "deployed", "failed", "dead"]
JOB_STATES: tuple[str, ...] = ("queued", "leased", "issued", "deployed", "failed", "dead")
OPEN_STATES: tuple[str, ...] = ("queued", "leased", "issued", "failed")
AGENT_STATUSES: tuple[str, ...] = ("online", "offline", "revoked")


# --------------------------------------------------------------------- errors
class ProtocolError(Exception):
    """A refused request: ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AuthError(ProtocolError):
    """401: unknown agent, bad signature, stale time or replayed nonce."""

    def __init__(self, message: str) -> None:
        super().__init__(401, message)


# --------------------------------------------------------------------- JSON shapes
class Facts(TypedDict):
    hostname: str
    os: str
    arch: str
    version: str
    ip: str


FACT_FIELDS: tuple[str, ...] = ("hostname", "os", "arch", "version", "ip")


class EnrollRequest(TypedDict):
    token: str
    name: str
    public_key: str  # base64 of the raw 32-byte Ed25519 public key
    labels: dict[str, str]
    facts: Facts


class EnrollResponse(TypedDict):
    agent_id: str
    server_time: str  # ISO 8601


class HeartbeatRequest(TypedDict):
    facts: Facts


class HeartbeatResponse(TypedDict):
    server_time: str


class KeyBody(TypedDict):
    type: Literal["rsa", "ec", "ed25519"]
    size: int | None  # RSA modulus bits
    curve: str | None  # "P-256" | "P-384"
    reuse: bool  # rotation "never": keep the key the agent already has for the placement


class NamesBody(TypedDict):
    common_name: str | None
    dns: list[str]
    ip: list[str]


class TargetBody(TypedDict):
    type: str
    config: dict[str, Any]  # the placement's rendered target config


class Job(TypedDict):
    id: str
    certificate: str
    placement: str
    version_hint: int | None
    attempt: int
    key: KeyBody
    names: NamesBody
    target: TargetBody
    phase: Literal["csr", "deploy"]
    certificate_pem: str | None
    chain_pem: str | None


class WorkResponse(TypedDict):
    job: Job


class CsrRequest(TypedDict):
    csr: str  # PEM


class CsrResponse(TypedDict):
    certificate_pem: str
    chain_pem: str
    version: int


class ResultRequest(TypedDict):
    status: Literal["deployed", "failed"]
    fingerprint: str | None  # sha256 hex of the deployed leaf (DER)
    detail: str
    verify: dict[str, Any] | None


# --------------------------------------------------------------------- keys
def encode_public_key(key: ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey) -> str:
    """base64 of the raw 32-byte public key (the enrollment form)."""
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode("ascii")


def decode_public_key(text: str) -> ed25519.Ed25519PublicKey:
    """The Ed25519 public key of :func:`encode_public_key`'s form; ProtocolError(400)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise ProtocolError(400, "public_key is not base64") from None
    if len(raw) != 32:
        raise ProtocolError(400, "public_key must be a raw 32-byte Ed25519 key")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def key_body(spec: KeySpec) -> KeyBody:
    """The JOB ``key`` field of an inventory key spec."""
    reuse = spec.rotation == "never"
    if spec.algorithm == "rsa":
        return {"type": "rsa", "size": spec.size, "curve": None, "reuse": reuse}
    if spec.algorithm == "ecdsa":
        return {"type": "ec", "size": None, "curve": f"P-{spec.size}", "reuse": reuse}
    return {"type": "ed25519", "size": None, "curve": None, "reuse": reuse}


def key_spec_of(body: Mapping[str, Any]) -> KeySpec:
    """The inventory key spec a JOB ``key`` field stands for (custody: target)."""
    kind = body.get("type")
    rotation = "never" if body.get("reuse") else "always"
    if kind == "rsa":
        return KeySpec("rsa", int(body.get("size") or 0), rotation, "target")
    if kind == "ec":
        curve = str(body.get("curve") or "")
        if not curve.upper().startswith("P-") or not curve[2:].isdigit():
            raise ProtocolError(400, f"unknown curve {curve!r}")
        return KeySpec("ecdsa", int(curve[2:]), rotation, "target")
    if kind == "ed25519":
        return KeySpec("ed25519", 256, rotation, "target")
    raise ProtocolError(400, f"unknown key type {kind!r}")


# --------------------------------------------------------------------- signing
def new_nonce() -> str:
    return secrets.token_hex(16)


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def signing_bytes(method: str, path: str, time: int | str, nonce: str, body: bytes) -> bytes:
    """What the signature covers. ``path`` is the path with its query string, exactly
    as sent (``/agent/v1/work?wait=30``)."""
    return b"\n".join(
        (
            SIGNING_CONTEXT,
            method.upper().encode("ascii"),
            path.encode("ascii"),
            str(time).encode("ascii"),
            nonce.encode("ascii"),
            body_digest(body).encode("ascii"),
        )
    )


def sign_request(
    private_key: ed25519.Ed25519PrivateKey,
    agent_id: str,
    method: str,
    path: str,
    body: bytes,
    now: float,
) -> dict[str, str]:
    """The headers that authenticate one request (``now``: unix seconds)."""
    t = str(int(now))
    nonce = new_nonce()
    sig = private_key.sign(signing_bytes(method, path, t, nonce, body))
    return {
        HEADER_AGENT: agent_id,
        HEADER_TIME: t,
        HEADER_NONCE: nonce,
        HEADER_SIGNATURE: base64.b64encode(sig).decode("ascii"),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    return value


@dataclass(frozen=True)
class SignedHeaders:
    """The four authentication headers of a request, checked for form."""

    agent_id: str
    time: int
    nonce: str
    signature: bytes


def parse_headers(headers: Mapping[str, str]) -> SignedHeaders:
    """The authentication headers, checked for form only; AuthError when one is
    missing or malformed."""
    agent = _header(headers, HEADER_AGENT)
    t = _header(headers, HEADER_TIME)
    nonce = _header(headers, HEADER_NONCE)
    sig = _header(headers, HEADER_SIGNATURE)
    if agent is None or t is None or nonce is None or sig is None:
        raise AuthError("missing agent authentication headers")
    if not AGENT_ID_RE.fullmatch(agent):
        raise AuthError(f"malformed {HEADER_AGENT}")
    if not t.isascii() or not t.isdigit() or len(t) > 12:
        raise AuthError(f"malformed {HEADER_TIME}")
    if not NONCE_RE.fullmatch(nonce):
        raise AuthError(f"malformed {HEADER_NONCE}")
    if len(sig) > 200:
        raise AuthError(f"malformed {HEADER_SIGNATURE}")
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise AuthError(f"malformed {HEADER_SIGNATURE}") from None
    if len(raw) != 64:
        raise AuthError(f"malformed {HEADER_SIGNATURE}")
    return SignedHeaders(agent, int(t), nonce, raw)


def verify_signed(
    public_key: ed25519.Ed25519PublicKey,
    signed: SignedHeaders,
    method: str,
    path: str,
    body: bytes,
    now: float,
) -> None:
    """Check the time window and the signature (not the nonce: the replay cache is
    the server's); AuthError otherwise."""
    if abs(signed.time - now) > MAX_SKEW:
        raise AuthError(f"request time is more than {MAX_SKEW} s from the server's clock")
    try:
        public_key.verify(
            signed.signature, signing_bytes(method, path, signed.time, signed.nonce, body)
        )
    except InvalidSignature:
        raise AuthError("bad request signature") from None


def verify_request(
    public_key: ed25519.Ed25519PublicKey,
    headers: Mapping[str, str],
    method: str,
    path: str,
    body: bytes,
    now: float,
) -> None:
    """Raise AuthError unless ``headers`` authenticate the request with
    ``public_key`` at ``now`` (unix seconds). The nonce is checked for form only."""
    verify_signed(public_key, parse_headers(headers), method, path, body, now)


# --------------------------------------------------------------------- routing
def selector_matches(
    selector: Mapping[str, Any], name: str, labels: Mapping[str, str], os: str | None
) -> bool:
    """Whether an agent (``name``, ``labels``, ``os``) takes work routed by
    ``selector``: ``{"name": NAME}`` or ``{"labels": {k: v}, "os": OS|None}``."""
    if "name" in selector:
        return bool(selector["name"] == name)
    want = selector.get("labels") or {}
    if any(labels.get(k) != v for k, v in want.items()):
        return False
    want_os = selector.get("os")
    return want_os is None or (os or "").lower() == str(want_os).lower()


def describe_selector(selector: Mapping[str, Any]) -> str:
    """``NAME`` or ``labels k=v,... os OS`` for plans and messages."""
    if "name" in selector:
        return str(selector["name"])
    parts = [f"{k}={v}" for k, v in sorted((selector.get("labels") or {}).items())]
    text = "labels " + ",".join(parts) if parts else "any agent"
    if selector.get("os"):
        text += f" os {selector['os']}"
    return text


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def spec_digest(
    certificate: str, placement: str, selector: Mapping[str, Any], job: Mapping[str, Any]
) -> str:
    """The digest identifying a job's content: enqueuing an identical pending job again
    returns the existing one."""
    return hashlib.sha256(
        canonical_json(
            {"certificate": certificate, "placement": placement, "selector": selector, "job": job}
        )
    ).hexdigest()


# --------------------------------------------------------------------- records
@dataclass(frozen=True)
class AgentJobSpec:
    """A job to enqueue for an agent (the executor makes these).

    ``job`` holds the JOB body fields other than id/attempt/phase/PEMs:
    ``{"version_hint": int|None, "key": KeyBody, "names": NamesBody,
    "target": TargetBody}`` (``certificate``/``placement`` may be repeated there),
    optionally ``"config_digest": placement.config_digest()`` (recorded with the
    deployment so the next plan sees the placement's config unchanged; the server
    falls back to its own inventory when it is absent). Extra keys are kept but not
    sent to the agent. ``spec_digest`` defaults to :func:`spec_digest` of the rest."""

    certificate: str
    placement: str
    selector: Mapping[str, Any]
    job: Mapping[str, Any]
    spec_digest: str = ""

    def digest(self) -> str:
        return self.spec_digest or spec_digest(
            self.certificate, self.placement, self.selector, self.job
        )


@dataclass(frozen=True)
class AgentJobRecord:
    """A stored agent job."""

    id: str
    certificate: str
    placement: str
    selector: Mapping[str, Any]
    job: Mapping[str, Any]
    spec_digest: str
    state: str  # one of JOB_STATES
    agent: str | None  # name of the agent holding (or that last held) the job
    attempts: int
    lease_until: datetime | None
    detail: str | None
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime | None = None
    version: int | None = None  # the version issued for the job's CSR
    public_key: str | None = None  # sha256 hex of the CSR's public key (idempotent CSR)
    fingerprint: str | None = None  # reported sha256 of the deployed leaf
    issue_payload: Mapping[str, Any] | None = None  # the issuer's journaled payload


@dataclass(frozen=True)
class AgentRecord:
    """An enrolled agent."""

    id: str
    name: str
    public_key: str  # base64 raw Ed25519
    labels: Mapping[str, str]
    facts: Mapping[str, str]
    status: str  # online | offline | revoked
    enrolled_at: datetime
    last_seen: datetime | None
    revoked_at: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentTokenRecord:
    """A bootstrap token (only its SHA-256 is stored)."""

    name: str
    token_hash: str
    created_at: datetime
    expires_at: datetime | None
    uses_left: int | None  # None: unlimited
    used: int
    revoked_at: datetime | None


def check_facts(obj: Any) -> Facts:
    """A FACTS object of the right form (missing fields become "")."""
    if not isinstance(obj, Mapping):
        raise ProtocolError(400, "facts must be an object")
    out: dict[str, str] = {}
    for k in FACT_FIELDS:
        v = obj.get(k, "")
        if not isinstance(v, str) or len(v) > 256 or not v.isprintable():
            # (shown on operators' terminals: no control characters / escapes)
            raise ProtocolError(400, f"facts.{k} must be printable text of at most 256 characters")
        out[k] = v
    return Facts(
        hostname=out["hostname"],
        os=out["os"],
        arch=out["arch"],
        version=out["version"],
        ip=out["ip"],
    )


def facts_dict(facts: Facts) -> dict[str, str]:
    """A FACTS object as a plain ``dict[str, str]``."""
    return {
        "hostname": facts["hostname"],
        "os": facts["os"],
        "arch": facts["arch"],
        "version": facts["version"],
        "ip": facts["ip"],
    }


def check_labels(obj: Any) -> dict[str, str]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping) or len(obj) > 64:
        raise ProtocolError(400, "labels must be an object of at most 64 entries")
    out: dict[str, str] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 63 or len(v) > 256:
            raise ProtocolError(400, "labels must map short strings to strings")
        if not k or not k.isprintable() or not v.isprintable():
            raise ProtocolError(400, "labels must be printable text")
        out[k] = v
    return out

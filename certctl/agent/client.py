"""``certctl agent``: the pull-mode agent that runs on a host the controller cannot
reach (behind NAT, locked-down networks).

It needs no inventory and no state store, only its credential
(:mod:`certctl.agent.client_state`). The loop:

* **heartbeat** every ``heartbeat_s`` seconds (hostname, OS, architecture, certctl
  version and the source IP of its connection to the server);
* **long poll** ``GET /agent/v1/work?wait=25``: the server answers as soon as a job
  for this agent is queued (no fixed polling interval), or 204 after ``wait``;
* for a job in phase ``csr``: make the key locally (or take the one journaled for this
  job id), journal it BEFORE sending the CSR, send a CSR with exactly the job's names,
  get the certificate; phase ``deploy`` (the certificate was already issued for the
  journaled key, e.g. after a crash): deploy with the journaled key;
* **deploy** with the same target connectors the agentless path uses, running on
  this machine (file target, the ``ssh`` target and its presets with the local
  transport: stage, commit -- validate, reload --, verify, rollback on failure), the
  key handed over in memory;
* **report** ``deployed`` (with the deployed leaf's fingerprint and the verify
  record) or ``failed`` (with the error), then drop the journal entry.

Errors: network errors, 5xx, 429 and 401 back off exponentially with full jitter
(capped at ``backoff_cap_s``; ``Retry-After`` honoured); 403 (the agent was revoked)
stops the agent with exit status 1 and a clear message. SIGTERM/SIGINT: the current
job step finishes (or, while waiting, is abandoned); the journal lets a restart
resume; exit 0.

The private key never leaves the host: it is only in the journal file (0600) and the
deployed key file; it never appears in logs, exceptions or HTTP bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import platform
import random
import signal
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from certctl import __version__, pki
from certctl.agent import protocol as P
from certctl.agent.client_deploy import Deployer, DeployOutcome
from certctl.agent.client_state import AgentState, Credential
from certctl.errors import CertctlError
from certctl.faults import Failpoints
from certctl.model import KeySpec, SecretBytes

log = logging.getLogger("certctl.agent")


class AgentRefused(CertctlError):
    """The server refuses this agent for good (revoked credential): stop."""


class Retry(Exception):
    """A request worth repeating later (network, 5xx, 429, 401)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LeaseLost(Exception):
    """409: the job is no longer leased to this agent."""


@dataclass(frozen=True)
class AgentSettings:
    heartbeat_s: float = float(P.HEARTBEAT_INTERVAL)
    wait_s: int = 25
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    request_timeout_s: float = 30.0
    #: Journal entries of jobs this old are dropped at start (a job the server still
    #: wants then comes back as a fresh CSR job after "key lost").
    journal_max_age_s: float = 7 * 86400.0


def full_jitter(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """AWS "full jitter": uniform in [0, min(cap, base * 2^(attempt-1))]."""
    return rng.uniform(0.0, min(cap, base * 2 ** max(attempt - 1, 0)))


def source_ip(server: str) -> str:
    """The local address this host uses to reach ``server`` (a UDP connect sends
    nothing); "" when it cannot be told."""
    parts = urllib.parse.urlsplit(server)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return str(s.getsockname()[0])
    except (OSError, IndexError):
        return ""


def check_server_url(server: str, insecure_http: bool = False) -> None:
    """Refuse a server URL that is not https (or http to this host's loopback)."""
    import ipaddress

    parts = urllib.parse.urlsplit(server)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme != "http" or not parts.hostname:
        raise CertctlError(f"server {server!r} must be an https:// URL")
    host = parts.hostname
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not insecure_http:
        raise CertctlError(
            f"server {server!r} is plain http: the bootstrap token and the jobs would cross "
            "the network unencrypted; use https:// (or --insecure-http to accept that)"
        )


def facts(server: str) -> P.Facts:
    return P.Facts(
        hostname=socket.gethostname(),
        os=platform.system().lower(),
        arch=platform.machine(),
        version=__version__,
        ip=source_ip(server),
    )


def _error_of(resp: httpx.Response) -> str:
    try:
        doc = resp.json()
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])[:300]
    except (ValueError, RecursionError):
        pass
    return resp.reason_phrase or f"HTTP {resp.status_code}"


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def http_client(server: str, ca_file: str | None, timeout: float) -> httpx.AsyncClient:
    verify: Any = True
    if ca_file:
        try:
            verify = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise CertctlError(f"cannot use the CA file {ca_file}: {exc}") from None
    return httpx.AsyncClient(
        base_url=server.rstrip("/"),
        verify=verify,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        headers={"User-Agent": f"certctl-agent/{__version__}"},
        follow_redirects=False,
    )


async def enroll(
    state: AgentState,
    *,
    server: str,
    token: str,
    name: str,
    labels: Mapping[str, str],
    ca_file: str | None = None,
    insecure_http: bool = False,
) -> Credential:
    """Enroll with a bootstrap token: make the Ed25519 key here, send its public half,
    store the credential (0600). Re-enrolling with an existing credential sends the
    same key (the server answers 200).

    Plain ``http://`` is refused unless the server is on this host (loopback) or
    ``insecure_http``: the token and, later, the jobs would cross the network in clear."""
    check_server_url(server, insecure_http)
    if not P.NAME_RE.fullmatch(name):
        raise CertctlError(
            f"agent name {name!r} is invalid (lowercase letters, digits, '.', '_', '-'; "
            "at most 63 characters, starting with a letter or digit)"
        )
    state.prepare()
    key: Ed25519PrivateKey | None = None
    if state.has_credential():
        old = state.load_credential()
        if old.name != name or old.server.rstrip("/") != server.rstrip("/"):
            raise CertctlError(
                f"{state.credential_path} already holds the credential of agent {old.name!r} "
                f"for {old.server}; use another --state-dir or remove it to enroll anew"
            )
        key = old.private_key
    if key is None:
        key = Ed25519PrivateKey.generate()
    body: P.EnrollRequest = {
        "token": token,
        "name": name,
        "public_key": P.encode_public_key(key),
        "labels": dict(labels),
        "facts": facts(server),
    }
    async with http_client(server, ca_file, 30.0) as http:
        try:
            resp = await http.post(P.ENROLL_PATH, content=P.canonical_json(body))
        except httpx.HTTPError as exc:
            raise CertctlError(f"cannot reach {server}: {type(exc).__name__}: {exc}") from None
    if resp.status_code not in (200, 201):
        raise CertctlError(
            f"enrollment refused by {server} (HTTP {resp.status_code}): {_error_of(resp)}"
        )
    try:
        agent_id = str(resp.json()["agent_id"])
    except (ValueError, KeyError, TypeError):
        raise CertctlError(f"enrollment: {server} answered without an agent_id") from None
    cred = Credential(agent_id, name, server.rstrip("/"), key, ca_file)
    state.save_credential(cred)
    return cred


@dataclass
class Agent:
    """One running agent (see the module docstring)."""

    state: AgentState
    cred: Credential
    settings: AgentSettings = AgentSettings()
    clock: Callable[[], float] = time.time
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    faults: Failpoints = field(default_factory=Failpoints)

    def __post_init__(self) -> None:
        self._stop = asyncio.Event()
        self._fatal: BaseException | None = None
        self._http: httpx.AsyncClient | None = None
        self.deployer = Deployer(self.state.dir)
        self.jobs_done = 0

    # ------------------------------------------------------------------ HTTP
    async def request(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> tuple[int, Any]:
        """A signed request; ``(status, json or None)`` for 2xx. Raises Retry,
        AgentRefused (403) or LeaseLost (409); other 4xx become CertctlError."""
        assert self._http is not None
        raw = b"" if body is None else P.canonical_json(body)
        headers = P.sign_request(
            self.cred.private_key, self.cred.agent_id, method, path, raw, self.clock()
        )
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            resp = await self._http.request(
                method,
                path,
                content=raw if body is not None else None,
                headers=headers,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise Retry(f"{method} {path.split('?')[0]}: {type(exc).__name__}") from None
        status = resp.status_code
        if 200 <= status < 300:
            if status == 204 or not resp.content:
                return status, None
            try:
                return status, resp.json()
            except (ValueError, RecursionError):  # not JSON, or nested past the parser
                raise Retry(f"{method} {path}: the server answered with invalid JSON") from None
        message = _error_of(resp)
        if status == 403:
            raise AgentRefused(
                f"the server refuses agent {self.cred.name!r} (HTTP 403): {message}; "
                "the credential was revoked -- enroll again with a new token"
            )
        if status == 409:
            raise LeaseLost(message)
        if status in (401, 408, 425, 429) or status >= 500:
            raise Retry(
                f"{method} {path.split('?')[0]}: HTTP {status}: {message}", _retry_after(resp)
            )
        raise CertctlError(f"{method} {path.split('?')[0]}: HTTP {status}: {message}")

    async def _backoff(self, attempt: int, retry_after: float | None) -> None:
        delay = full_jitter(
            attempt, self.settings.backoff_base_s, self.settings.backoff_cap_s, self.rng
        )
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.settings.backoff_cap_s))
        stopper = asyncio.ensure_future(self._stop.wait())
        sleeper = asyncio.ensure_future(self.sleep(delay))
        await asyncio.wait({stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
        for t in (stopper, sleeper):
            t.cancel()

    async def _persist(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Repeat an idempotent step (CSR, result) with backoff until it answers or the
        agent is stopping (then None)."""
        attempt = 0
        while True:
            try:
                return await fn()
            except Retry as exc:
                attempt += 1
                log.warning("%s: %s (retrying)", what, exc)
                if self._stop.is_set():
                    return None
                await self._backoff(attempt, exc.retry_after)
                if self._stop.is_set():
                    return None

    # ------------------------------------------------------------------ loop
    def stop(self) -> None:
        self._stop.set()

    async def run(self, *, max_jobs: int | None = None, install_signals: bool = True) -> None:
        """Run until stopped (SIGTERM/SIGINT, :meth:`stop`, or ``max_jobs`` handled).
        Raises AgentRefused when the server revoked this agent."""
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self._stop.set)
        self._http = http_client(
            self.cred.server, self.cred.ca_file, self.settings.request_timeout_s
        )
        log.info("agent %s (%s) serving %s", self.cred.name, self.cred.agent_id, self.cred.server)
        for job_id in self.state.prune(self.settings.journal_max_age_s, self.clock()):
            log.warning(
                "job %s: journal entry older than %ss removed",
                job_id,
                int(self.settings.journal_max_age_s),
            )
        beat = asyncio.ensure_future(self._heartbeat_loop())
        try:
            await self._work_loop(max_jobs)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat
            await self._http.aclose()
            self._http = None
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    with contextlib.suppress(NotImplementedError, RuntimeError):
                        loop.remove_signal_handler(sig)
        if self._fatal is not None:
            raise self._fatal

    async def _heartbeat_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.request("POST", P.HEARTBEAT_PATH, {"facts": facts(self.cred.server)})
                attempt = 0
                delay = self.settings.heartbeat_s
            except AgentRefused as exc:
                self._fatal = exc
                self._stop.set()
                return
            except (Retry, CertctlError, LeaseLost) as exc:
                attempt += 1
                log.warning("heartbeat: %s", exc)
                delay = min(
                    self.settings.heartbeat_s,
                    max(
                        1.0,
                        full_jitter(
                            attempt,
                            self.settings.backoff_base_s,
                            self.settings.backoff_cap_s,
                            self.rng,
                        ),
                    ),
                )
            stopper = asyncio.ensure_future(self._stop.wait())
            sleeper = asyncio.ensure_future(self.sleep(delay))
            await asyncio.wait({stopper, sleeper}, return_when=asyncio.FIRST_COMPLETED)
            for t in (stopper, sleeper):
                t.cancel()

    async def _poll(self) -> Mapping[str, Any] | None:
        wait = max(0, min(int(self.settings.wait_s), P.MAX_WAIT))
        _, doc = await self.request(
            "GET", f"{P.WORK_PATH}?wait={wait}", timeout=wait + self.settings.request_timeout_s
        )
        if doc is None:
            return None
        job = doc.get("job") if isinstance(doc, dict) else None
        if not isinstance(job, dict):
            raise Retry("GET work: the answer holds no job")
        return job

    async def _work_loop(self, max_jobs: int | None) -> None:
        attempt = 0
        while not self._stop.is_set():
            poll = asyncio.ensure_future(self._poll())
            stopper = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait({poll, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not poll.done():  # stopping while waiting: abandon the poll
                poll.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await poll
                return
            try:
                job = poll.result()
            except AgentRefused as exc:
                self._fatal = exc
                return
            except Retry as exc:
                attempt += 1
                log.warning("polling for work: %s (backing off)", exc)
                await self._backoff(attempt, exc.retry_after)
                continue
            except (CertctlError, LeaseLost) as exc:
                attempt += 1
                log.error("polling for work: %s (backing off)", exc)
                await self._backoff(attempt, None)
                continue
            attempt = 0
            if job is None:
                continue
            try:
                await self.handle(job)
            except AgentRefused as exc:
                self._fatal = exc
                return
            self.jobs_done += 1
            if max_jobs is not None and self.jobs_done >= max_jobs:
                return

    # ------------------------------------------------------------------ jobs
    async def handle(self, job: Mapping[str, Any]) -> None:
        """Carry out one job: key + CSR (phase csr), deploy, report."""
        job_id = str(job.get("id", ""))
        if not P.JOB_ID_RE.fullmatch(job_id):
            log.error("ignoring a job with a malformed id")
            return
        cert = str(job.get("certificate", ""))
        placement = str(job.get("placement", ""))
        log.info("job %s: %s -> %s (phase %s)", job_id, cert, placement, job.get("phase"))
        try:
            outcome = await self._carry_out(job_id, job)
        except LeaseLost as exc:
            log.warning("job %s: lease lost (%s); leaving it", job_id, exc)
            return
        except AgentRefused:
            raise
        except CertctlError as exc:  # e.g. the server refused the CSR (400): report it
            outcome = DeployOutcome(False, str(exc))
        except Exception as exc:  # e.g. the journal cannot be written (disk full)
            log.debug("job %s failed", job_id, exc_info=True)
            outcome = DeployOutcome(False, f"{type(exc).__name__}: {exc}")
        if outcome is None:  # stopping mid-way: the journal lets a restart resume
            return
        self.faults.hit("agent_before_result")
        result: P.ResultRequest = {
            "status": "deployed" if outcome.ok else "failed",
            "fingerprint": outcome.fingerprint,
            "detail": outcome.detail[: P.MAX_DETAIL],
            "verify": outcome.verify,
        }
        try:
            sent = await self._persist(
                f"job {job_id}: reporting",
                lambda: self.request("POST", P.result_path(job_id), result),
            )
        except LeaseLost as exc:
            log.warning("job %s: lease lost while reporting (%s)", job_id, exc)
            return
        except AgentRefused:
            raise
        except CertctlError as exc:
            log.error("job %s: the server refused the result: %s", job_id, exc)
            return
        if sent is None:
            return
        if outcome.ok or outcome.detail == P.KEY_LOST:
            self.state.forget(job_id)
        log.info("job %s: %s", job_id, "deployed" if outcome.ok else f"failed: {outcome.detail}")

    async def _carry_out(self, job_id: str, job: Mapping[str, Any]) -> DeployOutcome | None:
        phase = job.get("phase")
        journaled = self.state.journaled(job_id)
        entry: dict[str, Any] = dict(journaled[0]) if journaled else {}
        key_pem = journaled[1] if journaled else None
        try:
            spec = P.key_spec_of(job.get("key") or {})
        except P.ProtocolError as exc:
            return DeployOutcome(False, f"job key: {exc.message}")
        names = job_names(job.get("names") or {})
        if not names:
            return DeployOutcome(False, "the job names no certificate names")
        if phase == "deploy":
            if key_pem is None:
                return DeployOutcome(False, P.KEY_LOST)
            cert_pem = str(job.get("certificate_pem") or entry.get("certificate_pem") or "")
            chain_pem = str(job.get("chain_pem") or entry.get("chain_pem") or "")
            version = int(job.get("version_hint") or entry.get("version") or 0)
        elif phase == "csr":
            if key_pem is None:
                if spec.rotation == "never":
                    key_pem = self.deployer.reusable_key(job, spec)
                if key_pem is None:
                    key_pem = await asyncio.to_thread(_new_key, spec)
                entry = {
                    "job": job_id,
                    "certificate": job.get("certificate"),
                    "placement": job.get("placement"),
                    "phase": "csr",
                }
                self.state.journal(job_id, entry, key_pem)  # BEFORE the CSR leaves
            self.faults.hit("agent_after_journal")
            try:
                csr = pki.csr_pem(pki.build_csr(pki.load_key_pem(key_pem), names))
            except CertctlError as exc:
                return DeployOutcome(False, f"cannot make the CSR: {exc}")
            answer = await self._persist(
                f"job {job_id}: sending the CSR",
                lambda: self.request("POST", P.csr_path(job_id), {"csr": csr.decode("ascii")}),
            )
            if answer is None:
                return None
            _, doc = answer
            try:
                cert_pem = str(doc["certificate_pem"])
                chain_pem = str(doc.get("chain_pem") or "")
                version = int(doc.get("version") or 0)
            except (KeyError, TypeError, ValueError):
                return DeployOutcome(False, "the CSR answer holds no certificate")
            entry.update(
                phase="deploy", certificate_pem=cert_pem, chain_pem=chain_pem, version=version
            )
            self.state.journal(job_id, entry, key_pem)
            self.faults.hit("agent_after_csr")
        else:
            return DeployOutcome(False, f"unknown job phase {str(phase)[:20]!r}")
        outcome = await self.deployer.deploy(
            job, cert_pem.encode(), chain_pem.encode(), key_pem, version
        )
        self.faults.hit("agent_after_deploy")
        return outcome


def _new_key(spec: KeySpec) -> SecretBytes:
    return pki.key_to_pem(pki.generate_key(spec))


def job_names(body: Mapping[str, Any]) -> list[str]:
    """The certificate's names from a JOB ``names`` field: common name first, then the
    DNS names and IP addresses, without repeats (the server checks the CSR holds
    exactly these)."""
    seen: dict[str, None] = {}
    cn = body.get("common_name")
    if isinstance(cn, str) and cn:
        seen[cn] = None
    for key in ("dns", "ip"):
        for n in body.get(key) or ():
            if isinstance(n, str) and n:
                seen.setdefault(n, None)
    return list(seen)


def run_agent(state_dir: Path, settings: AgentSettings, *, max_jobs: int | None = None) -> None:
    """Load the credential and run (blocking) until stopped."""
    state = AgentState(state_dir)
    cred = state.load_credential()
    state.prepare()
    agent = Agent(state, cred, settings)
    asyncio.run(agent.run(max_jobs=max_jobs))


def describe_job(job: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: job.get(k) for k in ("id", "certificate", "placement", "phase", "attempt")}
    )


__all__ = ["Agent", "AgentRefused", "AgentSettings", "SecretBytes", "enroll", "run_agent"]

"""The agent API of ``certctl serve`` (routes under ``/agent/v1``; the protocol is in
:mod:`certctl.agent.protocol`).

Hot path (heartbeat, and the authentication of every signed request) costs no
database work: the agent's public key comes from an in-memory cache of the
``agents`` table, the signature is verified on the event loop (Ed25519, ~60 us), the
nonce goes into an in-memory replay cache, and "heard from at" is noted in a dict
that one background task flushes every second in ONE batched statement.

Freshness: the cache is reloaded (one query) when the store's ``agents_generation``
changes -- ``certctl agents revoke/delete`` bump it -- which the watcher reads every
``poll_interval`` seconds (<= 1 s), so a revocation takes effect within about a second
(plus one query). An unknown agent id is looked up once (a new enrollment on another
server) and then remembered as unknown for a few seconds.

Work: a job board holds the open agent jobs (one query), refreshed whenever the
``jobs_generation`` changes: on PostgreSQL a ``LISTEN certctl_agent_jobs`` connection
wakes it at once (``enqueue_agent_jobs`` NOTIFYs in its transaction); on SQLite the
watcher polls the generation every 0.2 s. A waiting long poll is an
:class:`asyncio.Event` and costs nothing until a job it may take appears; then the
lease is one conditional UPDATE (several servers can race; one wins).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric import ed25519
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from certctl.agent import protocol as P
from certctl.agent.guards import RateLog, ReplayCache
from certctl.agent.outcomes import JobOutcomes
from certctl.agent.settings import AgentServerSettings
from certctl.engine import Engine
from certctl.errors import CertctlError, StateError, TransientError
from certctl.server.auth import RateLimiter
from certctl.state.agents import JOBS_CHANNEL, ConflictError
from certctl.state.base import AuditEvent, Batch, StateStore

log = logging.getLogger("certctl.agent.server")


@dataclass
class _Agent:
    id: str
    name: str
    key: ed25519.Ed25519PublicKey
    labels: Mapping[str, str]
    os: str | None
    status: str
    facts: Mapping[str, str]


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _printable(text: str) -> str:
    """``text`` with control characters other than newline and tab escaped (``\x1b``),
    so an agent's free text cannot drive an operator's terminal."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode("ascii")
        for c in text
    )


def _still_held(rec: P.AgentJobRecord) -> P.AgentJobRecord:
    """``rec``, if its agent still holds it (leased, or issued and not yet reported)."""
    if rec.state not in ("leased", "issued"):
        raise P.ProtocolError(409, f"job {rec.id} is {rec.state}, not leased to you")
    return rec


def _iso(dt: datetime) -> str:
    return dt.isoformat().replace("+00:00", "Z")


@dataclass
class _Board:
    """The open jobs, as last read: what an agent may take, and what each holds."""

    claimable: list[P.AgentJobRecord] = field(default_factory=list)
    held: dict[str, list[P.AgentJobRecord]] = field(default_factory=dict)
    read_at: float = 0.0
    next_due: datetime | None = None  # the earliest retry time of a failed job


class AgentService:
    """The agent routes and their background tasks (start with :meth:`running`)."""

    def __init__(
        self,
        engine: Engine,
        store: StateStore,
        clock: Callable[[], datetime],
        settings: AgentServerSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else AgentServerSettings()
        self.engine = engine
        self.store = store
        self.clock = clock
        self.settings = settings
        self.is_pg = store.url.startswith(("postgresql", "postgres"))
        self.poll_interval = settings.poll_interval or (1.0 if self.is_pg else 0.2)
        self.replay = ReplayCache(P.NONCE_WINDOW, settings.replay_max)
        self.enroll_limit = RateLimiter(settings.enroll_rate, settings.enroll_burst)
        # database look-ups of agent ids the cache does not know, per client address
        # (unauthenticated requests must not each cost a query)
        self.lookup_limit = RateLimiter(settings.enroll_rate, settings.enroll_burst)
        self.ratelog = RateLog()
        self._agents: dict[str, _Agent] = {}
        self._unknown: dict[str, float] = {}  # agent id -> until (monotonic)
        self._reload_wanted = False
        self._reloaded_at = 0.0
        self._beats: dict[str, tuple[datetime, Mapping[str, str] | None]] = {}
        self._refused: list[AuditEvent] = []
        self._refused_dropped = 0
        self._board = _Board()
        self._waiters: dict[str, tuple[_Agent, asyncio.Event]] = {}
        self._kick = asyncio.Event()
        self._gens = (-1, -1)
        self._job_locks: dict[str, asyncio.Lock] = {}
        self.outcomes = JobOutcomes(engine, store, clock, settings, self._failed)
        self.stats: collections.Counter[str] = collections.Counter()

    # ================================================================ lifecycle
    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        self._kick = asyncio.Event()
        self.outcomes = JobOutcomes(
            self.engine, self.store, self.clock, self.settings, self._failed
        )
        await asyncio.to_thread(self._load_agents)
        await self._refresh_board()
        tasks = [
            asyncio.create_task(self._flusher(), name="agent-heartbeat-flush"),
            asyncio.create_task(self._watcher(), name="agent-watch"),
        ]
        if self.is_pg:
            tasks.append(asyncio.create_task(self._listener(), name="agent-listen"))
        if self.settings.offline_after > 0:
            tasks.append(asyncio.create_task(self._sweeper(), name="agent-sweep"))
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._flush)

    def routes(self) -> list[Route]:
        return [
            Route(P.ENROLL_PATH, self.enroll, methods=["POST"]),
            Route(P.HEARTBEAT_PATH, self.heartbeat, methods=["POST"]),
            Route(P.WORK_PATH, self.work, methods=["GET"]),
            Route(P.PREFIX + "/jobs/{job_id}/csr", self.csr, methods=["POST"]),
            Route(P.PREFIX + "/jobs/{job_id}/result", self.result, methods=["POST"]),
        ]

    # ================================================================ background
    def _load_agents(self) -> None:
        fresh: dict[str, _Agent] = {}
        for a in self.store.agents():
            fresh[a.id] = self._cached(a)
        self._agents = fresh
        self._unknown.clear()

    def _wake_refused(self) -> None:
        """Wake the long polls of agents revoked (they answer 403) or gone from the
        cache (looked up again: deleted ones answer 401) since."""
        for agent_id, (_, ev) in list(self._waiters.items()):
            a = self._agents.get(agent_id)
            if a is None or a.status == "revoked":
                ev.set()

    @staticmethod
    def _cached(a: P.AgentRecord) -> _Agent:
        return _Agent(
            id=a.id,
            name=a.name,
            key=P.decode_public_key(a.public_key),
            labels=dict(a.labels),
            os=a.facts.get("os") or None,
            status=a.status,
            facts=dict(a.facts),
        )

    def _flush(self) -> None:
        beats, self._beats = self._beats, {}
        refused, self._refused = self._refused, []
        dropped, self._refused_dropped = self._refused_dropped, 0
        try:
            if beats:
                self.store.record_heartbeats([(k, v[0], v[1]) for k, v in beats.items()])
                # an agent heard from keeps the leases of the jobs it holds
                held = self._board.held
                holders = [a.name for k in beats if (a := self._agents.get(k)) and held.get(a.name)]
                if holders:
                    until = self.clock() + timedelta(seconds=self.settings.lease_s)
                    self.store.renew_agent_leases(holders, until)
        except CertctlError as exc:
            self.ratelog.warn("flush", f"agent heartbeats not recorded (will retry): {exc}")
            for k, v in beats.items():  # keep them (newer ones win)
                self._beats.setdefault(k, v)
        if dropped:
            refused.append(AuditEvent("agent.refused", detail={"more_not_recorded": dropped}))
        if refused:
            try:
                self.store.write(Batch(audit=refused))
            except CertctlError as exc:
                self.ratelog.warn("flush-audit", f"refused requests not audited: {exc}")

    async def _flusher(self) -> None:
        while True:
            await asyncio.sleep(self.settings.flush_interval)
            try:
                await asyncio.to_thread(self._flush)
            except Exception:
                log.exception("agent heartbeat flush failed")

    async def _watcher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.poll_interval)
            self._kick.clear()
            try:
                gens = await asyncio.to_thread(self.store.agent_generations)
                forced = self._reload_wanted and time.monotonic() - self._reloaded_at > 5.0
                if gens[1] != self._gens[1] or forced:
                    self._reload_wanted = False
                    self._reloaded_at = time.monotonic()
                    await asyncio.to_thread(self._load_agents)
                    self._wake_refused()
                due = self._board.next_due
                stale = time.monotonic() - self._board.read_at > self.settings.board_refresh or (
                    due is not None and due <= self.clock()
                )
                if gens[0] != self._gens[0] or stale:
                    await self._refresh_board()
                self._gens = gens
            except CertctlError as exc:
                self.ratelog.warn("watch", f"agent work watch: {exc}")
            except Exception:
                log.exception("agent work watch failed")

    async def _listener(self) -> None:
        """PostgreSQL: wake the watcher the moment a job is enqueued anywhere."""
        import psycopg

        delay = 1.0
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.store.url, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {JOBS_CHANNEL}")
                    delay = 1.0
                    self._kick.set()  # catch up on anything missed while not listening
                    async for _ in conn.notifies():
                        self._kick.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnect with backoff; the poll still runs
                self.ratelog.warn("listen", f"agent work listener: {type(exc).__name__}: {exc}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _sweeper(self) -> None:
        from certctl.agent import sweep

        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            try:
                await sweep.sweep_async(
                    self.engine, self.clock(), timedelta(seconds=self.settings.offline_after)
                )
            except Exception as exc:
                self.ratelog.warn("sweep", f"agent offline sweep: {exc}")

    async def _refresh_board(self) -> None:
        now = self.clock()
        rows = await asyncio.to_thread(self.store.agent_jobs, states=P.OPEN_STATES)
        board = _Board(read_at=time.monotonic())
        for r in rows:
            lease_ok = r.lease_until is not None and r.lease_until >= now
            if r.state in ("leased", "issued") and lease_ok and r.agent:
                board.held.setdefault(r.agent, []).append(r)
            elif (
                r.state == "queued"
                or (r.state == "failed" and (r.next_attempt_at is None or r.next_attempt_at <= now))
                or r.state in ("leased", "issued")  # the lease ran out
            ):
                board.claimable.append(r)
            elif (
                r.state == "failed"
                and r.next_attempt_at is not None
                and (board.next_due is None or r.next_attempt_at < board.next_due)
            ):
                board.next_due = r.next_attempt_at
        self._board = board
        self._wake_matching()

    def _wake_matching(self) -> None:
        if not self._waiters or not (self._board.claimable or self._board.held):
            return
        names: set[str] = set(self._board.held)
        label_sels: dict[str, Mapping[str, Any]] = {}
        for r in self._board.claimable:
            if "name" in r.selector:
                names.add(str(r.selector["name"]))
            else:
                label_sels.setdefault(P.canonical_json(r.selector).decode(), r.selector)
            if r.agent:
                names.add(r.agent)  # a job it held and should resume
        sels = list(label_sels.values())
        for agent, ev in list(self._waiters.values()):
            if agent.name in names or any(
                P.selector_matches(s, agent.name, agent.labels, agent.os) for s in sels
            ):
                ev.set()

    # ================================================================ plumbing
    async def _body(self, request: Request) -> bytes:
        limit = self.settings.max_body
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise P.ProtocolError(413, f"request body larger than {limit} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise P.ProtocolError(413, f"request body larger than {limit} bytes")
        return bytes(body)

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: [[[[...
            raise P.ProtocolError(400, "the body is not JSON") from None
        if not isinstance(doc, dict):
            raise P.ProtocolError(400, "the body must be a JSON object")
        return doc

    def _refuse(self, request: Request, exc: P.ProtocolError, agent: str | None = None) -> Response:
        ip = request.client.host if request.client is not None else "unknown"
        self.stats[f"refused_{exc.status}"] += 1
        # the decoded path is the client's text: escaped (a %0A must not forge log lines)
        path = request.url.path.encode("unicode_escape").decode("ascii")[:200]
        self.ratelog.warn(
            f"refused-{exc.status}",
            f"agent API: refused {request.method} {path} from {ip}: {exc.message}",
        )
        if exc.status in (401, 403, 409, 413) or (exc.status == 400 and agent):
            if len(self._refused) < 100:
                self._refused.append(
                    AuditEvent(
                        "agent.refused",
                        detail={
                            "status": exc.status,
                            "reason": exc.message[:300],
                            "path": path,
                            "ip": ip,
                            "agent": agent,
                        },
                        at=self.clock(),
                    )
                )
            else:
                self._refused_dropped += 1
        headers = (
            {"WWW-Authenticate": 'Signature realm="certctl-agent"'} if exc.status == 401 else {}
        )
        if exc.status == 429:
            headers["Retry-After"] = "1"
        return _error(exc.status, exc.message, headers)

    async def _agent_for(self, agent_id: str, ip: str = "unknown") -> _Agent | None:
        a = self._agents.get(agent_id)
        if a is not None:
            return a
        now = time.monotonic()
        if self._unknown.get(agent_id, 0.0) > now:
            return None
        if self.lookup_limit.check(f"ip:{ip}") is not None:
            # this address asked about too many unknown ids: no query per request; the
            # watcher re-reads the whole agents table instead (at most every 5 s), so
            # agents enrolled through another server behind the same proxy still get in
            self._reload_wanted = True
            return None
        rec = await asyncio.to_thread(self.store.agent_by_id, agent_id)
        if rec is None:
            if len(self._unknown) > 100_000:
                self._unknown.clear()
            self._unknown[agent_id] = now + 5.0
            return None
        a = self._cached(rec)
        self._agents[agent_id] = a
        return a

    async def _authenticate(self, request: Request, body: bytes) -> _Agent:
        signed = P.parse_headers(request.headers)
        ip = request.client.host if request.client is not None else "unknown"
        agent = await self._agent_for(signed.agent_id, ip)
        if agent is None:
            raise P.AuthError("unknown agent")
        raw = request.scope.get("raw_path") or request.scope["path"].encode()
        path = raw.decode("ascii", "replace")
        qs = request.scope.get("query_string") or b""
        if qs:
            path += "?" + qs.decode("ascii", "replace")
        now = self.clock()
        P.verify_signed(agent.key, signed, request.method, path, body, now.timestamp())
        if agent.status == "revoked":
            raise P.ProtocolError(403, f"agent {agent.name} is revoked")
        # remembered while the request's own time is acceptable, not just NONCE_WINDOW
        # from now: a request dated ahead (a fast agent clock) must not replay later
        fresh = self.replay.add(
            signed.nonce, now.timestamp(), until=float(signed.time + P.MAX_SKEW + 1)
        )
        if fresh is None:
            raise P.ProtocolError(429, "too many requests in the replay window")
        if not fresh:
            raise P.AuthError("replayed request (nonce already seen)")
        prev = self._beats.get(agent.id)
        self._beats[agent.id] = (now, prev[1] if prev else None)
        return agent

    async def _signed(self, request: Request) -> tuple[_Agent | None, bytes, Response | None]:
        try:
            body = await self._body(request)
            return await self._authenticate(request, body), body, None
        except P.ProtocolError as exc:
            return None, b"", self._refuse(request, exc)

    # ================================================================ enroll
    async def enroll(self, request: Request) -> Response:
        ip = request.client.host if request.client is not None else "unknown"
        wait = self.enroll_limit.check(f"ip:{ip}")
        if wait is not None:
            return _error(429, "too many enrollments", {"Retry-After": str(max(1, int(wait + 1)))})
        try:
            doc = self._json(await self._body(request))
            token = doc.get("token")
            name = doc.get("name")
            if not isinstance(token, str) or not token or len(token) > 200:
                raise P.AuthError("a bootstrap token is required")
            if not isinstance(name, str) or not P.NAME_RE.fullmatch(name):
                raise P.ProtocolError(400, "name must match [a-z0-9][a-z0-9._-]{0,62}")
            pub_text = doc.get("public_key")
            if not isinstance(pub_text, str):
                raise P.ProtocolError(400, "public_key is required")
            P.decode_public_key(pub_text)
            labels = P.check_labels(doc.get("labels"))
            facts = P.facts_dict(P.check_facts(doc.get("facts") or {}))
            return await run_in_threadpool(self._enroll, token, name, pub_text, labels, facts, ip)
        except P.ProtocolError as exc:
            return self._refuse(request, exc)
        except StateError as exc:
            log.warning("agent enroll: %s", exc)
            return _error(503, "state store unavailable")

    def _token_name(self, token: str) -> str | None:
        """The token's name: its SHA-256 compared with every stored hash in constant
        time (no early exit)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        for t in self.store.agent_tokens():
            try:
                stored = bytes.fromhex(t.token_hash)
            except ValueError:
                continue
            if hmac.compare_digest(stored, digest) and found is None:
                found = t.name
        return found

    def _enroll(
        self,
        token: str,
        name: str,
        public_key: str,
        labels: Mapping[str, str],
        facts: Mapping[str, str],
        ip: str,
    ) -> Response:
        now = self.clock()
        token_name = self._token_name(token)
        if token_name is None:
            raise P.AuthError("unknown bootstrap token")
        if not self.store.consume_agent_token(token_name, now):
            raise P.AuthError("the bootstrap token is revoked, expired or used up")
        try:
            rec, created = self.store.enroll_agent(
                name, public_key, labels, facts, token=token_name, now=now
            )
        except ConflictError as exc:
            self.store.refund_agent_token(token_name)
            status = 403 if "revoked" in str(exc) else 409
            raise P.ProtocolError(status, str(exc)) from None
        if not created:
            self.store.refund_agent_token(token_name)  # an idempotent repeat uses nothing
        self._agents[rec.id] = self._cached(rec)
        self._unknown.pop(rec.id, None)
        self.store.write(
            Batch(
                audit=[
                    AuditEvent(
                        "agent.enroll" if created else "agent.reenroll",
                        detail={"agent": name, "id": rec.id, "token": token_name, "ip": ip},
                    )
                ]
            )
        )
        body: P.EnrollResponse = {"agent_id": rec.id, "server_time": _iso(now)}
        return JSONResponse(body, status_code=201 if created else 200)

    # ================================================================ heartbeat
    async def heartbeat(self, request: Request) -> Response:
        agent, body, refused = await self._signed(request)
        if refused is not None or agent is None:
            return refused or _error(401, "unauthenticated")
        try:
            doc = self._json(body)
            facts = P.facts_dict(P.check_facts(doc.get("facts") or {}))
        except P.ProtocolError as exc:
            return self._refuse(request, exc, agent.name)
        now = self.clock()
        if facts != agent.facts:
            agent.facts = facts
            agent.os = facts["os"] or None
            self._beats[agent.id] = (now, facts)
        self.stats["heartbeat"] += 1
        out: P.HeartbeatResponse = {"server_time": _iso(now)}
        return JSONResponse(out)

    # ================================================================ work
    async def work(self, request: Request) -> Response:
        agent, _, refused = await self._signed(request)
        if refused is not None or agent is None:
            return refused or _error(401, "unauthenticated")
        raw = request.query_params.get("wait", "0")
        if not raw.isdigit() or int(raw) > P.MAX_WAIT:
            return self._refuse(
                request, P.ProtocolError(400, f"wait must be 0..{P.MAX_WAIT}"), agent.name
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + int(raw)
        ev = asyncio.Event()
        previous = self._waiters.get(agent.id)
        if previous is not None:
            previous[1].set()  # one poll per agent: the older one returns
        self._waiters[agent.id] = (agent, ev)
        try:
            while True:
                ev.clear()
                # the agent as the cache knows it NOW: a revocation (or deletion, or new
                # labels) that landed while this poll waited applies to it
                current = self._agents.get(agent.id)
                if current is None:  # deleted, or enrolled just after the cache was read
                    ip = request.client.host if request.client is not None else "unknown"
                    current = await self._agent_for(agent.id, ip)
                if current is None:
                    return self._refuse(request, P.AuthError("unknown agent"), agent.name)
                if current.status == "revoked":
                    return self._refuse(
                        request, P.ProtocolError(403, f"agent {agent.name} is revoked"), agent.name
                    )
                if current is not agent and self._waiters.get(agent.id, (None, None))[1] is ev:
                    self._waiters[agent.id] = (current, ev)  # wake it by its current labels
                agent = current
                try:
                    job = await self._take(agent)
                except CertctlError as exc:
                    log.warning("agent work: %s", exc)
                    return _error(503, "state store unavailable")
                if job is not None:
                    return JSONResponse({"job": job})
                remaining = deadline - loop.time()
                if remaining <= 0 or self._waiters.get(agent.id, (None, None))[1] is not ev:
                    return Response(status_code=204)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), remaining)
        finally:
            if self._waiters.get(agent.id, (None, None))[1] is ev:
                del self._waiters[agent.id]

    async def _take(self, agent: _Agent) -> P.Job | None:
        """The job this agent holds (resume), else the oldest claimable one routed to
        it that it wins the lease of."""
        board = self._board
        mine = [r for r in board.held.get(agent.name, ())]
        cands = [
            r
            for r in board.claimable
            if P.selector_matches(r.selector, agent.name, agent.labels, agent.os)
        ]
        cands.sort(key=lambda r: (r.agent != agent.name, r.created_at))
        for r in mine + cands:
            now = self.clock()
            until = now + timedelta(seconds=self.settings.lease_s)
            rec = await asyncio.to_thread(self.store.lease_agent_job, r.id, agent.name, now, until)
            if rec is None:
                with contextlib.suppress(ValueError):
                    board.claimable.remove(r)
                held = board.held.get(agent.name, [])
                if r in held:
                    held.remove(r)
                continue
            with contextlib.suppress(ValueError):
                board.claimable.remove(r)
            lst = [x for x in board.held.get(agent.name, []) if x.id != rec.id]
            board.held[agent.name] = [*lst, rec]
            if r not in mine:
                await asyncio.to_thread(
                    self.store.write,
                    Batch(
                        audit=[
                            AuditEvent(
                                "agent.job.leased",
                                cert=rec.certificate,
                                placement=rec.placement,
                                detail={
                                    "job": rec.id,
                                    "agent": agent.name,
                                    "attempt": rec.attempts + 1,
                                },
                            )
                        ]
                    ),
                )
            return await asyncio.to_thread(self._job_body, rec)
        return None

    def _job_body(self, rec: P.AgentJobRecord) -> P.Job:
        j = rec.job
        cert_pem = chain_pem = None
        phase: Any = "csr"
        if rec.state == "issued" and rec.version is not None:
            c, ch = self.store.certificate_pems(rec.certificate, rec.version)
            cert_pem, chain_pem, phase = c.decode(), ch.decode(), "deploy"
        return {
            "id": rec.id,
            "certificate": rec.certificate,
            "placement": rec.placement,
            "version_hint": j.get("version_hint"),
            "attempt": rec.attempts + 1,
            "key": cast(P.KeyBody, j.get("key") or {}),
            "names": cast(P.NamesBody, j.get("names") or {}),
            "target": cast(P.TargetBody, j.get("target") or {}),
            "phase": phase,
            "certificate_pem": cert_pem,
            "chain_pem": chain_pem,
        }

    # ================================================================ jobs
    async def _job_call(self, request: Request) -> tuple[_Agent, str, bytes] | Response:
        """A signed call on one job: its agent, job id and body, or the refusal to send."""
        agent, body, refused = await self._signed(request)
        if refused is not None or agent is None:
            return refused or _error(401, "unauthenticated")
        job_id = request.path_params["job_id"]
        if not P.JOB_ID_RE.fullmatch(job_id):  # before anything is kept for it (the lock)
            return self._refuse(request, P.ProtocolError(404, "no such job"), agent.name)
        return agent, job_id, body

    async def _own_job(self, agent: _Agent, job_id: str) -> P.AgentJobRecord:
        if not P.JOB_ID_RE.fullmatch(job_id):
            raise P.ProtocolError(404, "no such job")
        rec = await asyncio.to_thread(self.store.agent_job, job_id)
        if rec is None or rec.agent != agent.name:
            raise P.ProtocolError(404, "no such job")  # another agent's job is not yours
        return rec

    async def _held_job(self, agent: _Agent, job_id: str) -> P.AgentJobRecord:
        return _still_held(await self._own_job(agent, job_id))

    def _lock(self, job_id: str) -> asyncio.Lock:
        if len(self._job_locks) > 10_000:
            for k in [k for k, v in self._job_locks.items() if not v.locked()]:
                del self._job_locks[k]
        return self._job_locks.setdefault(job_id, asyncio.Lock())

    async def csr(self, request: Request) -> Response:
        call = await self._job_call(request)
        if isinstance(call, Response):
            return call
        agent, job_id, body = call
        try:
            doc = self._json(body)
            csr_text = doc.get("csr")
            if not isinstance(csr_text, str) or not csr_text.strip():
                raise P.ProtocolError(400, "csr (PEM) is required")
            async with self._lock(job_id):
                rec = await self._held_job(agent, job_id)
                out = await self.outcomes.issue_for(agent.name, rec, csr_text.encode())
            return JSONResponse(out)
        except P.ProtocolError as exc:
            return self._refuse(request, exc, agent.name)
        except TransientError as exc:
            log.warning("agent job %s: issuance failed (will retry): %s", job_id, exc)
            retry = str(max(1, int(exc.retry_after or 5)))
            return _error(503, f"issuance failed, retry later: {exc}", {"Retry-After": retry})
        except StateError as exc:
            log.warning("agent job %s: %s", job_id, exc)
            return _error(503, "state store unavailable")

    async def result(self, request: Request) -> Response:
        call = await self._job_call(request)
        if isinstance(call, Response):
            return call
        agent, job_id, body = call
        try:
            doc = self._json(body)
            status = doc.get("status")
            detail = doc.get("detail") or ""
            fingerprint = doc.get("fingerprint")
            verify = doc.get("verify")
            if status not in ("deployed", "failed"):
                raise P.ProtocolError(400, "status must be deployed or failed")
            if not isinstance(detail, str):
                raise P.ProtocolError(400, "detail must be a string")
            detail = _printable(detail[: P.MAX_DETAIL])  # printed on operators' terminals
            if fingerprint is not None and (
                not isinstance(fingerprint, str) or len(fingerprint) != 64
            ):
                raise P.ProtocolError(400, "fingerprint must be a sha256 hex string")
            if status == "deployed" and fingerprint is None:  # a claim must name what it deployed
                raise P.ProtocolError(400, "a deployed result needs the deployed fingerprint")
            if verify is not None and not isinstance(verify, dict):
                raise P.ProtocolError(400, "verify must be an object or null")
            async with self._lock(job_id):
                rec = await self._result_job(agent, job_id, status, fingerprint)
                if rec is None:
                    return JSONResponse({})  # an identical repeat of a recorded result
                if status == "deployed":
                    await self.outcomes.deployed(agent.name, rec, fingerprint, detail, verify)
                    self._forget_held(agent.name, rec.id)
                else:
                    nxt = await self.outcomes.fail(
                        agent.name, rec, detail[: P.MAX_DETAIL], restart=detail == P.KEY_LOST
                    )
                    self._failed(agent.name, rec.id, nxt)
            return JSONResponse({})
        except P.ProtocolError as exc:
            return self._refuse(request, exc, agent.name)
        except StateError as exc:
            log.warning("agent job %s: %s", job_id, exc)
            return _error(503, "state store unavailable")

    async def _result_job(
        self, agent: _Agent, job_id: str, status: str, fingerprint: str | None
    ) -> P.AgentJobRecord | None:
        rec = await self._own_job(agent, job_id)
        if rec.state == "deployed" and status == "deployed" and rec.fingerprint == fingerprint:
            return None
        return _still_held(rec)

    def _failed(self, agent: str, job_id: str, nxt: datetime | None) -> None:
        """A failure was counted: the job leaves the agent's hand; the watcher re-reads
        the board when its retry falls due."""
        self._forget_held(agent, job_id)
        if nxt is not None:
            due = self._board.next_due
            self._board.next_due = nxt if due is None else min(due, nxt)
            if nxt <= self.clock():
                self._kick.set()

    def _forget_held(self, name: str, job_id: str) -> None:
        held = self._board.held.get(name)
        if held:
            self._board.held[name] = [r for r in held if r.id != job_id]


def mount(app: Any, service: AgentService) -> None:
    """Add the agent routes to a Starlette app and run the service's background tasks
    inside the app's lifespan."""
    app.router.routes.extend(service.routes())
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state, service.running():
            yield state

    app.router.lifespan_context = lifespan


__all__: Sequence[str] = ["AgentServerSettings", "AgentService", "ReplayCache", "mount"]

"""The certctl HTTP server: one Starlette application served by uvicorn.

Routes (no auth unless noted):

* ``GET /.well-known/pki/crl/{issuer}`` -- DER CRL, ``application/pkix-crl``
  (also at ``/crl/{issuer}.crl``, the URL the local CA writes into leaves).
* ``GET /.well-known/pki/ocsp/{issuer}/{base64 request}`` and ``POST`` with
  ``application/ocsp-request`` (also under ``/ocsp/{issuer}``).
* ``GET /healthz`` (process alive), ``GET /readyz`` (state store reachable),
  ``GET /metrics`` (Prometheus text format).
* ``GET /api/v1/{certificates,deployments,runs,audit}`` -- API key required
  (``Authorization: Bearer <token>`` or ``X-API-Key``); cursor pagination
  (``limit``, ``cursor`` -> ``next_cursor``), filters, ``ETag`` and
  ``If-None-Match`` -> 304; rate-limited per client IP and per key (429 +
  ``Retry-After``).

Handlers that touch the database run in the thread pool, except the OCSP hot path
(an in-memory cache behind one tiny generation query), which answers on the event
loop to keep its latency low.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from certctl.errors import CertctlError
from certctl.pki import ocsp as ocsp_pki
from certctl.server.auth import KeyRing, RateLimiter
from certctl.server.metrics import StateCollector
from certctl.server.pki import PKIService
from certctl.state.base import StateStore

log = logging.getLogger(__name__)

OCSP_REQUEST = "application/ocsp-request"
OCSP_RESPONSE = "application/ocsp-response"
PKIX_CRL = "application/pkix-crl"


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str | None = None
    tls_key: str | None = None
    ip_rate: float = 20.0  # read API requests per second per client IP
    ip_burst: int = 40
    key_rate: float = 50.0  # read API requests per second per API key
    key_burst: int = 100
    default_page: int = 100
    max_page: int = 1000
    shutdown_timeout: float = 10.0


class _BadRequest(Exception):
    pass


def _json_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(type(obj).__name__)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, default=_json_default, separators=(",", ":")).encode()


def _encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(_dumps(value)).decode().rstrip("=")


def _decode_cursor(text: str | None) -> Any:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return json.loads(raw)
    except (ValueError, binascii.Error):
        raise _BadRequest("invalid cursor") from None


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    for part in header.split(","):
        tag = part.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def decode_ocsp_get(text: str) -> bytes | None:
    """The DER request of an OCSP GET path segment (RFC 6960 A.1: base64, URL-encoded;
    the URL-safe alphabet is accepted too), or None when it is not base64.

    Nothing is stripped: "/" is a base64 character, so an encoding may begin or end
    with one."""
    text = text.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, binascii.Error):
        return None


def _ocsp_response(der: bytes) -> Response:
    return Response(der, media_type=OCSP_RESPONSE, headers={"Cache-Control": "no-transform"})


def create_app(
    store: StateStore,
    pki: PKIService,
    clock: Callable[[], datetime],
    settings: ServerSettings = ServerSettings(),
) -> Starlette:
    keys = KeyRing(store)
    ip_limit = RateLimiter(settings.ip_rate, settings.ip_burst)
    key_limit = RateLimiter(settings.key_rate, settings.key_burst)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(store, clock))

    # ----------------------------------------------------------------- health
    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        try:
            await run_in_threadpool(store.generation)
        except Exception as exc:  # any failure means "not ready", never a crash
            log.warning("readyz: state store unreachable: %s", exc)
            return PlainTextResponse("state store unreachable\n", status_code=503)
        return PlainTextResponse("ready\n")

    async def metrics(request: Request) -> Response:
        try:
            data = await run_in_threadpool(generate_latest, registry)
        except CertctlError as exc:
            log.warning("metrics: %s", exc)
            return PlainTextResponse("state store unreachable\n", status_code=503)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    # -------------------------------------------------------------- CRL, OCSP
    async def crl(request: Request) -> Response:
        issuer = request.path_params["issuer"].removesuffix(".crl")
        if not pki.has(issuer):
            return PlainTextResponse("no such CRL issuer\n", status_code=404)
        try:
            der = await run_in_threadpool(pki.crl, issuer)
        except CertctlError as exc:
            log.warning("crl %s: %s", issuer, exc)
            return PlainTextResponse("CRL unavailable\n", status_code=503)
        return Response(der, media_type=PKIX_CRL, headers={"Cache-Control": "max-age=60"})

    async def ocsp_get(request: Request) -> Response:
        issuer = request.path_params["issuer"]
        if not pki.has(issuer):
            return PlainTextResponse("no such OCSP issuer\n", status_code=404)
        text = request.path_params.get("req", "")
        if len(text) > 2 * ocsp_pki.MAX_REQUEST_BYTES:
            return _ocsp_response(ocsp_pki.MALFORMED)
        der = decode_ocsp_get(text)
        if der is None:
            return _ocsp_response(ocsp_pki.MALFORMED)
        return _ocsp_response(pki.ocsp(issuer, der))

    async def ocsp_post(request: Request) -> Response:
        issuer = request.path_params["issuer"]
        if not pki.has(issuer):
            return PlainTextResponse("no such OCSP issuer\n", status_code=404)
        limit = ocsp_pki.MAX_REQUEST_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return PlainTextResponse("request too large\n", status_code=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return PlainTextResponse("request too large\n", status_code=413)
        return _ocsp_response(pki.ocsp(issuer, bytes(body)))

    # --------------------------------------------------------------- read API
    def _limit(request: Request) -> int:
        raw = request.query_params.get("limit")
        if raw is None:
            return settings.default_page
        if not raw.isdigit() or not 1 <= int(raw) <= settings.max_page:
            raise _BadRequest(f"limit must be 1..{settings.max_page}")
        return int(raw)

    def _query_tag(request: Request) -> str:
        items = sorted(request.query_params.multi_items())
        return hashlib.sha256(_dumps([request.url.path, items])).hexdigest()[:16]

    Page = tuple[list[dict[str, Any]], Any]

    def certificates_page(request: Request, limit: int) -> Page:
        q = request.query_params
        after = _decode_cursor(q.get("cursor"))
        if after is not None and not isinstance(after, str):
            raise _BadRequest("invalid cursor")
        expiring_before = None
        if "expiring_within_days" in q:
            days = q["expiring_within_days"]
            if not days.isdigit() or int(days) > 36500:
                raise _BadRequest("expiring_within_days must be a number of days")
            expiring_before = clock() + timedelta(days=int(days))
        rows = store.list_certificates(
            after=after,
            limit=limit,
            issuer=q.get("issuer"),
            status=q.get("status"),
            expiring_before=expiring_before,
        )
        return rows, rows[-1]["name"] if len(rows) == limit else None

    def deployments_page(request: Request, limit: int) -> Page:
        q = request.query_params
        after = _decode_cursor(q.get("cursor"))
        if after is not None and not (
            isinstance(after, list) and len(after) == 2 and all(isinstance(a, str) for a in after)
        ):
            raise _BadRequest("invalid cursor")
        rows = store.list_deployments(
            after=(after[0], after[1]) if after else None,
            limit=limit,
            cert=q.get("cert"),
            status=q.get("status"),
        )
        last = [rows[-1]["cert"], rows[-1]["placement"]] if len(rows) == limit else None
        return rows, last

    def _before(request: Request) -> int | None:
        before = _decode_cursor(request.query_params.get("cursor"))
        if before is not None and (not isinstance(before, int) or isinstance(before, bool)):
            raise _BadRequest("invalid cursor")
        return before

    def runs_page(request: Request, limit: int) -> Page:
        runs = store.list_runs(
            before=_before(request), limit=limit, status=request.query_params.get("status")
        )
        rows = [
            {
                "id": r.id,
                "kind": r.kind,
                "holder": r.holder,
                "started_at": r.started_at,
                "finished_at": r.finished_at,
                "status": r.status,
                "summary": dict(r.summary),
            }
            for r in runs
        ]
        return rows, rows[-1]["id"] if len(rows) == limit else None

    def audit_page(request: Request, limit: int) -> Page:
        q = request.query_params
        rows = store.list_audit(
            before=_before(request), limit=limit, cert=q.get("cert"), event=q.get("event")
        )
        return rows, rows[-1]["id"] if len(rows) == limit else None

    def _authorize(request: Request) -> Response | None:
        ip = request.client.host if request.client is not None else "unknown"
        wait = ip_limit.check(f"ip:{ip}")
        if wait is not None:
            return _too_many(wait)
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        token = token or request.headers.get("x-api-key")
        name = keys.verify(token)
        if name is None:
            return JSONResponse(
                {"error": "a valid API key is required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="certctl"'},
            )
        wait = key_limit.check(f"key:{name}")
        return _too_many(wait) if wait is not None else None

    def _too_many(wait: float) -> Response:
        return JSONResponse(
            {"error": "rate limit exceeded"},
            status_code=429,
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )

    def listing(
        fetch: Callable[[Request, int], Page], *, by_generation: bool
    ) -> Callable[[Request], Awaitable[Response]]:
        """One list endpoint. With ``by_generation`` the ETag is the store generation
        plus the query, known before any page is read (the tables behind it only change
        through generation-bumping writes), so a matching If-None-Match costs one tiny
        query; otherwise the ETag is a hash of the body."""

        def produce(request: Request) -> Response:
            denied = _authorize(request)
            if denied is not None:
                return denied
            limit = _limit(request)
            inm = request.headers.get("if-none-match")
            etag = None
            if by_generation:
                etag = f'"g{store.generation()}-{_query_tag(request)}"'
                if _etag_matches(inm, etag):
                    return Response(status_code=304, headers={"ETag": etag})
            rows, last = fetch(request, limit)
            body = _dumps(
                {
                    "items": rows,
                    "next_cursor": _encode_cursor(last) if last is not None else None,
                }
            )
            if etag is None:
                etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
                if _etag_matches(inm, etag):
                    return Response(status_code=304, headers={"ETag": etag})
            return Response(
                body,
                media_type="application/json",
                headers={"ETag": etag, "Cache-Control": "private, no-cache"},
            )

        async def endpoint(request: Request) -> Response:
            try:
                return await run_in_threadpool(produce, request)
            except _BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except CertctlError as exc:
                log.warning("%s: %s", request.url.path, exc)
                return JSONResponse({"error": "state store unavailable"}, status_code=503)

        return endpoint

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/.well-known/pki/crl/{issuer}", crl),
        Route("/crl/{issuer}", crl),
        Route("/.well-known/pki/ocsp/{issuer}", ocsp_post, methods=["POST"]),
        Route("/.well-known/pki/ocsp/{issuer}/{req:path}", ocsp_get, methods=["GET"]),
        Route("/ocsp/{issuer}", ocsp_post, methods=["POST"]),
        Route("/ocsp/{issuer}/{req:path}", ocsp_get, methods=["GET"]),
        Route("/api/v1/certificates", listing(certificates_page, by_generation=True)),
        Route("/api/v1/deployments", listing(deployments_page, by_generation=True)),
        Route("/api/v1/runs", listing(runs_page, by_generation=False)),
        Route("/api/v1/audit", listing(audit_page, by_generation=True)),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("certctl serve: issuers with CRL/OCSP: %s", ", ".join(pki.issuers) or "none")
        yield
        log.info("certctl serve: shut down")

    return Starlette(routes=routes, lifespan=lifespan)


def run(app: Starlette, settings: ServerSettings) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``shutdown_timeout``, then
    the function returns (the process exits 0: a stop asked for is not a failure)."""
    import signal

    import uvicorn

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=settings.tls_cert,
        ssl_keyfile=settings.tls_key,
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_timeout)),
        lifespan="on",
    )
    server = uvicorn.Server(config)

    # uvicorn installs its own handlers while it serves and, once it has shut down,
    # restores the previous ones and raises the signal again. These handlers take
    # that re-raised signal (instead of dying by SIGTERM or a KeyboardInterrupt), and
    # a signal that arrives before uvicorn's handlers are in place stops it too.
    def stop(sig: int, frame: object) -> None:
        server.should_exit = True

    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, stop) for sig in stops}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

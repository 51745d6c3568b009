"""The built-in ``acme`` issuer: certificates from any RFC 8555 CA.

Protocol work (JWS, nonces, account and order messages) is done by certbot's ``acme``
package (``ClientV2`` over ``ClientNetwork``); this module drives it:

* **Account**: an ECDSA P-256 account key is generated once per issuer and kept in
  ``ctx.vault`` (``account/key``, secret, so the state store encrypts it). The account
  URL is kept beside it (``account/url``, with the directory it belongs to), so later
  runs register nothing; a first registration that finds the key already known
  (409/200 with ``Location``) adopts that account. EAB (``eab: {kid, hmac}``) and the
  terms of service (``terms_of_service_agreed``) come from the configuration.
* **Crash safety**: :meth:`AcmeIssuer.prepare` creates the order and returns its URL,
  which the executor journals before :meth:`AcmeIssuer.issue` answers any challenge or
  finalizes. ``issue`` always works from the order URL: ``valid`` -> download the
  certificate again, ``pending``/``ready``/``processing`` -> carry on, ``invalid`` ->
  :class:`PermanentError` with the CA's problem. An order that was created but never
  journaled (a crash in between) is never finalized and simply expires at the CA. A
  *resumed* order that turned invalid (not by a policy refusal), expired or is gone
  is replaced once: the new order's payload goes through ``IssueRequest.journal``
  (the executor journals it) before anything is answered or finalized.
* **ARI** (RFC 9773): :meth:`AcmeIssuer.renewal_windows` fetches the suggested
  windows during observe (bounded concurrency, cached in the vault until the CA's
  Retry-After); a renewal's order carries ``replaces``.
* **Concurrency**: the blocking library calls run in a per-issuer thread pool; orders
  in flight are bounded by a per-issuer semaphore (``max_concurrent_orders``); one
  pooled ``requests`` session carries every order. Polling starts at 50 ms and backs
  off (x1.5, jitter, capped) and a ``Retry-After`` from the CA takes precedence.
* **Faults**: ``badNonce`` is retried; 5xx, dropped connections and timeouts are
  retried a few times with backoff and jitter, then raised as
  :class:`TransientError`; a 429 raises ``TransientError(retry_after)`` and blocks
  this issuer (only) until then; any other ACME problem is a :class:`PermanentError`
  carrying the problem type and detail. Response bodies over :data:`MAX_BODY` are
  refused.
* **Checks**: the certificate the CA returns must hold our public key and exactly the
  requested names (SANs; a CN, if any, among them) before it is handed back.
* **Revocation**: ``revokeCert`` signed by the account key with the RFC 5280 reason
  code; an already revoked certificate counts as success. The issued certificate is
  kept in the vault (``cert/<serial>``, not secret) for that.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import email.utils
import ipaddress
import json
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import josepy as jose
import requests
from acme import client as acme_client
from acme import errors as acme_errors
from acme import messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from requests.adapters import HTTPAdapter

from certctl import pki
from certctl.connectors import ConnectorContext, IssuedCert, Issuer, IssueRequest
from certctl.errors import CertctlError, PermanentError, TransientError
from certctl.model import VersionRecord
from certctl_connectors.issuers import acme_challenges as ch

T = TypeVar("T")
_RNG = random.SystemRandom()  # jitter only

#: Largest response body accepted from the CA (a certificate chain is a few KiB).
MAX_BODY = 1 << 20
#: RFC 5280 CRLReason codes.
REASON_CODES = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "removeFromCRL": 8,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
POLL_FIRST_S = 0.05
POLL_FACTOR = 1.5
#: Transient failures of one request are retried this often inside one issue() call.
REQUEST_ATTEMPTS = 4
#: A Retry-After up to this long is waited out in place; a longer one is raised.
INLINE_RETRY_MAX_S = 10.0
#: ARI (RFC 9773): ask again after the CA's Retry-After, clamped to these bounds, or
#: after the default when it sends none; a failed fetch is retried after ARI_ERROR_S.
ARI_DEFAULT_S = 6 * 3600
ARI_MIN_S = 60
ARI_MAX_S = 7 * 86400
ARI_ERROR_S = 3600
#: At most this many renewalInfo requests in flight per issuer during observe.
ARI_CONCURRENCY = 8
ARI_MAX_BODY = 64 * 1024

_SECRET = {
    "oneOf": [
        {"type": "string", "minLength": 1},
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
        },
    ]
}
_ARGV = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}


class AcmeProblem(PermanentError):
    """The CA answered with an ACME problem document that retrying will not fix."""

    def __init__(self, message: str, code: str | None) -> None:
        super().__init__(message)
        self.code = code


class _HTTPFault(Exception):
    """A 429 or 5xx answer (raised inside the library call, translated by _call)."""

    def __init__(self, status: int, retry_after: float | None, code: str | None, detail: str):
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after
        self.code = code
        self.detail = detail


class _BodyTooLarge(Exception):
    pass


class _OrderLost(Exception):
    """A journaled order can no longer be finished (invalid for a reason other than
    the CA's policy, expired, or gone): a new order takes its place."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


#: Problem types by which the CA refuses the names or the request itself: a new order
#: would be refused the same way, so an invalid order with one of these is final.
POLICY_PROBLEMS = frozenset(
    {
        "rejectedIdentifier",
        "unsupportedIdentifier",
        "caa",
        "badCSR",
        "badPublicKey",
        "badSignatureAlgorithm",
        "userActionRequired",
        "externalAccountRequired",
    }
)


class _NewOrder(messages.NewOrder):
    """newOrder with RFC 9773's ``replaces`` (the ARI certificate ID renewed)."""

    replaces: str | None = jose.field("replaces", omitempty=True)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(min(int(value), 86400 * 7))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, min((when - datetime.now(UTC)).total_seconds(), 86400 * 7))


class _Net(acme_client.ClientNetwork):
    """``ClientNetwork`` with bounded bodies, a pooled session, thread-safe nonces,
    and 429/5xx surfaced with their Retry-After. Bodies are never logged."""

    def __init__(self, pool: int, **kw: Any) -> None:
        super().__init__(**kw)
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(pool, 4))
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)

    def _send_request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs["verify"] = self.verify_ssl
        headers = kwargs.setdefault("headers", {})
        headers.setdefault("User-Agent", self.user_agent)
        kwargs.setdefault("timeout", self._default_timeout)
        kwargs["stream"] = True
        response = self.session.request(method, url, *args, **kwargs)
        try:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > MAX_BODY:
                raise _BodyTooLarge()
            buf = bytearray()
            if method != "HEAD":
                for chunk in response.iter_content(65536):
                    buf += chunk
                    if len(buf) > MAX_BODY:
                        raise _BodyTooLarge()
        finally:
            response.close()
        response._content = bytes(buf)
        response.encoding = "utf-8"
        status = response.status_code
        if status == 429 or status >= 500:
            code, detail = None, ""
            try:
                doc = json.loads(response._content)
                if isinstance(doc, dict):
                    code = str(doc.get("type", "")).rsplit(":", 1)[-1] or None
                    detail = str(doc.get("detail", ""))[:300]
            except ValueError:
                pass
            raise _HTTPFault(
                status, _retry_after(response.headers.get("Retry-After")), code, detail
            )
        return response

    def _get_nonce(self, url: str, new_nonce_url: str) -> str:
        try:
            return self._nonces.pop()
        except KeyError:
            pass
        response = self._check_response(self.head(new_nonce_url or url), content_type=None)
        self._add_nonce(response)
        try:
            return self._nonces.pop()
        except KeyError:  # another thread took it first: ask again
            return self._get_nonce(url, new_nonce_url)


class _Backoff:
    """Short, growing poll intervals with jitter; the CA's Retry-After wins."""

    def __init__(self, cap: float) -> None:
        self.next = POLL_FIRST_S
        self.cap = cap

    def delay(self, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        d = self.next * _RNG.uniform(0.8, 1.2)
        self.next = min(self.next * POLL_FACTOR, self.cap)
        return d


@dataclass
class _LoopState:
    """asyncio objects are bound to one event loop; an issuer may see several."""

    loop: asyncio.AbstractEventLoop
    sem: asyncio.Semaphore
    account_lock: asyncio.Lock
    solver: Any


_CHALLENGE_SCHEMA = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "type": {"enum": ["http-01", "dns-01"]},
        "responder": {
            "type": "object",
            "additionalProperties": False,
            "required": ["listen"],
            "properties": {"listen": {"type": "string", "pattern": "^.+:[0-9]{1,5}$"}},
        },
        "webroot": {
            "type": "object",
            "additionalProperties": False,
            "required": ["path"],
            "properties": {"path": {"type": "string", "minLength": 1}},
        },
        "rfc2136": {
            "type": "object",
            "additionalProperties": False,
            "required": ["server"],
            "properties": {
                "server": {"type": "string", "minLength": 1},
                "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                "zone": {"type": "string", "minLength": 1},
                "ttl": {"type": "integer", "minimum": 1},
                "timeout_s": {"type": "number", "exclusiveMinimum": 0},
                "tsig_key": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name", "secret"],
                    "properties": {
                        "name": {"type": "string", "minLength": 1},
                        "algorithm": {
                            "enum": ["hmac-sha256", "hmac-sha384", "hmac-sha512", "hmac-sha1"]
                        },
                        "secret": _SECRET,
                    },
                },
            },
        },
        "hook": {
            "type": "object",
            "additionalProperties": False,
            "required": ["add", "remove"],
            "properties": {"add": _ARGV, "remove": _ARGV},
        },
    },
    "oneOf": [
        {
            "properties": {"type": {"const": "http-01"}},
            "oneOf": [{"required": ["responder"]}, {"required": ["webroot"]}],
            "not": {"anyOf": [{"required": ["rfc2136"]}, {"required": ["hook"]}]},
        },
        {
            "properties": {"type": {"const": "dns-01"}},
            "oneOf": [{"required": ["rfc2136"]}, {"required": ["hook"]}],
            "not": {"anyOf": [{"required": ["responder"]}, {"required": ["webroot"]}]},
        },
    ],
}


class AcmeIssuer(Issuer):
    """An RFC 8555 CA (Let's Encrypt, ZeroSSL, step-ca, Pebble...). See the module doc."""

    type_name = "acme"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "acme issuer",
        "type": "object",
        "additionalProperties": False,
        "required": ["directory", "challenge"],
        "properties": {
            "type": {"const": "acme"},
            "description": {"type": "string"},
            "directory": {"type": "string", "pattern": "^https?://"},
            "email": {"type": "string", "pattern": "^[^@\\s,]+@[^@\\s,]+$"},
            "eab": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kid", "hmac"],
                "properties": {"kid": {"type": "string", "minLength": 1}, "hmac": _SECRET},
            },
            "ca_bundle": {"type": "string", "minLength": 1},
            "terms_of_service_agreed": {"type": "boolean"},
            "challenge": _CHALLENGE_SCHEMA,
            "max_concurrent_orders": {"type": "integer", "minimum": 1, "maximum": 1000},
            "profile": {"type": "string", "minLength": 1},
            "timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "order_timeout_s": {"type": "number", "exclusiveMinimum": 0},
            "poll_max_s": {"type": "number", "exclusiveMinimum": 0},
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], ctx: ConnectorContext) -> None:
        super().__init__(name, config, ctx)
        self.directory_url = str(config["directory"])
        self.email = config.get("email")
        self.tos = bool(config.get("terms_of_service_agreed", False))
        self.eab = config.get("eab")
        self.profile = config.get("profile")
        bundle = config.get("ca_bundle")
        self.verify: bool | str = True
        if bundle:
            p = Path(str(bundle)).expanduser()
            self.verify = str(p if p.is_absolute() else ctx.inventory_root / p)
        self.limit = int(config.get("max_concurrent_orders", 20))
        self.timeout_s = float(config.get("timeout_s", 30))
        self.order_timeout_s = float(config.get("order_timeout_s", 600))
        self.poll_max_s = float(config.get("poll_max_s", 2.0))
        self.challenge = dict(config["challenge"])
        self.challenge_type = str(self.challenge["type"])
        self._tlock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._client: acme_client.ClientV2 | None = None
        self._jwk: jose.JWKEC | None = None
        self._registered = False
        self._blocked_until = 0.0
        self._ls: _LoopState | None = None
        self._orders: dict[str, messages.Order] = {}
        #: Counters the tests and benchmark read (no secrets).
        self.stats = {"orders_created": 0, "finalized": 0, "resumed": 0, "replaced": 0}

    # ---------------------------------------------------------------- plumbing
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        if self._ls is None or self._ls.loop is not loop:
            self._ls = _LoopState(
                loop, asyncio.Semaphore(self.limit), asyncio.Lock(), self._make_solver()
            )
        return self._ls

    def _make_solver(self) -> Any:
        c = self.challenge
        if "responder" in c:
            return ch.HttpResponder(str(c["responder"]["listen"]))
        if "webroot" in c:
            p = Path(str(c["webroot"]["path"])).expanduser()
            return ch.Webroot(p if p.is_absolute() else self.ctx.inventory_root / p)
        if "hook" in c:
            return ch.DnsHook(self.name, c["hook"]["add"], c["hook"]["remove"])
        if "rfc2136" in c:
            return ch.Rfc2136(c["rfc2136"])
        raise PermanentError(f"issuer {self.name}: no challenge solver configured")

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._tlock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self.limit + 2, thread_name_prefix=f"acme-{self.name}"
                )
            return self._pool

    def _fail(self, what: str, msg: str) -> str:
        return f"issuer {self.name}: {what}: {msg}"

    async def _call(self, what: str, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run one blocking library call in the pool, translating its failures."""
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            wait = self._blocked_until - time.monotonic()
            if wait > 0:
                raise TransientError(
                    self._fail(what, "rate limited by the CA; waiting"), retry_after=wait
                )
            attempt += 1
            try:
                return await loop.run_in_executor(self._executor(), fn)
            except _HTTPFault as exc:
                detail = f"{exc.code + ': ' if exc.code else ''}{exc.detail}".strip(": ")
                if exc.status == 429:
                    ra = exc.retry_after if exc.retry_after is not None else 60.0
                    self._blocked_until = max(self._blocked_until, time.monotonic() + ra)
                    raise TransientError(
                        self._fail(what, f"rate limited (HTTP 429) {detail}".strip()),
                        retry_after=ra,
                    ) from None
                err: TransientError = TransientError(
                    self._fail(what, f"CA answered HTTP {exc.status} {detail}".strip()),
                    retry_after=exc.retry_after,
                )
                ra = exc.retry_after
            except (requests.Timeout, requests.ConnectionError) as exc:
                kind = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
                err = TransientError(self._fail(what, f"{kind} ({type(exc).__name__})"))
                ra = None
            except requests.RequestException as exc:
                err = TransientError(self._fail(what, f"transport error ({type(exc).__name__})"))
                ra = None
            except messages.Error as exc:
                code = exc.code
                if code in ("badNonce", "serverInternal"):
                    err = TransientError(self._fail(what, f"{code}: {exc.detail or ''}"))
                    ra = None
                    if code == "badNonce" and attempt < 8:
                        continue
                elif code == "rateLimited":
                    self._blocked_until = max(self._blocked_until, time.monotonic() + 60)
                    raise TransientError(
                        self._fail(what, f"rateLimited: {exc.detail or ''}"), retry_after=60
                    ) from None
                else:
                    if code == "accountDoesNotExist":
                        self._registered = False
                    raise AcmeProblem(
                        self._fail(what, f"{code or exc.typ}: {exc.detail or exc.title or ''}"),
                        code,
                    ) from None
            except _BodyTooLarge:
                raise PermanentError(
                    self._fail(what, f"response body larger than {MAX_BODY} bytes refused")
                ) from None
            except acme_errors.ConflictError:
                raise
            except (acme_errors.Error, jose.DeserializationError, ValueError, KeyError) as exc:
                raise PermanentError(
                    self._fail(what, f"unexpected response from the CA ({type(exc).__name__})")
                ) from None
            if not retry or attempt >= REQUEST_ATTEMPTS or (ra or 0) > INLINE_RETRY_MAX_S:
                raise err
            await asyncio.sleep(
                ra if ra is not None else 0.25 * 2 ** (attempt - 1) * _RNG.uniform(0.5, 1.5)
            )

    # ----------------------------------------------------------------- account
    def _vault_get(self, key: str) -> bytes | None:
        return self.ctx.vault.get(self.name, key)

    async def _ensure_account(self) -> acme_client.ClientV2:
        st = self._state()
        if self._client is not None and self._registered:
            return self._client
        async with st.account_lock:
            if self._client is not None and self._registered:
                return self._client
            jwk = await asyncio.to_thread(self._account_key)
            net = _Net(
                self.limit + 4,
                key=jwk,
                alg=jose.ES256,
                verify_ssl=self.verify,
                user_agent="certctl",
                timeout=self.timeout_s,  # type: ignore[arg-type]
            )
            directory = await self._call(
                "directory", lambda: acme_client.ClientV2.get_directory(self.directory_url, net)
            )
            client = acme_client.ClientV2(directory, net)
            self._check_profile(directory)
            stored = await asyncio.to_thread(self._vault_get, "account/url")
            url = None
            if stored is not None and self._client is None:
                rec = json.loads(stored)
                if rec.get("directory") == self.directory_url:
                    url = str(rec["url"])
            if url is None:
                url = await self._register(client, jwk, directory)
                blob = json.dumps({"directory": self.directory_url, "url": url}).encode()
                await asyncio.to_thread(
                    self.ctx.vault.put, self.name, "account/url", blob, secret=False
                )
            net.account = messages.RegistrationResource(body=messages.Registration(), uri=url)
            self._client = client
            self._registered = True
            return client

    def _account_key(self) -> jose.JWKEC:
        if self._jwk is not None:
            return self._jwk
        pem = self._vault_get("account/key")
        if pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            self.ctx.vault.put(self.name, "account/key", pem, secret=True)
        loaded = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise PermanentError(f"issuer {self.name}: stored account key is not ECDSA")
        self._jwk = jose.JWKEC(key=loaded)
        return self._jwk

    async def _register(
        self, client: acme_client.ClientV2, jwk: jose.JWKEC, directory: messages.Directory
    ) -> str:
        eab = None
        if self.eab is not None:
            hmac_value = ch.reveal(self.eab["hmac"])
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(),
                kid=str(self.eab["kid"]),
                hmac_key=hmac_value,
                directory=directory,
            )
        elif client.external_account_required():
            raise PermanentError(
                f"issuer {self.name}: the CA requires external account binding; set eab"
            )
        kw: dict[str, Any] = {"terms_of_service_agreed": self.tos}
        if self.email:
            kw["email"] = str(self.email)
        if eab is not None:
            kw["external_account_binding"] = eab
        reg = messages.NewRegistration.from_data(**kw)
        try:
            regr = await self._call("register account", lambda: client.new_account(reg))
        except acme_errors.ConflictError as exc:  # the key already has an account
            return str(exc.location)
        if not regr.uri:
            raise PermanentError(f"issuer {self.name}: the CA gave no account URL")
        return str(regr.uri)

    def _check_profile(self, directory: messages.Directory) -> None:
        if not self.profile:
            return
        meta = getattr(directory, "meta", None)
        offered = getattr(meta, "profiles", None) if meta is not None else None
        if not offered:
            # A CA without profiles would ignore the field and issue its default
            # certificate: refuse rather than silently issue something else.
            raise PermanentError(
                f"issuer {self.name}: profile {self.profile!r} is configured but the CA "
                "lists no profiles (its directory has no meta.profiles); remove 'profile' "
                "from the issuer or use a CA that offers it"
            )
        if self.profile not in offered:
            raise PermanentError(
                f"issuer {self.name}: the CA does not offer profile {self.profile!r} "
                f"(offers: {', '.join(sorted(offered))})"
            )

    # ------------------------------------------------------------------ Issuer
    async def prepare(self, req: IssueRequest) -> dict[str, Any]:
        """Create the order; its URL is journaled before :meth:`issue` finalizes it."""
        client = await self._ensure_account()
        async with self._state().sem:
            return await self._new_order(client, req)

    async def _new_order(self, client: acme_client.ClientV2, req: IssueRequest) -> dict[str, Any]:
        """POST newOrder (with ``profile`` and ARI ``replaces`` where they apply) and
        return the payload to journal. The caller holds the order semaphore."""
        idents = []
        for n in req.cert.names:
            try:
                ip = ipaddress.ip_address(n)
            except ValueError:
                idents.append(messages.Identifier(typ=messages.IDENTIFIER_FQDN, value=n))
            else:
                idents.append(messages.Identifier(typ=messages.IDENTIFIER_IP, value=str(ip)))
        kw: dict[str, Any] = {"identifiers": idents}
        if self.profile:
            kw["profile"] = str(self.profile)
        replaces = await self._replaces(client, req)
        url = client.directory["newOrder"]
        while True:
            order = _NewOrder(**kw, replaces=replaces)
            try:
                resp = await self._post(client, url, order, "new order")
            except AcmeProblem as exc:
                if replaces is not None and exc.code in ("alreadyReplaced", "malformed"):
                    replaces = None  # order without it rather than not at all
                    continue
                raise
            break
        location = resp.headers.get("Location")
        if not location:
            raise PermanentError(f"issuer {self.name}: the CA gave no order URL")
        try:
            body = messages.Order.from_json(resp.json())
        except (ValueError, jose.DeserializationError) as exc:
            raise PermanentError(self._fail("new order", "malformed order")) from exc
        self.stats["orders_created"] += 1
        self._orders[location] = body
        out: dict[str, Any] = {"order_url": location, "names": sorted(req.cert.names)}
        if replaces is not None:
            out["replaces"] = replaces
        return out

    async def _replaces(self, client: acme_client.ClientV2, req: IssueRequest) -> str | None:
        """RFC 9773 ``replaces``: the ARI ID of the certificate this order renews, when
        the CA offers ARI and that certificate came from this issuer."""
        prev = req.previous
        if prev is None or prev.issuer != self.name:
            return None
        try:
            client.directory["renewalInfo"]
        except KeyError:
            return None
        pem = await asyncio.to_thread(self._vault_get, f"cert/{prev.serial}")
        if pem is None:
            return None
        return ari_cert_id(x509.load_pem_x509_certificate(pem))

    # -------------------------------------------------------------------- ARI
    def renewal_window(self, version: VersionRecord) -> tuple[datetime, datetime] | None:
        """The CA's suggested renewal window for ``version`` (RFC 9773), or None."""
        return self.renewal_windows([version]).get(version.cert)

    def renewal_windows(
        self, versions: Sequence[VersionRecord]
    ) -> Mapping[str, tuple[datetime, datetime]]:
        """Suggested windows by certificate name, for the versions this issuer issued.

        Answers are kept in the vault (``ari/<serial>``) until the CA's Retry-After,
        so most plans ask the CA nothing; the rest is fetched with at most
        :data:`ARI_CONCURRENCY` requests in flight. Fetching needs no account
        (renewalInfo is a plain GET). Never raises: a CA that cannot answer yields
        no window (the configured renewal window still applies)."""
        now = self.ctx.clock()
        out: dict[str, tuple[datetime, datetime]] = {}
        todo: list[tuple[VersionRecord, x509.Certificate]] = []
        for v in versions:
            if v.issuer != self.name or v.not_after <= now:
                continue  # RFC 9773: never ask about an expired certificate
            raw = self._vault_get(f"ari/{v.serial}")
            if raw is not None:
                try:
                    rec = json.loads(raw)
                    if datetime.fromisoformat(rec["until"]) > now:
                        if rec.get("window"):
                            start, end = (datetime.fromisoformat(t) for t in rec["window"])
                            out[v.cert] = (start, end)
                        continue
                except (ValueError, KeyError, TypeError):
                    pass  # unreadable cache entry: ask again
            pem = self._vault_get(f"cert/{v.serial}")
            if pem is None:
                continue  # not issued through this state: nothing to ask about
            todo.append((v, x509.load_pem_x509_certificate(pem)))
        if not todo:
            return out
        with requests.Session() as session:
            try:
                base = self._renewal_info_url(session)
            except (requests.RequestException, ValueError, _BodyTooLarge):
                return out  # the directory cannot be read now: ask on the next plan
            if base is None:
                results = [(None, float(ARI_DEFAULT_S))] * len(todo)
            else:
                workers = max(1, min(ARI_CONCURRENCY, self.limit, len(todo)))
                with concurrent.futures.ThreadPoolExecutor(workers) as pool:
                    results = list(
                        pool.map(lambda t: self._fetch_window(session, base, t[1]), todo)
                    )
        for (v, _), (window, retry_s) in zip(todo, results, strict=True):
            until = now + timedelta(seconds=retry_s)
            blob = {
                "window": [window[0].isoformat(), window[1].isoformat()] if window else None,
                "until": until.isoformat(),
            }
            self.ctx.vault.put(
                self.name, f"ari/{v.serial}", json.dumps(blob).encode(), secret=False
            )
            if window is not None:
                out[v.cert] = window
        return out

    def _get_json(self, session: requests.Session, url: str) -> tuple[Any, requests.Response]:
        resp = session.get(
            url, verify=self.verify, timeout=self.timeout_s, stream=True, allow_redirects=False
        )
        try:
            buf = bytearray()
            for chunk in resp.iter_content(16384):
                buf += chunk
                if len(buf) > ARI_MAX_BODY:
                    raise _BodyTooLarge()
        finally:
            resp.close()
        resp.raise_for_status()
        return json.loads(bytes(buf)), resp

    def _renewal_info_url(self, session: requests.Session) -> str | None:
        doc, _ = self._get_json(session, self.directory_url)
        url = doc.get("renewalInfo") if isinstance(doc, dict) else None
        return str(url).rstrip("/") if isinstance(url, str) and url else None

    def _fetch_window(
        self, session: requests.Session, base: str, cert: x509.Certificate
    ) -> tuple[tuple[datetime, datetime] | None, float]:
        """(window or None, seconds until asking again) for one certificate."""
        cert_id = ari_cert_id(cert)
        if cert_id is None:
            return None, float(ARI_MAX_S)
        try:
            doc, resp = self._get_json(session, f"{base}/{cert_id}")
            sw = doc["suggestedWindow"]
            start = datetime.fromisoformat(str(sw["start"]))
            end = datetime.fromisoformat(str(sw["end"]))
            if start.tzinfo is None or end.tzinfo is None or not start < end:
                raise ValueError("not a window")
        except (requests.RequestException, ValueError, KeyError, TypeError, _BodyTooLarge):
            return None, float(ARI_ERROR_S)
        ra = _retry_after(resp.headers.get("Retry-After"))
        retry_s = ARI_DEFAULT_S if ra is None else min(max(ra, ARI_MIN_S), ARI_MAX_S)
        return (start.astimezone(UTC), end.astimezone(UTC)), float(retry_s)

    def _csr(self, req: IssueRequest) -> bytes:
        if req.csr_pem is not None:  # key custody target: the host's own CSR
            return req.csr_pem
        return pki.csr_pem(pki.build_csr(req.private_key, list(req.cert.names)))

    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert:
        url = payload.get("order_url")
        if not isinstance(url, str) or not url:
            payload = await self.prepare(req)  # journaled by another issuer type
            if req.journal is not None:
                await req.journal(payload)
            url = str(payload["order_url"])
        client = await self._ensure_account()
        async with self._state().sem:
            cached = self._orders.pop(url, None)
            if cached is None:
                self.stats["resumed"] += 1
            try:
                pem = await self._drive(client, req, url, cached, resumed=cached is None)
            except _OrderLost as lost:
                # A run killed mid-validation (say) left an order that cannot be
                # finished. Replace it, journaled before it is finalized.
                if req.journal is None:
                    raise PermanentError(self._fail("order", lost.why)) from None
                fresh = await self._new_order(client, req)
                await req.journal(fresh)
                self.stats["replaced"] += 1
                new_url = str(fresh["order_url"])
                body = self._orders.pop(new_url, None)
                pem = await self._drive(client, req, new_url, body, resumed=False)
        issued = self._check(req, pem)
        await asyncio.to_thread(
            self.ctx.vault.put, self.name, f"cert/{issued.serial}", issued.cert_pem, secret=False
        )
        return issued

    async def _fetch(
        self, client: acme_client.ClientV2, url: str, what: str
    ) -> tuple[Any, float | None]:
        resp = await self._post(client, url, None, what)
        try:
            doc = resp.json()
        except ValueError as exc:
            raise PermanentError(self._fail(what, "the CA answered with no JSON")) from exc
        return doc, _retry_after(resp.headers.get("Retry-After"))

    async def _post(
        self,
        client: acme_client.ClientV2,
        url: str,
        obj: Any,
        what: str,
        *,
        retry: bool = True,
    ) -> requests.Response:
        """A signed POST (POST-as-GET when ``obj`` is None) through the library."""
        nonce_url = client.directory["newNonce"]
        return await self._call(
            what, lambda: client.net.post(url, obj, new_nonce_url=nonce_url), retry=retry
        )

    async def _order(
        self, client: acme_client.ClientV2, url: str
    ) -> tuple[messages.Order, float | None]:
        doc, ra = await self._fetch(client, url, "fetch order")
        try:
            return messages.Order.from_json(doc), ra
        except jose.DeserializationError as exc:
            raise PermanentError(self._fail("fetch order", "malformed order")) from exc

    async def _drive(
        self,
        client: acme_client.ClientV2,
        req: IssueRequest,
        url: str,
        cached: messages.Order | None,
        *,
        resumed: bool,
    ) -> bytes:
        """Take the order at ``url`` to a certificate. A ``resumed`` order (journaled
        by an earlier run) that is invalid for a reason other than the CA's policy, has
        expired, or is gone raises :class:`_OrderLost` (the caller replaces it)."""
        deadline = time.monotonic() + self.order_timeout_s
        backoff = _Backoff(self.poll_max_s)
        if cached is not None:
            body, ra = cached, None
        else:
            try:
                body, ra = await self._order(client, url)
            except AcmeProblem as exc:
                if resumed and exc.code not in POLICY_PROBLEMS:
                    raise _OrderLost(f"the journaled order is gone ({exc})") from None
                raise
        solved = finalized = False
        while True:
            status = body.status
            if status == messages.STATUS_VALID and body.certificate:
                cert_url = body.certificate
                resp = await self._post(client, cert_url, None, "download certificate")
                return bytes(resp.content)
            if status == messages.STATUS_INVALID:
                why, codes = await self._why_invalid(client, body)
                if resumed and not codes & POLICY_PROBLEMS:
                    raise _OrderLost(f"the journaled order is {why}")
                raise AcmeProblem(self._fail("order", why), "orderInvalid")
            if (
                resumed
                and status in (messages.STATUS_PENDING, messages.STATUS_READY)
                and body.expires is not None
                and body.expires <= datetime.now(UTC)
            ):
                raise _OrderLost("the journaled order expired")
            if status == messages.STATUS_PENDING and not solved:
                await self._solve(client, body, None, deadline)
                solved = True
                ra = None
            elif status == messages.STATUS_READY and not finalized:
                csr = messages.CertificateRequest(csr=x509.load_pem_x509_csr(self._csr(req)))
                try:
                    resp = await self._post(client, body.finalize, csr, "finalize", retry=False)
                except TransientError:
                    pass  # the finalize may have landed: the order's status tells
                else:
                    self.stats["finalized"] += 1
                    finalized = True
                    body = messages.Order.from_json(resp.json())
                    ra = _retry_after(resp.headers.get("Retry-After"))
                    continue
            if time.monotonic() > deadline:
                raise TransientError(
                    self._fail("order", f"still {status} after {self.order_timeout_s:.0f}s")
                )
            await asyncio.sleep(min(backoff.delay(ra), max(0.0, deadline - time.monotonic())))
            body, ra = await self._order(client, url)

    async def _authz(
        self, client: acme_client.ClientV2, url: str
    ) -> messages.AuthorizationResource:
        doc, _ = await self._fetch(client, url, "fetch authorization")
        try:
            return messages.AuthorizationResource(
                body=messages.Authorization.from_json(doc), uri=url
            )
        except jose.DeserializationError as exc:
            raise PermanentError(self._fail("fetch authorization", "malformed")) from exc

    async def _solve(
        self,
        client: acme_client.ClientV2,
        body: messages.Order,
        authzs: list[messages.AuthorizationResource] | None,
        deadline: float,
    ) -> None:
        """Publish and answer every pending authorization's challenge, wait for the
        order to leave ``pending``, and always clean up what was published."""
        if authzs is None:
            authzs = [await self._authz(client, u) for u in body.authorizations]
        st = self._state()
        solver = st.solver
        jwk = self._account_key()
        todo: list[tuple[messages.ChallengeBody, Any, ch.Published]] = []
        for az in authzs:
            if az.body.status != messages.STATUS_PENDING:
                continue
            domain = az.body.identifier.value
            chall = next(
                (
                    c
                    for c in az.body.challenges
                    if c.chall.typ == self.challenge_type
                    and c.status in (messages.STATUS_PENDING, messages.STATUS_PROCESSING)
                ),
                None,
            )
            if chall is None:
                offered = ", ".join(sorted({c.chall.typ for c in az.body.challenges}))
                raise PermanentError(
                    self._fail(
                        "authorization",
                        f"{'*.' if az.body.wildcard else ''}{domain}: the CA offers no "
                        f"{self.challenge_type} challenge (offers: {offered or 'none'})",
                    )
                )
            response, validation = chall.chall.response_and_validation(jwk)
            token = str(chall.chall.encode("token"))
            todo.append(
                (chall, response, ch.Published(self.challenge_type, domain, token, str(validation)))
            )
        published: list[ch.Published] = []
        try:
            for _, _, p in todo:
                await solver.publish(p)
                published.append(p)
            for chall, response, _ in todo:
                if chall.status == messages.STATUS_PROCESSING:
                    continue  # answered by a killed run: being validated; just serve it
                await self._call(
                    "answer challenge", lambda c=chall, r=response: client.answer_challenge(c, r)
                )
            if todo:
                await self._wait_authorized(client, body, deadline)
        finally:
            for p in published:
                with contextlib.suppress(CertctlError):  # best effort; single-use anyway
                    await solver.remove(p)

    async def _wait_authorized(
        self, client: acme_client.ClientV2, body: messages.Order, deadline: float
    ) -> None:
        backoff = _Backoff(self.poll_max_s)
        ra: float | None = None
        urls = list(body.authorizations)
        while True:
            await asyncio.sleep(min(backoff.delay(ra), max(0.0, deadline - time.monotonic())))
            pending = False
            for u in urls:
                az = await self._authz(client, u)
                if az.body.status == messages.STATUS_INVALID:
                    return  # the order turns invalid; _drive reports why
                if az.body.status == messages.STATUS_PENDING:
                    pending = True
                    break
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TransientError(self._fail("authorization", "validation did not finish"))

    async def _why_invalid(
        self, client: acme_client.ClientV2, body: messages.Order
    ) -> tuple[str, set[str]]:
        """The first problem found (as text) and every problem code seen."""
        first: str | None = None
        codes: set[str] = set()
        for u in body.authorizations:
            try:
                az = await self._authz(client, u)
            except CertctlError:
                continue
            for c in az.body.challenges:
                if c.error is not None:
                    codes.add(str(c.error.code or c.error.typ))
                    first = first or (
                        f"invalid: {az.body.identifier.value}: {c.error.code or c.error.typ}: "
                        f"{c.error.detail or ''}"
                    )
        if body.error is not None:
            codes.add(str(body.error.code or body.error.typ))
            first = first or (
                f"invalid: {body.error.code or body.error.typ}: {body.error.detail or ''}"
            )
        return first or "invalid (the CA gave no reason)", codes

    def _check(self, req: IssueRequest, pem: bytes) -> IssuedCert:
        """The CA's answer must be a certificate for our key and exactly our names."""
        try:
            certs = pki.parse_pem_chain(pem)
        except CertctlError as exc:
            raise PermanentError(self._fail("certificate", f"unreadable: {exc}")) from exc
        if not certs:
            raise PermanentError(self._fail("certificate", "the CA returned no certificate"))
        leaf = certs[0]
        if not pki.same_public_key(req.public_key, leaf.public_key()):
            raise PermanentError(
                self._fail("certificate", "the CA returned a certificate for another key")
            )
        want = {_norm(n) for n in req.cert.names}
        got = {_norm(n) for n in pki.sans(leaf)}
        cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns:
            got_cn = _norm(str(cns[0].value))
            if got_cn not in want:
                raise PermanentError(
                    self._fail("certificate", f"unexpected common name {got_cn[:60]!r}")
                )
        if got != want:
            extra = sorted(got - want)[:5]
            missing = sorted(want - got)[:5]
            raise PermanentError(
                self._fail(
                    "certificate",
                    f"names differ from the order (extra: {extra}, missing: {missing})",
                )
            )
        return IssuedCert(
            cert_pem=pki.cert_pem(leaf),
            chain_pem=pki.chain_pem(certs[1:]),
            serial=pki.serial_hex(leaf.serial_number),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint=pki.fingerprint(leaf),
        )

    async def revoke(self, version: VersionRecord, reason: str) -> None:
        code = REASON_CODES.get(reason)
        if code is None:
            raise PermanentError(f"issuer {self.name}: unknown revocation reason {reason!r}")
        pem = await asyncio.to_thread(self._vault_get, f"cert/{version.serial}")
        if pem is None:
            raise PermanentError(
                f"issuer {self.name}: certificate {version.serial} was not issued through "
                "this issuer's state; cannot revoke it at the CA"
            )
        cert = x509.load_pem_x509_certificate(pem)
        client = await self._ensure_account()
        async with self._state().sem:
            try:
                await self._call("revoke", lambda: client.revoke(cert, code))
            except AcmeProblem as exc:
                if exc.code == "alreadyRevoked":
                    return
                raise


def ari_cert_id(cert: x509.Certificate) -> str | None:
    """RFC 9773 section 4.1: base64url(AKI keyIdentifier) "." base64url(serial DER
    INTEGER contents), unpadded. None when the certificate has no AKI key id."""
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    if aki.key_identifier is None:
        return None
    serial = cert.serial_number
    raw = serial.to_bytes((serial.bit_length() + 8) // 8, "big", signed=True)

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).decode("ascii").rstrip("=")

    return f"{b64(aki.key_identifier)}.{b64(raw)}"


def _norm(name: str) -> str:
    name = name.strip().rstrip(".").lower()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


CONNECTORS = [AcmeIssuer]

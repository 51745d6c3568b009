"""Webhook notifier: POSTs the event as JSON, signed with HMAC-SHA256.

The signature header (default ``X-Certctl-Signature``) is ``sha256=<hex>`` of
HMAC-SHA256(secret, body bytes), so the receiver checks exactly the bytes it got.
``X-Certctl-Event`` names the event and ``X-Certctl-Delivery`` carries the
deduplication key (the same across retries).

Also the base of the other HTTP notifiers (:class:`HttpNotifier`, :func:`http_schema`):
secrets (URLs with tokens, API keys) are revealed only for the request and never
appear in an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

import httpx

from certctl.connectors import Notifier
from certctl.errors import PermanentError, TransientError
from certctl.model import Secret

#: A secret in a notifier config: ``{env: NAME}`` or ``{file: PATH}``.
SECRET_REF: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {"env": {"type": "string", "minLength": 1}, "file": {"type": "string"}},
}
#: A URL that may carry a token (Slack/Teams webhooks): a plain string or a secret.
URL_OR_SECRET: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": "^https?://"}, SECRET_REF],
}
TIMEOUT: dict[str, Any] = {"type": "number", "exclusiveMinimum": 0, "maximum": 300}


def reveal(value: Any) -> str:
    """The value of a config entry that may be a :class:`Secret` reference."""
    if isinstance(value, Secret):
        return value.reveal()
    return str(value)


def body_bytes(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")


async def post(
    notifier: str,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: float,
    *,
    verify: Any = True,
) -> httpx.Response:
    """POST ``body``; 2xx returns, 429/5xx/transport errors raise TransientError,
    other statuses PermanentError. Messages name the notifier, never the URL."""
    try:
        async with httpx.AsyncClient(timeout=timeout, verify=verify) as client:
            resp = await client.post(
                url, content=body, headers={"Content-Type": "application/json", **headers}
            )
    except httpx.HTTPError as exc:
        raise TransientError(f"notifier {notifier}: {type(exc).__name__}") from None
    if resp.status_code < 300:
        return resp
    if resp.status_code == 429 or resp.status_code >= 500:
        retry = resp.headers.get("Retry-After")
        after = float(retry) if retry and retry.isdigit() else None
        raise TransientError(f"notifier {notifier}: HTTP {resp.status_code}", retry_after=after)
    raise PermanentError(f"notifier {notifier}: HTTP {resp.status_code} (request refused)")


def http_schema(required: str, **properties: Any) -> dict[str, Any]:
    """The config schema of an HTTP notifier: its own ``properties`` (``required``
    among them) plus the ``timeout`` and ``ca_file`` every HTTP notifier takes."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": [required],
        "properties": {**properties, "timeout": TIMEOUT, "ca_file": {"type": "string"}},
    }


class HttpNotifier(Notifier):
    """A notifier that POSTs one JSON document per event."""

    async def send(
        self, url: str, doc: Mapping[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        await self.send_bytes(url, body_bytes(doc), headers or {})

    async def send_bytes(self, url: str, body: bytes, headers: Mapping[str, str]) -> None:
        timeout = float(self.config.get("timeout", 10))
        await post(self.name, url, body, headers, timeout, verify=ca_verify(self))


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookNotifier(HttpNotifier):
    type_name = "webhook"
    config_schema = http_schema(
        "url",
        url=URL_OR_SECRET,
        secret=SECRET_REF,
        signature_header={"type": "string", "pattern": "^[A-Za-z0-9-]+$"},
    )

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        body = body_bytes({"event": event, **payload})
        headers = {"X-Certctl-Event": event, "X-Certctl-Delivery": str(payload.get("key", ""))}
        if "secret" in self.config:
            header = str(self.config.get("signature_header", "X-Certctl-Signature"))
            headers[header] = sign(reveal(self.config["secret"]), body)
        await self.send_bytes(reveal(self.config["url"]), body, headers)


def ca_verify(notifier: Notifier) -> Any:
    """``ca_file`` (relative to the inventory) as an SSL context, else system trust."""
    ca = notifier.config.get("ca_file")
    if not ca:
        return True
    import ssl

    path = notifier.ctx.inventory_root / str(ca)
    return ssl.create_default_context(cafile=str(path))


CONNECTORS = [WebhookNotifier]

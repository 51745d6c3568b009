"""Challenge solvers for the ``acme`` issuer (a helper module: it registers no connector).

Each solver publishes what one ACME challenge needs and removes it again:

* :class:`HttpResponder` -- http-01 through a small HTTP server certctl runs itself on
  a configured ``host:port``. It listens only while at least one challenge is
  published (started by the first, closed after the last), so it lives exactly for
  the part of an apply that needs it.
* :class:`Webroot` -- http-01 through files under ``<path>/.well-known/acme-challenge/``
  that an existing web server serves.
* :class:`DnsHook` -- dns-01 through operator commands, run as argument lists (never a
  shell) with the record in environment variables: ``CERTCTL_ACME_DOMAIN``,
  ``CERTCTL_ACME_RECORD`` (``_acme-challenge.<domain>.``), ``CERTCTL_ACME_VALUE`` and
  ``CERTCTL_ACME_ISSUER``.
* :class:`Rfc2136` -- dns-01 through RFC 2136 dynamic updates signed with TSIG
  (dnspython), sent over TCP to the configured server.

``publish`` returns a handle that ``remove`` takes; ``remove`` is idempotent and is
called on success and on failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from certctl.errors import PermanentError, TransientError
from certctl.faults import Failpoints
from certctl.model import Secret

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
CHALLENGE_PATH = "/.well-known/acme-challenge/"
HOOK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Published:
    """What a solver published for one challenge (the argument to ``remove``)."""

    kind: str  # "http-01" | "dns-01"
    domain: str  # identifier value (no "*.")
    token: str
    value: str  # http-01: key authorization; dns-01: TXT value


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise PermanentError(f"responder listen {text!r} is not host:port")
    if not host:
        raise PermanentError(f"responder listen {text!r} needs a host (e.g. 0.0.0.0:80)")
    return host.strip("[]"), int(port)


def reveal(value: Any) -> str:
    return value.reveal() if isinstance(value, Secret) else str(value)


# ------------------------------------------------------------------ http-01


class HttpResponder:
    """Serves ``/.well-known/acme-challenge/<token>`` while challenges are published."""

    def __init__(self, listen: str) -> None:
        self.host, self.port = parse_listen(listen)
        self._tokens: dict[str, bytes] = {}
        self._server: asyncio.Server | None = None
        self._lock = asyncio.Lock()
        self.requests = 0
        self.faults = Failpoints()

    async def publish(self, p: Published) -> None:
        if not TOKEN_RE.match(p.token):
            raise PermanentError("the CA sent a malformed http-01 token")
        async with self._lock:
            self._tokens[p.token] = p.value.encode("ascii")
            if self._server is None:
                try:
                    self._server = await asyncio.start_server(
                        self._handle, self.host, self.port, reuse_address=True
                    )
                except OSError as exc:
                    self._tokens.pop(p.token, None)
                    raise TransientError(
                        f"http-01 responder cannot listen on {self.host}:{self.port}: "
                        f"{exc.strerror or exc}"
                    ) from exc

    async def remove(self, p: Published) -> None:
        async with self._lock:
            self._tokens.pop(p.token, None)
            if not self._tokens and self._server is not None:
                server, self._server = self._server, None
                server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split(" ")
            body, status = b"not found\n", "404 Not Found"
            if len(parts) == 3 and parts[0] in ("GET", "HEAD"):
                path = parts[1].split("?", 1)[0]
                if path.startswith(CHALLENGE_PATH):
                    value = self._tokens.get(path[len(CHALLENGE_PATH) :])
                    if value is not None:
                        body, status = value, "200 OK"
                        self.requests += 1
                        # crash tests: die while the CA is validating
                        self.faults.hit("acme_responder_request")
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode("ascii")
                + (body if parts[0] != "HEAD" else b"")
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Webroot:
    """Writes challenge files under ``<root>/.well-known/acme-challenge/``."""

    def __init__(self, root: Path) -> None:
        self.dir = root / ".well-known" / "acme-challenge"

    def _path(self, token: str) -> Path:
        if not TOKEN_RE.match(token):
            raise PermanentError("the CA sent a malformed http-01 token")
        return self.dir / token

    async def publish(self, p: Published) -> None:
        path = self._path(p.token)

        def write() -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{p.token}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as fh:
                fh.write(p.value.encode("ascii"))
            os.replace(tmp, path)

        try:
            await asyncio.to_thread(write)
        except OSError as exc:
            raise PermanentError(f"webroot {self.dir}: cannot write challenge: {exc}") from exc

    async def remove(self, p: Published) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(p.token).unlink()


# ------------------------------------------------------------------- dns-01


def record_name(domain: str) -> str:
    return f"_acme-challenge.{domain.rstrip('.')}."


class DnsHook:
    """Runs ``add`` / ``remove`` argument lists with the record in the environment."""

    def __init__(self, issuer: str, add: Sequence[str], remove: Sequence[str]) -> None:
        self.issuer = issuer
        self.add_argv = [str(a) for a in add]
        self.remove_argv = [str(a) for a in remove]

    async def _run(self, argv: list[str], p: Published, what: str) -> None:
        env = {
            **os.environ,
            "CERTCTL_ACME_DOMAIN": p.domain,
            "CERTCTL_ACME_RECORD": record_name(p.domain),
            "CERTCTL_ACME_VALUE": p.value,
            "CERTCTL_ACME_ISSUER": self.issuer,
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise PermanentError(f"dns-01 {what} hook {argv[0]!r} cannot run: {exc}") from exc
        try:
            _, err = await asyncio.wait_for(proc.communicate(), HOOK_TIMEOUT_S)
        except TimeoutError as exc:
            proc.kill()
            await proc.wait()
            raise TransientError(f"dns-01 {what} hook {argv[0]!r} timed out") from exc
        if proc.returncode != 0:
            tail = err.decode("utf-8", "replace").strip()[-300:]
            raise PermanentError(f"dns-01 {what} hook {argv[0]!r} exited {proc.returncode}: {tail}")

    async def publish(self, p: Published) -> None:
        await self._run(self.add_argv, p, "add")

    async def remove(self, p: Published) -> None:
        await self._run(self.remove_argv, p, "remove")


_TSIG_ALGORITHMS = {
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
}


class Rfc2136:
    """RFC 2136 dynamic updates with TSIG: add and delete the TXT record."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        self.server = str(config["server"])
        self.port = int(config.get("port", 53))
        self.ttl = int(config.get("ttl", 60))
        self.zone = str(config["zone"]) if config.get("zone") else None
        self.timeout = float(config.get("timeout_s", 10))
        tsig = config.get("tsig_key")
        self.keyring: Any = None
        self.keyname: dns.name.Name | None = None
        self.algorithm = dns.tsig.HMAC_SHA256
        if tsig is not None:
            self.keyname = dns.name.from_text(str(tsig["name"]))
            self.algorithm = _TSIG_ALGORITHMS[str(tsig.get("algorithm", "hmac-sha256"))]
            try:
                secret = base64.b64decode(reveal(tsig["secret"]), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise PermanentError("rfc2136 tsig_key secret is not base64") from exc
            self.keyring = {self.keyname: dns.tsig.Key(self.keyname, secret, self.algorithm)}
        self._zones: dict[str, dns.name.Name] = {}

    async def _send(self, msg: dns.message.Message) -> dns.message.Message:
        try:
            return await dns.asyncquery.tcp(msg, self.server, port=self.port, timeout=self.timeout)
        except (TimeoutError, dns.exception.Timeout, OSError) as exc:
            raise TransientError(f"rfc2136: DNS server {self.server}:{self.port}: {exc}") from exc
        except (dns.tsig.PeerBadKey, dns.tsig.PeerBadSignature, dns.tsig.PeerBadTime) as exc:
            # the secret itself is never part of the message
            what = {
                dns.tsig.PeerBadKey: "does not know the TSIG key",
                dns.tsig.PeerBadSignature: "rejected the TSIG signature (wrong secret or "
                "algorithm)",
                dns.tsig.PeerBadTime: "rejected the TSIG time (clock skew)",
            }[type(exc)]
            raise PermanentError(
                f"rfc2136: DNS server {self.server}:{self.port} {what} "
                f"(key {self.keyname}); check tsig_key"
            ) from None
        except dns.exception.DNSException as exc:
            raise PermanentError(f"rfc2136: {type(exc).__name__}: {exc}") from exc

    async def _zone_of(self, record: str) -> dns.name.Name:
        if self.zone is not None:
            return dns.name.from_text(self.zone)
        if record in self._zones:
            return self._zones[record]
        name = dns.name.from_text(record).parent()
        while name != dns.name.root:
            resp = await self._send(dns.message.make_query(name, dns.rdatatype.SOA))
            if resp.rcode() == dns.rcode.NOERROR and any(
                r.rdtype == dns.rdatatype.SOA and r.name == name for r in resp.answer
            ):
                self._zones[record] = name
                return name
            name = name.parent()
        raise PermanentError(f"rfc2136: no zone found on {self.server} for {record}")

    async def _update(self, p: Published, add: bool) -> None:
        record = record_name(p.domain)
        zone = await self._zone_of(record)
        upd = dns.update.UpdateMessage(
            zone, keyring=self.keyring, keyname=self.keyname, keyalgorithm=self.algorithm
        )
        rel = dns.name.from_text(record).relativize(zone)
        if add:
            upd.add(rel, self.ttl, "TXT", f'"{p.value}"')
        else:
            upd.delete(rel, "TXT", f'"{p.value}"')
        resp = await self._send(upd)
        if resp.rcode() != dns.rcode.NOERROR:
            raise PermanentError(
                f"rfc2136: {self.server} refused the update of {record}: "
                f"{dns.rcode.to_text(resp.rcode())}"
            )

    async def publish(self, p: Published) -> None:
        await self._update(p, add=True)

    async def remove(self, p: Published) -> None:
        await self._update(p, add=False)

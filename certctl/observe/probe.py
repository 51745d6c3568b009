"""TLS endpoint probing: connect, handshake with SNI, read the leaf certificate.

The one TLS probe of certctl: the service targets' ``verify`` (after a deploy, and
while observing) and ``certctl drift`` both use :func:`fetch_leaf`. No trust check is
made -- the leaf is compared with what certctl deployed, not validated against a CA.

:func:`probe_many` probes many endpoints with bounded concurrency, a per-probe
timeout (connect + handshake), and optionally several threads each running its own
event loop (the handshake's crypto releases the GIL, so a few threads raise the
rate on a multi-core machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass

#: One client context per thread: building one costs more than a loopback handshake.
_LOCAL = threading.local()


def client_context() -> ssl.SSLContext:
    ctx = getattr(_LOCAL, "ctx", None)
    if ctx is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        _LOCAL.ctx = ctx
    return ctx


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    host: str
    port: int
    sni: str | None = None


@dataclass(frozen=True, slots=True)
class ProbeResult:
    target: ProbeTarget
    der: bytes | None = None  # the leaf certificate, DER
    error: str | None = None  # why there is none (refused, timed out, handshake failed)

    @property
    def fingerprint(self) -> str | None:
        return hashlib.sha256(self.der).hexdigest() if self.der else None


def _describe_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout:g}s"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc.__class__.__name__}"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or exc.__class__.__name__
    return str(exc) or exc.__class__.__name__


async def fetch_leaf(target: ProbeTarget, timeout: float) -> ProbeResult:
    """One probe: the leaf the endpoint presents for ``target.sni``, or the error.
    ``timeout`` bounds connect and handshake together; closing is not waited for
    beyond it either."""
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                target.host,
                target.port,
                ssl=client_context(),
                server_hostname=target.sni or None,
                ssl_handshake_timeout=timeout,
            ),
            timeout,
        )
    except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
        return ProbeResult(target, error=_describe_error(exc, timeout))
    try:
        obj = writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True) if obj is not None else None
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), min(timeout, 1.0))
    if not der:
        return ProbeResult(target, error="the endpoint presented no certificate")
    return ProbeResult(target, der=der)


async def fetch_fingerprint(host: str, port: int, sni: str | None, timeout: float) -> str | None:
    """SHA-256 fingerprint of the leaf an endpoint serves; None when no TLS handshake
    succeeded."""
    return (await fetch_leaf(ProbeTarget(host, port, sni), timeout)).fingerprint


async def _probe_shard(
    targets: Sequence[ProbeTarget], timeout: float, concurrency: int
) -> list[ProbeResult]:
    sem = asyncio.Semaphore(concurrency)

    async def one(t: ProbeTarget) -> ProbeResult:
        async with sem:
            return await fetch_leaf(t, timeout)

    return list(await asyncio.gather(*(one(t) for t in targets)))


def probe_many(
    targets: Sequence[ProbeTarget],
    *,
    timeout: float = 5.0,
    concurrency: int = 64,
    threads: int = 1,
) -> list[ProbeResult]:
    """Probe every target (results in input order). At most ``concurrency`` probes are
    in flight in total, split over ``threads`` event loops. Never raises for a probe:
    a failure is the result's ``error``. Safe to call from inside a running loop (the
    shards always run in their own threads then)."""
    if not targets:
        return []
    threads = max(1, min(threads, len(targets)))
    per = max(1, concurrency // threads)
    shards = [list(targets[i::threads]) for i in range(threads)]
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:
        in_loop = False
    if threads == 1 and not in_loop:
        results = [asyncio.run(_probe_shard(shards[0], timeout, per))]
    else:
        results = [[] for _ in shards]
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results[i] = asyncio.run(_probe_shard(shards[i], timeout, per))
            except BaseException as exc:  # pragma: no cover - re-raised below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        if errors:
            raise errors[0]
    out: list[ProbeResult] = [None] * len(targets)  # type: ignore[list-item]
    for i, shard in enumerate(results):
        for j, r in enumerate(shard):
            out[i + j * threads] = r
    return out

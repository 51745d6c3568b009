"""Real TLS listeners and certificate material for the discovery tests and benchmark.

:class:`TLSListeners` runs one child process (``python -m
tests.integration.discovery_support CONFIG``) serving TLS with asyncio on each
(address, port) given, every listener with its own certificate and chain; a listener
may serve another certificate for one SNI name (a name-based virtual host).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(kind: str = "ec") -> PrivateKey:
    if kind.startswith("rsa"):
        bits = int(kind[3:] or 2048)
        return rsa.generate_private_key(65537, bits)
    return ec.generate_private_key(ec.SECP256R1())


def make_cert(
    cn: str,
    key: PrivateKey,
    *,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    ca: bool = False,
    days: int = 90,
    sans: tuple[str, ...] = (),
    hash_alg: hashes.HashAlgorithm | None = None,
    not_before: datetime | None = None,
) -> x509.Certificate:
    now = not_before or datetime.now(UTC) - timedelta(minutes=5)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer_name, signer_key = (issuer[0].subject, issuer[1]) if issuer else (name, key)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), False)
    return b.sign(signer_key, hash_alg or hashes.SHA256())


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class CA:
    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def new(cls, cn: str = "Discovery Test Root") -> CA:
        key = new_key()
        return cls(make_cert(cn, key, ca=True, days=3650), key)

    def issue(self, cn: str, kind: str = "ec", **kw: Any) -> tuple[x509.Certificate, PrivateKey]:
        key = new_key(kind)
        return make_cert(cn, key, issuer=(self.cert, self.key), sans=(cn,), **kw), key


def free_ports(n: int) -> list[int]:
    """Ports free on every address (bound on the wildcard address), so no other
    listener answers on them anywhere in 127.0.0.0/8."""
    socks, out = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("", 0))
        socks.append(s)
        out.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return out


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    cert_file: str  # leaf + chain PEM
    key_file: str
    sni: dict[str, tuple[str, str]] | None = None  # name -> (cert_file, key_file)


class TLSListeners:
    """Run the listeners in a child process until :meth:`stop`."""

    def __init__(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        fd, self.config = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump([vars(x) for x in listeners], f)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.discovery_support", self.config],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"TLS listeners did not start: {line!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        os.unlink(self.config)

    def __enter__(self) -> TLSListeners:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


async def _serve(config: list[dict[str, Any]]) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    servers = []
    for item in config:
        ctx = _server_context(item["cert_file"], item["key_file"])
        if item.get("sni"):
            others = {n: _server_context(c, k) for n, (c, k) in item["sni"].items()}

            def pick(
                sock: ssl.SSLObject | ssl.SSLSocket,
                name: str | None,
                _ctx: ssl.SSLContext,
                others: dict[str, ssl.SSLContext] = others,
            ) -> None:
                if name in others:
                    sock.context = others[name]

            ctx.sni_callback = pick  # type: ignore[assignment]
        servers.append(
            await asyncio.start_server(handle, item["address"], item["port"], ssl=ctx, backlog=512)
        )
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        asyncio.run(_serve(json.load(f)))

"""``certctl drift`` against real TLS servers on loopback.

Real parts: the ``certctl`` CLI as a subprocess, the local CA, the SQLite state, a
service target (type ``ssh``, local placement) that deploys files, runs its reload
command and verifies its endpoint, and a Python ``ssl`` server (asyncio, own thread)
that picks the certificate per SNI name -- read from disk at each handshake, like a
server reading its files at reload. Certificates the server serves besides the
deployed ones (another, expired, for another name) are signed by the same local CA
through its connector. A listener that never answers the handshake and a closed port
stand for unreachable endpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from certctl.engine import Engine
from certctl.observe import drift
from certctl.observe.probe import ProbeResult, ProbeTarget, fetch_fingerprint, probe_many

Pair = tuple[Path, Path]  # (fullchain, key)


class TLSServer:
    """A TLS server on 127.0.0.1 whose certificate is chosen per SNI name by
    ``routes`` (name -> function returning a (fullchain, key) pair), else
    ``default``. Connections are answered with nothing and closed by the client."""

    def __init__(self, default: Callable[[], Pair]) -> None:
        self.default = default
        self.routes: dict[str, Callable[[], Pair]] = {}
        self.handshakes = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        assert ready.wait(10)

    def _context(self, pair: Pair) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*pair)
        return ctx

    def _sni(self, sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        self.handshakes += 1
        pick = self.routes.get(name or "", self.default)
        sslobj.context = self._context(pick())

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        base = self._context(self.default())
        base.sni_callback = self._sni  # type: ignore[assignment]

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                await reader.read()
            writer.close()

        async def start() -> None:
            self._server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=base)

        self._loop.run_until_complete(start())
        ready.set()
        self._loop.run_forever()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel backlog) and never speaks TLS."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    try:
        yield int(s.getsockname()[1])
    finally:
        s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def run(inv: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(inv), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


INVENTORY = """
defaults: {{issuer: ca, profile: tls, ttl: 30d, key: {{type: ecdsa, curve: P-256}}}}
issuers:
  ca:
    type: local_ca
    root: {{common_name: Drift Root CA, key: {{type: ecdsa, curve: P-256}}, ttl: 3650d}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 90d}}
targets:
  files:
    type: file
    root: out/files
    fullchain_path: "{{{{ cert.name }}}}/fullchain.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
  svc:
    type: ssh
    root: out/svc
    fullchain_path: "{{{{ cert.name }}}}/fullchain.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
    reload: [touch, "{reloaded}"]
    verify: {{endpoint: "127.0.0.1:{port}", sni: "{{{{ cert.common_name }}}}", timeout: 5}}
certificates:
  www: {{common_name: www.drift.test, targets: [svc]}}
  api: {{common_name: api.drift.test, targets: [files]}}
  wn: {{common_name: wn.drift.test, targets: [files]}}
{endpoints}
"""


@dataclass
class Setup:
    inv: Path
    server: TLSServer
    reloaded: Path
    other_www: Pair
    other_api: Pair
    expired: Pair


def _leaf(eng: Engine, out: Path, name: str, not_before: datetime, not_after: datetime) -> Pair:
    """A leaf for ``name`` signed by the inventory's local CA (through its connector)."""
    signer = eng.issuer("ca").load()  # type: ignore[attr-defined]
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(signer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(signer.key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    chain, keyf = out / f"{name}.pem", out / f"{name}.key"
    chain.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyf.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    keyf.chmod(0o600)
    return chain, keyf


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    inv = tmp_path / "inv"
    inv.mkdir()
    reloaded = tmp_path / "reloaded"
    extra = tmp_path / "extra"
    # The server needs a certificate before anything is issued: a throwaway one.
    boot_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    boot = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "boot.drift.test")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "boot.drift.test")]))
        .public_key(boot_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(boot_key, hashes.SHA256())
    )
    extra.mkdir()
    (extra / "boot.pem").write_bytes(boot.public_bytes(serialization.Encoding.PEM))
    (extra / "boot.key").write_bytes(
        boot_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    boot_pair = (extra / "boot.pem", extra / "boot.key")
    server = TLSServer(lambda: boot_pair)
    (inv / "inventory.yaml").write_text(
        INVENTORY.format(port=server.port, reloaded=reloaded, endpoints="")
    )
    eng = Engine(inventory_path=inv)
    try:
        later = now + timedelta(days=10)
        other_www = _leaf(eng, extra / "other", "www.drift.test", now - timedelta(hours=1), later)
        other_api = _leaf(eng, extra / "other", "api.drift.test", now - timedelta(hours=1), later)
        expired = _leaf(
            eng, extra / "expired", "exp.drift.test", now - timedelta(days=9), now - timedelta(1)
        )
    finally:
        eng.close()
    deployed = inv / "out" / "svc" / "www"
    www_live: Pair = (deployed / "fullchain.pem", deployed / "key.pem")
    # www.drift.test: what the service loaded at its last reload (the reload command
    # touches `reloaded`); before any reload, another certificate for the same name.
    server.routes["www.drift.test"] = lambda: www_live if reloaded.exists() else other_www
    server.routes["api.drift.test"] = lambda: other_api
    server.routes["exp.drift.test"] = lambda: expired
    try:
        yield Setup(inv, server, reloaded, other_www, other_api, expired)
    finally:
        server.stop()


def test_drift_reports_each_kind_and_the_plan_redeploys_a_stale_endpoint(setup: Setup) -> None:
    inv, server = setup.inv, setup.server
    applied = run(inv, "apply", "--auto-approve")
    assert applied.returncode == 0, applied.stderr
    assert setup.reloaded.exists()  # the target reloaded, then verified the endpoint

    with blackhole() as hole:
        refused = closed_port()
        endpoints = f"""endpoints:
  ok-www: {{endpoint: "127.0.0.1:{server.port}", sni: www.drift.test, certificate: www}}
  other-api: {{endpoint: "127.0.0.1:{server.port}", sni: api.drift.test, certificate: api}}
  expired: {{endpoint: "127.0.0.1:{server.port}", sni: exp.drift.test}}
  mismatch: {{endpoint: "127.0.0.1:{server.port}", sni: wn.drift.test, certificate: wn}}
  refused: {{endpoint: "127.0.0.1:{refused}", sni: api.drift.test}}
  silent: {{endpoint: "127.0.0.1:{hole}", sni: api.drift.test, timeout: 0.5}}
"""
        (inv / "inventory.yaml").write_text(
            INVENTORY.format(port=server.port, reloaded=setup.reloaded, endpoints=endpoints)
        )
        res = run(inv, "drift", "--format", "json")
        assert res.returncode == 2, res.stderr
        doc = json.loads(res.stdout)
        by_name = {e["name"]: e for e in doc["endpoints"]}
        status = {n: e["status"] for n, e in by_name.items()}
        assert status == {
            "www svc": "ok",  # from the svc target's verify settings
            "ok-www": "ok",
            "other-api": "other_certificate",
            "expired": "expired",
            "mismatch": "name_mismatch",
            "refused": "unreachable",
            "silent": "unreachable",
        }
        assert doc["summary"]["other_certificate"] == 1
        other = by_name["other-api"]["served"]
        other_cert = x509.load_pem_x509_certificate(setup.other_api[0].read_bytes())
        assert other["fingerprint"] == other_cert.fingerprint(hashes.SHA256()).hex()
        assert other["subject"] == "CN=api.drift.test"
        assert other["issuer"] == "CN=Drift Root CA"
        assert other["not_after"] == other_cert.not_valid_after_utc.isoformat()
        assert by_name["other-api"]["expected_fingerprint"] != other["fingerprint"]
        assert "refused" in by_name["refused"]["detail"]
        assert by_name["silent"]["detail"] == "timed out after 0.5s"
        assert "wn.drift.test" in by_name["mismatch"]["detail"]
        assert doc["files_checked"] == 3 and doc["files"] == []

        text = run(inv, "drift")
        assert text.returncode == 2
        assert "other-api: 127.0.0.1:" in text.stdout and "other_certificate" in text.stdout
        assert text.stdout.strip().splitlines()[-1].startswith("Drift: 7 endpoints: 2 ok")
        md = run(inv, "drift", "--format", "markdown")
        assert md.returncode == 2
        assert "| endpoint | SNI | status | certificate | detail |" in md.stdout
        for out in (res.stdout, text.stdout, md.stdout, text.stderr):
            assert "PRIVATE KEY" not in out

    # The service "restarts with its old configuration": the endpoint serves another
    # certificate while the files are right. Drift sees it, and the plan redeploys
    # (reload, no reissue).
    (inv / "inventory.yaml").write_text(
        INVENTORY.format(port=server.port, reloaded=setup.reloaded, endpoints="")
    )
    setup.reloaded.unlink()
    res = run(inv, "drift", "--format", "json", "--endpoints-only")
    assert res.returncode == 2
    (www,) = json.loads(res.stdout)["endpoints"]
    assert www["status"] == "other_certificate" and www["placement"] == "svc"
    plan = run(inv, "plan", "--format", "json")
    assert plan.returncode == 0, plan.stderr
    actions = json.loads(plan.stdout)["actions"]
    assert [(a["kind"], a["cert"]) for a in actions] == [("deploy", "www")]
    assert actions[0]["reasons"][0]["code"] == "content_differs"
    assert "live endpoint" in actions[0]["reasons"][0]["message"]
    assert run(inv, "apply", "--auto-approve").returncode == 0
    assert setup.reloaded.exists()
    clean = run(inv, "drift")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.startswith("No drift: 1 endpoints: 1 ok; 3 placements read back")
    again = run(inv, "plan", "--detailed-exitcode")
    assert again.returncode == 0, again.stdout


def test_drift_reads_back_files_and_errors_exit_1(setup: Setup) -> None:
    inv = setup.inv
    assert run(inv, "apply", "--auto-approve").returncode == 0
    (inv / "out" / "files" / "api" / "fullchain.pem").write_text("tampered\n")
    res = run(inv, "drift", "--format", "json")
    assert res.returncode == 2
    doc = json.loads(res.stdout)
    assert [(f["certificate"], f["state"]) for f in doc["files"]] == [("api", "differs")]
    assert all(e["status"] == "ok" for e in doc["endpoints"])
    # A broken inventory is an error (1), reported with file:line.
    (inv / "inventory.yaml").write_text(
        INVENTORY.format(port=setup.server.port, reloaded=setup.reloaded, endpoints="")
        + "endpoints:\n  bad: {endpoint: 'no-port', certificate: nope}\n"
    )
    bad = run(inv, "drift")
    assert bad.returncode == 1
    assert "inventory.yaml:" in bad.stderr and "endpoint" in bad.stderr


def test_probe_many_keeps_order_and_honours_timeouts(setup: Setup) -> None:
    port = setup.server.port
    with blackhole() as hole:
        targets = [
            ProbeTarget("127.0.0.1", hole if i % 5 == 0 else port, "api.drift.test")
            for i in range(40)
        ]
        results = probe_many(targets, timeout=0.3, concurrency=16, threads=2)
    assert [r.target for r in results] == targets
    for i, r in enumerate(results):
        if i % 5 == 0:
            assert r.der is None and r.error == "timed out after 0.3s"
        else:
            assert r.fingerprint is not None and r.error is None
    # The service targets' verify uses the same probe.
    fp = asyncio.run(fetch_fingerprint("127.0.0.1", port, "api.drift.test", 5))
    assert fp == results[1].fingerprint


def test_classify_order_and_name_matching() -> None:
    assert drift.covers(["*.drift.test"], "a.drift.test")
    assert not drift.covers(["*.drift.test"], "a.b.drift.test")
    assert not drift.covers(["*.drift.test"], "drift.test")
    assert drift.covers(["WWW.Drift.Test"], "www.drift.test.")
    assert drift.covers(["127.0.0.1"], "127.0.0.1")
    assert not drift.covers(["127.0.0.2"], "127.0.0.1")
    exp = drift.Expectation("x", "endpoints", ProbeTarget("h", 1, "x.test"))
    res = drift.classify(
        exp, ProbeResult(exp.target, error="connection refused"), datetime.now(UTC)
    )
    assert (res.status, res.detail) == ("unreachable", "connection refused")

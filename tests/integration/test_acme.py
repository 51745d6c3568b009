"""The ``acme`` issuer against a real ACME CA: Debian's Pebble and pebble-challtestsrv.

Real validation (not PEBBLE_VA_ALWAYS_VALID): http-01 through certctl's own responder
(Pebble's VA connects to it), http-01 through a webroot served by a real HTTP server,
dns-01 through hook commands that publish TXT records in challtestsrv's DNS. Pebble
keeps its default nonce rejection (5% of good nonces refused as badNonce) in the
session instance, so every test here also exercises the badNonce retry.

The one stand-in is :class:`FaultProxy`: a TLS proxy in front of the real Pebble that
injects 500/503/429 answers, dropped connections, slow answers and hostile
certificates on chosen requests. It is named as a fault proxy wherever it is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import json
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from certctl import pki
from certctl.apply.executor import ApplySettings
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, IssueRequest
from certctl.engine import Engine
from certctl.errors import PermanentError, TransientError
from certctl.model import Certificate, KeySpec, Profile
from certctl_connectors.issuers.acme import AcmeIssuer
from tests import conformance
from tests.integration.acme_support import EAB_HMAC, EAB_KID, Pebble, free_port, start_pebble

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def pebble() -> Iterator[Pebble]:
    """Real validation, Pebble's default 5% badNonce rejection left on."""
    peb = start_pebble()
    try:
        yield peb
    finally:
        peb.stop()


def ctx(tmp_path: Path, vault: Any = None) -> ConnectorContext:
    return ConnectorContext(
        tmp_path, conformance.FixedClock(), vault or conformance.StandInVault(), BatchSyncer("none")
    )


def http01(peb: Pebble, **extra: Any) -> dict[str, Any]:
    return {
        "directory": peb.directory,
        "ca_bundle": peb.ca_bundle,
        "email": "ops@example.com",
        "terms_of_service_agreed": True,
        "challenge": {"type": "http-01", "responder": {"listen": f"127.0.0.1:{peb.http_port}"}},
        **extra,
    }


def request(names: tuple[str, ...]) -> IssueRequest:
    key = pki.generate_key(KeySpec())
    cert = Certificate(names[0].replace("*.", "star-"), names[0], sans=names[1:], issuer="acme")
    return IssueRequest(cert, Profile("p"), key, key.public_key())


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# ------------------------------------------------------------- conformance


@pytest.mark.parametrize("check", conformance.ISSUER_CHECKS, ids=conformance.check_id)
def test_conformance_http01_responder(check: Any, pebble: Pebble, tmp_path: Path) -> None:
    issuer = AcmeIssuer("acme", http01(pebble), ctx(tmp_path))
    run(check(conformance.IssuerHarness(issuer, request)))


# ----------------------------------------------------------- issuer level


def test_account_key_is_secret_and_registration_is_reused(pebble: Pebble, tmp_path: Path) -> None:
    vault = conformance.StandInVault()
    first = AcmeIssuer("acme", http01(pebble), ctx(tmp_path, vault))
    req = request(("acct.example.com",))
    run(first.issue(req, run(first.prepare(req))))
    assert vault.secret[("acme", "account/key")] is True
    assert b"PRIVATE KEY" in vault.data[("acme", "account/key")]
    url = json.loads(vault.data[("acme", "account/url")])["url"]
    assert "/my-account/" in url
    puts = vault.puts
    second = AcmeIssuer("acme", http01(pebble), ctx(tmp_path, vault))
    req2 = request(("acct2.example.com",))
    issued = run(second.issue(req2, run(second.prepare(req2))))
    assert json.loads(vault.data[("acme", "account/url")])["url"] == url
    # only the issued certificate was stored: no new key, no new registration
    assert vault.puts == puts + 1 and ("acme", f"cert/{issued.serial}") in vault.data


def test_many_orders_in_parallel_each_checked(pebble: Pebble, tmp_path: Path) -> None:
    issuer = AcmeIssuer("acme", http01(pebble, max_concurrent_orders=4), ctx(tmp_path))
    reqs = [request((f"p{i}.example.net", f"www.p{i}.example.net")) for i in range(12)]

    async def go() -> list[Any]:
        async def one(r: IssueRequest) -> Any:
            return await issuer.issue(r, await issuer.prepare(r))

        return await asyncio.gather(*(one(r) for r in reqs))

    out = run(go())
    assert len({i.serial for i in out}) == 12
    for r, issued in zip(reqs, out, strict=True):
        leaf = x509.load_pem_x509_certificate(issued.cert_pem)
        assert sorted(pki.sans(leaf)) == sorted(r.cert.names)
        assert issued.chain_pem.count(b"BEGIN CERTIFICATE") >= 1
    assert issuer.stats["finalized"] == 12


def test_webroot_http01_served_by_a_real_http_server(pebble: Pebble, tmp_path: Path) -> None:
    root = tmp_path / "www"
    root.mkdir()
    handler = type(
        "H",
        (http.server.SimpleHTTPRequestHandler,),
        {"log_message": lambda *a: None},
    )
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", pebble.http_port),
        lambda *a: handler(*a, directory=str(root)),  # type: ignore[misc]
    )
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        cfg = http01(pebble, challenge={"type": "http-01", "webroot": {"path": "www"}})
        issuer = AcmeIssuer("acme", cfg, ctx(tmp_path))
        req = request(("webroot.example.com",))
        issued = run(issuer.issue(req, run(issuer.prepare(req))))
        assert issued.serial
    finally:
        server.shutdown()
        server.server_close()
    challenge_dir = root / ".well-known" / "acme-challenge"
    assert challenge_dir.is_dir() and list(challenge_dir.iterdir()) == []  # cleaned up


HOOK = """
import json, os, sys, urllib.request
mgmt, action, log = sys.argv[1], sys.argv[2], sys.argv[3]
host, value = os.environ["CERTCTL_ACME_RECORD"], os.environ["CERTCTL_ACME_VALUE"]
if action == "add":
    body, path = {"host": host, "value": value}, "/set-txt"
elif action == "clear":
    body, path = {"host": host}, "/clear-txt"
else:
    body = path = None
if path:
    req = urllib.request.Request(mgmt + path, data=json.dumps(body).encode(), method="POST")
    urllib.request.urlopen(req, timeout=10).read()
with open(log, "a") as fh:
    fh.write(f"{action} {host} {os.environ['CERTCTL_ACME_DOMAIN']} {value}\\n")
"""


def dns_hook_config(peb: Pebble, tmp_path: Path, add: str = "add") -> dict[str, Any]:
    script = tmp_path / "hook.py"
    script.write_text(HOOK, encoding="utf-8")
    log = str(tmp_path / "hook.log")
    argv = [sys.executable, str(script), peb.challtest_mgmt]
    return http01(
        peb,
        challenge={
            "type": "dns-01",
            "hook": {"add": [*argv, add, log], "remove": [*argv, "clear", log]},
        },
    )


def test_dns01_hook_with_wildcard_through_challtestsrv(pebble: Pebble, tmp_path: Path) -> None:
    issuer = AcmeIssuer("acme", dns_hook_config(pebble, tmp_path), ctx(tmp_path))
    req = request(("*.wild.example.org", "wild.example.org"))
    issued = run(issuer.issue(req, run(issuer.prepare(req))))
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert sorted(pki.sans(leaf)) == ["*.wild.example.org", "wild.example.org"]
    lines = (tmp_path / "hook.log").read_text().splitlines()
    adds = [ln for ln in lines if ln.startswith("add ")]
    clears = [ln for ln in lines if ln.startswith("clear ")]
    assert len(adds) == 2 and len(clears) == 2  # both authorizations, both cleaned up
    assert all(" _acme-challenge.wild.example.org. wild.example.org " in ln for ln in adds)


def test_dns01_failed_validation_is_permanent_and_cleans_up(pebble: Pebble, tmp_path: Path) -> None:
    # the "add" hook publishes nothing: Pebble's VA finds no TXT record
    issuer = AcmeIssuer("acme", dns_hook_config(pebble, tmp_path, add="noop"), ctx(tmp_path))
    req = request(("nodns.example.org",))
    with pytest.raises(PermanentError) as err:
        run(issuer.issue(req, run(issuer.prepare(req))))
    assert "invalid" in str(err.value) and "nodns.example.org" in str(err.value)
    lines = (tmp_path / "hook.log").read_text().splitlines()
    assert [ln.split()[0] for ln in lines] == ["noop", "clear"]


def test_http01_responder_is_closed_after_issuance(pebble: Pebble, tmp_path: Path) -> None:
    issuer = AcmeIssuer("acme", http01(pebble), ctx(tmp_path))
    req = request(("closed.example.com",))
    run(issuer.issue(req, run(issuer.prepare(req))))
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", pebble.http_port), 1):
        pass


def test_eab_registration_and_missing_eab(tmp_path: Path) -> None:
    peb = start_pebble(eab=True, always_valid=True)
    try:
        cfg = http01(peb)
        without = AcmeIssuer("acme", cfg, ctx(tmp_path))
        req = request(("eab.example.com",))
        with pytest.raises(PermanentError, match="external account binding"):
            run(without.prepare(req))
        cfg["eab"] = {"kid": EAB_KID, "hmac": EAB_HMAC}
        issuer = AcmeIssuer("acme", cfg, ctx(tmp_path))
        issued = run(issuer.issue(req, run(issuer.prepare(req))))
        assert issued.serial
        assert EAB_KID in peb.log()  # "Successful newAccount Binding ... kid"
        cfg["eab"] = {"kid": EAB_KID, "hmac": EAB_HMAC[:-4] + "AAAA"}
        wrong = AcmeIssuer("acme", cfg, ctx(tmp_path))
        with pytest.raises(PermanentError) as e:
            run(wrong.prepare(request(("eab2.example.com",))))
        assert EAB_HMAC[:-4] not in str(e.value)
    finally:
        peb.stop()


# ------------------------------------------------------- through the engine

INV = """
defaults: {{issuer: pebble, profile: tls, ttl: 30d, key: {{type: ecdsa, curve: P-256}}}}
issuers:
  pebble:
    type: acme
    directory: {directory}
    ca_bundle: {ca_bundle}
    email: ops@example.com
    terms_of_service_agreed: true
    timeout_s: {timeout}
    challenge: {{type: http-01, responder: {{listen: "127.0.0.1:{port}"}}}}
  local: {{type: local_ca, root: {{common_name: Local Root}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 3650d}}
targets:
  files:
    type: file
    root: out
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
certificates:
{certs}
"""


def write_inventory(
    tmp_path: Path,
    peb: Pebble,
    names: list[str],
    *,
    directory: str | None = None,
    timeout: float = 30,
    extra: str = "",
) -> Path:
    inv = tmp_path / "inv"
    inv.mkdir(exist_ok=True)
    certs = "".join(f"  {n}: {{common_name: {n}.example.com, targets: [files]}}\n" for n in names)
    (inv / "inv.yaml").write_text(
        INV.format(
            directory=directory or peb.directory,
            ca_bundle=peb.ca_bundle,
            port=peb.http_port,
            timeout=timeout,
            certs=certs + extra,
        ),
        encoding="utf-8",
    )
    return inv


def test_apply_issues_deploys_and_is_then_clean(pebble: Pebble, tmp_path: Path) -> None:
    inv = write_inventory(tmp_path, pebble, [f"app{i}" for i in range(6)])
    eng = Engine(inventory_path=inv)
    try:
        plan, report = eng.apply()
        assert report is not None and not report.failed, report.failed
        assert plan.counts()["issue"] == 6
        for i in range(6):
            leaf = x509.load_pem_x509_certificate((inv / "out" / f"app{i}.pem").read_bytes())
            assert pki.sans(leaf) == [f"app{i}.example.com"]
            assert (inv / "out" / f"app{i}.key").stat().st_mode & 0o777 == 0o600
        again, _ = eng.plan()
        assert again.actions == ()
    finally:
        eng.close()


CLI_ENV = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}


def cli(
    inv: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(inv), *args],
        capture_output=True,
        text=True,
        env={**CLI_ENV, **(env or {})},
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def open_order_urls(inv: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(inv / ".certctl" / "state.db")) as db:
        rows = db.execute(
            "SELECT cert, payload FROM journal WHERE closed_at IS NULL AND action = 'issue'"
        ).fetchall()
    return {cert: json.loads(payload)["order_url"] for cert, payload in rows}


# Killed after the order URL is journaled (before any challenge is answered), or after
# the CA issued (order valid) but before the version was recorded. Sequential apply
# (--concurrency 1) so the kill never strands a challenge mid-validation: a responder
# that dies while the CA validates fails that order, which is then reported, not retried.
@pytest.mark.parametrize("failpoint", ["after_issue_intent=2", "after_issue=2"])
def test_sigkill_mid_order_then_rerun_finalizes_each_order_once(
    pebble: Pebble, tmp_path: Path, failpoint: str
) -> None:
    names = [f"crash{i}" for i in range(4)]
    inv = write_inventory(tmp_path, pebble, names)
    before = set(pebble.issued_orders())
    r = cli(
        inv,
        "apply",
        "--auto-approve",
        "--concurrency",
        "1",
        env={"CERTCTL_FAILPOINTS": failpoint},
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    journaled = open_order_urls(inv)
    assert len(journaled) == 1, journaled  # the order URL was recorded before finalize
    r = cli(inv, "apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    new_orders = [o for o in pebble.issued_orders() if o not in before]
    # exactly one finalized order per certificate, and the killed one is the journaled
    # order itself (resumed, or its certificate downloaded again), not a new order
    assert len(new_orders) == len(names) == len(set(new_orders)), new_orders
    (url,) = journaled.values()
    assert url.rsplit("/", 1)[1] in new_orders
    r = cli(inv, "plan", "--detailed-exitcode")
    assert r.returncode == 0, r.stdout
    for n in names:
        leaf = x509.load_pem_x509_certificate((inv / "out" / f"{n}.pem").read_bytes())
        assert pki.sans(leaf) == [f"{n}.example.com"]


# ----------------------------------------------------------- fault proxy


class FaultProxy:
    """FAULT PROXY (a stand-in CA front): TLS in front of the real Pebble.

    Requests pass through unchanged (Host kept, so Pebble builds URLs that point back
    at the proxy and the JWS ``url`` checks hold) unless a rule matches: each rule is
    (path fragment, remaining count, action). Actions: ``500``, ``503`` (Retry-After 1),
    ``429`` (rateLimited problem, Retry-After 3600), ``drop`` (close without answer),
    ``slow`` (answer after 3 s), and certificate rewrites ``other_key``,
    ``extra_name`` and ``huge`` (a 20 MB body).
    """

    def __init__(self, peb: Pebble) -> None:
        self.peb = peb
        self.upstream = peb.directory.rsplit("/dir", 1)[0]
        self.port = free_port()
        self.rules: list[list[Any]] = []
        self.fired: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def rule(self, fragment: str, action: str, count: int = 1) -> None:
        self.rules.append([fragment, count, action])

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        work = self.peb.workdir
        sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        sctx.load_cert_chain(work / "cert.pem", work / "key.pem")
        self.client = httpx.AsyncClient(
            verify=ssl.create_default_context(cafile=self.peb.ca_bundle)
        )
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=sctx)
        self._ready.set()
        await self._stop.wait()
        server.close()
        await self.client.aclose()

    def _match(self, path: str) -> str | None:
        for r in self.rules:
            if r[0] in path and r[1] > 0:
                r[1] -= 1
                self.fired.append(f"{r[2]} {r[0]}")
                return str(r[2])
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for ln in lines[1:]:
                    if ":" in ln:
                        k, v = ln.split(":", 1)
                        headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                action = self._match(path)
                if action == "drop":
                    return
                if action in ("500", "503", "429"):
                    await self._problem(writer, int(action))
                    continue
                if action == "slow":
                    await asyncio.sleep(3)
                fwd = {
                    k: v
                    for k, v in headers.items()
                    if k in ("content-type", "user-agent", "accept", "host")
                }
                resp = await self.client.request(
                    method, self.upstream + path, content=body, headers=fwd
                )
                content = resp.content
                if action in ("other_key", "extra_name", "huge"):
                    content = self._hostile(action, content)
                out = [f"HTTP/1.1 {resp.status_code} X"]
                for k, v in resp.headers.multi_items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        out.append(f"{k}: {v}")
                out.append(f"Content-Length: {len(content)}")
                writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + content)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.transport.abort()  # no TLS close_notify wait: the test is over

    async def _problem(self, writer: asyncio.StreamWriter, status: int) -> None:
        kind = {429: "rateLimited", 500: "serverInternal", 503: "serverInternal"}[status]
        body = json.dumps(
            {"type": f"urn:ietf:params:acme:error:{kind}", "detail": "injected by the fault proxy"}
        ).encode()
        extra = {429: "Retry-After: 3600\r\n", 503: "Retry-After: 1\r\n"}.get(status, "")
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/problem+json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()

    @staticmethod
    def _hostile(action: str, pem: bytes) -> bytes:
        if action == "huge":
            return b"A" * (20 * 1024 * 1024)
        real = x509.load_pem_x509_certificate(pem)
        names = [x509.DNSName(n) for n in pki.sans(real)]
        pub = real.public_key()
        if action == "other_key":
            pub = ec.generate_private_key(ec.SECP256R1()).public_key()
        else:
            names.append(x509.DNSName("evil.example.org"))
        ca_key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        forged = (
            x509.CertificateBuilder()
            .subject_name(real.subject)
            .issuer_name(real.issuer)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        return pki.cert_pem(forged) + pem.split(b"-----END CERTIFICATE-----\n", 1)[1]


def test_fault_proxy_transient_faults_are_retried_within_the_run(
    pebble: Pebble, tmp_path: Path
) -> None:
    with FaultProxy(pebble) as proxy:
        proxy.rule("/order-plz", "500")
        proxy.rule("/authZ/", "drop")
        proxy.rule("/finalize-order/", "503")
        proxy.rule("/certZ/", "slow")
        inv = write_inventory(tmp_path, pebble, ["flaky"], directory=proxy.directory, timeout=1.5)
        eng = Engine(inventory_path=inv)
        try:
            _, report = eng.apply()
        finally:
            eng.close()
        assert report is not None and not report.failed, report.failed
        assert sorted(proxy.fired) == sorted(
            ["500 /order-plz", "drop /authZ/", "503 /finalize-order/", "slow /certZ/"]
        )
    assert (inv / "out" / "flaky.pem").exists()


def test_fault_proxy_rate_limit_blocks_only_that_issuer_and_backs_off(
    pebble: Pebble, tmp_path: Path
) -> None:
    with FaultProxy(pebble) as proxy:
        proxy.rule("/order-plz", "429", count=100)
        extra = "  other: {common_name: other.example.com, issuer: local, targets: [files]}\n"
        inv = write_inventory(tmp_path, pebble, ["limited"], directory=proxy.directory, extra=extra)
        eng = Engine(inventory_path=inv)
        try:
            _, report = eng.apply(settings=ApplySettings(max_retry_delay_s=0.05))
            assert report is not None
            failed = {r.action.cert: r.error for r in report.failed if r.action.kind == "issue"}
            assert set(failed) == {"limited"}, failed
            assert "rate limited" in str(failed["limited"])
            assert (inv / "out" / "other.pem").exists()
            plan, _ = eng.plan()
            held = plan.skipped.get("limited", "")
            assert held.startswith("blocked until "), held
            until = dt.datetime.fromisoformat(held.split()[2])
            assert until - dt.datetime.now(dt.UTC) > dt.timedelta(minutes=59)
        finally:
            eng.close()
        # the issuer asked once per executor attempt, then stopped asking while blocked
        assert 1 <= len(proxy.fired) <= 3, proxy.fired


@pytest.mark.parametrize("action", ["other_key", "extra_name", "huge"])
def test_fault_proxy_hostile_certificate_is_rejected_and_nothing_written(
    pebble: Pebble, tmp_path: Path, action: str
) -> None:
    with FaultProxy(pebble) as proxy:
        proxy.rule("/certZ/", action, count=100)
        inv = write_inventory(tmp_path, pebble, ["victim"], directory=proxy.directory)
        eng = Engine(inventory_path=inv)
        try:
            _, report = eng.apply()
            assert report is not None
            errors = [r.error or "" for r in report.failed]
            assert errors and all("victim" in r.action.cert for r in report.failed)
            expected = {
                "other_key": "another key",
                "extra_name": "names differ",
                "huge": "larger than",
            }[action]
            assert expected in errors[0], errors
            assert not (inv / "out" / "victim.pem").exists()
            assert not (inv / "out" / "victim.key").exists()
            record = eng.store().snapshot().certs.get("victim")
            assert record is None or record.current is None
        finally:
            eng.close()


def test_transient_and_permanent_errors_keep_their_types(pebble: Pebble, tmp_path: Path) -> None:
    cfg = http01(pebble)
    cfg["directory"] = f"https://127.0.0.1:{free_port()}/dir"  # nothing listens there
    down = AcmeIssuer("acme", cfg, ctx(tmp_path))
    with pytest.raises(TransientError, match="connection failed"):
        run(down.prepare(request(("down.example.com",))))
    issuer = AcmeIssuer("acme", http01(pebble), ctx(tmp_path))
    with pytest.raises(PermanentError, match=r"rejectedIdentifier|malformed"):
        run(issuer.prepare(request(("bad_name..example.com",))))

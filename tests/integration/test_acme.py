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
import dataclasses
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
from tests.integration.acme_support import (
    EAB_HMAC,
    EAB_KID,
    Bind,
    Pebble,
    free_port,
    start_bind,
    start_pebble,
)

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


@pytest.fixture(scope="module")
def bind_pebble() -> Iterator[tuple[Bind, Pebble]]:
    """A real BIND 9 (dynamic zone, TSIG) and a Pebble whose VA resolves through it."""
    bind = start_bind()
    try:
        peb = start_pebble(dns_server=f"127.0.0.1:{bind.port}")
        try:
            yield bind, peb
        finally:
            peb.stop()
    finally:
        bind.stop()


def rfc2136_config(bind: Bind, peb: Pebble, secret: str | None = None) -> dict[str, Any]:
    return http01(
        peb,
        challenge={
            "type": "dns-01",
            "rfc2136": {
                "server": "127.0.0.1",
                "port": bind.port,
                "tsig_key": {"name": bind.key_name, "secret": secret or bind.secret},
            },
        },
    )


def txt_records(bind: Bind, name: str) -> list[str]:
    import dns.message
    import dns.query
    import dns.rdatatype

    resp = dns.query.tcp(dns.message.make_query(name, "TXT"), "127.0.0.1", port=bind.port)
    return [
        b"".join(r.strings).decode()
        for rrset in resp.answer
        if rrset.rdtype == dns.rdatatype.TXT
        for r in rrset
    ]


def test_dns01_rfc2136_tsig_wildcard_validated_through_real_bind(
    bind_pebble: tuple[Bind, Pebble], tmp_path: Path
) -> None:
    bind, peb = bind_pebble
    issuer = AcmeIssuer("acme", rfc2136_config(bind, peb), ctx(tmp_path))
    names = (f"*.wild.{bind.zone}", f"wild.{bind.zone}")
    req = request(names)
    issued = run(issuer.issue(req, run(issuer.prepare(req))))
    leaf = x509.load_pem_x509_certificate(issued.cert_pem)
    assert sorted(pki.sans(leaf)) == sorted(names)
    # both authorizations' TXT values went to named through signed dynamic updates...
    log = bind.log()
    record = f"_acme-challenge.wild.{bind.zone}"
    assert log.count(f"adding an RR at '{record}' TXT") == 2, log[-2000:]
    assert f'signer "{bind.key_name.rstrip(".")}" approved' in log
    # ...and were deleted again afterwards
    assert log.count(f"deleting an RR at {record} TXT") == 2, log[-2000:]
    assert txt_records(bind, record + ".") == []
    assert bind.secret not in log


def test_dns01_rfc2136_wrong_tsig_secret_is_a_clear_permanent_error(
    bind_pebble: tuple[Bind, Pebble], tmp_path: Path
) -> None:
    import base64

    bind, peb = bind_pebble
    wrong = base64.b64encode(os.urandom(32)).decode()
    issuer = AcmeIssuer("acme", rfc2136_config(bind, peb, secret=wrong), ctx(tmp_path))
    req = request((f"badkey.{bind.zone}",))
    with pytest.raises(PermanentError) as err:
        run(issuer.issue(req, run(issuer.prepare(req))))
    text = f"{err.value} {err.value!r} {err.value.__cause__!r} {err.value.__context__!r}"
    assert "TSIG signature" in text and bind.key_name in text, text
    assert wrong not in text and bind.secret not in text
    assert txt_records(bind, f"_acme-challenge.badkey.{bind.zone}.") == []


def test_resumed_invalid_order_is_replaced_once_through_the_journal_callback(
    pebble: Pebble, tmp_path: Path
) -> None:
    vault = conformance.StandInVault()  # one state: the same account in every "run"
    # run 1: the hook publishes nothing, validation fails, the order is invalid
    first = AcmeIssuer("acme", dns_hook_config(pebble, tmp_path, add="noop"), ctx(tmp_path, vault))
    req = request(("replace.example.org",))
    payload = run(first.prepare(req))
    with pytest.raises(PermanentError):
        run(first.issue(req, payload))
    assert first.stats["replaced"] == 0  # an order of this run is never replaced
    # run 2, issuer unchanged and no journal callback: no unjournaled order is made
    second = AcmeIssuer("acme", dns_hook_config(pebble, tmp_path, add="noop"), ctx(tmp_path, vault))
    with pytest.raises(PermanentError, match="journaled order is invalid"):
        run(second.issue(req, payload))
    assert second.stats["orders_created"] == 0
    # run 2 again with the callback: one replacement, journaled before it is finished;
    # it fails too (the hook still publishes nothing) and is not replaced again
    journaled: list[dict[str, Any]] = []

    async def journal(p: Any) -> None:
        journaled.append(dict(p))

    jreq = dataclasses.replace(req, journal=journal)
    with pytest.raises(PermanentError, match="invalid"):
        run(second.issue(jreq, payload))
    assert len(journaled) == 1 and second.stats["replaced"] == 1
    # run 3, the hook fixed: the (again invalid) journaled order is replaced and issued
    third = AcmeIssuer("acme", dns_hook_config(pebble, tmp_path), ctx(tmp_path, vault))
    issued = run(third.issue(jreq, journaled[0]))
    assert len(journaled) == 2 and journaled[1]["order_url"] not in (
        journaled[0]["order_url"],
        payload["order_url"],
    )
    assert third.stats == {"orders_created": 1, "finalized": 1, "resumed": 1, "replaced": 1}
    assert pki.sans(x509.load_pem_x509_certificate(issued.cert_pem)) == ["replace.example.org"]


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
# (--concurrency 1) so the kill never strands a challenge mid-validation (that case,
# where the order is lost and replaced, has its own test below).
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


def journal_rows(inv: Path, cert: str) -> list[tuple[str, str | None]]:
    with contextlib.closing(sqlite3.connect(inv / ".certctl" / "state.db")) as db:
        rows = db.execute(
            "SELECT payload, outcome FROM journal WHERE cert = ? AND action = 'issue' "
            "ORDER BY created_at",
            (cert,),
        ).fetchall()
    return [(json.loads(p)["order_url"], o) for p, o in rows]


def wait_for_log(peb: Pebble, needle: str) -> None:
    """Wait (bounded) until Pebble logged ``needle``: its VA works asynchronously."""
    import time

    deadline = time.monotonic() + 30
    while needle not in peb.log():
        assert time.monotonic() < deadline, f"Pebble never logged {needle!r}"
        time.sleep(0.05)


def test_sigkill_during_validation_then_rerun_replaces_the_lost_order(
    pebble: Pebble, tmp_path: Path
) -> None:
    # The process dies while Pebble's VA is fetching the http-01 answer from certctl's
    # responder: the VA sees the connection reset and the journaled order turns
    # invalid. The next run must not back off: it replaces the order (journaling the
    # new URL before finalize) and installs the certificate.
    names = ["lost0", "lost1"]
    inv = write_inventory(tmp_path, pebble, names)
    before = set(pebble.issued_orders())
    r = cli(
        inv,
        "apply",
        "--auto-approve",
        "--concurrency",
        "1",
        env={"CERTCTL_FAILPOINTS": "acme_responder_request=1"},
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    journaled = open_order_urls(inv)
    assert len(journaled) == 1, journaled
    ((killed_cert, killed_url),) = journaled.items()
    killed_id = killed_url.rsplit("/", 1)[1]
    # the VA's failure is asynchronous: let it land, so the rerun finds the order invalid
    wait_for_log(pebble, f"order {killed_id} set INVALID")
    r = cli(inv, "apply", "--auto-approve")
    assert r.returncode == 0, r.stdout + r.stderr
    new_orders = [o for o in pebble.issued_orders() if o not in before]
    assert len(new_orders) == len(names) == len(set(new_orders)), new_orders
    assert killed_id not in new_orders  # the lost order was never finalized
    rows = journal_rows(inv, killed_cert)
    # the lost order's intent was closed as replaced; the replacement (journaled
    # before finalize) is the order that was finalized, and it was closed as issued
    assert [o for _, o in rows] == ["replaced", "issued"], rows
    assert rows[0][0] == killed_url
    assert rows[1][0].rsplit("/", 1)[1] in new_orders
    r = cli(inv, "plan", "--detailed-exitcode")
    assert r.returncode == 0, r.stdout
    for n in names:
        leaf = x509.load_pem_x509_certificate((inv / "out" / f"{n}.pem").read_bytes())
        assert pki.sans(leaf) == [f"{n}.example.com"]
        key = (inv / "out" / f"{n}.key").read_bytes()
        assert pki.keys_match(pki.load_key_pem(key), leaf.public_key())


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
                local = self._local(method, path, body)
                if local is not None:
                    status, extra_headers, content = local
                    head_lines = [f"HTTP/1.1 {status} X", *extra_headers]
                    head_lines.append(f"Content-Length: {len(content)}")
                    writer.write(("\r\n".join(head_lines) + "\r\n\r\n").encode() + content)
                    await writer.drain()
                    continue
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
                content = self._rewrite(path, resp.content)
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

    def _local(self, method: str, path: str, body: bytes) -> tuple[int, list[str], bytes] | None:
        """An answer given here instead of Pebble's (none in the fault proxy)."""
        return None

    def _rewrite(self, path: str, content: bytes) -> bytes:
        return content

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


class AriStub(FaultProxy):
    """STUB ARI SERVER: Debian's Pebble 2.4 serves no ``renewalInfo`` (RFC 9773), so
    this stand-in in front of the real Pebble adds it to the directory and answers
    ``GET /renewal-info/<cert id>`` itself with the windows a test sets (and a
    Retry-After). Everything else, newOrder included, goes to Pebble unchanged; the
    JWS payloads of newOrder requests are kept so a test can read ``replaces``."""

    def __init__(self, peb: Pebble) -> None:
        super().__init__(peb)
        self.windows: dict[str, tuple[dt.datetime, dt.datetime]] = {}
        self.default: tuple[dt.datetime, dt.datetime] | None = None
        self.retry_after = 3600
        self.asked: list[str] = []
        self.new_orders: list[dict[str, Any]] = []

    def _local(self, method: str, path: str, body: bytes) -> tuple[int, list[str], bytes] | None:
        if path.startswith("/order-plz") and body:
            import base64

            jws = json.loads(body)
            pad = "=" * (-len(jws["payload"]) % 4)
            self.new_orders.append(json.loads(base64.urlsafe_b64decode(jws["payload"] + pad)))
            return None
        if not path.startswith("/renewal-info/") or method != "GET":
            return None
        cert_id = path.rsplit("/", 1)[1]
        self.asked.append(cert_id)
        window = self.windows.get(cert_id, self.default)
        if window is None:
            return 404, ["Content-Type: application/problem+json"], b'{"type": "notFound"}'
        doc = {"suggestedWindow": {"start": window[0].isoformat(), "end": window[1].isoformat()}}
        return (
            200,
            ["Content-Type: application/json", f"Retry-After: {self.retry_after}"],
            json.dumps(doc).encode(),
        )

    def _rewrite(self, path: str, content: bytes) -> bytes:
        if path != "/dir":
            return content
        doc = json.loads(content)
        doc["renewalInfo"] = f"https://127.0.0.1:{self.port}/renewal-info"
        return json.dumps(doc).encode()


def test_ari_against_stub_ari_server_renews_inside_window_with_replaces(
    pebble: Pebble, tmp_path: Path
) -> None:
    from acme.client import _renewal_info_path_component  # the library's own encoding

    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    with AriStub(pebble) as stub:
        stub.default = (now + dt.timedelta(days=20), now + dt.timedelta(days=21))
        inv = write_inventory(tmp_path, pebble, ["ari0", "ari1"], directory=stub.directory)
        eng = Engine(inventory_path=inv)
        try:
            _, report = eng.apply()
            assert report is not None and not report.failed, report.failed
            assert all("replaces" not in o for o in stub.new_orders)  # first issuance
            leaf = x509.load_pem_x509_certificate((inv / "out" / "ari0.pem").read_bytes())
            old_id = _renewal_info_path_component(leaf)
            # the CA moves ari0's window into the past (say, a revocation incident)
            stub.windows[old_id] = (now - dt.timedelta(hours=2), now - dt.timedelta(hours=1))
            plan, observed = eng.plan()
            assert len(stub.asked) == 2 and old_id in stub.asked  # one GET per certificate
            assert set(observed.renewal_windows) == {"ari0", "ari1"}
            renew = [a for a in plan.actions if a.kind.value == "renew"]
            assert [a.cert for a in renew] == ["ari0"]
            (reason,) = renew[0].reasons
            assert reason.code == "ari_window"
            assert reason.message.startswith("ARI suggests renewal between ")
            # cached in the state until the stub's Retry-After: planning again asks nothing
            eng.plan()
            assert len(stub.asked) == 2
            stub.new_orders.clear()
            _, report = eng.apply()
            assert report is not None and not report.failed, report.failed
            # every newOrder request carried it (a badNonce retry is recorded twice)
            assert stub.new_orders and {o.get("replaces") for o in stub.new_orders} == {old_id}
            new_leaf = x509.load_pem_x509_certificate((inv / "out" / "ari0.pem").read_bytes())
            assert new_leaf.serial_number != leaf.serial_number
            again, _ = eng.plan()  # the new certificate's window is in the future
            assert again.actions == ()
        finally:
            eng.close()


def test_ari_stub_server_windows_are_cached_until_retry_after(
    pebble: Pebble, tmp_path: Path
) -> None:
    from certctl.model import VersionRecord

    with AriStub(pebble) as stub:
        clock = conformance.FixedClock(dt.datetime.now(dt.UTC))
        vault = conformance.StandInVault()
        c = ConnectorContext(tmp_path, clock, vault, BatchSyncer("none"))
        issuer = AcmeIssuer("acme", http01(pebble, directory=stub.directory), c)
        req = request(("ari-cache.example.com",))
        issued = run(issuer.issue(req, run(issuer.prepare(req))))
        v = VersionRecord(
            "ari-cache", 1, issued.serial, issued.not_before, issued.not_after,
            issued.fingerprint, "acme", "k", ("ari-cache.example.com",), "p",
        )  # fmt: skip
        start = clock.now + dt.timedelta(days=3)
        stub.default = (start, start + dt.timedelta(days=1))
        stub.retry_after = 600
        assert issuer.renewal_window(v) == stub.default
        assert issuer.renewal_window(v) == stub.default
        assert len(stub.asked) == 1  # the second answer came from the vault
        assert json.loads(vault.data[("acme", f"ari/{issued.serial}")])
        clock.advance(seconds=599)
        stub.default = None  # the CA now answers 404
        assert issuer.renewal_window(v) == (start, start + dt.timedelta(days=1))
        clock.advance(seconds=2)
        assert issuer.renewal_window(v) is None  # asked again: no window, no exception
        assert len(stub.asked) == 2
        # never asked about an expired certificate; another issuer's version is skipped
        clock.now = issued.not_after + dt.timedelta(seconds=1)
        assert issuer.renewal_window(v) is None
        assert issuer.renewal_windows([dataclasses.replace(v, issuer="other")]) == {}
        assert len(stub.asked) == 2


class ProfileStub(AriStub):
    """STUB PROFILES DIRECTORY: Debian's Pebble 2.4 lists no ACME profiles
    (``meta.profiles``, draft-aaron-acme-profiles), so this stand-in in front of the
    real Pebble adds the ``profiles`` it is given to the directory's ``meta`` (None:
    Pebble's own directory, which lists none, is passed through). newOrder payloads are
    recorded (see :class:`AriStub`) and forwarded unchanged to Pebble, which ignores
    the ``profile`` member it does not know (Go's JSON decoding drops unknown fields)
    and issues its usual certificate; nothing has to be stripped, which would break the
    JWS signature anyway. Every request's method and path is kept in ``requests``."""

    def __init__(self, peb: Pebble, profiles: dict[str, str] | None) -> None:
        super().__init__(peb)
        self.profiles = profiles
        self.requests: list[str] = []

    def _local(self, method: str, path: str, body: bytes) -> tuple[int, list[str], bytes] | None:
        self.requests.append(f"{method} {path}")
        return super()._local(method, path, body)

    def _rewrite(self, path: str, content: bytes) -> bytes:
        if path != "/dir" or self.profiles is None:
            return content
        doc = json.loads(content)
        doc.setdefault("meta", {})["profiles"] = self.profiles
        return json.dumps(doc).encode()


STUB_PROFILES = {
    "shortlived": "https://ca.example/docs#shortlived",
    "classic": "https://ca.example/docs#classic",
}


def test_profile_stub_directory_profile_is_sent_in_new_order_and_cert_stored(
    pebble: Pebble, tmp_path: Path
) -> None:
    with ProfileStub(pebble, STUB_PROFILES) as stub:
        inv = write_inventory(tmp_path, pebble, ["prof0", "prof1"], directory=stub.directory)
        path = inv / "inv.yaml"
        text = path.read_text(encoding="utf-8")
        anchor = "    terms_of_service_agreed: true\n"
        path.write_text(text.replace(anchor, anchor + "    profile: shortlived\n"), "utf-8")
        eng = Engine(inventory_path=inv)
        try:
            _, report = eng.apply()
            assert report is not None and not report.failed, report.failed
            # every newOrder carried the profile (a badNonce retry is recorded twice)
            assert len(stub.new_orders) >= 2
            assert {o.get("profile") for o in stub.new_orders} == {"shortlived"}
            ordered = {i["value"] for o in stub.new_orders for i in o["identifiers"]}
            assert ordered == {"prof0.example.com", "prof1.example.com"}
            snap = eng.store().snapshot()
            for n in ("prof0", "prof1"):
                leaf = x509.load_pem_x509_certificate((inv / "out" / f"{n}.pem").read_bytes())
                assert pki.sans(leaf) == [f"{n}.example.com"]
                current = snap.certs[n].current
                assert current is not None
                assert current.serial == pki.serial_hex(leaf.serial_number)
            again, _ = eng.plan()
            assert again.actions == ()
        finally:
            eng.close()


def test_profile_stub_directory_unlisted_profile_fails_before_any_order(
    pebble: Pebble, tmp_path: Path
) -> None:
    with ProfileStub(pebble, STUB_PROFILES) as stub:
        vault = conformance.StandInVault()
        cfg = http01(pebble, directory=stub.directory, profile="tlsserver")
        issuer = AcmeIssuer("acme", cfg, ctx(tmp_path, vault))
        with pytest.raises(PermanentError) as err:
            run(issuer.prepare(request(("unlisted.example.com",))))
        msg = str(err.value)
        assert "'tlsserver'" in msg and "offers: classic, shortlived" in msg, msg
        assert msg.startswith("issuer acme: "), msg
        # refused after reading the directory, before any account or order request
        assert stub.requests == ["GET /dir"], stub.requests
        assert stub.new_orders == [] and issuer.stats["orders_created"] == 0
        assert ("acme", "account/url") not in vault.data


def test_profile_stub_ca_listing_no_profiles_refuses_a_configured_profile(
    pebble: Pebble, tmp_path: Path
) -> None:
    # The stub passes Pebble's own directory through: Debian's Pebble lists no profiles.
    # Sending the profile anyway would get the CA's default certificate, silently not
    # what was configured, so certctl refuses with an error that says why.
    with ProfileStub(pebble, None) as stub:
        vault = conformance.StandInVault()
        cfg = http01(pebble, directory=stub.directory, profile="shortlived")
        issuer = AcmeIssuer("acme", cfg, ctx(tmp_path, vault))
        req = request(("noprofiles.example.com",))
        with pytest.raises(PermanentError) as err:
            run(issuer.prepare(req))
        msg = str(err.value)
        assert "'shortlived'" in msg and "lists no profiles" in msg, msg
        assert stub.requests == ["GET /dir"], stub.requests
        assert stub.new_orders == [] and issuer.stats["orders_created"] == 0
        assert ("acme", "account/url") not in vault.data
        # without a profile the same CA issues normally, and newOrder carries none
        plain = AcmeIssuer("acme", http01(pebble, directory=stub.directory), ctx(tmp_path))
        issued = run(plain.issue(req, run(plain.prepare(req))))
        assert issued.serial
        assert stub.new_orders and all("profile" not in o for o in stub.new_orders)


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

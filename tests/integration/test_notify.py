"""Notifications end to end: certificates issued by the real local CA, a real HTTP
receiver (checks the webhook's HMAC, records Slack/Teams/PagerDuty/OpsGenie payloads),
a real SMTP server (aiosmtpd) that requires STARTTLS with a certificate from the local
CA, a fake clock for thresholds and backoff, dedup and dead-letter on both backends."""

from __future__ import annotations

import asyncio
import email
import hashlib
import hmac
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from certctl.cli import cli
from certctl.engine import Engine
from certctl.model import Inventory, Issuer
from certctl.notify import NotifySettings, run_once
from certctl.notify.dispatch import probe_issuers

HOOK_SECRET = "hook-secret-7f3a9c"
PD_KEY = "pd-routing-key-51be"
OG_KEY = "og-api-key-0c2d"
SLACK_TOKEN = "T000/B000/slack-token-99"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """A real HTTP server on loopback recording every POST; ``statuses[path]`` lists
    the status codes to answer with (the last one repeats; default 200)."""

    port: int
    requests: list[Received] = field(default_factory=list)
    statuses: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(0)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.requests.append(Received(self.path, dict(self.headers.items()), body))
                codes = rec.statuses.get(self.path) or [200]
                code = codes.pop(0) if len(codes) > 1 else codes[0]
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "600")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def write_inventory(root: Path, receiver: Receiver, smtp_port: int, extra: str = "") -> Path:
    inv = root / "inv"
    inv.mkdir(exist_ok=True)
    (inv / "og.key").write_text(OG_KEY + "\n", encoding="utf-8")
    (inv / "main.yaml").write_text(
        f"""
issuers:
  ca: {{type: local_ca, root: {{common_name: Notify Test CA}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 90d}}
targets:
  files:
    type: file
    root: out
    fullchain_path: "{{{{ cert.name }}}}/fullchain.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
defaults: {{issuer: ca, profile: tls, ttl: 30d}}
teams:
  sre: {{email: sre@example.test}}
owners:
  web: {{email: web@example.test, team: sre}}
  pager: {{email: oncall@example.test, notify: [pd, og], expiry_warnings: [20]}}
notifiers:
  hook: {{type: webhook, url: "{receiver.url("/hook")}", secret: {{env: CERTCTL_TEST_HOOK}}}}
  chat: {{type: slack, webhook_url: {{env: CERTCTL_TEST_SLACK}}, events: [expiring]}}
  ms: {{type: teams, webhook_url: "{receiver.url("/teams")}"}}
  pd: {{type: pagerduty, url: "{receiver.url("/pd")}", routing_key: {{env: CERTCTL_TEST_PD}}}}
  og: {{type: opsgenie, url: "{receiver.url("/og")}", api_key: {{file: og.key}}}}
  mail:
    type: email
    host: 127.0.0.1
    port: {smtp_port}
    from: certctl@example.test
    ca_file: ca.pem
    events: [expiring]
certificates:
  www: {{common_name: localhost, sans: [127.0.0.1], owner: web, targets: [files]}}
  api: {{common_name: api.example.test, owner: pager, targets: [files]}}
{extra}""",
        encoding="utf-8",
    )
    return inv


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch, receiver: Receiver) -> None:
    monkeypatch.setenv("CERTCTL_TEST_HOOK", HOOK_SECRET)
    monkeypatch.setenv("CERTCTL_TEST_PD", PD_KEY)
    monkeypatch.setenv("CERTCTL_TEST_SLACK", receiver.url(f"/slack/{SLACK_TOKEN}"))


class SmtpHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[list[str], bytes, bool]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((list(envelope.rcpt_tos), envelope.content, session.ssl is not None))
        return "250 OK"


@dataclass
class World:
    inv: Path
    eng: Engine
    receiver: Receiver
    smtp: SmtpHandler
    not_after: dict[str, datetime]


def issue_all(inv: Path, state_url: str | None) -> tuple[Engine, dict[str, datetime]]:
    eng = Engine(inventory_path=inv, state_url=state_url)
    _, report = eng.apply()
    assert report is not None and not report.failed, report
    snap = eng.store().snapshot()
    not_after = {n: r.current.not_after for n, r in snap.certs.items() if r.current}
    return eng, not_after


@pytest.fixture
def world(tmp_path: Path, receiver: Receiver, secrets_env: None) -> Iterator[World]:
    smtp_port = free_port()
    inv = write_inventory(tmp_path, receiver, smtp_port)
    eng, not_after = issue_all(inv, None)
    # the SMTP server's certificate comes from the local CA; the client trusts its root
    ca_cert = eng.issuer("ca").load().cert  # type: ignore[attr-defined]
    (inv / "ca.pem").write_bytes(ca_cert.public_bytes(Encoding.PEM))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(inv / "out/www/fullchain.pem", inv / "out/www/key.pem")
    handler = SmtpHandler()
    controller = Controller(
        handler, hostname="127.0.0.1", port=smtp_port, tls_context=tls, require_starttls=True
    )
    controller.start()
    try:
        yield World(inv, eng, receiver, handler, not_after)
    finally:
        controller.stop()
        eng.close()


FAST = NotifySettings(probe_issuers=False)


def test_expiry_warnings_reach_every_channel_once(world: World) -> None:
    w = world
    now = w.not_after["www"] - timedelta(days=10)
    report = run_once(w.eng, now, settings=FAST)
    assert not report.dead and not report.retrying, (report.dead, report.retrying)
    keys = {(k.split(":")[1], k.split(":")[3], n) for k, n in report.sent}
    # www (owner web, no notify list): every notifier, 14-day threshold (10 days left)
    assert {n for c, t, n in keys if c == "www"} == {"hook", "chat", "ms", "pd", "og", "mail"}
    assert {t for c, t, _ in keys if c == "www"} == {"14"}
    # api (owner pager: notify [pd, og], expiry_warnings [20])
    assert {(t, n) for c, t, n in keys if c == "api"} == {("20", "pd"), ("20", "og")}

    hook = w.receiver.at("/hook")
    assert len(hook) == 1
    expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), hook[0].body, hashlib.sha256).hexdigest()
    assert hook[0].headers["X-Certctl-Signature"] == expected
    doc = hook[0].json()
    assert doc["event"] == "expiring" and doc["cert"] == "www" and doc["threshold_days"] == 14
    assert doc["recipients"] == ["web@example.test", "sre@example.test"]
    assert hook[0].headers["X-Certctl-Delivery"] == doc["key"]

    slack = w.receiver.at(f"/slack/{SLACK_TOKEN}")
    assert len(slack) == 1
    sdoc = slack[0].json()
    assert "www" in sdoc["text"] and sdoc["blocks"][0]["type"] == "header"

    teams = w.receiver.at("/teams")[0].json()
    assert teams["type"] == "message"
    card = teams["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard"

    pds = sorted((r.json() for r in w.receiver.at("/pd")), key=lambda d: d["dedup_key"])
    assert [d["dedup_key"].split(":")[1] for d in pds] == ["api", "www"]
    for d in pds:
        assert d["routing_key"] == PD_KEY and d["event_action"] == "trigger"
        assert set(d["payload"]) >= {"summary", "source", "severity"}
        assert d["payload"]["severity"] in ("info", "warning", "critical")

    ogs = w.receiver.at("/og")
    assert len(ogs) == 2
    assert all(r.headers["Authorization"] == f"GenieKey {OG_KEY}" for r in ogs)
    og = ogs[0].json()
    assert og["alias"].startswith("expiring:") and og["priority"] in ("P1", "P3", "P5")

    assert len(w.smtp.messages) == 1
    rcpts, content, over_tls = w.smtp.messages[0]
    assert over_tls
    assert sorted(rcpts) == ["sre@example.test", "web@example.test"]
    msg = email.message_from_bytes(content)
    assert msg["Subject"].startswith("[certctl] Certificate www expires in")

    # the same pass again: deduplicated, nothing new is sent
    before = len(w.receiver.requests)
    again = run_once(w.eng, now + timedelta(hours=1), settings=FAST)
    assert again.new == 0 and again.sent == []
    assert len(w.receiver.requests) == before and len(w.smtp.messages) == 1

    # 5 days left: the next threshold (7) is a new notification
    later = run_once(w.eng, w.not_after["www"] - timedelta(days=5), settings=FAST)
    assert {k.split(":")[3] for k, _ in later.sent} == {"7"}
    assert len(w.smtp.messages) == 2

    # listed, with no secret anywhere in the output
    runner = CliRunner()
    res = runner.invoke(cli, ["-i", str(w.inv), "notifications", "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert {r["status"] for r in rows} == {"sent"} and len(rows) == 8 + 6
    for secret in (HOOK_SECRET, PD_KEY, OG_KEY, SLACK_TOKEN):
        assert secret not in res.output


def test_dry_run_sends_and_records_nothing(world: World) -> None:
    w = world
    runner = CliRunner()
    res = runner.invoke(cli, ["-i", str(w.inv), "notify", "--dry-run", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["would_send"] == []  # nothing is near expiry today
    now = w.not_after["api"] - timedelta(days=1)
    report = run_once(w.eng, now, dry_run=True, settings=FAST)
    assert {(d.event.cert, d.notifier) for d in report.would_send} >= {("api", "pd")}
    assert w.receiver.requests == [] and w.smtp.messages == []
    assert w.eng.store().list_notifications() == []


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_retry_backoff_and_dead_letter(
    tmp_path: Path,
    receiver: Receiver,
    secrets_env: None,
    backend: str,
    make_pg_db: Callable[[], str],
) -> None:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(
        f"""
issuers:
  ca: {{type: local_ca, root: {{common_name: Dead Letter CA}}}}
targets:
  files:
    type: file
    root: out
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
defaults: {{issuer: ca, ttl: 30d}}
notifiers:
  flaky: {{type: webhook, url: "{receiver.url("/flaky")}"}}
  broken: {{type: webhook, url: "{receiver.url("/broken")}"}}
  limited: {{type: webhook, url: "{receiver.url("/limited")}"}}
certificates:
  www: {{common_name: www.example.test, targets: [files]}}
""",
        encoding="utf-8",
    )
    receiver.statuses = {"/flaky": [500], "/broken": [400], "/limited": [429, 200]}
    eng, not_after = issue_all(inv, make_pg_db() if backend == "postgres" else None)
    try:
        settings = NotifySettings(
            max_attempts=3, backoff_base_s=60, backoff_cap_s=3600, probe_issuers=False
        )
        t0 = not_after["www"] - timedelta(days=10)
        r1 = run_once(eng, t0, settings=settings)
        assert r1.new == 3
        assert [n for _, n, _ in r1.dead] == ["broken"]  # 400: refused, dead at once
        assert "HTTP 400" in r1.dead[0][2]
        assert sorted(n for _, n, _ in r1.retrying) == ["flaky", "limited"]
        store = eng.store()
        pending = {r.notifier: r for r in store.list_notifications(status="pending")}
        assert pending["flaky"].next_attempt_at == t0 + timedelta(seconds=60)
        # 429 with Retry-After: 600 outweighs the 60 s backoff
        assert pending["limited"].next_attempt_at == t0 + timedelta(seconds=600)

        # not due yet: nothing is attempted
        n = len(receiver.requests)
        r2 = run_once(eng, t0 + timedelta(seconds=30), settings=settings)
        assert r2.sent == [] and r2.retrying == [] and len(receiver.requests) == n

        r3 = run_once(eng, t0 + timedelta(seconds=60), settings=settings)
        assert [n for _, n, _ in r3.retrying] == ["flaky"]  # attempt 2 of 3
        pending = {r.notifier: r for r in store.list_notifications(status="pending")}
        assert pending["flaky"].attempts == 2
        assert pending["flaky"].next_attempt_at == t0 + timedelta(seconds=60 + 120)

        r4 = run_once(eng, t0 + timedelta(seconds=600), settings=settings)
        assert [n for _, n, _ in r4.dead] == ["flaky"]  # third attempt: dead-letter
        assert [n for _, n in r4.sent] == ["limited"]

        r5 = run_once(eng, t0 + timedelta(days=1), settings=settings)
        assert r5.sent == [] and r5.dead == [] and r5.new == 0
        assert len(receiver.at("/flaky")) == 3 and len(receiver.at("/broken")) == 1
        dead = {r.notifier: r for r in store.list_notifications(status="dead")}
        assert set(dead) == {"flaky", "broken"}
        assert dead["flaky"].attempts == 3 and "HTTP 500" in (dead["flaky"].last_error or "")
        assert [r.notifier for r in store.list_notifications(status="sent")] == ["limited"]
    finally:
        eng.close()


def test_two_processes_never_send_one_notification_twice(
    tmp_path: Path, receiver: Receiver, secrets_env: None, make_pg_db: Callable[[], str]
) -> None:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(
        f"""
issuers:
  ca: {{type: local_ca, root: {{common_name: Race CA}}}}
targets:
  files:
    type: file
    root: out
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
defaults: {{issuer: ca, ttl: 30d}}
notifiers:
  hook: {{type: webhook, url: "{receiver.url("/hook")}"}}
certificates:
"""
        + "".join(
            f"  c{i}: {{common_name: c{i}.example.test, targets: [files]}}\n" for i in range(20)
        ),
        encoding="utf-8",
    )
    url = make_pg_db()
    eng, not_after = issue_all(inv, url)
    eng.close()
    now = max(not_after.values()) - timedelta(days=1)
    engines = [Engine(inventory_path=inv, state_url=url) for _ in range(3)]
    try:
        threads = [
            threading.Thread(target=run_once, args=(e, now), kwargs={"settings": FAST})
            for e in engines
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for e in engines:
            e.close()
    keys = [r.json()["key"] for r in receiver.at("/hook")]
    assert len(keys) == 20 and len(set(keys)) == 20


def test_failed_deploys_of_the_last_apply_are_notified(
    tmp_path: Path, receiver: Receiver, secrets_env: None
) -> None:
    inv = tmp_path / "inv"
    (inv / "out").mkdir(parents=True)
    (inv / "main.yaml").write_text(
        f"""
issuers:
  ca: {{type: local_ca, root: {{common_name: Failure CA}}}}
targets:
  bad:
    type: file
    root: out
    cert_path: "{{{{ cert.name }}}}/cert.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
defaults: {{issuer: ca, ttl: 30d}}
notifiers:
  hook: {{type: webhook, url: "{receiver.url("/hook")}", events: [failed]}}
certificates:
  www: {{common_name: www.example.test, targets: [bad]}}
""",
        encoding="utf-8",
    )
    eng = Engine(inventory_path=inv)
    try:
        eng.inventory()  # loaded (and checked) while the path was still free...
        (inv / "out" / "www").write_text("a file where a directory must be", encoding="utf-8")
        _, report = eng.apply()  # ...so the deploy itself fails
        assert report is not None and report.failed
        r = run_once(eng, settings=FAST)
        assert [k.split(":")[2:4] for k, _ in r.sent] == [["deploy", "www"]]
        doc = receiver.at("/hook")[0].json()
        assert doc["event"] == "failed" and doc["placement"] == "bad"
        assert run_once(eng, settings=FAST).sent == []  # once per run
    finally:
        eng.close()


def test_an_unreachable_issuer_is_an_event() -> None:
    port = free_port()  # nothing listens there
    inv = Inventory(
        root=Path("."),
        certificates={},
        issuers={
            "gone": Issuer("gone", "acme", {"directory": f"http://127.0.0.1:{port}/dir"}),
            "local": Issuer("local", "local_ca", {}),
        },
        profiles={},
    )
    now = datetime(2026, 1, 1, 12, 0)
    found = asyncio.run(probe_issuers(inv, now, 2.0))
    assert [e.kind for e in found] == ["issuer_unreachable"]
    assert found[0].key == "issuer_unreachable:gone:2026-01-01"
    assert f"127.0.0.1:{port}" in found[0].text

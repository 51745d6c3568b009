"""The agent API under hostile requests, in process (the real application under
uvicorn in a thread, real SQLite state, real local CA). Each test is a defect found in
review or an attack that must keep failing: JSON bombs, replays past the nonce
window, a revoked agent's long poll, deployment claims without the issued
certificate, path tricks, CA:true CSRs and a racing single-use token.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from certctl.agent import protocol as P
from certctl.agent.admin_commands import hash_token
from certctl.agent.service import AgentServerSettings
from certctl.engine import Engine, utcnow
from certctl.server.app import ServerSettings
from certctl.server.build import build_app
from tests.integration.agent_server_support import (
    Agent,
    enqueue,
    enroll,
    serving,
    write_inventory,
)
from tests.integration.test_agent_server import make_csr

FACTS = {"hostname": "h", "os": "linux", "arch": "x86_64", "version": "t", "ip": "1.1.1.1"}
TOKEN = "cctla_" + "h" * 43


@dataclass
class Env:
    client: httpx.Client
    eng: Engine
    port: int
    skew: list[float]  # seconds added to the server's clock
    service: Any = None

    def enroll(self, name: str = "edge1") -> Agent:
        return enroll(self.client, TOKEN, FACTS, name)

    def enqueue(self) -> str:
        return enqueue(self.eng)

    def job_states(self) -> list[str]:
        return [j.state for j in self.eng.store().agent_jobs(certificate="www")]


def _service(app: Any) -> Any:
    """The AgentService behind the mounted routes (to look at its bounded state)."""
    for route in app.routes:
        if getattr(route, "path", "") == P.HEARTBEAT_PATH:
            return route.endpoint.__self__
    raise AssertionError("no agent routes")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    inv = write_inventory(tmp_path, "Hostile CA", "www.hostile.test")
    skew = [0.0]

    def clock() -> datetime:
        return utcnow() + timedelta(seconds=skew[0])

    eng = Engine(inventory_path=inv, clock=clock)
    eng.store().create_agent_token("t", hash_token(TOKEN), expires_at=None, uses=None)
    settings = AgentServerSettings(offline_after=0)
    application, _ = build_app(eng, ServerSettings(), settings)
    with serving(application) as (client, port):
        yield Env(client, eng, port, skew, _service(application))
    eng.close()


def _raw_request(port: int, method: str, target: str, headers: dict[str, str], body: bytes) -> int:
    """Send one HTTP/1.1 request with ``target`` byte for byte (no client-side
    normalisation of ``..``, ``//`` or percent-escapes); the status code."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_json_bombs_are_refused_with_400_not_a_server_error(env: Env) -> None:
    bomb = b"[" * 100_000  # well under the body cap; nests past the parser's recursion limit
    r = env.client.post(P.ENROLL_PATH, content=bomb)  # unauthenticated
    assert r.status_code == 400, r.text
    assert r.json() == {"error": "the body is not JSON"}
    agent = env.enroll()
    path = P.HEARTBEAT_PATH
    r = env.client.post(path, content=bomb, headers=agent.headers("POST", path, bomb))
    assert r.status_code == 400, r.text
    assert agent.send("POST", path, {"facts": FACTS}).status_code == 200  # still serving


def test_a_request_dated_ahead_cannot_be_replayed_after_the_nonce_window(env: Env) -> None:
    agent = env.enroll()
    body = json.dumps({"facts": FACTS}).encode()
    # An agent whose clock runs 250 s fast (within the allowed skew).
    headers = agent.headers("POST", P.HEARTBEAT_PATH, body, at=time.time() + 250)
    assert env.client.post(P.HEARTBEAT_PATH, headers=headers, content=body).status_code == 200
    replay = env.client.post(P.HEARTBEAT_PATH, headers=headers, content=body)
    assert replay.status_code == 401
    # 301 s later by the server's clock the request's time is still within the skew
    # window (51 s off): its nonce must still be remembered.
    env.skew[0] = 301
    replay = env.client.post(P.HEARTBEAT_PATH, headers=headers, content=body)
    assert replay.status_code == 401, replay.text
    assert "replay" in replay.json()["error"]
    # ... and once the time is out of the window, the time check refuses it.
    env.skew[0] = 600
    late = env.client.post(P.HEARTBEAT_PATH, headers=headers, content=body)
    assert late.status_code == 401 and "clock" in late.json()["error"]


def _waiting_poll(env: Env, agent: Agent) -> tuple[threading.Thread, list[httpx.Response]]:
    """``agent``'s long poll for work, started in a thread and waiting on the server;
    its answer is appended to the list."""
    answer: list[httpx.Response] = []
    poll = threading.Thread(
        target=lambda: answer.append(agent.send("GET", f"{P.WORK_PATH}?wait=20", timeout=60))
    )
    poll.start()
    deadline = time.monotonic() + 30
    while agent.id not in env.service._waiters:  # the poll is waiting
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return poll, answer


def test_a_revoked_agents_waiting_long_poll_is_handed_no_job(env: Env) -> None:
    agent = env.enroll()
    poll, answer = _waiting_poll(env, agent)
    assert env.eng.store().revoke_agent("edge1", utcnow())
    deadline = time.monotonic() + 60
    while agent.send("POST", P.HEARTBEAT_PATH, {"facts": FACTS}).status_code != 403:
        assert time.monotonic() < deadline, "the revocation never took effect"
        time.sleep(0.1)
    env.enqueue()  # work routed to the revoked agent's name appears
    poll.join(60)
    assert answer, "the long poll never answered"
    assert answer[0].status_code == 403, answer[0].text  # woken and refused
    assert env.job_states() == ["queued"]  # never leased to the revoked credential
    (jid,) = [j.id for j in env.eng.store().agent_jobs(certificate="www")]
    now = utcnow()  # nor by a server whose cache has not caught up yet
    assert env.eng.store().lease_agent_job(jid, "edge1", now, now + timedelta(seconds=60)) is None


def _leased_job_with_certificate(env: Env) -> tuple[Agent, str, str]:
    agent = env.enroll()
    jid = env.enqueue()
    r = agent.send("GET", f"{P.WORK_PATH}?wait=10")
    assert r.status_code == 200, r.text
    csr, _ = make_csr(["www.hostile.test"])
    r = agent.send("POST", P.csr_path(jid), {"csr": csr})
    assert r.status_code == 200, r.text
    return agent, jid, r.json()["certificate_pem"]


def test_a_deployment_is_only_recorded_for_the_issued_certificate(env: Env) -> None:
    from certctl import pki

    agent, jid, cert_pem = _leased_job_with_certificate(env)
    for fingerprint in (None, "0" * 64):
        claim = {"status": "deployed", "fingerprint": fingerprint, "detail": "", "verify": None}
        r = agent.send("POST", P.result_path(jid), claim)
        assert r.status_code == 400, (fingerprint, r.text)
    assert env.job_states() == ["issued"]
    assert env.eng.store().list_deployments(after=None, limit=10, cert="www") == []
    real = pki.fingerprint(pki.load_cert_pem(cert_pem.encode()))
    claim = {"status": "deployed", "fingerprint": real, "detail": "ok", "verify": None}
    assert agent.send("POST", P.result_path(jid), claim).status_code == 200
    assert env.job_states() == ["deployed"]


def test_path_tricks_never_carry_a_signature_to_another_route(env: Env) -> None:
    agent = env.enroll()
    body = json.dumps({"facts": FACTS}).encode()
    for target in (
        "/agent/v1//heartbeat",
        "/agent/v1/%68eartbeat",
        "/agent/v1/jobs/../heartbeat",
        "/agent/v1/./heartbeat",
        "/agent/v1/heartbeat?x=1",
    ):
        # signed for the canonical path, sent to a variant of it
        headers = agent.headers("POST", P.HEARTBEAT_PATH, body)
        headers["Content-Type"] = "application/json"
        status = _raw_request(env.port, "POST", target, headers, body)
        assert status in (400, 401, 404), (target, status)
    # a variant signed as sent is not a way around the routes either
    headers = agent.headers("POST", "/agent/v1/jobs/../heartbeat", body)
    assert _raw_request(env.port, "POST", "/agent/v1/jobs/../heartbeat", headers, body) in (
        400,
        404,
    )


def test_csr_tricks_issue_nothing_or_only_what_the_job_allows(env: Env) -> None:
    agent = env.enroll()
    jid = env.enqueue()
    assert agent.send("GET", f"{P.WORK_PATH}?wait=10").status_code == 200
    names = ["www.hostile.test"]
    # extra name, wrong key type: refused, nothing issued
    extra, _ = make_csr([*names, "evil.example"])
    assert agent.send("POST", P.csr_path(jid), {"csr": extra}).status_code == 400
    from cryptography.hazmat.primitives.asymmetric import rsa

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(names[0])]), False)
        .sign(rsa_key, hashes.SHA256())
    )
    r = agent.send(
        "POST",
        P.csr_path(jid),
        {"csr": wrong.public_bytes(serialization.Encoding.PEM).decode()},
    )
    assert r.status_code == 400
    assert env.eng.store().versions("www") == []
    # a CSR asking to be a CA: the certificate issued is a leaf all the same
    key = ec.generate_private_key(ec.SECP256R1())
    ca_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(names[0])]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(key, hashes.SHA256())
    )
    r = agent.send(
        "POST", P.csr_path(jid), {"csr": ca_csr.public_bytes(serialization.Encoding.PEM).decode()}
    )
    assert r.status_code == 200, r.text
    leaf = x509.load_pem_x509_certificate(r.json()["certificate_pem"].encode())
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert bc.ca is False
    except x509.ExtensionNotFound:
        pass
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        assert not ku.key_cert_sign and not ku.crl_sign
    except x509.ExtensionNotFound:
        pass
    # a huge CSR: refused by size before any parsing
    huge = agent.send("POST", P.csr_path(jid), {"csr": "A" * (P.MAX_BODY + 10)})
    assert huge.status_code == 413


def test_a_single_use_token_enrolls_exactly_one_of_two_racing_agents(env: Env) -> None:
    once = "cctla_" + "o" * 43
    env.eng.store().create_agent_token("once", hash_token(once), expires_at=None, uses=1)
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def enroll(i: int) -> None:
        key = ed25519.Ed25519PrivateKey.generate()
        doc = {
            "token": once,
            "name": f"racer{i}",
            "public_key": P.encode_public_key(key),
            "labels": {},
            "facts": FACTS,
        }
        barrier.wait()
        with httpx.Client(base_url=f"http://127.0.0.1:{env.port}") as c:
            codes.append(c.post(P.ENROLL_PATH, json=doc, timeout=60).status_code)

    threads = [threading.Thread(target=enroll, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(codes) == [201] + [401] * 7, codes
    assert len([a for a in env.eng.store().agents() if a.name.startswith("racer")]) == 1


def test_unknown_agent_ids_cost_a_bounded_number_of_lookups(env: Env) -> None:
    """Unauthenticated requests naming random agent ids must not each cost a database
    query (the ids are looked up at the enrollment rate per client address)."""
    store = env.eng.store()
    real = store.agent_by_id
    lookups: list[str] = []

    def counting(agent_id: str) -> Any:  # the real lookup, counted
        lookups.append(agent_id)
        return real(agent_id)

    store.agent_by_id = counting  # type: ignore[method-assign]
    stranger = Agent(env.client)
    statuses = set()
    start = time.monotonic()
    for _ in range(100):
        stranger.id = P.new_nonce()  # a fresh, well-formed, unknown id each time
        statuses.add(stranger.send("POST", P.HEARTBEAT_PATH, {"facts": FACTS}).status_code)
    assert statuses <= {401, 429}, statuses
    elapsed = time.monotonic() - start
    assert len(lookups) <= 20 + 5 * elapsed + 1, (len(lookups), elapsed)  # not one each
    store.agent_by_id = real  # type: ignore[method-assign]
    # an agent enrolled through another server meanwhile (straight into the store) still
    # gets in from that address: the whole table is re-read instead
    key = ed25519.Ed25519PrivateKey.generate()
    rec, _ = store.enroll_agent(
        "elsewhere", P.encode_public_key(key), {}, FACTS, token="t", now=utcnow()
    )
    late = Agent(env.client)
    late.key, late.id = key, rec.id
    deadline = time.monotonic() + 60
    while late.send("POST", P.HEARTBEAT_PATH, {"facts": FACTS}).status_code != 200:
        assert time.monotonic() < deadline, "the agent enrolled elsewhere never got in"
        time.sleep(0.5)


def test_the_agent_treats_a_json_bomb_from_its_server_as_a_retry(tmp_path: Path) -> None:
    """A server (or whatever answers in its place) sending JSON nested past the parser
    makes the agent back off, not crash."""
    import asyncio
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from certctl.agent.client import Agent as AgentProcess
    from certctl.agent.client import Retry
    from certctl.agent.client_state import AgentState, Credential

    class Bomb(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"[" * 100_000
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Bomb)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        cred = Credential("a" * 32, "edge1", url, ed25519.Ed25519PrivateKey.generate())

        async def poll() -> None:
            from certctl.agent.client import http_client

            agent = AgentProcess(AgentState(tmp_path / "state"), cred)
            agent._http = http_client(url, None, 30.0)
            try:
                with pytest.raises(Retry, match="invalid JSON"):
                    await agent.request("GET", f"{P.WORK_PATH}?wait=0")
            finally:
                await agent._http.aclose()

        asyncio.run(poll())
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_a_refused_path_cannot_put_control_characters_in_the_log(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoded path is the client's text: terminal escapes (ESC) and other control
    characters are escaped before it reaches the log and the audit."""
    caplog.set_level("WARNING", logger="certctl.agent.server")
    target = "/agent/v1/jobs/x%1B%5B2J%07evil/csr"
    status = _raw_request(env.port, "POST", target, {"X-Certctl-Agent": "nobody"}, b"{}")
    assert status == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines, caplog.text
    assert all("\x1b" not in line and "\x07" not in line for line in lines), lines
    assert any("x\\x1b[2J\\x07evil" in line for line in lines), lines


def test_an_issued_job_does_not_issue_again_for_another_key(env: Env) -> None:
    """Once a job's certificate is issued, a CSR for another key is refused (the agent
    that lost its key reports "key lost" and the job starts over, attempts counted):
    an agent cannot mint certificates for the job's names in a loop."""
    agent, jid, _ = _leased_job_with_certificate(env)
    for _ in range(3):
        csr, _ = make_csr(["www.hostile.test"])
        r = agent.send("POST", P.csr_path(jid), {"csr": csr})
        assert r.status_code == 409, r.text
    assert len(env.eng.store().versions("www")) == 1
    assert env.job_states() == ["issued"]


def test_enrollment_refuses_plain_http_to_another_host(tmp_path: Path) -> None:
    """The bootstrap token (and later the jobs) must not cross a network in clear:
    plain http only to this host's loopback, or when explicitly accepted. Refused
    before any connection is made, and nothing is written."""
    import asyncio

    from certctl.agent.client import check_server_url, enroll
    from certctl.agent.client_state import AgentState
    from certctl.errors import CertctlError

    state = AgentState(tmp_path / "state")
    for url in ("http://192.0.2.10:8443", "http://agents.example", "ftp://x", "https://"):
        with pytest.raises(CertctlError, match="https://"):
            asyncio.run(enroll(state, server=url, token=TOKEN, name="edge1", labels={}))
    assert not (tmp_path / "state").exists()
    check_server_url("http://127.0.0.1:8080")
    check_server_url("http://[::1]:8080")
    check_server_url("http://localhost:8080")
    check_server_url("https://agents.example")
    check_server_url("http://192.0.2.10:8443", insecure_http=True)


def test_malformed_job_ids_leave_no_per_job_state_behind(env: Env) -> None:
    """A job id that cannot be one (the ids are 32 hex digits) is refused before the
    server keeps anything for it: a signed agent cannot grow the per-job locks with
    long made-up ids."""
    agent = env.enroll()
    for i in range(20):
        bogus = f"{i:02d}" + "f" * 2000
        for path in (P.csr_path(bogus), P.result_path(bogus)):
            r = agent.send("POST", path, {"csr": "x", "status": "failed", "detail": ""})
            assert r.status_code == 404, r.text
    assert len(env.service._job_locks) == 0


def test_a_waiting_poll_of_an_agent_missing_from_the_cache_looks_it_up(env: Env) -> None:
    """The cache can lose an agent enrolled while it was being re-read (the reload's
    query ran before the enrollment committed): its waiting poll looks it up again and
    carries on -- a 403 would stop a healthy agent for good."""
    agent = env.enroll()
    poll, answer = _waiting_poll(env, agent)
    env.service._agents.pop(agent.id)  # what that race leaves behind
    env.enqueue()
    poll.join(60)
    assert answer and answer[0].status_code == 200, answer and answer[0].text
    assert env.job_states() == ["leased"]


def test_facts_and_labels_with_control_characters_are_refused(env: Env) -> None:
    """What an agent reports ends up in `certctl agents` on an operator's terminal:
    control characters (terminal escapes) are refused, nothing is stored."""
    agent = env.enroll()
    evil = {**FACTS, "hostname": "web\x1b]0;owned\x07"}
    r = agent.send("POST", P.HEARTBEAT_PATH, {"facts": evil})
    assert r.status_code == 400, r.text
    other = Agent(env.client)
    for facts, labels in ((evil, {}), (FACTS, {"site": "x\x1b[2J"}), (FACTS, {"\n": "x"})):
        r = env.client.post(
            P.ENROLL_PATH,
            json={
                "token": TOKEN,
                "name": "edge2",
                "public_key": P.encode_public_key(other.key),
                "labels": labels,
                "facts": facts,
            },
        )
        assert r.status_code == 400, r.text
    time.sleep(1.5)  # past a heartbeat flush
    agents = {a.name: a for a in env.eng.store().agents()}
    assert set(agents) == {"edge1"}
    assert agents["edge1"].facts["hostname"] == "h"


def test_a_result_detail_is_stored_without_terminal_escapes(env: Env) -> None:
    """A failure's detail (free text: error output, newlines allowed) is printed by
    `certctl apply --agent-wait` and `certctl agents`: escapes are neutralised."""
    agent = env.enroll()
    jid = env.enqueue()
    assert agent.send("GET", f"{P.WORK_PATH}?wait=10").status_code == 200
    detail = "nginx -t failed:\n\x1b]0;owned\x07\x1b[2Jline 2\t\x9b"
    claim = {"status": "failed", "fingerprint": None, "detail": detail, "verify": None}
    assert agent.send("POST", P.result_path(jid), claim).status_code == 200
    stored = env.eng.store().agent_job(jid)
    assert stored is not None and stored.detail is not None
    assert (
        "\x1b" not in stored.detail and "\x07" not in stored.detail and "\x9b" not in stored.detail
    )
    assert stored.detail.startswith("nginx -t failed:\n") and "line 2\t" in stored.detail


def test_guessing_bootstrap_tokens_is_rate_limited_per_address(env: Env) -> None:
    """Token guesses from one address: the burst is answered (401), then 429 with a
    Retry-After, before any token lookup."""
    key = ed25519.Ed25519PrivateKey.generate()
    codes = []
    start = time.monotonic()
    for i in range(300):  # until refused (the burst is 20; a loaded machine refills some)
        if 429 in codes:
            break
        doc = {
            "token": f"cctla_guess{i}",
            "name": "guesser",
            "public_key": P.encode_public_key(key),
            "labels": {},
            "facts": FACTS,
        }
        r = env.client.post(P.ENROLL_PATH, json=doc)
        codes.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
    elapsed = time.monotonic() - start
    assert 429 in codes, codes
    assert codes.count(401) <= 20 + 5 * elapsed + 1, (codes, elapsed)  # burst + 5/s refill
    assert env.eng.store().agent("guesser") is None

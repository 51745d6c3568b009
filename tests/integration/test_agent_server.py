"""The agent API of a real ``certctl serve`` (a subprocess), on PostgreSQL and SQLite,
driven by an httpx client that signs requests with :func:`protocol.sign_request`.

Jobs are enqueued through the state store API (what ``certctl apply`` calls), from
this process, so the long poll is woken by another process as in production."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from certctl.agent import protocol as P
from certctl.engine import Engine
from certctl.state import open_store
from certctl.state.base import StateStore

FACTS = {"hostname": "edge1.test", "os": "linux", "arch": "x86_64", "version": "t", "ip": "1.2.3.4"}


def inventory(root: Path) -> str:
    return f"""
defaults: {{issuer: ca, key: {{type: ecdsa, curve: P-256}}}}
issuers:
  ca: {{type: local_ca, root: {{common_name: Agent Server Test CA}}}}
hosts:
  edge-host: {{agent: edge1}}
  lab-host: {{agent: {{labels: {{site: lab}}, os: linux}}}}
targets:
  edge-files:
    type: file
    hosts: edge-host
    root: {root}/edge
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
  lab-files:
    type: file
    hosts: lab-host
    root: {root}/lab
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
certificates:
  www: {{common_name: www.agent.test, sans: [alt.agent.test], targets: [edge-files]}}
  lab: {{common_name: lab.agent.test, targets: [lab-files]}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    root: Path
    inv: Path
    state: str
    url: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    clients: list[httpx.Client] = field(default_factory=list)

    def certctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "certctl", "-i", str(self.inv), "--state", self.state, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def token(self, name: str, *extra: str) -> str:
        out = self.certctl("agent-token", "create", name, *extra)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    def store(self) -> StateStore:
        return open_store(self.state, inventory_root=self.inv)


@pytest.fixture(params=["postgres", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(inventory(tmp_path), encoding="utf-8")
    if request.param == "postgres":
        state = request.getfixturevalue("make_pg_db")()
    else:
        state = str(tmp_path / "state.db")
    port = _free_port()
    env = {**os.environ, "CERTCTL_STATE_KEY": base64.b64encode(b"k" * 32).decode()}
    env.pop("CERTCTL_STATE", None)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "certctl", "-i", str(inv), "--state", state, "serve",
         "--port", str(port), "--agent-offline-after", "0"],
        stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError((tmp_path / "serve.log").read_text())
        time.sleep(0.1)
    srv = Server(tmp_path, inv, state, url, env, proc)
    try:
        yield srv
    finally:
        for c in srv.clients:
            c.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        text = (tmp_path / "serve.log").read_text()
        assert "-----BEGIN PRIVATE KEY" not in text and "Traceback" not in text, text


class Agent:
    """A hand-driven agent: an Ed25519 identity and a signing httpx client."""

    def __init__(self, srv: Server, name: str, labels: dict[str, str] | None = None) -> None:
        self.name = name
        self.labels = labels or {}
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.id = ""
        self.http = httpx.Client(base_url=srv.url, timeout=30)
        srv.clients.append(self.http)

    def enroll(self, token: str, key: ed25519.Ed25519PrivateKey | None = None) -> httpx.Response:
        body = {
            "token": token,
            "name": self.name,
            "public_key": P.encode_public_key(key or self.key),
            "labels": self.labels,
            "facts": {**FACTS, "hostname": self.name},
        }
        r = self.http.post(P.ENROLL_PATH, json=body)
        if r.status_code in (200, 201):
            self.id = r.json()["agent_id"]
        return r

    def signed(
        self, method: str, path: str, doc: Any = None, *, now: float | None = None
    ) -> tuple[dict[str, str], bytes]:
        body = b"" if doc is None else json.dumps(doc).encode()
        headers = P.sign_request(self.key, self.id, method, path, body, now or time.time())
        headers["Content-Type"] = "application/json"
        return headers, body

    def send(self, method: str, path: str, doc: Any = None, **kw: Any) -> httpx.Response:
        headers, body = self.signed(method, path, doc, now=kw.pop("now", None))
        return self.http.request(method, path, headers=headers, content=body, **kw)

    def heartbeat(self) -> httpx.Response:
        return self.send("POST", P.HEARTBEAT_PATH, {"facts": {**FACTS, "hostname": self.name}})

    def work(self, wait: int = 0) -> httpx.Response:
        return self.send("GET", f"{P.WORK_PATH}?wait={wait}", timeout=wait + 10)


def make_csr(names: list[str], key: ec.EllipticCurvePrivateKey | None = None) -> tuple[str, Any]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def enqueue(srv: Server, cert_name: str, stamp: dict[str, float] | None = None) -> str:
    """Enqueue the job ``certctl apply`` would for ``cert_name``'s placement; ``stamp``
    gets the time the enqueuing transaction began."""
    eng = Engine(inventory_path=srv.inv, state_url=srv.state)
    try:
        cert = eng.inventory().certificates[cert_name]
        (pl,) = cert.placements
        assert pl.agent is not None
        spec = P.AgentJobSpec(
            cert.name,
            pl.id,
            dict(pl.agent),
            {
                "version_hint": None,
                "key": P.key_body(cert.key),
                "names": {"common_name": cert.common_name, "dns": list(cert.names), "ip": []},
                "target": {"type": pl.type, "config": dict(pl.config)},
                "config_digest": pl.config_digest(),
            },
        )
        store = eng.store()
        if stamp is not None:
            stamp["at"] = time.monotonic()
        (job_id,) = store.enqueue_agent_jobs([spec])
        return job_id
    finally:
        eng.close()


def test_enrollment_and_authentication_refusals(server: Server) -> None:
    token = server.token("boot", "--uses", "2")
    a = Agent(server, "edge1")
    assert a.enroll("cctla_wrong").status_code == 401
    r = a.enroll(token)
    assert r.status_code == 201, r.text
    assert a.enroll(token).status_code == 200  # same key again: idempotent, no use spent
    other_key = ed25519.Ed25519PrivateKey.generate()
    assert a.enroll(token, other_key).status_code == 409  # name taken by another key
    assert Agent(server, "Bad Name").enroll(token).status_code == 400

    assert a.heartbeat().status_code == 200
    # replay: the very same signed request twice
    headers, body = a.signed("POST", P.HEARTBEAT_PATH, {"facts": FACTS})
    assert a.http.post(P.HEARTBEAT_PATH, headers=headers, content=body).status_code == 200
    replay = a.http.post(P.HEARTBEAT_PATH, headers=headers, content=body)
    assert replay.status_code == 401 and "replay" in replay.json()["error"]
    # forged: body changed after signing
    headers, body = a.signed("POST", P.HEARTBEAT_PATH, {"facts": FACTS})
    forged = a.http.post(P.HEARTBEAT_PATH, headers=headers, content=body.replace(b"edge", b"evil"))
    assert forged.status_code == 401
    # wrong key for the agent id
    impostor = Agent(server, "edge1")
    impostor.id = a.id
    assert impostor.heartbeat().status_code == 401
    # stale and future timestamps
    for skew in (-400, 400):
        stale = a.send("POST", P.HEARTBEAT_PATH, {"facts": FACTS}, now=time.time() + skew)
        assert stale.status_code == 401 and "300 s" in stale.json()["error"]
    # unknown agent, missing headers
    ghost = Agent(server, "ghost")
    ghost.id = "0" * 32
    assert ghost.heartbeat().status_code == 401
    assert a.http.post(P.HEARTBEAT_PATH, json={"facts": FACTS}).status_code == 401
    # oversized body
    big = a.send("POST", P.HEARTBEAT_PATH, {"facts": FACTS, "pad": "x" * (P.MAX_BODY + 10)})
    assert big.status_code == 413

    # the token: a second enrollment spends the second use, a third is refused
    b = Agent(server, "edge2")
    assert b.enroll(token).status_code == 201
    assert Agent(server, "edge3").enroll(token).status_code == 401  # used up
    t2 = server.token("second")
    assert server.certctl("agent-token", "revoke", "second").returncode == 0
    assert Agent(server, "edge4").enroll(t2).status_code == 401  # revoked
    t3 = server.token("brief", "--ttl", "1s")
    time.sleep(1.1)
    assert Agent(server, "edge5").enroll(t3).status_code == 401  # expired
    listing = server.certctl("agent-token", "list")
    assert "boot\tused up" in listing.stdout and "second\trevoked" in listing.stdout
    assert token not in listing.stdout

    # revocation takes effect within a couple of seconds
    out = server.certctl("agents", "revoke", "edge1")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 5
    while a.heartbeat().status_code != 403:
        assert time.monotonic() < deadline, "revocation did not take effect"
        time.sleep(0.2)
    assert b.heartbeat().status_code == 200
    agents = json.loads(server.certctl("agents", "list", "--json").stdout)
    assert {x["name"]: x["status"] for x in agents} == {"edge1": "revoked", "edge2": "online"}
    deadline = time.monotonic() + 5
    with _closing(server.store()) as store:
        while True:  # refused requests are audited (flushed within a second)
            refused = store.list_audit(before=None, limit=100, event="agent.refused")
            if len(refused) >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    assert len(refused) >= 8
    reasons = " ".join(str(r["detail"]["reason"]) for r in refused)
    assert "replayed" in reasons and "bad request signature" in reasons


class _closing:
    def __init__(self, store: StateStore) -> None:
        self.store = store

    def __enter__(self) -> StateStore:
        return self.store

    def __exit__(self, *exc: object) -> None:
        self.store.close()


def test_work_csr_result_resume_and_routing(server: Server) -> None:
    token = server.token("boot")
    a = Agent(server, "edge1")
    lab = Agent(server, "lab7", labels={"site": "lab"})
    stranger = Agent(server, "edge9")
    for ag in (a, lab, stranger):
        assert ag.enroll(token).status_code == 201
    assert a.work(0).status_code == 204

    # a long poll waiting before the job exists gets it well under a second after
    got: dict[str, Any] = {}

    def poll() -> None:
        r = a.work(20)
        got["at"], got["r"] = time.monotonic(), r

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.5)
    stamp: dict[str, float] = {}
    job_id = enqueue(server, "www", stamp)
    t.join(30)
    r = got["r"]
    assert r.status_code == 200, r.text
    latency = got["at"] - stamp["at"]
    print(f"long-poll wake-up latency {latency * 1000:.0f} ms")
    # PostgreSQL: LISTEN/NOTIFY (the generation poll alone would take up to 1 s);
    # SQLite: the 0.2 s generation poll
    assert latency < (0.5 if server.state.startswith("postgres") else 0.8), latency
    job = r.json()["job"]
    assert job["id"] == job_id and job["phase"] == "csr" and job["attempt"] == 1
    assert job["key"] == {"type": "ec", "size": None, "curve": "P-256", "reuse": False}
    assert job["names"]["common_name"] == "www.agent.test"
    assert job["target"]["type"] == "file"
    # nobody else gets it: the stranger matches no selector, the lab agent neither
    assert stranger.work(0).status_code == 204
    assert lab.work(0).status_code == 204

    names = ["www.agent.test", "alt.agent.test"]
    csr_path = P.csr_path(job_id)
    # names that differ from the job: 400, nothing issued
    wrong, _ = make_csr(["www.agent.test", "evil.agent.test"])
    r = a.send("POST", csr_path, {"csr": wrong})
    assert r.status_code == 400 and "names" in r.json()["error"]
    # another agent's job: not found
    good, key = make_csr(names)
    assert stranger.send("POST", csr_path, {"csr": good}).status_code == 404
    assert stranger.send("POST", P.result_path(job_id), {"status": "failed", "detail": "x",
                                                          "fingerprint": None, "verify": None}
                         ).status_code == 404  # fmt: skip
    with _closing(server.store()) as store:
        assert store.versions("www") == []
    r = a.send("POST", csr_path, {"csr": good})
    assert r.status_code == 200, r.text
    issued = r.json()
    leaf = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()
    # the same key again: the same certificate, not a second issuance
    again = a.send("POST", csr_path, {"csr": make_csr(names, key)[0]})
    assert again.status_code == 200 and again.json() == issued
    with _closing(server.store()) as store:
        (v,) = store.versions("www")
        assert v.key_custody == P.VERSION_CUSTODY
        _, _, key_pem = store.material("www", v.version)
        assert key_pem is None  # the key never left the agent

    # restart: the agent asks for work again and resumes at deploy with the certificate
    r = a.work(0)
    assert r.status_code == 200
    resumed = r.json()["job"]
    assert resumed["id"] == job_id and resumed["phase"] == "deploy"
    assert resumed["certificate_pem"] == issued["certificate_pem"]

    fp = leaf.fingerprint(hashes.SHA256()).hex()
    bad = a.send("POST", P.result_path(job_id), {"status": "deployed", "fingerprint": "0" * 64,
                                                 "detail": "", "verify": None})  # fmt: skip
    assert bad.status_code == 400
    done = {"status": "deployed", "fingerprint": fp, "detail": "ok", "verify": {"ok": True}}
    assert a.send("POST", P.result_path(job_id), done).status_code == 200
    assert a.send("POST", P.result_path(job_id), done).status_code == 200  # idempotent
    late = a.send("POST", csr_path, {"csr": good})
    assert late.status_code == 409  # the job is closed
    assert a.work(0).status_code == 204
    plan = server.certctl("plan", "--detailed-exitcode")
    assert "issue lab" in plan.stdout, plan.stdout + plan.stderr
    assert "www" not in plan.stdout, plan.stdout  # the deployment is recorded: no change
    with _closing(server.store()) as store:
        deps = store.list_deployments(after=None, limit=10, cert="www")
        assert [(d["placement"], d["version"], d["fingerprint"]) for d in deps] == [
            (resumed["placement"], v.version, fp)
        ]
        (rec,) = store.agent_jobs(certificate="www")
        assert rec.state == "deployed"
        events = [e["event"] for e in store.audit_log(limit=50, cert="www")]
        assert {"agent.job.leased", "issue", "deploy"} <= set(events)

    # routing by labels and OS; a failed result re-queues with a backoff
    lab_job = enqueue(server, "lab")
    assert a.work(0).status_code == 204
    r = lab.work(5)
    assert r.status_code == 200 and r.json()["job"]["id"] == lab_job
    fail = {"status": "failed", "fingerprint": None, "detail": "disk full", "verify": None}
    assert lab.send("POST", P.result_path(lab_job), fail).status_code == 200
    with _closing(server.store()) as store:
        rec = store.agent_job(lab_job)
        assert rec is not None and (rec.state, rec.attempts, rec.detail) == (
            "failed",
            1,
            "disk full",
        )
        assert rec.next_attempt_at is not None
    assert lab.work(0).status_code == 204  # not before its retry time

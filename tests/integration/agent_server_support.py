"""What the in-process agent API tests share: a one-certificate inventory whose only
placement is on an agent's host, the real application served on a free loopback port,
an agent that signs its requests, and a job enqueued for that certificate."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric import ed25519

from certctl.agent import protocol as P
from certctl.engine import Engine
from tests.integration.test_agent_server import _free_port
from tests.integration.test_server import ThreadedServer


def write_inventory(tmp_path: Path, ca_name: str, common_name: str) -> Path:
    """``tmp_path/inv``: local CA ``ca_name`` issues certificate ``www`` (``common_name``)
    for a file target on host ``h``, which agent ``edge1`` manages."""
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(
        f"""
defaults: {{issuer: ca}}
issuers: {{ca: {{type: local_ca, root: {{common_name: {ca_name}}}}}}}
hosts: {{h: {{agent: edge1}}}}
targets:
  t: {{type: file, hosts: h, root: {tmp_path}/out, cert_path: c.pem, key_path: c.key}}
certificates:
  www: {{common_name: {common_name}, targets: [t]}}
""",
        encoding="utf-8",
    )
    return inv


@contextmanager
def serving(application: Any) -> Iterator[tuple[httpx.Client, int]]:
    """``application`` under uvicorn in a thread: a client for it, and its port."""
    port = _free_port()
    with (
        ThreadedServer(application, port),
        httpx.Client(base_url=f"http://127.0.0.1:{port}") as client,
    ):
        yield client, port


class Agent:
    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.id = ""

    def headers(self, method: str, path: str, body: bytes, at: float | None = None) -> Any:
        return P.sign_request(self.key, self.id, method, path, body, at or time.time())

    def send(self, method: str, path: str, doc: Any = None, timeout: float = 30) -> Any:
        body = b"" if doc is None else json.dumps(doc).encode()
        headers = self.headers(method, path, body)
        return self.client.request(method, path, headers=headers, content=body, timeout=timeout)


def enroll(client: httpx.Client, token: str, facts: Mapping[str, str], name: str) -> Agent:
    """A new agent enrolled as ``name`` with bootstrap ``token`` (asserts 201)."""
    agent = Agent(client)
    r = client.post(
        P.ENROLL_PATH,
        json={
            "token": token,
            "name": name,
            "public_key": P.encode_public_key(agent.key),
            "labels": {},
            "facts": dict(facts),
        },
    )
    assert r.status_code == 201, r.text
    agent.id = r.json()["agent_id"]
    return agent


def enqueue(eng: Engine) -> str:
    """An agent job for ``www``'s only placement; its id."""
    cert = eng.inventory().certificates["www"]
    (pl,) = cert.placements
    job = {
        "key": P.key_body(cert.key),
        "names": {"common_name": cert.common_name, "dns": list(cert.names), "ip": []},
        "target": {"type": pl.type, "config": dict(pl.config)},
        "version_hint": None,
    }
    (jid,) = eng.store().enqueue_agent_jobs(
        [P.AgentJobSpec("www", pl.id, dict(pl.agent or {}), job)]
    )
    return jid

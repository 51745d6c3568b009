"""Job retries through the agent API, in process (the real application under uvicorn
in a thread, with its lifespan: the board, the flusher) on a real SQLite state, with
the retry backoff set to zero so attempts follow each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certctl.agent import protocol as P
from certctl.agent.admin_commands import hash_token
from certctl.agent.service import AgentServerSettings
from certctl.engine import Engine
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

FACTS = {"hostname": "j", "os": "linux", "arch": "x86_64", "version": "t", "ip": "1.1.1.1"}


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[httpx.Client, Engine]]:
    inv = write_inventory(tmp_path, "Jobs CA", "www.jobs.test")
    eng = Engine(inventory_path=inv)
    settings = AgentServerSettings(backoff_base_s=0, max_attempts=3, offline_after=0)
    application, _ = build_app(eng, ServerSettings(), settings)
    with serving(application) as (client, _):
        yield client, eng
    eng.close()


def _wait_job(agent: Agent, wait: int = 5) -> dict[str, Any]:
    r = agent.send("GET", f"{P.WORK_PATH}?wait={wait}")
    assert r.status_code == 200, r.text
    job: dict[str, Any] = r.json()["job"]
    return job


def test_failures_retry_then_dead_and_key_lost_restarts(app: tuple[httpx.Client, Engine]) -> None:
    client, eng = app
    token = "cctla_" + "x" * 43
    eng.store().create_agent_token("t", hash_token(token), expires_at=None, uses=None)
    agent = enroll(client, token, FACTS, "edge1")
    assert agent.send("GET", f"{P.WORK_PATH}?wait=61").status_code == 400
    assert agent.send("GET", f"{P.WORK_PATH}?wait=x").status_code == 400

    jid = enqueue(eng)
    job = _wait_job(agent)
    assert (job["id"], job["attempt"], job["phase"]) == (jid, 1, "csr")
    csr, key = make_csr(["www.jobs.test"], ec.generate_private_key(ec.SECP256R1()))
    r = agent.send("POST", P.csr_path(jid), {"csr": csr})
    assert r.status_code == 200, r.text
    # the agent lost its key: the job starts over at csr (attempt 2)
    lost = {"status": "failed", "fingerprint": None, "detail": P.KEY_LOST, "verify": None}
    assert agent.send("POST", P.result_path(jid), lost).status_code == 200
    job = _wait_job(agent)
    assert (job["id"], job["attempt"], job["phase"]) == (jid, 2, "csr")
    # a plain failure: attempt 3 is the last
    fail = {"status": "failed", "fingerprint": None, "detail": "reload failed", "verify": None}
    assert agent.send("POST", P.result_path(jid), fail).status_code == 200
    job = _wait_job(agent)
    assert job["attempt"] == 3
    assert agent.send("POST", P.result_path(jid), fail).status_code == 200
    rec = eng.store().agent_job(jid)
    assert rec is not None and (rec.state, rec.attempts) == ("dead", 3)
    assert agent.send("GET", f"{P.WORK_PATH}?wait=0").status_code == 204
    events = [e["event"] for e in eng.store().audit_log(limit=50, cert="www")]
    assert events.count("deploy.failed") == 2 and "agent.job.dead" in events
    # the first certificate was issued for the lost key; nothing was deployed
    (v,) = eng.store().versions("www")
    pem, _ = eng.store().certificate_pems("www", v.version)
    leaf = x509.load_pem_x509_certificate(pem)
    assert leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert leaf.fingerprint(hashes.SHA256()).hex() == v.fingerprint
    assert eng.store().list_deployments(after=None, limit=10, cert="www") == []

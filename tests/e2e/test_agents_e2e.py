"""Pull-mode agents end to end, every part real: ``certctl serve`` (a subprocess) on
PostgreSQL with the local CA, several ``certctl agent run`` processes (each with its own
state directory and file targets under tmp), and ``certctl apply`` routing
certificates by agent name and by labels.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certctl import pki
from certctl.engine import Engine
from tests.e2e.conftest import Result

pytestmark = pytest.mark.postgres

INVENTORY = """
defaults:
  issuer: ca
  ttl: 30d
  key: {{type: ecdsa, curve: P-256}}
issuers:
  ca:
    type: local_ca
    root: {{common_name: Agent E2E Root, key: {{type: ecdsa, curve: P-256}}, ttl: 3650d}}
hosts:
  edge1: {{agent: edge1}}
  paris: {{agent: {{labels: {{site: paris}}, os: linux}}}}
targets:
  on-edge1:
    type: file
    hosts: edge1
    root: {out}/edge1
    cert_path: "{{{{ cert.name }}}}/cert.pem"
    fullchain_path: "{{{{ cert.name }}}}/fullchain.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
  on-paris:
    type: file
    hosts: paris
    root: {out}/paris
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
  on-berlin:
    type: file
    agent: {{labels: {{site: berlin}}}}
    root: {out}/berlin
    combined_path: "{{{{ cert.name }}}}.pem"
certificates:
{certs}
"""


def _server_cert() -> tuple[bytes, bytes]:
    """A self-signed certificate for 127.0.0.1 (the agents trust it with --ca-file)."""
    import datetime as dt
    import ipaddress

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: How long any wait of these tests may take. Generous on purpose: on a loaded 2-core
#: CI machine a Python process start alone can take several seconds. Every wait below
#: polls observable state and returns as soon as it holds, so a long deadline costs
#: nothing when things go well.
DEADLINE = 180.0


def _listening_pid_sockets(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself holds a socket listening on 127.0.0.1:``port``
    (so an answer on that port comes from it, not from another program that took the
    port in the meantime). Linux /proc."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


class Fleet:
    """One serve process, the inventory and the agents of a test."""

    def __init__(self, root: Path, state_url: str, tls: bool = False) -> None:
        self.root = root
        self.inv = root / "inventory"
        self.out = root / "out"
        self.inv.mkdir()
        self.state_url = state_url
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
        self.env["CERTCTL_STATE"] = state_url
        self.port = _free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.ca_file = root / "serve-ca.pem"
        self.serve: subprocess.Popen[bytes] | None = None
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: list[Path] = []
        self.token = ""
        self.outputs: list[str] = []  # everything the certctl commands printed

    def write(self, certs: dict[str, str], extra: str = "") -> None:
        lines = "".join(f"  {n}: {{common_name: {n}.e2e.test, targets: [{t}]}}\n"
                        for n, t in certs.items())  # fmt: skip
        text = INVENTORY.format(out=self.out, certs=lines.rstrip("\n"))
        (self.inv / "inv.yaml").write_text(text, encoding="utf-8")
        if extra:
            (self.inv / "extra.yaml").write_text(extra, encoding="utf-8")

    def run(self, *args: str, timeout: float = DEADLINE) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "certctl", "-i", str(self.inv), *args],
            capture_output=True, text=True, cwd=self.root, env=self.env, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.outputs.append(proc.stdout + proc.stderr)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start_serve(self, token: bool = True, cli: bool = False) -> None:
        log = self.root / "serve.log"
        if log not in self.logs:
            self.logs.append(log)
        tls: list[str] = []
        verify: ssl.SSLContext | bool = True
        if self.tls:
            cert, key = _server_cert()
            self.ca_file.write_bytes(cert)
            (self.root / "serve-key.pem").write_bytes(key)
            tls = ["--tls-cert", str(self.ca_file), "--tls-key", str(self.root / "serve-key.pem")]
            verify = ssl.create_default_context(cafile=str(self.ca_file))
        # The port was free when chosen, but another program may bind it before serve
        # does (or while serve is down for a restart): serve then exits, and we try
        # again -- a new port on the first start, the same one (the agents' credentials
        # name it) on a restart. An answer counts only once serve itself listens.
        restart = self.serve is not None
        deadline = time.monotonic() + DEADLINE
        while True:
            with log.open("ab") as fh:
                self.serve = subprocess.Popen(
                    [sys.executable, "-m", "certctl", "-i", str(self.inv), "serve",
                     "--port", str(self.port), *tls],
                    env=self.env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                )  # fmt: skip
            while self.serve.poll() is None and not _listening_pid_sockets(
                self.serve.pid, self.port
            ):
                assert time.monotonic() < deadline, "certctl serve did not listen"
                time.sleep(0.05)
            if self.serve.poll() is None:
                break
            text = log.read_text(errors="replace")
            assert "address already in use" in text.lower(), text
            assert time.monotonic() < deadline, f"port {self.port} stayed taken"
            if restart:
                time.sleep(0.5)
            else:
                self.port = _free_port()
                self.url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"
        while True:
            assert self.serve.poll() is None, log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5, verify=verify).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "certctl serve did not answer"
            time.sleep(0.05)
        if not token:
            return
        if not cli:  # the same store call in this process (the CLI is tested once)
            from certctl.agent.admin_commands import TOKEN_PREFIX, hash_token

            self.token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            eng = self.engine()
            try:
                eng.store().create_agent_token(
                    "fleet", hash_token(self.token), expires_at=None, uses=20
                )
            finally:
                eng.close()
            return
        r = self.run("agent-token", "create", "fleet", "--uses", "20")
        assert r.code == 0, r.err
        found = re.search(r"cctla_[A-Za-z0-9_-]+", r.out + r.err)
        assert found is not None, r.out + r.err
        self.token = found.group(0)

    def state_dir(self, name: str) -> Path:
        return self.root / "agents" / name

    def enroll(self, name: str, *labels: str, cli: bool = False) -> None:
        if not cli:  # the same code in this process (saves a start-up; the CLI is tested once)
            from certctl.agent.client import enroll
            from certctl.agent.client_state import AgentState

            pairs = dict(label.split("=", 1) for label in labels)
            state = AgentState(self.state_dir(name))
            ca = str(self.ca_file) if self.tls else None
            asyncio.run(
                enroll(
                    state, server=self.url, token=self.token, name=name, labels=pairs, ca_file=ca
                )
            )
            return
        args = [f"--label={label}" for label in labels]
        if self.tls:
            args.append(f"--ca-file={self.ca_file}")
        where = str(self.state_dir(name))
        r = self.agent_cmd("enroll", "--server", self.url, "--token", self.token,
                           "--name", name, "--state-dir", where, *args)  # fmt: skip
        assert r.code == 0, r.err + r.out

    def agent_cmd(self, *args: str) -> Result:
        env = {k: v for k, v in self.env.items() if k != "CERTCTL_STATE"}
        proc = subprocess.run(
            [sys.executable, "-m", "certctl", "agent", *args],
            capture_output=True, text=True, cwd=self.root, env=env, timeout=DEADLINE,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        self.outputs.append(proc.stdout + proc.stderr)
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def start_agent(self, name: str, *extra: str, env: dict[str, str] | None = None) -> None:
        # The agent needs no inventory and no state store: neither is in its environment.
        agent_env = {k: v for k, v in self.env.items() if k != "CERTCTL_STATE"}
        agent_env.update(env or {})
        log = self.root / f"agent-{name}.log"
        self.logs.append(log)
        with log.open("ab") as fh:
            self.agents[name] = subprocess.Popen(
                [sys.executable, "-m", "certctl", "agent", "run",
                 "--state-dir", str(self.state_dir(name)), "--wait", "2", "--heartbeat", "2",
                 "--backoff-cap", "1", *extra],
                env=agent_env, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                cwd=self.root,
            )  # fmt: skip

    def log(self, name: str) -> str:
        return (self.root / f"agent-{name}.log").read_text(errors="replace")

    def wait_agent_exit(self, name: str, timeout: float = DEADLINE) -> int:
        return self.agents[name].wait(timeout=timeout)

    def stop_all(self) -> None:
        """Teardown: kill everything at once (the tests that care assert the graceful
        SIGTERM exit themselves; a graceful stop here only costs seconds per test)."""
        procs = [*self.agents.values(), *([self.serve] if self.serve else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()

    def engine(self) -> Engine:
        return Engine(inventory_path=self.inv, state_url=self.state_url)

    def wait_for(
        self, what: str, cond: Callable[[], bool], timeout: float = DEADLINE, alive: bool = True
    ) -> None:
        """Poll ``cond`` until it holds; fail fast when an agent died meanwhile (with
        ``alive``: the agents are meant to be running)."""
        deadline = time.monotonic() + timeout
        while not cond():
            for name, proc in self.agents.items():  # a dead agent will not make it true
                assert not alive or proc.poll() is None, (
                    f"agent {name} exited ({proc.returncode}) while waiting for {what}:\n"
                    + self.log(name)
                )
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)

    def wait_heard_from(self, name: str) -> None:
        """Until the server has recorded a request of agent ``name`` after its
        enrollment (its heartbeat reached the server and was flushed)."""
        eng = self.engine()
        try:

            def heard() -> bool:
                rec = eng.store().agent(name)
                return (
                    rec is not None
                    and rec.last_seen is not None
                    and (rec.last_seen > rec.enrolled_at)
                )

            self.wait_for(f"agent {name} to be heard from", heard)
        finally:
            eng.close()

    def wait_jobs(self, cert: str, states: list[str]) -> None:
        """Until the agent jobs of ``cert`` are in ``states`` (oldest first)."""
        eng = self.engine()
        try:

            def reached() -> bool:
                return [j.state for j in eng.store().agent_jobs(certificate=cert)] == states

            self.wait_for(f"the jobs of {cert} to be {states}", reached)
        finally:
            eng.close()


@pytest.fixture
def fleet(
    tmp_path: Path, make_pg_db: Callable[[], str], request: pytest.FixtureRequest
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, make_pg_db(), tls=bool(getattr(request, "param", False)))
    try:
        yield f
    finally:
        f.stop_all()


def _key_b64(pem: bytes) -> str:
    """The base64 body of a PEM private key (what a leak would show)."""
    body = b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))
    return body.decode()


def _assert_files_match(fleet: Fleet, cert: str, cert_file: Path, key_file: Path) -> None:
    eng = fleet.engine()
    try:
        cur = eng.store().snapshot().certs[cert].current
        assert cur is not None
        leaf_pem, _ = eng.store().certificate_pems(cert, cur.version)
    finally:
        eng.close()
    on_disk = pki.parse_pem_chain(cert_file.read_bytes())[0]
    assert pki.fingerprint(on_disk) == cur.fingerprint
    assert pki.fingerprint(pki.load_cert_pem(leaf_pem)) == cur.fingerprint
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert pki.keys_match(key, on_disk.public_key())  # type: ignore[arg-type]
    assert key_file.stat().st_mode & 0o077 == 0
    assert cur.key_custody == "target"


@pytest.mark.parametrize("fleet", [True], indirect=True, ids=["https"])
def test_routes_by_name_and_labels_each_agent_deploys_its_own(fleet: Fleet) -> None:
    fleet.write({"a": "on-edge1", "b": "on-paris", "c": "on-berlin"})
    fleet.start_serve(cli=True)
    fleet.enroll("edge1", cli=True)
    fleet.enroll("paris1", "site=paris")
    fleet.enroll("berlin1", "site=berlin")
    for name in ("edge1", "paris1", "berlin1"):
        fleet.start_agent(name)

    r = fleet.run("apply", "--auto-approve", "--agent-wait", str(int(DEADLINE)))
    assert r.code == 0, r.out + r.err
    # the plan apply printed shows the routing
    assert "deploy a -> on-edge1@edge1 via agent edge1" in r.out
    assert "deploy b -> on-paris@paris via agents matching labels site=paris os linux" in r.out
    assert "deploy c -> on-berlin via agents matching labels site=berlin" in r.out
    assert "deployed a -> on-edge1@edge1 by agent edge1" in r.out
    assert "deployed b -> on-paris@paris by agent paris1" in r.out
    assert "deployed c -> on-berlin by agent berlin1" in r.out

    edge = fleet.out / "edge1" / "a"
    _assert_files_match(fleet, "a", edge / "cert.pem", edge / "key.pem")
    _assert_files_match(fleet, "b", fleet.out / "paris" / "b.pem", fleet.out / "paris" / "b.key")
    combined = fleet.out / "berlin" / "c.pem"
    _assert_files_match(fleet, "c", combined, combined)
    # each agent deployed only its own
    assert "job" in fleet.log("edge1") and " a -> " in fleet.log("edge1")
    assert " b -> " not in fleet.log("edge1") and " c -> " not in fleet.log("edge1")
    assert " b -> " in fleet.log("paris1") and " a -> " not in fleet.log("paris1")
    assert " c -> " in fleet.log("berlin1") and " b -> " not in fleet.log("berlin1")

    again = fleet.run("plan", "--detailed-exitcode")
    assert again.code == 0, again.out + again.err
    assert "No changes" in again.out

    # The private keys never left their hosts: not in any output, log or the database.
    keys = [edge / "key.pem", fleet.out / "paris" / "b.key", combined]
    key_texts = [_key_b64(k.read_bytes().split(b"-----END CERTIFICATE-----")[-1]) for k in keys]
    texts = [*fleet.outputs, *(p.read_text(errors="replace") for p in fleet.logs)]
    for secret in key_texts:
        assert len(secret) > 100
        distinctive = secret[52:92]  # past the fixed ASN.1 header: the private scalar
        for text in texts:
            assert distinctive not in text
            assert "PRIVATE KEY-----" not in text
    eng = fleet.engine()
    try:
        agents = {a.name: a for a in eng.store().agents()}
        assert agents["edge1"].status == "online"
        assert agents["paris1"].facts["os"] == "linux" and agents["paris1"].facts["hostname"]
        events = {e["event"]: e for e in eng.store().audit_log(cert="a")}
        assert events["agent.enqueue"]["placement"] == "on-edge1@edge1"  # the intent
        assert events["agent.enqueue"]["detail"]["selector"] == {"name": "edge1"}
        assert "issue" in events and "deploy" in events  # recorded by the server
        for name in ("a", "b", "c"):
            cur = eng.store().snapshot().certs[name].current
            assert cur is not None
            assert eng.store().material(name, cur.version)[2] is None  # no key stored
    finally:
        eng.close()
    # nothing left in the journals once reported
    for name in ("edge1", "paris1", "berlin1"):
        assert list((fleet.state_dir(name) / "jobs").iterdir()) == []
    # SIGTERM while waiting for work: a clean exit 0
    fleet.agents["edge1"].send_signal(signal.SIGTERM)
    assert fleet.wait_agent_exit("edge1") == 0


def test_agent_deploys_to_nginx_validates_reloads_and_verifies(
    fleet: Fleet, tmp_path: Path
) -> None:
    from certctl.observe.probe import fetch_fingerprint
    from tests.integration.ssh_support import Nginx

    nginx = Nginx(tmp_path / "nginx", tmp_path / "nginx-certs")
    try:
        extra = f"""
targets:
  edge-nginx:
    type: nginx
    agent: web1
    root: {nginx.certdir}
    fullchain_path: web.crt
    key_path: web.key
    validate: {json.dumps(nginx.validate)}
    reload: {json.dumps(nginx.reload)}
    verify: {{endpoint: "127.0.0.1:{nginx.port}", sni: web.e2e.test, timeout: 10}}
certificates:
  web: {{common_name: web.e2e.test, targets: [edge-nginx]}}
"""
        fleet.write({}, extra)
        fleet.start_serve()
        fleet.enroll("web1")
        fleet.start_agent("web1")
        assert "deploy web -> edge-nginx via agent web1" in fleet.run("plan").out
        r = fleet.run("apply", "--auto-approve", "--agent-wait", str(int(DEADLINE)))
        assert r.code == 0, r.out + r.err
        assert "deployed web -> edge-nginx by agent web1" in r.out
        eng = fleet.engine()
        try:
            cur = eng.store().snapshot().certs["web"].current
            assert cur is not None
            served = asyncio.run(fetch_fingerprint("127.0.0.1", nginx.port, "web.e2e.test", 5))
            assert served == cur.fingerprint != nginx.initial_fingerprint  # reloaded, verified
            assert (nginx.certdir / "web.crt.bak.1").exists()  # the replaced file is kept
            jobs = eng.store().agent_jobs(certificate="web")
            assert [(j.state, j.fingerprint) for j in jobs] == [("deployed", cur.fingerprint)]
        finally:
            eng.close()
    finally:
        nginx.stop()


FAILPOINTS = ("agent_after_journal", "agent_after_csr", "agent_before_result")


def test_agents_killed_mid_job_resume_and_issue_once(fleet: Fleet) -> None:
    """One agent per crash point (in parallel, one server): each is killed at its
    point, restarted, resumes the job it held and the certificate is issued once."""
    hosts = "".join(f"  h{i}: {{agent: k{i}}}\n" for i in range(len(FAILPOINTS)))
    targets = "".join(
        f"""  t{i}:
    type: file
    hosts: h{i}
    root: {fleet.out}/k{i}
    cert_path: "{{{{ cert.name }}}}/cert.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
"""
        for i in range(len(FAILPOINTS))
    )
    certs = "".join(
        f"  c{i}: {{common_name: c{i}.e2e.test, targets: [t{i}]}}\n" for i in range(len(FAILPOINTS))
    )
    fleet.write({}, f"hosts:\n{hosts}targets:\n{targets}certificates:\n{certs}")
    fleet.start_serve()
    for i, failpoint in enumerate(FAILPOINTS):
        fleet.enroll(f"k{i}")
        fleet.start_agent(f"k{i}", env={"CERTCTL_FAILPOINTS": f"{failpoint}=1"})
    r = fleet.run("apply", "--auto-approve")
    assert r.code == 0, r.out + r.err
    for i, failpoint in enumerate(FAILPOINTS):
        assert fleet.wait_agent_exit(f"k{i}") == -signal.SIGKILL, (failpoint, fleet.log(f"k{i}"))
        journal = list((fleet.state_dir(f"k{i}") / "jobs").iterdir())
        assert len(journal) == 1, failpoint  # the key was journaled before the CSR left
        assert journal[0].stat().st_mode & 0o077 == 0

    waiting = fleet.run("plan")
    for i in range(len(FAILPOINTS)):  # held back, nothing enqueued twice
        assert f"waiting on agent k{i}" in waiting.out, waiting.out
    assert "No changes" in waiting.out, waiting.out

    for i in range(len(FAILPOINTS)):  # no failpoint: each resumes the job it held
        fleet.start_agent(f"k{i}")
    r = fleet.run("apply", "--auto-approve", "--agent-wait", str(int(DEADLINE)))
    assert r.code == 0, r.out + r.err
    for i, failpoint in enumerate(FAILPOINTS):
        fleet.wait_jobs(f"c{i}", ["deployed"])
        eng = fleet.engine()
        try:
            versions = eng.store().versions(f"c{i}")
        finally:
            eng.close()
        assert len(versions) == 1, (failpoint, versions)  # issued once, for the journaled key
        out = fleet.out / f"k{i}" / f"c{i}"
        _assert_files_match(fleet, f"c{i}", out / "cert.pem", out / "key.pem")
        assert list((fleet.state_dir(f"k{i}") / "jobs").iterdir()) == [], failpoint
    assert "No changes" in fleet.run("plan").out


def test_revoked_agent_is_refused_and_stops(fleet: Fleet) -> None:
    fleet.write({"a": "on-edge1"})
    fleet.start_serve()
    fleet.enroll("edge1")
    fleet.start_agent("edge1")
    fleet.wait_heard_from("edge1")
    r = fleet.run("agents", "revoke", "edge1")
    assert r.code == 0, r.err
    code = fleet.wait_agent_exit("edge1")
    assert code == 1
    assert "HTTP 403" in fleet.log("edge1") and "revoked" in fleet.log("edge1")
    # work routed to it stays queued, never handed to the revoked credential
    fleet.run("apply", "--auto-approve")
    fleet.start_agent("edge1")
    assert fleet.wait_agent_exit("edge1") == 1
    assert not (fleet.out / "edge1" / "a").exists()
    fleet.wait_jobs("a", ["queued"])


def test_forged_credential_gets_401_and_backs_off(fleet: Fleet) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from certctl.agent.client_state import AgentState, Credential

    fleet.write({"a": "on-edge1"})
    fleet.start_serve()
    fleet.enroll("edge1")
    state = AgentState(fleet.state_dir("edge1"))
    real = state.load_credential()
    # Same agent id, another key: every signature is refused (401).
    state.save_credential(Credential(real.agent_id, real.name, real.server,
                                     Ed25519PrivateKey.generate()))  # fmt: skip
    fleet.run("apply", "--auto-approve")
    fleet.start_agent("edge1")
    fleet.wait_for("two refusals", lambda: fleet.log("edge1").count("HTTP 401") >= 2)
    assert fleet.agents["edge1"].poll() is None  # it keeps backing off, it does not crash
    assert "Traceback" not in fleet.log("edge1")
    assert not (fleet.out / "edge1" / "a").exists()
    eng = fleet.engine()
    try:
        assert [j.state for j in eng.store().agent_jobs(certificate="a")] == ["queued"]
    finally:
        eng.close()


def test_agent_refuses_a_world_readable_credential(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from certctl.agent.client_state import AgentState, Credential

    fleet = Fleet(tmp_path, "postgresql://unused.invalid/none")  # no server, no database

    state = AgentState(fleet.state_dir("edge1"))  # as enrollment leaves it (no server needed)
    state.save_credential(Credential("0" * 32, "edge1", fleet.url, Ed25519PrivateKey.generate()))
    cred = fleet.state_dir("edge1") / "credential.json"
    assert cred.stat().st_mode & 0o777 == 0o600
    cred.chmod(0o644)
    r = fleet.agent_cmd("run", "--state-dir", str(fleet.state_dir("edge1")))
    assert r.code == 1
    assert "readable by group or others" in r.err and "Traceback" not in r.err


def test_agent_rides_out_a_server_outage_and_converges(fleet: Fleet) -> None:
    fleet.write({"a": "on-edge1"})
    fleet.start_serve()
    fleet.enroll("edge1")
    fleet.start_agent("edge1")
    fleet.wait_heard_from("edge1")
    assert fleet.serve is not None
    fleet.serve.send_signal(signal.SIGTERM)
    assert fleet.serve.wait(timeout=DEADLINE) == 0
    r = fleet.run("apply", "--auto-approve")  # the job waits in the database
    assert r.code == 0, r.out + r.err
    fleet.wait_for("a refused connection", lambda: "ConnectError" in fleet.log("edge1"))
    fleet.start_serve(token=False)  # same port, same database
    eng = fleet.engine()
    try:

        def deployed() -> bool:
            return [j.state for j in eng.store().agent_jobs(certificate="a")] == ["deployed"]

        fleet.wait_for("the deployment after the outage", deployed)
    finally:
        eng.close()
    assert fleet.agents["edge1"].poll() is None  # backed off, never gave up
    assert "Traceback" not in fleet.log("edge1")

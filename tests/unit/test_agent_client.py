"""The agent side without a server: inventory routing, the plan, the job spec, the
agent's state directory (credential, journal) and its backoff. Real connectors,
real files; no network."""

from __future__ import annotations

import asyncio
import os
import random
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from certctl.agent import client_routing as routing
from certctl.agent import protocol as P
from certctl.agent.client import full_jitter, job_names
from certctl.agent.client_deploy import Deployer, secrets_of
from certctl.agent.client_state import AgentState, AgentStateError, Credential, write_private
from certctl.connectors import default_registry
from certctl.errors import InventoryError
from certctl.inventory import load_inventory
from certctl.model import ActionKind, Observed, Secret, SecretBytes, StateSnapshot
from certctl.observe.targets import observe_targets
from certctl.plan.planner import plan
from certctl.plan.render import plan_from_json, render_json, render_markdown, render_text

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def inventory(tmp_path: Path, out: Path, extra: str = "") -> Path:
    text = f"""
    defaults:
      issuer: ca
      key: {{type: ecdsa, curve: P-256}}
    issuers:
      ca: {{type: local_ca, root: {{common_name: Test Root}}}}
    hosts:
      edge1: {{agent: edge1}}
      edge2: {{agent: {{labels: {{site: paris}}, os: linux}}}}
      web: {{address: 10.0.0.1}}
    targets:
      on-edge1:
        type: file
        hosts: edge1
        root: {out}/one
        cert_path: "{{{{ cert.name }}}}.pem"
        key_path: "{{{{ cert.name }}}}.key"
      on-paris:
        type: file
        hosts: [edge2]
        root: {out}/two
        fullchain_path: "{{{{ cert.name }}}}.pem"
        key_path: "{{{{ cert.name }}}}.key"
      target-wins:
        type: file
        hosts: edge1
        agent: edge9
        root: {out}/three
        cert_path: "{{{{ cert.name }}}}.pem"
        key_path: "{{{{ cert.name }}}}.key"
        pkcs12_password: {{env: P12_PASSWORD}}
      plain:
        type: file
        root: {out}/plain
        cert_path: "{{{{ cert.name }}}}.pem"
    certificates:
      a: {{common_name: a.test, targets: [on-edge1]}}
      b: {{common_name: b.test, sans: [127.0.0.1], targets: [on-paris]}}
      c: {{common_name: c.test, targets: [target-wins]}}
      d: {{common_name: d.test, targets: [plain]}}
    {extra}
    """
    path = tmp_path / "inv.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_routing_by_name_labels_and_target_wins(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, tmp_path / "out"), default_registry())
    a, b, c, d = (inv.certificates[n] for n in "abcd")
    assert a.placements[0].agent == {"name": "edge1"}
    assert b.placements[0].agent == {"labels": {"site": "paris"}, "os": "linux"}
    assert c.placements[0].agent == {"name": "edge9"}  # the target's agent: wins
    assert d.placements[0].agent is None
    # Agent-routed certificates have their key made (and kept) on the agent.
    assert (a.key.custody, b.key.custody, d.key.custody) == ("target", "target", "controller")
    # `agent` is inventory routing, not connector configuration.
    assert "agent" not in c.placements[0].config


def test_agent_routed_certificate_needs_one_placement(tmp_path: Path) -> None:
    path = inventory(tmp_path, tmp_path / "out")
    text = path.read_text().replace(
        "a: {common_name: a.test, targets: [on-edge1]}",
        "a: {common_name: a.test, targets: [on-edge1, plain]}",
    )
    path.write_text(text)
    with pytest.raises(InventoryError) as err:
        load_inventory(path, default_registry())
    msg = str(err.value)
    assert "inv.yaml:" in msg and "exactly one placement" in msg and "on-edge1@edge1" in msg


def test_agent_routed_target_needs_absolute_root(tmp_path: Path) -> None:
    path = inventory(tmp_path, tmp_path / "out")
    path.write_text(path.read_text().replace(f"root: {tmp_path / 'out'}/one", "root: rel/one"))
    with pytest.raises(InventoryError) as err:
        load_inventory(path, default_registry())
    assert "must be an absolute path on the agent's host" in str(err.value)
    assert "targets.on-edge1.root" in str(err.value)  # names the field


def test_bad_agent_selector_is_refused_with_location(tmp_path: Path) -> None:
    path = inventory(tmp_path, tmp_path / "out")
    path.write_text(path.read_text().replace("edge1: {agent: edge1}", "edge1: {agent: {os: beos}}"))
    with pytest.raises(InventoryError) as err:
        load_inventory(path, default_registry())
    assert "inv.yaml:8" in str(err.value) and "agent" in str(err.value)


def test_plan_shows_agent_routed_actions_and_validates(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, tmp_path / "out"), default_registry())
    p = plan(inv, Observed(StateSnapshot({}, {})), NOW)
    text = render_text(p)
    assert "~ deploy a -> on-edge1@edge1 via agent edge1" in text
    assert "via agents matching labels site=paris os linux" in text
    assert "(key made on on-edge1@edge1 by agent edge1)" in text
    assert "deploy d -> plain  (" in text  # an agentless placement is shown as before
    assert "via agent edge1" in render_markdown(p)
    again = plan_from_json(render_json(p))  # the plan JSON schema still validates
    deploy_a = next(x for x in again.actions if x.cert == "a" and x.kind is ActionKind.DEPLOY)
    assert deploy_a.details["via_agent"] == "agent edge1"
    assert deploy_a.details["agent"] == {"name": "edge1"}


def test_open_job_with_same_spec_waits_other_spec_replans(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, tmp_path / "out"), default_registry())
    a = inv.certificates["a"]
    spec = routing.job_spec(a, a.placements[0])
    key = ("a", "on-edge1@edge1")
    waiting = Observed(
        StateSnapshot({}, {}), agent_jobs={key: ("f" * 32, "leased", "edge1", spec.digest())}
    )
    p = plan(inv, waiting, NOW)
    assert not [x for x in p.actions if x.cert == "a"]
    assert p.skipped["a"] == f"waiting on agent edge1: job {'f' * 12} for on-edge1@edge1 is leased"
    stale = Observed(StateSnapshot({}, {}), agent_jobs={key: ("f" * 32, "queued", None, "0" * 64)})
    assert [x.kind for x in plan(inv, stale, NOW).actions if x.cert == "a"] == [
        ActionKind.ISSUE,
        ActionKind.DEPLOY,
    ]


def test_job_spec_carries_names_key_and_secret_references(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, tmp_path / "out"), default_registry())
    b = inv.certificates["b"]
    spec = routing.job_spec(b, b.placements[0])
    assert spec.selector == {"labels": {"site": "paris"}, "os": "linux"}
    assert spec.job["names"] == {"common_name": "b.test", "dns": ["b.test"], "ip": ["127.0.0.1"]}
    assert spec.job["key"] == {"type": "ec", "size": None, "curve": "P-256", "reuse": False}
    assert spec.job["target"]["config"]["root"] == f"{tmp_path / 'out'}/two"
    assert spec.digest() == routing.job_spec(b, b.placements[0]).digest()  # stable
    c = inv.certificates["c"]
    config = routing.job_spec(c, c.placements[0]).job["target"]["config"]
    assert config["pkcs12_password"] == {"env": "P12_PASSWORD"}  # a reference, not a value
    back = secrets_of(config, tmp_path)
    assert back["pkcs12_password"] == Secret("env", "P12_PASSWORD")
    assert job_names(spec.job["names"]) == ["b.test", "127.0.0.1"]


def test_observe_skips_agent_routed_placements(tmp_path: Path) -> None:
    inv = load_inventory(inventory(tmp_path, tmp_path / "out"), default_registry())
    asked: list[str] = []

    def target_for(name: str) -> object:
        asked.append(name)
        raise AssertionError("an agent-routed placement must not be observed from here")

    from certctl.model import CertRecord, VersionRecord

    version = VersionRecord("a", 1, "01", NOW, NOW, "ff", "ca", "ecdsa-p256", ("a.test",), "x")
    snap = StateSnapshot({"a": CertRecord("a", version)}, {})
    assert observe_targets(inv, snap, target_for) == {}
    assert asked == []


# ------------------------------------------------------------------ state dir


def test_credential_is_private_and_refused_when_readable(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    state = AgentState(tmp_path / "st")
    key = Ed25519PrivateKey.generate()
    state.save_credential(Credential("a" * 32, "edge1", "http://127.0.0.1:1", key))
    path = state.credential_path
    assert (path.stat().st_mode & 0o777) == 0o600
    assert ((tmp_path / "st").stat().st_mode & 0o777) == 0o700
    loaded = state.load_credential()
    assert loaded.public_key_b64() == P.encode_public_key(key)
    assert "private" not in repr(loaded)
    os.chmod(path, 0o644)
    with pytest.raises(AgentStateError, match="readable by group or others"):
        state.load_credential()
    os.chmod(path, 0o600)
    os.chmod(tmp_path / "st", 0o755)
    with pytest.raises(AgentStateError, match="accessible by group or others"):
        state.load_credential()


def test_missing_credential_says_how_to_enroll(tmp_path: Path) -> None:
    with pytest.raises(AgentStateError, match="certctl agent enroll"):
        AgentState(tmp_path / "empty").load_credential()


def test_journal_keeps_key_private_and_forgets(tmp_path: Path) -> None:
    from certctl import pki
    from certctl.model import KeySpec

    state = AgentState(tmp_path / "st")
    state.prepare()
    key = pki.key_to_pem(pki.generate_key(KeySpec()))
    job = "0123456789abcdef0123456789abcdef"
    state.journal(job, {"certificate": "a"}, key)
    path = tmp_path / "st" / "jobs" / f"{job}.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    entry = state.journaled(job)
    assert entry is not None and entry[0] == {"certificate": "a"} and entry[1] == key
    assert state.journaled_jobs() == [job]
    state.forget(job)
    assert state.journaled(job) is None and not path.exists()
    with pytest.raises(AgentStateError):
        state.journal("../escape", {}, None)


def test_write_private_is_atomic_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_private(target, b"one")
    write_private(target, b"two")
    assert target.read_bytes() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_full_jitter_is_bounded_and_capped() -> None:
    rng = random.Random(7)
    for attempt in range(1, 30):
        d = full_jitter(attempt, 1.0, 300.0, rng)
        assert 0.0 <= d <= min(300.0, 2 ** (attempt - 1))
    big = [full_jitter(20, 1.0, 300.0, rng) for _ in range(200)]
    assert max(big) > 150  # spreads over the whole capped range
    assert min(big) < 150


def test_deployer_refuses_a_certificate_for_another_key(tmp_path: Path) -> None:
    from certctl import pki
    from certctl.model import KeySpec

    key_a = pki.key_to_pem(pki.generate_key(KeySpec()))
    key_b = pki.generate_key(KeySpec())
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key_b.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW.replace(year=2027))
        .sign(key_b, hashes.SHA256())
    )
    job = {
        "certificate": "x",
        "placement": "files",
        "target": {"type": "file", "config": {"root": str(tmp_path), "cert_path": "x.pem"}},
    }
    out = asyncio.run(Deployer(tmp_path).deploy(job, pki.cert_pem(cert), b"", key_a, 1))
    assert not out.ok and "not for this job's key" in out.detail
    assert not (tmp_path / "x.pem").exists()


def test_example_agent_inventory_loads_and_routes() -> None:
    example = Path(__file__).parents[2] / "examples" / "agent" / "inventory.yaml"
    inv = load_inventory(example, default_registry())
    assert inv.certificates["shop"].placements[0].agent == {"name": "shop-edge"}
    assert inv.certificates["branch-12-vpn"].placements[0].agent == {
        "labels": {"site": "branch-12"},
        "os": "linux",
    }


def test_prune_drops_only_old_journal_entries(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "st")
    state.prepare()
    old, new = "a" * 32, "b" * 32
    state.journal(old, {}, None)
    state.journal(new, {}, None)
    now = 1_000_000_000.0
    os.utime(tmp_path / "st" / "jobs" / f"{old}.json", (now - 8 * 86400, now - 8 * 86400))
    os.utime(tmp_path / "st" / "jobs" / f"{new}.json", (now - 3600, now - 3600))
    assert state.prune(7 * 86400, now) == [old]
    assert state.journaled_jobs() == [new]


def test_backoff_honours_retry_after_and_the_cap(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from certctl.agent.client import Agent, AgentSettings

    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def go() -> None:
        cred = Credential("a" * 32, "edge1", "http://127.0.0.1:1", Ed25519PrivateKey.generate())
        settings = AgentSettings(backoff_base_s=1.0, backoff_cap_s=60.0)
        agent = Agent(AgentState(tmp_path), cred, settings, rng=random.Random(1), sleep=sleep)
        await agent._backoff(1, 7.0)  # Retry-After 7 s beats a jitter of at most 1 s
        await agent._backoff(30, None)  # capped
        await agent._backoff(1, 3600.0)  # a Retry-After beyond the cap waits the cap
        agent.stop()
        await agent._backoff(3, None)  # stopping: returns at once

    asyncio.run(go())
    assert slept[0] == 7.0
    assert 0 <= slept[1] <= 60.0
    assert slept[2] == 60.0


def _issued(tmp_path: Path) -> tuple[bytes, SecretBytes]:
    """A self-signed leaf and its key (what the server would have issued)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    from certctl import pki
    from certctl.model import KeySpec

    key = pki.generate_key(KeySpec())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.test")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(NOW)
        .not_valid_after(NOW.replace(year=2027))
        .sign(key, hashes.SHA256())
    )
    return pki.cert_pem(cert), pki.key_to_pem(key)


def test_deployer_runs_the_service_target_locally_and_rolls_back(tmp_path: Path) -> None:
    cert_pem, key_pem = _issued(tmp_path)
    root = tmp_path / "tls"
    root.mkdir()
    (root / "x.crt").write_bytes(b"old certificate\n")
    config = {
        "root": str(root),
        "fullchain_path": "x.crt",
        "key_path": "x.key",
        "validate": ["false"],  # the service refuses the new files
        "reload": ["true"],
    }
    job = {"certificate": "x", "placement": "svc", "target": {"type": "ssh", "config": config}}
    out = asyncio.run(Deployer(tmp_path).deploy(job, cert_pem, b"", key_pem, 1))
    assert not out.ok and out.detail.startswith("commit failed")
    assert (root / "x.crt").read_bytes() == b"old certificate\n"  # rolled back
    assert not (root / "x.key").exists()
    assert key_pem.reveal().decode().splitlines()[1] not in out.detail

    config["validate"] = ["true"]
    out = asyncio.run(Deployer(tmp_path).deploy(job, cert_pem, b"", key_pem, 1))
    assert out.ok and out.verify is not None and out.verify["ok"] is True
    assert (root / "x.crt").read_bytes() == cert_pem
    assert (root / "x.key").read_bytes() == key_pem.reveal()
    assert (root / "x.key").stat().st_mode & 0o077 == 0
    from certctl import pki

    assert out.fingerprint == pki.fingerprint(pki.load_cert_pem(cert_pem))


def test_deployer_refuses_hostile_paths_before_touching_anything(tmp_path: Path) -> None:
    cert_pem, key_pem = _issued(tmp_path)
    config = {"root": str(tmp_path / "tls"), "cert_path": "../../etc/evil.pem"}
    job = {"certificate": "x", "placement": "f", "target": {"type": "file", "config": config}}
    out = asyncio.run(Deployer(tmp_path).deploy(job, cert_pem, b"", key_pem, 1))
    assert not out.ok and "evil" in out.detail
    assert not (tmp_path / "tls").exists()


def test_rotation_never_reuses_the_live_key_of_the_wanted_type(tmp_path: Path) -> None:
    from certctl import pki
    from certctl.model import KeySpec

    _, key_pem = _issued(tmp_path)
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "x.key").write_bytes(key_pem.reveal())
    config = {"root": str(tmp_path / "tls"), "key_path": "x.key", "cert_path": "x.pem"}
    job = {"target": {"type": "file", "config": config}}
    deployer = Deployer(tmp_path)
    assert deployer.reusable_key(job, KeySpec("ecdsa", 256, "never")) == key_pem
    assert deployer.reusable_key(job, KeySpec("rsa", 2048, "never")) is None  # another type
    config["key_path"] = "missing.key"
    assert deployer.reusable_key(job, KeySpec("ecdsa", 256, "never")) is None
    assert pki.load_key_pem(key_pem) is not None


def test_example_service_files_are_valid(tmp_path: Path) -> None:
    import plistlib
    import shutil
    import subprocess

    examples = Path(__file__).parents[2] / "examples" / "agent"
    plist = plistlib.loads((examples / "com.certctl.agent.plist").read_bytes())
    assert plist["ProgramArguments"][1:3] == ["agent", "run"]
    unit = (examples / "certctl-agent.service").read_text()
    assert "ExecStart=/usr/local/bin/certctl agent run" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # ExecStart must name an existing program for `verify`; the rest is checked as is.
    (tmp_path / "certctl-agent.service").write_text(
        unit.replace("/usr/local/bin/certctl", shutil.which("true") or "/bin/true")
    )
    proc = subprocess.run(
        [analyze, "verify", str(tmp_path / "certctl-agent.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_drift_does_not_probe_agent_routed_endpoints(tmp_path: Path) -> None:
    from certctl.model import Certificate, Inventory, Placement
    from certctl.observe.drift import expectations

    verify = {"verify": {"endpoint": "127.0.0.1:443", "sni": "a.test"}}
    routed = Placement("edge", "nginx", None, verify, agent={"name": "edge1"})
    direct = Placement("web", "nginx", None, verify)
    certs = {
        "a": Certificate("a", "a.test", placements=(routed,)),
        "b": Certificate("b", "b.test", placements=(direct,)),
    }
    inv = Inventory(tmp_path, certs, {}, {})
    found = expectations(inv, StateSnapshot({}, {}))
    assert [e.cert for e in found] == ["b"]  # the agent's localhost is not the controller's

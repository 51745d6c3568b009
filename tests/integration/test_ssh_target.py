"""SSH / service targets against a real sshd and a real nginx on loopback.

Everything here is real: OpenSSH's sshd (own config, host key and authorized key,
started by the test), asyncssh, nginx (own prefix and config, TLS on a loopback
port), the local CA and the SQLite state store. Because the sshd runs on this
machine, the tests can check the files it wrote directly on disk. Stand-in: the CA
vault in :class:`tests.integration.test_file_target.Materials` is the in-memory
:class:`tests.conformance.StandInVault`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, Material, ObserveItem
from certctl.engine import Engine
from certctl.errors import InventoryError, PermanentError, TransientError
from certctl.model import ActionKind, DeploymentRecord, Placement, TargetState
from certctl.transport.ssh import SSHPool, settings_for
from certctl_connectors.targets.presets import CommandTarget, HAProxyTarget, NginxTarget
from certctl_connectors.targets.ssh import ServiceTarget, fetch_fingerprint
from tests import conformance
from tests.conformance import FixedClock, StandInVault, TargetHarness
from tests.integration.ssh_support import CuttingProxy, HAProxy, Nginx, Sshd
from tests.integration.test_file_target import Materials, snapshot


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    return Materials(tmp_path_factory.mktemp("ca"), name="conf")


def ctx(root: Path) -> ConnectorContext:
    return ConnectorContext(root, FixedClock(), StandInVault(), BatchSyncer("none"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def probe(port: int) -> str | None:
    return asyncio.run(fetch_fingerprint("127.0.0.1", port, None, 5))


async def _closing(target: ServiceTarget, coro: Any) -> Any:
    try:
        return await coro
    finally:
        await target.close()


def run(target: ServiceTarget, coro: Any) -> Any:
    """Run in a fresh loop and close the target's connections in that loop."""
    return asyncio.run(_closing(target, coro))


async def deploy(t: ServiceTarget, p: Placement, m: Material) -> DeploymentRecord:
    staged = await t.stage(p, m)
    try:
        files = await t.commit(staged)
        await t.verify(staged)
    except BaseException:
        await t.rollback(staged)
        raise
    return DeploymentRecord(m.cert, p.id, m.version, m.fingerprint, files)


# ------------------------------------------------------------------ conformance


@pytest.fixture(params=["ssh", "ssh-sudo", "local"])
def harness(
    request: pytest.FixtureRequest, tmp_path: Path, sshd: Sshd, materials: Materials
) -> TargetHarness:
    out = tmp_path / "out"
    config = {
        "root": str(out),
        "cert_path": "conf/cert.pem",
        "fullchain_path": "conf/fullchain.pem",
        "key_path": "conf/key.pem",
        "backups": 2,
    }
    if request.param.startswith("ssh"):
        sudo = request.param == "ssh-sudo"
        placement = Placement("svc", "ssh", "box", config, sshd.connection(sudo=sudo))
    else:
        placement = Placement("svc", "ssh", None, config)
    assert ServiceTarget.check_placement(placement, tmp_path) == []
    target = ServiceTarget("svc", ctx(tmp_path))
    return TargetHarness(target, placement, materials, lambda: snapshot(out))


@pytest.mark.parametrize("check", conformance.TARGET_CHECKS, ids=conformance.check_id)
def test_conformance(check: conformance.TargetCheck, harness: TargetHarness) -> None:
    assert isinstance(harness.target, ServiceTarget)
    run(harness.target, check(harness))


def test_one_connection_per_host_is_shared_by_targets_and_actions(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    shared = ctx(tmp_path)
    generic = ServiceTarget("svc", shared)
    files = CommandTarget("files", shared)  # another target on the same host
    pairs = [
        (
            generic if i % 2 else files,
            Placement(
                "svc" if i % 2 else "files",
                "ssh",
                "box",
                {"root": str(tmp_path / f"o{i}"), "cert_path": "c.pem", "key_path": "k.pem"},
                sshd.connection(),
            ),
        )
        for i in range(6)
    ]

    async def go() -> int:
        await asyncio.gather(*(deploy(t, p, materials(1)) for t, p in pairs))
        return generic._runtime().pool.connects

    assert run(generic, go()) == 1
    for i in range(6):
        assert (tmp_path / f"o{i}" / "c.pem").read_bytes() == materials(1).cert_pem


# ------------------------------------------------------------------ host keys


def _connect(conn: dict[str, Any]) -> str:
    async def go() -> str:
        pool = SSHPool()
        try:
            res = await pool.host(settings_for(conn)).run(["echo", "ok"], 10)
            return res.output.strip()
        finally:
            await pool.close()

    return asyncio.run(go())


def test_unknown_host_key_is_refused_naming_host_and_fingerprint(
    tmp_path: Path, sshd: Sshd
) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(PermanentError) as err:
        _connect(sshd.connection("web9", known_hosts=str(empty)))
    msg = str(err.value)
    assert "unknown host key" in msg and "web9" in msg and sshd.fingerprint in msg
    assert empty.read_text() == ""  # strict: nothing was added


def test_changed_host_key_is_refused(tmp_path: Path, sshd: Sshd) -> None:
    import asyncssh

    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key("openssh").decode()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {other}")
    for policy in ("strict", "accept-new"):
        with pytest.raises(PermanentError) as err:
            _connect(sshd.connection(known_hosts=str(kh), host_key_policy=policy))
        assert "CHANGED" in str(err.value) and sshd.fingerprint in str(err.value)


def test_accept_new_records_the_key_then_strict_trusts_it(tmp_path: Path, sshd: Sshd) -> None:
    kh = tmp_path / "sub" / "known_hosts"
    assert _connect(sshd.connection(known_hosts=str(kh), host_key_policy="accept-new")) == "ok"
    assert sshd.host_public.split()[1] in kh.read_text()
    assert _connect(sshd.connection(known_hosts=str(kh))) == "ok"


def test_pinned_fingerprints(tmp_path: Path, sshd: Sshd) -> None:
    nowhere = str(tmp_path / "none")
    assert (
        _connect(sshd.connection(known_hosts=nowhere, host_key_fingerprints=[sshd.fingerprint]))
        == "ok"
    )
    wrong = "SHA256:" + "A" * 43
    with pytest.raises(PermanentError, match="pinned"):
        _connect(sshd.connection(known_hosts=nowhere, host_key_fingerprints=[wrong]))


def test_bad_key_file_is_a_permanent_auth_error(tmp_path: Path, sshd: Sshd) -> None:
    import asyncssh

    stranger = tmp_path / "stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    with pytest.raises(PermanentError, match="authentication failed"):
        _connect(sshd.connection(key_file=str(stranger)))


def test_nothing_listening_is_transient(tmp_path: Path, sshd: Sshd) -> None:
    from tests.integration.ssh_support import free_port

    conn = sshd.connection()
    conn["vars"]["ssh"]["port"] = free_port()
    with pytest.raises(TransientError):
        _connect(conn)


# ------------------------------------------------------------------ faults


def test_connection_dropped_mid_deploy_keeps_old_files_and_rerun_converges(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    out = tmp_path / "out"
    config = {"root": str(out), "fullchain_path": "fc.pem", "key_path": "k.pem"}
    p = Placement("svc", "ssh", "box", config, sshd.connection())
    target = ServiceTarget("svc", ctx(tmp_path))
    rec1 = run(target, deploy(target, p, materials(1)))
    before = {n: sha(out / n) for n in ("fc.pem", "k.pem")}

    async def interrupted() -> None:
        staged = await target.stage(p, materials(2))
        assert any(".certctl-" in n for n in os.listdir(out))  # temps uploaded
        assert sshd.kill_sessions() >= 1  # the server side of our connection dies
        with pytest.raises(TransientError):
            await target.commit(staged)

    run(target, interrupted())
    assert {n: sha(out / n) for n in ("fc.pem", "k.pem")} == before  # old files in place
    (obs,) = target.observe([ObserveItem(p, "conf", materials(2).fingerprint, rec1)])
    assert obs.state is TargetState.DIFFERS
    rec2 = run(target, deploy(target, p, materials(2)))  # the rerun
    assert (out / "fc.pem").read_bytes() == materials(2).fullchain_pem
    assert not [n for n in os.listdir(out) if ".certctl-" in n]  # stale temps removed
    (obs,) = target.observe([ObserveItem(p, "conf", materials(2).fingerprint, rec2)])
    assert obs.state is TargetState.MATCH


def test_hostile_command_arguments_stay_literal(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    out = tmp_path / "out"
    marks = tmp_path / "marks"
    marks.mkdir()
    config = {
        "root": str(out),
        "cert_path": "c.pem",
        "reload": ["touch", "--", f"{marks}/$(id)", f"{marks}/a;b c", f"{marks}/x\ny"],
    }
    p = Placement("svc", "ssh", "box", config, sshd.connection())
    assert ServiceTarget.check_placement(p, tmp_path) == []
    target = ServiceTarget("svc", ctx(tmp_path))
    run(target, deploy(target, p, materials(1)))
    assert sorted(os.listdir(marks)) == sorted(["$(id)", "a;b c", "x\ny"])


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cert_path", "c.pem;touch /tmp/pwned"),
        ("cert_path", "$(id).pem"),
        ("cert_path", "a b.pem"),
        ("cert_path", "c.pem\nx"),
        ("root", "/srv/`id`"),
        ("cert_path", "../../etc/passwd"),
    ],
)
def test_hostile_paths_are_refused_at_validation(
    tmp_path: Path, sshd: Sshd, key: str, value: str
) -> None:
    config = {"root": "/srv/tls", "cert_path": "c.pem", key: value}
    problems = ServiceTarget.check_placement(
        Placement("svc", "ssh", "box", config, sshd.connection()), tmp_path
    )
    assert problems, (key, value)


@pytest.mark.parametrize(
    "ssh",
    [
        {"address": "127.0.0.1;id"},
        {"address": "-oProxyCommand=id"},
        {"port": "22; id"},
        {"user": "root$(id)"},
        {"host_key_policy": "yolo"},
        {"host_key_fingerprints": ["md5:aa"]},
        {"surprise": 1},
    ],
)
def test_hostile_ssh_vars_are_refused(tmp_path: Path, ssh: dict[str, Any]) -> None:
    conn = {"name": "box", "address": "127.0.0.1", "vars": {"ssh": ssh}}
    p = Placement("svc", "ssh", "box", {"root": "/srv", "cert_path": "c.pem"}, conn)
    assert ServiceTarget.check_placement(p, tmp_path)


def test_flat_ssh_vars_override_the_group_mapping() -> None:
    s = settings_for(
        {
            "name": "web1",
            "address": "10.0.0.5",
            "vars": {"ssh": {"user": "deploy", "port": 2222}, "ssh_port": 2200},
        }
    )
    assert (s.address, s.port, s.user) == ("10.0.0.5", 2200, "deploy")


# ------------------------------------------------------------------ engine + nginx

INVENTORY = """
defaults: {{issuer: ca, profile: tls, ttl: 30d, key: {{type: ecdsa, curve: P-256}}}}
issuers:
  ca: {{type: local_ca, root: {{common_name: SSH Test Root}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 90d}}
hosts:
  box:
    address: 127.0.0.1
    vars: {{ssh_port: {port}}}
groups:
  web:
    hosts: [box]
    vars:
      ssh: {ssh}
targets:
  edge:
    type: nginx
    hosts: web
    root: {certdir}
    fullchain_path: "{{{{ cert.name }}}}.crt"
    key_path: "{{{{ cert.name }}}}.key"
    validate: {validate}
    reload: {reload}
    verify: {{endpoint: "{{{{ host.address }}}}:{nginx_port}", sni: "{{{{ cert.common_name }}}}"}}
certificates:
  web:
    common_name: {cn}
    targets: [edge]
"""


def write_inventory(inv: Path, sshd: Sshd, nginx: Nginx, cn: str = "web.ssh.test") -> None:
    inv.mkdir(exist_ok=True)
    ssh = sshd.ssh_vars()
    ssh.pop("port")
    (inv / "inventory.yaml").write_text(
        INVENTORY.format(
            port=sshd.port,
            ssh=json.dumps(ssh),
            certdir=nginx.certdir,
            validate=json.dumps(nginx.validate),
            reload=json.dumps(nginx.reload),
            nginx_port=nginx.port,
            cn=cn,
        )
    )


def current_fp(engine: Engine) -> str:
    cur = engine.store().snapshot().certs["web"].current
    assert cur is not None
    return cur.fingerprint


def test_apply_over_ssh_nginx_serves_the_new_certificate_and_heals_drift(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    engine = Engine(inv, sync_mode="none")
    try:
        placement = engine.inventory().certificates["web"].placements[0]
        assert placement.id == "edge@box" and placement.connection["address"] == "127.0.0.1"
        assert probe(nginx.port) == nginx.initial_fingerprint
        _, report = engine.apply()
        assert report is not None and not report.failed, report and report.failed
        fp = current_fp(engine)
        assert probe(nginx.port) == fp  # the live endpoint serves what certctl deployed
        assert (nginx.certdir / "web.crt.bak.1").exists()  # the initial file is kept
        plan, _ = engine.plan()
        assert plan.actions == ()

        # someone edits the deployed file on the host: plan notices and redeploys
        with (nginx.certdir / "web.crt").open("ab") as f:
            f.write(b"\n# edited by hand\n")
        plan, _ = engine.plan()
        (action,) = plan.actions
        assert action.kind is ActionKind.DEPLOY and action.placement == "edge@box"
        assert "content on target differs" in action.reasons[0].message
        _, report = engine.apply()
        assert report is not None and not report.failed
        assert b"edited by hand" not in (nginx.certdir / "web.crt").read_bytes()
        assert engine.plan()[0].actions == ()
        assert probe(nginx.port) == fp
    finally:
        engine.close()


def test_failing_nginx_validation_rolls_back_and_old_cert_is_still_served(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    engine = Engine(inv, sync_mode="none")
    _, report = engine.apply()
    assert report is not None and not report.failed
    served = probe(nginx.port)
    assert served == current_fp(engine)
    files = {n: sha(nginx.certdir / n) for n in ("web.crt", "web.key")}
    engine.close()

    nginx.extra.write_text("this_is_not_a_directive on;\n")  # `nginx -t` now fails
    write_inventory(inv, sshd, nginx, cn="renamed.ssh.test")  # names changed: renew
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None
        (failed,) = report.failed
        assert failed.action.kind is ActionKind.DEPLOY
        assert "validate failed on box" in (failed.error or "")
        assert "this_is_not_a_directive" in (failed.error or "")
        assert "PRIVATE KEY" not in (failed.error or "")
        assert {n: sha(nginx.certdir / n) for n in ("web.crt", "web.key")} == files
        assert not [n for n in os.listdir(nginx.certdir) if ".certctl-" in n]
        assert probe(nginx.port) == served  # nginx still serves the old certificate

        nginx.extra.write_text("")  # fixed: the next run deploys the new version
        engine.close()
        engine = Engine(inv, sync_mode="none")
        _, report = engine.apply()
        assert report is not None and not report.failed
        assert probe(nginx.port) == current_fp(engine) != served
    finally:
        engine.close()


def test_hostile_path_in_inventory_is_an_inventory_error(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    text = (inv / "inventory.yaml").read_text()
    (inv / "inventory.yaml").write_text(
        text.replace('key_path: "{{ cert.name }}.key"', 'key_path: "$(reboot).key"')
    )
    with pytest.raises(InventoryError, match="not allowed in a deployment path"):
        Engine(inv).inventory()


def test_local_nginx_preset_deploys_without_ssh(
    tmp_path: Path, nginx: Nginx, materials: Materials
) -> None:
    config = {
        "root": str(nginx.certdir),
        "fullchain_path": "web.crt",
        "key_path": "web.key",
        "validate": nginx.validate,
        "reload": nginx.reload,
        "verify": {"endpoint": f"127.0.0.1:{nginx.port}"},
    }
    p = Placement("edge", "nginx", None, config)
    assert NginxTarget.check_placement(p, tmp_path) == []
    target = NginxTarget("edge", ctx(tmp_path))
    run(target, deploy(target, p, materials(3)))
    assert probe(nginx.port) == materials(3).fingerprint


def test_haproxy_preset_deploys_a_combined_pem_over_ssh(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    proxy = HAProxy(tmp_path / "haproxy", tmp_path / "certs")
    try:
        assert probe(proxy.port) == proxy.initial_fingerprint
        config: dict[str, Any] = {
            "root": str(proxy.certdir),
            "combined_path": "web.pem",
            "validate": proxy.validate,
            "reload": proxy.reload,
            "verify": {"endpoint": f"127.0.0.1:{proxy.port}", "timeout": 20},
        }
        p = Placement("lb", "haproxy", "box", config, sshd.connection())
        assert HAProxyTarget.check_placement(p, tmp_path) == []
        missing = {k: v for k, v in config.items() if k != "combined_path"}
        missing["cert_path"] = "c.pem"
        assert HAProxyTarget.check_placement(
            Placement("lb", "haproxy", "box", missing, sshd.connection()), tmp_path
        ) == ["a haproxy target needs combined_path"]
        target = HAProxyTarget("lb", ctx(tmp_path))
        run(target, deploy(target, p, materials(2)))
        m = materials(2)
        assert m.key_pem is not None
        assert proxy.pem.read_bytes() == m.cert_pem + m.chain_pem + m.key_pem.reveal()
        assert probe(proxy.port) == m.fingerprint
    finally:
        proxy.stop()


def test_session_cap_serialises_commands_on_a_host(tmp_path: Path, sshd: Sshd) -> None:
    """With max_sessions 1, commands that would collide if they overlapped (each
    holds a mkdir lock while it runs) all succeed."""
    lock = tmp_path / "lock"
    script = f'mkdir "{lock}" || exit 7; sleep 0.2; rmdir "{lock}"'

    async def go() -> list[int]:
        pool = SSHPool()
        try:
            host = pool.host(settings_for(sshd.connection(max_sessions=1)))
            results = await asyncio.gather(*(host.run(["sh", "-c", script], 30) for _ in range(4)))
            return [r.status for r in results]
        finally:
            await pool.close()

    assert asyncio.run(go()) == [0, 0, 0, 0]


def test_unreachable_host_observes_unknown(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    from tests.integration.ssh_support import free_port

    conn = sshd.connection()
    conn["vars"]["ssh"]["port"] = free_port()
    target = ServiceTarget("svc", ctx(tmp_path))
    items = [
        ObserveItem(
            Placement("svc", "ssh", "box", {"root": f"/srv/{i}", "cert_path": "c.pem"}, conn),
            f"c{i}",
            materials(1).fingerprint,
            None,
        )
        for i in range(3)
    ]
    obs = target.observe(items)
    assert [o.cert for o in obs] == ["c0", "c1", "c2"]
    assert all(o.state is TargetState.UNKNOWN and "cannot read back" in o.detail for o in obs)


def test_sudo_writes_through_fixed_commands_with_owner_and_mode(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    out = tmp_path / "out"
    config = {
        "root": str(out),
        "cert_path": "tls/c.pem",
        "key_path": "tls/k.pem",
        "owner": "nobody",
        "group": nobody.pw_gid,
        "key_mode": "0640",
    }
    p = Placement("svc", "ssh", "box", config, sshd.connection(sudo=True))
    target = ServiceTarget("svc", ctx(tmp_path))
    rec = run(target, deploy(target, p, materials(1)))
    key = (out / "tls" / "k.pem").lstat()
    assert (key.st_uid, key.st_gid, key.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o640)
    assert (out / "tls" / "c.pem").lstat().st_mode & 0o777 == 0o644
    mine = f".certctl-upload-{os.getpid()}-"  # other test runs may share this home
    assert not [n for n in os.listdir(Path.home()) if n.startswith(mine)]
    (obs,) = target.observe([ObserveItem(p, "conf", materials(1).fingerprint, rec)])
    assert obs.state is TargetState.MATCH


def test_sudo_reads_fall_back_to_sudo_when_sftp_is_denied(
    tmp_path: Path, sshd: Sshd, materials: Materials, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STAND-IN for an unprivileged login user (the test sshd logs in as the test's
    own user): SFTP stat/read/list answer "permission denied", as they would on
    root-only files, so the real ``sudo stat`` / ``cat`` / ``ls`` fallbacks run."""
    import asyncssh

    from certctl.transport.ssh import SSHHost

    async def denied(self: SSHHost, path: str) -> Any:
        try:
            raise asyncssh.SFTPPermissionDenied("Permission denied")
        except asyncssh.SFTPPermissionDenied as exc:
            raise PermanentError(f"{path}: permission denied") from exc

    for name in ("lstat", "read", "listdir"):
        monkeypatch.setattr(SSHHost, name, denied)
    out = tmp_path / "out"
    config = {"root": str(out), "cert_path": "c.pem", "key_path": "k.pem", "backups": 1}
    p = Placement("svc", "ssh", "box", config, sshd.connection(sudo=True))
    target = ServiceTarget("svc", ctx(tmp_path))
    run(target, deploy(target, p, materials(1)))
    rec = run(target, deploy(target, p, materials(2)))
    assert (out / "c.pem").read_bytes() == materials(2).cert_pem
    assert (out / "c.pem.bak.1").read_bytes() == materials(1).cert_pem
    (obs,) = target.observe([ObserveItem(p, "conf", materials(2).fingerprint, rec)])
    assert obs.state is TargetState.MATCH


def test_connection_cut_mid_upload_leaves_old_files_and_rerun_converges(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    proxy = CuttingProxy(sshd.port)
    try:
        conn = sshd.connection(host_key_fingerprints=[sshd.fingerprint])
        conn["vars"]["ssh"]["port"] = proxy.port
        out = tmp_path / "out"
        config = {"root": str(out), "fullchain_path": "fc.pem", "key_path": "k.pem"}
        p = Placement("svc", "ssh", "box", config, conn)
        target = ServiceTarget("svc", ctx(tmp_path))
        run(target, deploy(target, p, materials(1)))
        before = {n: sha(out / n) for n in ("fc.pem", "k.pem")}

        async def cut() -> None:
            host = target._host(target._runtime(), p)
            await host.run(["true"], 10)  # key exchange and auth are done
            proxy.arm(1000)  # the next large client->server chunk: the first upload
            with pytest.raises(TransientError, match="connection lost while trying to write"):
                await target.stage(p, materials(2))

        run(target, cut())
        assert proxy.cuts == 1
        assert {n: sha(out / n) for n in ("fc.pem", "k.pem")} == before
        rec = run(target, deploy(target, p, materials(2)))  # the rerun
        assert (out / "fc.pem").read_bytes() == materials(2).fullchain_pem
        assert not [n for n in os.listdir(out) if ".certctl-" in n]
        (obs,) = target.observe([ObserveItem(p, "conf", materials(2).fingerprint, rec)])
        assert obs.state is TargetState.MATCH
    finally:
        proxy.close()


def test_stale_endpoint_is_noticed_by_plan_and_healed_by_a_reload(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    """Files deployed but nginx never reloaded: the plan sees the live endpoint serve
    another certificate, and apply reloads (no file is rewritten)."""
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    text = (inv / "inventory.yaml").read_text()
    lines = text.splitlines(keepends=True)
    without = "".join(
        "    reload: []\n" if line.startswith("    reload:") else line
        for line in lines
        if not line.startswith("    verify:")
    )
    (inv / "inventory.yaml").write_text(without)
    engine = Engine(inv, sync_mode="none")
    _, report = engine.apply()
    assert report is not None and not report.failed
    fp = current_fp(engine)
    assert probe(nginx.port) == nginx.initial_fingerprint  # never reloaded
    engine.close()

    (inv / "inventory.yaml").write_text(text)  # reload and verify configured again
    engine = Engine(inv, sync_mode="none")
    try:
        mtime = (nginx.certdir / "web.crt").stat().st_mtime_ns
        plan, _ = engine.plan()
        (action,) = plan.actions
        assert action.kind is ActionKind.DEPLOY
        assert "live endpoint" in action.reasons[0].message
        _, report = engine.apply()
        assert report is not None and not report.failed
        assert probe(nginx.port) == fp
        assert (nginx.certdir / "web.crt").stat().st_mtime_ns == mtime  # not rewritten
        assert engine.plan()[0].actions == ()
    finally:
        engine.close()

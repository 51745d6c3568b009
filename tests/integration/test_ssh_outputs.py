"""Envoy's SDS file and JKS keystores (built by the host's ``keytool``), over real SSH.

Real parts: OpenSSH's sshd on loopback, the JDK's ``keytool`` on the "host" (this
machine), the local CA (:class:`tests.integration.test_file_target.Materials`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from certctl.connectors import ObserveItem
from certctl.errors import PermanentError
from certctl.model import Placement, TargetState
from certctl_connectors.targets.presets import EnvoyTarget, NginxTarget
from certctl_connectors.targets.ssh import ServiceTarget
from tests.integration.ssh_support import Sshd
from tests.integration.test_file_target import Materials
from tests.integration.test_ssh_target import ctx, deploy, run

KEYTOOL = "/usr/bin/keytool"


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory) -> Materials:
    return Materials(tmp_path_factory.mktemp("ca"), name="app")


@pytest.mark.parametrize("sds", ["envoy/sds.json", "envoy/sds.yaml"])
def test_envoy_sds_file_names_the_deployed_files(
    tmp_path: Path, sshd: Sshd, materials: Materials, sds: str
) -> None:
    out = tmp_path / "out"
    config = {
        "root": str(out),
        "fullchain_path": "envoy/app.crt",
        "key_path": "envoy/app.key",
        "sds_path": sds,
        "sds_name": "app_tls",
    }
    p = Placement("edge", "envoy", "box", config, sshd.connection())
    assert EnvoyTarget.check_placement(p, tmp_path) == []
    target = EnvoyTarget("edge", ctx(tmp_path))
    m = materials(1)
    rec = run(target, deploy(target, p, m))
    text = (out / sds).read_text()
    doc = json.loads(text) if sds.endswith(".json") else yaml.safe_load(text)
    (secret,) = doc["resources"]
    assert secret["@type"].endswith("envoy.extensions.transport_sockets.tls.v3.Secret")
    assert secret["name"] == "app_tls"
    tls = secret["tls_certificate"]
    assert tls["certificate_chain"]["filename"] == str(out / "envoy/app.crt")
    assert tls["private_key"]["filename"] == str(out / "envoy/app.key")
    assert (out / "envoy/app.crt").read_bytes() == m.fullchain_pem
    assert set(rec.files) == {"fullchain", "key", "sds"}
    assert (out / sds).stat().st_mode & 0o777 == 0o644
    assert "PRIVATE KEY" not in text

    # the SDS file is watched by envoy: a renewal rewrites chain and key, not it
    before = (out / sds).stat().st_mtime_ns
    run(target, deploy(target, p, materials(2)))
    assert (out / sds).stat().st_mtime_ns == before
    assert (out / "envoy/app.crt").read_bytes() == materials(2).fullchain_pem


def test_envoy_sds_needs_the_files_it_points_at(tmp_path: Path) -> None:
    p = Placement("edge", "envoy", None, {"root": "o", "fullchain_path": "c", "sds_path": "s"})
    assert "needs key_path" in " ".join(EnvoyTarget.check_placement(p, tmp_path))
    ok = Placement("edge", "envoy", None, {**p.config, "key_path": "k"})
    assert EnvoyTarget.check_placement(ok, tmp_path) == []


def keytool_list(path: Path, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KEYTOOL, "-list", "-keystore", str(path), "-storepass", password, "-storetype", "JKS"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_jks_keystore_is_built_by_the_hosts_keytool(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    assert os.access(KEYTOOL, os.X_OK), "the JDK's keytool is needed (scripts/test-deps.sh)"
    out = tmp_path / "out"
    config = {
        "root": str(out),
        "fullchain_path": "app.crt",
        "key_path": "app.key",
        "jks_path": "java/app.jks",
        "jks_password": "s3cret-store",
        "jks_alias": "tomcat",
    }
    p = Placement("app", "ssh", "box", config, sshd.connection())
    assert ServiceTarget.check_placement(p, tmp_path) == []
    target = ServiceTarget("app", ctx(tmp_path))
    run(target, deploy(target, p, materials(1)))
    jks = out / "java/app.jks"
    assert jks.stat().st_mode & 0o777 == 0o600
    listed = keytool_list(jks, "s3cret-store")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "tomcat" in listed.stdout and "PrivateKeyEntry" in listed.stdout
    assert keytool_list(jks, "wrong-password").returncode != 0
    assert not [n for n in os.listdir(jks.parent) if ".certctl-" in n]  # no work dir left

    # the keystore holds the deployed certificate
    rfc = subprocess.run(
        [
            KEYTOOL,
            "-exportcert",
            "-rfc",
            "-alias",
            "tomcat",
            "-keystore",
            str(jks),
            "-storepass",
            "s3cret-store",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert rfc.stdout.split() == materials(1).cert_pem.decode().split()

    # observe reads it back by its recorded hash
    record = run(target, deploy(target, p, materials(2)))
    obs = target.observe([ObserveItem(p, "app", materials(2).fingerprint, record)])
    assert obs[0].state is TargetState.MATCH, obs[0].detail
    assert (jks.parent / "app.jks.bak.1").exists()


def test_missing_keytool_is_a_clear_error_at_plan_and_deploy(
    tmp_path: Path, sshd: Sshd, materials: Materials
) -> None:
    out = tmp_path / "out"
    config = {
        "root": str(out),
        "cert_path": "app.crt",
        "jks_path": "app.jks",
        "jks_password": "s3cret-store",
        "keytool": "/nonexistent/jdk/bin/keytool",
    }
    p = Placement("app", "ssh", "box", config, sshd.connection())
    target = ServiceTarget("app", ctx(tmp_path))
    (obs,) = target.observe([ObserveItem(p, "app", None, None)])
    assert obs.state is TargetState.UNKNOWN
    assert "keytool, which is not installed on box" in (obs.detail or "")
    with pytest.raises(PermanentError, match="keytool, which is not installed"):
        run(target, deploy(target, p, materials(1)))
    assert not out.exists() or not [n for n in os.listdir(out) if not n.startswith(".")]


def test_jks_configuration_is_validated(tmp_path: Path) -> None:
    def problems(cls: type[ServiceTarget], **config: object) -> list[str]:
        return cls.check_placement(Placement("t", cls.type_name, None, config), tmp_path)

    assert problems(ServiceTarget, root="o", jks_path="a.jks", jks_password="changeit") == []
    assert "jks_password" in " ".join(problems(ServiceTarget, root="o", jks_path="a.jks"))
    assert problems(
        NginxTarget, root="o", cert_path="c", key_path="k", jks_path="a;b", jks_password="x"
    )
    assert problems(
        ServiceTarget, root="o", jks_path="../../a.jks", jks_password="changeit"
    )  # escapes the root
    placement = Placement("t", "ssh", None, {"root": "o", "key_path": "k", "jks_path": "a.jks"})
    assert "jks_path needs the private key" in " ".join(
        ServiceTarget.check_key_custody(placement, tmp_path)
    )

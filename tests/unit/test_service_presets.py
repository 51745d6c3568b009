"""Service presets: registered once each, thin defaults over the one mechanism."""

from __future__ import annotations

from pathlib import Path

import pytest

from certctl.connectors import Registry
from certctl.model import Placement
from certctl_connectors.targets import presets
from certctl_connectors.targets.ssh import ServiceTarget, _argv

TYPES = [
    "ssh",
    "nginx",
    "haproxy",
    "apache",
    "postfix",
    "dovecot",
    "traefik",
    "caddy",
    "envoy",
    "command",
]


def test_presets_are_registered_service_targets() -> None:
    reg = Registry().load_builtin()
    for name in TYPES:
        assert issubclass(reg.targets[name], ServiceTarget), name
        assert reg.targets[name].config_schema["properties"]["type"] == {"const": name}


@pytest.mark.parametrize(
    ("cls", "validate", "reload"),
    [
        (presets.NginxTarget, ["nginx", "-t"], ["nginx", "-s", "reload"]),
        (presets.ApacheTarget, ["apachectl", "configtest"], ["apachectl", "graceful"]),
        (presets.PostfixTarget, ["postfix", "check"], ["postfix", "reload"]),
        (presets.TraefikTarget, [], []),
    ],
)
def test_defaults_and_overrides(
    cls: type[ServiceTarget], validate: list[str], reload: list[str]
) -> None:
    assert _argv({}, "validate", cls.default_validate) == validate
    assert _argv({}, "reload", cls.default_reload) == reload
    own = {"reload": ["systemctl", "reload", "x"], "validate": []}
    assert _argv(own, "reload", cls.default_reload) == ["systemctl", "reload", "x"]
    assert _argv(own, "validate", cls.default_validate) == []


def test_required_files_and_command_shapes(tmp_path: Path) -> None:
    def problems(cls: type[ServiceTarget], **config: object) -> list[str]:
        return cls.check_placement(Placement("t", cls.type_name, None, config), tmp_path)

    assert problems(presets.NginxTarget, root="o", fullchain_path="f.pem", key_path="k") == []
    assert problems(presets.NginxTarget, root="o", fullchain_path="f.pem") == [
        "a nginx target needs key_path or combined_path"
    ]
    assert problems(presets.HAProxyTarget, root="o", combined_path="lb.pem") == []
    assert problems(presets.CommandTarget, root="o", cert_path="c", reload="nginx -s reload")
    assert problems(presets.CommandTarget, root="o", cert_path="c", reload=["-rf", "/"])
    assert problems(presets.CommandTarget, root="o", cert_path="c", reload=["x", "a\x00b"])
    assert problems(
        presets.NginxTarget, root="o", cert_path="c", key_path="k", verify={"endpoint": "nohost"}
    )


def test_example_inventory_binds_hosts_with_merged_ssh_vars() -> None:
    from certctl.connectors import default_registry
    from certctl.inventory import load_inventory
    from certctl.transport.ssh import settings_for

    root = Path(__file__).resolve().parents[2] / "examples" / "ssh-nginx"
    inv = load_inventory(root, default_registry(root))
    www = inv.certificates["www"]
    assert [p.id for p in www.placements] == ["edge@web1", "edge@web2", "edge@web3"]
    web1, _, web3 = (settings_for(p.connection) for p in www.placements)
    assert (web1.address, web1.port, web1.user, web1.sudo) == ("10.0.1.11", 22, "deploy", True)
    assert (web3.address, web3.port, web3.user) == ("10.0.1.13", 2222, "deploy")
    assert web3.fingerprints and not web1.fingerprints
    assert www.placements[0].config["verify"]["endpoint"] == "10.0.1.11:443"

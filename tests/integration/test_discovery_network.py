"""``certctl discover network`` against real TLS listeners on loopback (127.0.0.0/8
only): Python ``ssl`` servers in a child process on several 127.0.0.x addresses,
each serving a leaf and its CA, one of them a name-based virtual host; a socket
that accepts TCP but never speaks TLS; refusals of reserved ranges and the cap."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes

from certctl.cli import cli
from certctl.discovery import network
from certctl.state import open_store
from tests.integration.discovery_support import (
    CA,
    Listener,
    TLSListeners,
    free_ports,
    key_pem,
    pem,
)

INVENTORY = """
issuers:
  ca:
    type: local_ca
    root: {{common_name: Net Inventory Root, key: {{type: ecdsa, curve: P-256}}}}
profiles:
  tls: {{ekus: [serverAuth]}}
defaults: {{issuer: ca, profile: tls, key: {{type: ecdsa, curve: P-256}}}}
certificates: {{}}
endpoints:
  api: {{endpoint: "127.0.0.5:{port}", sni: api.net.test}}
"""


@dataclass
class World:
    inv: Path
    ports: list[int]
    fps: dict[str, str]  # "address:port[/sni]" -> fingerprint served
    silent: socket.socket


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("net")
    ca = CA.new("Net Test Root")
    ports = free_ports(2)
    listeners: list[Listener] = []
    fps: dict[str, str] = {}

    def material(name: str) -> tuple[str, str, str]:
        cert, key = ca.issue(name)
        cf, kf = base / f"{name}.pem", base / f"{name}.key"
        cf.write_bytes(pem(cert) + pem(ca.cert))
        kf.write_bytes(key_pem(key))
        return str(cf), str(kf), cert.fingerprint(hashes.SHA256()).hex()

    for address, port in (
        ("127.0.0.2", ports[0]),
        ("127.0.0.3", ports[1]),
        ("127.0.0.5", ports[0]),
    ):
        cf, kf, fp = material(f"svc-{address.rsplit('.', 1)[1]}.net.test")
        sni = None
        if address == "127.0.0.5":
            vcf, vkf, vfp = material("vhost.net.test")
            sni = {"vhost.net.test": (vcf, vkf)}
            fps[f"{address}:{port}/vhost.net.test"] = vfp
        listeners.append(Listener(address, port, cf, kf, sni))
        fps[f"{address}:{port}"] = fp
    silent = socket.socket()
    silent.bind(("127.0.0.9", ports[1]))
    silent.listen(8)  # accepts TCP (kernel backlog), never answers the ClientHello
    inv = base / "inventory"
    inv.mkdir()
    (inv / "inventory.yaml").write_text(INVENTORY.format(port=ports[0]))
    with TLSListeners(listeners):
        try:
            yield World(inv, ports, fps, silent)
        finally:
            silent.close()


def _run(inv: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)
    return res.exit_code, res.output


def _count(inv: Path) -> int:
    store = open_store(None, inventory_root=inv, pool_size=1, clock=lambda: datetime.now(UTC))
    try:
        return len(store.list_findings(source="network"))
    finally:
        store.close()


def test_scan_finds_every_listener_with_its_chain_and_sni(world: World) -> None:
    p0, p1 = world.ports
    code, out = _run(
        world.inv,
        "discover", "network", "127.0.0.0/28", "--ports", f"{p0},{p1}",
        "--sni", "vhost.net.test", "--timeout", "1", "--format", "json",
    )  # fmt: skip
    assert code == 0, out
    doc = json.loads(out)
    got = {(f["location"], f["sni"]): f for f in doc["findings"]}
    # 127.0.0.5 is an inventory endpoint: probed first with its SNI, then with --sni
    assert got[(f"127.0.0.5:{p0}", "api.net.test")]["fingerprint"] == world.fps[f"127.0.0.5:{p0}"]
    vhost = got[(f"127.0.0.5:{p0}", "vhost.net.test")]
    assert vhost["fingerprint"] == world.fps[f"127.0.0.5:{p0}/vhost.net.test"]
    assert vhost["subject"] == "CN=vhost.net.test"
    # the others are known by no name: the --sni name is sent (and recorded)
    assert got[(f"127.0.0.2:{p0}", "vhost.net.test")]["fingerprint"] == world.fps[f"127.0.0.2:{p0}"]
    assert got[(f"127.0.0.3:{p1}", "vhost.net.test")]["fingerprint"] == world.fps[f"127.0.0.3:{p1}"]
    assert len(got) == 4
    assert all(f["chain_length"] == 2 and f["format"] == "tls" for f in got.values())
    s = doc["summary"]
    assert s["addresses"] == 16 and s["refused"] + s["timed out"] + 4 == s["probes"] == 33
    assert s["timed out"] == 1  # 127.0.0.9 accepts but never speaks TLS
    assert s["recorded"] == 4 and _count(world.inv) == 4
    # rescan: the same rows are updated, none added
    code, _ = _run(
        world.inv, "discover", "network", "127.0.0.0/28", "--ports", f"{p0},{p1}",
        "--sni", "vhost.net.test", "--timeout", "1",
    )  # fmt: skip
    assert code == 0 and _count(world.inv) == 4
    code, out = _run(world.inv, "discovered", "--source", "network", "--unknown-issuer")
    assert code == 0 and "Listed 4 of 4 findings (0 in files, 4 on the network)" in out


def test_library_scan_without_names_sends_no_sni(world: World) -> None:
    p0, _ = world.ports
    res = network.scan(
        network.expand(["127.0.0.2", "127.0.0.5", "127.0.0.6"]),
        network.Options(ports=(p0,), timeout=1.0),
        datetime.now(UTC),
    )
    assert [(f.location, f.sni) for f in res.findings] == [
        (f"127.0.0.2:{p0}", None),
        (f"127.0.0.5:{p0}", None),
    ]
    assert res.probes == 3 and res.refused == 1 and res.tls == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["224.0.0.0/4"], "multicast range (224.0.0.0/4): refused (pass --allow-reserved"),
        (["0.0.0.0/8"], "'this network' range"),
        (["255.255.255.255"], "reserved/broadcast range"),
        (["169.254.0.0/16"], "link-local"),
        (["127.0.0.0/8", "ff02::1"], "multicast range (ff00::/8)"),
        (["10.0.0.0/8"], "covers 16777216 addresses, more than --max-addresses 65536"),
        (["127.0.0.0/28", "--max-addresses", "8"], "covers 16 addresses, more than"),
        (["127.0.0.1", "--ports", "99999"], "--ports: '99999' is outside 1..65535"),
        (["not-an-ip"], "'not-an-ip' is not an IP address or CIDR range"),
    ],
)
def test_refused_scans_change_nothing(world: World, args: list[str], message: str) -> None:
    before = _count(world.inv)
    code, out = _run(world.inv, "discover", "network", *args)
    assert code == 1 and message in out
    assert "Traceback" not in out
    assert _count(world.inv) == before

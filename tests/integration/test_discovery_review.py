"""Regression tests from a hostile review of discovery: file names that are not UTF-8,
a PKCS#12 whose key derivation would run for hours, a certificate replaced at the same
place (the old one must not be reported any more), and IPv4-mapped IPv6 ranges that
would slip reserved IPv4 space past the refusal."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import struct
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from certctl.cli import cli
from certctl.discovery import files, jks, network
from certctl.state import open_store
from certctl.transport.ssh import SSHPool, settings_for
from tests.integration.discovery_support import CA, key_pem, pem
from tests.integration.ssh_support import Sshd

INVENTORY = """
issuers:
  ca: {type: local_ca, root: {common_name: Review Root, key: {type: ecdsa, curve: P-256}}}
profiles:
  tls: {ekus: [serverAuth]}
defaults: {issuer: ca, profile: tls, key: {type: ecdsa, curve: P-256}}
certificates: {}
"""


def _run(inv: Path, *args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("Discovery Review Root")


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    d = tmp_path / "inventory"
    d.mkdir()
    (d / "inventory.yaml").write_text(INVENTORY)
    return d


def test_non_utf8_file_names_are_recorded_escaped(ca: CA, inv: Path, tmp_path: Path) -> None:
    root = tmp_path / "scan"
    root.mkdir()
    leaf, key = ca.issue("latin1.disc.test")
    raw_dir = os.fsencode(root)
    with open(raw_dir + b"/caf\xe9.pem", "wb") as f:  # a Latin-1 name, invalid UTF-8
        f.write(pem(leaf))
    with open(raw_dir + b"/caf\xe9.key", "wb") as f:
        f.write(key_pem(key))
    with open(raw_dir + b"/bad\xff.der", "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.DER)[:-50])  # truncated: a problem
    code, out = _run(inv, "discover", "files", str(root), "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    [finding] = doc["findings"]
    assert finding["location"] == f"{root}/caf\\xe9.pem"
    assert finding["key_path"] == f"{root}/caf\\xe9.key"
    assert [p["location"] for p in doc["problems"]] == [f"{root}/bad\\xff.der"]
    assert doc["summary"]["recorded"] == 1
    code, out = _run(inv, "discovered")
    assert code == 0 and "caf\\xe9.pem" in out


def _p12_bomb(tmp_path: Path) -> bytes:
    """A password-less PKCS#12 (no MAC) whose bags declare 8,388,607 key-derivation
    iterations: OpenSSL would spend seconds per password tried (hours with a 4-byte
    count)."""
    key = tmp_path / "k.pem"
    crt = tmp_path / "c.pem"
    out = tmp_path / "nomac.p12"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", crt, "-subj", "/CN=bomb", "-days", "1"],
        check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "pkcs12", "-export", "-nomac", "-iter", "65536", "-in", crt, "-inkey", key,
         "-passout", "pass:", "-out", out],
        check=True, capture_output=True,
    )  # fmt: skip
    data = out.read_bytes()
    assert data.count(b"\x02\x03\x01\x00\x00") >= 1  # INTEGER 65536
    return data.replace(b"\x02\x03\x01\x00\x00", b"\x02\x03\x7f\xff\xff")


def test_pkcs12_with_an_absurd_iteration_count_is_refused_fast(tmp_path: Path) -> None:
    scan = tmp_path / "scan"
    scan.mkdir()
    (scan / "bomb.p12").write_bytes(_p12_bomb(tmp_path))
    started = time.monotonic()
    result = files.scan_local([str(scan)], files.Options(passwords=("a", "b")), _now())
    elapsed = time.monotonic() - started
    assert result.findings == []
    [problem] = result.problems
    assert "8388607 iterations" in problem.reason and "not opened" in problem.reason
    assert elapsed < 1.0, elapsed  # OpenSSL would take ~1 s per password tried


def test_a_replaced_certificate_is_not_reported_any_more(ca: CA, inv: Path, tmp_path: Path) -> None:
    root = tmp_path / "scan"
    root.mkdir()
    old = ca.issue("old.disc.test", days=5)[0]
    (root / "site.pem").write_bytes(pem(old))
    (root / "other.pem").write_bytes(pem(ca.issue("other.disc.test", days=5)[0]))
    assert _run(inv, "discover", "files", str(root))[0] == 0
    code, out = _run(inv, "discovered", "--expiring", "30d")
    assert code == 0 and "Listed 2 of 2 findings" in out
    # The certificate at site.pem is renewed; other.pem is untouched.
    (root / "site.pem").write_bytes(pem(ca.issue("new.disc.test", days=300)[0]))
    time.sleep(0.01)
    assert _run(inv, "discover", "files", str(root))[0] == 0
    code, out = _run(inv, "discovered", "--expiring", "30d", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["summary"]["findings"] == 2, out
    assert [f["location"] for f in doc["findings"]] == [f"{root}/other.pem"]
    code, out = _run(inv, "discovered")
    assert "old.disc.test" not in out and "new.disc.test" in out


@pytest.mark.parametrize(
    "cidr",
    ["::ffff:224.0.0.1", "::ffff:0.0.0.0/120", "::ffff:255.255.255.255", "::ffff:169.254.1.1",
     "::ffff:0:0/95", "::fffe:0:0/94"],
)  # fmt: skip
def test_ipv4_mapped_ipv6_ranges_do_not_bypass_the_refusal(cidr: str) -> None:
    with pytest.raises(network.ScanRefused, match="--allow-reserved"):
        network.expand([cidr])
    # mapped loopback stays allowed, like 127.0.0.0/8 itself
    assert [str(a) for a in network.expand(["::ffff:127.0.0.1"])] == ["::ffff:7f00:1"]


def _now() -> datetime:
    return datetime.now(UTC)


def test_the_bomb_really_is_slow_for_openssl(tmp_path: Path) -> None:
    """The fixture is what it claims: opened directly, OpenSSL spends a long time on it
    (so the fast refusal above is the cap, not a broken file)."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    data = _p12_bomb(tmp_path)
    started = time.monotonic()
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(data, None)
    assert time.monotonic() - started > 0.3
    assert re.search(rb"\x02\x03\x7f\xff\xff", data)


@pytest.mark.parametrize(
    ("sni", "why"),
    [("x..y", "not a valid host name"), ("a" * 70 + ".test", "not a valid host name"),
     ("1.2.3.4", "never sent as SNI"), ("", "an empty name")],
)  # fmt: skip
def test_a_bad_sni_name_is_refused_before_the_scan(inv: Path, sni: str, why: str) -> None:
    code, out = _run(inv, "discover", "network", "127.0.0.1", "--ports", "1", "--sni", sni)
    assert code != 0 and "--sni" in out and why in out, out
    code, out = _run(inv, "discovered", "--format", "json")
    assert json.loads(out)["summary"]["findings"] == 0  # nothing ran, nothing recorded


def test_roots_given_twice_are_walked_once(ca: CA, tmp_path: Path) -> None:
    root = tmp_path / "scan"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.pem").write_bytes(pem(ca.issue("twice.disc.test")[0]))
    roots = [str(root), str(root / "a"), f"{root}/./a/", str(root / "a" / "x.pem")]
    result = files.scan_local(roots, files.Options(), _now())
    assert [f.location for f in result.findings] == [f"{root}/a/x.pem"]
    assert result.files == 1


def test_an_all_ports_scan_of_a_range_is_refused_by_the_probe_cap(inv: Path) -> None:
    started = time.monotonic()
    code, out = _run(inv, "discover", "network", "127.0.0.0/24", "--ports", "1-65535")
    assert code != 0 and "256 addresses x 65535 ports" in out and "--max-probes" in out, out
    assert time.monotonic() - started < 5
    code, out = _run(
        inv, "discover", "network", "127.0.0.1", "--ports", "1,1,1-3", "--max-probes", "3"
    )
    assert code == 0 and "3 probes" in out, out  # duplicates count once
    code, out = _run(inv, "discover", "network", "127.0.0.1", "--ports", "1-4", "--max-probes", "3")
    assert code != 0 and "--max-probes 3" in out, out


def test_excluded_directories_stay_excluded_through_followed_symlinks(
    ca: CA, tmp_path: Path
) -> None:
    hidden = tmp_path / "excluded"
    hidden.mkdir()
    (hidden / "x.pem").write_bytes(pem(ca.issue("hidden.disc.test")[0]))
    root = tmp_path / "scan"
    root.mkdir()
    (root / "y.pem").write_bytes(pem(ca.issue("shown.disc.test")[0]))
    os.symlink(hidden, root / "link")  # e.g. a link to / that would reach /proc
    opts = files.Options(follow_symlinks=True, excludes=(str(hidden),))
    result = files.scan_local([str(root)], opts, _now())
    assert [f.location for f in result.findings] == [f"{root}/y.pem"]
    assert result.skipped == 1


def _jks_with_aliases(aliases: list[str], der: bytes) -> bytes:
    body = jks.MAGIC_JKS + struct.pack(">II", 2, len(aliases))
    for alias in aliases:
        raw = alias.encode()
        body += struct.pack(">I", 2) + struct.pack(">H", len(raw)) + raw + struct.pack(">Q", 0)
        body += struct.pack(">H", 5) + b"X.509" + struct.pack(">I", len(der)) + der
    return body + hashlib.sha1(b"x", usedforsecurity=False).digest()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_control_characters_in_aliases_are_stored_escaped_on_both_backends(
    request: pytest.FixtureRequest, backend: str, ca: CA, tmp_path: Path
) -> None:
    url = request.getfixturevalue("make_pg_db")() if backend == "postgres" else None
    root = tmp_path / "scan"
    root.mkdir()
    der = ca.issue("alias.disc.test")[0].public_bytes(serialization.Encoding.DER)
    (root / "store.jks").write_bytes(_jks_with_aliases(["a\x00b", "c\x1b[2Jd"], der))
    result = files.scan_local([str(root)], files.Options(), _now())
    locations = sorted(f.location for f in result.findings)
    assert locations == [f"{root}/store.jks#a\\x00b", f"{root}/store.jks#c\\x1b[2Jd"]
    store = open_store(url, inventory_root=tmp_path, pool_size=1, clock=_now)
    try:
        assert store.record_findings(result.findings) == 2
        assert sorted(f.location for f in store.list_findings()) == locations
    finally:
        store.close()


def test_terminal_escapes_in_certificates_never_reach_the_terminal(
    ca: CA, inv: Path, tmp_path: Path
) -> None:
    root = tmp_path / "scan"
    root.mkdir()
    evil = ca.issue("evil\x1b]0;owned\x07\x1b[2J.test")[0]  # a hostile server's subject
    (root / "evil\x1b[31m.pem").write_bytes(pem(evil))
    code, out = _run(inv, "discover", "files", str(root))
    assert code == 0 and "1 certificates found" in out, out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out
    code, out = _run(inv, "discovered")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "evil" in out
    code, out = _run(inv, "discovered", "--format", "json")
    assert "\x1b" not in out and json.loads(out)["summary"]["findings"] == 1


def test_port_lists_are_checked_with_clear_messages() -> None:
    assert network.parse_ports("443, 443,8443,440-443") == (440, 441, 442, 443, 8443)
    for text, why in (
        ("0", "outside 1..65535"),
        ("65536", "outside 1..65535"),
        ("1-100000", "outside 1..65535"),
        ("9010-9000", "from high to low (write 9000-9010)"),
        ("https", "not a port"),
        (",", "no port given"),
    ):
        with pytest.raises(network.ScanRefused, match=re.escape(why)):
            network.parse_ports(text)


def test_remote_walk_records_non_utf8_names_escaped(sshd: Sshd, ca: CA, tmp_path: Path) -> None:
    root = tmp_path / "remote"
    (root / "odd").mkdir(parents=True)
    (root / "fine").mkdir()
    (root / "fine" / "a.pem").write_bytes(pem(ca.issue("fine.disc.test")[0]))
    (root / "odd" / "b.pem").write_bytes(pem(ca.issue("odd.disc.test")[0]))
    with open(os.fsencode(root / "odd") + b"/caf\xe9.pem", "wb") as f:
        f.write(pem(ca.issue("latin1.disc.test")[0]))

    async def go() -> files.ScanResult:
        pool = SSHPool()
        try:
            io = pool.host(settings_for(sshd.connection("box")))
            return await files.scan_remote(io, [str(root)], files.Options(), _now())
        finally:
            await pool.close()

    result = asyncio.run(go())
    assert result.problems == []
    assert [f.location for f in result.findings] == [
        f"{root}/fine/a.pem",
        f"{root}/odd/b.pem",
        f"{root}/odd/caf\\xe9.pem",
    ]

"""``certctl discover files`` over real directories, locally and over SSH.

Real parts: a directory tree with certificates in every format (PEM chains and
bundles, DER, PKCS#12 made by ``cryptography``, a JKS made by the JDK's ``keytool``)
and hostile content: a 1 GiB sparse file, a symlink loop (a directory symlink to an
ancestor, and a symlink to itself), a truncated DER, a PKCS#12 whose password is not
given, a FIFO (which must not hang the walk) and an unreadable file. Root reads any
file whatever its mode, so under root the unreadable-file check runs the walk in a
forked child that has dropped to uid/gid 65534 first (a real EACCES from the kernel).
The CLI runs in-process (click's runner) against a SQLite state; the store methods run
on both backends; the remote walk uses a real sshd on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from certctl.cli import cli
from certctl.discovery import files, report
from certctl.state import open_store
from certctl.transport.ssh import SSHPool, settings_for
from tests.integration.discovery_support import CA, key_pem, pem
from tests.integration.ssh_support import Sshd

KEYTOOL = "/usr/bin/keytool"
DER = serialization.Encoding.DER
INVENTORY = """
issuers:
  ca:
    type: local_ca
    root: {common_name: Discovery Inventory Root, key: {type: ecdsa, curve: P-256}}
profiles:
  tls: {ekus: [serverAuth]}
defaults: {issuer: ca, profile: tls, key: {type: ecdsa, curve: P-256}}
certificates: {}
"""


def _run(inv: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["-i", str(inv), *args], env=env, catch_exceptions=False)
    return res.exit_code, res.output


def build_tree(root: Path, ca: CA) -> dict[str, str]:
    """Write the tree; returns fingerprints by name."""
    fps: dict[str, str] = {}
    web = root / "etc" / "web"
    web.mkdir(parents=True)
    leaf, key = ca.issue("www.disc.test")
    (web / "fullchain.pem").write_bytes(pem(leaf) + pem(ca.cert))
    (web / "privkey.pem").write_bytes(key_pem(key))  # matched by public key, not by name
    (web / "unrelated.key").write_bytes(key_pem(ca.issue("x.disc.test")[1]))
    fps["www"] = leaf.fingerprint(hashes.SHA256()).hex()

    der_dir = root / "der"
    der_dir.mkdir()
    dleaf = ca.issue("der.disc.test")[0]
    (der_dir / "leaf.cer").write_bytes(dleaf.public_bytes(DER))
    whole = ca.issue("cut.disc.test")[0].public_bytes(DER)
    (der_dir / "truncated.der").write_bytes(whole[: len(whole) - 100])
    (der_dir / "named-like-a-cert.txt").write_bytes(dleaf.public_bytes(DER))  # sniffed anyway

    p12 = root / "p12"
    p12.mkdir()
    pleaf, pkey = ca.issue("p12.disc.test")
    enc = serialization.BestAvailableEncryption(b"right-pass")
    (p12 / "good.p12").write_bytes(
        pkcs12.serialize_key_and_certificates(b"good", pkey, pleaf, [ca.cert], enc)
    )
    other_enc = serialization.BestAvailableEncryption(b"some-other-pass")
    (p12 / "locked.pfx").write_bytes(
        pkcs12.serialize_key_and_certificates(b"x", pkey, pleaf, None, other_enc)
    )

    bundle = root / "bundle"
    bundle.mkdir()
    other = CA.new("Other Root")
    (bundle / "ca-bundle.crt").write_bytes(pem(ca.cert) + pem(other.cert))

    hostile = root / "hostile"
    hostile.mkdir()
    with open(hostile / "sparse.img", "wb") as f:
        os.truncate(f.fileno(), 1 << 30)  # 1 GiB, no blocks
    os.symlink("..", hostile / "up")  # a directory loop
    os.symlink("self", hostile / "self")  # a symlink to itself
    os.symlink("missing", hostile / "dangling")
    os.mkfifo(hostile / "fifo")
    (hostile / "notes.txt").write_text("nothing to see\n" * 50)
    (hostile / "empty.pem").write_bytes(b"")
    return fps


@pytest.fixture(scope="module")
def ca() -> CA:
    return CA.new("Discovery Test Root")


@pytest.fixture
def tree(tmp_path: Path, ca: CA) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "scan"
    return root, build_tree(root, ca)


def _by_location(result: files.ScanResult) -> dict[str, files.Finding]:
    return {f.location: f for f in result.findings}


def _problems(result: files.ScanResult) -> dict[str, str]:
    return {p.location: p.reason for p in result.problems}


def test_local_walk_finds_every_format_and_reports_hostile_entries(
    tree: tuple[Path, dict[str, str]],
) -> None:
    root, fps = tree
    opts = files.Options(passwords=("wrong", "right-pass"))
    result = files.scan_local([str(root)], opts, datetime.now(UTC))
    found = _by_location(result)
    problems = _problems(result)
    r = str(root)

    www = found[f"{r}/etc/web/fullchain.pem"]
    assert www.fingerprint == fps["www"] and www.format == "pem"
    assert www.key_path == f"{r}/etc/web/privkey.pem"  # the matching key, not the other one
    assert www.chain_pem.count("BEGIN CERTIFICATE") == 2 and "PRIVATE" not in www.chain_pem
    assert www.sans == ("DNS:www.disc.test",) and www.issuer == "CN=Discovery Test Root"

    assert found[f"{r}/der/leaf.cer"].format == "der"
    assert found[f"{r}/der/named-like-a-cert.txt"].subject == "CN=der.disc.test"
    assert "truncated DER certificate" in problems[f"{r}/der/truncated.der"]

    good = found[f"{r}/p12/good.p12"]
    assert good.format == "pkcs12" and good.key_in_store and good.key_path is None
    assert problems[f"{r}/p12/locked.pfx"] == "encrypted: wrong or missing password (PKCS#12)"

    assert {f"{r}/bundle/ca-bundle.crt#1", f"{r}/bundle/ca-bundle.crt#2"} <= set(found)
    assert found[f"{r}/bundle/ca-bundle.crt#1"].self_signed

    assert problems[f"{r}/hostile/sparse.img"] == f"too large ({1 << 30} bytes > {1 << 20})"
    assert problems[f"{r}/hostile/self"] == "symlink loop"
    assert problems[f"{r}/hostile/dangling"] == "dangling symlink"
    assert f"{r}/hostile/up" not in problems  # directory symlinks are not followed by default
    assert not any("fifo" in loc for loc in list(found) + list(problems))
    assert len(result.findings) == 6


def test_following_symlinks_reports_the_loop_once(tree: tuple[Path, dict[str, str]]) -> None:
    root, _ = tree
    plain = files.scan_local([str(root)], files.Options(), datetime.now(UTC))
    followed = files.scan_local([str(root)], files.Options(follow_symlinks=True), datetime.now(UTC))
    assert "symlink loop" in _problems(followed)[f"{root}/hostile/up"]
    # the loop led back into the tree: nothing was walked twice
    assert [f.location for f in followed.findings] == [f.location for f in plain.findings]


def test_unreadable_file_is_reported_not_fatal(ca: CA) -> None:
    base = Path(tempfile.mkdtemp(prefix="certctl-disc-"))
    try:
        base.chmod(0o755)
        (base / "ok.pem").write_bytes(pem(ca.cert))
        (base / "ok.pem").chmod(0o644)
        secret = base / "secret.pem"
        secret.write_bytes(pem(ca.cert))
        secret.chmod(0)
        shut = base / "shut"
        shut.mkdir(mode=0)
        if os.geteuid() != 0:
            result = files.scan_local([str(base)], files.Options(), datetime.now(UTC))
            found, problems = [f.location for f in result.findings], _problems(result)
        else:
            found, problems = _scan_as_nobody(base)
        assert found == [str(base / "ok.pem")]
        assert problems[str(secret)] == "unreadable: Permission denied"
        assert problems[str(shut)] == "directory unreadable: Permission denied"
    finally:
        shutil.rmtree(base)


def _scan_as_nobody(base: Path) -> tuple[list[str], dict[str, str]]:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop to nobody, scan, report, exit without cleanup
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = files.scan_local([str(base)], files.Options(), datetime.now(UTC))
            doc = {"found": [f.location for f in result.findings], "problems": _problems(result)}
            os.write(write, json.dumps(doc).encode())
        finally:
            os._exit(0)
    os.close(write)
    chunks = []
    while chunk := os.read(read, 65536):
        chunks.append(chunk)
    os.close(read)
    os.waitpid(pid, 0)
    doc = json.loads(b"".join(chunks))
    return doc["found"], doc["problems"]


def test_jks_made_by_keytool(tmp_path: Path, ca: CA) -> None:
    if not os.access(KEYTOOL, os.X_OK):
        pytest.fail(f"{KEYTOOL} is needed: run scripts/test-deps.sh as root", pytrace=False)
    leaf, key = ca.issue("jks.disc.test")
    p12 = tmp_path / "src.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"web", key, leaf, [ca.cert], serialization.BestAvailableEncryption(b"changeit")
        )
    )
    (tmp_path / "ca.pem").write_bytes(pem(ca.cert))
    store = tmp_path / "store" / "keystore.jks"
    store.parent.mkdir()
    common = ["-noprompt", "-storepass", "changeit"]
    for argv in (
        [KEYTOOL, "-importkeystore", "-srckeystore", str(p12), "-srcstoretype", "PKCS12",
         "-srcstorepass", "changeit", "-destkeystore", str(store), "-deststoretype", "JKS",
         "-deststorepass", "changeit", "-noprompt"],
        [KEYTOOL, "-importcert", "-alias", "root", "-file", str(tmp_path / "ca.pem"),
         "-keystore", str(store), "-storetype", "JKS", *common],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
    assert store.read_bytes()[:4] == b"\xfe\xed\xfe\xed"
    result = files.scan_local([str(store.parent)], files.Options(), datetime.now(UTC))
    found = _by_location(result)
    web = found[f"{store}#web"]
    assert web.format == "jks" and web.key_in_store and web.subject == "CN=jks.disc.test"
    assert web.chain_pem.count("BEGIN CERTIFICATE") == 2
    assert found[f"{store}#root"].self_signed and not found[f"{store}#root"].key_in_store
    assert result.problems == []
    # with the store password the integrity digest is checked; a wrong one is reported
    wrong = files.scan_local(
        [str(store.parent)], files.Options(passwords=("nope",)), datetime.now(UTC)
    )
    assert "no given password matches" in _problems(wrong)[str(store)]
    right = files.scan_local(
        [str(store.parent)], files.Options(passwords=("changeit",)), datetime.now(UTC)
    )
    assert right.problems == [] and len(right.findings) == 2


def test_cli_records_findings_and_a_rescan_updates_them(
    tree: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, fps = tree
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "inventory.yaml").write_text(INVENTORY)
    env = {"P12_PASS": "right-pass"}
    code, out = _run(inv, "discover", "files", str(root), "--password-env", "P12_PASS", env=env)
    assert code == 0, out
    assert "right-pass" not in out and "PRIVATE KEY" not in out
    assert f"! {root}/hostile/sparse.img: too large" in out
    assert "6 certificates found" in out and "6 findings recorded" in out
    code, out = _run(inv, "discover", "files", str(root), "--format", "json", env=env)
    doc = json.loads(out)
    assert code == 0 and doc["summary"]["recorded"] == 5  # no password now: good.p12 unread
    assert any(p["reason"].startswith("encrypted") for p in doc["problems"])

    eng_store = open_store(None, inventory_root=inv, pool_size=1, clock=lambda: datetime.now(UTC))
    try:
        rows = eng_store.list_findings(source="file")
    finally:
        eng_store.close()
    assert len(rows) == 6  # upserted: the rescan added no duplicate
    assert {r.fingerprint for r in rows} >= {fps["www"]}

    code, out = _run(inv, "discovered", "--self-signed", "--format", "json")
    doc = json.loads(out)
    assert code == 0 and doc["summary"]["findings"] == 6
    assert {f["location"] for f in doc["findings"]} == {
        f"{root}/bundle/ca-bundle.crt#1",
        f"{root}/bundle/ca-bundle.crt#2",
    }
    code, out = _run(inv, "discovered", "--expiring", "100d", "--not-in-inventory")
    assert code == 0 and "Listed 4 of 6 findings" in out
    code, out = _run(inv, "discovered", "--expiring", "10d")
    assert code == 0 and "Listed 0 of 6 findings" in out
    code, out = _run(inv, "discovered", "--expiring", "soon")
    assert code != 0 and "--expiring" in out


def test_bad_options_change_nothing(tmp_path: Path) -> None:
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "inventory.yaml").write_text(INVENTORY)
    code, out = _run(inv, "discover", "files", str(tmp_path), "--password-env", "NOT_SET_X")
    assert code == 1 and "NOT_SET_X" in out and "not set" in out
    code, out = _run(inv, "discover", "files", str(tmp_path), "--max-size", "lots")
    assert code != 0 and "is not a size" in out
    code, out = _run(inv, "discover", "files", "/x", "--host", "nohost")
    assert code == 1 and "no such host" in out
    assert _count(inv) == 0


def _count(inv: Path) -> int:
    store = open_store(None, inventory_root=inv, pool_size=1, clock=lambda: datetime.now(UTC))
    try:
        return len(store.list_findings())
    finally:
        store.close()


# ------------------------------------------------------------------ store


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
    else:
        make: Callable[[], str] = request.getfixturevalue("make_pg_db")
        yield make()


def test_store_upserts_findings_on_both_backends(
    store_url: str | None, tmp_path: Path, tree: tuple[Path, dict[str, str]]
) -> None:
    root, _ = tree
    first = files.scan_local([str(root)], files.Options(), datetime.now(UTC))
    store = open_store(
        store_url, inventory_root=tmp_path, pool_size=2, clock=lambda: datetime.now(UTC)
    )
    try:
        assert store.record_findings(first.findings) == 5
        assert store.record_findings([]) == 0
        back = store.list_findings()
        assert sorted(back, key=lambda f: f.location) == sorted(
            first.findings, key=lambda f: f.location
        )
        later = datetime.now(UTC) + timedelta(hours=1)
        moved = [replace(f, seen_at=later) for f in first.findings[:2]]
        assert store.record_findings(moved) == 2
        again = {f.location: f for f in store.list_findings()}
        assert len(again) == 5 and again[moved[0].location].seen_at == later
        net = replace(first.findings[0], source="network", location="127.0.0.1:443", sni="a")
        store.record_findings([net, replace(net, sni=None)])
        assert [f.sni for f in store.list_findings(source="network")] == [None, "a"]
        fp = first.findings[0].fingerprint
        assert {f.source for f in store.list_findings(fingerprint=fp)} == {"file", "network"}
        assert store.list_findings(host="elsewhere") == []
        assert store.issued_fingerprints([fp]) == set()
    finally:
        store.close()


# ------------------------------------------------------------------ remote


@pytest.mark.parametrize("sudo", [False, True], ids=["sftp", "sudo"])
def test_remote_walk_over_ssh(sshd: Sshd, tree: tuple[Path, dict[str, str]], sudo: bool) -> None:
    root, fps = tree

    async def go() -> files.ScanResult:
        pool = SSHPool()
        try:
            io = pool.host(settings_for(sshd.connection("box", sudo=sudo)))
            return await files.scan_remote(
                io, [str(root), "/nonexistent-dir"], files.Options(), datetime.now(UTC)
            )
        finally:
            await pool.close()

    result = asyncio.run(go())
    found = _by_location(result)
    problems = _problems(result)
    www = found[f"{root}/etc/web/fullchain.pem"]
    assert www.host == "box" and www.fingerprint == fps["www"]
    assert www.key_path == f"{root}/etc/web/privkey.pem"
    assert "too large" in problems[f"{root}/hostile/sparse.img"]
    assert "truncated DER" in problems[f"{root}/der/truncated.der"]
    assert problems["/nonexistent-dir"] == "no such file or directory"
    assert len(result.findings) == 5  # the PKCS#12 needs its password


def test_cli_remote_walk_by_group(
    sshd: Sshd, tree: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, fps = tree
    inv = tmp_path / "inventory"
    inv.mkdir()
    ssh = sshd.ssh_vars()
    (inv / "inventory.yaml").write_text(
        INVENTORY
        + "hosts:\n  box: {address: 127.0.0.1}\n"
        + "groups:\n  boxes:\n    hosts: [box]\n    vars:\n      ssh: "
        + json.dumps(ssh)
        + "\n"
    )
    code, out = _run(
        inv, "discover", "files", f"{root}/etc", "--group", "boxes", "--format", "json"
    )
    assert code == 0, out
    doc = json.loads(out)
    assert [(f["host"], f["fingerprint"]) for f in doc["findings"]] == [("box", fps["www"])]
    assert _count(inv) == 1


def test_transport_walk_without_scandir_matches_the_local_walk(
    tree: tuple[Path, dict[str, str]],
) -> None:
    """A HostIO without ``scandir`` (here the local one) is walked entry by entry;
    it finds what the local walk finds (symlinks aside: a transport walk never follows
    them, so the self-link and the dangling link are skipped, not reported)."""
    from certctl.transport.local import LocalHost

    root, _ = tree
    assert not hasattr(LocalHost(), "scandir")
    walked = asyncio.run(
        files.scan_remote(LocalHost(), [str(root)], files.Options(), datetime.now(UTC))
    )
    local = files.scan_local([str(root)], files.Options(), datetime.now(UTC))
    assert [(f.location, f.fingerprint, f.key_path) for f in walked.findings] == [
        (f.location, f.fingerprint, f.key_path) for f in local.findings
    ]
    assert set(_problems(local)) - set(_problems(walked)) == {
        f"{root}/hostile/self",
        f"{root}/hostile/dangling",
    }


def test_sha1_certificates_made_by_openssl(tmp_path: Path) -> None:
    """``cryptography`` neither signs nor verifies SHA-1; OpenSSL's CLI still makes
    such certificates, and old roots in every CA bundle are SHA-1 self-signed: they
    are self-signed (names; the signature cannot be checked) but not weak, while a
    SHA-1-signed leaf is weak."""
    d = tmp_path / "sha1"
    d.mkdir()

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-sha1", "-newkey", "rsa:2048", "-nodes", "-keyout",
            str(d / "root.key"), "-out", str(d / "root.pem"), "-subj", "/CN=Old SHA1 Root",
            "-days", "30")  # fmt: skip
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "leaf.key"),
            "-out", str(tmp_path / "leaf.csr"), "-subj", "/CN=old.disc.test")  # fmt: skip
    openssl("x509", "-req", "-sha1", "-in", str(tmp_path / "leaf.csr"), "-CA", str(d / "root.pem"),
            "-CAkey", str(d / "root.key"), "-set_serial", "7", "-days", "10",
            "-out", str(d / "leaf.pem"))  # fmt: skip
    result = files.scan_local([str(d)], files.Options(), datetime.now(UTC))
    found = _by_location(result)
    root, leaf = found[str(d / "root.pem")], found[str(d / "leaf.pem")]
    assert root.self_signed and root.signature_algorithm == "sha1WithRSAEncryption"
    assert root.key_path == str(d / "root.key") and leaf.key_path == str(d / "leaf.key")
    assert not report.is_weak(root) and report.is_weak(leaf) and not leaf.self_signed
    assert leaf.serial == "7"

"""The built-in file target on the real filesystem, and the BatchSyncer behind it.

Certificates come from the real local CA. Stand-in: the CA's vault is the in-memory
:class:`tests.conformance.StandInVault`.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from certctl import pki
from certctl.apply.syncer import BatchSyncer
from certctl.connectors import ConnectorContext, IssueRequest, Material, ObserveItem, Registry
from certctl.errors import PermanentError, UnsafeValueError
from certctl.model import (
    Certificate,
    DeploymentRecord,
    KeySpec,
    Placement,
    Profile,
    Secret,
    TargetState,
)
from certctl_connectors.issuers.local_ca import LocalCAIssuer
from certctl_connectors.targets import file as file_mod
from certctl_connectors.targets.file import FileTarget
from tests import conformance
from tests.conformance import FixedClock, StandInVault, TargetHarness

CA_CONFIG = {
    "root": {"common_name": "Files Root"},
    "intermediate": {"common_name": "Files Issuing CA"},
}


class Materials:
    """Real certificate versions (v1..v4) of one certificate, issued up front (outside
    any event loop, so the async conformance checks can ask for them)."""

    def __init__(self, tmp_path: Path, name: str = "web", versions: int = 4) -> None:
        ctx = ConnectorContext(tmp_path, FixedClock(), StandInVault(), BatchSyncer("none"))
        ca = LocalCAIssuer("ca", CA_CONFIG, ctx)
        self.cache: dict[int, Material] = {}
        for version in range(1, versions + 1):
            key = pki.generate_key(KeySpec())
            cert = Certificate(name, f"{name}.test", issuer="ca")
            req = IssueRequest(cert, Profile("p"), key, key.public_key())
            issued = asyncio.run(ca.issue(req, asyncio.run(ca.prepare(req))))
            self.cache[version] = Material(
                name,
                version,
                issued.fingerprint,
                issued.cert_pem,
                issued.chain_pem,
                pki.key_to_pem(key),
            )

    def __call__(self, version: int) -> Material:
        return self.cache[version]


class RecordingSyncer(BatchSyncer):
    """The real batch syncer, also recording what it was asked to sync."""

    def __init__(self) -> None:
        super().__init__("batch")
        self.calls: list[tuple[str, list[str]]] = []

    async def sync_files(self, paths: Sequence[str]) -> None:
        for p in paths:  # the temps exist and are complete when synced
            assert os.path.exists(p) and ".certctl-" in p
        self.calls.append(("files", list(paths)))
        await super().sync_files(paths)

    async def sync_dirs(self, paths: Sequence[str]) -> None:
        self.calls.append(("dirs", list(paths)))
        await super().sync_dirs(paths)


def make_target(tmp_path: Path, syncer: BatchSyncer | None = None) -> FileTarget:
    ctx = ConnectorContext(
        inventory_root=tmp_path / "inv",
        clock=FixedClock(),
        vault=StandInVault(),
        syncer=syncer or RecordingSyncer(),
    )
    return FileTarget("files", ctx)


def placement(**config: Any) -> Placement:
    config.setdefault("root", "out")
    return Placement("files", "file", None, config)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int, int]]:
    """Every file under root (hidden ones too): content, mode, inode, mtime."""
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode):
                out[str(p.relative_to(root))] = (
                    p.read_bytes(),
                    stat.S_IMODE(st.st_mode),
                    st.st_ino,
                    st.st_mtime_ns,
                )
            else:
                out[str(p.relative_to(root)) + "/"] = (b"", stat.S_IMODE(st.st_mode), 0, 0)
    return out


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def deploy(t: FileTarget, p: Placement, m: Material) -> DeploymentRecord:
    async def go() -> DeploymentRecord:
        staged = await t.stage(p, m)
        files = await t.commit(staged)
        await t.verify(staged)
        return DeploymentRecord(m.cert, p.id, m.version, m.fingerprint, files)

    rec: DeploymentRecord = run(go())
    return rec


def observe(t: FileTarget, p: Placement, expected: Material | None, rec: DeploymentRecord | None):  # type: ignore[no-untyped-def]
    (obs,) = t.observe([ObserveItem(p, "web", expected.fingerprint if expected else None, rec)])
    return obs


LAYOUTS: dict[str, dict[str, Any]] = {
    "e2e-files": {
        "cert_path": "web/cert.pem",
        "fullchain_path": "web/fullchain.pem",
        "key_path": "web/key.pem",
    },
    "combined": {"combined_path": "web.pem"},
    "everything-no-backups": {
        "cert_path": "a/b/cert.pem",
        "chain_path": "a/b/chain.pem",
        "fullchain_path": "a/fullchain.pem",
        "key_path": "a/key.pem",
        "combined_path": "combined.pem",
        "pkcs12_path": "bundle.p12",
        "pkcs12_password": "changeit",
        "backups": 0,
    },
    "two-backups": {"fullchain_path": "web.fullchain.pem", "key_path": "web.key", "backups": 2},
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("check", conformance.TARGET_CHECKS, ids=conformance.check_id)
def test_conformance(tmp_path: Path, layout: str, check: conformance.TargetCheck) -> None:
    target = make_target(tmp_path)
    harness = TargetHarness(
        target,
        placement(**LAYOUTS[layout]),
        Materials(tmp_path),
        lambda: snapshot(tmp_path / "inv" / "out"),
        cert="web",
    )
    run(check(harness))
    assert not [p for p in (tmp_path / "inv").rglob("*") if ".tmp" in p.name]


def test_registered_and_schema(tmp_path: Path) -> None:
    assert Registry().load_builtin().targets["file"] is FileTarget
    schema = FileTarget.config_schema
    jsonschema.Draft202012Validator.check_schema(schema)
    v = jsonschema.Draft202012Validator(schema)
    good = [
        {
            "type": "file",
            "root": "deployed/web",
            "cert_path": "{{ cert.name }}/cert.pem",
            "chain_path": "c.pem",
            "fullchain_path": "f.pem",
            "key_path": "k.pem",
            "backups": 2,
            "description": "x",
        },
        {
            "root": "/srv/tls",
            "combined_path": "x.pem",
            "mode": "0640",
            "key_mode": "0400",
            "owner": "haproxy",
            "group": 0,
        },
        {"root": "out", "pkcs12_path": "x.p12", "pkcs12_password": {"env": "P12_PASSWORD"}},
        {"root": "out", "cert_path": "x.pem", "mode": 0o644},
    ]
    for ok in good:
        assert list(v.iter_errors(ok)) == [], ok
    for bad in (
        {"root": "out"},  # no path at all
        {"cert_path": "x.pem"},  # no root
        {"root": "out", "cert_path": "x", "unknown": 1},
        {"root": "out", "cert_path": "x", "mode": "rwx"},
        {"root": "out", "cert_path": "x", "mode": 644},  # decimal 644 is not a mode
        {"root": "out", "cert_path": "x", "backups": -1},
        {"root": "out", "cert_path": "x", "owner": "bad name"},
    ):
        assert list(v.iter_errors(bad)), bad


# ------------------------------------------------------------------- writing


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
def test_files_modes_and_content(tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        t = make_target(tmp_path)
        m = Materials(tmp_path)(1)
        p = placement(**LAYOUTS["everything-no-backups"])
        rec = deploy(t, p, m)
    finally:
        os.umask(old)
    out = tmp_path / "inv" / "out"
    modes = {
        k: stat.S_IMODE((out / v).stat().st_mode)
        for k, v in (
            ("cert", "a/b/cert.pem"),
            ("chain", "a/b/chain.pem"),
            ("fullchain", "a/fullchain.pem"),
            ("key", "a/key.pem"),
            ("combined", "combined.pem"),
            ("pkcs12", "bundle.p12"),
        )
    }
    assert modes == {
        "cert": 0o644,
        "chain": 0o644,
        "fullchain": 0o644,
        "key": 0o600,
        "combined": 0o600,
        "pkcs12": 0o600,
    }
    assert stat.S_IMODE((out / "a").stat().st_mode) == 0o755  # whatever the umask
    assert (out / "a/b/cert.pem").read_bytes() == m.cert_pem
    assert (out / "a/b/chain.pem").read_bytes() == m.chain_pem
    assert (out / "a/fullchain.pem").read_bytes() == m.cert_pem + m.chain_pem
    assert m.key_pem is not None
    assert (out / "a/key.pem").read_bytes() == m.key_pem.reveal()
    assert (out / "combined.pem").read_bytes() == m.cert_pem + m.chain_pem + m.key_pem.reveal()
    key, leaf, cas = pkcs12.load_key_and_certificates(
        (out / "bundle.p12").read_bytes(), b"changeit"
    )
    assert leaf is not None and pki.fingerprint(leaf) == m.fingerprint
    assert key is not None and pki.keys_match(key, leaf.public_key())  # type: ignore[arg-type]
    assert [pki.cert_pem(c) for c in cas] == [
        pki.cert_pem(c) for c in pki.parse_pem_chain(m.chain_pem)
    ]
    assert set(rec.files) == {"cert", "chain", "fullchain", "key", "combined", "pkcs12"}
    for role, f in rec.files.items():
        st = os.stat(f.path)
        assert (f.size, f.mtime_ns) == (st.st_size, st.st_mtime_ns), role
        assert os.path.isabs(f.path)
    assert "PRIVATE" not in repr(rec)


def test_custom_modes(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    p = placement(cert_path="c.pem", key_path="k.pem", mode="0640", key_mode="0400")
    deploy(t, p, Materials(tmp_path)(1))
    out = tmp_path / "inv" / "out"
    assert stat.S_IMODE((out / "c.pem").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "k.pem").stat().st_mode) == 0o400


def test_stage_syncs_temps_before_commit_renames_then_syncs_dirs(tmp_path: Path) -> None:
    syncer = RecordingSyncer()
    t = make_target(tmp_path, syncer)
    p = placement(**LAYOUTS["e2e-files"])
    m = Materials(tmp_path)(1)

    async def go() -> None:
        staged = await t.stage(p, m)
        assert [k for k, _ in syncer.calls] == ["files"]
        assert len(syncer.calls[0][1]) == 3
        assert not (tmp_path / "inv/out/web/cert.pem").exists()  # nothing live yet
        await t.commit(staged)
        assert [k for k, _ in syncer.calls] == ["files", "dirs"]
        # the files' directory, and the parent of every directory stage created
        assert set(syncer.calls[1][1]) == {
            str(tmp_path / "inv/out/web"),
            str(tmp_path / "inv/out"),
            str(tmp_path / "inv"),
            str(tmp_path),
        }

    run(go())


def test_unchanged_files_are_not_rewritten_but_wrong_modes_are_fixed(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(**LAYOUTS["e2e-files"])
    rec1 = deploy(t, p, mats(1))
    before = snapshot(tmp_path / "inv/out")
    syncer = RecordingSyncer()
    t2 = make_target(tmp_path, syncer)
    rec2 = deploy(t2, p, mats(1))
    assert snapshot(tmp_path / "inv/out") == before  # same inodes, same mtimes
    assert rec2.files == rec1.files
    assert syncer.calls == []  # nothing written, nothing to sync
    key = tmp_path / "inv/out/web/key.pem"
    key.chmod(0o644)
    obs = observe(t, p, mats(1), rec1)
    assert obs.state is TargetState.DIFFERS and "mode 0644, expected 0600" in obs.detail
    rec3 = deploy(t, p, mats(1))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert rec3.files["cert"] == rec1.files["cert"]  # only the key file was rewritten
    assert observe(t, p, mats(1), rec3).state is TargetState.MATCH


def test_backups_rotate_up_to_n(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(cert_path="c.pem", key_path="k.pem", backups=2)
    for v in (1, 2, 3, 4):
        deploy(t, p, mats(v))
    out = tmp_path / "inv/out"
    assert (out / "c.pem").read_bytes() == mats(4).cert_pem
    assert (out / "c.pem.bak.1").read_bytes() == mats(3).cert_pem
    assert (out / "c.pem.bak.2").read_bytes() == mats(2).cert_pem
    assert not (out / "c.pem.bak.3").exists()
    assert stat.S_IMODE((out / "k.pem.bak.1").stat().st_mode) == 0o600  # backups keep 0600
    assert sorted(x.name for x in out.iterdir()) == [
        "c.pem",
        "c.pem.bak.1",
        "c.pem.bak.2",
        "k.pem",
        "k.pem.bak.1",
        "k.pem.bak.2",
    ]


def test_no_backups_kept_when_zero(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(cert_path="c.pem", backups=0)
    deploy(t, p, mats(1))
    deploy(t, p, mats(2))
    assert sorted(x.name for x in (tmp_path / "inv/out").iterdir()) == ["c.pem"]


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_rollback_restores_previous_content_and_backups(tmp_path: Path, backups: int) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(cert_path="c.pem", key_path="sub/k.pem", backups=backups)
    deploy(t, p, mats(1))
    deploy(t, p, mats(2))
    before = snapshot(tmp_path / "inv/out")

    async def go() -> None:
        staged = await t.stage(p, mats(3))
        await t.commit(staged)
        assert (tmp_path / "inv/out/c.pem").read_bytes() == mats(3).cert_pem
        await t.rollback(staged)
        await t.rollback(staged)  # idempotent
        with pytest.raises(PermanentError, match="rolled back"):
            await t.commit(staged)

    run(go())
    after = snapshot(tmp_path / "inv/out")
    # same names, content and modes; the live files are the very same inodes when a
    # backup existed (the oldest backup dropped by the rotation is rewritten)
    assert {k: v[:2] for k, v in after.items()} == {k: v[:2] for k, v in before.items()}
    if backups:
        assert after["c.pem"] == before["c.pem"] and after["sub/k.pem"] == before["sub/k.pem"]


def test_failed_stage_leaves_nothing_behind(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    m = Materials(tmp_path)(1)
    no_key = Material(m.cert, m.version, m.fingerprint, m.cert_pem, m.chain_pem, None)
    p = placement(cert_path="new/c.pem", key_path="new/k.pem")
    with pytest.raises(PermanentError, match="custody"):
        run(t.stage(p, no_key))
    assert snapshot(tmp_path / "inv/out") == {}


def test_stale_temps_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "inv/out/web"
    out.mkdir(parents=True)
    stale = out / ".cert.pem.certctl-0123456789ab.tmp"
    stale.write_bytes(b"half")
    other = out / ".other.pem.certctl-0123456789ab.tmp"  # not ours to touch
    other.write_bytes(b"x")
    deploy(make_target(tmp_path), placement(**LAYOUTS["e2e-files"]), Materials(tmp_path)(1))
    assert not stale.exists() and other.exists()
    assert sorted(x.name for x in out.iterdir()) == [
        ".other.pem.certctl-0123456789ab.tmp",
        "cert.pem",
        "fullchain.pem",
        "key.pem",
    ]


def test_pkcs12_with_secret_password_is_stable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("P12_PW", "from-env")
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(pkcs12_path="b.p12", pkcs12_password=Secret("env", "P12_PW"))
    rec = deploy(t, p, mats(1))
    data = (tmp_path / "inv/out/b.p12").read_bytes()
    assert pkcs12.load_pkcs12(data, b"from-env").cert is not None
    before = snapshot(tmp_path / "inv/out")
    assert deploy(t, p, mats(1)).files == rec.files  # random salt, yet not rewritten
    assert snapshot(tmp_path / "inv/out") == before
    assert observe(t, p, mats(1), None).state is TargetState.MATCH
    assert observe(t, p, mats(2), rec).state is TargetState.DIFFERS
    assert "from-env" not in repr(p)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_owner_and_group(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    p = placement(cert_path="c.pem", key_path="k.pem", owner=65534, group="0")
    rec = deploy(t, p, Materials(tmp_path)(1))
    st = os.stat(tmp_path / "inv/out/k.pem")
    assert (st.st_uid, st.st_gid) == (65534, 0)
    assert observe(t, p, Materials(tmp_path)(1), rec).state is not TargetState.MISSING
    with pytest.raises(PermanentError, match="does not exist"):
        run(t.stage(placement(cert_path="c.pem", owner="no-such-user-xyz"), Materials(tmp_path)(1)))


# ------------------------------------------------------------------- observe


def test_observe_match_uses_stat_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(**LAYOUTS["e2e-files"])
    rec = deploy(t, p, mats(1))

    def no_reads(path: str) -> bytes:
        raise AssertionError(f"read {path}")

    monkeypatch.setattr(file_mod, "read_nofollow", no_reads)
    obs = observe(t, p, mats(1), rec)
    assert obs.state is TargetState.MATCH and obs.fingerprint == mats(1).fingerprint


def test_observe_cases(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(**LAYOUTS["e2e-files"])
    out = tmp_path / "inv/out/web"

    # nothing there
    obs = observe(t, p, mats(1), None)
    assert obs.state is TargetState.MISSING and "cert file" in obs.detail

    rec = deploy(t, p, mats(1))
    # a file removed: MISSING, naming it
    (out / "key.pem").rename(out / "key.moved")
    obs = observe(t, p, mats(1), rec)
    assert obs.state is TargetState.MISSING
    assert obs.detail == f"key file {out / 'key.pem'} is missing"
    (out / "key.moved").rename(out / "key.pem")
    assert observe(t, p, mats(1), rec).state is TargetState.MATCH

    # touched but identical: hashed, still MATCH
    os.utime(out / "cert.pem", ns=(1, 1))
    assert observe(t, p, mats(1), rec).state is TargetState.MATCH

    # key content replaced: DIFFERS, without showing the key
    m2 = mats(2)
    assert m2.key_pem is not None
    (out / "key.pem").write_bytes(m2.key_pem.reveal())
    obs = observe(t, p, mats(1), rec)
    assert obs.state is TargetState.DIFFERS and obs.detail == "key file content differs"
    assert "PRIVATE" not in repr(obs)

    # the current version is 2: files hold version 1
    rec = deploy(t, p, mats(1))
    obs = observe(t, p, mats(2), rec)
    assert obs.state is TargetState.DIFFERS
    assert obs.detail.startswith("cert file holds serial ") and "not the current one" in obs.detail
    assert obs.fingerprint == mats(1).fingerprint

    # no record (state lost): MATCH when the right certificate is there, else DIFFERS
    assert observe(t, p, mats(1), None).state is TargetState.MATCH
    assert observe(t, p, mats(2), None).state is TargetState.DIFFERS

    # a stale record but the files already hold the current version (crash after commit)
    rec2 = deploy(t, p, mats(2))
    assert observe(t, p, mats(2), rec).state is TargetState.MATCH
    assert observe(t, p, mats(2), rec2).state is TargetState.MATCH

    # garbage in the cert file
    (out / "cert.pem").write_bytes(b"not a certificate\n")
    obs = observe(t, p, mats(2), rec2)
    assert obs.state is TargetState.DIFFERS and "holds no certificate" in obs.detail

    # a path changed in the inventory: the new file is missing
    p2 = placement(**{**LAYOUTS["e2e-files"], "cert_path": "web/new-cert.pem"})
    assert observe(t, p2, mats(2), rec2).state is TargetState.MISSING


def test_observe_batch_keeps_order_and_reports_unreadable_as_unknown(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    good = placement(cert_path="a.pem")
    rec = deploy(t, good, mats(1))
    bad = placement(cert_path="dir.pem")
    (tmp_path / "inv/out/dir.pem").mkdir()
    res = t.observe(
        [
            ObserveItem(good, "web", mats(1).fingerprint, rec),
            ObserveItem(bad, "web", mats(1).fingerprint, None),
            ObserveItem(good, "web", mats(2).fingerprint, rec),
        ]
    )
    assert [o.state for o in res] == [TargetState.MATCH, TargetState.UNKNOWN, TargetState.DIFFERS]


# -------------------------------------------------------------- hostile paths


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"cert_path": "../../../etc/x.pem"},
            "cert_path '../../../etc/x.pem' escapes the target root out",
        ),
        ({"cert_path": "/etc/passwd"}, "cert_path '/etc/passwd' escapes the target root out"),
        ({"key_path": "a/../../x.key"}, "escapes the target root"),
        ({"cert_path": "~/x.pem"}, "escapes the target root"),
        ({"cert_path": "."}, "escapes the target root"),
        ({"cert_path": "a\x00b"}, "NUL"),
        ({"cert_path": "a\nb"}, "newline"),
        ({"cert_path": "x.pem", "key_path": "./x.pem"}, "name the same file"),
        ({"cert_path": ".x.pem.certctl-abc.tmp"}, "temp file"),
        ({}, "at least one of"),
        ({"root": "a\x00", "cert_path": "x"}, "NUL"),
    ],
)
def test_hostile_paths_are_refused(tmp_path: Path, config: dict[str, Any], message: str) -> None:
    p = placement(**config)
    problems = FileTarget.check_placement(p, tmp_path)
    assert problems and message in problems[0], problems
    t = make_target(tmp_path)
    with pytest.raises(UnsafeValueError):
        run(t.stage(p, Materials(tmp_path)(1)))
    assert not (tmp_path / "inv").exists()


def test_symlinks_below_the_root_are_refused(tmp_path: Path) -> None:
    inv = tmp_path / "inv"
    (inv / "out").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (inv / "out/link").symlink_to(tmp_path / "elsewhere")
    (inv / "out/file-link.pem").symlink_to(tmp_path / "elsewhere/target.pem")
    for cfg, needle in (
        ({"cert_path": "link/cert.pem"}, "passes through a symlink"),
        ({"cert_path": "file-link.pem"}, "passes through a symlink"),
    ):
        p = placement(**cfg)
        problems = FileTarget.check_placement(p, inv)
        assert problems and needle in problems[0]
        with pytest.raises(UnsafeValueError):
            run(make_target(tmp_path).stage(p, Materials(tmp_path)(1)))
    assert list((tmp_path / "elsewhere").iterdir()) == []
    # a symlinked root itself is the operator's choice
    (inv / "linked-root").symlink_to(tmp_path / "elsewhere")
    p = placement(root="linked-root", cert_path="c.pem")
    assert FileTarget.check_placement(p, inv) == []
    deploy(make_target(tmp_path), p, Materials(tmp_path)(1))
    assert (tmp_path / "elsewhere/c.pem").exists()


def test_good_placements_pass_check(tmp_path: Path) -> None:
    for cfg in LAYOUTS.values():
        assert FileTarget.check_placement(placement(**cfg), tmp_path) == []
    assert (
        FileTarget.check_placement(placement(root="/abs/root", cert_path="x/y.pem"), tmp_path) == []
    )
    assert FileTarget.check_placement(placement(cert_path="a/./b/../c.pem"), tmp_path) == []


# ----------------------------------------------------------------- BatchSyncer


class CountingSyncer(BatchSyncer):
    """The real syncer, counting the syncfs(2) calls it makes (and making them)."""

    def __init__(self, mode: str = "batch") -> None:
        super().__init__(mode)
        self.syncfs_paths: list[str] = []

    def _syncfs_path(self, path: str) -> None:
        self.syncfs_paths.append(path)
        super()._syncfs_path(path)


def _files(tmp_path: Path, n: int) -> list[str]:
    out = []
    for i in range(n):
        p = tmp_path / f"f{i}"
        p.write_bytes(b"x")
        out.append(str(p))
    return out


def test_concurrent_sync_calls_share_one_syncfs(tmp_path: Path) -> None:
    syncer = CountingSyncer()
    paths = _files(tmp_path, 50)

    async def go() -> None:
        await asyncio.gather(*(syncer.sync_files([p]) for p in paths))

    run(go())
    assert len(syncer.syncfs_paths) == 1  # one filesystem, one group
    assert syncer.groups == 1 and syncer.syncfs_calls == 1


def test_calls_arriving_during_a_sync_join_the_next_group(tmp_path: Path) -> None:
    syncer = CountingSyncer()
    paths = _files(tmp_path, 30)

    async def go() -> None:
        first = asyncio.ensure_future(syncer.sync_files(paths[:1]))
        await asyncio.sleep(0)  # the flusher cut the first group and is syncing it
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(syncer.sync_files([p])) for p in paths[1:]]
        await asyncio.gather(first, *rest)

    run(go())
    assert syncer.groups == 2 and len(syncer.syncfs_paths) == 2


def test_sync_dirs_fsyncs_each_directory_once_per_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncer = BatchSyncer()
    fsynced: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        fsynced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    d1, d2 = tmp_path / "a", tmp_path / "b"
    d1.mkdir()
    d2.mkdir()

    async def go() -> None:
        await asyncio.gather(*(syncer.sync_dirs([str(d1), str(d2)]) for _ in range(10)))

    run(go())
    assert len(fsynced) == 2


def test_each_mode_fsyncs_every_file_and_none_does_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _files(tmp_path, 5)
    fsynced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd))
    run(BatchSyncer("each").sync_files(paths))
    assert len(fsynced) == 5
    run(BatchSyncer("none").sync_files([*paths, "/no/such/file"]))
    assert len(fsynced) == 5
    with pytest.raises(ValueError):
        BatchSyncer("sometimes")


def test_without_syncfs_batch_falls_back_to_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _files(tmp_path, 4)
    syncer = CountingSyncer()
    syncer._syncfs_fn = None
    fsynced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: fsynced.append(fd))
    run(syncer.sync_files(paths))
    assert len(fsynced) == 4 and syncer.syncfs_paths == []


def test_sync_failure_reaches_only_the_affected_callers(tmp_path: Path) -> None:
    syncer = BatchSyncer()
    good = _files(tmp_path, 2)

    async def go() -> tuple[Any, ...]:
        return await asyncio.gather(
            syncer.sync_files(good),
            syncer.sync_dirs([str(tmp_path / "missing-dir")]),
            return_exceptions=True,
        )

    ok, failed = run(go())
    assert ok is None
    assert isinstance(failed, PermanentError) and "missing-dir" in str(failed)


def test_syncer_survives_a_new_event_loop(tmp_path: Path) -> None:
    syncer = CountingSyncer()
    paths = _files(tmp_path, 2)
    run(syncer.sync_files(paths[:1]))
    run(syncer.sync_files(paths[1:]))
    assert len(syncer.syncfs_paths) == 2


def test_throughput_1000_placements_smoke(tmp_path: Path) -> None:
    """1,000 placements staged+committed concurrently share a few syncfs calls."""
    syncer = CountingSyncer()
    t = make_target(tmp_path, syncer)
    m = Materials(tmp_path)(1)
    places = [placement(fullchain_path=f"c{i}.pem", key_path=f"c{i}.key") for i in range(1000)]

    async def one(p: Placement) -> None:
        staged = await t.stage(p, m)
        await t.commit(staged)

    async def go() -> None:
        sem = asyncio.Semaphore(25)

        async def bounded(p: Placement) -> None:
            async with sem:
                await one(p)

        await asyncio.gather(*(bounded(p) for p in places))

    run(go())
    assert len(list((tmp_path / "inv/out").iterdir())) == 2000
    assert syncer.groups < 1000  # grouped, not one sync per deploy


def test_key_material_never_shows_in_reprs_or_errors(tmp_path: Path) -> None:
    t = make_target(tmp_path)
    mats = Materials(tmp_path)
    p = placement(combined_path="c.pem", key_path="k.pem", backups=0)
    deploy(t, p, mats(1))

    async def go() -> None:
        staged = await t.stage(p, mats(2))  # holds the previous key in memory (backups 0)
        assert "PRIVATE" not in repr(staged) and "PRIVATE" not in str(staged.data)
        await t.rollback(staged)

    run(go())
    (tmp_path / "inv/out/k.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxyz\n")
    (obs,) = t.observe([ObserveItem(p, "web", mats(1).fingerprint, None)])
    assert "PRIVATE" not in repr(obs)

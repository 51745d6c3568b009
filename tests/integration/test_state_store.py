"""The state store against both real backends: embedded SQLite and a real PostgreSQL.

One suite, parametrized over the backends, so both are held to identical semantics.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest

from certctl.apply.groupwriter import GroupWriter
from certctl.errors import LockedError, StateError
from certctl.model import DeploymentRecord, FileRecord, SecretBytes, VersionRecord
from certctl.state import common, describe_url, open_store
from certctl.state.base import (
    AuditEvent,
    Batch,
    CertUpdate,
    IntentRecord,
    NewVersion,
    Revocation,
    StateStore,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Backend:
    """One state backend under test: opens (and reopens) the same store."""

    name: str
    url: str | None
    root: Path
    clock: Clock = field(default_factory=Clock)
    opened: list[StateStore] = field(default_factory=list)

    def open(self, env: dict[str, str] | None = None) -> StateStore:
        store = open_store(
            self.url, inventory_root=self.root, clock=self.clock, env={} if env is None else env
        )
        self.opened.append(store)
        return store

    def raw_values(self) -> Iterator[Any]:
        """Every stored value of every table, as the database hands it out."""
        if self.url is None:
            db = sqlite3.connect(self.root / ".certctl" / "state.db")
            try:
                tables = [
                    r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
                ]
                for t in tables:
                    for row in db.execute(f'SELECT * FROM "{t}"'):
                        yield from row
            finally:
                db.close()
            return
        with psycopg.connect(self.url) as conn:
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
            ]
            for t in tables:
                for row in conn.cursor(binary=True).execute(f'SELECT * FROM "{t}"'):
                    yield from row


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    root = tmp_path / "inv"
    root.mkdir()
    url: str | None = None
    if request.param == "postgres":
        make_pg_db: Callable[[], str] = request.getfixturevalue("make_pg_db")
        url = make_pg_db()
    b = Backend(request.param, url, root)
    yield b
    for store in b.opened:
        store.close()


# ---------------------------------------------------------------------------
# helpers

KEY_PEM = (
    b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49\n-----END PRIVATE KEY-----\n"
)


def key(tag: str) -> SecretBytes:
    return SecretBytes(KEY_PEM.replace(b"MIGH", tag.encode()))


def version(cert: str, n: int, **kw: Any) -> VersionRecord:
    fields: dict[str, Any] = {
        "cert": cert,
        "version": n,
        "serial": f"{n:04x}ab",
        "not_before": T0 - timedelta(days=1),
        "not_after": T0 + timedelta(days=30, microseconds=17),
        "fingerprint": f"{cert}-{n}".encode().hex().ljust(64, "0"),
        "issuer": "ca",
        "key_spec": "ecdsa-p256",
        "names": (f"{cert}.test", f"alt.{cert}.test"),
        "profile_digest": "pd1",
    }
    fields.update(kw)
    return VersionRecord(**fields)


def new_version(cert: str, n: int, *, with_key: bool = True, **kw: Any) -> NewVersion:
    return NewVersion(
        version(cert, n, **kw),
        f"CERT {cert} {n}\n".encode(),
        f"CHAIN {cert} {n}\n".encode(),
        key(f"{cert}{n}") if with_key else None,
    )


def deployment(cert: str, placement: str, n: int) -> DeploymentRecord:
    return DeploymentRecord(
        cert,
        placement,
        n,
        f"fp-{cert}-{n}",
        {
            "cert": FileRecord(f"/srv/{cert}.pem", "a" * 64, 1234, 1_700_000_000_123_456_789),
            "key": FileRecord(f"/srv/{cert}.key", "b" * 64, 241, 1_700_000_000_000_000_001),
        },
        status="deployed",
        deployed_at=T0 + timedelta(microseconds=3),
        config_digest="cfg1",
    )


# ---------------------------------------------------------------------------
# lifecycle


def test_fresh_store_is_migrated_and_migrations_are_idempotent(backend: Backend) -> None:
    store = backend.open()
    latest = common.load_migrations("sqlite")[-1].number
    assert latest == common.load_migrations("postgres")[-1].number
    assert store.schema_version() == latest
    assert store.migrate() == []
    snap = store.snapshot()
    assert snap.certs == {} and snap.deployments == {} and snap.intents == ()
    assert snap.generation == 0
    if backend.url is not None:  # PostgreSQL: nothing local until a key is needed
        assert not (backend.root / ".certctl").exists()
    store.close()
    again = backend.open()
    assert again.migrate() == [] and again.schema_version() == latest


def test_store_written_by_newer_certctl_is_refused(backend: Backend) -> None:
    store = backend.open()
    store.close()
    if backend.url is None:
        with sqlite3.connect(backend.root / ".certctl" / "state.db") as db:
            db.execute("INSERT INTO schema_migrations VALUES (999, '0999_future', 'x')")
    else:
        with psycopg.connect(backend.url) as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (999, '0999_future', now())")
    with pytest.raises(StateError, match="newer than this certctl"):
        backend.open()


# ---------------------------------------------------------------------------
# writes and reads


def test_every_batch_field_round_trips(backend: Backend) -> None:
    store = backend.open()
    run_id = store.begin_run("apply", "tester", {"input_digest": "abc"})
    store.write(
        Batch(
            intents=[
                IntentRecord("i1", "www", "issue", None, {"serial": "0a1b", "n": [1, 2]}, key("i")),
                IntentRecord("i2", "www", "deploy", "files@web1", {"version": 1}),
                IntentRecord("i3", "api", "revoke", None, {}),
            ],
            cert_updates=[
                CertUpdate("www", failures=0, spec_digest="spec-w", force_renew=True),
                CertUpdate("idle", failures=3, next_attempt_at=T0 + timedelta(hours=1)),
            ],
            versions=[new_version("www", 1), new_version("api", 1, with_key=False)],
            deployments=[deployment("www", "files@web1", 1)],
            audit=[AuditEvent("issue", cert="www", run_id=run_id, detail={"version": 1})],
        )
    )
    store.write(Batch(closed_intents=[("i3", "revoked")]))
    snap = store.snapshot()
    assert snap.generation == 2
    assert set(snap.certs) == {"www", "api", "idle"}
    www = snap.certs["www"]
    assert www.current == version("www", 1)
    assert www.failures == 0 and www.spec_digest == "spec-w" and www.force_renew is True
    assert www.retired is False and www.next_attempt_at is None
    idle = snap.certs["idle"]
    assert idle.current is None and idle.failures == 3
    assert idle.next_attempt_at == T0 + timedelta(hours=1)
    assert snap.deployments == {("www", "files@web1"): deployment("www", "files@web1", 1)}
    assert [(i.id, i.action, i.placement, i.run_id) for i in snap.intents] == [
        ("i1", "issue", None, run_id),
        ("i2", "deploy", "files@web1", run_id),
    ]
    assert snap.intents[0].payload == {"serial": "0a1b", "n": [1, 2]}
    assert snap.intents[0].created_at == T0
    opened = store.open_intents()
    assert [i.id for i in opened] == ["i1", "i2"]
    assert opened[0].key_pem == key("i") and opened[1].key_pem is None
    (entry,) = store.audit_log()
    assert entry == {
        "id": entry["id"],
        "at": T0,
        "event": "issue",
        "cert": "www",
        "placement": None,
        "run_id": run_id,
        "detail": {"version": 1},
    }
    cert_pem, chain_pem, key_pem = store.material("www", 1)
    assert (cert_pem, chain_pem, key_pem) == (b"CERT www 1\n", b"CHAIN www 1\n", key("www1"))
    assert store.material("api", 1)[2] is None
    with pytest.raises(StateError, match="not in the state"):
        store.material("www", 9)


def test_cert_updates_change_only_given_fields(backend: Backend) -> None:
    store = backend.open()
    later = datetime(2025, 3, 4, 7, 6, 7, 5, tzinfo=timezone(timedelta(hours=2)))
    store.write(
        Batch(
            cert_updates=[
                CertUpdate("a", failures=2, next_attempt_at=later, spec_digest="s1", retired=True)
            ]
        )
    )
    rec = store.snapshot().certs["a"]
    assert rec.next_attempt_at == later  # same instant, microseconds included
    assert rec.next_attempt_at is not None and rec.next_attempt_at.utcoffset() == timedelta(0)
    store.write(Batch(cert_updates=[CertUpdate("a", force_renew=True)]))
    rec = store.snapshot().certs["a"]
    assert (rec.failures, rec.next_attempt_at, rec.spec_digest, rec.retired, rec.force_renew) == (
        2,
        later,
        "s1",
        True,
        True,
    )
    # later updates in one batch fold over earlier ones; clearing wins in its update
    store.write(
        Batch(
            cert_updates=[
                CertUpdate("a", failures=5),
                CertUpdate("a", clear_next_attempt=True, next_attempt_at=later, retired=False),
            ]
        )
    )
    rec = store.snapshot().certs["a"]
    assert (rec.failures, rec.next_attempt_at, rec.retired) == (5, None, False)


def test_new_versions_supersede_and_revocation_keeps_current(backend: Backend) -> None:
    store = backend.open()
    store.write(Batch(versions=[new_version("w", 1)]))
    store.write(Batch(versions=[new_version("w", 2)]))
    # two versions of one certificate in one batch: the later one is current
    store.write(Batch(versions=[new_version("w", 3), new_version("w", 4)]))
    assert [(v.version, v.status) for v in store.versions("w")] == [
        (4, "active"),
        (3, "superseded"),
        (2, "superseded"),
        (1, "superseded"),
    ]
    assert store.snapshot().certs["w"].current == version("w", 4)
    at = T0 + timedelta(minutes=5, microseconds=9)
    store.write(Batch(revocations=[Revocation("w", 4, "keyCompromise", at)]))
    cur = store.snapshot().certs["w"].current
    assert cur is not None
    assert (cur.version, cur.status, cur.revoked_at, cur.revocation_reason) == (
        4,
        "revoked",
        at,
        "keyCompromise",
    )
    # a new version after a revoked one leaves the revoked one revoked
    store.write(Batch(versions=[new_version("w", 5)]))
    assert [(v.version, v.status) for v in store.versions("w")][:2] == [
        (5, "active"),
        (4, "revoked"),
    ]
    assert store.versions("nope") == []


def test_revoke_on_remove_follows_the_latest_version(backend: Backend) -> None:
    store = backend.open()
    nv = new_version("r", 1)
    store.write(Batch(versions=[NewVersion(nv.record, b"c", b"", None, revoke_on_remove=True)]))
    assert store.snapshot().certs["r"].revoke_on_remove is True
    store.write(Batch(versions=[NewVersion(version("r", 2), b"c", b"", None)]))
    assert store.snapshot().certs["r"].revoke_on_remove is False


def test_deployments_upsert_and_intents_close_once(backend: Backend) -> None:
    store = backend.open()
    store.write(
        Batch(
            intents=[IntentRecord("d1", "w", "deploy", "p")],
            deployments=[deployment("w", "p", 1)],
        )
    )
    later = DeploymentRecord("w", "p", 2, "fp2", {}, status="failed", deployed_at=None)
    store.write(Batch(closed_intents=[("d1", "deployed"), ("d1", "again")], deployments=[later]))
    snap = store.snapshot()
    assert snap.deployments == {("w", "p"): later} and snap.intents == ()
    store.write(Batch(closed_intents=[("d1", "overwritten?")]))
    if backend.url is None:
        with sqlite3.connect(backend.root / ".certctl" / "state.db") as db:
            row = db.execute("SELECT outcome, closed_at FROM journal WHERE id = 'd1'").fetchone()
    else:
        with psycopg.connect(backend.url) as conn:
            row = conn.execute("SELECT outcome, closed_at FROM journal WHERE id = 'd1'").fetchone()
    assert row is not None and row[0] == "deployed" and row[1] is not None


def test_generation_bumps_once_per_write(backend: Backend) -> None:
    store = backend.open()
    for i in range(1, 4):
        store.write(Batch(audit=[AuditEvent("tick", detail={"i": i})]))
        assert store.snapshot().generation == i
    store.write(Batch())  # nothing to write: no transaction, no bump
    assert store.snapshot().generation == 3


def test_failed_batch_changes_nothing(backend: Backend) -> None:
    store = backend.open()
    store.write(Batch(versions=[new_version("x", 1)]))
    with pytest.raises(StateError):
        store.write(
            Batch(
                intents=[IntentRecord("lost", "x", "issue")],
                versions=[new_version("x", 1)],  # already there: the batch fails
            )
        )
    snap = store.snapshot()
    assert snap.generation == 1 and snap.intents == ()
    store.write(Batch(intents=[IntentRecord("ok", "x", "issue")]))  # store still usable
    assert [i.id for i in store.snapshot().intents] == ["ok"]


def test_secrets_are_refused_in_json_columns(backend: Backend) -> None:
    store = backend.open()
    with pytest.raises(StateError, match="secret"):
        store.write(Batch(intents=[IntentRecord("s", "x", "issue", None, {"k": key("x")})]))


def test_materials_batch_loads_and_decrypts(backend: Backend) -> None:
    store = backend.open()
    n = 1203  # more than one chunk
    store.write(
        Batch(versions=[new_version(f"c{i:04d}", 1, with_key=i % 3 != 0) for i in range(n)])
    )
    wanted = [(f"c{i:04d}", 1) for i in range(n)] + [("c0001", 2), ("missing", 1)]
    got = store.materials(wanted)
    assert len(got) == n
    for i in (0, 1, 700, n - 1):
        name = f"c{i:04d}"
        cert_pem, chain_pem, key_pem = got[(name, 1)]
        assert cert_pem == f"CERT {name} 1\n".encode()
        assert chain_pem == f"CHAIN {name} 1\n".encode()
        assert key_pem == (key(f"{name}1") if i % 3 else None)
    assert store.materials([]) == {}


# ---------------------------------------------------------------------------
# encryption at rest


def test_private_keys_never_reach_the_database_in_plaintext(backend: Backend) -> None:
    store = backend.open()
    store.write(
        Batch(
            intents=[IntentRecord("k1", "w", "issue", None, {}, key("intent"))],
            versions=[new_version("w", 1)],
        )
    )
    store.put("ca", "root.key", KEY_PEM, secret=True)
    store.put("ca", "root.pem", b"-----BEGIN CERTIFICATE-----", secret=False)
    assert store.material("w", 1)[2] == key("w1")  # it is stored, and comes back
    assert store.get("ca", "root.key") == KEY_PEM
    blobs = [v for v in backend.raw_values() if v is not None]
    assert any(isinstance(v, bytes) and b"CERT w 1" in v for v in blobs)  # we did look
    for v in blobs:
        raw = v if isinstance(v, bytes) else str(v).encode()
        assert b"PRIVATE KEY" not in raw
    if backend.url is None:  # and not in the files either (main database + WAL)
        for f in (backend.root / ".certctl").glob("state.db*"):
            assert b"PRIVATE KEY" not in f.read_bytes(), f
        key_file = backend.root / ".certctl" / "state.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_state_dir_is_private_and_ignored_by_git(backend: Backend) -> None:
    backend.open().put("ca", "k", b"v", secret=True)  # needs (and creates) the key
    d = backend.root / ".certctl"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert (d / ".gitignore").read_text().strip() == "*"
    assert stat.S_IMODE((d / "state.key").stat().st_mode) == 0o600
    if backend.url is None:
        assert stat.S_IMODE((d / "state.db").stat().st_mode) == 0o600


def test_wrong_state_key_is_refused_with_a_clear_error(backend: Backend) -> None:
    k1 = base64.b64encode(secrets.token_bytes(32)).decode()
    k2 = secrets.token_bytes(32).hex()
    store = backend.open({"CERTCTL_STATE_KEY": k1})
    store.write(Batch(versions=[new_version("w", 1)]))
    store.close()
    with pytest.raises(StateError, match="state key does not match the one this store"):
        backend.open({"CERTCTL_STATE_KEY": k2})
    for bad, why in (("c2hvcnQ=", "exactly 32 bytes"), ("not a key!", "neither hex nor base64")):
        with pytest.raises(StateError, match=why):
            backend.open({"CERTCTL_STATE_KEY": bad})
    # no key at all: reading works, anything needing the key says what is missing
    store = backend.open({})
    assert store.snapshot().certs["w"].current is not None
    with pytest.raises(StateError, match="not available here"):
        store.material("w", 1)
    with pytest.raises(StateError, match="not available here"):
        store.acquire_apply_lock("x")
    assert not (backend.root / ".certctl" / "state.key").exists()
    # the right key, given as hex this time, works
    store = backend.open({"CERTCTL_STATE_KEY": base64.b64decode(k1).hex()})
    assert store.material("w", 1)[2] == key("w1")


def test_state_key_from_the_real_environment(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CERTCTL_STATE_KEY", base64.b64encode(b"k" * 32).decode())
    store = open_store(backend.url, inventory_root=backend.root, clock=backend.clock)
    backend.opened.append(store)
    store.put("i", "k", b"secret", secret=True)
    assert store.get("i", "k") == b"secret"
    assert not (backend.root / ".certctl" / "state.key").exists()
    monkeypatch.setenv("CERTCTL_STATE_KEY", base64.b64encode(b"j" * 32).decode())
    with pytest.raises(StateError, match="does not match"):
        open_store(backend.url, inventory_root=backend.root, clock=backend.clock)


def test_concurrent_first_use_agrees_on_one_key(backend: Backend) -> None:
    stores = [backend.open() for _ in range(6)]
    errors: list[BaseException] = []

    def use(s: StateStore, i: int) -> None:
        try:
            s.put("ca", f"k{i}", b"v", secret=True)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=use, args=(s, i)) for i, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(stores[0].get("ca", f"k{i}") == b"v" for i in range(6))


# ---------------------------------------------------------------------------
# the apply lock


def test_apply_lock_names_its_holder_and_can_be_taken_again(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    a.acquire_apply_lock("ci-job-42")
    t = time.monotonic()
    with pytest.raises(LockedError) as info:
        b.acquire_apply_lock("someone-else")
    assert time.monotonic() - t < 2  # fails fast, does not wait
    assert info.value.holder == "ci-job-42" and "ci-job-42" in str(info.value)
    with pytest.raises(LockedError):
        a.acquire_apply_lock("ci-job-42")  # not re-entrant
    a.release_apply_lock()
    a.release_apply_lock()  # harmless
    b.acquire_apply_lock("ci-job-43")
    with pytest.raises(LockedError, match="ci-job-43"):
        a.acquire_apply_lock("ci-job-44")
    b.close()  # closing releases
    a.acquire_apply_lock("ci-job-44")


LOCKER = """
import sys, time
from pathlib import Path
from certctl.state import open_store
store = open_store(sys.argv[1] or None, inventory_root=Path(sys.argv[2]), env={})
run = store.begin_run("apply", "killed-job", {})
store.acquire_apply_lock("killed-job")
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_killed_process_is_free_afterwards(backend: Backend) -> None:
    store = backend.open()
    store.put("ca", "k", b"v", secret=True)  # create the key so the child shares it
    proc = subprocess.Popen(
        [sys.executable, "-c", LOCKER, backend.url or "", str(backend.root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "locked", proc.stderr.read() if proc.stderr else ""
        with pytest.raises(LockedError, match="killed-job"):
            store.acquire_apply_lock("me")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    deadline = time.monotonic() + 15  # the server notices the dead session promptly
    while True:
        try:
            store.acquire_apply_lock("me")
            break
        except LockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    # the run the killed process left 'running' is marked crashed
    assert [(r.holder, r.status) for r in store.runs()] == [("killed-job", "crashed")]


# ---------------------------------------------------------------------------
# runs, audit, vault


def test_runs_record_start_finish_and_summary(backend: Backend) -> None:
    store = backend.open()
    r1 = store.begin_run("apply", "alice@host pid 1", {"input_digest": "d1", "actions": 3})
    backend.clock.now = T0 + timedelta(seconds=2)
    store.finish_run(r1, "ok", {"done": {"issue": 3}, "failed": 0})
    r2 = store.begin_run("apply", "bob", {})
    runs = store.runs()
    assert [r.id for r in runs] == [r2, r1]
    assert runs[0].status == "running" and runs[0].finished_at is None
    first = runs[1]
    assert (first.kind, first.holder, first.status) == ("apply", "alice@host pid 1", "ok")
    assert first.started_at == T0 and first.finished_at == T0 + timedelta(seconds=2)
    assert first.summary == {"input_digest": "d1", "actions": 3, "done": {"issue": 3}, "failed": 0}
    assert len(store.runs(limit=1)) == 1


def test_audit_is_newest_first_and_filters_by_cert(backend: Backend) -> None:
    store = backend.open()
    explicit = T0 - timedelta(days=1, microseconds=1)
    store.write(
        Batch(
            audit=[
                AuditEvent("issue", cert="a", detail={"n": 1}),
                AuditEvent("deploy", cert="a", placement="p@h", detail={"n": 2}, at=explicit),
                AuditEvent("issue", cert="b"),
            ]
        )
    )
    store.write(Batch(audit=[AuditEvent("apply.finish", run_id=7)]))
    log = store.audit_log()
    assert [e["event"] for e in log] == ["apply.finish", "issue", "deploy", "issue"]
    assert log[0]["run_id"] == 7 and log[0]["cert"] is None and log[0]["at"] == T0
    assert [e["detail"] for e in store.audit_log(cert="a")] == [{"n": 2}, {"n": 1}]
    assert store.audit_log(cert="a")[0]["at"] == explicit
    assert store.audit_log(cert="a")[0]["placement"] == "p@h"
    assert len(store.audit_log(limit=2)) == 2


def test_vault_stores_values_and_encrypts_secrets(backend: Backend) -> None:
    store = backend.open()
    assert store.get("ca", "root.key") is None
    store.put("ca", "root.key", b"\x00secret bytes\xff", secret=True)
    store.put("ca", "crl_number", b"41", secret=False)
    store.put("ca", "crl_number", b"42", secret=False)
    store.put("other", "root.key", b"different", secret=True)
    assert store.get("ca", "root.key") == b"\x00secret bytes\xff"
    assert store.get("ca", "crl_number") == b"42"
    assert store.get("other", "root.key") == b"different"
    raw = [v for v in backend.raw_values() if isinstance(v, (bytes, memoryview))]
    assert not any(b"secret bytes" in bytes(v) for v in raw)
    assert any(bytes(v) == b"42" for v in raw)


# ---------------------------------------------------------------------------
# concurrency and scale


def test_concurrent_writes_and_reads_from_threads(backend: Backend) -> None:
    store = backend.open()
    writers, per = 6, 40
    errors: list[BaseException] = []
    stop = threading.Event()

    def write(w: int) -> None:
        try:
            for i in range(per):
                name = f"w{w}-{i}"
                store.write(
                    Batch(
                        intents=[IntentRecord(f"{name}-i", name, "issue", None, {}, key(name))],
                        versions=[new_version(name, 1)],
                        audit=[AuditEvent("issue", cert=name)],
                    )
                )
        except BaseException as exc:
            errors.append(exc)

    def read() -> None:
        try:
            while not stop.is_set():
                snap = store.snapshot()
                assert len(snap.certs) <= writers * per
                store.open_intents()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    reader.join()
    assert errors == []
    snap = store.snapshot()
    assert snap.generation == writers * per
    assert len(snap.certs) == writers * per and len(snap.intents) == writers * per
    assert len(store.audit_log(limit=10_000)) == writers * per


def _big_batch(start: int, certs: int) -> Batch:
    b = Batch()
    for i in range(start, start + certs):
        name = f"c{i:05d}"
        b.intents.append(IntentRecord(f"{name}-d", name, "deploy", "files", {"version": 1}))
        b.closed_intents.append((f"{name}-i", "issued"))
        b.cert_updates.append(CertUpdate(name, failures=0, clear_next_attempt=True))
        b.versions.append(new_version(name, 1))
        b.deployments.append(deployment(name, "files", 1))
        b.audit.append(AuditEvent("issue", cert=name, detail={"version": 1}))
    return b


def test_large_batches_round_trip(backend: Backend) -> None:
    """Group commits of hundreds of rows land whole (their speed is measured by
    benchmarks/core_10k.py, not here)."""
    store = backend.open()
    for k in range(0, 2_000, 500):
        store.write(_big_batch(k, 500))
    store.write(Batch(closed_intents=[(f"c{i:05d}-d", "deployed") for i in range(2_000)]))
    snap = store.snapshot()
    assert len(snap.certs) == 2_000 and len(snap.deployments) == 2_000 and not snap.intents
    assert snap.generation == 5
    assert all(r.current is not None and r.current.version == 1 for r in snap.certs.values())
    mats = store.materials([(f"c{i:05d}", 1) for i in range(0, 2_000, 7)])
    assert len(mats) == len(range(0, 2_000, 7))


# ---------------------------------------------------------------------------
# URLs


def test_unknown_scheme_and_unreachable_server_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="unsupported state store URL scheme 'mysql'"):
        open_store("mysql://u:pw@h/db", inventory_root=tmp_path, env={})
    with pytest.raises(StateError) as info:
        open_store(
            "postgresql://certctl:hunter2@127.0.0.1:1/state", inventory_root=tmp_path, env={}
        )
    msg = str(info.value)
    assert "postgresql://certctl:***@127.0.0.1:1/state" in msg and "hunter2" not in msg
    assert "cannot connect" in msg


def test_describe_url_redacts_passwords() -> None:
    assert describe_url("postgresql://u:secret@db.example:5433/s") == (
        "postgresql://u:***@db.example:5433/s"
    )
    assert describe_url("postgres://u@db/s") == "postgres://u@db/s"
    assert "pw" not in describe_url("postgresql://db/s?user=u&password=pw")
    assert describe_url("/var/lib/certctl/state.db") == "/var/lib/certctl/state.db"
    assert describe_url("sqlite:///tmp/x.db") == "sqlite:///tmp/x.db"


def test_sqlite_path_and_url_forms(tmp_path: Path) -> None:
    plain = tmp_path / "a" / "state.db"
    s1 = open_store(str(plain), inventory_root=tmp_path / "inv", env={})
    s1.write(Batch(audit=[AuditEvent("x")]))
    s1.close()
    s2 = open_store(f"sqlite:///{plain}", inventory_root=tmp_path / "inv", env={})
    assert s2.snapshot().generation == 1
    s2.put("i", "k", b"v", secret=True)
    s2.close()
    assert (plain.parent / "state.key").exists()  # the key lives beside the database
    assert not (tmp_path / "inv").exists()  # the inventory root is not touched
    link = tmp_path / "link.db"
    link.symlink_to(plain)
    with pytest.raises(StateError, match="symlink"):
        open_store(str(link), inventory_root=tmp_path, env={})


def test_group_writer_commits_concurrent_parts_together(backend: Backend) -> None:
    """The executor's use: many asyncio tasks write through the GroupWriter (store.write
    runs in a worker thread) while the event-loop thread reads the store."""
    store = backend.open()
    writer = GroupWriter(store)

    async def action(i: int) -> None:
        name = f"g{i:03d}"
        await writer.write(Batch(intents=[IntentRecord(f"{name}-i", name, "issue", None, {})]))
        await writer.write(
            Batch(closed_intents=[(f"{name}-i", "issued")], versions=[new_version(name, 1)])
        )
        await asyncio.to_thread(store.material, name, 1)
        await writer.write(Batch(deployments=[deployment(name, "files", 1)]))

    async def main() -> None:
        await asyncio.gather(*(action(i) for i in range(150)))

    asyncio.run(main())
    snap = store.snapshot()
    assert len(snap.certs) == 150 and len(snap.deployments) == 150 and snap.intents == ()
    assert writer.transactions < 150 * 3 / 10  # grouped, not one commit per part
    assert snap.generation == writer.transactions

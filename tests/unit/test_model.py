"""Secrets never print; digests are stable; the group writer batches."""

from __future__ import annotations

import asyncio
import logging
import pickle
from pathlib import Path

import pytest

from certctl.apply.groupwriter import GroupWriter
from certctl.errors import SecretError
from certctl.model import KeySpec, Secret, SecretBytes, stable_digest
from certctl.state.base import AuditEvent, Batch


def test_secret_resolves_late_and_never_prints(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HMAC_KEY", "s3cr3t-value")
    s = Secret("env", "HMAC_KEY")
    assert s.reveal() == "s3cr3t-value"
    for shown in (repr(s), str(s), f"{s}", f"{s!r:>40}", repr({"k": [s]})):
        assert "s3cr3t" not in shown
    logging.getLogger("t").warning("value %s", s)
    assert "s3cr3t" not in caplog.text
    with pytest.raises(TypeError):
        pickle.dumps(s)
    (tmp_path / "tok").write_text("from-file\n")
    assert Secret("file", "tok", base_dir=tmp_path).reveal() == "from-file"
    with pytest.raises(SecretError, match="env:MISSING_X"):
        Secret("env", "MISSING_X").reveal()
    with pytest.raises(SecretError, match="file:nope"):
        Secret("file", "nope", base_dir=tmp_path).reveal()


def test_secret_bytes_never_print() -> None:
    b = SecretBytes(b"-----BEGIN PRIVATE KEY-----abc")
    assert "PRIVATE" not in repr(b) and "PRIVATE" not in f"{b}" and "PRIVATE" not in str([b])
    assert b.reveal().startswith(b"-----BEGIN")
    with pytest.raises(TypeError):
        pickle.dumps(b)
    try:
        raise ValueError(b)
    except ValueError as exc:
        assert "PRIVATE" not in str(exc)


def test_stable_digest_is_order_independent_and_hides_secrets() -> None:
    a = stable_digest({"x": 1, "y": [1, 2], "s": Secret("env", "A")})
    b = stable_digest({"y": [1, 2], "s": Secret("env", "A"), "x": 1})
    assert a == b
    assert a != stable_digest({"x": 1, "y": [1, 2], "s": Secret("env", "B")})


def test_key_spec_ids() -> None:
    assert KeySpec("ecdsa", 384).id == "ecdsa-p384"
    assert KeySpec("rsa", 3072).id == "rsa-3072"
    assert KeySpec("ed25519", 256).id == "ed25519"


class RecordingStore:
    """A stand-in store that only records write() calls (unit test of batching)."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []

    def write(self, batch: Batch) -> None:
        self.batches.append(batch)


def test_group_writer_merges_concurrent_writes() -> None:
    store = RecordingStore()

    async def main() -> None:
        gw = GroupWriter(store)  # type: ignore[arg-type]
        await asyncio.gather(*(gw.write(Batch(audit=[AuditEvent(f"e{i}")])) for i in range(100)))
        await gw.write(Batch(audit=[AuditEvent("last")]))

    asyncio.run(main())
    events = [e.event for b in store.batches for e in b.audit]
    assert sorted(events) == sorted([f"e{i}" for i in range(100)] + ["last"])
    assert len(store.batches) <= 3


def test_group_writer_propagates_failures() -> None:
    class Failing:
        def write(self, batch: Batch) -> None:
            raise OSError("disk full")

    async def main() -> None:
        gw = GroupWriter(Failing())  # type: ignore[arg-type]
        results = await asyncio.gather(
            *(gw.write(Batch(audit=[AuditEvent("x")])) for _ in range(5)),
            return_exceptions=True,
        )
        assert all(isinstance(r, OSError) for r in results)

    asyncio.run(main())


def test_group_writer_isolates_a_failing_part(tmp_path: Path) -> None:
    """Against the real SQLite store: a part the database refuses fails alone."""
    from certctl.state import open_store
    from certctl.state.base import IntentRecord

    store = open_store(None, inventory_root=tmp_path)

    async def main() -> list[object]:
        gw = GroupWriter(store)
        dup = IntentRecord("same-id", "a", "issue")
        parts = [Batch(intents=[IntentRecord(f"id{i}", f"c{i}", "issue")]) for i in range(5)]
        return await asyncio.gather(
            gw.write(Batch(intents=[dup])),
            *(gw.write(p) for p in parts[:2]),
            gw.write(Batch(intents=[dup])),  # primary key clash with the first
            *(gw.write(p) for p in parts[2:]),
            return_exceptions=True,
        )

    results = asyncio.run(main())
    failed = [i for i, r in enumerate(results) if isinstance(r, BaseException)]
    assert failed == [3]
    assert {i.id for i in store.open_intents()} == {"same-id"} | {f"id{i}" for i in range(5)}
    store.close()

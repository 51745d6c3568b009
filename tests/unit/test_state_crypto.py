"""Encryption at rest of the state store: blob format, row binding, the key file."""

from __future__ import annotations

import base64
import os
import stat
import threading
from pathlib import Path

import pytest

from certctl.errors import StateError
from certctl.state import crypto


def test_blob_format_and_row_binding() -> None:
    c = crypto.StateCipher(b"k" * 32)
    blob = c.encrypt(b"-----BEGIN PRIVATE KEY-----", crypto.aad_version("www", 1))
    assert blob[0] == crypto.FORMAT_VERSION and len(blob) == 1 + 12 + 27 + 16
    assert b"PRIVATE" not in blob
    assert c.decrypt(blob, crypto.aad_version("www", 1)) == b"-----BEGIN PRIVATE KEY-----"
    # moved to another row, tampered with, or read with another key: refused
    for aad in (crypto.aad_version("www", 2), crypto.aad_version("api", 1), crypto.aad_intent("x")):
        with pytest.raises(StateError, match="does not decrypt"):
            c.decrypt(blob, aad)
    with pytest.raises(StateError, match="does not decrypt"):
        c.decrypt(blob[:-1] + bytes([blob[-1] ^ 1]), crypto.aad_version("www", 1))
    with pytest.raises(StateError, match="does not decrypt"):
        crypto.StateCipher(b"j" * 32).decrypt(blob, crypto.aad_version("www", 1))
    with pytest.raises(StateError, match="unknown format"):
        c.decrypt(b"\x02" + blob[1:], crypto.aad_version("www", 1))
    # two encryptions of one value differ (random nonce)
    assert c.encrypt(b"x", b"a") != c.encrypt(b"x", b"a")
    assert "k" * 8 not in repr(c)


def test_associated_data_is_unambiguous() -> None:
    assert crypto.aad_vault("a:b", "c") != crypto.aad_vault("a", "b:c")
    assert crypto.aad_version("a:1", 2) != crypto.aad_version("a", 12)


def test_check_value_identifies_the_key() -> None:
    a, b = crypto.StateCipher(b"a" * 32), crypto.StateCipher(b"b" * 32)
    assert a.check_value == crypto.StateCipher(b"a" * 32).check_value != b.check_value
    assert b"a" * 32 not in a.check_value.encode()


def test_parse_key_accepts_hex_and_base64() -> None:
    raw = os.urandom(32)
    for text in (
        raw.hex(),
        raw.hex().upper(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        f"  {base64.b64encode(raw).decode()}\n",
    ):
        assert crypto.parse_key(text, "$K") == raw
    with pytest.raises(StateError, match=r"\$K must encode exactly 32 bytes.*got 16"):
        crypto.parse_key(base64.b64encode(raw[:16]).decode(), "$K")
    with pytest.raises(StateError, match="neither hex nor base64"):
        crypto.parse_key("zz" * 40 + "!", "$K")


def test_key_file_is_created_once_private_and_shared(tmp_path: Path) -> None:
    src = crypto.KeySource(tmp_path, {})
    assert src.find() is None
    keys: list[bytes] = []
    threads = [
        threading.Thread(
            target=lambda: keys.append(crypto.KeySource(tmp_path, {}).find_or_create())
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    path = tmp_path / "state.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.key"]  # no temp files left
    assert src.find() == keys[0]


def test_environment_key_wins_and_no_file_is_made(tmp_path: Path) -> None:
    raw = os.urandom(32)
    src = crypto.KeySource(tmp_path, {crypto.ENV_VAR: raw.hex()})
    assert src.find_or_create() == raw
    assert not (tmp_path / "state.key").exists()
    assert src.describe() == "$CERTCTL_STATE_KEY"


def test_hostile_key_files_are_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(base64.b64encode(b"x" * 32).decode())
    (tmp_path / "state.key").symlink_to(target)
    with pytest.raises(StateError, match="symlink"):
        crypto.KeySource(tmp_path, {}).find()
    (tmp_path / "state.key").unlink()
    (tmp_path / "state.key").mkdir()
    with pytest.raises(StateError):
        crypto.KeySource(tmp_path, {}).find()
    (tmp_path / "state.key").rmdir()
    (tmp_path / "state.key").write_text("short")
    with pytest.raises(StateError, match="state key file"):
        crypto.KeySource(tmp_path, {}).find()

"""Encryption at rest for the state store: private keys and secret vault values.

Each secret is sealed with AES-256-GCM. The stored blob is::

    1 byte format version (1) | 12 bytes random nonce | ciphertext + 16-byte tag

The associated data binds a blob to the row it lives in (see :func:`aad_version`,
:func:`aad_intent`, :func:`aad_vault`), so a blob copied into another row fails to
decrypt instead of silently handing out the wrong key.

The 32-byte key comes from the environment variable ``CERTCTL_STATE_KEY`` (base64 or
hex) or from ``state.key`` in the state directory, created on first use with mode 0600,
``O_EXCL|O_NOFOLLOW`` and an atomic ``link`` so that two processes starting at once end
up with the same key. A *key check value* (an HMAC of a constant under the key) is kept
in the store's ``meta`` row: opening a store with a different key fails at once with a
clear :class:`~certctl.errors.StateError` instead of producing garbage later.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from certctl.errors import StateError

ENV_VAR = "CERTCTL_STATE_KEY"
KEY_FILE = "state.key"
KEY_LEN = 32
FORMAT_VERSION = 1
NONCE_LEN = 12
_CHECK_MESSAGE = b"certctl state key check v1"


# Associated data names the row a blob belongs to. The length prefix keeps the
# encoding injective whatever characters the names contain ("a:b" + "c" never equals
# "a" + "b:c").


def aad_version(cert: str, version: int) -> bytes:
    """Associated data of a certificate version's private key."""
    return f"version:{len(cert)}:{cert}:{version}".encode()


def aad_intent(intent_id: str) -> bytes:
    """Associated data of a journal intent's private key."""
    return f"intent:{intent_id}".encode()


def aad_vault(issuer: str, key: str) -> bytes:
    """Associated data of a secret issuer-vault value."""
    return f"vault:{len(issuer)}:{issuer}:{key}".encode()


class StateCipher:
    """AES-GCM sealing with one state key. Holds the key; never prints it."""

    __slots__ = ("_aead", "check_value")

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise StateError(f"the state key must be {KEY_LEN} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self.check_value = hmac.new(key, _CHECK_MESSAGE, hashlib.sha256).hexdigest()

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = secrets.token_bytes(NONCE_LEN)
        return bytes([FORMAT_VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        blob = bytes(blob)
        if len(blob) < 1 + NONCE_LEN + 16 or blob[0] != FORMAT_VERSION:
            raise StateError("an encrypted state value has an unknown format")
        nonce = blob[1 : 1 + NONCE_LEN]
        try:
            return self._aead.decrypt(nonce, blob[1 + NONCE_LEN :], aad)
        except InvalidTag:
            raise StateError(
                "an encrypted state value does not decrypt with the state key "
                "(wrong key, or the value was moved or tampered with)"
            ) from None

    def __repr__(self) -> str:
        return "StateCipher(<key redacted>)"


def parse_key(text: str, source: str) -> bytes:
    """Decode a key given as 64 hex digits or base64 (standard or URL-safe)."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 2 * KEY_LEN:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise StateError(
                f"{source} is neither hex nor base64; it must encode {KEY_LEN} bytes "
                f"(e.g. the output of `openssl rand -base64 {KEY_LEN}`)"
            ) from None
    if len(raw) != KEY_LEN:
        raise StateError(
            f"{source} must encode exactly {KEY_LEN} bytes (AES-256), got {len(raw)} bytes"
        )
    return raw


class KeySource:
    """Where the state key comes from: the environment, else a key file.

    ``env`` is passed in (normally ``os.environ``) so tests can supply their own.
    """

    def __init__(
        self,
        key_dir: Path,
        env: Mapping[str, str],
        prepare_dir: Callable[[Path], object] | None = None,
    ) -> None:
        self.key_dir = key_dir
        self.path = key_dir / KEY_FILE
        self._env_value = env.get(ENV_VAR)
        self._prepare_dir = prepare_dir  # creates key_dir (private) before a key is made

    def describe(self) -> str:
        return f"${ENV_VAR}" if self._env_value else str(self.path)

    def find(self) -> bytes | None:
        """The key if one is configured or already on disk; never creates one."""
        if self._env_value:
            return parse_key(self._env_value, f"${ENV_VAR}")
        return self._read_file()

    def find_or_create(self) -> bytes:
        """The key, creating the key file (race-safe) when there is none yet."""
        key = self.find()
        if key is not None:
            return key
        self._create_file()
        key = self._read_file()
        if key is None:  # pragma: no cover - only if someone deletes it in between
            raise StateError(f"state key file {self.path} vanished while being created")
        return key

    def _read_file(self) -> bytes | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateError(f"state key file {self.path} is a symlink; refusing it") from None
            raise StateError(f"cannot read state key file {self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StateError(f"state key file {self.path} is not a regular file")
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        return parse_key(data.decode("ascii", "replace"), f"state key file {self.path}")

    def _create_file(self) -> None:
        """Write a new random key to a private temp file, then link it into place.

        ``link`` fails if the key file already exists, so when two processes race the
        first one's key wins and the other simply reads it; nobody ever sees a
        half-written key file.
        """
        if self._prepare_dir is not None:
            self._prepare_dir(self.key_dir)
        text = base64.b64encode(secrets.token_bytes(KEY_LEN)) + b"\n"
        tmp = self.key_dir / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(8)}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot create state key file in {self.key_dir}: {exc.strerror}"
            ) from None
        try:
            try:
                os.write(fd, text)
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
            except OSError as exc:
                raise StateError(
                    f"cannot create state key file {self.path}: {exc.strerror}"
                ) from None
            _fsync_dir(self.key_dir)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Certificates out of a Java KeyStore (JKS, and JCEKS up to its first secret-key entry).

The certificates of a JKS are stored in clear (only private keys are encrypted, and
a password only guards the file's integrity digest), so listing them needs neither
a JVM nor a password. This reader is a few dozen lines of :mod:`struct` over the
documented layout::

    magic u32 (FEEDFEED; JCEKS: CECECECE)  version u32 (1|2)  count u32
    entry*: tag u32 (1 private key, 2 trusted certificate, 3 JCEKS secret key)
            alias (u16 length + modified UTF-8)  timestamp u64
            tag 1: u32 length + encrypted key, u32 chain length, certificate*
            tag 2: certificate
            certificate: (version 2: type as u16-prefixed UTF-8) u32 length + DER
    SHA-1(password as UTF-16BE + "Mighty Aphrodite" + everything before) [20 bytes]

Private key bytes are skipped, never kept. When passwords are given, the digest is
checked against them (:attr:`Keystore.verified`).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

MAGIC_JKS = b"\xfe\xed\xfe\xed"
MAGIC_JCEKS = b"\xce\xce\xce\xce"
_MAX_COUNT = 100_000


class JKSFormatError(ValueError):
    """The bytes are not a well-formed keystore (truncated, or not one at all)."""


@dataclass(frozen=True)
class Entry:
    alias: str
    chain: tuple[bytes, ...]  # DER certificates, the entry's own first
    private_key: bool  # a private-key entry (its key stays encrypted in the store)


@dataclass(frozen=True)
class Keystore:
    entries: tuple[Entry, ...]
    verified: bool | None  # digest checked: True/False; None when no password was given
    note: str | None = None  # why reading stopped early (a JCEKS secret-key entry)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if n < 0 or end > len(self.data):
            raise JKSFormatError(f"truncated keystore (needs {end} bytes, has {len(self.data)})")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def utf(self) -> str:
        # Java's modified UTF-8 equals UTF-8 for every character but NUL and astral ones.
        return self.take(self.u16()).decode("utf-8", "replace")

    def cert(self, version: int) -> bytes:
        if version == 2:
            self.utf()  # certificate type, "X.509"
        return self.take(self.u32())


def read(data: bytes, passwords: Sequence[str] = ()) -> Keystore:
    """Parse a JKS/JCEKS keystore; raises :class:`JKSFormatError` on malformed input."""
    r = _Reader(data)
    magic = r.take(4)
    if magic not in (MAGIC_JKS, MAGIC_JCEKS):
        raise JKSFormatError("not a Java keystore")
    version = r.u32()
    if version not in (1, 2):
        raise JKSFormatError(f"unknown keystore version {version}")
    count = r.u32()
    if count > _MAX_COUNT:
        raise JKSFormatError(f"implausible entry count {count}")
    entries: list[Entry] = []
    note = None
    for _ in range(count):
        tag = r.u32()
        if tag == 3:
            note = "JCEKS secret-key entry: the entries after it were not read"
            break
        alias = r.utf()
        r.take(8)  # timestamp
        if tag == 1:
            r.take(r.u32())  # the encrypted private key: skipped, never kept
            n = r.u32()
            if n > _MAX_COUNT:
                raise JKSFormatError(f"implausible chain length {n}")
            chain = tuple(r.cert(version) for _ in range(n))
            entries.append(Entry(alias, chain, True))
        elif tag == 2:
            entries.append(Entry(alias, (r.cert(version),), False))
        else:
            raise JKSFormatError(f"unknown keystore entry tag {tag}")
    verified: bool | None = None
    if passwords and note is None:
        body, digest = data[: r.pos], data[r.pos : r.pos + 20]
        if len(digest) != 20:
            raise JKSFormatError("truncated keystore (integrity digest missing)")
        verified = any(
            hashlib.sha1(
                p.encode("utf-16-be") + b"Mighty Aphrodite" + body, usedforsecurity=False
            ).digest()
            == digest
            for p in passwords
        )
    return Keystore(tuple(entries), verified, note)

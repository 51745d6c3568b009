"""Reading what other tools left on disk, safely: bounded reads, UTF-8 with file:line
errors, and lineages that refuse alone (a broken one never stops the others)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from certctl import pki
from certctl.adopt.model import AdoptError, Candidate, IssuerDraft
from certctl.model import SecretBytes

#: Larger files are not certificates, keys or configurations of these tools.
MAX_FILE = 1 << 20


@dataclass
class Report:
    """What an import found: refused lineages (with why) and notes."""

    refused: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class ToolImport:
    """What the imports of another tool's directory share: the directory, the CA bundle
    for the emitted ACME issuers, the report, and one issuer per (server, challenge)."""

    def __init__(self, directory: Path, *, ca_bundle: str | None = None) -> None:
        self.dir = directory.expanduser().absolute()
        self.ca_bundle = ca_bundle
        self.report = Report()
        self._issuers: dict[tuple[str, str], IssuerDraft] = {}
        self._issuer_names: set[str] = set()

    def candidates(self, only: set[str] | None = None) -> list[Candidate]:
        """The candidates found (only those named in ``only``, when given)."""
        raise NotImplementedError

    def _acme_issuer(
        self, server: str, challenge: dict[str, Any], base: str, comment: str
    ) -> IssuerDraft:
        """The issuer for ACME ``server`` with ``challenge``: the one drafted before for
        the same pair, else a new one named ``base`` (``base-2``, ... when taken)."""
        key = (server, repr(sorted(challenge.items())))
        hit = self._issuers.get(key)
        if hit is not None:
            return hit
        name, n = base, 2
        while name in self._issuer_names:
            name, n = f"{base}-{n}", n + 1
        self._issuer_names.add(name)
        config: dict[str, Any] = {"type": "acme", "directory": server, "challenge": challenge}
        if self.ca_bundle:
            config["ca_bundle"] = self.ca_bundle
        config["terms_of_service_agreed"] = True
        draft = IssuerDraft(name, config, comment)
        self._issuers[key] = draft
        return draft


def read_bounded(path: Path | str, what: str) -> bytes:
    """A regular file's bytes (following no symlink at the last component)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise AdoptError(f"{what} {path} is missing") from None
    except OSError as exc:
        raise AdoptError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AdoptError(f"{what} {path} is not a regular file")
        if st.st_size > MAX_FILE:
            raise AdoptError(f"{what} {path} is too large ({st.st_size} bytes)")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 16):
            total += len(chunk)
            if total > MAX_FILE:
                raise AdoptError(f"{what} {path} is too large")
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def decode_text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise AdoptError(f"{where}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def load_leaf(data: bytes, where: str) -> x509.Certificate:
    try:
        return pki.load_cert_pem(data)
    except pki.PKIError:
        raise AdoptError(f"{where} holds no PEM certificate") from None


def load_chain(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        return pki.parse_pem_chain(data)
    except pki.PKIError:
        raise AdoptError(f"{where} holds no PEM certificate") from None


def check_key(key_pem: bytes, leaf: x509.Certificate, where: str) -> SecretBytes:
    """The key, if it is an unencrypted PEM key of the certificate. Messages never
    quote the key's bytes."""
    secret = SecretBytes(key_pem)
    try:
        key = pki.load_key_pem(secret)
    except pki.PKIError:
        raise AdoptError(
            f"{where} is not an unencrypted PEM private key of a supported type"
        ) from None
    if not pki.keys_match(key, leaf.public_key()):
        raise AdoptError(f"{where} is not the private key of the certificate")
    return secret


def mode_of(path: Path | str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:  # gone or unreadable: refuse that entry, not the whole run
        raise AdoptError(f"cannot read {path}: {exc.strerror}") from None

"""What ``certctl agent`` keeps on its host: the credential and the job journal.

Everything lives in one state directory (default ``/var/lib/certctl-agent``, mode
0700). Files are written atomically: a temp file created ``O_EXCL|O_NOFOLLOW`` with
mode 0600 in the same directory, fsynced, renamed over the old one, then the
directory fsynced. The agent refuses to start when the directory or the credential
file can be read by the group or others.

* ``credential.json`` -- the agent's identity: ``agent_id``, ``name``, ``server``,
  ``ca_file`` and the Ed25519 private key (base64 of the raw 32 bytes). The server
  only ever sees the public half.
* ``jobs/<job id>.json`` -- one journal entry per job in progress, written BEFORE
  the CSR is sent: the job id, certificate, placement and the private key made for
  it (PEM), later also the certificate that came back. A restart reuses that key for
  the same job, so a job is never issued for two keys. Removed once the result has
  been reported (the deployed key file is then the key).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from certctl.errors import CertctlError
from certctl.model import SecretBytes

DEFAULT_STATE_DIR = Path("/var/lib/certctl-agent")
CREDENTIAL_FILE = "credential.json"
JOBS_DIR = "jobs"
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


class AgentStateError(CertctlError):
    """The agent's state directory or a file in it is unusable (exit 1, one line)."""


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (0700) if needed; refuse one the group or others can read."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = path.lstat()
    except OSError as exc:
        raise AgentStateError(f"state directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AgentStateError(f"state directory {path} is not a directory")
    if st.st_mode & 0o077:
        raise AgentStateError(
            f"state directory {path} is accessible by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 0700 {path}"
        )
    return path


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data`` (0600): O_EXCL temp, fsync, rename."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_private(path: Path) -> bytes:
    """Read a file that must be private to this user (refused otherwise)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise AgentStateError(f"{path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_mode & 0o077:
            raise AgentStateError(
                f"{path} is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"refusing to use it: run chmod 0600 {path}"
            )
        return fh.read()


@dataclass(frozen=True)
class Credential:
    """The agent's identity (the private key never prints)."""

    agent_id: str
    name: str
    server: str
    private_key: Ed25519PrivateKey
    ca_file: str | None = None

    def public_key_b64(self) -> str:
        raw = self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:
        return f"Credential(agent_id={self.agent_id!r}, name={self.name!r}, server={self.server!r})"


def private_key_bytes(key: Ed25519PrivateKey) -> bytes:
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat

    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


class AgentState:
    """The state directory: credential and job journal."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @property
    def credential_path(self) -> Path:
        return self.dir / CREDENTIAL_FILE

    def prepare(self) -> None:
        ensure_dir(self.dir)
        ensure_dir(self.dir / JOBS_DIR)

    # ------------------------------------------------------------ credential
    def has_credential(self) -> bool:
        return self.credential_path.exists()

    def save_credential(self, cred: Credential) -> None:
        self.prepare()
        doc = {
            "agent_id": cred.agent_id,
            "name": cred.name,
            "server": cred.server,
            "ca_file": cred.ca_file,
            "private_key": base64.b64encode(private_key_bytes(cred.private_key)).decode(),
        }
        write_private(self.credential_path, json.dumps(doc, indent=1).encode())

    def load_credential(self) -> Credential:
        ensure_dir(self.dir)
        path = self.credential_path
        try:
            raw = read_private(path)
        except FileNotFoundError:
            raise AgentStateError(
                f"no credential in {self.dir}: enroll first with "
                "`certctl agent enroll --server URL --token TOKEN --name NAME`"
            ) from None
        try:
            doc = json.loads(raw)
            key = Ed25519PrivateKey.from_private_bytes(base64.b64decode(doc["private_key"]))
            return Credential(
                agent_id=str(doc["agent_id"]),
                name=str(doc["name"]),
                server=str(doc["server"]),
                private_key=key,
                ca_file=doc.get("ca_file"),
            )
        except (ValueError, KeyError, TypeError):
            raise AgentStateError(f"{path} is not a valid agent credential") from None

    # --------------------------------------------------------------- journal
    def _job_path(self, job_id: str) -> Path:
        if not _JOB_ID.match(job_id):
            raise AgentStateError(f"job id {job_id[:40]!r} is not a valid identifier")
        return self.dir / JOBS_DIR / f"{job_id}.json"

    def journal(self, job_id: str, entry: Mapping[str, Any], key_pem: SecretBytes | None) -> None:
        """Write (replace) the journal entry of a job, with its key when given."""
        doc = dict(entry)
        if key_pem is not None:
            doc["key_pem"] = key_pem.reveal().decode("ascii")
        write_private(self._job_path(job_id), json.dumps(doc).encode())

    def journaled(self, job_id: str) -> tuple[dict[str, Any], SecretBytes | None] | None:
        """The journal entry of a job (without the key) and its key, if any."""
        path = self._job_path(job_id)
        try:
            raw = read_private(path)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
        except ValueError:
            return None
        key = doc.pop("key_pem", None)
        return doc, (SecretBytes(key.encode("ascii")) if isinstance(key, str) else None)

    def forget(self, job_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._job_path(job_id).unlink()

    def prune(self, max_age_s: float, now: float) -> list[str]:
        """Remove journal entries older than ``max_age_s`` (jobs the server superseded
        or gave to another agent long ago: their keys must not linger)."""
        gone = []
        for job_id in self.journaled_jobs():
            path = self._job_path(job_id)
            try:
                if now - path.stat().st_mtime > max_age_s:
                    path.unlink()
                    gone.append(job_id)
            except OSError:
                continue
        return gone

    def journaled_jobs(self) -> list[str]:
        try:
            return sorted(
                p.stem for p in (self.dir / JOBS_DIR).glob("*.json") if _JOB_ID.match(p.stem)
            )
        except OSError:
            return []

"""Helpers to run the real ``certctl`` command as a user would (a subprocess)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

BASE = """
defaults:
  issuer: ca
  profile: tls
  ttl: 30d
  key: {type: ecdsa, curve: P-256}
issuers:
  ca:
    type: local_ca
    root: {common_name: E2E Root CA, key: {type: ecdsa, curve: P-256}, ttl: 3650d}
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d}
policies:
  names: {san_allow: ["*.e2e.test", "e2e.test"]}
targets:
  files:
    type: file
    root: out/files
    cert_path: "{{ cert.name }}/cert.pem"
    fullchain_path: "{{ cert.name }}/fullchain.pem"
    key_path: "{{ cert.name }}/key.pem"
  combined:
    type: file
    root: out/combined
    combined_path: "{{ cert.name }}.pem"
"""


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]

    @property
    def inv(self) -> Path:
        return self.root / "inventory"

    def write(self, name: str, text: str) -> None:
        (self.inv / name).write_text(text, encoding="utf-8")

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        proc = subprocess.run(
            [sys.executable, "-m", "certctl", "-i", str(self.inv), *args],
            capture_output=True,
            text=True,
            cwd=self.root,
            env={**self.env, **(env or {})},
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.inv / ".certctl" / "state.db")


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "base.yaml").write_text(BASE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    return Workspace(tmp_path, env)


def certs_yaml(entries: dict[str, str]) -> str:
    return "certificates:\n" + "".join(
        f"  {name}:\n" + "".join(f"    {line}\n" for line in body.strip().splitlines())
        for name, body in entries.items()
    )


MakeCerts = Callable[[dict[str, str]], str]


@pytest.fixture
def make_certs() -> MakeCerts:
    return certs_yaml

"""Fixtures shared by the SSH target tests: a throwaway sshd per test module and a
throwaway nginx per test (both on loopback, see ssh_support)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.ssh_support import Nginx, Sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Nginx]:
    server = Nginx(tmp_path / "nginx", tmp_path / "certs")
    try:
        yield server
    finally:
        server.stop()

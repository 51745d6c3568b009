"""Shared fixtures: a real PostgreSQL server and fresh databases on it.

``pg_server`` (session) finds PostgreSQL: the server on 127.0.0.1:5432 (user
``postgres``) when it answers -- or the URL in ``CERTCTL_TEST_PG`` -- otherwise a
throwaway cluster started from the machine's own binaries
(``/usr/lib/postgresql/*/bin/initdb`` + ``pg_ctl``) in a temp directory on a free port,
run as ``nobody`` when the tests run as root. If neither works the tests that need it
FAIL with the reason; they are never skipped silently.

``make_pg_db`` (function) is a factory: each call creates ``certctl_test_<uuid>`` and
returns its URL; every database it made is dropped ``WITH (FORCE)`` at teardown.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432"


def _answers(base_url: str) -> str | None:
    """None when ``base_url`` accepts connections, else the reason it does not."""
    try:
        with psycopg.connect(f"{base_url}/postgres", connect_timeout=3, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pg_bin() -> Path | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


class _Cluster:
    """A throwaway PostgreSQL cluster in a temp directory."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="certctl-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # initdb/postgres refuse to run as root
            runuser = shutil.which("runuser") or shutil.which("setpriv")
            if runuser is None:
                raise RuntimeError("running as root and neither runuser nor setpriv exists")
            if runuser.endswith("runuser"):
                self.prefix = [runuser, "-u", "nobody", "--"]
            else:
                self.prefix = [runuser, "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "nobody")

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            [*self.prefix, *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C"},
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {proc.stderr.strip()[-800:]}")

    def start(self) -> str:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        opts = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c full_page_writes=off -c max_connections=200"
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            opts,
            "-w",
            "-t",
            "60",
            "start",
        )
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """Base URL (no database) of a running PostgreSQL server the tests may use."""
    wanted = os.environ.get("CERTCTL_TEST_PG", DEFAULT_PG).rstrip("/")
    why_not = _answers(wanted)
    if why_not is None:
        yield wanted
        return
    bindir = _pg_bin()
    if bindir is None:
        pytest.fail(
            f"PostgreSQL is needed: {wanted} does not answer ({why_not}) and no "
            "/usr/lib/postgresql/*/bin/initdb exists to start one (run scripts/test-deps.sh)",
            pytrace=False,
        )
    cluster = _Cluster(bindir)
    try:
        url = cluster.start()
    except Exception as exc:
        cluster.stop()
        pytest.fail(
            f"PostgreSQL is needed: {wanted} does not answer ({why_not}) and starting a "
            f"throwaway cluster from {bindir} failed: {exc}",
            pytrace=False,
        )
    try:
        yield url
    finally:
        cluster.stop()


@pytest.fixture
def make_pg_db(pg_server: str) -> Iterator[Callable[[], str]]:
    """Factory of fresh, empty databases: each call returns a new database URL."""
    made: list[str] = []

    def make() -> str:
        name = f"certctl_test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{pg_server}/{name}"

    yield make
    for name in made:
        with psycopg.connect(f"{pg_server}/postgres", autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

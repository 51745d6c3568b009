"""What the tests of real worker processes share: stopping the processes a test (or
benchmark) started, and checking that the leaves workers issued chain to the one CA
the state keeps."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from cryptography import x509


def stop_all(procs: Sequence[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM each process still running, then wait for each (``timeout`` seconds);
    one that outlives its wait is killed and reaped."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def assert_issued_by_stored_ca(url: str, files: Path, certs: int) -> None:
    """``files/c<i>/cert.pem`` (i < ``certs``) are each signed by local CA ``ca``'s root
    as the state at ``url`` keeps it (the CA was created once, not once per worker)."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT value FROM issuer_vault WHERE issuer = 'ca' AND key = 'root/cert.pem'"
        ).fetchone()
    assert row is not None
    ca = x509.load_pem_x509_certificate(bytes(row[0]))
    for i in range(certs):
        leaf = (files / f"c{i}" / "cert.pem").read_bytes()
        x509.load_pem_x509_certificate(leaf).verify_directly_issued_by(ca)

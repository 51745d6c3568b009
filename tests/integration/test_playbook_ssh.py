"""Playbooks over SSH: a real sshd and a real nginx on loopback (fixtures in
conftest.py), the local CA and SQLite. verify-endpoints probes the live nginx,
a redeploy playbook heals the host, rotate-profile-keys puts a fresh key on it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner, Result

from certctl.cli import cli
from certctl.state import open_store
from certctl_connectors.targets.ssh import fetch_fingerprint
from tests.integration.ssh_support import Nginx, Sshd
from tests.integration.test_ssh_target import write_inventory

REDEPLOY = """
name: redeploy-edge
steps:
  - name: put the current certificates back on the edge hosts
    action: redeploy
    select: {target: edge}
    verify: true
"""


def run(inv: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["-i", str(inv), *args], catch_exceptions=False)


def served(nginx: Nginx) -> str | None:
    return asyncio.run(fetch_fingerprint("127.0.0.1", nginx.port, None, 5))


def test_playbooks_over_ssh_verify_redeploy_and_rotate(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    r = run(inv, "apply", "--auto-approve")
    assert r.exit_code == 0, r.output
    store = open_store(None, inventory_root=inv)
    first = store.snapshot().certs["web"].current
    assert first is not None and served(nginx) == first.fingerprint

    r = run(inv, "run", "verify-endpoints")
    assert r.exit_code == 0, r.output
    assert "1 endpoint(s) probed, 1 placement(s) read back, 0 with problems" in r.output

    # The files vanish from the host (nginx still serves what it loaded).
    (nginx.certdir / "web.crt").unlink()
    r = run(inv, "run", "verify-endpoints")
    assert r.exit_code == 1 and "FAILED web: verify: edge@box files missing" in r.output

    book = tmp_path / "redeploy.yaml"
    book.write_text(REDEPLOY, encoding="utf-8")
    r = run(inv, "run", str(book))
    assert r.exit_code == 0, r.output
    assert (nginx.certdir / "web.crt").exists()
    assert store.snapshot().certs["web"].current == first  # redeployed, not reissued
    assert served(nginx) == first.fingerprint

    key_before = (nginx.certdir / "web.key").read_bytes()
    r = run(inv, "run", "rotate-profile-keys", "-e", "profile=tls")
    assert r.exit_code == 0, r.output
    now = store.snapshot().certs["web"].current
    assert now is not None and now.version == first.version + 1
    assert (nginx.certdir / "web.key").read_bytes() != key_before
    assert served(nginx) == now.fingerprint  # the live endpoint serves the rotated one
    store.close()

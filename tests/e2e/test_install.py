"""A plain (non-editable) ``pip install .`` gives a complete certctl: schemas,
built-in connectors and SQL migrations travel inside the distribution."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INVENTORY = """
issuers: {ca: {type: local_ca, root: {common_name: Install Test Root}}}
defaults: {issuer: ca}
targets:
  out:
    {type: file, root: out, fullchain_path: "{{ cert.name }}.pem", key_path: "{{ cert.name }}.key"}
certificates: {www: {common_name: www.install.test, targets: [out]}}
"""


def test_plain_install_is_complete(tmp_path: Path) -> None:
    site = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    assert not (site / "connectors").exists(), "a generic 'connectors' import name was taken"
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "inventory.yaml").write_text(INVENTORY, encoding="utf-8")
    # Run from a directory outside the source tree, with only the installed copy on
    # the path (dependencies still come from this interpreter's site-packages).
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run(
        [
            sys.executable,
            "-c",
            "import certctl, sys;"
            "assert certctl.__file__.startswith(sys.argv.pop(1)), certctl.__file__;"
            "from certctl.cli import main; sys.argv[0] = 'certctl'; main()",
            str(site),
            "-i",
            str(inv),
            "apply",
            "--auto-approve",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 issued" in run.stdout
    assert (inv / "out" / "www.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    # The bundled playbooks and their schema travel too.
    book = subprocess.run(
        [*run.args[:4], "-i", str(inv), "run", "verify-endpoints"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert book.returncode == 0, book.stdout + book.stderr
    assert "RECAP: 1 of 1 step(s) run, 1 certificate(s) done" in book.stdout

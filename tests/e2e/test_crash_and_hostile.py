"""SIGKILL in the middle of apply, then rerun: nothing issued twice, no torn file.
Hostile inventory values: a clear error, and nothing changes."""

from __future__ import annotations

import hashlib
import signal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.conftest import Workspace, certs_yaml

N = 12


def fleet() -> str:
    return certs_yaml(
        {
            f"svc{i:02d}": f"common_name: svc{i:02d}.e2e.test\ntargets: [files, combined]"
            for i in range(N)
        }
    )


def check_converged(ws: Workspace) -> None:
    with ws.db() as db:
        counts = dict(
            db.execute("SELECT cert, count(*) FROM certificate_versions GROUP BY cert").fetchall()
        )
        fps = dict(
            db.execute(
                "SELECT cert, fingerprint FROM certificate_versions WHERE status = 'active'"
            ).fetchall()
        )
        open_intents = db.execute(
            "SELECT count(*) FROM journal WHERE closed_at IS NULL"
        ).fetchone()[0]
    assert counts == {f"svc{i:02d}": 1 for i in range(N)}, "a certificate was issued twice"
    assert open_intents == 0
    for i in range(N):
        name = f"svc{i:02d}"
        d = ws.inv / "out/files" / name
        leaf = x509.load_pem_x509_certificate((d / "cert.pem").read_bytes())
        fp = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
        assert fp == fps[name]
        key = serialization.load_pem_private_key((d / "key.pem").read_bytes(), None)
        assert key.public_key() == leaf.public_key()
        combined = (ws.inv / "out/combined" / f"{name}.pem").read_bytes()
        assert combined.startswith((d / "cert.pem").read_bytes())
    leftovers = [p for p in (ws.inv / "out").rglob("*") if ".tmp" in p.name]
    assert leftovers == []


@pytest.mark.parametrize(
    "failpoint",
    [
        "after_issue_intent=1",
        "after_issue_intent=7",
        "after_issue=3",
        "after_version=5",
        "after_stage=4",
        "after_commit=9",
        "after_commit=20",
    ],
)
def test_sigkill_mid_apply_then_rerun_converges(workspace: Workspace, failpoint: str) -> None:
    ws = workspace
    ws.write("certs.yaml", fleet())
    r = ws.run(
        "apply", "--auto-approve", "--concurrency", "4", env={"CERTCTL_FAILPOINTS": failpoint}
    )
    assert r.code == -signal.SIGKILL, (r.code, r.err)
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err + r.out
    check_converged(ws)
    r = ws.run("plan", "--detailed-exitcode")
    assert r.code == 0, r.out


HOSTILE = [
    (
        "traversal",
        "common_name: a.e2e.test\ntargets: [evil]",
        "targets:\n  evil:\n    type: file\n    root: out\n    cert_path: ../../../etc/x.pem\n",
        "escapes",
    ),
    (
        "absolute",
        "common_name: a.e2e.test\ntargets: [evil]",
        "targets:\n  evil:\n    type: file\n    root: out\n    cert_path: /etc/passwd\n",
        "escapes",
    ),
    (
        "nul",
        'common_name: "a\\0.e2e.test"\ntargets: [files]',
        "",
        "NUL",
    ),
    (
        "huge",
        "common_name: " + "a" * (10 * 1024 * 1024) + "\ntargets: [files]",
        "",
        "too long",
    ),
    (
        "shell",
        'common_name: "a.e2e.test; rm -rf /"\ntargets: [files]',
        "",
        "invalid name",
    ),
    (
        "template-escape",
        "common_name: a.e2e.test\ntargets: [evil]",
        "targets:\n  evil:\n    type: file\n    root: out\n"
        "    cert_path: \"{{ ''.__class__.__mro__ }}\"\n",
        "",
    ),
]


@pytest.mark.parametrize(("case", "body", "extra", "needle"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_values_are_refused_and_change_nothing(
    workspace: Workspace, case: str, body: str, extra: str, needle: str
) -> None:
    ws = workspace
    ws.write("certs.yaml", certs_yaml({"a": body}))
    if extra:
        ws.write("extra.yaml", extra)
    before = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    for cmd in (["validate"], ["plan"], ["apply", "--auto-approve"]):
        r = ws.run(*cmd)
        assert r.code == 1, (cmd, r.out)
        assert needle in r.err, r.err[:500]
        assert "Traceback" not in r.err
        assert len(r.err) < 5000  # a clear message, not the 10 MB value echoed back
    after = sorted(p.relative_to(ws.root) for p in ws.root.rglob("*"))
    assert after == before

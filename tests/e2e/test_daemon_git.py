"""Git-triggered reconcile: ``daemon --git`` and ``hooks install``, with real git
repositories the tests create (commits on branches, a force-push back, a rewrite)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import BASE, Result, Workspace, certs_yaml


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@e2e.test",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@e2e.test",
    }
    proc = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def commit(repo: Path, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        path = repo / "inventory" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    git(src, "init", "-q", "-b", "main")
    return src


def daemon(ws: Workspace, home: Path, repo: Path, *args: str) -> Result:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "certctl",
            "-i",
            str(home),
            "daemon",
            "--git",
            str(repo),
            "--branch",
            "main",
            "--git-path",
            "inventory",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ws.root,
        env=ws.env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_at(ws: Workspace, inv: Path, *args: str) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(inv), *args],
        capture_output=True, text=True, cwd=ws.root, env=ws.env, timeout=120,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return Result(proc.returncode, proc.stdout, proc.stderr)


def audit(home: Path, event: str) -> list[dict[str, object]]:
    with sqlite3.connect(home / ".certctl" / "state.db") as conn:
        rows = conn.execute("SELECT detail FROM audit WHERE event = ? ORDER BY id", (event,))
        return [json.loads(r[0]) for r in rows]


def versions(home: Path) -> dict[str, int]:
    with sqlite3.connect(home / ".certctl" / "state.db") as conn:
        rows = conn.execute("SELECT cert, count(*) FROM certificate_versions GROUP BY cert")
        return dict(rows.fetchall())


def cert(name: str) -> dict[str, str]:
    return {name: f"common_name: {name}.e2e.test\ntargets: [files]"}


def test_daemon_applies_new_commits_rejects_broken_ones_and_never_goes_back(
    workspace: Workspace, repo: Path, tmp_path: Path
) -> None:
    ws, home = workspace, tmp_path / "home"
    c1 = commit(repo, {"base.yaml": BASE, "certs.yaml": certs_yaml(cert("a"))}, "first")
    res = daemon(ws, home, repo, "--once")
    assert res.code == 0, res.err
    assert f"git: applied {c1[:12]} (main)" in res.err
    checkout = home / ".certctl" / "git" / "checkout" / "inventory"
    assert (checkout / "out" / "files" / "a" / "cert.pem").exists()
    (applied,) = audit(home, "git.applied")
    assert applied["commit"] == c1 and applied["previous"] is None
    assert applied["subject"] == "first" and isinstance(applied["run_id"], int)

    c2 = commit(repo, {"certs.yaml": certs_yaml({**cert("a"), **cert("b")})}, "add b")
    res = daemon(ws, home, repo, "--once")
    assert res.code == 0, res.err
    assert [d["commit"] for d in audit(home, "git.applied")] == [c1, c2]
    assert audit(home, "git.applied")[-1]["previous"] == c1
    assert versions(home) == {"a": 1, "b": 1}

    # A commit that breaks the inventory: reported with file:line, not applied; the
    # previous good commit stays checked out and in force.
    broken = (
        certs_yaml({**cert("a"), **cert("b")}) + "  c: {common_name: c.e2e.test, issuer: nope}\n"
    )
    c3 = commit(repo, {"certs.yaml": broken}, "break it")
    res = daemon(ws, home, repo, "--once")
    assert res.code == 1
    assert f"commit {c3[:12]} breaks the inventory and is not applied" in res.err
    assert f"still in force: {c2[:12]}" in res.err
    assert "inventory/certs.yaml:8:" in res.err and "nope" in res.err
    assert str(home) not in res.err  # paths are shown relative to the repository
    (rejected,) = audit(home, "git.rejected")
    assert rejected["commit"] == c3 and "inventory/certs.yaml:8:" in str(rejected["error"])
    assert [d["commit"] for d in audit(home, "git.applied")] == [c1, c2]
    assert "issuer: nope" not in (checkout / "certs.yaml").read_text()
    assert versions(home) == {"a": 1, "b": 1}

    c4 = commit(repo, {"certs.yaml": certs_yaml({**cert("a"), **cert("b"), **cert("c")})}, "fix")
    res = daemon(ws, home, repo, "--once")
    assert res.code == 0, res.err
    assert [d["commit"] for d in audit(home, "git.applied")] == [c1, c2, c4]
    assert versions(home) == {"a": 1, "b": 1, "c": 1}

    # The branch is forced back to c2: refused (c would be retired otherwise).
    git(repo, "reset", "-q", "--hard", c2)
    res = daemon(ws, home, repo, "--once")
    assert res.code == 1
    assert f"refusing to go back: main is at {c2[:12]}" in res.err
    assert f"last applied {c4[:12]}" in res.err
    assert "c.e2e.test" in (checkout / "certs.yaml").read_text()
    # ... and rewritten history that does not descend from c4: refused too.
    c5 = commit(repo, {"extra.yaml": "vars: {x: 1}\n"}, "diverge")
    res = daemon(ws, home, repo, "--once")
    assert res.code == 1
    assert f"refusing {c5[:12]}: it does not descend from the last applied {c4[:12]}" in res.err
    assert [d["commit"] for d in audit(home, "git.applied")] == [c1, c2, c4]
    plan = subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(checkout),
         "--state", str(home / ".certctl" / "state.db"), "plan", "--detailed-exitcode"],
        capture_output=True, text=True, env=ws.env, timeout=120,
    )  # fmt: skip
    assert plan.returncode == 0, plan.stdout + plan.stderr


def test_daemon_polls_the_branch_on_its_interval(
    workspace: Workspace, repo: Path, tmp_path: Path
) -> None:
    ws, home = workspace, tmp_path / "home"
    commit(repo, {"base.yaml": BASE, "certs.yaml": certs_yaml(cert("a"))}, "first")
    proc = subprocess.Popen(
        [sys.executable, "-m", "certctl", "-i", str(home), "daemon", "--git", str(repo),
         "--git-path", "inventory", "--interval-git", "0.2", "--interval-apply", "3600",
         "--interval-drift", "3600", "--interval-housekeeping", "3600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ws.env, cwd=ws.root,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        c2 = None
        while time.monotonic() < deadline:
            assert proc.poll() is None
            db = home / ".certctl" / "state.db"
            done = [d["commit"] for d in audit(home, "git.applied")] if db.exists() else []
            if c2 is None and len(done) == 1:
                c2 = commit(repo, {"certs.yaml": certs_yaml({**cert("a"), **cert("b")})}, "b")
            if c2 is not None and c2 in done:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the daemon did not apply the new commit within 60 s")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert versions(home) == {"a": 1, "b": 1}


def test_hooks_install_runs_plan_and_apply_after_a_commit(workspace: Workspace, repo: Path) -> None:
    ws = workspace
    inv = repo / "inventory"
    commit(repo, {"base.yaml": BASE}, "base")
    hook = repo / ".git" / "hooks" / "post-commit"
    hook.write_text("#!/bin/sh\necho mine\n")
    refused = run_at(ws, inv, "hooks", "install", "--apply")
    assert refused.code == 1 and "was not written by certctl" in refused.err
    res = run_at(ws, inv, "hooks", "install", "--apply", "--force")
    assert res.code == 0, res.err
    assert "post-merge" in res.out and "post-commit" in res.out
    assert os.access(hook, os.X_OK) and "certctl hooks install" in hook.read_text()
    assert run_at(ws, inv, "hooks", "install", "--apply").code == 0  # ours: replaced
    # Committing a certificate runs plan then apply through the hook.
    commit(repo, {"certs.yaml": certs_yaml(cert("a"))}, "add a")
    assert (inv / "out" / "files" / "a" / "cert.pem").exists()
    with sqlite3.connect(inv / ".certctl" / "state.db") as conn:
        assert conn.execute("SELECT count(*) FROM certificate_versions").fetchone()[0] == 1
    assert git(repo, "status", "--porcelain") == "?? inventory/out/"  # state is ignored

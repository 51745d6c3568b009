"""PR review (certctl.review, `certctl diff`, `certctl plan --base`) against real git
repositories created in a temporary directory."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from certctl import review
from certctl.cli import cli
from certctl.connectors import default_registry
from certctl.model import Certificate, Inventory, Issuer, KeySpec, Placement

HEADER = """\
issuers:
  ca1: {type: local_ca, root: {common_name: Review CA 1}}
  ca2: {type: local_ca, root: {common_name: Review CA 2}}
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d}
targets:
  files: {type: file, root: out, cert_path: "{{ cert.name }}.pem", key_path: "{{ cert.name }}.key"}
  more: {type: file, root: more, cert_path: "{{ cert.name }}.pem", key_path: "{{ cert.name }}.key"}
defaults: {issuer: ca1, profile: tls, ttl: 30d}
"""


def cert_yaml(name: str, extra: str = "", targets: str = "[files]") -> str:
    return f"  {name}:\n    common_name: {name}.review.test\n    targets: {targets}\n" + extra


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.test",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.test",
    }
    out = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    )
    return out.stdout.strip()


def commit(repo: Path, certs: str, message: str, header: str = HEADER) -> str:
    inv = repo / "inv"
    inv.mkdir(exist_ok=True)
    (inv / "main.yaml").write_text(header, encoding="utf-8")
    (inv / "certs.yaml").write_text("certificates:\n" + certs, encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q", "-b", "main")
    return r


def run_cli(repo: Path, *args: str) -> tuple[int, str]:
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(repo)
    try:
        result = runner.invoke(cli, ["-i", "inv", "--state", str(repo.parent / "state.db"), *args])
    finally:
        os.chdir(old)
    return result.exit_code, result.output


def test_diff_reports_added_removed_changed_and_implied_actions(repo: Path) -> None:
    base_certs = (
        cert_yaml("keep")
        + cert_yaml("gone", "    revoke_on_remove: true\n")
        + cert_yaml("quiet-gone")
        + cert_yaml("move", targets="[files]")
        + cert_yaml("names")
    )
    commit(repo, base_certs, "base")
    head_certs = (
        cert_yaml("keep")
        + cert_yaml("move", targets="[files, more]")
        + cert_yaml("names", "    sans: [alt.review.test]\n    issuer: ca2\n")
        + cert_yaml("fresh")
    )
    commit(repo, head_certs, "head")
    code, out = run_cli(repo, "diff", "HEAD~1", "HEAD", "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["ok"] is True
    assert doc["certificates"]["added"] == ["fresh"]
    assert doc["certificates"]["removed"] == ["gone", "quiet-gone"]
    changed = {c["name"]: c["changes"] for c in doc["certificates"]["changed"]}
    assert set(changed) == {"move", "names"}
    assert {"field": "issuer", "old": "ca1", "new": "ca2"} in changed["names"]
    assert {"field": "sans", "old": "-", "new": "alt.review.test"} in changed["names"]
    assert changed["move"] == [{"field": "targets", "old": "files", "new": "files, more"}]
    acts = {(a["kind"], a["cert"], a["placement"]) for a in doc["actions"]}
    assert ("issue", "fresh", None) in acts
    assert ("renew", "names", None) in acts
    assert ("revoke", "gone", None) in acts
    assert ("retire", "quiet-gone", None) in acts
    # a new target deploys the existing certificate, no reissue
    assert ("deploy", "move", "more") in acts
    assert not any(k in ("renew", "issue") and c == "move" for k, c, _ in acts)
    assert ("deploy", "keep", "files") not in acts
    assert "revokes 1 certificate" in doc["warnings"]
    assert "changes the issuer of 1 certificate" in doc["warnings"]
    assert "removes 2 certificates from the inventory" in doc["warnings"]


def test_broken_head_is_reported_with_file_and_line_and_exits_1(repo: Path) -> None:
    commit(repo, cert_yaml("a"), "base")
    # line 8 of certs.yaml, column 13: an unknown issuer
    commit(repo, cert_yaml("a") + cert_yaml("b", "    issuer: nope\n"), "broken")
    code, out = run_cli(repo, "diff", "HEAD~1", "HEAD", "--format", "markdown")
    assert code == 1
    assert "does not load" in out
    assert "inv/certs.yaml:8:13" in out
    assert "nope" in out
    # the working tree (= HEAD) is broken too: plan --base reports it the same way
    code, out = run_cli(repo, "plan", "--base", "HEAD~1")
    assert code == 1
    assert "inv/certs.yaml:8:13" in out


def test_missing_base_inventory_means_everything_is_new(repo: Path) -> None:
    (repo / "README").write_text("x", encoding="utf-8")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "empty")
    commit(repo, cert_yaml("a") + cert_yaml("b"), "first inventory")
    code, out = run_cli(repo, "diff", "HEAD~1", "HEAD")
    assert code == 0, out
    assert "2 added" in out
    assert "does not exist" in out


def test_unknown_revision_is_an_error(repo: Path) -> None:
    commit(repo, cert_yaml("a"), "base")
    code, out = run_cli(repo, "diff", "no-such-rev", "HEAD")
    assert code == 1
    code, out = run_cli(repo, "diff", "--", "--output=/tmp/x", "HEAD")
    assert code == 1
    assert not Path("/tmp/x").exists() or "not a git revision" in out


def test_plan_base_marks_actions_introduced_by_the_change(repo: Path) -> None:
    commit(repo, cert_yaml("old"), "base")
    commit(repo, cert_yaml("old") + cert_yaml("new"), "head")
    code, out = run_cli(repo, "plan", "--base", "HEAD~1", "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    marks = {(a["kind"], a["cert"]): a["introduced"] for a in doc["actions"]}
    # nothing applied yet: "old" would be issued at the base too
    assert marks[("issue", "old")] is False
    assert marks[("issue", "new")] is True
    code, _ = run_cli(repo, "apply", "--auto-approve")
    assert code == 0
    code, out = run_cli(repo, "plan", "--base", "HEAD~1", "--detailed-exitcode")
    assert code == 0, out  # applied: no changes left
    # now an edit in the working tree (not committed) is reviewed against HEAD
    (repo / "inv" / "certs.yaml").write_text(
        "certificates:\n" + cert_yaml("old", "    issuer: ca2\n") + cert_yaml("new"),
        encoding="utf-8",
    )
    code, out = run_cli(repo, "plan", "--base", "HEAD", "--format", "markdown")
    assert code == 0, out
    assert "changes the issuer of 1 certificate" in out
    assert "| renew | 1 | issuer changed: ca1 -&gt; ca2 | this change |" in out


# ---------------------------------------------------------------------------
# pure diff at scale


def synthetic(n: int, issuer: str = "ca1", custody: str = "controller", skip: int = 0) -> Inventory:
    certs = {}
    for i in range(skip, n):
        name = f"c{i:05d}"
        certs[name] = Certificate(
            name=name,
            common_name=f"{name}.example.test",
            sans=(f"alt-{name}.example.test",),
            issuer=issuer if i % 2 == 0 else "ca1",
            profile="tls",
            key=KeySpec(custody=custody if i < 30 else "controller"),
            placements=(Placement("files", "file"),),
            revoke_on_remove=True,
        )
    issuers = {k: Issuer(k, "local_ca") for k in ("ca1", "ca2")}
    return Inventory(root=Path("."), certificates=certs, issuers=issuers, profiles={})


def test_a_5000_certificate_change_stays_readable() -> None:
    base = synthetic(5000, custody="target")
    head = synthetic(5000, issuer="ca2", skip=3)
    d = review.diff_inventories(base, head)
    assert d.removed == ("c00000", "c00001", "c00002")
    # every even one from 4 on changes issuer; 3..29 also (odd: only) leave target custody
    assert len(d.changed) == 2498 + 14
    assert "revokes 3 certificates" in d.warnings
    assert "changes the issuer of 2498 certificates" in d.warnings
    assert any(
        w.startswith("moves keys off target custody for 27 certificates") for w in d.warnings
    )
    r = review.Review("certctl diff", "base", "head", d)
    md = review.render_markdown(r)
    assert len(md.splitlines()) < 150
    assert len(md) < 20_000
    assert "| 2485 | `c00030`" in md  # the issuer-only group, largest first
    assert "and 2477 more |" in md  # ... its names capped
    assert "<details>" in md
    # identical changes are grouped: 3 distinct kinds of change
    assert "changed: 2512 (3 distinct)" in md
    doc = review.review_to_dict(r)
    assert len(doc["certificates"]["changed"]) == 2512  # JSON is complete, not capped


def test_diff_of_two_10k_revisions_is_fast() -> None:
    base = synthetic(10_000)
    head = synthetic(10_000, issuer="ca2", skip=100)
    start = time.perf_counter()
    d = review.diff_inventories(base, head)
    elapsed = time.perf_counter() - start
    print(f"diff_inventories of 2 x 10,000 certificates: {elapsed:.3f} s")
    assert len(d.removed) == 100
    assert len(d.changed) == 4950


def test_registry_loading_of_a_real_revision_pair(repo: Path) -> None:
    commit(repo, cert_yaml("a"), "base")
    commit(repo, cert_yaml("a", "    ttl: 10d\n"), "ttl")
    _top, rel = review.repo_location(repo / "inv")
    assert rel == "inv"
    r = review.review_revisions(repo / "inv", "HEAD~1", "HEAD", default_registry(repo / "inv"))
    assert r.diff is not None
    assert r.diff.changed[0].changes == (review.FieldChange("ttl", "30d", "10d"),)

"""Playbooks for real: the bundled ones and custom ones, run through the CLI against
the real local CA, real file targets, a real HTTP receiver for notifications, and
both state backends (SQLite; PostgreSQL for the CA-compromise playbook)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from certctl.cli import cli
from certctl.engine import Engine
from certctl.playbook import runner, spec
from certctl.state import open_store

INV = """
issuers:
  ca: {{type: local_ca, root: {{common_name: Playbook Root}}}}
  ca2: {{type: local_ca, root: {{common_name: Playbook Root Two}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 90d}}
  internal: {{ekus: [serverAuth, clientAuth], max_ttl: 90d}}
defaults:
  issuer: {issuer}
  profile: tls
  ttl: 30d
  key: {{type: ecdsa, curve: P-256, rotation: {rotation}}}
targets:
  files:
    type: file
    root: out
    fullchain_path: "{{{{ cert.name }}}}/fullchain.pem"
    key_path: "{{{{ cert.name }}}}/key.pem"
teams:
  sre: {{email: sre@example.test}}
owners:
  web: {{email: web@example.test, team: sre}}
{extra}
certificates:
{certs}
"""


class Fleet:
    """An inventory directory with ``n`` certificates c1..cn on one file target."""

    def __init__(self, root: Path, state: str | None, certs: dict[str, str]) -> None:
        self.dir = root / "inv"
        self.dir.mkdir(exist_ok=True)
        self.state = state
        self.certs = certs
        self.write()

    def write(self, issuer: str = "ca", rotation: str = "always", extra: str = "") -> None:
        body = "".join(f"  {k}: {{{v}}}\n" for k, v in self.certs.items())
        text = INV.format(issuer=issuer, rotation=rotation, certs=body, extra=extra)
        (self.dir / "inventory.yaml").write_text(text, encoding="utf-8")

    def cli(self, *args: str, input: str | None = None) -> Result:
        base = ["-i", str(self.dir)]
        if self.state:
            base += ["--state", self.state]
        return CliRunner().invoke(cli, [*base, *args], input=input, catch_exceptions=False)

    def engine(self) -> Engine:
        return Engine(inventory_path=self.dir, state_url=self.state)

    def store(self) -> Any:
        return open_store(self.state, inventory_root=self.dir)

    def pem(self, name: str) -> bytes:
        return (self.dir / "out" / name / "fullchain.pem").read_bytes()

    def key(self, name: str) -> bytes:
        return (self.dir / "out" / name / "key.pem").read_bytes()

    def leaf(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.pem(name))

    def files_digest(self) -> dict[str, tuple[str, int]]:
        out = {}
        for p in sorted((self.dir / "out").rglob("*")):
            if p.is_file():
                out[str(p)] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        return out


def fleet(tmp_path: Path, state: str | None = None, n: int = 6, **extra: str) -> Fleet:
    certs = {f"c{i}": f"common_name: c{i}.pb.test, targets: [files]" for i in range(1, n + 1)}
    certs.update(extra)
    f = Fleet(tmp_path, state, certs)
    r = f.cli("apply", "--auto-approve")
    assert r.exit_code == 0, r.output
    return f


def block(f: Fleet, name: str) -> None:
    """A real deploy failure: a non-empty directory where the certificate file goes."""
    path = f.dir / "out" / name / "fullchain.pem"
    path.unlink()
    (path / "in-the-way").mkdir(parents=True)


def unblock(f: Fleet, name: str) -> None:
    path = f.dir / "out" / name / "fullchain.pem"
    (path / "in-the-way").rmdir()
    path.rmdir()


def current(store: Any) -> dict[str, Any]:
    return {n: rec.current for n, rec in store.snapshot().certs.items()}


def playbook_runs(store: Any) -> list[Any]:
    return [r for r in store.runs(limit=100) if r.kind == "playbook"]


def events(store: Any, prefix: str = "playbook.") -> list[dict[str, Any]]:
    """Oldest first."""
    found = [e for e in store.audit_log(limit=10_000) if e["event"].startswith(prefix)]
    return found[::-1]


# ---------------------------------------------------------------- bundled ones


def test_renew_expiring_renews_only_what_expires_and_records_the_run(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=4, s1="common_name: s1.pb.test, targets: [files], ttl: 5d")
    f.certs["s2"] = "common_name: s2.pb.test, targets: [files], ttl: 5d"
    f.write()
    assert f.cli("apply", "--auto-approve").exit_code == 0
    store = f.store()
    before = current(store)
    r = f.cli("run", "renew-expiring", "-e", "days=7")
    assert r.exit_code == 0, r.output
    after = current(store)
    assert {n for n in after if after[n].version != before[n].version} == {"s1", "s2"}
    for n in ("s1", "s2"):  # the new version is what the target holds
        assert f.leaf(n).fingerprint(hashes.SHA256()).hex() == after[n].fingerprint
    assert "batch 2/2: 1 ok, 0 failed" in r.output  # 20% of 2 -> batches of 1
    [run] = playbook_runs(store)
    assert run.status == "ok"
    start = next(e for e in events(store) if e["event"] == "playbook.start")
    detail = start["detail"]
    assert detail["playbook"] == "renew-expiring" and detail["vars"] == {"days": 7}
    assert len(detail["sha256"]) == 64 and detail["user"]
    batches = [e for e in events(store) if e["event"] == "playbook.batch"]
    assert [b["detail"]["certificates"] for b in batches] == [["s1"], ["s2"]]
    assert all(b["run_id"] == run.id and b["detail"]["apply_runs"] for b in batches)
    store.close()


def test_check_shows_every_plan_and_changes_nothing(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    snap, audit, runs = store.snapshot(), len(store.audit_log(limit=10_000)), store.runs(100)
    files = f.files_digest()
    f.write(issuer="ca2")  # move-issuer has something to do
    for args in (
        ("renew-expiring", "-e", "days=365"),
        ("ca-compromise", "-e", "issuer=ca"),
        ("rotate-profile-keys", "-e", "profile=tls"),
        ("move-issuer",),
        ("verify-endpoints",),
    ):
        r = f.cli("run", *args, "--check")
        assert r.exit_code == 0, r.output
        assert "nothing will be changed" in r.output
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--check")
    assert "- revoke c1  (revoked by a playbook (cACompromise))" in r.output
    assert "-/+ renew c1  (current certificate" in r.output
    assert "would pause: Revoke and replace every certificate issued by ca?" in r.output
    r = f.cli("run", "move-issuer", "--check")
    assert "BATCH 1/3: c1\n" in r.output and "BATCH 3/3: c3\n" in r.output
    assert "issuer changed: ca -> ca2" in r.output
    after = store.snapshot()
    assert after.generation == snap.generation and after.certs == snap.certs
    assert len(store.audit_log(limit=10_000)) == audit and store.runs(100) == runs
    assert f.files_digest() == files
    store.close()


def test_health_gate_stops_the_rollout_and_a_rerun_converges(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=6)
    store = f.store()
    before = current(store)
    untouched = {n: (f.pem(n), f.key(n)) for n in ("c5", "c6")}
    book = tmp_path / "renew-all.yaml"
    book.write_text(
        "name: renew-all\n"
        "steps:\n"
        "  - name: renew everything, two at a time\n"
        "    action: renew\n"
        "    select: {name: 'c*'}\n"
        "    serial: 2\n"
        "  - name: never reached\n"
        "    action: redeploy\n"
        "    select: {name: '*'}\n",
        encoding="utf-8",
    )
    lines: list[str] = []

    def echo(line: str) -> None:
        lines.append(line)
        if line.startswith("  BATCH 2/"):
            # The hosts of the second batch break during the rollout: a non-empty
            # directory now stands where c3's and c4's certificate files go.
            block(f, "c3")
            block(f, "c4")

    eng = f.engine()
    pb = spec.load(str(book))
    result = runner.PlaybookRunner(eng, pb, echo=echo).run()
    eng.close()
    out = "\n".join(lines)
    assert not result.ok
    assert result.stopped is not None and "batch 2/3: 2 of 2" in result.stopped
    assert "FAILED c3: deploy -> files" in out and "FAILED c4: deploy -> files" in out
    assert "BATCH 3/3" not in out and "STEP 2/2" not in out
    after = current(store)
    assert after["c1"].version == before["c1"].version + 1
    assert after["c2"].version == before["c2"].version + 1
    for n in ("c5", "c6"):  # the later batch was not touched: state and files
        assert after[n] == before[n]
        assert (f.pem(n), f.key(n)) == untouched[n]
    [run] = playbook_runs(store)
    assert run.status == "failed" and "max_fail_percentage" in run.summary["stopped"]
    [stop] = [e for e in events(store) if e["event"] == "playbook.stop"]
    assert stop["detail"]["batch"] == 2 and stop["detail"]["failed"] == ["c3", "c4"]
    # Fix the targets: a plain apply finishes what was left (nothing was lost).
    for n in ("c3", "c4"):
        unblock(f, n)
    r = f.cli("apply", "--auto-approve")
    assert r.exit_code == 0 and "2 deployed" in r.output, r.output
    assert "No changes" in f.cli("plan").output
    store.close()


def test_verify_gate_with_a_tolerated_failure(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=4)
    with socket.socket() as s:  # a port nothing listens on: the endpoint is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    f.write(extra=f"endpoints:\n  c2-live: {{endpoint: '127.0.0.1:{port}', certificate: c2}}\n")
    book = tmp_path / "b.yaml"
    book.write_text(
        "name: tolerant\nsteps:\n"
        "  - {name: renew, action: renew, select: {name: '*'}, serial: 4, verify: true,\n"
        "     max_fail_percentage: '{{ tolerate }}'}\n",
        encoding="utf-8",
    )
    # 1 of 4 failed = 25%, not above the gate: the run goes on but reports the failure.
    r = f.cli("run", str(book), "-e", "tolerate=25")
    assert "STOPPED" not in r.output, r.output
    assert "FAILED c2: verify: 127.0.0.1:" in r.output and "unreachable" in r.output
    assert r.exit_code == 1
    r = f.cli("run", str(book), "-e", "tolerate=20")
    assert "STOPPED: step 1 (renew) batch 1/1: 1 of 4" in r.output and r.exit_code == 1


def test_ca_compromise_revokes_and_replaces_from_the_new_issuer(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    store = f.store()
    before = current(store)
    f.write(issuer="ca2")  # the operator points the fleet at a trustworthy CA first
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca")
    assert r.exit_code == 1 and "pass --yes" in r.output  # no terminal, no --yes
    assert current(store) == before and not playbook_runs(store)
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes")
    assert r.exit_code == 0, r.output
    after = current(store)
    for n in ("c1", "c2", "c3"):
        assert after[n].issuer == "ca2" and after[n].status == "active"
        old = store.versions(n)[1]
        assert old.serial == before[n].serial
        assert old.status == "revoked" and old.revocation_reason == "cACompromise"
        issuer_cn = f.leaf(n).issuer.rfc4514_string()
        assert issuer_cn == "CN=Playbook Root Two"
    assert [e["detail"]["continue"] for e in events(store) if e["event"] == "playbook.pause"] == [
        True
    ]
    # The compromised CA's CRL lists every old serial with reason cACompromise.
    crl_file = tmp_path / "ca.crl"
    assert f.cli("crl", "ca", "--out", str(crl_file)).exit_code == 0
    crl = x509.load_der_x509_crl(crl_file.read_bytes())
    for n in ("c1", "c2", "c3"):
        entry = crl.get_revoked_certificate_by_serial_number(int(before[n].serial, 16))
        assert entry is not None
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        assert reason is x509.ReasonFlags.ca_compromise
    # Nothing is left selected: a second run has nothing to do.
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes")
    assert r.exit_code == 0 and "0 certificate(s) selected" in r.output
    store.close()


@pytest.mark.postgres
def test_ca_compromise_on_postgres(tmp_path: Path, make_pg_db: Callable[[], str]) -> None:
    f = fleet(tmp_path, make_pg_db(), n=3)
    store = f.store()
    f.write(issuer="ca2")
    r = f.cli("run", "ca-compromise", "-e", "issuer=ca", "--yes", "--limit", "c1,c2")
    assert r.exit_code == 0, r.output
    after = current(store)
    assert after["c1"].issuer == after["c2"].issuer == "ca2"
    assert after["c3"].issuer == "ca" and after["c3"].status == "active"  # --limit
    assert store.versions("c1")[1].revocation_reason == "cACompromise"
    [run] = playbook_runs(store)
    assert run.status == "ok" and run.summary["changed"] == 2
    store.close()


def test_rotate_profile_keys_forces_fresh_keys_even_with_rotation_never(tmp_path: Path) -> None:
    f = Fleet(
        tmp_path,
        None,
        {
            "a": "common_name: a.pb.test, targets: [files]",
            "b": "common_name: b.pb.test, targets: [files]",
            "other": "common_name: o.pb.test, targets: [files], profile: internal",
        },
    )
    f.write(rotation="never")
    assert f.cli("apply", "--auto-approve").exit_code == 0
    keys = {n: f.key(n) for n in ("a", "b", "other")}
    # A plain forced renewal keeps the key (rotation: never) ...
    assert f.cli("renew", "a", "--force").exit_code == 0
    assert f.key("a") == keys["a"]
    # ... the rotation playbook does not.
    r = f.cli("run", "rotate-profile-keys", "-e", "profile=tls")
    assert r.exit_code == 0, r.output
    assert f.key("a") != keys["a"] and f.key("b") != keys["b"]
    assert f.key("other") == keys["other"]
    store = f.store()
    assert store.versions("other")[0].version == 1
    store.close()


def test_move_issuer_rolls_out_canary_first(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=5)
    store = f.store()
    f.certs["c5"] += ", issuer: ca"  # stays on ca: not selected
    f.write(issuer="ca2")
    r = f.cli("run", "move-issuer")
    assert r.exit_code == 0, r.output
    batches = [e["detail"]["certificates"] for e in events(store) if e["event"] == "playbook.batch"]
    assert batches == [["c1"], ["c2"], ["c3", "c4"]]  # 1, then 10% (min 1), then the rest
    after = current(store)
    assert {n for n, v in after.items() if v.issuer == "ca2"} == {"c1", "c2", "c3", "c4"}
    assert "No changes" in f.cli("plan").output
    store.close()


def test_verify_endpoints_reports_tampered_files(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=3)
    r = f.cli("run", "verify-endpoints")
    assert r.exit_code == 0, r.output
    (f.dir / "out" / "c2" / "fullchain.pem").write_text("tampered\n", encoding="utf-8")
    r = f.cli("run", "verify-endpoints")
    assert r.exit_code == 1
    assert "FAILED c2: verify: files" in r.output and "FAILED c1" not in r.output
    r = f.cli("run", "verify-endpoints", "--limit", "!c2")
    assert r.exit_code == 0, r.output


# ----------------------------------------------------- custom: notify, redeploy


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    got: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            got.append(json.loads(body))
            code = 500 if self.path == "/down" else 200
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", got
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_notify_and_redeploy(tmp_path: Path, receiver: tuple[str, list[dict[str, Any]]]) -> None:
    url, got = receiver
    f = fleet(tmp_path, n=3)
    f.write(
        extra=f"notifiers:\n  hook: {{type: webhook, url: '{url}/hook'}}\n"
        f"  down: {{type: webhook, url: '{url}/down'}}\n"
    )
    lost = f.dir / "out" / "c2" / "fullchain.pem"
    good = lost.read_bytes()
    lost.unlink()
    book = tmp_path / "redeploy.yaml"
    book.write_text(
        "name: redeploy-web\n"
        "vars: {who: sre}\n"
        "steps:\n"
        "  - name: announce\n"
        "    action: notify\n"
        "    notifier: hook\n"
        "    message: 'redeploying for {{ who }}'\n"
        "  - name: redeploy\n"
        "    action: redeploy\n"
        "    select: {name: [c1, c2]}\n"
        "    verify: true\n",
        encoding="utf-8",
    )
    store = f.store()
    before = current(store)
    r = f.cli("run", str(book), "-e", "who=oncall")
    assert r.exit_code == 0, r.output
    assert lost.read_bytes() == good  # redeployed the current version, not reissued
    assert current(store) == before
    assert [g["text"] for g in got] == ["redeploying for oncall"]
    assert got[0]["event"] == "playbook" and got[0]["playbook"] == "redeploy-web"
    # A notifier that fails stops the run before the next step.
    book.write_text(book.read_text().replace("notifier: hook", "notifier: down"), "utf-8")
    lost.unlink()
    r = f.cli("run", str(book))
    assert r.exit_code == 1 and "notifier down failed" in r.output
    assert not lost.exists()
    store.close()


def test_secret_vars_are_redacted_in_the_audit(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=1)
    book = tmp_path / "v.yaml"
    book.write_text(
        "name: v\nvars: {api_token: x}\nsteps:\n"
        "  - {name: check, action: verify, select: {name: '*'}}\n",
        encoding="utf-8",
    )
    r = f.cli("run", str(book), "-e", "api_token=s3cr3t-value")
    assert r.exit_code == 0, r.output
    store = f.store()
    text = json.dumps(store.audit_log(limit=1000), default=str) + json.dumps(
        [r.summary for r in store.runs(100)]
    )
    assert "s3cr3t-value" not in text and "s3cr3t-value" not in r.output
    start = next(e for e in events(store) if e["event"] == "playbook.start")
    assert start["detail"]["vars"] == {"api_token": "<redacted>"}
    store.close()


def test_git_revision_is_recorded(tmp_path: Path) -> None:
    import subprocess

    f = fleet(tmp_path, n=1)
    repo = tmp_path / "ops"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    book = repo / "v.yaml"
    book.write_text(
        "name: v\nsteps:\n  - {name: check, action: verify, select: {name: '*'}}\n",
        encoding="utf-8",
    )
    for cmd in (["init", "-q"], ["add", "v.yaml"], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert f.cli("run", str(book)).exit_code == 0
    book.write_text(book.read_text() + "# edited\n", encoding="utf-8")
    r = f.cli("run", str(book))
    assert f"git {head[:12]} (modified)" in r.output
    store = f.store()
    starts = [e["detail"]["git"] for e in events(store) if e["event"] == "playbook.start"]
    assert sorted(starts, key=lambda g: g["dirty"]) == [
        {"commit": head, "dirty": False},
        {"commit": head, "dirty": True},
    ]
    store.close()


def test_a_run_honours_the_apply_lock(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=1)
    other = f.store()
    other.acquire_apply_lock("someone else's apply")
    try:
        r = f.cli("run", "renew-expiring", "-e", "days=365")
        assert r.exit_code == 1 and "locked by another apply: someone else's apply" in r.output
        assert not playbook_runs(other)
    finally:
        other.release_apply_lock()
    r = f.cli("run", "renew-expiring", "-e", "days=365", "--check")
    assert r.exit_code == 0  # --check takes no lock
    other.close()


def test_a_declined_pause_stops_before_anything_changes(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=2)
    store = f.store()
    before = current(store)
    eng = f.engine()
    asked: list[str] = []

    def no(prompt: str) -> bool:
        asked.append(prompt)
        return False

    pb = spec.load("ca-compromise", {"issuer": "ca"})
    result = runner.PlaybookRunner(eng, pb, interactive=True, confirm=no, echo=lambda _: None).run()
    eng.close()
    assert asked == ["Revoke and replace every certificate issued by ca?"]
    assert not result.ok and result.stopped is not None and "declined" in result.stopped
    assert current(store) == before
    [pause] = [e for e in events(store) if e["event"] == "playbook.pause"]
    assert pause["detail"]["continue"] is False
    store.close()


def test_no_private_key_reaches_the_output_or_the_audit(tmp_path: Path) -> None:
    f = fleet(tmp_path, n=2)
    out = ""
    for args in (
        ("rotate-profile-keys", "-e", "profile=tls"),
        ("ca-compromise", "-e", "issuer=ca", "--yes"),
        ("renew-expiring", "-e", "days=365", "--check"),
    ):
        r = f.cli("run", *args)
        assert r.exit_code == 0, r.output
        out += r.output
    store = f.store()
    audit = json.dumps(store.audit_log(limit=10_000), default=str)
    for text in (out, audit):
        assert "PRIVATE KEY" not in text
        for n in ("c1", "c2"):
            body = b"".join(f.key(n).splitlines()[1:-1]).decode()
            assert body[:40] not in text
    store.close()

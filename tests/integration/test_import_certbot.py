"""`certctl import certbot` against a real certbot directory: Debian's certbot obtains
an ECDSA lineage (with a deploy hook) and an RSA lineage (reuse_key) from a local
Pebble; the import must make the next plan "no changes" without touching a byte of
the live files, and the renewal window must renew through the emitted ACME issuer.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from certctl import pki
from certctl.cli import cli
from certctl.engine import Engine
from certctl.model import ActionKind
from tests.integration.acme_support import Pebble, start_pebble

CERTBOT = "/usr/bin/certbot"


@dataclass
class Certbot:
    pebble: Pebble
    config: Path  # the pristine certbot --config-dir (tests work on copies)
    hook_log: Path


def _certbot(peb: Pebble, base: Path, *args: str) -> None:
    """certbot certonly, once. No retry: the fixture removes both causes of the flake
    it once had (see ``certbot`` below); a failure shows certbot's own log."""
    env = {**os.environ, "REQUESTS_CA_BUNDLE": peb.ca_bundle}
    proc = subprocess.run(
        [
            CERTBOT,
            "certonly",
            "--standalone",
            "--http-01-port",
            str(peb.http_port),
            "--server",
            peb.directory,
            "--agree-tos",
            "--register-unsafely-without-email",
            "--non-interactive",
            "--config-dir",
            str(base / "config"),
            "--work-dir",
            str(base / "work"),
            "--logs-dir",
            str(base / "logs"),
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        log = base / "logs" / "letsencrypt.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log)"
        pytest.fail(
            f"certbot {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n"
            f"--- {log} (tail) ---\n{text[-6000:]}\n"
            f"--- pebble log (tail) ---\n{peb.log()[-3000:]}"
        )


def _unshared_port() -> int:
    """A free TCP port BELOW the kernel's ephemeral range, for certbot's standalone
    server. A port from ``bind(0)`` lies inside that range, where any process's
    outgoing connection may take it as its source port before certbot binds it
    (certbot binds every address, so even a 127.0.0.1 client socket blocks it)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, max(low, 10001))
        if all(_bindable(family, port) for family in (socket.AF_INET, socket.AF_INET6)):
            return port
    raise RuntimeError("no free port below the ephemeral range")


def _bindable(family: socket.AddressFamily, port: int) -> bool:
    """Whether ``port`` is free on every address of ``family`` (a host without IPv6
    counts as free there: certbot then binds IPv4 only)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    except OSError as exc:
        return exc.errno != errno.EADDRINUSE
    return True


@pytest.fixture(scope="module")
def certbot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Certbot]:
    if not os.access(CERTBOT, os.X_OK):
        pytest.fail("certbot missing: run scripts/test-deps.sh (Debian 'certbot')")
    base = tmp_path_factory.mktemp("certbot")
    hook_log = base / "hook.log"
    # Deterministic Pebble for certbot: Pebble refuses 5% of nonces by default, and
    # certbot (python3-acme 2.1) retries a badNonce only once; a second refusal of
    # the same request (~0.25% of its ~18 requests) failed the whole fixture, hidden
    # behind josepy's "AttributeError: can't set attribute". certctl's own client is
    # tested against nonce refusals elsewhere; here certbot only makes the directory.
    peb = start_pebble(nonce_reject=0, http_port=_unshared_port())
    try:
        _certbot(
            peb,
            base,
            "-d",
            "a.example",
            "-d",
            "www.a.example",
            "--key-type",
            "ecdsa",
            "--deploy-hook",
            f'echo "$RENEWED_LINEAGE $RENEWED_DOMAINS" >> {hook_log}',
        )
        _certbot(
            peb,
            base,
            "-d",
            "b.example",
            "--key-type",
            "rsa",
            "--rsa-key-size",
            "2048",
            "--reuse-key",
        )
        yield Certbot(peb, base / "config", hook_log)
    finally:
        peb.stop()


@dataclass
class World:
    cb: Certbot
    config: Path  # this test's copy of the certbot directory
    inv: Path

    def run(self, *args: str) -> tuple[int, str]:
        res = CliRunner().invoke(cli, ["-i", str(self.inv), *args], catch_exceptions=False)
        return res.exit_code, res.output

    def import_(self, *extra: str) -> tuple[int, str]:
        return self.run(
            "import", "certbot", str(self.config), "--ca-bundle", self.cb.pebble.ca_bundle, *extra
        )

    def live(self, lineage: str) -> Path:
        return self.config / "live" / lineage


@pytest.fixture
def world(certbot: Certbot, tmp_path: Path) -> World:
    config = tmp_path / "letsencrypt"
    shutil.copytree(certbot.config, config, symlinks=True)
    return World(certbot, config, tmp_path / "inventory")


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _live_files(w: World) -> list[Path]:
    return sorted(w.live("a.example").glob("*.pem")) + sorted(w.live("b.example").glob("*.pem"))


def test_import_then_plan_says_no_changes_and_files_are_untouched(world: World) -> None:
    w = world
    before = _digest(_live_files(w))
    code, out = w.import_()
    assert code == 0, out
    assert "adopted a.example" in out and "adopted b.example" in out

    # the YAML: a new file, schema field names, a comment on each entry
    (written,) = sorted(w.inv.glob("adopted-*.yaml"))
    text = written.read_text()
    assert "# from certbot a.example (renewal/a.example.conf" in text
    doc = yaml.safe_load(text)
    a, b = doc["certificates"]["a.example"], doc["certificates"]["b.example"]
    assert a["common_name"] == "a.example" and a["sans"] == ["www.a.example"]
    assert a["key"] == {"type": "ecdsa", "curve": "P-256"}
    assert b["key"] == {"type": "rsa", "size": 2048, "rotation": "never"}  # --reuse-key
    assert a["issuer"] == b["issuer"]
    issuer = doc["issuers"][a["issuer"]]
    assert issuer["directory"] == w.cb.pebble.directory
    assert issuer["challenge"] == {
        "type": "http-01",
        "responder": {"listen": f"0.0.0.0:{w.cb.pebble.http_port}"},
    }
    ta = doc["targets"][a["targets"][0]]
    assert ta["type"] == "command" and ta["root"] == str(w.live("a.example"))
    assert ta["reload"][-1].startswith('echo "$RENEWED_LINEAGE')
    assert doc["targets"][b["targets"][0]]["type"] == "file"

    # the next plan: no changes (exit 0 with --detailed-exitcode)
    code, out = w.run("plan", "--detailed-exitcode")
    assert code == 0, out
    assert "No changes" in out

    # same bytes where services read; now regular files; certbot no longer renews them
    assert _digest(_live_files(w)) == before
    for p in _live_files(w):
        assert not p.is_symlink()
    assert (w.live("a.example") / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert not (w.config / "renewal" / "a.example.conf").exists()
    assert (w.config / "renewal" / "a.example.conf.certctl-imported").exists()

    # the state holds the key (encrypted) and the exact certificate
    eng = Engine(w.inv)
    try:
        snap = eng.store().snapshot()
        cur = snap.certs["a.example"].current
        assert cur is not None and cur.key_custody == "controller"
        cert_pem, chain_pem, key = eng.store().material("a.example", cur.version)
        assert cert_pem == (w.live("a.example") / "cert.pem").read_bytes()
        assert cert_pem + chain_pem == (w.live("a.example") / "fullchain.pem").read_bytes()
        assert key is not None
        assert key.reveal() == (w.live("a.example") / "privkey.pem").read_bytes()
        assert [e["event"] for e in eng.store().audit_log(cert="a.example")] == ["adopt"]
    finally:
        eng.close()

    # a second import of the same directory adopts nothing twice
    code, out = w.import_()
    assert code == 1 and "Nothing to adopt" in out, out


def test_renewal_window_renews_through_the_emitted_issuer(world: World) -> None:
    w = world
    assert w.import_()[0] == 0
    old = pki.load_cert_pem((w.live("a.example") / "cert.pem").read_bytes())
    old_key_b = (w.live("b.example") / "privkey.pem").read_bytes()
    w.cb.hook_log.unlink(missing_ok=True)
    later = old.not_valid_after_utc - timedelta(days=20)
    eng = Engine(w.inv, clock=lambda: later)
    try:
        plan, _ = eng.plan()
        renews = {a.cert: a for a in plan.actions if a.kind is ActionKind.RENEW}
        assert set(renews) == {"a.example", "b.example"}
        assert (
            renews["a.example"].details["issuer"]
            == eng.inventory().certificates["a.example"].issuer
        )
        assert renews["a.example"].reasons[0].code == "renewal_window"
        _, report = eng.apply()
        assert report is not None and not report.failed, [r.error for r in report.failed]
    finally:
        eng.close()
    new = pki.load_cert_pem((w.live("a.example") / "cert.pem").read_bytes())
    assert new.serial_number != old.serial_number
    assert sorted(pki.sans(new)) == ["a.example", "www.a.example"]
    # deployed where services read, with the hook run as certbot ran it
    assert (
        (w.live("a.example") / "fullchain.pem")
        .read_bytes()
        .startswith((w.live("a.example") / "cert.pem").read_bytes())
    )
    assert w.cb.hook_log.read_text().split("\n")[0] == (
        f"{w.live('a.example')} a.example www.a.example"
    )
    # reuse_key = True: the RSA lineage kept its key
    assert (w.live("b.example") / "privkey.pem").read_bytes() == old_key_b
    # and a plan today is quiet again (Pebble's new certificate is as long-lived)
    eng = Engine(w.inv)
    try:
        assert not eng.plan()[0].actions
    finally:
        eng.close()


def test_dry_run_changes_nothing(world: World) -> None:
    w = world
    before = _digest(_live_files(w))
    code, out = w.import_("--dry-run")
    assert code == 0, out
    assert "certificates:" in out and "a.example:" in out
    assert "PRIVATE KEY" not in out
    assert not w.inv.exists() or not list(w.inv.glob("*.yaml"))
    assert (w.live("a.example") / "cert.pem").is_symlink()
    assert _digest(_live_files(w)) == before


def _conf(w: World, lineage: str) -> Path:
    return w.config / "renewal" / f"{lineage}.conf"


def _assert_b_refused_a_imported(w: World, code: int, out: str, *needles: str) -> None:
    assert code == 1, out
    assert "adopted a.example" in out
    assert "adopted b.example" not in out
    for n in needles:
        assert n in out, out
    assert "BEGIN" not in out  # no key material in messages
    assert w.run("plan", "--detailed-exitcode")[0] == 0


def test_conf_pointing_outside_the_directory_refuses_that_lineage(world: World) -> None:
    w = world
    conf = _conf(w, "b.example")
    conf.write_text(
        conf.read_text().replace(str(w.cb.config / "live/b.example/privkey.pem"), "/etc/shadow")
    )
    line = next(i for i, ln in enumerate(conf.read_text().splitlines(), 1) if "privkey" in ln)
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, f"b.example.conf:{line}:", "/etc/shadow")
    assert conf.exists()  # a refused lineage stays certbot's


def test_symlink_leaving_the_archive_is_refused(world: World, tmp_path: Path) -> None:
    w = world
    secret = tmp_path / "elsewhere.pem"
    secret.write_text("not for certctl")
    link = w.live("b.example") / "privkey.pem"
    link.unlink()
    link.symlink_to(secret)
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "outside", "refusing to read it")


def test_missing_and_mismatched_keys_are_refused(world: World) -> None:
    w = world
    (w.live("b.example") / "privkey.pem").unlink()
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "privkey.pem is missing")


def test_key_of_another_certificate_is_refused(world: World) -> None:
    w = world
    a_key = os.readlink(w.live("a.example") / "privkey.pem")
    link = w.live("b.example") / "privkey.pem"
    link.unlink()
    # a real key, but a.example's (inside b's archive, so only the match check stops it)
    archived = w.config / "archive" / "b.example" / "privkey9.pem"
    shutil.copy(w.live("a.example") / a_key, archived)
    link.symlink_to("../../archive/b.example/privkey9.pem")
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "is not the private key of the certificate")


def test_malformed_and_non_utf8_configurations_name_file_and_line(world: World) -> None:
    w = world
    conf = _conf(w, "b.example")
    lines = conf.read_bytes().split(b"\n")
    lines.insert(3, b"this line has no equals sign")
    conf.write_bytes(b"\n".join(lines))
    code, out = w.import_("--dry-run")
    assert code == 1 and "b.example.conf:4: expected 'key = value'" in out, out
    lines[3] = b"note = caf\xe9"
    conf.write_bytes(b"\n".join(lines))
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "b.example.conf:4: not UTF-8")


def test_invalid_inventory_changes_nothing(world: World) -> None:
    w = world
    w.inv.mkdir()
    (w.inv / "policy.yaml").write_text("policies:\n  names: {san_allow: ['*.internal']}\n")
    before = _digest(_live_files(w))
    code, out = w.import_()
    assert code == 1 and "nothing was adopted" in out, out
    assert "san" in out.lower()
    assert sorted(p.name for p in w.inv.glob("*.yaml")) == ["policy.yaml"]
    for p in _live_files(w):
        assert p.is_symlink()
    assert _digest(_live_files(w)) == before
    assert _conf(w, "a.example").exists() and _conf(w, "b.example").exists()
    eng = Engine(w.inv)
    try:
        assert eng.store().snapshot().certs == {}
    finally:
        eng.close()


def test_name_collisions_are_refused_unless_prefixed(world: World) -> None:
    w = world
    w.inv.mkdir()
    (w.inv / "mine.yaml").write_text(
        "issuers:\n  ca: {type: local_ca, root: {common_name: Mine}}\n"
        "certificates:\n  a.example: {common_name: a.example, issuer: ca}\n"
    )
    code, out = w.import_("--lineage", "a.example")
    assert code == 1 and "'a.example' (certbot a.example" in out and "--prefix" in out, out
    assert sorted(p.name for p in w.inv.glob("*.yaml")) == ["mine.yaml"]
    code, out = w.import_("--lineage", "a.example", "--prefix", "cb-")
    assert code == 0, out
    assert "adopted cb-a.example" in out
    # the out file is never overwritten
    target = w.inv / "again.yaml"
    target.write_text("{}\n")
    code, out = w.import_("--lineage", "b.example", "--out", str(target))
    assert code == 1 and "already exists" in out
    assert target.read_text() == "{}\n"


@pytest.mark.parametrize("point", ["adopt_after_takeover", "adopt_after_yaml", "adopt_after_seed"])
def test_killed_import_is_finished_by_the_rerun(world: World, point: str) -> None:
    w = world
    before = _digest(_live_files(w))
    proc = subprocess.run(
        [sys.executable, "-m", "certctl", "-i", str(w.inv), "import", "certbot", str(w.config)],
        env={**os.environ, "CERTCTL_FAILPOINTS": point},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    code, out = w.import_()
    assert code == 0, out
    assert w.run("plan", "--detailed-exitcode")[0] == 0
    assert len(list(w.inv.glob("adopted-*.yaml"))) == 1  # nothing emitted twice
    assert _digest(_live_files(w)) == before
    assert sorted(p.name for p in (w.config / "renewal").iterdir()) == [
        "a.example.conf.certctl-imported",
        "b.example.conf.certctl-imported",
    ]
    eng = Engine(w.inv)
    try:
        certs = eng.store().snapshot().certs
        assert {n: c.current.version for n, c in certs.items() if c.current} == {
            "a.example": 1,
            "b.example": 1,
        }
    finally:
        eng.close()


@pytest.mark.postgres
def test_import_on_postgresql(world: World, make_pg_db: Callable[[], str]) -> None:
    w = world
    url = make_pg_db()
    res = CliRunner().invoke(
        cli,
        ["-i", str(w.inv), "--state", url, "import", "certbot", str(w.config)],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["-i", str(w.inv), "--state", url, "plan", "--detailed-exitcode"])
    assert res.exit_code == 0, res.output


def test_adopted_finding_matches_the_imported_acme_issuer(world: World) -> None:
    """A certificate Pebble issued, found on disk, is tied to the ACME issuer the
    certbot import emitted: its CA is in the chain certctl recorded for that issuer."""
    from datetime import UTC, datetime

    from certctl.discovery import files as disc

    w = world
    assert w.import_("--lineage", "a.example")[0] == 0
    archive = w.config / "archive" / "b.example"
    found = disc.scan_local([str(archive)], disc.Options(), datetime.now(UTC))
    eng = Engine(w.inv)
    try:
        eng.store().record_findings(found.findings)
        issuer_a = eng.inventory().certificates["a.example"].issuer
    finally:
        eng.close()
    code, out = w.run("adopt", "--all", "--out", str(w.inv / "found.yaml"))
    assert code == 0, out
    doc = yaml.safe_load((w.inv / "found.yaml").read_text())
    (entry,) = doc["certificates"].values()
    assert entry["issuer"] == issuer_a and "issuers" not in doc
    assert entry["key"] == {"type": "rsa", "size": 2048}
    roles = sorted(k for t in entry["targets"] for k in doc["targets"][t] if k.endswith("_path"))
    assert roles == ["cert_path", "fullchain_path", "key_path", "key_path"]
    assert w.run("plan", "--detailed-exitcode")[0] == 0


def test_hook_with_template_characters_is_taken_literally(world: World) -> None:
    w = world
    hook = 'x=(1 2); echo "{{ not.a.template }} ${#x[@]}" > /dev/null'
    conf = _conf(w, "b.example")
    # quoted, as certbot's configobj writes a value holding '#' or quotes
    conf.write_text(conf.read_text() + f"renew_hook = '{hook}'\n")
    code, out = w.import_("--lineage", "b.example")
    assert code == 0, out
    eng = Engine(w.inv)
    try:
        (placement,) = eng.inventory().certificates["b.example"].placements
        assert placement.config["reload"][-1] == hook
    finally:
        eng.close()
    assert w.run("plan", "--detailed-exitcode")[0] == 0


def test_every_hook_runs_even_after_a_shell_comment(world: World) -> None:
    """certbot runs each hook as its own shell command; a deploy hook ending in a
    comment must not swallow the post hook (they were joined with ' ; ')."""
    w = world
    log = w.config.parent / "hooks.log"
    conf = _conf(w, "b.example")
    conf.write_text(
        conf.read_text()
        # as certbot's configobj writes a value holding '#': quoted
        + f'renew_hook = "echo deploy >> {log}  # reload the web server"\n'
        + f"post_hook = echo post >> {log}\n"
    )
    code, out = w.import_("--lineage", "b.example")
    assert code == 0, out
    eng = Engine(w.inv)
    try:
        (placement,) = eng.inventory().certificates["b.example"].placements
        reload = list(placement.config["reload"])
    finally:
        eng.close()
    subprocess.run(reload, check=True, timeout=30)  # the emitted command, as the target runs it
    assert log.read_text().split() == ["deploy", "post"]


def test_apply_racing_an_import_stub_pause_is_locked_out(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between writing the YAML and seeding the state the inventory names the lineages
    but the state does not hold them: an apply (a daemon's, an operator's) that ran
    then would reissue every one. The import holds the apply lock from its first
    change to its last. (The stub is only the pause: a real `certctl apply` runs
    at the failpoint after the YAML is written.)"""
    from certctl.adopt import seed

    w = world
    before = _digest(_live_files(w))
    racers: list[subprocess.CompletedProcess[str]] = []
    certctl = [sys.executable, "-m", "certctl"]

    class ApplyAtFailpoint:
        def hit(self, name: str) -> None:
            if name == "adopt_after_yaml":
                racers.append(
                    subprocess.run(
                        [*certctl, "-i", str(w.inv), "apply", "--auto-approve"],
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                )

    monkeypatch.setattr(seed, "Failpoints", ApplyAtFailpoint)
    code, out = w.import_()
    assert code == 0, out
    (racer,) = racers
    assert racer.returncode != 0, racer.stdout
    assert "locked by another apply" in racer.stdout + racer.stderr
    assert _digest(_live_files(w)) == before
    assert w.run("plan", "--detailed-exitcode")[0] == 0
    eng = Engine(w.inv)
    try:
        versions = {
            n: c.current.version for n, c in eng.store().snapshot().certs.items() if c.current
        }
        assert versions == {"a.example": 1, "b.example": 1}
    finally:
        eng.close()


def test_configobj_quoting_and_comments_are_read_as_certbot_reads_them(world: World) -> None:
    """certbot writes renewal confs with configobj: a hook holding both quote kinds
    is triple-quoted, and configobj drops an inline comment after a value. The import
    must read the values certbot reads, not the raw text."""
    w = world
    log = w.config.parent / "quoted.log"
    hook = f"""echo "it's" > /dev/null; echo 'ok' >> {log}"""
    conf = _conf(w, "b.example")
    text = conf.read_text().replace(
        "[renewalparams]", "renew_before_expiry = 20 days  # hand-edited\n[renewalparams]"
    )
    conf.write_text(text + f"renew_hook = '''{hook}'''  # set by --deploy-hook\n")
    code, out = w.import_("--lineage", "b.example")
    assert code == 0, out
    eng = Engine(w.inv)
    try:
        cert = eng.inventory().certificates["b.example"]
        (placement,) = cert.placements
        reload = list(placement.config["reload"])
        assert cert.renew_before.seconds == 20 * 86400
    finally:
        eng.close()
    assert reload[-1] == hook
    subprocess.run(reload, check=True, timeout=30)
    assert log.read_text() == "ok\n"


def test_archive_directory_aliasing_another_lineage_is_refused(world: World) -> None:
    """live/b.example/* must resolve into b.example's own archive: an archive/b.example
    that is a symlink (to a.example's archive, or anywhere) is refused."""
    w = world
    archive_b = w.config / "archive" / "b.example"
    shutil.rmtree(archive_b)
    archive_b.symlink_to("a.example")
    for f in ("cert", "chain", "fullchain", "privkey"):
        link = w.live("b.example") / f"{f}.pem"
        link.unlink()
        link.symlink_to(f"../../archive/b.example/{f}1.pem")
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "archive/b.example", "symbolic link")


def test_live_directory_that_is_a_symlink_is_refused(world: World, tmp_path: Path) -> None:
    """The import writes regular files into live/NAME/ (the take-over); a live/NAME that
    is a symlink would have it write wherever that points."""
    w = world
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(w.live("b.example")), elsewhere)
    for link in elsewhere.glob("*.pem"):  # still resolving into b.example's archive
        target = os.readlink(link)
        link.unlink()
        link.symlink_to(w.config / "archive" / "b.example" / os.path.basename(target))
    w.live("b.example").symlink_to(elsewhere)
    before = {p.name: os.readlink(p) for p in elsewhere.glob("*.pem")}
    code, out = w.import_()
    _assert_b_refused_a_imported(w, code, out, "live/b.example is a symbolic link")
    assert {p.name: os.readlink(p) for p in elsewhere.glob("*.pem")} == before

"""The executor against the real local CA, real files and both real state stores.

The only stand-ins are the fault-injecting connector subclasses below (a CA that
fails on purpose, a target whose verification fails on purpose); they wrap the real
connectors and say so in their names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certctl.apply.executor import ApplySettings
from certctl.connectors import IssuedCert, IssueRequest, Registry, Staged
from certctl.engine import Engine
from certctl.errors import PermanentError, TransientError
from certctl.plan import reasons as R
from certctl_connectors.issuers.local_ca import LocalCAIssuer
from certctl_connectors.targets.file import FileTarget

INV = """
defaults: {{issuer: {issuer}, profile: tls, ttl: 30d, key: {{type: ecdsa, curve: P-256{rotation}}}}}
issuers:
  ca: {{type: local_ca, root: {{common_name: Test Root}}}}
  flaky: {{type: fault_flaky_ca, root: {{common_name: Flaky Root}}}}
  broken: {{type: fault_broken_ca, root: {{common_name: Broken Root}}}}
profiles:
  tls: {{ekus: [serverAuth], max_ttl: 90d}}
targets:
  files:
    type: file
    root: out
    cert_path: "{{{{ cert.name }}}}.pem"
    key_path: "{{{{ cert.name }}}}.key"
  picky: {{type: fault_picky_file, root: out2, cert_path: "{{{{ cert.name }}}}.pem"}}
certificates:
{certs}
"""


class FaultFlakyCA(LocalCAIssuer):
    """Fault injection: the real local CA, but the first two calls fail with 503/429."""

    type_name = "fault_flaky_ca"
    failures_left = 2

    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert:
        if FaultFlakyCA.failures_left > 0:
            FaultFlakyCA.failures_left -= 1
            raise TransientError("CA answered 503", retry_after=0.01)
        return await super().issue(req, payload)


class FaultBrokenCA(LocalCAIssuer):
    """Fault injection: a CA that refuses every request."""

    type_name = "fault_broken_ca"

    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert:
        raise PermanentError("CA refused the request: policy forbids it")


class FaultPickyFile(FileTarget):
    """Fault injection: the real file target whose verification fails for 'bad*' certs."""

    type_name = "fault_picky_file"

    async def verify(self, staged: Staged) -> None:
        if staged.material.cert.startswith("bad"):
            raise PermanentError("endpoint still serves the old certificate")
        await super().verify(staged)


def registry() -> Registry:
    reg = Registry().load_builtin()
    for cls in (FaultFlakyCA, FaultBrokenCA, FaultPickyFile):
        reg.add(cls, __name__)
    return reg


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    if request.param == "sqlite":
        return None
    make_pg_db: Callable[[], str] = request.getfixturevalue("make_pg_db")
    return make_pg_db()


def make(
    tmp_path: Path,
    state_url: str | None,
    certs: dict[str, str],
    *,
    issuer: str = "ca",
    rotation: str = "",
    clock: Clock | None = None,
) -> Engine:
    inv = tmp_path / "inv"
    inv.mkdir(exist_ok=True)
    body = "".join(f"  {k}: {{{v}}}\n" for k, v in certs.items())
    (inv / "inv.yaml").write_text(
        INV.format(issuer=issuer, rotation=rotation, certs=body), encoding="utf-8"
    )
    return Engine(
        inventory_path=inv, state_url=state_url, registry=registry(), clock=clock or Clock()
    )


def fast() -> ApplySettings:
    return ApplySettings(retry_base_s=0.0, max_retry_delay_s=0.05)


def test_apply_converges_with_group_commit(tmp_path: Path, state_url: str | None) -> None:
    certs = {f"c{i}": f"common_name: c{i}.test, targets: [files]" for i in range(30)}
    eng = make(tmp_path, state_url, certs)
    _, report = eng.apply(settings=ApplySettings(concurrency=10))
    assert report is not None and not report.failed
    assert report.done_counts()["issue"] == 30 and report.done_counts()["deploy"] == 30
    # 30 certs x (intent, version, deployment) writes were grouped into fewer commits
    assert report.transactions < 60
    eng.close()
    eng = make(tmp_path, state_url, certs)
    again, _ = eng.plan()
    assert again.actions == ()
    leaf = x509.load_pem_x509_certificate((tmp_path / "inv/out/c7.pem").read_bytes())
    key = serialization.load_pem_private_key((tmp_path / "inv/out/c7.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    audit = eng.store().audit_log(limit=500)
    assert {"issue", "deploy", "apply.finish"} <= {e["event"] for e in audit}
    assert "PRIVATE KEY" not in repr(audit)
    eng.close()


def test_transient_ca_errors_are_retried_within_the_run(
    tmp_path: Path, state_url: str | None
) -> None:
    FaultFlakyCA.failures_left = 2
    eng = make(tmp_path, state_url, {"a": "common_name: a.test, targets: [files]"}, issuer="flaky")
    _, report = eng.apply(settings=fast())
    assert report is not None and not report.failed
    assert FaultFlakyCA.failures_left == 0
    assert len(eng.store().versions("a")) == 1
    eng.close()


def test_permanent_failure_backs_off_and_spares_the_others(
    tmp_path: Path, state_url: str | None
) -> None:
    clock = Clock()
    certs = {
        "good": "common_name: good.test, targets: [files]",
        "bad": "common_name: bad.test, issuer: broken, targets: [files]",
    }
    eng = make(tmp_path, state_url, certs, clock=clock)
    _, report = eng.apply(settings=fast())
    assert report is not None
    failed = {(r.action.kind.value, r.action.cert) for r in report.failed}
    assert failed == {("issue", "bad"), ("deploy", "bad")}
    assert "policy forbids it" in (report.failed[0].error or "")
    assert (tmp_path / "inv/out/good.pem").exists()
    assert not (tmp_path / "inv/out/bad.pem").exists()
    rec = eng.store().snapshot().certs["bad"]
    assert rec.failures == 1
    assert rec.next_attempt_at == clock.now + timedelta(hours=1)
    eng.close()

    # held back on the next plan ...
    eng = make(tmp_path, state_url, certs, clock=clock)
    plan, _ = eng.plan()
    assert plan.actions == () and "bad" in plan.skipped
    eng.close()
    # ... until the backoff expires, and a second failure doubles it
    clock.now += timedelta(hours=1, seconds=1)
    eng = make(tmp_path, state_url, certs, clock=clock)
    _, report = eng.apply(settings=fast())
    assert report is not None and len(report.failed) == 2
    rec = eng.store().snapshot().certs["bad"]
    assert rec.failures == 2 and rec.next_attempt_at == clock.now + timedelta(hours=2)
    eng.close()
    # changing the spec lifts the backoff at once
    certs["bad"] = "common_name: bad.test, issuer: ca, targets: [files]"
    eng = make(tmp_path, state_url, certs, clock=clock)
    plan, _ = eng.plan()
    assert [a.reasons[0].code for a in plan.actions] == [R.NOT_ISSUED, R.NEW_VERSION]
    eng.close()


def test_failed_verification_rolls_back_and_the_rest_goes_on(
    tmp_path: Path, state_url: str | None
) -> None:
    certs = {
        "ok": "common_name: ok.test, targets: [picky]",
        "bad": "common_name: bad.test, targets: [files]",
    }
    eng = make(tmp_path, state_url, certs)
    _, report = eng.apply(settings=fast())
    assert report is not None and not report.failed
    old = (tmp_path / "inv/out/bad.pem").read_bytes()
    eng.close()
    # now 'bad' also goes to the picky target, and is renewed: files get the new
    # version, picky fails verification and must restore what it had (nothing)
    certs["bad"] = "common_name: bad.test, sans: [x.bad.test], targets: [files, picky]"
    eng = make(tmp_path, state_url, certs)
    _, report = eng.apply(settings=fast())
    assert report is not None
    assert [(r.action.cert, r.action.placement) for r in report.failed] == [("bad", "picky")]
    assert "old certificate" in (report.failed[0].error or "")
    assert (tmp_path / "inv/out/bad.pem").read_bytes() != old  # the good target got it
    assert not (tmp_path / "inv/out2/bad.pem").exists()  # rolled back
    eng.close()
    eng = make(tmp_path, state_url, certs)
    plan, _ = eng.plan()
    assert [(a.kind.value, a.placement) for a in plan.actions] == [("deploy", "picky")]
    eng.close()


def test_rotation_never_keeps_the_key(tmp_path: Path, state_url: str | None) -> None:
    certs = {"k": "common_name: k.test, targets: [files]"}
    eng = make(tmp_path, state_url, certs, rotation=", rotation: never")
    eng.apply(settings=fast())
    key1 = (tmp_path / "inv/out/k.key").read_bytes()
    cert1 = (tmp_path / "inv/out/k.pem").read_bytes()
    eng.close()
    certs["k"] = "common_name: k.test, sans: [k2.test], targets: [files]"
    eng = make(tmp_path, state_url, certs, rotation=", rotation: never")
    _, report = eng.apply(settings=fast())
    assert report is not None and report.done_counts()["renew"] == 1
    assert (tmp_path / "inv/out/k.pem").read_bytes() != cert1
    assert (tmp_path / "inv/out/k.key").read_bytes() == key1
    eng.close()
    certs["k"] = "common_name: k.test, sans: [k3.test], targets: [files]"
    eng = make(tmp_path, state_url, certs)  # rotation: always (default)
    eng.apply(settings=fast())
    assert (tmp_path / "inv/out/k.key").read_bytes() != key1
    eng.close()

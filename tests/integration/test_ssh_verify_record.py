"""The deploy's verification outcome and duration, and a failed deploy's command
output, are recorded in the audit log (real sshd + nginx on loopback)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from certctl.engine import Engine
from certctl.plan.planner import PlanOptions
from tests.integration.ssh_support import Nginx, Sshd
from tests.integration.test_ssh_target import current_fp, write_inventory


def events(engine: Engine, name: str) -> list[dict[str, Any]]:
    return [e for e in engine.store().audit_log(limit=100, cert="web") if e["event"] == name]


def test_verify_outcome_and_timing_are_recorded(tmp_path: Path, sshd: Sshd, nginx: Nginx) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None and not report.failed
        (ev,) = events(engine, "deploy")
        verify = ev["detail"]["verify"]
        assert verify["ok"] is True
        assert isinstance(verify["ms"], int) and verify["ms"] >= 0
        assert verify["endpoint"] == f"127.0.0.1:{nginx.port}"
        assert verify["sni"] == "web.ssh.test"
        assert verify["served"] == current_fp(engine)[:16]
        assert verify["files_read_back"] == 2
    finally:
        engine.close()


def test_failed_deploy_records_the_step_and_trimmed_output_without_key(
    tmp_path: Path, sshd: Sshd, nginx: Nginx
) -> None:
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None and not report.failed
        nginx.extra.write_text("this_is_not_a_directive on;\n" + "# padding\n" * 500)
        _, report = engine.apply(options=PlanOptions(force=frozenset({"web"})))
        assert report is not None and len(report.failed) == 1
        (ev,) = events(engine, "deploy.failed")
        detail = ev["detail"]
        assert detail["step"] == "commit"
        assert "this_is_not_a_directive" in detail["output"]
        assert len(detail["output"]) <= 800
        assert "validate failed on box" in detail["error"]
        assert "verify" not in detail  # it never got that far
        text = json.dumps(detail)
        assert "PRIVATE KEY" not in text
        key_body = (nginx.certdir / "web.key").read_text().splitlines()[1]
        assert key_body not in text
    finally:
        engine.close()


def test_failed_verification_records_outcome(tmp_path: Path, sshd: Sshd, nginx: Nginx) -> None:
    """nginx is not reloaded (reload: [true]): the endpoint keeps serving the old
    certificate, verification fails after its timeout and that is recorded."""
    inv = tmp_path / "inv"
    write_inventory(inv, sshd, nginx)
    text = (inv / "inventory.yaml").read_text()
    text = text.replace(f"reload: {json.dumps(nginx.reload)}", 'reload: ["true"]')
    text = text.replace(
        'sni: "{{ cert.common_name }}"', 'sni: "{{ cert.common_name }}", timeout: 1'
    )
    assert 'reload: ["true"]' in text and "timeout: 1" in text
    (inv / "inventory.yaml").write_text(text)
    engine = Engine(inv, sync_mode="none")
    try:
        _, report = engine.apply()
        assert report is not None and len(report.failed) == 1
        (ev,) = events(engine, "deploy.failed")
        detail = ev["detail"]
        assert detail["step"] == "verify"
        verify = detail["verify"]
        assert verify["ok"] is False and isinstance(verify["ms"], int)
        assert verify["endpoint"] == f"127.0.0.1:{nginx.port}"
        assert verify["served"] == nginx.initial_fingerprint[:16]
        assert "serves certificate" in detail["error"]
    finally:
        engine.close()

"""The daemon's notify loop tells the drift its drift loop found, once, through a real
webhook receiver (HMAC-signed), with a real probe of a closed loopback port."""

from __future__ import annotations

import hashlib
import hmac
import socket
from pathlib import Path

import pytest

from certctl.daemon.runner import Daemon, DaemonConfig
from tests.integration.test_notify import Receiver, receiver  # noqa: F401  (fixture)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_drift_found_by_the_daemon_is_notified_once(
    tmp_path: Path,
    receiver: Receiver,  # noqa: F811  (the imported fixture)
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CERTCTL_TEST_DRIFT_HOOK", "hook-secret")
    inv = tmp_path / "inv"
    inv.mkdir()
    (inv / "main.yaml").write_text(
        f"""
issuers: {{ca: {{type: local_ca, root: {{common_name: Daemon Notify CA}}}}}}
defaults: {{issuer: ca}}
certificates: {{}}
endpoints:
  gone: {{endpoint: "127.0.0.1:{closed_port()}", sni: gone.example.test, timeout: 1}}
notifiers:
  hook:
    type: webhook
    url: "{receiver.url("/hook")}"
    secret: {{env: CERTCTL_TEST_DRIFT_HOOK}}
""",
        encoding="utf-8",
    )
    said: list[str] = []
    d = Daemon(DaemonConfig(inventory_path=inv), say=said.append)
    report = d.drift_tick()
    assert report is not None and report.drifted
    d.notify_tick()
    d.notify_tick()  # deduplicated: the same drift is told once
    hooks = receiver.at("/hook")
    drift = [r for r in hooks if r.json().get("kind") == "drift" or "drift" in r.body.decode()]
    assert len(drift) == 1, [r.body for r in hooks]
    body = drift[0].body
    sig = hmac.new(b"hook-secret", body, hashlib.sha256).hexdigest()
    assert sig in drift[0].headers.get("X-Certctl-Signature", "")
    assert b"hook-secret" not in body

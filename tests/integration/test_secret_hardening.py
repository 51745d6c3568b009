"""Secret-handling fixes found in a security review, each with the real component."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from click.testing import CliRunner

from certctl.cli import cli
from certctl.daemon.gitsource import redact_url
from certctl.errors import PermanentError
from certctl.model import Secret
from certctl_connectors.notifiers.email import EmailNotifier


@pytest.mark.parametrize(
    ("url", "leak"),
    [
        ("https://user:p@ss@git.example/x.git", "p@ss"),
        ("https://host.example/x.git?access_token=SECRET", "SECRET"),
        ("https://bot:tok3n@git.example/org/repo.git", "tok3n"),
    ],
)
def test_git_urls_are_redacted(url: str, leak: str) -> None:
    shown = redact_url(url)
    assert leak not in shown
    assert "git.example" in shown or "host.example" in shown


def test_verbose_logging_keeps_http_client_urls_out(tmp_path: Path) -> None:
    """Notifier webhook URLs are secrets; httpx logs full URLs at INFO."""
    (tmp_path / "inv.yaml").write_text("certificates: {}\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["-i", str(tmp_path / "inv.yaml"), "-vv", "validate"])
    assert result.exit_code == 0, result.output
    for name in ("httpx", "httpcore"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.WARNING


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sink:
    def __init__(self) -> None:
        self.auth_attempts = 0
        self.messages = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages += 1
        return "250 OK"


def test_smtp_password_is_never_sent_without_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CERTCTL_TEST_SMTP_PW", "smtp-secret")
    sink = Sink()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, auth_require_tls=False)
    controller.start()
    try:
        notifier = EmailNotifier(
            "mail",
            {
                "host": "127.0.0.1",
                "port": port,
                "from": "certctl@example.test",
                "to": ["ops@example.test"],
                "username": "certctl",
                "password": Secret("env", "CERTCTL_TEST_SMTP_PW"),
                "starttls": False,
            },
            None,  # type: ignore[arg-type]
        )
        with pytest.raises(PermanentError, match="without TLS") as info:
            asyncio.run(notifier.notify("expiring", {"title": "t", "text": "x"}))
        assert "smtp-secret" not in str(info.value)
        assert sink.messages == 0
    finally:
        controller.stop()

"""E-mail notifier: SMTP with STARTTLS (required by default), optional login.

Recipients: the configured ``to`` list plus the addresses routing found (the
certificate owner's and team's e-mail). The password is a secret reference, revealed
only for the login.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from typing import Any

from certctl.connectors import Notifier
from certctl.errors import PermanentError, TransientError
from certctl_connectors.notifiers.webhook import SECRET_REF, TIMEOUT, reveal

ADDRESS = {"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}


class EmailNotifier(Notifier):
    type_name = "email"
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["host", "from"],
        "properties": {
            "host": {"type": "string", "minLength": 1},
            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "from": ADDRESS,
            "to": {"type": "array", "items": ADDRESS, "uniqueItems": True},
            "username": {"type": "string"},
            "password": SECRET_REF,
            "starttls": {"type": "boolean"},
            "ca_file": {"type": "string"},
            "timeout": TIMEOUT,
        },
    }

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        rcpts = list(dict.fromkeys([*self.config.get("to", ()), *payload.get("recipients", ())]))
        if not rcpts:
            raise PermanentError(f"notifier {self.name}: no recipients (set `to` or owner e-mail)")
        msg = EmailMessage()
        msg["From"] = str(self.config["from"])
        msg["To"] = ", ".join(rcpts)
        msg["Subject"] = f"[certctl] {payload.get('title', event)}"
        msg["X-Certctl-Event"] = event
        msg["X-Certctl-Key"] = str(payload.get("key", ""))
        lines = [str(payload.get("text", "")), ""]
        lines += [
            f"{k}: {payload[k]}" for k in ("cert", "owner", "team", "not_after") if payload.get(k)
        ]
        msg.set_content("\n".join(lines) + "\n")
        await asyncio.to_thread(self._send, msg, rcpts)

    def _send(self, msg: EmailMessage, rcpts: list[str]) -> None:
        host = str(self.config["host"])
        port = int(self.config.get("port", 587))
        timeout = float(self.config.get("timeout", 30))
        ca = self.config.get("ca_file")
        context = ssl.create_default_context(
            cafile=str(self.ctx.inventory_root / str(ca)) if ca else None
        )
        try:
            with smtplib.SMTP(host, port, timeout=timeout) as smtp:
                smtp.ehlo()
                if self.config.get("starttls", True):
                    if not smtp.has_extn("starttls"):
                        raise PermanentError(
                            f"notifier {self.name}: {host}:{port} does not offer STARTTLS"
                        )
                    smtp.starttls(context=context)
                    smtp.ehlo()
                if "password" in self.config:
                    if not self.config.get("starttls", True):
                        raise PermanentError(
                            f"notifier {self.name}: refusing to send the SMTP password "
                            "without TLS (set starttls: true)"
                        )
                    smtp.login(
                        str(self.config.get("username", "")), reveal(self.config["password"])
                    )
                smtp.send_message(msg, to_addrs=rcpts)
        except smtplib.SMTPAuthenticationError:
            raise PermanentError(f"notifier {self.name}: SMTP login refused") from None
        except smtplib.SMTPRecipientsRefused:
            raise PermanentError(f"notifier {self.name}: recipients refused") from None
        except smtplib.SMTPResponseException as exc:
            kind = PermanentError if 500 <= exc.smtp_code < 600 else TransientError
            raise kind(f"notifier {self.name}: SMTP {exc.smtp_code}") from None
        except ssl.SSLError as exc:
            raise PermanentError(f"notifier {self.name}: TLS failed ({exc.reason})") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"notifier {self.name}: {type(exc).__name__}") from None


CONNECTORS = [EmailNotifier]

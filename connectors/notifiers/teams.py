"""Microsoft Teams notifier: an Adaptive Card posted to a Teams (workflow) webhook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl.connectors import Notifier
from certctl_connectors.notifiers.webhook import (
    TIMEOUT,
    URL_OR_SECRET,
    body_bytes,
    ca_verify,
    post,
    reveal,
)

COLOR = {"critical": "attention", "warning": "warning", "info": "default"}


class TeamsNotifier(Notifier):
    type_name = "teams"
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["webhook_url"],
        "properties": {
            "webhook_url": URL_OR_SECRET,
            "timeout": TIMEOUT,
            "ca_file": {"type": "string"},
        },
    }

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        facts = [
            {"title": k, "value": str(payload[k])}
            for k in ("cert", "owner", "team", "not_after")
            if payload.get(k)
        ]
        card = {
            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [
                {
                    "type": "TextBlock",
                    "text": str(payload.get("title", event)),
                    "weight": "Bolder",
                    "size": "Medium",
                    "color": COLOR.get(str(payload.get("severity")), "default"),
                    "wrap": True,
                },
                {"type": "TextBlock", "text": str(payload.get("text", "")), "wrap": True},
                {"type": "FactSet", "facts": facts},
            ],
        }
        doc = {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ],
        }
        await post(
            self.name,
            reveal(self.config["webhook_url"]),
            body_bytes(doc),
            {},
            float(self.config.get("timeout", 10)),
            verify=ca_verify(self),
        )


CONNECTORS = [TeamsNotifier]

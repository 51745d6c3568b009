"""Microsoft Teams notifier: an Adaptive Card posted to a Teams (workflow) webhook."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl_connectors.notifiers.webhook import URL_OR_SECRET, HttpNotifier, http_schema, reveal

COLOR = {"critical": "attention", "warning": "warning", "info": "default"}


class TeamsNotifier(HttpNotifier):
    type_name = "teams"
    config_schema = http_schema("webhook_url", webhook_url=URL_OR_SECRET)

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
        await self.send(reveal(self.config["webhook_url"]), doc)


CONNECTORS = [TeamsNotifier]

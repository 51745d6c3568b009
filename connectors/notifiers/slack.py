"""Slack notifier: an incoming-webhook message (``text`` + Block Kit ``blocks``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl_connectors.notifiers.webhook import URL_OR_SECRET, HttpNotifier, http_schema, reveal

EMOJI = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}


class SlackNotifier(HttpNotifier):
    type_name = "slack"
    config_schema = http_schema(
        "webhook_url", webhook_url=URL_OR_SECRET, channel={"type": "string"}
    )

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        emoji = EMOJI.get(str(payload.get("severity")), "")
        title = f"{emoji} {payload.get('title', event)}".strip()
        doc: dict[str, Any] = {
            "text": f"{title}\n{payload.get('text', '')}",
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
                {"type": "section", "text": {"type": "mrkdwn", "text": str(payload.get("text"))}},
                {
                    "type": "context",
                    "elements": [
                        {"type": "mrkdwn", "text": f"{k}: `{payload[k]}`"}
                        for k in ("cert", "owner", "team")
                        if payload.get(k)
                    ]
                    or [{"type": "mrkdwn", "text": event}],
                },
            ],
        }
        if self.config.get("channel"):
            doc["channel"] = self.config["channel"]
        await self.send(reveal(self.config["webhook_url"]), doc)


CONNECTORS = [SlackNotifier]

"""Slack notifier: an incoming-webhook message (``text`` + Block Kit ``blocks``)."""

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

EMOJI = {"critical": ":rotating_light:", "warning": ":warning:", "info": ":information_source:"}


class SlackNotifier(Notifier):
    type_name = "slack"
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["webhook_url"],
        "properties": {
            "webhook_url": URL_OR_SECRET,
            "channel": {"type": "string"},
            "timeout": TIMEOUT,
            "ca_file": {"type": "string"},
        },
    }

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
        await post(
            self.name,
            reveal(self.config["webhook_url"]),
            body_bytes(doc),
            {},
            float(self.config.get("timeout", 10)),
            verify=ca_verify(self),
        )


CONNECTORS = [SlackNotifier]

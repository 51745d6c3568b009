"""PagerDuty notifier: Events API v2 ``trigger`` with the deduplication key as
``dedup_key``, so PagerDuty itself also collapses repeats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl_connectors.notifiers.webhook import SECRET_REF, HttpNotifier, http_schema, reveal

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


class PagerDutyNotifier(HttpNotifier):
    type_name = "pagerduty"
    config_schema = http_schema(
        "routing_key",
        routing_key=SECRET_REF,
        url={"type": "string", "pattern": "^https?://"},
        source={"type": "string"},
    )

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        doc = {
            "routing_key": reveal(self.config["routing_key"]),
            "event_action": "trigger",
            "dedup_key": str(payload.get("key", ""))[:255],
            "payload": {
                "summary": str(payload.get("title", event))[:1024],
                "source": str(self.config.get("source", "certctl")),
                "severity": SEVERITY.get(str(payload.get("severity")), "warning"),
                "component": str(payload.get("cert") or payload.get("issuer") or ""),
                "group": str(payload.get("team") or payload.get("owner") or ""),
                "class": event,
                "custom_details": {
                    k: v for k, v in payload.items() if k not in ("title", "recipients")
                },
            },
        }
        await self.send(str(self.config.get("url", EVENTS_URL)), doc)


CONNECTORS = [PagerDutyNotifier]

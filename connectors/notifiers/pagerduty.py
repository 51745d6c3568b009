"""PagerDuty notifier: Events API v2 ``trigger`` with the deduplication key as
``dedup_key``, so PagerDuty itself also collapses repeats."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl.connectors import Notifier
from certctl_connectors.notifiers.webhook import (
    SECRET_REF,
    TIMEOUT,
    body_bytes,
    ca_verify,
    post,
    reveal,
)

EVENTS_URL = "https://events.pagerduty.com/v2/enqueue"
SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


class PagerDutyNotifier(Notifier):
    type_name = "pagerduty"
    config_schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["routing_key"],
        "properties": {
            "routing_key": SECRET_REF,
            "url": {"type": "string", "pattern": "^https?://"},
            "source": {"type": "string"},
            "timeout": TIMEOUT,
            "ca_file": {"type": "string"},
        },
    }

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
        await post(
            self.name,
            str(self.config.get("url", EVENTS_URL)),
            body_bytes(doc),
            {},
            float(self.config.get("timeout", 10)),
            verify=ca_verify(self),
        )


CONNECTORS = [PagerDutyNotifier]

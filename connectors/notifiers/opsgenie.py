"""OpsGenie notifier: Alert API ``POST /v2/alerts`` (``GenieKey`` authorization), the
deduplication key as the alert ``alias``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from certctl_connectors.notifiers.webhook import SECRET_REF, HttpNotifier, http_schema, reveal

ALERTS_URL = "https://api.opsgenie.com/v2/alerts"
PRIORITY = {"critical": "P1", "warning": "P3", "info": "P5"}


class OpsGenieNotifier(HttpNotifier):
    type_name = "opsgenie"
    config_schema = http_schema(
        "api_key", api_key=SECRET_REF, url={"type": "string", "pattern": "^https?://"}
    )

    async def notify(self, event: str, payload: Mapping[str, Any]) -> None:
        doc: dict[str, Any] = {
            "message": str(payload.get("title", event))[:130],
            "alias": str(payload.get("key", ""))[:512],
            "description": str(payload.get("text", ""))[:15000],
            "priority": PRIORITY.get(str(payload.get("severity")), "P3"),
            "source": "certctl",
            "tags": [t for t in ("certctl", event, payload.get("team")) if t],
            "details": {
                k: str(v)
                for k, v in payload.items()
                if k not in ("title", "text", "recipients") and v is not None
            },
        }
        if payload.get("team"):
            doc["responders"] = [{"type": "team", "name": str(payload["team"])}]
        await self.send(
            str(self.config.get("url", ALERTS_URL)),
            doc,
            {"Authorization": f"GenieKey {reveal(self.config['api_key'])}"},
        )


CONNECTORS = [OpsGenieNotifier]

"""Plan renderers: text (Terraform-like), JSON (stable, schema'd), Markdown (PR comment).

Nothing secret is ever part of a plan: actions carry names, reasons and non-secret
facts only, so every renderer is safe to print or post.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from certctl.errors import CertctlError
from certctl.model import Action, ActionKind, Plan, Reason
from certctl.plan.planner import count_line

PLAN_FORMAT_VERSION = 1

SYMBOLS: dict[ActionKind, str] = {
    ActionKind.ISSUE: "+",
    ActionKind.RENEW: "-/+",
    ActionKind.DEPLOY: "~",
    ActionKind.REVOKE: "-",
    ActionKind.RETIRE: "-",
}

LEGEND = (
    "Actions are shown with these symbols:\n"
    "  +   issue a new certificate\n"
    "  -/+ renew (replace) a certificate\n"
    "  ~   deploy a certificate to a target\n"
    "  -   revoke or retire a certificate\n"
)


def _target_label(a: Action) -> str:
    via = a.details.get("via_agent")
    if a.placement:
        return f" -> {a.placement}" + (f" via {via}" if via else "")
    if via:
        return f" (key made on {a.details.get('key_on')} by {via})"
    if a.details.get("key_custody") == "target":
        return f" (key made on {a.details.get('key_on')})"
    return ""


def _reasons_text(reasons: tuple[Reason, ...]) -> str:
    return "; ".join(r.message for r in reasons)


def render_text(plan: Plan, *, color: bool = False) -> str:
    if not plan.actions:
        lines = ["No changes. The inventory and the observed state match."]
        lines.extend(_skipped_lines(plan))
        return "\n".join(lines) + "\n"
    out = [LEGEND, "certctl will perform the following actions:", ""]
    for a in plan.actions:
        sym = SYMBOLS[a.kind]
        indent = "      " if a.kind is ActionKind.DEPLOY and "after" in a.details else "  "
        out.append(
            f"{indent}{sym} {a.kind.value} {a.cert}{_target_label(a)}  ({_reasons_text(a.reasons)})"
        )
    out.append("")
    out.extend(_skipped_lines(plan))
    out.append(count_line(plan.counts()))
    return "\n".join(out) + "\n"


def _skipped_lines(plan: Plan) -> list[str]:
    if not plan.skipped:
        return []
    lines = ["Held back:"]
    lines.extend(f"  ! {name}: {why}" for name, why in sorted(plan.skipped.items()))
    lines.append("")
    return lines


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "format_version": PLAN_FORMAT_VERSION,
        "created_at": plan.created_at.isoformat(),
        "input_digest": plan.input_digest,
        "summary": plan.counts(),
        "actions": [
            {
                "kind": a.kind.value,
                "cert": a.cert,
                "placement": a.placement,
                "reasons": [r.to_json() for r in a.reasons],
                "details": dict(a.details),
            }
            for a in plan.actions
        ],
        "skipped": dict(plan.skipped),
        "options": dict(plan.options),
    }


def render_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=2, sort_keys=True) + "\n"


def plan_from_json(text: str, source: str = "plan file") -> Plan:
    """Parse a JSON plan written by :func:`render_json` (validated against the schema)."""
    from certctl.plan.schema import validate_plan_json

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CertctlError(f"{source}: not a JSON plan ({exc.msg} at line {exc.lineno})") from None
    validate_plan_json(data, source)
    actions = tuple(
        Action(
            kind=ActionKind(a["kind"]),
            cert=a["cert"],
            placement=a.get("placement"),
            reasons=tuple(Reason(r["code"], r["message"]) for r in a["reasons"]),
            details=a.get("details") or {},
        )
        for a in data["actions"]
    )
    return Plan(
        actions=actions,
        input_digest=data["input_digest"],
        created_at=datetime.fromisoformat(data["created_at"]),
        skipped=data.get("skipped") or {},
        options=data.get("options") or {},
    )


def render_markdown(plan: Plan, *, title: str = "certctl plan") -> str:
    counts = plan.counts()
    if not plan.actions:
        return f"### {title}\n\nNo changes. The inventory and the observed state match.\n"
    out = [f"### {title}", "", f"**{count_line(counts)}**", ""]
    out.append("| action | count |")
    out.append("|---|---:|")
    for kind in ActionKind:
        if counts[kind.value]:
            out.append(f"| {SYMBOLS[kind]} {kind.value} | {counts[kind.value]} |")
    out.append("")
    by_kind: Mapping[ActionKind, list[Action]] = {
        k: [a for a in plan.actions if a.kind is k] for k in ActionKind
    }
    for kind, acts in by_kind.items():
        if not acts:
            continue
        out.append(f"<details><summary>{kind.value}: {len(acts)}</summary>")
        out.append("")
        out.append("| certificate | target | reasons |")
        out.append("|---|---|---|")
        for a in acts:
            where = a.placement or ""
            if a.details.get("via_agent"):
                where = f"{where} via {a.details['via_agent']}".strip()
            out.append(f"| `{_md(a.cert)}` | {_md(where)} | {_md(_reasons_text(a.reasons))} |")
        out.append("")
        out.append("</details>")
        out.append("")
    if plan.skipped:
        out.append("<details><summary>held back</summary>")
        out.append("")
        for name, why in sorted(plan.skipped.items()):
            out.append(f"- `{_md(name)}`: {_md(why)}")
        out.append("")
        out.append("</details>")
    return "\n".join(out) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


def render(plan: Plan, fmt: str) -> str:
    if fmt == "json":
        return render_json(plan)
    if fmt == "markdown":
        return render_markdown(plan)
    return render_text(plan)

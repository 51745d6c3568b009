"""Reason codes the planner gives, with their one-line human messages.

The codes are part of the JSON plan contract (``schemas/plan.schema.json``); add new
ones, never rename.
"""

from __future__ import annotations

from certctl.model import Reason

NOT_ISSUED = "not_issued"
CURRENT_REVOKED = "current_revoked"
ISSUER_CHANGED = "issuer_changed"
KEY_CHANGED = "key_changed"
NAMES_CHANGED = "names_changed"
PROFILE_CHANGED = "profile_changed"
FORCED = "forced"
EXPIRED = "expired"
RENEWAL_WINDOW = "renewal_window"
ARI_WINDOW = "ari_window"
NEW_VERSION = "new_version"
NEW_TARGET = "new_target"
MISSING_ON_TARGET = "missing_on_target"
CONTENT_DIFFERS = "content_differs"
OUTDATED_ON_TARGET = "outdated_on_target"
LAST_DEPLOY_FAILED = "last_deploy_failed"
NOT_RECORDED = "not_recorded"
REVOKED_IN_INVENTORY = "revoked_in_inventory"
REMOVED_REVOKE = "removed_revoke"
REMOVED = "removed"

MESSAGES: dict[str, str] = {
    NOT_ISSUED: "never issued",
    CURRENT_REVOKED: "current certificate (serial {serial}) is revoked",
    ISSUER_CHANGED: "issuer changed: {old} -> {new}",
    KEY_CHANGED: "key spec changed: {old} -> {new}",
    NAMES_CHANGED: "names changed: {change}",
    PROFILE_CHANGED: "profile {profile} changed",
    FORCED: "renewal forced",
    EXPIRED: "expired at {not_after}",
    RENEWAL_WINDOW: "inside the renewal window ({left} left, renew_before {renew_before})",
    ARI_WINDOW: "ARI suggests renewal between {start} and {end}",
    NEW_VERSION: "deploy the new certificate",
    NEW_TARGET: "new target: deploys the existing certificate",
    MISSING_ON_TARGET: "missing on target: {detail}",
    CONTENT_DIFFERS: "content on target differs: {detail}",
    OUTDATED_ON_TARGET: "target has version {version}, not the current one",
    LAST_DEPLOY_FAILED: "last deployment failed",
    NOT_RECORDED: "already on the target but not recorded in state; records it",
    REVOKED_IN_INVENTORY: "marked revoked in the inventory (reason {reason})",
    REMOVED_REVOKE: "removed from the inventory; revoke_on_remove is set",
    REMOVED: "removed from the inventory; no longer managed",
}

ALL_CODES = frozenset(MESSAGES)


def reason(code: str, **facts: object) -> Reason:
    return Reason(code, MESSAGES[code].format(**facts))

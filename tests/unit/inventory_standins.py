"""Stand-in connectors for the inventory loader tests.

The loader only needs a connector's ``type_name``, ``config_schema`` and (for
targets) ``check_placement``; these stand-ins provide exactly that, so the tests do
not depend on the real built-in connectors. They never stage, deploy or issue.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from certctl.connectors import (
    IssuedCert,
    IssueRequest,
    Material,
    ObserveItem,
    Registry,
    Staged,
    Target,
)
from certctl.connectors import Issuer as IssuerConnector
from certctl.model import FileRecord, Placement, TargetObservation, VersionRecord

_SECRET = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "maxProperties": 1,
    "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
}
_PATH = {"type": "string", "minLength": 1}


class _NoDeploy(Target):
    async def stage(self, placement: Placement, material: Material) -> Staged:
        raise NotImplementedError("stand-in target")

    async def commit(self, staged: Staged) -> dict[str, FileRecord]:
        raise NotImplementedError("stand-in target")

    async def rollback(self, staged: Staged) -> None:
        raise NotImplementedError("stand-in target")

    def observe(self, items: Sequence[ObserveItem]) -> list[TargetObservation]:
        raise NotImplementedError("stand-in target")


class StandInFileTarget(_NoDeploy):
    """Stand-in for the file target: its config shape and its path confinement."""

    type_name = "file"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["root"],
        "properties": {
            "root": _PATH,
            "cert_path": _PATH,
            "chain_path": _PATH,
            "fullchain_path": _PATH,
            "key_path": _PATH,
            "combined_path": _PATH,
            "backups": {"type": "integer", "minimum": 0},
        },
    }

    @classmethod
    def check_placement(cls, placement: Placement, inventory_root: Path) -> list[str]:
        root = os.path.normpath(os.path.join(inventory_root, str(placement.config["root"])))
        problems = []
        for key, value in placement.config.items():
            if not key.endswith("_path"):
                continue
            full = os.path.normpath(os.path.join(root, str(value)))
            if os.path.isabs(str(value)) or not full.startswith(root + os.sep):
                problems.append(f"{key} {value!r} escapes the target root {root!r}")
        return problems


class StandInRemoteTarget(_NoDeploy):
    """Stand-in for a target on remote hosts (the shape an ssh target would have)."""

    type_name = "remote_file"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["path"],
        "properties": {
            "path": _PATH,
            "user": {"type": "string"},
            "password": _SECRET,
            "verify": {"type": "object"},
        },
    }


class StandInBrokenCheckTarget(_NoDeploy):
    """Stand-in whose check_placement has a bug: the loader must not show a traceback."""

    type_name = "buggy"

    @classmethod
    def check_placement(cls, placement: Placement, inventory_root: Path) -> list[str]:
        raise KeyError("oops")


class _NoIssue(IssuerConnector):
    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert:
        raise NotImplementedError("stand-in issuer")

    async def revoke(self, version: VersionRecord, reason: str) -> None:
        raise NotImplementedError("stand-in issuer")


class StandInLocalCA(_NoIssue):
    """Stand-in for the local CA issuer (open config, like the demo's)."""

    type_name = "local_ca"


class StandInStrictIssuer(_NoIssue):
    """Stand-in for an issuer with a strict config schema and a secret field."""

    type_name = "strict_ca"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["url"],
        "properties": {"url": {"type": "string", "pattern": "^https://"}, "token": _SECRET},
    }


def standin_registry() -> Registry:
    reg = Registry()
    for cls in (
        StandInFileTarget,
        StandInRemoteTarget,
        StandInBrokenCheckTarget,
        StandInLocalCA,
        StandInStrictIssuer,
    ):
        reg.add(cls, __name__)
    return reg

"""Validation of saved JSON plans against ``schemas/plan.schema.json``."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema

from certctl.errors import CertctlError


@cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((files("certctl_schemas") / "plan.schema.json").read_text("utf-8"))
    return jsonschema.Draft202012Validator(schema)


def validate_plan_json(data: Any, source: str) -> None:
    errors = sorted(_validator().iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise CertctlError(f"{source}: not a valid certctl plan: {where}: {e.message}")

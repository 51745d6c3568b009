"""Typed values of the inventory: durations, renewal windows, key specs and key ids.

The schema has already checked the *form* of these values (``90d``, ``33%``, an enum
for curves); here they become numbers and model objects, with the checks that need
arithmetic (not zero, not absurdly large) and cross-field rules (a curve belongs to
ECDSA keys only). Every parser returns ``(value, problem)`` so the loader can locate
the problem; none raises on bad input.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from certctl.inventory.yamlload import quote
from certctl.model import KeySpec, RenewBefore

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
MAX_DURATION = 100 * UNITS["y"]
DEFAULT_TTL = 90 * UNITS["d"]
DEFAULT_RSA_BITS = 3072
_PART = re.compile(r"([0-9]+)([smhdwy])")
_CURVE_BITS = {"P-256": 256, "P-384": 384}


def parse_duration(value: Any) -> tuple[int | None, str | None]:
    """``90d``/``12h``/``1d12h``/``3600``/``3600`` (int) -> seconds."""
    if isinstance(value, bool):
        return None, f"expected a duration, got {quote(value)}"
    if isinstance(value, (int, float)):
        if value != int(value):
            return None, f"expected a whole number of seconds, got {quote(value)}"
        seconds = int(value)
    elif isinstance(value, str) and value.isdigit():
        seconds = int(value)
    elif isinstance(value, str) and _PART.sub("", value) == "" and value:
        seconds = sum(int(n) * UNITS[u] for n, u in _PART.findall(value))
    else:
        return None, f"expected a duration such as 90d, 12h, 30m or 1y, got {quote(value)}"
    if seconds <= 0:
        return None, f"a duration must be positive, got {quote(value)}"
    if seconds > MAX_DURATION:
        return None, f"duration {quote(value)} is too long (at most 100y)"
    return seconds, None


def format_duration(seconds: int) -> str:
    """The shortest exact unit form: 7776000 -> ``90d``; 5400 -> ``90m``."""
    for unit in ("y", "d", "h", "m"):
        size = UNITS[unit]
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def parse_renew_before(value: Any) -> tuple[RenewBefore | None, str | None]:
    """``33%`` or ``0.33`` -> a fraction of the lifetime; ``30d`` or ``86400`` -> seconds."""
    if isinstance(value, str) and value.endswith("%"):
        try:
            percent = float(value[:-1])
        except ValueError:
            return None, f"expected a percentage such as 33%, got {quote(value)}"
        if not 0 < percent < 100:
            return None, f"a percentage must be between 0% and 100% (exclusive), got {value}"
        return RenewBefore(fraction=percent / 100), None
    if isinstance(value, float) and not value.is_integer():
        if not 0 < value < 1:
            return None, f"a fraction must be between 0 and 1 (exclusive), got {quote(value)}"
        return RenewBefore(fraction=value), None
    seconds, problem = parse_duration(value)
    if seconds is None:
        return None, problem
    return RenewBefore(fraction=None, seconds=seconds), None


def describe_renew_before(rb: RenewBefore) -> str:
    return format_duration(rb.seconds) if rb.seconds is not None else rb.describe()


def key_spec(fields: Mapping[str, Any]) -> tuple[KeySpec, list[tuple[str, str]]]:
    """A :class:`KeySpec` from merged ``key`` fields; problems as ``(field, message)``.

    Defaults: ECDSA on P-256; RSA 3072 bits; rotation ``always``; custody
    ``controller``.
    """
    problems: list[tuple[str, str]] = []
    algorithm = str(fields.get("type", "ecdsa"))
    curve = fields.get("curve")
    size = fields.get("size")
    if curve is not None and algorithm != "ecdsa":
        problems.append(("curve", f"curve applies to ecdsa keys only (this key is {algorithm})"))
    if size is not None and algorithm != "rsa":
        problems.append(("size", f"size applies to rsa keys only (this key is {algorithm})"))
    if algorithm == "ecdsa":
        bits = _CURVE_BITS.get(str(curve or "P-256"), 256)
    elif algorithm == "rsa":
        bits = int(size) if isinstance(size, int) else DEFAULT_RSA_BITS
    else:
        bits = 256
    spec = KeySpec(
        algorithm=algorithm,
        size=bits,
        rotation=str(fields.get("rotation", "always")),
        custody=str(fields.get("custody", "controller")),
    )
    return spec, problems


def merge_key(default: Mapping[str, Any] | None, own: Mapping[str, Any] | None) -> dict[str, Any]:
    """Field-wise merge of ``defaults.key`` and a certificate's ``key``.

    When the certificate picks another key type, the default's type-specific fields
    (``curve``, ``size``) are not inherited: ``{type: rsa}`` over a default of
    ``{type: ecdsa, curve: P-256}`` is an RSA key, not an error.
    """
    merged = dict(default or {})
    if own:
        if "type" in own and own["type"] != merged.get("type", "ecdsa"):
            merged.pop("curve", None)
            merged.pop("size", None)
        merged.update(own)
    return merged


def key_allowed(spec: KeySpec, allowed: tuple[str, ...]) -> bool:
    """Whether a key matches one of ``allowed`` ids (``rsa-3072+`` = RSA of 3072+ bits)."""
    if not allowed:
        return True
    own = spec.id
    for entry in allowed:
        if entry == own:
            return True
        if entry.endswith("+"):
            algorithm, _, bits = entry[:-1].partition("-")
            digits = bits.lstrip("p")
            if algorithm == spec.algorithm and digits.isdigit() and spec.size >= int(digits):
                return True
    return False

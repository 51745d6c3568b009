"""A compiled fast path for JSON Schema validation: ``value -> bool`` closures.

``jsonschema`` is general and therefore slow per small object (tens of
microseconds); an inventory of 10,000 certificates would spend most of its load
budget in it. :class:`Compiler` turns a schema into plain Python closures for the
keywords certctl's schemas use, with ``jsonschema``'s exact semantics for each:
``bool`` is not an integer, ``True`` does not equal ``1``, ``1`` equals ``1.0``,
``pattern`` is ``re.search``, ``format`` is an annotation, keywords only apply to
their own instance types, ``additionalProperties`` sees ``properties`` and
``patternProperties`` of the same schema.

The closures only say valid or invalid: messages come from ``jsonschema``, run on
the (rare) invalid value. A schema using a keyword that is not implemented here
raises :class:`Unsupported` at compile time and is then validated by ``jsonschema``
alone. ``tests/unit/test_inventory_schema.py`` compares both on generated values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema

Check = Callable[[Any], bool]


class Unsupported(Exception):
    """The schema uses something the compiler does not implement (use jsonschema)."""


_ANNOTATIONS = frozenset(
    {
        "$schema", "$comment", "$defs", "definitions", "title", "description", "default",
        "examples", "deprecated", "readOnly", "writeOnly", "format", "contentMediaType",
        "contentEncoding", "contentSchema", "then", "else",
    }
)  # fmt: skip
_JS_KEYWORDS = frozenset(jsonschema.Draft202012Validator.VALIDATORS)


def _is_integer(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    return isinstance(x, int) or (isinstance(x, float) and x.is_integer())


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


_TYPES: dict[str, Check] = {
    "object": lambda x: isinstance(x, dict),
    "array": lambda x: isinstance(x, list),
    "string": lambda x: isinstance(x, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda x: isinstance(x, bool),
    "null": lambda x: x is None,
}


def _equal(a: Any, b: Any) -> bool:
    """JSON equality as jsonschema sees it: ``True`` is not ``1``, ``1`` is ``1.0``."""
    if a is b:
        return True
    if isinstance(a, str) or isinstance(b, str):
        return bool(a == b)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return bool(a == b)


def first_duplicate(items: Sequence[Any]) -> int | None:
    """Index of the first item equal to an earlier one (JSON equality), if any."""
    seen: set[tuple[str, Any]] = set()
    others: list[Any] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            key: tuple[str, Any] = ("s", item)
        elif isinstance(item, bool):
            key = ("b", item)
        elif isinstance(item, (int, float)):
            key = ("n", item)
        elif item is None:
            key = ("z", None)
        else:
            if any(_equal(item, o) for o in others):
                return i
            others.append(item)
            continue
        if key in seen:
            return i
        seen.add(key)
    return None


def _all(checks: list[Check]) -> Check:
    if not checks:
        return lambda x: True
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        a, b = checks
        return lambda x: a(x) and b(x)

    def check(x: Any) -> bool:
        for c in checks:  # noqa: SIM110 - a plain loop is faster than all() + generator
            if not c(x):
                return False
        return True

    return check


class Compiler:
    """Compiles a schema into a ``value -> bool`` closure (see the module docstring)."""

    def __init__(self, root: Mapping[str, Any] | bool) -> None:
        self.root = root
        self.cache: dict[int, Check] = {}

    def compile(self, schema: Any) -> Check:
        if schema is True:
            return lambda x: True
        if schema is False:
            return lambda x: False
        if not isinstance(schema, Mapping):
            raise Unsupported("schema is not an object")
        key = id(schema)
        if key in self.cache:
            return self.cache[key]
        cell: list[Check] = []
        self.cache[key] = lambda x: cell[0](x)  # placeholder for recursive references
        compiled = self._compile(schema, schema is self.root)
        cell.append(compiled)
        self.cache[key] = compiled
        return compiled

    def _compile(self, s: Mapping[str, Any], is_root: bool) -> Check:
        for kw in s:
            if kw == "$id" and is_root:
                continue
            if kw in _ANNOTATIONS or (kw not in _JS_KEYWORDS and not kw.startswith("$")):
                continue
            if kw not in _HANDLED:
                raise Unsupported(kw)
        checks: list[Check] = []
        if "type" in s:
            types = [s["type"]] if isinstance(s["type"], str) else list(s["type"])
            tchecks = [_TYPES[t] for t in types]
            checks.append(tchecks[0] if len(tchecks) == 1 else _any_of(tchecks))
        if "$ref" in s:
            checks.append(self.compile(pointer(self.root, s["$ref"])))
        if "enum" in s:
            checks.append(_enum(list(s["enum"])))
        if "const" in s:
            const = s["const"]
            checks.append(lambda x: _equal(x, const))
        string = self._string(s)
        if string is not None:
            checks.append(string)
        number = _number(s)
        if number is not None:
            checks.append(number)
        obj = self._object(s)
        if obj is not None:
            checks.append(obj)
        arr = self._array(s)
        if arr is not None:
            checks.append(arr)
        for kw in ("allOf", "anyOf", "oneOf"):
            if kw in s:
                subs = [self.compile(sub) for sub in s[kw]]
                if kw == "allOf":
                    checks.append(_all(subs))
                elif kw == "anyOf":
                    checks.append(_any_of(subs))
                else:
                    checks.append(_one_of(subs))
        if "not" in s:
            negated = self.compile(s["not"])
            checks.append(lambda x: not negated(x))
        if "if" in s:
            cond = self.compile(s["if"])
            then = self.compile(s.get("then", True))
            other = self.compile(s.get("else", True))
            checks.append(lambda x: then(x) if cond(x) else other(x))
        return _all(checks)

    def _string(self, s: Mapping[str, Any]) -> Check | None:
        pattern = re.compile(s["pattern"]) if "pattern" in s else None
        lo, hi = s.get("minLength"), s.get("maxLength")
        if pattern is None and lo is None and hi is None:
            return None

        def check(x: Any) -> bool:
            if not isinstance(x, str):
                return True
            if hi is not None and len(x) > hi:
                return False
            if lo is not None and len(x) < lo:
                return False
            return pattern is None or pattern.search(x) is not None

        return check

    def _object(self, s: Mapping[str, Any]) -> Check | None:
        kws = ("properties", "patternProperties", "additionalProperties", "required",
               "propertyNames", "minProperties", "maxProperties", "dependentRequired")  # fmt: skip
        if not any(k in s for k in kws):
            return None
        props = {k: self.compile(v) for k, v in s.get("properties", {}).items()}
        pats = [(re.compile(p), self.compile(v)) for p, v in s.get("patternProperties", {}).items()]
        extra = self.compile(s["additionalProperties"]) if "additionalProperties" in s else None
        required = list(s.get("required", ()))
        names = self.compile(s["propertyNames"]) if "propertyNames" in s else None
        lo, hi = s.get("minProperties"), s.get("maxProperties")
        dependent = {k: list(v) for k, v in s.get("dependentRequired", {}).items()}

        def check(x: Any) -> bool:
            if not isinstance(x, dict):
                return True
            for r in required:
                if r not in x:
                    return False
            for k, v in x.items():
                c = props.get(k)
                if c is not None and not c(v):
                    return False
                matched = False
                for rx, pc in pats:
                    if rx.search(k):
                        matched = True
                        if not pc(v):
                            return False
                if c is None and not matched and extra is not None and not extra(v):
                    return False
                if names is not None and not names(k):
                    return False
                deps = dependent.get(k)
                if deps and any(d not in x for d in deps):
                    return False
            if lo is not None and len(x) < lo:
                return False
            return hi is None or len(x) <= hi

        return check

    def _array(self, s: Mapping[str, Any]) -> Check | None:
        kws = ("items", "prefixItems", "minItems", "maxItems", "uniqueItems")
        if not any(k in s for k in kws):
            return None
        prefix = [self.compile(v) for v in s.get("prefixItems", ())]
        items = self.compile(s["items"]) if "items" in s else None
        lo, hi = s.get("minItems"), s.get("maxItems")
        unique = bool(s.get("uniqueItems", False))

        def check(x: Any) -> bool:
            if not isinstance(x, list):
                return True
            if lo is not None and len(x) < lo:
                return False
            if hi is not None and len(x) > hi:
                return False
            for i, item in enumerate(x):
                c = prefix[i] if i < len(prefix) else items
                if c is not None and not c(item):
                    return False
            return not (unique and first_duplicate(x) is not None)

        return check


_HANDLED = frozenset(
    {
        "$ref", "type", "enum", "const", "pattern", "minLength", "maxLength", "minimum",
        "maximum", "exclusiveMinimum", "exclusiveMaximum", "properties", "patternProperties",
        "additionalProperties", "required", "propertyNames", "minProperties", "maxProperties",
        "dependentRequired", "items", "prefixItems", "minItems", "maxItems", "uniqueItems",
        "allOf", "anyOf", "oneOf", "not", "if",
    }
)  # fmt: skip


def _any_of(checks: list[Check]) -> Check:
    return lambda x: any(c(x) for c in checks)


def _one_of(checks: list[Check]) -> Check:
    return lambda x: sum(1 for c in checks if c(x)) == 1


def _enum(values: list[Any]) -> Check:
    if all(isinstance(v, str) for v in values):
        allowed = frozenset(values)
        return lambda x: isinstance(x, str) and x in allowed
    return lambda x: any(_equal(x, v) for v in values)


def _number(s: Mapping[str, Any]) -> Check | None:
    bounds = [(k, s[k]) for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
              if k in s]  # fmt: skip
    if not bounds:
        return None

    def check(x: Any) -> bool:
        if not _is_number(x):
            return True
        for kw, b in bounds:
            if kw == "minimum" and x < b:
                return False
            if kw == "maximum" and x > b:
                return False
            if kw == "exclusiveMinimum" and x <= b:
                return False
            if kw == "exclusiveMaximum" and x >= b:
                return False
        return True

    return check


def pointer(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        raise Unsupported(ref)
    node = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise Unsupported(ref)
    return node

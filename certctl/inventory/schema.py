"""JSON Schema validation of the inventory, fast, with messages written for operators.

The schemas under ``schemas/`` (installed as ``certctl_schemas``) and each connector's
``config_schema`` are the source of truth. Two things stand between them and a good
user experience, and this module deals with both:

* **Speed.** ``jsonschema`` costs tens of microseconds per small object; a
  10,000-certificate inventory would spend most of its load budget there. So every
  schema is also *compiled* (:mod:`.compiler`) into plain Python closures for the
  keywords certctl's schemas use. The compiled check only answers valid/invalid and
  implements those keywords with ``jsonschema``'s exact semantics (``bool`` is not an
  integer, ``pattern`` is ``re.search``, ``format`` is an annotation, ...). When it
  says invalid, ``jsonschema`` runs on that one instance to produce the errors. A
  schema using a keyword the compiler does not implement is validated by
  ``jsonschema`` alone, so schema-valid always equals accepted.
* **Messages.** ``jsonschema``'s default messages echo the whole instance (a 10 MB
  string would become a 10 MB error). :func:`_violations` writes new ones from the
  failing keyword: "unknown key 'sanz' (did you mean 'sans'?) (expected one of: ...)",
  "too long (300 characters, at most 253)", "expected a duration such as 90d ...".
  A schema's ``description`` is used as the "expected ..." wording.

:class:`InventorySchema` splits the inventory schema the way the loader works: the
file's top level, each kind's collection (``type`` and ``propertyNames``), and each
entry of a collection (``additionalProperties``), so one bad certificate out of
10,000 costs one ``jsonschema`` run, not 10,000. The split is derived from the
schema document itself, not hard-coded per kind.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema

from certctl.inventory import compiler
from certctl.inventory.yamlload import Path, quote, type_name

SCHEMA_FILE = "inventory.schema.json"


@dataclass(frozen=True)
class Violation:
    """One schema error: where below the validated value, and what is wrong."""

    path: Path
    message: str
    at_key: bool = False  # the key itself is wrong (unknown key, invalid name)


class SchemaValidator:
    """Validates values against one schema: compiled fast path, jsonschema for errors."""

    def __init__(self, schema: Mapping[str, Any] | bool, *, check: bool = True) -> None:
        if check:  # raises jsonschema.SchemaError
            jsonschema.Draft202012Validator.check_schema(schema)
        self.schema = schema
        self._js = jsonschema.Draft202012Validator(schema)
        self.compiled = True
        try:
            self._fast: compiler.Check = compiler.Compiler(schema).compile(schema)
        except compiler.Unsupported:
            self.compiled = False
            self._fast = self._js.is_valid

    def is_valid(self, instance: Any) -> bool:
        return self._fast(instance)

    def validate(self, instance: Any) -> list[Violation]:
        """Every violation of the schema by ``instance`` (empty when valid)."""
        try:
            if self._fast(instance):
                return []
            seen: set[tuple[Path, str]] = set()
            out: list[Violation] = []
            for error in self._js.iter_errors(instance):
                for v in _violations(error):
                    if (v.path, v.message) not in seen:
                        seen.add((v.path, v.message))
                        out.append(v)
        except Exception as exc:  # e.g. a connector schema with an unresolvable $ref
            detail = quote(str(exc), 200)
            return [Violation((), f"the schema cannot be applied ({type(exc).__name__}: {detail})")]
        return out


@dataclass(frozen=True)
class KindSchema:
    """How to validate one top-level kind.

    A *collection* (``issuers``, ``certificates``, ...) is validated as its own shape
    (``shallow``: type and entry names) plus one ``entry`` validation per entry.
    ``entry_keys`` are the keys the inventory schema itself defines for an entry; for
    issuers, targets and notifiers every other key is connector configuration.
    """

    name: str
    collection: bool
    shallow: SchemaValidator
    entry: SchemaValidator | None
    entry_keys: frozenset[str]


@dataclass(frozen=True)
class InventorySchema:
    top: SchemaValidator  # the file's top level, every kind's own schema replaced by true
    kinds: Mapping[str, KindSchema]


def load_schema_document(name: str = SCHEMA_FILE) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((files("certctl_schemas") / name).read_text("utf-8"))
    return data


@cache
def inventory_schema() -> InventorySchema:
    """The packaged inventory schema, split per kind (read and compiled once)."""
    return split_inventory_schema(load_schema_document())


def split_inventory_schema(document: Mapping[str, Any]) -> InventorySchema:
    jsonschema.Draft202012Validator.check_schema(document)
    defs = document.get("$defs", {})

    def standalone(schema: Mapping[str, Any]) -> dict[str, Any]:
        return {**schema, "$defs": defs}

    props: Mapping[str, Any] = document.get("properties", {})
    # The parts below are pieces of the checked document: no need to check each again.
    top = SchemaValidator({**document, "properties": dict.fromkeys(props, True)}, check=False)
    kinds: dict[str, KindSchema] = {}
    for kind, sub in props.items():
        resolved = deref(sub, document)
        extra = resolved.get("additionalProperties")
        if (
            isinstance(extra, Mapping)
            and "properties" not in resolved
            and ("patternProperties" not in resolved)
        ):
            shallow = {k: v for k, v in resolved.items() if k != "additionalProperties"}
            entry_props = deref(extra, document).get("properties", {})
            kinds[kind] = KindSchema(
                kind,
                True,
                SchemaValidator(standalone(shallow), check=False),
                SchemaValidator(standalone(extra), check=False),
                frozenset(entry_props),
            )
        else:
            kinds[kind] = KindSchema(
                kind, False, SchemaValidator(standalone(sub), check=False), None, frozenset()
            )
    return InventorySchema(top, kinds)


def deref(schema: Any, root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local ``$ref`` chains (``#/$defs/x``) to the schema they name."""
    seen = 0
    while isinstance(schema, Mapping) and "$ref" in schema and seen < 32:
        schema = compiler.pointer(root, schema["$ref"])
        seen += 1
    return schema if isinstance(schema, Mapping) else {}


# ---------------------------------------------------------------------------
# Messages

_TYPE_WORDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
}


def _got(instance: Any, *, typed: bool = False) -> str:
    """``'x'`` / ``1.5`` / ``a mapping``; with ``typed``, ``a string 'x'``."""
    if isinstance(instance, (str, int, float)) and not isinstance(instance, bool):
        return f"{type_name(instance)} {quote(instance)}" if typed else quote(instance)
    if isinstance(instance, bool):
        return quote(instance)
    return type_name(instance)


def _or(words: Iterable[str]) -> str:
    items = list(words)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def _listing(values: Iterable[Any], limit: int = 20) -> str:
    items = [str(v) for v in values]
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {quote(close[0])}?)" if close else ""


def _violations(error: jsonschema.ValidationError) -> list[Violation]:
    path: Path = tuple(error.absolute_path)
    kw = error.validator if isinstance(error.validator, str) else None
    value: Any = error.validator_value
    inst = error.instance
    schema = error.schema if isinstance(error.schema, Mapping) else {}
    desc = schema.get("description")

    if "propertyNames" in error.relative_schema_path and isinstance(inst, str):
        what = f"expected {desc}" if desc else _message(kw, value, inst, schema)
        return [Violation((*path, inst), f"invalid key {quote(inst)}: {what}", at_key=True)]
    if kw == "required" and isinstance(inst, Mapping):
        return [Violation(path, f"missing required key {quote(k)}") for k in value if k not in inst]
    if kw == "additionalProperties" and isinstance(inst, Mapping):
        known = list(schema.get("properties", {}))
        pats = [re.compile(p) for p in schema.get("patternProperties", {})]
        out = []
        for k in inst:
            if k in known or any(p.search(k) for p in pats):
                continue
            expected = f" (expected one of: {_listing(known)})" if known else ""
            out.append(
                Violation(
                    (*path, k),
                    f"unknown key {quote(k)}{did_you_mean(k, known)}{expected}",
                    at_key=True,
                )
            )
        return out
    if kw == "uniqueItems" and isinstance(inst, list):
        dup = compiler.first_duplicate(inst)
        if dup is not None:
            return [Violation((*path, dup), f"duplicate item {quote(inst[dup])}")]
    if kw == "dependentRequired" and isinstance(inst, Mapping):
        return [
            Violation(path, f"{quote(k)} needs {quote(d)} as well")
            for k, deps in value.items()
            if k in inst
            for d in deps
            if d not in inst
        ]
    if kw == "oneOf" and not error.context:
        return [Violation(path, f"{_got(inst)} matches more than one of the allowed forms")]
    if kw in ("anyOf", "oneOf") and not desc and error.context:
        # When the value has the type of exactly one alternative, say what is wrong
        # with it there ("does not match ^0?[0-7]{3}$"), not "expected a string or ...".
        typed = [e for e in error.context if e.validator != "type"]
        if typed and len({e.relative_schema_path[0] for e in typed}) == 1:
            return [v for e in typed for v in _violations(e)]
    return [Violation(path, _message(kw, value, inst, schema))]


def _message(kw: str | None, value: Any, inst: Any, schema: Mapping[str, Any]) -> str:
    desc = schema.get("description")
    if kw == "type":
        types = [value] if isinstance(value, str) else list(value)
        expected = desc or _or(_TYPE_WORDS.get(t, t) for t in types)
        return f"expected {expected}, got {_got(inst, typed=True)}"
    if kw == "enum":
        return f"expected one of {_listing(quote(v) for v in value)}; got {_got(inst)}" + (
            did_you_mean(inst, [v for v in value if isinstance(v, str)])
            if isinstance(inst, str)
            else ""
        )
    if kw == "const":
        return f"expected {quote(value)}, got {_got(inst)}"
    if kw == "maxLength" and isinstance(inst, str):
        return f"too long ({len(inst)} characters, at most {value})"
    if kw == "minLength" and isinstance(inst, str):
        if value == 1:
            return "must not be empty"
        return f"too short ({len(inst)} characters, at least {value})"
    if kw in ("pattern", "anyOf", "oneOf", "not") and desc:
        return f"expected {desc}, got {_got(inst)}"
    if kw == "pattern":
        return f"{quote(inst)} does not match the pattern {quote(value)}"
    if kw == "minimum":
        return f"must be at least {value}, got {quote(inst)}"
    if kw == "exclusiveMinimum":
        return f"must be greater than {value}, got {quote(inst)}"
    if kw == "maximum":
        return f"must be at most {value}, got {quote(inst)}"
    if kw == "exclusiveMaximum":
        return f"must be less than {value}, got {quote(inst)}"
    if kw == "minItems":
        return f"needs at least {value} item{'s' if value != 1 else ''}"
    if kw == "maxItems" and isinstance(inst, list):
        return f"too many items ({len(inst)}, at most {value})"
    if kw == "minProperties":
        return f"needs at least {value} key{'s' if value != 1 else ''}"
    if kw == "maxProperties" and isinstance(inst, Mapping):
        return f"too many keys ({len(inst)}, at most {value})"
    if kw in ("anyOf", "oneOf") and isinstance(value, list):
        return _alternatives(kw, value, inst)
    if kw == "not":
        return f"{_got(inst)} is not allowed here"
    if kw is None:
        return "no value is allowed here"
    return f"does not satisfy {kw} {quote(value)}"


def _alternatives(kw: str, options: list[Any], inst: Any) -> str:
    """A message for a failed ``anyOf``/``oneOf`` whose schema has no description."""
    if options and all(isinstance(o, Mapping) and set(o) == {"required"} for o in options):
        keys = [k for o in options for k in o["required"]]
        amount = "at least one" if kw == "anyOf" else "exactly one"
        return f"needs {amount} of these keys: {_listing(keys)}"
    if options and all(isinstance(o, Mapping) and isinstance(o.get("type"), str) for o in options):
        return f"expected {_or(_TYPE_WORDS.get(o['type'], o['type']) for o in options)}, got " + (
            _got(inst, typed=True)
        )
    return f"{_got(inst)} does not match any of the allowed forms"

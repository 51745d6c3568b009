"""The inventory JSON Schema, and the compiled fast path that must agree with jsonschema.

The loader accepts a value exactly when ``jsonschema`` does: the compiled checker is
only a shortcut. These tests compare the two on many generated values, for the
inventory schema's kinds, for connector schemas, and for a synthetic schema using
every keyword the compiler implements.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from typing import Any

import jsonschema
import pytest

from certctl.inventory import schema as S
from tests.unit.inventory_standins import standin_registry

SAMPLES: list[Any] = [
    None, True, False, 0, 1, -1, 1.0, 1.5, 2048, 4096, "", "x", "90d", "1d12h", "33%", "0.5",
    "3600", "P-256", "ecdsa", "rsa", "rsa-3072+", "ecdsa-p256", "*.example.com", "a b",
    "serverAuth", "local_ca", "a@b.c", "x" * 300, [], ["x"], ["a", "a"], [1, 2], [{}],
    {}, {"env": "X"}, {"file": "f", "env": "y"}, {"type": "ecdsa", "curve": "P-384"},
    {"type": "rsa", "size": 3072}, {"unknown": 1},
]  # fmt: skip

VALID_ENTRIES: dict[str, Any] = {
    "certificates": {
        "common_name": "www.example.com",
        "sans": ["example.com"],
        "issuer": "ca",
        "profile": "tls",
        "key": {"type": "ecdsa", "curve": "P-256", "rotation": "always"},
        "ttl": "30d",
        "renew_before": "33%",
        "targets": ["files"],
        "tags": ["a"],
        "revoke_on_remove": True,
    },
    "issuers": {"type": "local_ca", "description": "x", "root": {"common_name": "R"}},
    "profiles": {"ekus": ["serverAuth"], "max_ttl": "90d", "allowed_keys": ["rsa-3072+"]},
    "policies": {"san_allow": ["*.example.com"], "san_regex": ["[a-z.]+"], "max_ttl": 86400},
    "hosts": {"address": "10.0.0.1", "vars": {"port": 22}},
    "groups": {"hosts": ["a"], "children": ["b"], "vars": {"x": 1}},
    "targets": {"type": "file", "hosts": "web", "root": "out"},
    "owners": {"email": "a@example.com", "team": "sre", "notify": ["slack"]},
    "teams": {"email": "t@example.com", "members": ["a@example.com"]},
    "notifiers": {"type": "slack", "events": ["failed"], "webhook_url": {"env": "X"}},
}


def mutations(value: Any, rng: random.Random, depth: int = 0) -> Iterator[Any]:
    """The value itself, and variants with one key/item replaced, added or removed."""
    yield value
    if isinstance(value, Mapping):
        for key in value:
            rest = {k: v for k, v in value.items() if k != key}
            yield rest
            for sample in rng.sample(SAMPLES, 8):
                yield {**value, key: sample}
            if depth < 2:
                for inner in mutations(value[key], rng, depth + 1):
                    yield {**value, key: inner}
        yield {**value, "extra_key": 1}
    elif isinstance(value, list):
        yield [*value, rng.choice(SAMPLES)]
        yield value[1:]


def assert_agrees(validator: S.SchemaValidator, instances: list[Any]) -> None:
    reference = jsonschema.Draft202012Validator(validator.schema)
    for instance in instances:
        expected = reference.is_valid(instance)
        assert validator.is_valid(instance) == expected, json.dumps(instance, default=str)
        violations = validator.validate(instance)
        assert bool(violations) != expected, (instance, violations)


@pytest.mark.parametrize("kind", sorted(VALID_ENTRIES))
def test_fast_path_agrees_with_jsonschema_on_inventory_kinds(kind: str) -> None:
    spec = S.inventory_schema().kinds[kind]
    assert spec.entry is not None and spec.entry.compiled
    rng = random.Random(kind)
    instances = list(mutations(VALID_ENTRIES[kind], rng))
    assert len(instances) > 15
    assert_agrees(spec.entry, instances)
    assert_agrees(spec.shallow, [{"ok": {}}, {"bad name": {}}, [], None, {"a" * 200: 1}])


def test_fast_path_agrees_on_top_level_and_non_collections() -> None:
    schema = S.inventory_schema()
    assert_agrees(schema.top, [{}, {"vars": 1}, {"certificate": {}}, [], {"teams": None}])
    rng = random.Random(1)
    defaults = {"issuer": "ca", "key": {"type": "rsa"}, "ttl": "1y", "targets": ["a"]}
    assert_agrees(schema.kinds["defaults"].shallow, list(mutations(defaults, rng)))
    variables = {"domain": "x", "nested": {"a": [1]}}
    assert_agrees(schema.kinds["vars"].shallow, [*mutations(variables, rng), {"cert": 1}])


def test_fast_path_agrees_on_connector_schemas() -> None:
    registry = standin_registry()
    try:
        from certctl.connectors import Registry

        builtin = Registry().load_builtin()
        classes = [*builtin.targets.values(), *builtin.issuers.values()]
    except Exception:  # the built-in connectors are written in parallel
        classes = []
    classes += [*registry.targets.values(), *registry.issuers.values()]
    rng = random.Random(2)
    base = {"root": "out", "cert_path": "a.pem", "url": "https://x", "token": {"env": "T"}}
    for cls in classes:
        validator = S.SchemaValidator(dict(cls.config_schema))
        assert_agrees(validator, list(mutations(base, rng)))


SYNTHETIC: dict[str, Any] = {
    "type": "object",
    "required": ["kind"],
    "properties": {
        "kind": {"enum": ["a", "b", 1, None]},
        "const": {"const": [1, {"x": True}]},
        "num": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
        "int": {"type": "integer", "maximum": 5, "exclusiveMinimum": -5},
        "str": {"type": "string", "minLength": 2, "maxLength": 4, "pattern": "^[a-z]"},
        "tuple": {"prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        "list": {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "minItems": 1,
                 "maxItems": 3, "uniqueItems": True},
        "one": {"oneOf": [{"type": "integer"}, {"minimum": 2}]},
        "any": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
        "all": {"allOf": [{"type": "integer"}, {"not": {"const": 3}}]},
        "cond": {"if": {"type": "string"}, "then": {"maxLength": 1}, "else": {"type": "null"}},
        "tree": {"$ref": "#/$defs/tree"},
    },
    "patternProperties": {"^x-": {"type": "string"}},
    "additionalProperties": {"type": "boolean"},
    "propertyNames": {"maxLength": 8},
    "minProperties": 1,
    "maxProperties": 6,
    "dependentRequired": {"num": ["int"]},
    "$defs": {
        "leaf": {"type": ["string", "integer", "object"]},
        "tree": {"type": "object", "properties": {"kids": {"items": {"$ref": "#/$defs/tree"}}}},
    },
}  # fmt: skip


def random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.6:
        return rng.choice([*SAMPLES, "ab", "abc", "Ab", 3, -5, 9.99, 10, "a", {"x": True}])
    if roll < 0.8:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ["kind", "num", "int", "str", "list", "kids", "x-a", "other", "const", "tree"]
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_compiler_agrees_with_jsonschema_on_every_keyword_it_implements() -> None:
    validator = S.SchemaValidator(SYNTHETIC)
    assert validator.compiled
    rng = random.Random(3)
    instances: list[Any] = []
    keys = [*list(SYNTHETIC["properties"]), "x-y", "extra", "longer-than-8"]
    for _ in range(3000):
        instance = {k: random_value(rng) for k in rng.sample(keys, rng.randint(0, 5))}
        if rng.random() < 0.7:
            instance["kind"] = rng.choice(["a", "b", 1, None, "c", True])
        instances.append(instance)
    instances += [random_value(rng) for _ in range(300)]
    assert_agrees(validator, instances)
    both = sum(jsonschema.Draft202012Validator(SYNTHETIC).is_valid(i) for i in instances)
    assert 100 < both < len(instances) - 100  # the corpus exercises both outcomes


def test_unsupported_keywords_fall_back_to_jsonschema() -> None:
    validator = S.SchemaValidator({"type": "array", "contains": {"const": 2}})
    assert not validator.compiled
    assert validator.is_valid([1, 2]) and not validator.is_valid([1])
    assert S.SchemaValidator({"multipleOf": 2, "type": "integer"}).is_valid(4)


def test_messages_never_echo_huge_values() -> None:
    huge = "x" * 10_000_000
    schema = S.inventory_schema().kinds["certificates"].entry
    assert schema is not None
    bad = {"common_name": huge, "sans": huge, huge: 1, "ttl": huge, "key": {"type": huge}}
    messages = [v.message for v in schema.validate(bad)]
    assert messages and all(len(m) < 600 for m in messages)


def test_unknown_key_message_suggests_and_lists() -> None:
    schema = S.inventory_schema().kinds["certificates"].entry
    assert schema is not None
    (violation,) = schema.validate({"common_name": "a", "sanz": []})
    assert violation.path == ("sanz",) and violation.at_key
    assert violation.message.startswith("unknown key 'sanz' (did you mean 'sans'?) (expected")


def _object_schemas(node: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    if isinstance(node, Mapping):
        types = node.get("type")
        if "properties" in node and (types == "object" or "object" in (types or [])):
            yield path, node
        for key, value in node.items():
            yield from _object_schemas(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _object_schemas(value, f"{path}/{i}")


def test_schema_document_is_strict_except_where_documented() -> None:
    document = S.load_schema_document()
    jsonschema.Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    open_ones = {"#/$defs/issuer", "#/$defs/target", "#/$defs/notifier"}  # connector config
    for path, node in _object_schemas(document, "#"):
        if path in open_ones:
            assert "additionalProperties" not in node, path
        else:
            assert node.get("additionalProperties") is False, path
    kinds = {"vars", "defaults", "issuers", "profiles", "policies", "hosts", "groups",
             "targets", "certificates", "owners", "teams", "notifiers",
             "endpoints"}  # fmt: skip
    assert set(document["properties"]) == kinds
    assert set(S.inventory_schema().kinds) == kinds

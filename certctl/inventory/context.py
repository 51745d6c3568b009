"""What the loader's build steps share: found entries, problems, and small helpers.

One :class:`LoadContext` exists per :func:`certctl.inventory.load_inventory` call;
nothing is kept between loads (the registry and paths come in as arguments).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jsonschema

from certctl.connectors import Registry
from certctl.inventory.problems import Entry, Problems, Site
from certctl.inventory.schema import InventorySchema, SchemaValidator, did_you_mean
from certctl.inventory.templating import Renderer, TemplateProblem
from certctl.inventory.yamlload import YMap, YSeq, quote
from certctl.model import Secret

C = TypeVar("C", bound=type)


@dataclass
class Scalar:
    """A ``vars`` or ``defaults`` key as found in one file."""

    value: Any
    site: Site


@dataclass
class LoadContext:
    """State of one load: inputs, the entries found per kind, and the problems so far."""

    root: Path
    registry: Registry
    schema: InventorySchema
    problems: Problems = field(default_factory=Problems)
    renderer: Renderer = field(default_factory=Renderer)
    #: kind -> name -> entry, in load order (file order, then order in the file)
    entries: dict[str, dict[str, Entry]] = field(default_factory=dict)
    vars: dict[str, Scalar] = field(default_factory=dict)
    defaults: dict[str, Scalar] = field(default_factory=dict)
    _connector_validators: dict[type, SchemaValidator | str] = field(default_factory=dict)

    # ------------------------------------------------------------------ lookups
    def kind(self, kind: str) -> dict[str, Entry]:
        return self.entries.setdefault(kind, {})

    def good(self, kind: str) -> Iterable[Entry]:
        return (e for e in self.kind(kind).values() if e.ok)

    def plain_vars(self) -> dict[str, Any]:
        return {k: plain(v.value) for k, v in self.vars.items()}

    def check_ref(self, site: Site, kind: str, name: Any, what: str | None = None) -> bool:
        """Report ``name`` unless it is defined under ``kind``; True when it is."""
        defined = self.kind(kind)
        if name in defined:
            return True
        what = what or kind[:-1]
        if defined:
            known = sorted(defined)
            listing = ", ".join(known[:10]) + (", ..." if len(known) > 10 else "")
            hint = did_you_mean(str(name), known) or f" (defined {kind}: {listing})"
        else:
            hint = f" (no {kind} are defined)"
        self.problems.at(site, f"unknown {what} {quote(name)}{hint}")
        return False

    # ---------------------------------------------------------------- connectors
    def connector_validator(self, cls: type) -> SchemaValidator | str:
        """The validator for a connector's ``config_schema`` (or why there is none)."""
        found = self._connector_validators.get(cls)
        if found is None:
            schema = getattr(cls, "config_schema", {"type": "object"})
            try:
                found = SchemaValidator(dict(schema) if isinstance(schema, Mapping) else schema)
            except jsonschema.SchemaError as exc:
                found = (
                    f"the {quote(getattr(cls, 'type_name', cls.__name__))} connector's "
                    f"config_schema is not a valid JSON Schema: {quote(exc.message, 200)}"
                )
            self._connector_validators[cls] = found
        return found

    def connector_config(
        self, entry: Entry, role: str, connectors: Mapping[str, C]
    ) -> tuple[C | None, dict[str, Any] | None]:
        """Check an issuer/target/notifier entry's ``type`` and its connector config.

        Returns the connector class and the config (the entry without the keys the
        inventory schema itself defines), or ``None`` for either when invalid.
        """
        value: YMap = entry.value
        type_name = value["type"]
        cls = connectors.get(type_name)
        if cls is None:
            known = sorted(connectors)
            if known:
                hint = did_you_mean(type_name, known) + f" (known types: {', '.join(known)})"
            else:
                hint = f" (no {role} connectors are installed)"
            self.problems.at(
                entry.site.sub("type"), f"unknown {role} type {quote(type_name)}{hint}"
            )
            return None, None
        common = self.schema.kinds[entry.kind].entry_keys
        config = {k: v for k, v in value.items() if k not in common}
        validator = self.connector_validator(cls)
        if isinstance(validator, str):
            self.problems.at(entry.site, validator)
            return cls, None
        violations = validator.validate(config)
        for v in violations:
            self.problems.at(entry.site.sub(*v.path), v.message, at_key=v.at_key)
        return cls, (None if violations else config)

    # ----------------------------------------------------------------- templates
    def render_tree(
        self, value: Any, context: Mapping[str, Any], site: Site, suffix: str = ""
    ) -> tuple[Any, bool]:
        """Render every template string inside ``value``; ``(result, ok)``.

        Mappings and lists are rebuilt, :class:`Secret` objects and non-strings are
        kept as they are. Each failing template is reported at its own location, its
        message followed by ``suffix``.
        """
        if isinstance(value, str):
            if "{" not in value:
                return value, True
            try:
                return self.renderer.render(value, context), True
            except TemplateProblem as exc:
                self.problems.at(site, f"{exc}{suffix}")
                return value, False
        if isinstance(value, dict):
            ok = True
            out: dict[str, Any] = {}
            for k, v in value.items():
                out[k], good = self.render_tree(v, context, site.sub(k), suffix)
                ok = ok and good
            return out, ok
        if isinstance(value, list):
            ok = True
            items: list[Any] = []
            for i, v in enumerate(value):
                rendered, good = self.render_tree(v, context, site.sub(i), suffix)
                items.append(rendered)
                ok = ok and good
            return items, ok
        return value, True

    def secrets(self, value: Any) -> Any:
        """Plain copy of a config in which ``{env: NAME}`` / ``{file: PATH}`` are Secrets.

        Secrets are references: nothing is read here. ``file`` paths are relative to
        the inventory directory.
        """
        if isinstance(value, dict):
            if len(value) == 1:
                ((k, v),) = value.items()
                if k == "env" and isinstance(v, str):
                    return Secret("env", v)
                if k == "file" and isinstance(v, str):
                    return Secret("file", v, base_dir=self.root)
            return {k: self.secrets(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.secrets(v) for v in value]
        return value


def plain(value: Any) -> Any:
    """A copy of a located value as plain dicts and lists (no loader metadata)."""
    if isinstance(value, (YMap, dict)):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (YSeq, list)):
        return [plain(v) for v in value]
    return value

"""Loading a playbook: YAML with line numbers, JSON Schema, variables, templates.

A playbook file is read with the inventory's line-tracking loader
(:mod:`certctl.inventory.yamlload`), its variables are merged (``vars:`` overridden by
``-e key=value``), every string of its steps is rendered in the inventory's sandboxed
Jinja2 environment (:mod:`certctl.inventory.templating`), and the rendered document
is validated against ``schemas/playbook.schema.json`` with the inventory's schema
machinery (:mod:`certctl.inventory.schema`), then checked field by field (durations,
batch sizes, dates, which keys each action takes). Every mistake becomes a
:class:`~certctl.errors.Problem` naming file, line, column and field; all of them are
raised together as one :class:`~certctl.errors.InventoryError` before anything runs.

:meth:`Playbook.check_inventory` then checks the names a playbook refers to (issuers,
profiles, owners, teams, targets, hosts, notifiers) against the loaded inventory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from certctl.errors import CertctlError, InventoryError, Problem
from certctl.inventory import schema as schema_mod
from certctl.inventory.templating import Renderer, TemplateProblem, is_template
from certctl.inventory.values import format_duration, parse_duration
from certctl.inventory.yamlload import Path as YPath
from certctl.inventory.yamlload import (
    YMap,
    YSeq,
    format_path,
    locate,
    new_map,
    parse_yaml,
    quote,
)
from certctl.model import NO_LOCATION, Inventory, Location

SCHEMA_FILE = "playbook.schema.json"
NOT_A_MAPPING = "a playbook must be a mapping with name, description, vars and steps"
MAX_PLAYBOOK_BYTES = 1024 * 1024
ACTIONS = ("renew", "rotate_keys", "redeploy", "revoke", "verify", "notify", "pause")
#: Actions that change certificates or targets: they need an explicit ``select``.
CHANGING = frozenset({"renew", "rotate_keys", "redeploy", "revoke"})
#: Step keys each action takes besides ``name``, ``action``.
ALLOWED: Mapping[str, frozenset[str]] = {
    "renew": frozenset({"select", "serial", "max_fail_percentage", "verify", "timeout"}),
    "rotate_keys": frozenset({"select", "serial", "max_fail_percentage", "verify", "timeout"}),
    "redeploy": frozenset({"select", "serial", "max_fail_percentage", "verify", "timeout"}),
    "revoke": frozenset(
        {"select", "serial", "max_fail_percentage", "verify", "timeout", "reason", "replace"}
    ),
    "verify": frozenset({"select", "serial", "max_fail_percentage", "timeout", "ignore_errors"}),
    "notify": frozenset({"select", "notifier", "message", "ignore_errors"}),
    "pause": frozenset({"prompt"}),
}
REQUIRED: Mapping[str, tuple[str, ...]] = {
    "renew": ("select",),
    "rotate_keys": ("select",),
    "redeploy": ("select",),
    "revoke": ("select", "reason"),
    "notify": ("notifier", "message"),
}
KEY_ALGORITHMS = frozenset(
    {"ecdsa", "rsa", "ed25519", "ecdsa-p256", "ecdsa-p384", "rsa-2048", "rsa-3072", "rsa-4096"}
)
#: Variable names whose values are recorded as "<redacted>" in the run's audit detail.
SECRET_VAR = re.compile(r"pass|secret|token|credential|api_?key|private", re.IGNORECASE)
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SINGLE_EXPR = re.compile(r"^\{\{[^{}]*\}\}$")
_INT = re.compile(r"^-?[0-9]+$")
_FLOAT = re.compile(r"^-?[0-9]+\.[0-9]+$")


@dataclass(frozen=True)
class Selector:
    """Which certificates a step acts on; every selector given must match (a list of
    values matches any one of them). See :mod:`certctl.playbook.select`."""

    names: tuple[str, ...] = ()  # globs on the certificate name
    issuer: tuple[str, ...] = ()  # the issuer of the current version (else the inventory's)
    issuer_changed: bool | None = None  # inventory issuer != issuer of the current version
    profile: tuple[str, ...] = ()
    owner: tuple[str, ...] = ()
    team: tuple[str, ...] = ()
    tag: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    target: tuple[str, ...] = ()
    expiring_within_s: int | None = None
    issued_before: datetime | None = None
    key_algorithm: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = []
        for key, value in (
            ("name", self.names),
            ("issuer", self.issuer),
            ("profile", self.profile),
            ("owner", self.owner),
            ("team", self.team),
            ("tag", self.tag),
            ("host", self.host),
            ("target", self.target),
            ("key_algorithm", self.key_algorithm),
        ):
            if value:
                parts.append(f"{key}={','.join(value)}")
        if self.issuer_changed is not None:
            parts.append(f"issuer_changed={str(self.issuer_changed).lower()}")
        if self.expiring_within_s is not None:
            parts.append(f"expiring_within={format_duration(self.expiring_within_s)}")
        if self.issued_before is not None:
            parts.append(f"issued_before={self.issued_before.isoformat()}")
        return " ".join(parts) or "everything"


@dataclass(frozen=True)
class BatchSize:
    count: int | None = None
    percent: int | None = None

    def size(self, total: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return max(1, total * self.percent // 100)

    def __str__(self) -> str:
        return f"{self.percent}%" if self.percent is not None else str(self.count)


def batch_sizes(serial: Sequence[BatchSize], total: int) -> list[int]:
    """Ansible's ``serial``: sizes in turn, the last one repeating, until ``total`` is
    covered (the last batch may be smaller). No ``serial``: one batch of everything."""
    if total <= 0:
        return []
    if not serial:
        return [total]
    out: list[int] = []
    done = 0
    i = 0
    while done < total:
        size = min(serial[min(i, len(serial) - 1)].size(total), total - done)
        out.append(size)
        done += size
        i += 1
    return out


@dataclass(frozen=True)
class Step:
    index: int  # 1-based
    name: str
    action: str
    select: Selector | None = None
    serial: tuple[BatchSize, ...] = ()
    max_fail_percentage: float = 0.0
    verify: bool = False
    reason: str = "unspecified"
    replace: bool = False
    notifier: str | None = None
    message: str = ""
    prompt: str = "Continue?"
    ignore_errors: bool = False
    timeout: float = 5.0
    location: Location = NO_LOCATION
    #: Where each field (and ``select.KEY``) was written, for later problems.
    locations: Mapping[str, Location] = field(default_factory=dict, compare=False)

    def where(self, key: str) -> Location:
        return self.locations.get(key, self.location)

    @property
    def label(self) -> str:
        return f"step {self.index} ({self.name})"


@dataclass(frozen=True)
class Playbook:
    name: str
    description: str
    path: str  # as given (or the bundled playbook's name)
    source: str  # file path for messages
    sha256: str
    vars: Mapping[str, Any]  # effective: vars: overridden by -e
    steps: tuple[Step, ...]

    def redacted_vars(self) -> dict[str, Any]:
        return {k: ("<redacted>" if SECRET_VAR.search(k) else v) for k, v in self.vars.items()}

    def check_inventory(self, inv: Inventory) -> None:
        """Names the steps refer to must exist in the inventory (InventoryError)."""
        problems: list[Problem] = []

        def bad(loc: Location, path: str, message: str) -> None:
            problems.append(Problem(message, loc.file, loc.line, loc.column, path))

        teams = {str(o.get("team")) for o in inv.owners.values() if o.get("team")}
        teams |= set(inv.teams)
        hosts = set(inv.hosts)
        known: dict[str, tuple[str, set[str]]] = {
            "issuer": ("issuer", set(inv.issuers)),
            "profile": ("profile", set(inv.profiles)),
            "owner": ("owner", set(inv.owners)),
            "team": ("team", teams),
            "target": ("target", set(inv.targets)),
            "host": ("host", hosts),
        }
        for step in self.steps:
            base = f"steps[{step.index - 1}]"
            sel = step.select
            if sel is not None:
                for key, (what, names) in known.items():
                    for value in getattr(sel, key):
                        if value not in names:
                            hint = schema_mod.did_you_mean(value, names)
                            bad(
                                step.where(f"select.{key}"),
                                f"{base}.select.{key}",
                                f"no {what} {quote(value)} in the inventory{hint}",
                            )
            if step.notifier is not None and step.notifier not in inv.notifiers:
                hint = schema_mod.did_you_mean(step.notifier, inv.notifiers)
                bad(
                    step.where("notifier"),
                    f"{base}.notifier",
                    f"no notifier {quote(step.notifier)} in the inventory{hint}",
                )
        if problems:
            raise InventoryError(problems)


# ---------------------------------------------------------------------------
# Finding playbook files


def bundled_dir() -> Any:
    """The bundled playbooks (package ``certctl_playbooks``, the ``playbooks/`` folder)."""
    return files("certctl_playbooks")


def bundled() -> dict[str, str]:
    """Bundled playbook name -> its description."""
    out: dict[str, str] = {}
    for entry in sorted(bundled_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".yaml"):
            continue
        name = entry.name[: -len(".yaml")]
        try:
            doc = yaml.safe_load(entry.read_text("utf-8"))
        except yaml.YAMLError:
            doc = None
        desc = doc.get("description", "") if isinstance(doc, dict) else ""
        out[name] = str(desc or "")
    return out


def resolve(name_or_path: str) -> tuple[str, bytes]:
    """(display name, bytes) of a playbook file, or of the bundled playbook so named."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        try:
            raw = p.read_bytes() if p.stat().st_size <= MAX_PLAYBOOK_BYTES else None
        except OSError as exc:
            raise CertctlError(f"cannot read {name_or_path}: {exc.strerror}") from None
        if raw is None:
            raise CertctlError(f"{name_or_path}: too large for a playbook")
        return str(p), raw
    if p.exists():
        raise CertctlError(f"{name_or_path}: not a file")
    stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    if "/" not in stem and stem in bundled():
        entry = bundled_dir() / f"{stem}.yaml"
        return f"{stem} (bundled)", entry.read_bytes()
    raise CertctlError(
        f"no playbook file {name_or_path!r} and no bundled playbook of that name "
        "(list them with: certctl run --list)"
    )


# ---------------------------------------------------------------------------
# Variables


def parse_extra_vars(items: Sequence[str]) -> dict[str, Any]:
    """``-e key=value`` (repeatable): ``30`` is a number, ``2.5`` too, ``true``/``false``
    a boolean; anything else (``012``, ``yes``, ``web-*``) stays text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not _VAR_NAME.match(key):
            raise CertctlError(
                f"bad -e {item.split('=', 1)[0]!r}...: use -e NAME=VALUE with NAME of letters, "
                "digits and '_'"
            )
        value: Any = text
        if re.fullmatch(r"-?(0|[1-9][0-9]{0,17})", text):
            value = int(text)
        elif _FLOAT.match(text):
            value = float(text)
        elif text.lower() in ("true", "false"):
            value = text.lower() == "true"
        out[key] = value
    return out


# ---------------------------------------------------------------------------
# Loading


@cache
def _validator() -> schema_mod.SchemaValidator:
    return schema_mod.SchemaValidator(schema_mod.load_schema_document(SCHEMA_FILE))


def load(
    name_or_path: str, extra_vars: Mapping[str, Any] | None = None, *, raw: bytes | None = None
) -> Playbook:
    """Read, render and validate a playbook; InventoryError lists every problem."""
    if raw is None:
        source, raw = resolve(name_or_path)
    else:
        source = name_or_path
    doc, problems = parse_yaml(raw, source)
    if doc is None or problems:
        raise InventoryError(
            [
                dataclasses.replace(p, message=NOT_A_MAPPING)
                if p.message.startswith("an inventory file must be a mapping")
                else p
                for p in problems
            ]
            or [Problem("cannot read the playbook", source)]
        )
    root = doc.doc
    out: list[Problem] = []

    def problem(path: YPath, message: str, *, at_key: bool = False) -> None:
        line, column = locate(root, path, at_key=at_key)
        out.append(Problem(message, source, line, column, format_path(path) or None))

    # vars: validated on their own first, so templates get a usable context.
    vars_doc = root.get("vars")
    variables: dict[str, Any] = {}
    if isinstance(vars_doc, dict):
        for key, value in vars_doc.items():
            if isinstance(value, (str, int, float, bool)) or value is None:
                variables[str(key)] = value
    variables.update(extra_vars or {})

    renderer = Renderer()
    context = {**variables}
    rendered = new_map(root.file, root.pos)
    rendered.locs = dict(root.locs)
    for key, value in root.items():
        if key == "steps":
            rendered[key] = _render(value, renderer, context, (key,), problem)
        else:
            rendered[key] = value
    if out:
        raise InventoryError(out)
    broken: set[Any] = set()  # steps the schema refused: not checked further
    for v in _validator().validate(rendered):
        problem(v.path, v.message, at_key=v.at_key)
        broken.add(v.path[1] if len(v.path) > 1 and v.path[0] == "steps" else "*")
    raw_steps = rendered.get("steps")
    steps: tuple[Step, ...] = ()
    if isinstance(raw_steps, list) and "*" not in broken:
        steps = tuple(
            _step(i, s, root, source, problem, schema_ok=i - 1 not in broken)
            for i, s in enumerate(raw_steps, start=1)
        )
    if out:
        out.sort(key=lambda p: (p.line or 0, p.column or 0))
        raise InventoryError(out)
    return Playbook(
        name=str(rendered["name"]),
        description=str(rendered.get("description") or "").strip(),
        path=name_or_path,
        source=source,
        sha256=hashlib.sha256(raw).hexdigest(),
        vars=variables,
        steps=steps,
    )


def _render(
    value: Any, renderer: Renderer, context: Mapping[str, Any], path: YPath, problem: Any
) -> Any:
    """A copy of ``value`` with every template string rendered; containers keep their
    positions. A string that is one ``{{ expression }}`` rendering to a number or a
    boolean becomes that number or boolean (``serial: "{{ batch }}"``)."""
    if isinstance(value, str):
        if not is_template(value):
            return value
        try:
            text = renderer.render(value, context)
        except TemplateProblem as exc:
            msg = str(exc)
            if "is undefined" in msg:
                msg += " (set it under vars: or pass -e NAME=VALUE)"
            problem(path, msg)
            return value
        if _SINGLE_EXPR.match(value.strip()):
            if _INT.match(text):
                return int(text)
            if _FLOAT.match(text):
                return float(text)
            if text in ("True", "true", "False", "false"):
                return text.lower() == "true"
        return text
    if isinstance(value, YMap):
        m = new_map(value.file, value.pos)
        m.locs = dict(value.locs)
        for k, v in value.items():
            m[k] = _render(v, renderer, context, (*path, k), problem)
        return m
    if isinstance(value, YSeq):
        s = YSeq(_render(v, renderer, context, (*path, i), problem) for i, v in enumerate(value))
        s.file, s.pos, s.locs = value.file, value.pos, list(value.locs)
        return s
    return value


def _tuple(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def _step(
    index: int, raw: YMap, root: YMap, source: str, problem: Any, *, schema_ok: bool = True
) -> Step:
    """The step's own checks; after a schema violation only those that cannot trip
    over a value of the wrong type (batch sizes) run, and the step is not used."""
    base: YPath = ("steps", index - 1)
    if not schema_ok:
        given = raw.get("serial") if isinstance(raw, dict) else None
        for i, item in enumerate(given if isinstance(given, list) else [given]):
            if isinstance(item, (int, str)) and re.fullmatch(r"[0-9]+%?", str(item)):
                at: YPath = (*base, "serial", i) if isinstance(given, list) else (*base, "serial")
                size = _batch_size(item)
                if isinstance(size, str):
                    problem(at, size)
        return Step(index, "", "pause")
    action = str(raw["action"])

    def loc(*rel: str | int, at_key: bool = False) -> Location:
        line, column = locate(root, (*base, *rel), at_key=at_key)
        return Location(source, line, column)

    allowed = ALLOWED[action]
    for key in raw:
        if key not in ("name", "action") and key not in allowed:
            takes = ", ".join(sorted(allowed)) or "nothing else"
            problem(
                (*base, key),
                f"{key!r} does not apply to action {action!r} (it takes: {takes})",
                at_key=True,
            )
    for key in REQUIRED.get(action, ()):
        if key not in raw:
            problem(base, f"action {action!r} needs {key!r}")
    locations: dict[str, Location] = {k: loc(k) for k in raw}
    selector = None
    sel = raw.get("select")
    if isinstance(sel, dict):
        for k in sel:
            locations[f"select.{k}"] = loc("select", k)
        selector = _selector(sel, (*base, "select"), problem)
        if action in CHANGING and not sel:
            problem(
                (*base, "select"),
                "select needs at least one selector (use name: '*' for every certificate)",
            )
    serial: list[BatchSize] = []
    if "serial" in raw:
        items = raw["serial"] if isinstance(raw["serial"], list) else [raw["serial"]]
        for i, item in enumerate(items):
            where: YPath = (
                (*base, "serial", i) if isinstance(raw["serial"], list) else (*base, "serial")
            )
            size = _batch_size(item)
            if isinstance(size, str):
                problem(where, size)
            else:
                serial.append(size)
    if raw.get("verify") and action == "revoke" and not raw.get("replace"):
        problem(
            (*base, "verify"), "verify after a revoke needs replace: true (nothing is deployed)"
        )
    return Step(
        index=index,
        name=str(raw["name"]),
        action=action,
        select=selector,
        serial=tuple(serial),
        max_fail_percentage=float(raw.get("max_fail_percentage", 0)),
        verify=bool(raw.get("verify", False)),
        reason=str(raw.get("reason", "unspecified")),
        replace=bool(raw.get("replace", False)),
        notifier=str(raw["notifier"]) if "notifier" in raw else None,
        message=str(raw.get("message", "")),
        prompt=str(raw.get("prompt", "Continue?")),
        ignore_errors=bool(raw.get("ignore_errors", False)),
        timeout=float(raw.get("timeout", 5.0)),
        location=loc(at_key=False),
        locations=locations,
    )


def _batch_size(item: Any) -> BatchSize | str:
    if isinstance(item, int) and not isinstance(item, bool):
        return (
            BatchSize(count=item) if item >= 1 else f"a batch size must be at least 1, got {item}"
        )
    text = str(item)
    if text.endswith("%"):
        pct = int(text[:-1])
        if not 1 <= pct <= 100:
            return f"a batch percentage must be between 1% and 100%, got {quote(text)}"
        return BatchSize(percent=pct)
    count = int(text)
    if count < 1:
        return f"a batch size must be at least 1, got {quote(text)}"
    return BatchSize(count=count)


def _selector(sel: Mapping[str, Any], path: YPath, problem: Any) -> Selector:
    expiring = None
    if "expiring_within" in sel:
        expiring, why = parse_duration(sel["expiring_within"])
        if why:
            problem((*path, "expiring_within"), why)
    before = None
    if "issued_before" in sel:
        text = str(sel["issued_before"])
        try:
            before = datetime.fromisoformat(text)
        except ValueError:
            problem(
                (*path, "issued_before"),
                f"expected a date or date-time such as 2026-01-31 or 2026-01-31T12:00:00Z, "
                f"got {quote(text)}",
            )
        else:
            if before.tzinfo is None:
                before = before.replace(tzinfo=UTC)
    algos = _tuple(sel.get("key_algorithm"))
    for i, a in enumerate(algos):
        if a not in KEY_ALGORITHMS:
            where = (
                (*path, "key_algorithm", i)
                if isinstance(sel.get("key_algorithm"), list)
                else (*path, "key_algorithm")
            )
            problem(
                where,
                f"unknown key algorithm {quote(a)} (expected one of: "
                f"{', '.join(sorted(KEY_ALGORITHMS))})",
            )
    return Selector(
        names=_tuple(sel.get("name")),
        issuer=_tuple(sel.get("issuer")),
        issuer_changed=sel.get("issuer_changed"),
        profile=_tuple(sel.get("profile")),
        owner=_tuple(sel.get("owner")),
        team=_tuple(sel.get("team")),
        tag=_tuple(sel.get("tag")),
        host=_tuple(sel.get("host")),
        target=_tuple(sel.get("target")),
        expiring_within_s=expiring,
        issued_before=before,
        key_algorithm=algos,
    )

"""Loading an inventory: files -> located YAML -> schema -> model objects.

Phases (each records every problem it finds; see :mod:`.problems`):

1. **Files.** A path is one YAML file or a directory whose ``*.yaml``/``*.yml``
   files (not hidden ones, not in subdirectories -- so ``.certctl/`` state,
   ``connectors/`` and deployed output never load) are read in name order. The
   inventory digest covers each file's name and bytes in that order. YAML errors
   (syntax, duplicate keys, unsafe tags, alias bombs) stop the load after this phase:
   nothing after it could be trusted.
2. **Schema.** Each file's top level, each kind, and each entry is validated against
   ``schemas/inventory.schema.json`` (fast path: :mod:`.schema`). Names must be
   unique across files; ``vars`` and ``defaults`` merge key by key across files, a
   key defined twice being an error.
3. **Build.** Issuers and targets are checked against their connector (type known,
   config valid for its ``config_schema``); references, profiles, policies, names
   and templates are checked while model objects are built (:mod:`.kinds`,
   :mod:`.certificates`).

If anything was found, one :class:`~certctl.errors.InventoryError` lists it all.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from certctl.connectors import Registry
from certctl.errors import InventoryError
from certctl.inventory import certificates, kinds
from certctl.inventory.context import LoadContext, Scalar
from certctl.inventory.problems import Entry, Site
from certctl.inventory.schema import inventory_schema
from certctl.inventory.yamlload import YamlFile, gc_paused, read_yaml
from certctl.model import Inventory

SUFFIXES = (".yaml", ".yml")


def load_inventory(path: Path, registry: Registry) -> Inventory:
    """Load, validate and bind the inventory at ``path`` (a YAML file or a directory).

    Raises :class:`~certctl.errors.InventoryError` listing every problem found.
    Secret references are kept as :class:`~certctl.model.Secret`, never resolved.
    """
    path = Path(path)
    with gc_paused():
        return _load(path, registry)


def inventory_files(path: Path) -> list[Path]:
    """The files an inventory at ``path`` consists of, in load order."""
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.iterdir()
                if p.suffix in SUFFIXES and not p.name.startswith(".") and p.is_file()
            ),
            key=lambda p: p.name,
        )
        if not files:
            raise InventoryError(
                f"{display_name(path)}: no inventory files (*.yaml, *.yml) in this directory"
            )
        return files
    if path.is_file():
        return [path]
    raise InventoryError(f"{display_name(path)}: no such file or directory")


def display_name(path: Path) -> str:
    """How messages name a file: relative to the working directory when below it."""
    text = os.fspath(path)
    if os.path.isabs(text):
        try:
            rel = os.path.relpath(text)
        except ValueError:  # pragma: no cover - another drive on Windows
            return text
        if not rel.startswith(".."):
            return rel
    return text


def _load(path: Path, registry: Registry) -> Inventory:
    root = path if path.is_dir() else path.parent
    ctx = LoadContext(root, registry, inventory_schema())
    digest = hashlib.sha256()
    parsed: list[YamlFile] = []
    names: list[str] = []
    broken = False
    for index, file in enumerate(inventory_files(path)):
        name = display_name(file)
        names.append(name)
        ctx.problems.file_order[name] = index
        loaded, problems = read_yaml(file, name)
        for problem in problems:
            ctx.problems.add(problem)
        if loaded is None or loaded.broken:
            broken = True
            continue
        rel_name = file.name.encode("utf-8", "surrogateescape")
        digest.update(len(rel_name).to_bytes(4, "big") + rel_name)
        digest.update(len(loaded.raw).to_bytes(8, "big") + loaded.raw)
        parsed.append(loaded)
    if broken:
        ctx.problems.raise_if_any()

    for loaded in parsed:
        _collect(ctx, loaded)

    issuers = kinds.build_issuers(ctx)
    profiles = kinds.build_profiles(ctx)
    policies = kinds.build_policies(ctx)
    teams = kinds.build_teams(ctx)
    notifiers = kinds.build_notifiers(ctx)
    owners = kinds.build_owners(ctx)
    hosts = kinds.build_hosts(ctx)
    topology = kinds.build_groups(ctx, hosts)
    targets = kinds.build_targets(ctx, hosts, topology)
    certs = certificates.build_certificates(ctx, profiles, policies, targets, hosts, topology)
    endpoints = kinds.build_endpoints(ctx)
    ctx.problems.raise_if_any()
    return Inventory(
        root=root,
        certificates=certs,
        issuers=issuers,
        profiles=profiles,
        policies=policies,
        hosts=hosts,
        groups=topology.groups,
        targets={name: spec.definition for name, spec in targets.items()},
        owners=owners,
        notifiers=notifiers,
        endpoints=endpoints,
        teams=teams,
        files=tuple(names),
        digest=digest.hexdigest(),
    )


def _collect(ctx: LoadContext, loaded: YamlFile) -> None:
    """Schema-check one file and record its entries (names unique across files)."""
    doc, schema, problems = loaded.doc, ctx.schema, ctx.problems
    top = Site(doc, ())
    for v in schema.top.validate(doc):
        problems.at(top.sub(*v.path), v.message, at_key=v.at_key)
    for kind, value in doc.items():
        spec = schema.kinds.get(kind)
        if spec is None or (kind,) in loaded.tainted:
            continue  # unknown kinds were reported by the top-level check
        violations = spec.shallow.validate(value)
        for v in violations:
            problems.at(top.sub(kind, *v.path), v.message, at_key=v.at_key)
        if value is None or any(not v.path for v in violations):
            continue  # empty (``hosts:`` with nothing under it), or the wrong shape
        skip = {v.path[0] for v in violations}
        if not spec.collection:
            merged = ctx.vars if kind == "vars" else ctx.defaults
            for key, item in value.items():
                if key in skip or (kind, key) in loaded.tainted:
                    continue
                site = Site(value, (kind,), (key,))
                if key in merged:
                    first = merged[key].site.location(at_key=True)
                    problems.at(site, f"already defined at {first}", at_key=True)
                    continue
                merged[key] = Scalar(item, site)
            continue
        entries = ctx.kind(kind)
        for name, item in value.items():
            if name in skip:
                continue
            site = Site(value, (kind,), (name,))
            if name in entries:
                first = entries[name].location
                problems.at(site, f"already defined at {first}", at_key=True)
                continue
            ok = (kind, name) not in loaded.tainted
            if ok and spec.entry is not None:
                found = spec.entry.validate(item)
                for v in found:
                    problems.at(site.sub(*v.path), v.message, at_key=v.at_key)
                ok = not found
            entries[name] = Entry(kind, name, item, site, ok)

"""Building the model objects of every kind except certificates.

Each builder takes the schema-valid entries of its kind from the
:class:`~certctl.inventory.context.LoadContext`, checks what the schema cannot
(references to other names, regular expressions that must compile, group cycles,
connector types and their ``config_schema``), and returns model objects. Entries that
failed the schema are skipped here but their names still count as defined, so one
mistake does not cascade into "unknown issuer" errors elsewhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from certctl.connectors import Target
from certctl.inventory.context import LoadContext, plain
from certctl.inventory.names import name_problem
from certctl.inventory.problems import Entry, Site
from certctl.inventory.schema import did_you_mean
from certctl.inventory.templating import contains_template
from certctl.inventory.values import parse_duration
from certctl.inventory.yamlload import quote
from certctl.model import Group, Host, Issuer, Policy, Profile, TargetDef


def _tuple(value: Any) -> tuple[str, ...]:
    return tuple(value or ())


def _max_ttl(ctx: LoadContext, entry: Entry) -> int | None:
    if "max_ttl" not in entry.value:
        return None
    seconds, problem = parse_duration(entry.value["max_ttl"])
    if problem:
        ctx.problems.at(entry.site.sub("max_ttl"), problem)
    return seconds


def _regexes(ctx: LoadContext, entry: Entry, key: str) -> tuple[str, ...]:
    out = []
    for i, pattern in enumerate(entry.value.get(key, ())):
        try:
            re.compile(pattern)
        except re.error as exc:
            ctx.problems.at(
                entry.site.sub(key, i), f"invalid regular expression {quote(pattern)}: {exc}"
            )
            continue
        out.append(pattern)
    return tuple(out)


def _issuer_refs(ctx: LoadContext, entry: Entry) -> tuple[str, ...]:
    names = _tuple(entry.value.get("allowed_issuers"))
    for i, name in enumerate(names):
        ctx.check_ref(entry.site.sub("allowed_issuers", i), "issuers", name)
    return names


def build_issuers(ctx: LoadContext) -> dict[str, Issuer]:
    out: dict[str, Issuer] = {}
    variables = ctx.plain_vars()
    context = {**variables, "vars": variables}
    for entry in ctx.good("issuers"):
        cls, config = ctx.connector_config(entry, "issuer", ctx.registry.issuers)
        if cls is None or config is None:
            continue
        rendered, ok = ctx.render_tree(ctx.secrets(config), context, entry.site)
        if ok:
            out[entry.name] = Issuer(entry.name, entry.value["type"], rendered, entry.location)
    return out


def build_profiles(ctx: LoadContext) -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    for entry in ctx.good("profiles"):
        v = entry.value
        out[entry.name] = Profile(
            name=entry.name,
            ekus=_tuple(v.get("ekus", ("serverAuth",))),
            max_ttl_s=_max_ttl(ctx, entry),
            allowed_keys=_tuple(v.get("allowed_keys")),
            allowed_issuers=_issuer_refs(ctx, entry),
            san_patterns=_regexes(ctx, entry, "san_patterns"),
            location=entry.location,
            expiry_warnings=tuple(sorted(v.get("expiry_warnings", ()), reverse=True)),
        )
    return out


def build_policies(ctx: LoadContext) -> dict[str, Policy]:
    out: dict[str, Policy] = {}
    for entry in ctx.good("policies"):
        v = entry.value
        allow = _tuple(v.get("san_allow"))
        for i, item in enumerate(allow):
            bare = item[2:] if item.startswith("*.") else item
            problem = name_problem(bare, allow_wildcard=False)
            if problem:
                ctx.problems.at(
                    entry.site.sub("san_allow", i),
                    f"invalid san_allow entry {quote(item)} (expected a DNS name, *.domain "
                    "or an IP address)",
                )
        out[entry.name] = Policy(
            name=entry.name,
            allowed_keys=_tuple(v.get("allowed_keys")),
            max_ttl_s=_max_ttl(ctx, entry),
            allowed_issuers=_issuer_refs(ctx, entry),
            san_allow=allow,
            san_regex=_regexes(ctx, entry, "san_regex"),
            location=entry.location,
        )
    return out


def build_teams(ctx: LoadContext) -> dict[str, dict[str, Any]]:
    return {e.name: plain(e.value) for e in ctx.good("teams")}


def build_owners(ctx: LoadContext) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for entry in ctx.good("owners"):
        v = entry.value
        if "team" in v:
            ctx.check_ref(entry.site.sub("team"), "teams", v["team"])
        for i, name in enumerate(v.get("notify", ())):
            ctx.check_ref(entry.site.sub("notify", i), "notifiers", name)
        out[entry.name] = plain(v)
    return out


def build_notifiers(ctx: LoadContext) -> dict[str, dict[str, Any]]:
    """Notifiers are checked against the schema, and against their connector's
    ``config_schema`` once notifier connectors are installed (a later issue)."""
    out: dict[str, dict[str, Any]] = {}
    for entry in ctx.good("notifiers"):
        if ctx.registry.notifiers:
            cls, config = ctx.connector_config(entry, "notifier", ctx.registry.notifiers)
            if cls is None or config is None:
                continue
        out[entry.name] = ctx.secrets(plain(entry.value))
    return out


def build_hosts(ctx: LoadContext) -> dict[str, Host]:
    out: dict[str, Host] = {}
    for entry in ctx.good("hosts"):
        v = entry.value or {}
        address = v.get("address")
        if address is not None:
            problem = name_problem(address, allow_wildcard=False)
            if problem:
                ctx.problems.at(entry.site.sub("address"), problem.replace("name", "address", 1))
        out[entry.name] = Host(
            entry.name,
            address,
            plain(v.get("vars") or {}),
            entry.location,
            agent=agent_selector(v.get("agent")),
        )
    for name in ctx.kind("hosts"):
        if name in ctx.kind("groups"):
            ctx.problems.at(
                ctx.kind("groups")[name].site,
                f"{quote(name)} is both a host and a group (defined at "
                f"{ctx.kind('hosts')[name].location}); target hosts would be ambiguous",
                at_key=True,
            )
    return out


@dataclass
class Topology:
    """Groups with their hosts expanded, and each host's template variables."""

    groups: dict[str, Group]
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)


def build_groups(ctx: LoadContext, hosts: dict[str, Host]) -> Topology:
    entries = {e.name: e for e in ctx.good("groups")}
    expanded: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}

    for entry in entries.values():
        for i, host in enumerate(entry.value.get("hosts", ())):
            ctx.check_ref(entry.site.sub("hosts", i), "hosts", host)
        for i, child in enumerate(entry.value.get("children", ())):
            if ctx.check_ref(entry.site.sub("children", i), "groups", child, "group"):
                parents.setdefault(child, []).append(entry.name)

    def expand(name: str, stack: tuple[str, ...]) -> list[str]:
        if name in expanded:
            return expanded[name]
        if name in stack:
            cycle = " -> ".join((*stack[stack.index(name) :], name))
            ctx.problems.at(entries[stack[-1]].site.sub("children"), f"group cycle: {cycle}")
            return []
        entry = entries.get(name)
        if entry is None:
            return []
        seen: dict[str, None] = {}
        for host in entry.value.get("hosts", ()):
            if host in hosts:
                seen.setdefault(host, None)
        for child in entry.value.get("children", ()):
            for host in expand(child, (*stack, name)):
                seen.setdefault(host, None)
        expanded[name] = list(seen)
        return expanded[name]

    for name in entries:
        expand(name, ())

    depths: dict[str, int] = {}

    def depth(name: str, stack: tuple[str, ...] = ()) -> int:
        if name in stack:
            return 0
        if name not in depths:
            up = [depth(p, (*stack, name)) for p in parents.get(name, ())]
            depths[name] = 1 + max(up, default=-1)
        return depths[name]

    ordered = sorted(entries, key=lambda n: (depth(n), n))  # parents before children
    base = ctx.plain_vars()
    host_vars = {h: dict(base) for h in hosts}
    for name in ordered:
        group_vars = plain(entries[name].value.get("vars") or {})
        for host in expanded.get(name, ()):
            host_vars[host].update(group_vars)
    for name, host in hosts.items():
        host_vars[name].update(host.vars)

    groups = {
        name: Group(
            name,
            tuple(expanded.get(name, ())),
            plain(entry.value.get("vars") or {}),
            entry.location,
        )
        for name, entry in entries.items()
    }
    return Topology(groups, host_vars)


@dataclass
class TargetSpec:
    """A target ready to be bound: model def, connector class, config template.

    ``local`` targets (no ``hosts:``) get one placement per certificate without a
    host; a target whose hosts resolve to nothing (an empty group) gets none.
    """

    definition: TargetDef
    cls: type[Target]
    config: dict[str, Any]  # secrets converted, templates not rendered
    templated: bool
    site: Site
    local: bool
    #: ``agent:`` on the target (wins over its hosts' own), as a selector.
    agent: dict[str, Any] | None = None


def agent_selector(value: Any) -> dict[str, Any] | None:
    """An ``agent:`` value as the protocol's selector: ``{"name": N}`` or
    ``{"labels": {..}, "os": O|None}`` (None when not set)."""
    if value is None:
        return None
    if isinstance(value, str):
        return {"name": value}
    v = plain(value)
    return {"labels": dict(v.get("labels") or {}), "os": v.get("os")}


def build_targets(
    ctx: LoadContext, hosts: dict[str, Host], topology: Topology
) -> dict[str, TargetSpec]:
    out: dict[str, TargetSpec] = {}
    for entry in ctx.good("targets"):
        cls, config = ctx.connector_config(entry, "target", ctx.registry.targets)
        refs = entry.value.get("hosts")
        resolved = _resolve_hosts(ctx, entry, refs, hosts, topology)
        if cls is None or config is None or resolved is None:
            continue
        secret_config = ctx.secrets(config)
        definition = TargetDef(
            entry.name, entry.value["type"], secret_config, tuple(resolved), entry.location
        )
        out[entry.name] = TargetSpec(
            definition,
            cls,
            secret_config,
            contains_template(secret_config),
            entry.site,
            local=refs is None,
            agent=agent_selector(entry.value.get("agent")),
        )
    return out


def _resolve_hosts(
    ctx: LoadContext, entry: Entry, refs: Any, hosts: dict[str, Host], topology: Topology
) -> list[str] | None:
    """Host names of a target's ``hosts:`` (groups expanded, in order, no repeats).

    ``None`` when a reference is unknown (reported) or names an invalid host/group.
    """
    if refs is None:
        return []
    if isinstance(refs, str):
        items = [(entry.site.sub("hosts"), refs)]
    else:
        items = [(entry.site.sub("hosts", i), r) for i, r in enumerate(refs)]
    resolved: dict[str, None] = {}
    ok = True
    for site, ref in items:
        if ref in hosts:
            resolved.setdefault(ref, None)
        elif ref in topology.groups:
            for host in topology.groups[ref].hosts:
                resolved.setdefault(host, None)
        elif ref in ctx.kind("hosts") or ref in ctx.kind("groups"):
            ok = False  # defined but invalid: already reported
        else:
            known = sorted({*ctx.kind("hosts"), *ctx.kind("groups")})
            if known:
                hint = did_you_mean(ref, known) or f" (defined: {', '.join(known[:10])})"
            else:
                hint = " (no hosts or groups are defined)"
            ctx.problems.at(site, f"unknown host or group {quote(ref)}{hint}")
            ok = False
    return list(resolved) if ok else None


def build_endpoints(ctx: LoadContext) -> dict[str, dict[str, Any]]:
    """``endpoints:`` entries for ``certctl drift``; ``certificate`` must name one."""
    out: dict[str, dict[str, Any]] = {}
    for entry in ctx.good("endpoints"):
        v = entry.value
        if "certificate" in v:
            ctx.check_ref(entry.site.sub("certificate"), "certificates", v["certificate"])
        port = int(str(v["endpoint"]).rpartition(":")[2])
        if not 0 < port < 65536:
            ctx.problems.at(entry.site.sub("endpoint"), f"port {port} is out of range")
        out[entry.name] = plain(v)
    return out

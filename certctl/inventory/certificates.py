"""Certificates: defaults, templates, names, references, rules, and placements.

For each schema-valid certificate entry, in file order:

1. fields come from the entry, else from ``defaults`` (``key`` merges field by field,
   see :func:`~certctl.inventory.values.merge_key`);
2. ``common_name`` and ``sans`` are rendered with the inventory ``vars`` (and
   ``cert.name``, ``cert.issuer``, ... ; ``cert.common_name`` for the SANs) and
   checked as names (:mod:`certctl.inventory.names`);
3. issuer, profile, owner and targets must be defined; durations and the key become
   typed values;
4. the certificate's profile and every policy are checked (:mod:`~.policy`);
5. each target is bound into placements: one per host of the target (groups
   expanded), or one without a host for a local target. The target's config is
   rendered for that certificate and host, with ``cert``, ``host`` (``name``,
   ``address``, ``vars``; ``None`` for a local target), ``target`` (``name``) and the
   merged ``vars`` (inventory < groups, parents first < host) -- also available as
   top-level names. The target class's ``check_placement`` then sees the result.

This is the loader's hot loop (10,000 certificates in a fraction of a second), so it
avoids per-certificate allocations where it can: parsed durations and key specs
are cached by value, configs without templates are shared between placements, and
problem locations are only computed when there is a problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from certctl.agent.protocol import VERSION_CUSTODY
from certctl.inventory.context import LoadContext
from certctl.inventory.kinds import TargetSpec, Topology
from certctl.inventory.names import MAX_COMMON_NAME, name_problem
from certctl.inventory.policy import Rules, Subject
from certctl.inventory.problems import Site
from certctl.inventory.templating import TemplateProblem
from certctl.inventory.values import (
    DEFAULT_TTL,
    describe_renew_before,
    format_duration,
    key_spec,
    merge_key,
    parse_duration,
    parse_renew_before,
)
from certctl.inventory.yamlload import quote
from certctl.model import Certificate, Host, KeySpec, Placement, Policy, Profile, RenewBefore

_REFS = (("issuer", "issuers"), ("profile", "profiles"), ("owner", "owners"))
_MAX_MESSAGE = 500  # a connector's check_placement message, at most


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


class _Builder:
    def __init__(
        self,
        ctx: LoadContext,
        profiles: Mapping[str, Profile],
        policies: Mapping[str, Policy],
        targets: Mapping[str, TargetSpec],
        hosts: Mapping[str, Host],
        topology: Topology,
    ) -> None:
        self.ctx = ctx
        self.profiles = profiles
        self.profile_rules = {n: Rules.for_profile(p) for n, p in profiles.items()}
        self.policy_rules = [Rules.for_policy(p) for p in policies.values()]
        self.targets = targets
        self.variables = ctx.plain_vars()
        self.defaults = {k: s.value for k, s in ctx.defaults.items()}
        self.default_sites = {k: s.site for k, s in ctx.defaults.items()}
        # Unset values are left out, not None: "{{ host.address }}" on a host without an
        # address is an error (StrictUndefined), not the text "None".
        self.host_ctx: dict[str, dict[str, Any]] = {
            name: _present(name=name, address=h.address, vars=topology.host_vars[name])
            for name, h in hosts.items()
        }
        self.host_vars = topology.host_vars
        self.host_agents = {name: h.agent for name, h in hosts.items() if h.agent is not None}
        self._durations: dict[Any, tuple[int | None, str | None]] = {}
        self._windows: dict[Any, tuple[RenewBefore | None, str | None]] = {}
        self._keys: dict[tuple[Any, ...], tuple[KeySpec, list[tuple[str, str]]]] = {}
        self._default_ok = self._check_defaults()

    def _check_defaults(self) -> dict[str, bool]:
        """Check references made by ``defaults`` once, not once per certificate."""
        ok: dict[str, bool] = {}
        for field, kind in (*_REFS, ("targets", "targets")):
            if field not in self.defaults:
                continue
            site = self.default_sites[field]
            if field == "targets":
                ok[field] = all(
                    [
                        self.ctx.check_ref(site.sub(i), kind, t)
                        for i, t in enumerate(self.defaults[field])
                    ]
                )
            else:
                ok[field] = self.ctx.check_ref(site, kind, self.defaults[field])
        return ok

    # ----------------------------------------------------------------- helpers
    def _duration(self, value: Any) -> tuple[int | None, str | None]:
        key = (type(value), value)
        found = self._durations.get(key)
        if found is None:
            found = self._durations[key] = parse_duration(value)
        return found

    def _window(self, value: Any) -> tuple[RenewBefore | None, str | None]:
        key = (type(value), value)
        found = self._windows.get(key)
        if found is None:
            found = self._windows[key] = parse_renew_before(value)
        return found

    def _key(self, merged: dict[str, Any]) -> tuple[KeySpec, list[tuple[str, str]]]:
        cache_key = tuple(sorted(merged.items()))
        found = self._keys.get(cache_key)
        if found is None:
            found = self._keys[cache_key] = key_spec(merged)
        return found

    # -------------------------------------------------------------------- main
    def build(self) -> dict[str, Certificate]:
        out: dict[str, Certificate] = {}
        for entry in self.ctx.good("certificates"):
            cert = self._certificate(entry.name, entry.value, entry.site)
            if cert is not None:
                out[entry.name] = cert
        return out

    def _certificate(self, name: str, c: Mapping[str, Any], site: Site) -> Certificate | None:
        ctx, problems, defaults = self.ctx, self.ctx.problems, self.defaults

        def where(field: str) -> Site:
            """The value's site: the certificate's own, else the default's, else the entry."""
            if field in c:
                return site.sub(field)
            return self.default_sites.get(field, site)

        ok = True
        refs: dict[str, Any] = {}
        for field, kind in _REFS:
            value = c.get(field, defaults.get(field))
            refs[field] = value
            if value is None:
                continue
            if field in c:
                if value not in ctx.kind(kind):
                    ok = ctx.check_ref(site.sub(field), kind, value) and ok
            elif not self._default_ok.get(field, True):
                ok = False
        issuer, profile_name, owner = refs["issuer"], refs["profile"], refs["owner"]
        if issuer is None:
            problems.at(site, "no issuer: set issuer here or in defaults", at_key=True)
            ok = False
        profile = self.profiles.get(profile_name) if profile_name else None

        targets = c["targets"] if "targets" in c else defaults.get("targets", ())
        if "targets" in c:
            known = ctx.kind("targets")
            for i, t in enumerate(targets):
                if t not in known:
                    ok = ctx.check_ref(site.sub("targets", i), "targets", t) and ok
        elif not self._default_ok.get("targets", True):
            ok = False
        tags = c["tags"] if "tags" in c else defaults.get("tags", ())

        # --- durations and key
        ttl_raw = c.get("ttl", defaults.get("ttl"))
        ttl_s: int | None = DEFAULT_TTL
        if ttl_raw is not None:
            ttl_s, problem = self._duration(ttl_raw)
            if problem:
                problems.at(where("ttl"), problem)
                ok = False
        window = RenewBefore()
        rb_raw = c.get("renew_before", defaults.get("renew_before"))
        if rb_raw is not None:
            rb, problem = self._window(rb_raw)
            if rb is None:
                problems.at(where("renew_before"), problem or "invalid renew_before")
                ok = False
            else:
                window = rb
                if rb.seconds is not None and ttl_s is not None and rb.seconds >= ttl_s:
                    problems.at(
                        where("ttl" if "ttl" in c and "renew_before" not in c else "renew_before"),
                        f"renew_before {describe_renew_before(rb)} is not shorter than the ttl "
                        f"{format_duration(ttl_s)}: the certificate would always be due",
                    )
                    ok = False
        own_key = c.get("key")
        spec, key_problems = self._key(merge_key(defaults.get("key"), own_key))
        for field, message in key_problems:
            if own_key is not None and field in own_key:
                problems.at(site.sub("key", field), message)
            else:
                problems.at(self.default_sites["key"].sub(field), message)
            ok = False

        # --- names
        cn: str = c["common_name"]
        sans: list[str] = list(c.get("sans", ()))
        cert_ctx = _present(
            name=name, issuer=issuer, profile=profile_name, owner=owner, tags=list(tags)
        )
        failed: set[int] = set()  # names whose template failed (already reported)
        if "{" in cn or any("{" in s for s in sans):
            cn, sans, failed = self._render_names(cn, sans, cert_ctx, site)
        names_ok = not failed
        cert_ctx["common_name"] = cn
        cert_ctx["sans"] = sans
        allow_email = profile is not None and "emailProtection" in profile.ekus
        names: list[tuple[int, str]] = []
        for i, value in enumerate((cn, *sans)):
            if i in failed:
                continue
            problem = name_problem(value, allow_email=allow_email)
            if problem is None and i == 0 and len(value) > MAX_COMMON_NAME:
                problem = (
                    f"common name is too long for a certificate subject ({len(value)} "
                    f"characters, at most {MAX_COMMON_NAME}); put longer names in sans"
                )
            if problem:
                problems.at(site.sub("common_name") if i == 0 else site.sub("sans", i - 1), problem)
                names_ok = False
            else:
                names.append((i, value))

        # --- profile and policies
        if issuer is not None and ttl_s is not None:
            subject = Subject(spec, issuer, ttl_s, names)
            rules = [self.profile_rules[profile_name]] if profile_name in self.profile_rules else []
            for rule in (*rules, *self.policy_rules):
                for field, message in rule.check(subject):
                    if isinstance(field, int):
                        at = site.sub("common_name") if field == 0 else site.sub("sans", field - 1)
                    elif field in c:
                        at = site.sub(field)
                    else:  # the value is not written here: name this certificate anyway
                        at = site
                        origin = "defaults" if field in defaults else "the built-in default"
                        message = f"{message} ({field} from {origin})"
                    problems.at(at, message, at_key=at is site)
                    ok = False

        # --- placements (not with broken names: they would only echo the same mistake)
        if not names_ok:
            return None
        placements = self._placements(name, targets, cert_ctx)
        if placements is not None and any(p.agent is not None for p in placements):
            ok = self._check_agent_routed(name, placements, site) and ok
            spec = replace(spec, custody=VERSION_CUSTODY)  # the agent makes and keeps the key
        elif placements is not None and spec.custody == "target":
            ok = self._check_target_custody(name, placements, site) and ok
        if placements is None or not ok or ttl_s is None:
            return None
        return Certificate(
            name=name,
            common_name=cn,
            sans=tuple(sans),
            issuer=issuer,
            profile=profile_name or "",
            key=spec,
            ttl_s=ttl_s,
            renew_before=window,
            placements=placements,
            owner=owner,
            tags=tuple(tags),
            revoke_on_remove=bool(
                c.get("revoke_on_remove", defaults.get("revoke_on_remove", False))
            ),
            revoked=bool(c.get("revoked", False)),
            revoke_reason=str(c.get("revoke_reason", "unspecified")),
            location=site.location(at_key=True),
        )

    def _check_agent_routed(self, name: str, placements: tuple[Placement, ...], site: Site) -> bool:
        """An agent-routed certificate has its key made on the agent (like key custody
        ``target``), so it must have exactly one placement."""
        if len(placements) != 1:
            routed = [p.id for p in placements if p.agent is not None]
            self.ctx.problems.at(
                site,
                f"certificate {quote(name)} is deployed through an agent ({', '.join(routed)}),"
                f" which makes and keeps its key, so it needs exactly one placement, but it has"
                f" {len(placements)}; use one certificate per agent-routed placement",
                at_key=True,
            )
            return False
        return True

    def _check_target_custody(
        self, name: str, placements: tuple[Placement, ...], site: Site
    ) -> bool:
        """``key.custody: target``: the key is made on the one host that uses it, so the
        certificate must have exactly one placement, on a target that generates keys
        (none is allowed here; apply then refuses to issue it, naming the reason)."""
        where = f"certificate {quote(name)}"
        if not placements:
            return True  # deployed nowhere yet: apply refuses to issue it until it is
        if len(placements) != 1:
            self.ctx.problems.at(
                site,
                f"key custody 'target' needs exactly one placement (one host keeps the "
                f"key), but {where} has {len(placements)}; use one certificate per host",
                at_key=True,
            )
            return False
        placement = placements[0]
        spec = self.targets.get(placement.target)
        if spec is None:
            return False
        try:
            messages = list(spec.cls.check_key_custody(placement, self.ctx.root))
        except Exception as exc:  # a connector bug must not become a traceback
            messages = [f"check_key_custody failed: {type(exc).__name__}: {exc}"]
        for message in messages:
            self.ctx.problems.at(
                site,
                f"key custody 'target': {' '.join(str(message).split())} (for {where})",
                at_key=True,
            )
        return not messages

    def _render_names(
        self, cn: str, sans: list[str], cert_ctx: dict[str, Any], site: Site
    ) -> tuple[str, list[str], set[int]]:
        """Rendered common name and SANs, and the indexes (0 = CN) that failed."""
        context = {**self.variables, "vars": self.variables, "cert": cert_ctx}
        render = self.ctx.renderer.render
        failed: set[int] = set()
        try:
            cn = render(cn, context)
        except TemplateProblem as exc:
            self.ctx.problems.at(site.sub("common_name"), str(exc))
            failed.add(0)
        cert_ctx["common_name"] = cn
        out: list[str] = []
        for i, san in enumerate(sans):
            try:
                out.append(render(san, context))
            except TemplateProblem as exc:
                self.ctx.problems.at(site.sub("sans", i), str(exc))
                out.append(san)
                failed.add(i + 1)
        return cn, out, failed

    def _placements(
        self, cert: str, targets: Any, cert_ctx: dict[str, Any]
    ) -> tuple[Placement, ...] | None:
        out: list[Placement] = []
        ok = True
        root = self.ctx.root
        for tname in targets:
            spec = self.targets.get(tname)
            if spec is None:
                continue  # unknown or invalid target: already reported
            hosts: tuple[str | None, ...] = (None,) if spec.local else spec.definition.hosts
            for host in hosts:
                config: Mapping[str, Any] = spec.config
                if spec.templated:
                    hvars = self.host_vars[host] if host is not None else self.variables
                    context = {
                        **hvars,
                        "vars": hvars,
                        "cert": cert_ctx,
                        "host": self.host_ctx[host] if host is not None else None,
                        "target": {"name": tname},
                    }
                    suffix = f" (on host {quote(host)})" if host is not None else ""
                    rendered, good = self.ctx.render_tree(spec.config, context, spec.site, suffix)
                    if not good:
                        ok = False
                        continue
                    config = rendered
                agent: Mapping[str, Any] | None = spec.agent
                if agent is None and host is not None:
                    agent = self.host_agents.get(host)
                placement = Placement(
                    tname,
                    spec.definition.type,
                    host,
                    config,
                    self.host_ctx[host] if host is not None else {},
                    agent=agent,
                )
                if agent is not None and (bad_root := _agent_root_problem(config)):
                    at = spec.site.sub("root") if "root" in spec.config else spec.site
                    self.ctx.problems.at(at, f"{bad_root} (for certificate {quote(cert)})")
                    ok = False
                    continue
                try:
                    if agent is not None:  # checked as the agent deploys it: locally
                        local = Placement(tname, spec.definition.type, None, config, {})
                        messages = list(spec.cls.check_placement(local, root))
                    else:
                        messages = list(spec.cls.check_placement(placement, root))
                except Exception as exc:  # a connector bug must not become a traceback
                    messages = [f"check_placement failed: {type(exc).__name__}: {exc}"]
                for message in messages:
                    where = f"certificate {quote(cert)}" + (
                        f" on host {quote(host)}" if host is not None else ""
                    )
                    text = " ".join(str(message).split())
                    if len(text) > _MAX_MESSAGE:
                        text = text[: _MAX_MESSAGE - 1] + "…"
                    self.ctx.problems.at(spec.site, f"{text} (for {where})", at_key=True)
                    ok = False
                out.append(placement)
        return tuple(out) if ok else None


def _agent_root_problem(config: Mapping[str, Any]) -> str | None:
    """A placement an agent deploys names its files by an absolute ``root`` (a relative
    one would mean the agent's own working directory)."""
    root = config.get("root")
    has_paths = any(str(k).endswith("_path") for k in config)
    if root is None and has_paths:
        return "a target reached through an agent needs an absolute 'root'"
    if root is not None and not (isinstance(root, str) and root.startswith("/")):
        return f"root {str(root)[:60]!r} must be an absolute path on the agent's host"
    return None


def build_certificates(
    ctx: LoadContext,
    profiles: Mapping[str, Profile],
    policies: Mapping[str, Policy],
    targets: Mapping[str, TargetSpec],
    hosts: Mapping[str, Host],
    topology: Topology,
) -> dict[str, Certificate]:
    return _Builder(ctx, profiles, policies, targets, hosts, topology).build()

"""Pull-request review: what a change to the inventory would do.

``certctl diff REV1 REV2`` and ``certctl plan --base REV`` load the inventory at git
revisions (``git archive`` of the inventory path into a temporary directory; every git
command is an argument list, never shell text) and compare them:

* :func:`diff_inventories` -- pure and fast (a 10,000-certificate diff is a dict
  comparison of one small tuple per certificate): certificates added, removed and
  changed (field, old -> new), the actions the change implies, and loud warnings for
  risky effects (revocations, issuer changes, keys moving off target custody,
  removals).
* :func:`render_review` -- text, JSON, or Markdown for a PR comment: a summary line,
  a table, identical changes grouped, listed rows capped ("and N more") inside
  collapsible details, so a 5,000-certificate change stays readable.

A head inventory that does not load is reported with each problem's file:line (paths
relative to the repository) and makes the command exit 1.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from certctl.connectors import Registry
from certctl.errors import CertctlError, InventoryError, Problem
from certctl.inventory import load_inventory
from certctl.model import Action, ActionKind, Certificate, Inventory, Plan, stable_digest

#: Rows listed per section (and names per group) before "and N more".
MAX_ROWS = 25
MAX_NAMES = 8
REVIEW_FORMAT_VERSION = 1

# ---------------------------------------------------------------------------
# The diff (pure)


@dataclass(frozen=True, slots=True)
class FieldChange:
    field: str
    old: str
    new: str


@dataclass(frozen=True)
class CertChange:
    name: str
    changes: tuple[FieldChange, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(c.field for c in self.changes)


@dataclass(frozen=True)
class ImpliedAction:
    """An action the inventory change implies on its own (``certctl diff``)."""

    kind: str  # issue | renew | deploy | revoke | retire
    cert: str
    reason: str
    placement: str | None = None


@dataclass(frozen=True)
class InventoryDiff:
    base_count: int
    head_count: int
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[CertChange, ...]
    implied: tuple[ImpliedAction, ...]
    warnings: tuple[str, ...]
    #: Non-certificate kinds whose definitions changed: kind -> names.
    other: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        return bool(self.added or self.removed or self.changed or self.other)


#: Fields whose change makes the certificate get reissued (renew).
REISSUE_FIELDS = frozenset(
    {"common_name", "sans", "issuer", "key", "key_custody", "profile", "profile_definition", "ttl"}
)


def _cert_fields(cert: Certificate, profiles: Mapping[str, str]) -> tuple[str, ...]:
    """The comparable facts of a certificate, as strings, in FIELDS order."""
    return (
        cert.common_name,
        ", ".join(sorted(cert.sans)) or "-",
        cert.issuer,
        cert.key.id,
        cert.key.custody,
        cert.key.rotation,
        cert.profile or "-",
        profiles.get(cert.profile, "-"),
        _duration(cert.ttl_s),
        _renew_before(cert),
        ", ".join(sorted(p.id for p in cert.placements)) or "-",
        cert.owner or "-",
        ", ".join(sorted(cert.tags)) or "-",
        str(cert.revoke_on_remove).lower(),
        str(cert.revoked).lower(),
    )


FIELDS = (
    "common_name",
    "sans",
    "issuer",
    "key",
    "key_custody",
    "key_rotation",
    "profile",
    "profile_definition",
    "ttl",
    "renew_before",
    "targets",
    "owner",
    "tags",
    "revoke_on_remove",
    "revoked",
)


def _renew_before(cert: Certificate) -> str:
    rb = cert.renew_before
    return _duration(rb.seconds) if rb.seconds is not None else rb.describe()


def _duration(seconds: int) -> str:
    if seconds % 86400 == 0:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    return f"{seconds}s"


def _other_kinds(base: Inventory, head: Inventory) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    pairs: dict[str, tuple[Mapping[str, Any], Mapping[str, Any]]] = {
        "issuers": (base.issuers, head.issuers),
        "profiles": (base.profiles, head.profiles),
        "policies": (base.policies, head.policies),
        "targets": (base.targets, head.targets),
        "hosts": (base.hosts, head.hosts),
        "owners": (base.owners, head.owners),
        "notifiers": (base.notifiers, head.notifiers),
    }
    for kind, (old, new) in pairs.items():
        names = sorted(
            n
            for n in set(old) | set(new)
            if n not in old or n not in new or _definition(old[n]) != _definition(new[n])
        )
        if names:
            out[kind] = tuple(names)
    return out


def _definition(obj: Any) -> str:
    """A digest of a definition, its configuration included, its location not."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {
            f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != "location"
        }
    return stable_digest(obj)


def diff_inventories(base_inv: Inventory, head_inv: Inventory) -> InventoryDiff:
    """Compare two loaded inventories (pure; no I/O)."""
    base, head = base_inv.certificates, head_inv.certificates
    added = tuple(sorted(n for n in head if n not in base))
    removed = tuple(sorted(n for n in base if n not in head))
    changed: list[CertChange] = []
    implied: list[ImpliedAction] = []
    issuer_moves = custody_off = revokes = key_changes = 0

    for name in added:
        cert = head[name]
        if cert.revoked:
            continue
        implied.append(ImpliedAction("issue", name, "new certificate"))
        implied.extend(
            ImpliedAction("deploy", name, "deploy the new certificate", p.id)
            for p in cert.placements
        )
    base_prof = {n: p.digest() for n, p in base_inv.profiles.items()}
    head_prof = {n: p.digest() for n, p in head_inv.profiles.items()}
    for name in sorted(n for n in head if n in base):
        old_cert, new_cert = base[name], head[name]
        old_f, new_f = _cert_fields(old_cert, base_prof), _cert_fields(new_cert, head_prof)
        if old_f == new_f:
            continue
        diffs = tuple(
            FieldChange(f, o, n)
            for f, o, n in zip(FIELDS, old_f, new_f, strict=True)
            if o != n and f != "profile_definition"
        )
        if old_f[7] != new_f[7] and old_f[6] == new_f[6]:
            diffs += (FieldChange("profile_definition", "changed", f"profile {new_f[6]}"),)
        if not diffs:
            continue
        changed.append(CertChange(name, diffs))
        fields = {d.field for d in diffs}
        if "issuer" in fields:
            issuer_moves += 1
        if "key" in fields:
            key_changes += 1
        if old_cert.key.custody == "target" and new_cert.key.custody != "target":
            custody_off += 1
        if new_cert.revoked and not old_cert.revoked:
            revokes += 1
            implied.append(ImpliedAction("revoke", name, "marked revoked in the inventory"))
            continue
        if new_cert.revoked:
            continue
        reissue = sorted(fields & REISSUE_FIELDS)
        if reissue:
            why = ", ".join(f"{d.field} changed" for d in diffs if d.field in reissue)
            implied.append(ImpliedAction("renew", name, why))
            implied.extend(
                ImpliedAction("deploy", name, "deploy the new certificate", p.id)
                for p in new_cert.placements
            )
        elif "targets" in fields:
            old_ids = {p.id for p in old_cert.placements}
            implied.extend(
                ImpliedAction("deploy", name, "new target: deploys the existing certificate", p.id)
                for p in new_cert.placements
                if p.id not in old_ids
            )
    for name in removed:
        cert = base[name]
        if cert.revoke_on_remove and not cert.revoked:
            revokes += 1
            implied.append(
                ImpliedAction("revoke", name, "removed from the inventory; revoke_on_remove is set")
            )
        else:
            implied.append(ImpliedAction("retire", name, "removed from the inventory"))

    warnings: list[str] = []
    if revokes:
        warnings.append(f"revokes {_n(revokes)}")
    if removed:
        warnings.append(f"removes {_n(len(removed))} from the inventory")
    if issuer_moves:
        warnings.append(f"changes the issuer of {_n(issuer_moves)}")
    if custody_off:
        warnings.append(
            f"moves keys off target custody for {_n(custody_off)} "
            "(new private keys will be generated and kept by the controller)"
        )
    if key_changes:
        warnings.append(f"changes the key type of {_n(key_changes)}")
    return InventoryDiff(
        base_count=len(base),
        head_count=len(head),
        added=added,
        removed=removed,
        changed=tuple(changed),
        implied=tuple(implied),
        warnings=tuple(warnings),
        other=_other_kinds(base_inv, head_inv),
    )


def _n(count: int) -> str:
    return f"{count} certificate{'s' if count != 1 else ''}"


def plan_warnings(plan: Plan) -> list[str]:
    """Warnings about what a real plan does (revocations among them)."""
    revokes = sum(1 for a in plan.actions if a.kind is ActionKind.REVOKE)
    return [f"the plan revokes {_n(revokes)}"] if revokes else []


# ---------------------------------------------------------------------------
# Loading an inventory at a git revision


@dataclass(frozen=True)
class Loaded:
    rev: str
    commit: str
    inventory: Inventory | None
    problems: tuple[Problem, ...] = ()
    missing: bool = False  # the inventory path does not exist at that revision


def _git(repo: Path, *args: str) -> bytes:
    try:
        proc = subprocess.run(
            ["git", "-C", os.fspath(repo), *args],
            capture_output=True,
            timeout=120,
            check=False,
        )
    except FileNotFoundError:
        raise CertctlError("git is not installed (needed to load git revisions)") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise CertctlError(f"git {args[0]} failed: {msg[-1] if msg else proc.returncode}")
    return proc.stdout


def repo_location(inventory_path: Path) -> tuple[Path, str]:
    """(repository top level, inventory path relative to it, '/'-separated)."""
    start = inventory_path if inventory_path.is_dir() else inventory_path.parent
    top = Path(_git(start, "rev-parse", "--show-toplevel").decode().strip()).resolve()
    rel = inventory_path.resolve().relative_to(top)
    return top, rel.as_posix() if rel.parts else "."


def resolve_commit(repo: Path, rev: str) -> str:
    if rev.startswith("-"):
        raise CertctlError(f"not a git revision: {rev!r}")
    return _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").decode().strip()


@contextmanager
def checkout_inventory(repo: Path, commit: str, rel: str) -> Iterator[Path | None]:
    """The inventory path as of ``commit``, extracted into a temporary directory
    (None when the path does not exist at that commit)."""
    with tempfile.TemporaryDirectory(prefix="certctl-review-") as tmp:
        listed = _git(repo, "ls-tree", "--name-only", commit, "--", rel)
        if rel != "." and not listed.strip():
            yield None
            return
        spec = [] if rel == "." else ["--", rel]
        data = _git(repo, "archive", "--format=tar", commit, *spec)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(tmp, filter="data")
        yield Path(tmp) / rel


def load_at(repo: Path, rev: str, rel: str, registry: Registry) -> Loaded:
    """Load the inventory at ``rel`` as of ``rev``; load problems are returned, with
    file names relative to the repository, not raised."""
    commit = resolve_commit(repo, rev)
    with checkout_inventory(repo, commit, rel) as path:
        if path is None:
            return Loaded(rev, commit, None, missing=True)
        try:
            return Loaded(rev, commit, load_inventory(path, registry))
        except InventoryError as exc:
            root = path.parent if rel != "." else path
            return Loaded(rev, commit, None, tuple(_relocate(p, root) for p in exc.problems))


def _relocate(problem: Problem, root: Path) -> Problem:
    if problem.file is None:
        return Problem(
            problem.message.replace(f"{root}{os.sep}", ""), None, None, None, problem.path
        )
    file = problem.file
    with suppress(ValueError):
        file = Path(os.path.abspath(file)).relative_to(root).as_posix()
    message = problem.message.replace(f"{root}{os.sep}", "")
    return Problem(message, file, problem.line, problem.column, problem.path)


def empty_inventory(root: Path) -> Inventory:
    return Inventory(root=root, certificates={}, issuers={}, profiles={})


# ---------------------------------------------------------------------------
# The review (what gets rendered)


@dataclass(frozen=True)
class Review:
    title: str
    base: str  # "REV (commit)"
    head: str
    diff: InventoryDiff | None
    problems: tuple[str, ...] = ()  # the head does not load: file:line messages
    notes: tuple[str, ...] = ()
    plan: Plan | None = None  # plan --base: the real plan for the head
    at_base: frozenset[str] = frozenset()  # action ids the base would plan too

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    @property
    def warnings(self) -> tuple[str, ...]:
        if self.diff is None:
            return ()
        extra = plan_warnings(self.plan) if self.plan is not None else []
        return self.diff.warnings + tuple(w for w in extra if w not in self.diff.warnings)


def _label(loaded: Loaded) -> str:
    return (
        f"{loaded.rev} ({loaded.commit[:12]})"
        if loaded.rev != loaded.commit
        else loaded.commit[:12]
    )


def review_revisions(
    inventory_path: Path, base_rev: str, head_rev: str, registry: Registry
) -> Review:
    """``certctl diff BASE HEAD``: the inventory-level diff and the actions implied."""
    repo, rel = repo_location(inventory_path)
    base = load_at(repo, base_rev, rel, registry)
    head = load_at(repo, head_rev, rel, registry)
    return _review("certctl diff", base, head, _label(head), None, frozenset())


def review_plan(
    inventory_path: Path,
    base_rev: str,
    head_inv: Inventory,
    head_plan: Plan,
    base_plan_for: Any,
    registry: Registry,
) -> Review:
    """``certctl plan --base REV``: the real plan of the working-tree inventory, each
    action marked as introduced by the change or also planned at the base.

    ``base_plan_for(inventory)`` plans the base inventory against the same observed
    state (the planner is pure, so this costs no I/O)."""
    repo, rel = repo_location(inventory_path)
    base = load_at(repo, base_rev, rel, registry)
    at_base: frozenset[str] = frozenset()
    if base.inventory is not None:
        base_plan: Plan = base_plan_for(base.inventory)
        at_base = frozenset(a.id for a in base_plan.actions)
    head = Loaded("working tree", "working tree", head_inv)
    return _review("certctl plan", base, head, "working tree", head_plan, at_base)


def _review(
    title: str,
    base: Loaded,
    head: Loaded,
    head_label: str,
    plan: Plan | None,
    at_base: frozenset[str],
) -> Review:
    notes: list[str] = []
    base_inv = base.inventory
    if base.missing:
        notes.append(f"the inventory does not exist at {_label(base)}: everything is new")
    elif base_inv is None:
        notes.append(
            f"the base inventory at {_label(base)} does not load ({len(base.problems)} "
            "problem(s)); compared against an empty inventory"
        )
    if head.inventory is None:
        problems = tuple(str(p) for p in head.problems)
        if head.missing:
            problems = (f"the inventory does not exist at {head_label}",)
        return Review(title, _label(base), head_label, None, problems, tuple(notes))
    if base_inv is None:
        base_inv = empty_inventory(head.inventory.root)
    diff = diff_inventories(base_inv, head.inventory)
    return Review(title, _label(base), head_label, diff, (), tuple(notes), plan, at_base)


# ---------------------------------------------------------------------------
# Rendering


def _summary_line(review: Review) -> str:
    if review.failed:
        return f"❌ the inventory at {review.head} does not load: {len(review.problems)} problem(s)"
    d = review.diff
    assert d is not None
    parts = [f"{len(d.added)} added", f"{len(d.changed)} changed", f"{len(d.removed)} removed"]
    line = f"{review.base} → {review.head}: " + ", ".join(parts) + " certificate(s)"
    acts = _action_counts(review)
    if acts:
        line += "; " + ", ".join(f"{n} to {k}" for k, n in acts.items() if n)
    if review.warnings:
        line = "⚠️ " + line
    return line


def _action_counts(review: Review) -> dict[str, int]:
    counts = {k.value: 0 for k in ActionKind}
    if review.plan is not None:
        for a in review.plan.actions:
            counts[a.kind.value] += 1
    elif review.diff is not None:
        for ia in review.diff.implied:
            counts[ia.kind] += 1
    return {k: n for k, n in counts.items() if n}


def _change_groups(
    changed: Sequence[CertChange],
) -> list[tuple[tuple[FieldChange, ...], list[str]]]:
    """Identical changes grouped: (the changes, the certificates), largest first."""
    groups: dict[tuple[FieldChange, ...], list[str]] = defaultdict(list)
    for c in changed:
        groups[c.changes].append(c.name)
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[1][0]))


@dataclass(frozen=True)
class _ActionRow:
    kind: str
    reason: str
    introduced: str  # "" (diff), "yes" / "no, also at base"
    certs: list[str]


def _action_groups(review: Review) -> list[_ActionRow]:
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    if review.plan is not None:
        for a in review.plan.actions:
            mark = "also at base" if a.id in review.at_base else "this change"
            groups[(a.kind.value, _reason_key(a), mark)].append(_action_label(a))
    elif review.diff is not None:
        for ia in review.diff.implied:
            label = ia.cert + (f" → {ia.placement}" if ia.placement else "")
            groups[(ia.kind, ia.reason, "")].append(label)
    order = {k.value: i for i, k in enumerate(ActionKind)}
    return [
        _ActionRow(k, r, m, names)
        for (k, r, m), names in sorted(
            groups.items(), key=lambda kv: (order[kv[0][0]], -len(kv[1]))
        )
    ]


def _reason_key(a: Action) -> str:
    return "; ".join(r.code for r in a.reasons) if len(a.reasons) > 1 else a.reasons[0].message


def _action_label(a: Action) -> str:
    return a.cert + (f" → {a.placement}" if a.placement else "")


def _names(names: Sequence[str], cap: int = MAX_NAMES, code: bool = True) -> str:
    shown = [f"`{_md(n)}`" if code else n for n in names[:cap]]
    more = f" and {len(names) - cap} more" if len(names) > cap else ""
    return ", ".join(shown) + more


def _md(text: str) -> str:
    return (
        text.replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("`", "'")
        .replace("\n", " ")
    )


def _change_text(changes: Sequence[FieldChange]) -> str:
    return "; ".join(f"{c.field}: {c.old} → {c.new}" for c in changes)


def render_markdown(review: Review) -> str:
    out = [f"### {review.title}: {_md(review.base)} → {_md(review.head)}", ""]
    out.append(f"**{_md(_summary_line(review))}**")
    out.append("")
    for note in review.notes:
        out.append(f"> {_md(note)}")
        out.append("")
    if review.failed:
        out.append("<details open><summary>inventory problems</summary>")
        out.append("")
        for p in review.problems[: MAX_ROWS * 4]:
            out.append(f"- {_md(p)}")
        if len(review.problems) > MAX_ROWS * 4:
            out.append(f"- and {len(review.problems) - MAX_ROWS * 4} more")
        out += ["", "</details>", ""]
        return "\n".join(out)
    d = review.diff
    assert d is not None
    for w in review.warnings:
        out.append(f"> [!WARNING]\n> **This change {_md(w)}.**")
        out.append("")
    out += ["| | certificates |", "|---|---:|"]
    out += [f"| added | {len(d.added)} |", f"| changed | {len(d.changed)} |"]
    out += [f"| removed | {len(d.removed)} |", f"| total (head) | {d.head_count} |", ""]
    rows = _action_groups(review)
    if rows:
        marked = review.plan is not None
        out.append("| action | count | reason |" + (" caused by |" if marked else ""))
        out.append("|---|---:|---|" + ("---|" if marked else ""))
        for r in rows[:MAX_ROWS]:
            cells = f"| {r.kind} | {len(r.certs)} | {_md(r.reason)} |"
            out.append(cells + (f" {r.introduced} |" if marked else ""))
        if len(rows) > MAX_ROWS:
            out.append(f"| … | | and {len(rows) - MAX_ROWS} more kinds of action | |")
        out.append("")
    if d.changed:
        groups = _change_groups(d.changed)
        out.append(
            f"<details><summary>changed: {len(d.changed)} ({len(groups)} distinct)</summary>"
        )
        out += ["", "| change | count | certificates |", "|---|---:|---|"]
        for changes, names in groups[:MAX_ROWS]:
            out.append(f"| {_md(_change_text(changes))} | {len(names)} | {_names(names)} |")
        if len(groups) > MAX_ROWS:
            rest = sum(len(n) for _, n in groups[MAX_ROWS:])
            out.append(f"| and {len(groups) - MAX_ROWS} more distinct changes | {rest} | |")
        out += ["", "</details>", ""]
    for label, listed in (("added", d.added), ("removed", d.removed)):
        if listed:
            out.append(f"<details><summary>{label}: {len(listed)}</summary>")
            out += ["", _names(listed, cap=MAX_ROWS * 4), "", "</details>", ""]
    if rows:
        out.append("<details><summary>actions by certificate</summary>")
        out.append("")
        for r in rows[:MAX_ROWS]:
            out.append(f"- **{r.kind}** ({_md(r.reason)}): {_names(r.certs, cap=MAX_ROWS)}")
        out += ["", "</details>", ""]
    if d.other:
        out.append("<details><summary>other definitions changed</summary>")
        out.append("")
        for kind, defs in d.other.items():
            out.append(f"- {kind}: {_names(defs)}")
        out += ["", "</details>", ""]
    return "\n".join(out)


def render_text(review: Review) -> str:
    out = [_summary_line(review)]
    out.extend(f"note: {n}" for n in review.notes)
    if review.failed:
        out.append("The head inventory does not load:")
        out.extend(f"  {p}" for p in review.problems)
        return "\n".join(out) + "\n"
    d = review.diff
    assert d is not None
    out.extend(f"WARNING: this change {w}" for w in review.warnings)
    if d.added:
        out.append(f"+ added ({len(d.added)}): {_names(d.added, MAX_ROWS, code=False)}")
    if d.removed:
        out.append(f"- removed ({len(d.removed)}): {_names(d.removed, MAX_ROWS, code=False)}")
    for changes, names in _change_groups(d.changed)[:MAX_ROWS]:
        out.append(f"~ {_change_text(changes)}: {_names(names, code=False)}")
    for r in _action_groups(review)[:MAX_ROWS]:
        mark = f" [{r.introduced}]" if r.introduced else ""
        out.append(f"  {r.kind} {len(r.certs)}{mark} ({r.reason}): {_names(r.certs, code=False)}")
    for kind, defs in d.other.items():
        out.append(f"  {kind} changed: {', '.join(defs)}")
    return "\n".join(out) + "\n"


def review_to_dict(review: Review) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format_version": REVIEW_FORMAT_VERSION,
        "base": review.base,
        "head": review.head,
        "ok": not review.failed,
        "summary": _summary_line(review),
        "problems": list(review.problems),
        "notes": list(review.notes),
    }
    d = review.diff
    if d is None:
        return doc
    doc["warnings"] = list(review.warnings)
    doc["certificates"] = {
        "base": d.base_count,
        "head": d.head_count,
        "added": list(d.added),
        "removed": list(d.removed),
        "changed": [
            {
                "name": c.name,
                "changes": [{"field": f.field, "old": f.old, "new": f.new} for f in c.changes],
            }
            for c in d.changed
        ],
    }
    doc["other_changes"] = {k: list(v) for k, v in d.other.items()}
    if review.plan is not None:
        doc["actions"] = [
            {
                "kind": a.kind.value,
                "cert": a.cert,
                "placement": a.placement,
                "reasons": [r.to_json() for r in a.reasons],
                "introduced": a.id not in review.at_base,
            }
            for a in review.plan.actions
        ]
    else:
        doc["actions"] = [
            {"kind": ia.kind, "cert": ia.cert, "placement": ia.placement, "reason": ia.reason}
            for ia in d.implied
        ]
    doc["action_counts"] = _action_counts(review)
    return doc


def render_review(review: Review, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(review_to_dict(review), indent=2, sort_keys=True) + "\n"
    if fmt == "markdown":
        return render_markdown(review)
    return render_text(review)

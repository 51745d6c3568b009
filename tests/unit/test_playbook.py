"""Playbooks, the pure parts: loading (schema, templates, located errors), batch
sizes, selectors, --limit and -e parsing."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certctl.errors import CertctlError, InventoryError
from certctl.model import (
    Certificate,
    CertRecord,
    Inventory,
    Issuer,
    KeySpec,
    Placement,
    Profile,
    StateSnapshot,
    VersionRecord,
)
from certctl.playbook import select as sel
from certctl.playbook import spec
from certctl.playbook.runner import as_revoked, batches_of, redeploy_actions, revoke_actions

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def load_text(text: str, **extra: object) -> spec.Playbook:
    return spec.load("book.yaml", extra, raw=text.encode())


def problems(text: str, **extra: object) -> list[str]:
    with pytest.raises(InventoryError) as info:
        load_text(text, **extra)
    return [str(p) for p in info.value.problems]


GOOD = """
name: good
description: a test
vars: {days: 30, who: sre}
steps:
  - name: renew within {{ days }} days
    action: renew
    select: {expiring_within: "{{ days }}d", tag: [web, api]}
    serial: [1, "10%", "100%"]
    max_fail_percentage: "{{ days }}"
    verify: true
  - name: stop here
    action: pause
"""


def test_a_good_playbook_loads_with_rendered_templates_and_overrides() -> None:
    pb = load_text(GOOD, days=7)
    first = pb.steps[0]
    assert first.name == "renew within 7 days" and first.action == "renew"
    assert first.select is not None and first.select.expiring_within_s == 7 * 86400
    assert first.select.tag == ("web", "api")
    assert [str(b) for b in first.serial] == ["1", "10%", "100%"]
    assert first.max_fail_percentage == 7.0  # a single expression yields a number
    assert pb.vars == {"days": 7, "who": "sre"} and len(pb.sha256) == 64
    assert pb.steps[1].prompt == "Continue?"


@pytest.mark.parametrize(
    ("snippet", "where", "message"),
    [
        ("    selekt: {name: x}\n", "book.yaml:5:5: steps[0].selekt", "unknown key 'selekt'"),
        (
            "    select: {name: x, colour: red}\n",
            "book.yaml:5:23: steps[0].select.colour",
            "unknown key 'colour'",
        ),
        (
            "    select: {expiring_within: soon}\n",
            "book.yaml:5:31: steps[0].select.expiring_within",
            "expected a duration",
        ),
        (
            "    select: {name: x}\n    serial: 0\n",
            "book.yaml:6:13: steps[0].serial",
            'expected a batch size (5 or "10%")',
        ),
        (
            "    select: {name: x}\n    serial: 150%\n",
            "book.yaml:6:13: steps[0].serial",
            "between 1% and 100%, got '150%'",
        ),
        (
            "    select: {name: x}\n    serial: [1, 0%]\n",
            "book.yaml:6:17: steps[0].serial[1]",
            "between 1% and 100%",
        ),
        (
            "    select: {name: x, key_algorithm: dsa}\n",
            "book.yaml:5:38: steps[0].select.key_algorithm",
            "unknown key algorithm 'dsa'",
        ),
        (
            "    select: {issued_before: 2026-13-45}\n",
            "book.yaml:5:29: steps[0].select.issued_before",
            "expected a date or date-time",
        ),
        ("    select: {}\n", "book.yaml:5:13: steps[0].select", "at least one selector"),
        (
            "    select: {name: x}\n    max_fail_percentage: 101\n",
            "book.yaml:6:26: steps[0].max_fail_percentage",
            "at most 100",
        ),
        (
            "    select: {name: x}\n    prompt: hi\n",
            "book.yaml:6:5: steps[0].prompt",
            "does not apply",
        ),
    ],
)
def test_mistakes_are_located_and_named(snippet: str, where: str, message: str) -> None:
    text = "name: bad\nsteps:\n  - name: one\n    action: renew\n" + snippet
    found = problems(text)
    assert any(p.startswith(where) and message in p for p in found), found


def test_bad_revocation_reason_suggests_the_right_spelling() -> None:
    text = (
        "name: bad\nsteps:\n  - name: one\n    action: revoke\n"
        "    select: {issuer: ca}\n    reason: caCompromise\n"
    )
    [found] = problems(text)
    assert found.startswith("book.yaml:6:13: steps[0].reason:")
    assert "did you mean 'cACompromise'?" in found


def test_missing_variable_names_the_field_and_how_to_set_it() -> None:
    text = (
        "name: x\nsteps:\n"
        "  - {name: a, action: revoke, select: {issuer: '{{ ca }}'}, reason: unspecified}\n"
    )
    [found] = problems(text)
    assert found.startswith("book.yaml:3:48: steps[0].select.issuer:")
    assert "'ca' is undefined" in found and "-e NAME=VALUE" in found
    assert load_text(text, ca="old").steps[0].select.issuer == ("old",)  # type: ignore[union-attr]


def test_required_keys_per_action_and_top_level_shape() -> None:
    found = problems("name: x\nsteps:\n  - {name: a, action: revoke, select: {name: '*'}}\n")
    assert any("needs 'reason'" in p for p in found), found
    found = problems("name: x\nsteps:\n  - {name: a, action: notify}\n")
    assert any("needs 'notifier'" in p for p in found) and any(
        "needs 'message'" in p for p in found
    )
    found = problems("name: x\nsteps: []\n")
    assert found == ["book.yaml:2:8: steps: needs at least 1 item"]
    found = problems("steps:\n  - {name: a, action: dance}\n")
    assert any("missing required key 'name'" in p for p in found)
    assert any("steps[0].action: expected one of" in p for p in found)
    found = problems("name: x\nname: y\nsteps: []\n")
    assert any("duplicate key" in p for p in found)


def test_template_sandbox_refuses_internals() -> None:
    text = "name: x\nsteps:\n  - {name: '{{ \"\".__class__ }}', action: pause}\n"
    [found] = problems(text)
    assert "steps[0].name" in found


def test_bundled_playbooks_all_load_and_have_descriptions() -> None:
    books = spec.bundled()
    assert set(books) == {
        "ca-compromise",
        "rotate-profile-keys",
        "renew-expiring",
        "move-issuer",
        "verify-endpoints",
    }
    values = {"issuer": "ca", "profile": "tls"}
    for name, description in books.items():
        assert description.strip(), name
        pb = spec.load(name, values)
        assert pb.name == name and pb.steps


def test_resolve_refuses_unknown_names(tmp_path: Path) -> None:
    with pytest.raises(CertctlError, match="certctl run --list"):
        spec.resolve("no-such-playbook")
    with pytest.raises(CertctlError, match="not a file"):
        spec.resolve(str(tmp_path))


def test_extra_vars_parse_scalars_and_refuse_bad_names() -> None:
    assert spec.parse_extra_vars(["days=7", "name=web", "on=true", "empty=", "f=2.5"]) == {
        "days": 7,
        "name": "web",
        "on": True,
        "empty": "",
        "f": 2.5,
    }
    assert spec.parse_extra_vars(["x=[1, 2]", "ca=012", "y=yes", "z=a=b"]) == {
        "x": "[1, 2]",
        "ca": "012",
        "y": "yes",
        "z": "a=b",
    }
    for bad in ("novalue", "1x=2", "a-b=1"):
        with pytest.raises(CertctlError, match="-e NAME=VALUE"):
            spec.parse_extra_vars([bad])


def test_secret_looking_vars_are_redacted() -> None:
    pb = load_text(GOOD, api_token="t0k", db_password="pw")
    red = pb.redacted_vars()
    assert red["api_token"] == red["db_password"] == "<redacted>" and red["days"] == 30


@pytest.mark.parametrize(
    ("serial", "total", "sizes"),
    [
        ([], 7, [7]),
        (["2"], 7, [2, 2, 2, 1]),
        (["1", "10%", "100%"], 50, [1, 5, 44]),
        (["1", "10%", "100%"], 4, [1, 1, 2]),
        (["50%"], 5, [2, 2, 1]),
        (["3"], 0, []),
    ],
)
def test_batch_sizes(serial: list[str], total: int, sizes: list[int]) -> None:
    parsed = []
    for s in serial:
        size = spec._batch_size(s)
        assert isinstance(size, spec.BatchSize)
        parsed.append(size)
    assert spec.batch_sizes(parsed, total) == sizes
    step = spec.Step(1, "s", "renew", serial=tuple(parsed))
    names = [f"n{i}" for i in range(total)]
    assert [len(b) for b in batches_of(names, step)] == sizes


# --------------------------------------------------------------------- selectors


def version(name: str, issuer: str, days_left: int, key: str = "ecdsa-p256") -> VersionRecord:
    return VersionRecord(
        cert=name,
        version=1,
        serial=f"{abs(hash(name)):x}",
        not_before=NOW - timedelta(days=30),
        not_after=NOW + timedelta(days=days_left),
        fingerprint="f" * 64,
        issuer=issuer,
        key_spec=key,
        names=(f"{name}.test",),
        profile_digest="p",
    )


def world() -> tuple[Inventory, StateSnapshot]:
    def cert(name: str, **kw: object) -> Certificate:
        return Certificate(name=name, common_name=f"{name}.test", **kw)  # type: ignore[arg-type]

    files = Placement("files", "file")
    remote = Placement("nginx", "ssh", host="web1")
    certs = {
        "web-a": cert(
            "web-a", issuer="new", profile="tls", owner="web", tags=("web",), placements=(remote,)
        ),
        "web-b": cert(
            "web-b",
            issuer="old",
            profile="tls",
            owner="web",
            tags=("web", "pci"),
            placements=(files,),
        ),
        "api": cert(
            "api",
            issuer="old",
            profile="internal",
            owner="api",
            key=KeySpec("rsa", 3072),
            placements=(files,),
        ),
        "fresh": cert("fresh", issuer="old", profile="tls"),
    }
    inv = Inventory(
        root=Path("."),
        certificates=certs,
        issuers={"old": Issuer("old", "local_ca"), "new": Issuer("new", "local_ca")},
        profiles={"tls": Profile("tls"), "internal": Profile("internal")},
        owners={"web": {"team": "sre"}, "api": {"team": "backend"}},
    )
    snap = StateSnapshot(
        certs={
            "web-a": CertRecord("web-a", version("web-a", "old", 5)),
            "web-b": CertRecord("web-b", version("web-b", "old", 60)),
            "api": CertRecord("api", version("api", "old", 20, key="rsa-3072")),
        },
        deployments={},
    )
    return inv, snap


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, ["api", "fresh", "web-a", "web-b"]),
        ({"names": ("web-*",)}, ["web-a", "web-b"]),
        ({"issuer": ("old",)}, ["api", "fresh", "web-a", "web-b"]),  # web-a: state says old
        ({"issuer": ("new",)}, []),
        ({"issuer_changed": True}, ["web-a"]),
        ({"issuer_changed": False}, ["api", "fresh", "web-b"]),
        ({"profile": ("internal",)}, ["api"]),
        ({"owner": ("web",)}, ["web-a", "web-b"]),
        ({"team": ("backend",)}, ["api"]),
        ({"tag": ("pci", "nope")}, ["web-b"]),
        ({"host": ("web1",)}, ["web-a"]),
        ({"target": ("files",)}, ["api", "web-b"]),
        ({"expiring_within_s": 21 * 86400}, ["api", "web-a"]),
        ({"issued_before": NOW - timedelta(days=29)}, ["api", "web-a", "web-b"]),
        ({"issued_before": NOW - timedelta(days=31)}, []),
        ({"key_algorithm": ("rsa",)}, ["api"]),
        ({"key_algorithm": ("ecdsa-p256",)}, ["fresh", "web-a", "web-b"]),
        ({"names": ("web-*",), "expiring_within_s": 10 * 86400}, ["web-a"]),
    ],
)
def test_selectors(selector: dict[str, object], expected: list[str]) -> None:
    inv, snap = world()
    assert sel.select(inv, snap, spec.Selector(**selector), NOW) == expected  # type: ignore[arg-type]


def test_limit_keeps_and_excludes_globs() -> None:
    names = ["api", "web-a", "web-b", "web-test"]
    assert sel.apply_limit(names, sel.parse_limit(None)) == names
    assert sel.apply_limit(names, sel.parse_limit("web-*,!web-test")) == ["web-a", "web-b"]
    assert sel.apply_limit(names, sel.parse_limit("!web-*")) == ["api"]
    assert sel.apply_limit(names, sel.parse_limit("api:web-b")) == ["api", "web-b"]


def test_check_inventory_names_unknown_references() -> None:
    inv, _ = world()
    text = (
        "name: x\nsteps:\n"
        "  - {name: a, action: revoke, select: {issuer: olld, team: sre}, reason: superseded}\n"
        "  - {name: b, action: notify, notifier: pager, message: hi}\n"
    )
    pb = load_text(text)
    with pytest.raises(InventoryError) as info:
        pb.check_inventory(inv)
    found = [str(p) for p in info.value.problems]
    assert found[0].startswith("book.yaml:3:48: steps[0].select.issuer: no issuer 'olld'")
    assert "did you mean 'old'?" in found[0]
    assert found[1].startswith("book.yaml:4:41: steps[1].notifier: no notifier 'pager'")
    assert len(found) == 2  # team sre exists (through owner web)


def test_plans_of_redeploy_and_revoke_are_built_from_the_snapshot() -> None:
    inv, snap = world()
    deploys = redeploy_actions(inv, snap, ["web-a", "web-b", "fresh"])
    assert [(a.cert, a.placement) for a in deploys] == [("web-a", "nginx@web1"), ("web-b", "files")]
    revokes = revoke_actions(snap, ["api", "fresh"], "keyCompromise")
    assert [(a.cert, a.details["revocation_reason"]) for a in revokes] == [("api", "keyCompromise")]
    gone = as_revoked(snap, ["api"])
    assert gone.certs["api"].current.status == "revoked"  # type: ignore[union-attr]
    assert snap.certs["api"].current.status == "active"  # type: ignore[union-attr]
    assert revoke_actions(gone, ["api"], "keyCompromise") == []


def test_a_playbook_that_is_not_a_mapping_says_so() -> None:
    [found] = problems("- just\n- a list\n")
    assert (
        found
        == "book.yaml:1:1: a playbook must be a mapping with name, description, vars and steps"
    )
    assert problems("name: [unclosed\n")[0].startswith("book.yaml:")


def test_schema_and_step_mistakes_are_reported_together() -> None:
    text = (
        "name: x\nsteps:\n  - {name: a, action: renew, selekt: {}, serial: 150%}\n"
        "  - {name: b, action: renew, select: {name: '*'}, serial: 0%}\n"
    )
    found = problems(text)
    assert [p.split(": ")[1] for p in found] == [
        "steps[0].selekt",
        "steps[0].serial",
        "steps[1].serial",
    ]

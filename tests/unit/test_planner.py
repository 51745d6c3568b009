"""Every plan reason, with a fixed clock and hand-built observed state (no I/O)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certctl.model import (
    ActionKind,
    Certificate,
    CertRecord,
    DeploymentRecord,
    Inventory,
    Issuer,
    KeySpec,
    Observed,
    Placement,
    Profile,
    RenewBefore,
    StateSnapshot,
    TargetObservation,
    TargetState,
    VersionRecord,
)
from certctl.plan import reasons as R
from certctl.plan.planner import PlanOptions, plan, profile_digest, renewal_time
from certctl.plan.render import plan_from_json, render_json, render_markdown, render_text

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
PROFILE = Profile("tls", ekus=("serverAuth",), max_ttl_s=90 * 86400)
P_FILES = Placement("files", "file", None, {"root": "out", "cert_path": "a.pem"})
P_LB = Placement("lb", "file", None, {"root": "lb", "combined_path": "a.pem"})


def cert(name: str = "www", **kw: object) -> Certificate:
    base = Certificate(
        name=name,
        common_name=f"{name}.example.com",
        sans=("example.com",),
        issuer="ca",
        profile="tls",
        key=KeySpec("ecdsa", 256),
        ttl_s=30 * 86400,
        renew_before=RenewBefore(fraction=1 / 3),
        placements=(P_FILES,),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def inventory(*certs: Certificate) -> Inventory:
    return Inventory(
        root=Path("."),
        certificates={c.name: c for c in certs},
        issuers={"ca": Issuer("ca", "local_ca"), "other": Issuer("other", "local_ca")},
        profiles={"tls": PROFILE},
        digest="d1",
    )


def version(
    c: Certificate, *, issued: datetime = NOW - timedelta(days=1), **kw: object
) -> VersionRecord:
    base = VersionRecord(
        cert=c.name,
        version=1,
        serial="0a1b",
        not_before=issued,
        not_after=issued + timedelta(seconds=c.ttl_s),
        fingerprint="f" * 64,
        issuer=c.issuer,
        key_spec=c.key.id,
        names=c.names,
        profile_digest=profile_digest(c, PROFILE),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def observed(
    records: list[CertRecord],
    deployments: list[DeploymentRecord] | None = None,
    targets: list[TargetObservation] | None = None,
) -> Observed:
    snap = StateSnapshot(
        certs={r.name: r for r in records},
        deployments={(d.cert, d.placement): d for d in deployments or []},
        generation=7,
    )
    return Observed(snap, {(t.cert, t.placement): t for t in targets or []})


def deployed(c: Certificate, v: VersionRecord, placement: str = "files") -> DeploymentRecord:
    return DeploymentRecord(c.name, placement, v.version, v.fingerprint, {})


def match(c: Certificate, placement: str = "files") -> TargetObservation:
    return TargetObservation(c.name, placement, TargetState.MATCH, "f" * 64)


def up_to_date(c: Certificate, **vkw: object) -> tuple[CertRecord, Observed]:
    v = version(c, **vkw)
    rec = CertRecord(c.name, v)
    return rec, observed([rec], [deployed(c, v)], [match(c)])


def codes(p: object, kind: ActionKind | None = None) -> list[str]:
    return [
        r.code
        for a in p.actions  # type: ignore[attr-defined]
        if kind is None or a.kind is kind
        for r in a.reasons
    ]


def test_never_issued_plans_issue_then_deploy_to_every_placement() -> None:
    c = cert(placements=(P_FILES, P_LB))
    p = plan(inventory(c), observed([]), NOW)
    assert [(a.kind, a.placement) for a in p.actions] == [
        (ActionKind.ISSUE, None),
        (ActionKind.DEPLOY, "files"),
        (ActionKind.DEPLOY, "lb"),
    ]
    assert p.actions[0].reasons[0].code == R.NOT_ISSUED
    assert {a.reasons[0].code for a in p.actions[1:]} == {R.NEW_VERSION}
    assert p.counts() == {"issue": 1, "renew": 0, "deploy": 2, "revoke": 0, "retire": 0}


def test_up_to_date_is_a_noop() -> None:
    c = cert()
    _, obs = up_to_date(c)
    p = plan(inventory(c), obs, NOW)
    assert p.actions == ()
    assert not p.has_changes


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"issuer": "other"}, R.ISSUER_CHANGED),
        ({"key": KeySpec("rsa", 3072)}, R.KEY_CHANGED),
        ({"sans": ("example.com", "new.example.com")}, R.NAMES_CHANGED),
        ({"ttl_s": 20 * 86400}, R.PROFILE_CHANGED),
    ],
)
def test_spec_changes_renew_with_their_reason(change: dict[str, object], code: str) -> None:
    c = cert()
    _, obs = up_to_date(c)
    p = plan(inventory(cert(**change)), obs, NOW)
    assert p.actions[0].kind is ActionKind.RENEW
    assert p.actions[0].reasons[0].code == code
    # every placement gets the new version
    assert [a.kind for a in p.actions[1:]] == [ActionKind.DEPLOY]


def test_names_change_message_lists_added_and_removed() -> None:
    c = cert()
    _, obs = up_to_date(c)
    p = plan(inventory(cert(sans=("new.example.com",))), obs, NOW)
    msg = p.actions[0].reasons[0].message
    assert "+new.example.com" in msg and "-example.com" in msg


def test_profile_change_renews() -> None:
    c = cert()
    _, obs = up_to_date(c)
    inv = inventory(c)
    inv = replace(inv, profiles={"tls": replace(PROFILE, ekus=("serverAuth", "clientAuth"))})
    p = plan(inv, obs, NOW)
    assert codes(p, ActionKind.RENEW) == [R.PROFILE_CHANGED]


def test_reasons_are_ordered_and_all_listed() -> None:
    c = cert()
    _, obs = up_to_date(c, issued=NOW - timedelta(days=29))
    changed = cert(issuer="other", sans=("x.example.com",))
    p = plan(inventory(changed), obs, NOW)
    assert codes(p, ActionKind.RENEW) == [R.ISSUER_CHANGED, R.NAMES_CHANGED, R.RENEWAL_WINDOW]


def test_renewal_window_fraction_with_fake_clock() -> None:
    c = cert()  # 30 days, renew with 1/3 left => around day 20 (jitter pulls it earlier)
    v = version(c, issued=NOW)
    due = renewal_time(c, v)
    assert NOW + timedelta(days=19) <= due <= NOW + timedelta(days=20)
    rec = CertRecord(c.name, v)
    obs = observed([rec], [deployed(c, v)], [match(c)])
    assert plan(inventory(c), obs, due - timedelta(seconds=1)).actions == ()
    p = plan(inventory(c), obs, due)
    assert codes(p, ActionKind.RENEW) == [R.RENEWAL_WINDOW]


def test_renewal_window_duration() -> None:
    c = cert(renew_before=RenewBefore(fraction=None, seconds=2 * 86400))
    v = version(c, issued=NOW)
    due = renewal_time(c, v)
    assert (
        v.not_after - timedelta(days=2, hours=4, minutes=49)
        <= due
        <= v.not_after - timedelta(days=2)
    )


def test_jitter_is_deterministic_and_spreads_a_fleet() -> None:
    certs = [cert(f"c{i}") for i in range(200)]
    times = {renewal_time(c, version(c, issued=NOW)) for c in certs}
    assert len(times) > 150  # spread, not one burst
    c = certs[0]
    assert renewal_time(c, version(c, issued=NOW)) == renewal_time(c, version(c, issued=NOW))


def test_expired_renews_with_expired_reason() -> None:
    c = cert()
    _, obs = up_to_date(c, issued=NOW - timedelta(days=40))
    assert codes(plan(inventory(c), obs, NOW), ActionKind.RENEW) == [R.EXPIRED]


def test_forced_renewal_by_option_and_by_state_flag() -> None:
    c = cert()
    rec, obs = up_to_date(c)
    assert codes(plan(inventory(c), obs, NOW, PlanOptions(force=frozenset({"www"})))) == [
        R.FORCED,
        R.NEW_VERSION,
    ]
    flagged = observed([replace(rec, force_renew=True)], [deployed(c, rec.current)], [match(c)])  # type: ignore[arg-type]
    assert codes(plan(inventory(c), flagged, NOW), ActionKind.RENEW) == [R.FORCED]


def test_revoked_current_is_replaced() -> None:
    c = cert()
    _, obs = up_to_date(c, status="revoked")
    assert codes(plan(inventory(c), obs, NOW), ActionKind.RENEW) == [R.CURRENT_REVOKED]


def test_new_target_deploys_without_reissuing() -> None:
    c = cert()
    rec, obs = up_to_date(c)
    c2 = cert(placements=(P_FILES, P_LB))
    obs = observed(
        [rec],
        [deployed(c, rec.current)],  # type: ignore[arg-type]
        [match(c), TargetObservation("www", "lb", TargetState.MISSING, detail="a.pem missing")],
    )
    p = plan(inventory(c2), obs, NOW)
    assert [(a.kind, a.placement, a.reasons[0].code) for a in p.actions] == [
        (ActionKind.DEPLOY, "lb", R.NEW_TARGET)
    ]


def test_missing_and_differing_files_redeploy() -> None:
    c = cert()
    rec, _ = up_to_date(c)
    dep = deployed(c, rec.current)  # type: ignore[arg-type]
    missing = observed(
        [rec],
        [dep],
        [TargetObservation("www", "files", TargetState.MISSING, detail="cert.pem missing")],
    )
    assert codes(plan(inventory(c), missing, NOW)) == [R.MISSING_ON_TARGET]
    differs = observed(
        [rec], [dep], [TargetObservation("www", "files", TargetState.DIFFERS, detail="key differs")]
    )
    p = plan(inventory(c), differs, NOW)
    assert codes(p) == [R.CONTENT_DIFFERS]
    assert "key differs" in p.actions[0].reasons[0].message


def test_unknown_observation_does_not_act_and_unobserved_uses_records() -> None:
    c = cert()
    rec, _ = up_to_date(c)
    dep = deployed(c, rec.current)  # type: ignore[arg-type]
    unknown = observed([rec], [dep], [TargetObservation("www", "files", TargetState.UNKNOWN)])
    assert plan(inventory(c), unknown, NOW).actions == ()
    old = replace(dep, version=0, fingerprint="0" * 64)
    assert codes(plan(inventory(c), observed([rec], [old]), NOW)) == [R.OUTDATED_ON_TARGET]
    failed = replace(dep, status="failed")
    assert codes(plan(inventory(c), observed([rec], [failed]), NOW)) == [R.LAST_DEPLOY_FAILED]


def test_on_target_but_unrecorded_is_recorded() -> None:
    c = cert()
    rec, _ = up_to_date(c)
    p = plan(inventory(c), observed([rec], [], [match(c)]), NOW)
    assert codes(p) == [R.NOT_RECORDED]


def test_removed_certificate_revokes_or_retires() -> None:
    c = cert()
    v = version(c)
    keep = cert("keep")
    rec_keep, _ = up_to_date(keep)
    revoke = CertRecord("www", v, revoke_on_remove=True)
    obs = observed([revoke, rec_keep], [deployed(keep, rec_keep.current)], [match(keep)])  # type: ignore[arg-type]
    p = plan(inventory(keep), obs, NOW)
    assert [(a.kind, a.cert, a.reasons[0].code) for a in p.actions] == [
        (ActionKind.REVOKE, "www", R.REMOVED_REVOKE)
    ]
    assert p.actions[0].details["retire"] is True
    retire = CertRecord("www", v)
    p = plan(
        inventory(keep),
        observed([retire, rec_keep], [deployed(keep, rec_keep.current)], [match(keep)]),
        NOW,
    )  # type: ignore[arg-type]
    assert [(a.kind, a.reasons[0].code) for a in p.actions] == [(ActionKind.RETIRE, R.REMOVED)]
    gone = CertRecord("www", v, retired=True)
    assert (
        plan(
            inventory(keep),
            observed([gone, rec_keep], [deployed(keep, rec_keep.current)], [match(keep)]),
            NOW,
        ).actions
        == ()
    )  # type: ignore[arg-type]


def test_revoked_true_in_inventory_revokes_once() -> None:
    c = cert(revoked=True, revoke_reason="keyCompromise")
    _, obs = up_to_date(cert())
    p = plan(inventory(c), obs, NOW)
    assert [(a.kind, a.reasons[0].code) for a in p.actions] == [
        (ActionKind.REVOKE, R.REVOKED_IN_INVENTORY)
    ]
    assert p.actions[0].details["revocation_reason"] == "keyCompromise"
    _, obs2 = up_to_date(cert(), status="revoked")
    assert plan(inventory(c), obs2, NOW).actions == ()


def test_backoff_holds_back_until_time_or_spec_change() -> None:
    c = cert()
    from certctl.plan.planner import spec_digest

    rec = CertRecord(
        "www",
        None,
        failures=3,
        next_attempt_at=NOW + timedelta(hours=4),
        spec_digest=spec_digest(c, PROFILE),
    )
    p = plan(inventory(c), observed([rec]), NOW)
    assert p.actions == () and "3 failed attempt" in p.skipped["www"]
    assert codes(plan(inventory(c), observed([rec]), NOW + timedelta(hours=5)))[0] == R.NOT_ISSUED
    changed = cert(sans=("fixed.example.com",))
    assert codes(plan(inventory(changed), observed([rec]), NOW))[0] == R.NOT_ISSUED


def test_input_digest_tracks_inputs_not_clock() -> None:
    c = cert()
    _, obs = up_to_date(c)
    a = plan(inventory(c), obs, NOW)
    b = plan(inventory(c), obs, NOW + timedelta(hours=1))
    assert a.input_digest == b.input_digest
    changed_inv = replace(inventory(c), digest="d2")
    assert plan(changed_inv, obs, NOW).input_digest != a.input_digest
    changed_state = Observed(replace(obs.state, generation=8), obs.targets)
    assert plan(inventory(c), changed_state, NOW).input_digest != a.input_digest


def test_only_restricts_the_plan() -> None:
    a, b = cert("a"), cert("b")
    p = plan(inventory(a, b), observed([]), NOW, PlanOptions(only=frozenset({"b"})))
    assert {x.cert for x in p.actions} == {"b"}


def test_renderers_round_trip_and_summarise() -> None:
    c = cert(placements=(P_FILES, P_LB))
    p = plan(inventory(c, cert("api")), observed([]), NOW)
    text = render_text(p)
    assert "+ issue www" in text and "~ deploy www -> lb" in text
    assert text.rstrip().endswith(
        "Plan: 2 to issue, 0 to renew, 3 to deploy, 0 to revoke, 0 to retire."
    )
    data = json.loads(render_json(p))
    assert data["summary"]["deploy"] == 3 and data["input_digest"] == p.input_digest
    back = plan_from_json(render_json(p))
    assert back.actions == p.actions and back.input_digest == p.input_digest
    md = render_markdown(p)
    assert "| + issue | 2 |" in md and "<details>" in md


def test_plan_json_rejects_tampering() -> None:
    from certctl.errors import CertctlError

    c = cert()
    data = json.loads(render_json(plan(inventory(c), observed([]), NOW)))
    data["actions"][0]["kind"] = "destroy"
    with pytest.raises(CertctlError, match="not a valid certctl plan"):
        plan_from_json(json.dumps(data), "p.json")
    with pytest.raises(CertctlError, match="not a JSON plan"):
        plan_from_json("{nope", "p.json")


def test_no_changes_text() -> None:
    c = cert()
    _, obs = up_to_date(c)
    assert render_text(plan(inventory(c), obs, NOW)).startswith("No changes.")


def test_unknown_observation_falls_back_to_the_deployment_record() -> None:
    """A target that cannot be read back must not hide a deploy that failed or never
    happened (found in review: a failed deploy was forgotten, plan said no changes)."""
    c = cert()
    rec, _ = up_to_date(c)
    unknown = [TargetObservation("www", "files", TargetState.UNKNOWN, detail="EACCES")]
    assert codes(plan(inventory(c), observed([rec], [], unknown), NOW)) == [R.NEW_TARGET]
    old = replace(deployed(c, rec.current), version=0, fingerprint="0" * 64)  # type: ignore[arg-type]
    assert codes(plan(inventory(c), observed([rec], [old], unknown), NOW)) == [R.OUTDATED_ON_TARGET]


def test_force_lifts_the_backoff() -> None:
    from certctl.plan.planner import spec_digest

    c = cert()
    rec = CertRecord(
        "www",
        None,
        failures=2,
        next_attempt_at=NOW + timedelta(days=9),
        spec_digest=spec_digest(c, PROFILE),
    )
    assert plan(inventory(c), observed([rec]), NOW).actions == ()
    forced = plan(inventory(c), observed([rec]), NOW, PlanOptions(force=frozenset({"www"})))
    assert codes(forced, ActionKind.ISSUE) == [R.NOT_ISSUED]
    assert "blocked until" in plan(inventory(c), observed([rec]), NOW).skipped["www"]


@pytest.mark.parametrize(
    "renew_before", [RenewBefore(fraction=0.95), RenewBefore(None, 29 * 86400)]
)
def test_a_window_as_long_as_the_lifetime_does_not_renew_every_run(
    renew_before: RenewBefore,
) -> None:
    c = cert(renew_before=renew_before)  # 30d certificates
    for serial in ("01", "02", "03", "04", "05", "06"):
        v = version(c, issued=NOW - timedelta(hours=1), serial=serial)
        due = renewal_time(c, v)
        assert due > v.not_before + timedelta(days=1), serial
        rec = CertRecord(c.name, v)
        dep = deployed(c, v)
        assert plan(inventory(c), observed([rec], [dep], [match(c)]), NOW).actions == ()


def test_saved_plan_keeps_its_options() -> None:
    from certctl.plan.planner import options_of

    c = cert()
    _, obs = up_to_date(c)
    p = plan(inventory(c), obs, NOW, PlanOptions(force=frozenset({"www"})))
    back = plan_from_json(render_json(p))
    assert options_of(back) == PlanOptions(force=frozenset({"www"}))
    assert plan(inventory(c), obs, NOW, options_of(back)).input_digest == p.input_digest

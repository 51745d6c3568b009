"""The planner's ARI (RFC 9773) decisions with a fake clock: renew at a deterministic
random moment inside the CA's suggested window, and say so."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path

import jsonschema

from certctl.model import ActionKind, Certificate, CertRecord, Observed, VersionRecord
from certctl.plan import reasons as R
from certctl.plan.planner import ari_renewal_time, plan, renewal_time
from certctl.plan.render import render_json
from tests.unit.test_planner import NOW, cert, deployed, inventory, match, observed, version

SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "plan.schema.json"


def with_window(obs: Observed, name: str, start: datetime, end: datetime) -> Observed:
    return replace(obs, renewal_windows={name: (start, end)})


def setup(window_days: tuple[float, float]) -> tuple[Certificate, VersionRecord, Observed]:
    c = cert()  # 30 days, issued NOW: configured renewal around day 19-20
    v = version(c, issued=NOW)
    base = observed([CertRecord(c.name, v)], [deployed(c, v)], [match(c)])
    start = NOW + timedelta(days=window_days[0])
    end = NOW + timedelta(days=window_days[1])
    return c, v, with_window(base, c.name, start, end)


def test_renews_at_a_moment_inside_the_window_not_before() -> None:
    c, v, obs = setup((5, 7))
    start, end = obs.renewal_windows[c.name]
    due = ari_renewal_time(c, v, (start, end))
    assert start <= due < end
    assert due < renewal_time(c, v)  # earlier than configured
    inv = inventory(c)
    assert plan(inv, obs, start).actions == ()
    assert plan(inv, obs, due - timedelta(seconds=1)).actions == ()
    p = plan(inv, obs, due)
    renew = [a for a in p.actions if a.kind is ActionKind.RENEW]
    assert len(renew) == 1
    (reason,) = renew[0].reasons
    assert reason.code == R.ARI_WINDOW
    assert reason.message == (
        f"ARI suggests renewal between {start.isoformat()} and {end.isoformat()}"
    )
    assert [a.kind for a in p.actions[1:]] == [ActionKind.DEPLOY]


def test_moment_is_deterministic_and_spreads_certificates_over_the_window() -> None:
    c, v, obs = setup((5, 7))
    window = obs.renewal_windows[c.name]
    assert ari_renewal_time(c, v, window) == ari_renewal_time(c, v, window)
    moments = {
        ari_renewal_time(cert(f"c{i}"), version(cert(f"c{i}"), issued=NOW), window)
        for i in range(50)
    }
    assert len(moments) == 50
    assert all(window[0] <= m < window[1] for m in moments)
    span = max(moments) - min(moments)
    assert span > (window[1] - window[0]) / 2  # not bunched at one end


def test_window_in_the_past_renews_now() -> None:
    # a CA that revoked in an incident moves the window before now
    c, _v, obs = setup((-2, -1))
    p = plan(inventory(c), obs, NOW)
    assert [r.code for a in p.actions if a.kind is ActionKind.RENEW for r in a.reasons] == [
        R.ARI_WINDOW
    ]


def test_window_later_than_configured_renewal_does_not_delay_it() -> None:
    c, v, obs = setup((25, 27))
    due = renewal_time(c, v)
    assert plan(inventory(c), obs, due - timedelta(seconds=1)).actions == ()
    p = plan(inventory(c), obs, due)
    assert [r.code for a in p.actions if a.kind is ActionKind.RENEW for r in a.reasons] == [
        R.RENEWAL_WINDOW
    ]
    later = plan(inventory(c), obs, NOW + timedelta(days=27))
    codes = [r.code for a in later.actions if a.kind is ActionKind.RENEW for r in a.reasons]
    assert codes == [R.ARI_WINDOW, R.RENEWAL_WINDOW]


def test_no_window_keeps_the_configured_behaviour_and_the_digest() -> None:
    c, _v, obs = setup((5, 7))
    bare = replace(obs, renewal_windows={})
    assert plan(inventory(c), bare, NOW + timedelta(days=8)).actions == ()
    # a window is part of the plan's input: a saved plan made before it changed is stale
    assert bare.digest() != obs.digest()
    moved = with_window(obs, c.name, NOW + timedelta(days=6), NOW + timedelta(days=7))
    assert moved.digest() != obs.digest()


def test_reason_code_is_in_the_plan_schema() -> None:
    c, _v, obs = setup((-2, -1))
    p = plan(inventory(c), obs, NOW)
    doc = json.loads(render_json(p))
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert R.ARI_WINDOW in json.dumps(doc)

"""The pure half of notifications: thresholds (default, per profile, per owner), the
lifetime rule, routing by owner/team and notifier ``events`` (real inventory loader,
state snapshot built by hand, fixed clock)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from certctl.connectors import default_registry
from certctl.errors import InventoryError
from certctl.inventory import load_inventory
from certctl.model import CertRecord, Inventory, StateSnapshot, VersionRecord
from certctl.notify import events as E

NOW = datetime(2026, 6, 1, tzinfo=UTC)

YAML = """
issuers:
  ca: {type: local_ca, root: {common_name: Events CA}}
profiles:
  tls: {ekus: [serverAuth]}
  early: {ekus: [serverAuth], expiry_warnings: [60, 21]}
targets:
  files: {type: file, root: out, cert_path: "{{ cert.name }}.pem", key_path: "{{ cert.name }}.key"}
defaults: {issuer: ca, profile: tls, ttl: 90d}
teams:
  sre: {members: [a@example.test, b@example.test]}
owners:
  web: {email: web@example.test, team: sre}
  solo: {email: solo@example.test, notify: [pd], expiry_warnings: [3]}
notifiers:
  hook: {type: webhook, url: "http://127.0.0.1:9/hook", events: [expiring]}
  pd: {type: pagerduty, routing_key: {env: PD_KEY}}
  failures: {type: webhook, url: "http://127.0.0.1:9/f", events: [failed]}
certificates:
  plain: {common_name: plain.example.test, owner: web, targets: [files]}
  early: {common_name: early.example.test, profile: early, owner: web, targets: [files]}
  solo: {common_name: solo.example.test, profile: early, owner: solo, targets: [files]}
  gone: {common_name: gone.example.test, revoked: true, targets: [files]}
"""


@pytest.fixture
def inv(tmp_path: Path) -> Inventory:
    (tmp_path / "inv.yaml").write_text(YAML, encoding="utf-8")
    return load_inventory(tmp_path / "inv.yaml", default_registry())


def snapshot(left: dict[str, timedelta], lifetime: timedelta = timedelta(days=90)) -> StateSnapshot:
    certs = {}
    for name, remaining in left.items():
        end = NOW + remaining
        v = VersionRecord(
            name,
            1,
            f"{len(name):02x}ab",
            end - lifetime,
            end,
            "f" * 64,
            "ca",
            "ecdsa-p256",
            (f"{name}.example.test",),
            "d",
        )
        certs[name] = CertRecord(name, v)
    return StateSnapshot(certs=certs, deployments={})


def test_thresholds_default_profile_and_owner(inv: Inventory) -> None:
    snap = snapshot({n: timedelta(days=25) for n in ("plain", "early", "solo", "gone")})
    found = {e.cert: e for e in E.expiry_events(inv, snap, NOW)}
    assert found["plain"].key == "expiring:plain:05ab:30"  # default 30/14/7/0
    assert found["early"].facts["threshold_days"] == 60  # profile [60, 21]: 60 crossed
    assert "solo" not in found  # owner's [3] wins over the profile's
    assert "gone" not in found  # revoked in the inventory
    snap = snapshot({"plain": timedelta(days=6), "solo": timedelta(days=2)})
    found = {e.cert: e for e in E.expiry_events(inv, snap, NOW)}
    assert found["plain"].facts["threshold_days"] == 7 and found["plain"].severity == "warning"
    assert found["solo"].facts["threshold_days"] == 3
    expired = E.expiry_events(inv, snapshot({"plain": -timedelta(hours=1)}), NOW)
    assert expired[0].key.endswith(":0") and expired[0].severity == "critical"


def test_thresholds_as_long_as_the_lifetime_are_ignored(inv: Inventory) -> None:
    month = timedelta(days=30)
    # a 30-day certificate is not "expiring" at 30 days: the 30 threshold is skipped
    assert E.expiry_events(inv, snapshot({"plain": timedelta(days=29)}, month), NOW) == []
    found = E.expiry_events(inv, snapshot({"plain": timedelta(days=13)}, month), NOW)
    assert found[0].facts["threshold_days"] == 14
    # a 90-day one is, at 29 days left
    found = E.expiry_events(inv, snapshot({"plain": timedelta(days=29)}), NOW)
    assert found[0].facts["threshold_days"] == 30


def test_routing_by_owner_team_and_events(inv: Inventory) -> None:
    evs = E.expiry_events(
        inv, snapshot({"plain": timedelta(days=1), "solo": timedelta(days=1)}), NOW
    )
    routed = {(d.event.cert, d.notifier): d.payload for d in E.route(inv, evs)}
    # plain (owner web): every notifier that takes `expiring` (hook; pd takes all)
    assert set(routed) == {("plain", "hook"), ("plain", "pd"), ("solo", "pd")}
    assert routed[("plain", "hook")]["recipients"] == [
        "web@example.test",
        "a@example.test",
        "b@example.test",
    ]
    assert routed[("plain", "hook")]["team"] == "sre"
    fail = E.failure_events(
        7,
        [
            {
                "event": "deploy.failed",
                "run_id": 7,
                "cert": "plain",
                "placement": "files",
                "detail": {"error": "disk full"},
            },
            {"event": "deploy.failed", "run_id": 6, "cert": "plain", "placement": "files"},
            {"event": "deploy", "run_id": 7, "cert": "early"},
        ],
    )
    assert [e.key for e in fail] == ["failed:7:deploy:plain:files"]
    assert {d.notifier for d in E.route(inv, fail)} == {"pd", "failures"}


def test_notifier_config_is_checked_at_load(tmp_path: Path) -> None:
    bad = YAML.replace("routing_key: {env: PD_KEY}", "routing_key: plain-text-key")
    (tmp_path / "inv.yaml").write_text(bad, encoding="utf-8")
    with pytest.raises(InventoryError, match=r"notifiers\.pd\.routing_key"):
        load_inventory(tmp_path / "inv.yaml", default_registry())
    bad = YAML.replace("expiry_warnings: [3]", "expiry_warnings: [-1]")
    (tmp_path / "inv.yaml").write_text(bad, encoding="utf-8")
    with pytest.raises(InventoryError, match="expiry_warnings"):
        load_inventory(tmp_path / "inv.yaml", default_registry())

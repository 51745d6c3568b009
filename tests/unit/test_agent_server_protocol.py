"""The agent protocol's signing rules and the server's replay cache (pure)."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from certctl.agent import protocol as P
from certctl.agent.guards import ReplayCache
from certctl.model import KeySpec

NOW = 1_800_000_000.0
AID = "a" * 32


def _signed(
    method: str = "POST", path: str = "/agent/v1/heartbeat", body: bytes = b"{}"
) -> tuple[ed25519.Ed25519PrivateKey, dict[str, str]]:
    key = ed25519.Ed25519PrivateKey.generate()
    return key, P.sign_request(key, AID, method, path, body, NOW)


def test_signature_covers_method_path_query_time_nonce_and_body() -> None:
    key, h = _signed("GET", "/agent/v1/work?wait=30", b"")
    pub = key.public_key()
    P.verify_request(pub, h, "GET", "/agent/v1/work?wait=30", b"", NOW + 299)
    lower = {k.lower(): v for k, v in h.items()}  # header names are case-insensitive
    P.verify_request(pub, lower, "GET", "/agent/v1/work?wait=30", b"", NOW)
    for method, path, body in (
        ("POST", "/agent/v1/work?wait=30", b""),
        ("GET", "/agent/v1/work?wait=31", b""),
        ("GET", "/agent/v1/work", b""),
        ("GET", "/agent/v1/work?wait=30", b"x"),
    ):
        with pytest.raises(P.AuthError, match="bad request signature"):
            P.verify_request(pub, h, method, path, body, NOW)
    for field, value in ((P.HEADER_TIME, str(int(NOW) + 1)), (P.HEADER_NONCE, "b" * 32)):
        with pytest.raises(P.AuthError, match="bad request signature"):
            P.verify_request(pub, {**h, field: value}, "GET", "/agent/v1/work?wait=30", b"", NOW)


def test_time_window_wrong_key_and_malformed_headers() -> None:
    key, h = _signed()
    with pytest.raises(P.AuthError, match="300 s"):
        P.verify_request(key.public_key(), h, "POST", "/agent/v1/heartbeat", b"{}", NOW + 301)
    with pytest.raises(P.AuthError, match="300 s"):
        P.verify_request(key.public_key(), h, "POST", "/agent/v1/heartbeat", b"{}", NOW - 301)
    other = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(P.AuthError, match="bad request signature"):
        P.verify_request(other, h, "POST", "/agent/v1/heartbeat", b"{}", NOW)
    bad = {
        P.HEADER_AGENT: "../etc",
        P.HEADER_TIME: "-5",
        P.HEADER_NONCE: "Z" * 32,
        P.HEADER_SIGNATURE: base64.b64encode(b"x" * 10).decode(),
    }
    for name, value in bad.items():
        with pytest.raises(P.AuthError, match="malformed"):
            P.parse_headers({**h, name: value})
    missing = dict(h)
    del missing[P.HEADER_NONCE]
    with pytest.raises(P.AuthError, match="missing"):
        P.parse_headers(missing)


def test_replay_cache_window_and_bound() -> None:
    cache = ReplayCache(window=300, limit=3)
    assert cache.add("n1", 0) is True
    assert cache.add("n1", 299) is False  # replayed within the window
    assert cache.add("n2", 1) and cache.add("n3", 2)
    assert cache.add("n4", 3) is None  # full: refused, nothing forgotten early
    assert cache.add("n1", 300) is True  # n1 expired: space again (and it is new again)
    assert len(cache) == 3


def test_key_body_round_trip_and_selectors() -> None:
    for spec in (KeySpec("ecdsa", 384), KeySpec("rsa", 3072, "never"), KeySpec("ed25519", 256)):
        back = P.key_spec_of(P.key_body(spec))
        assert (back.id, back.rotation, back.custody) == (spec.id, spec.rotation, "target")
    with pytest.raises(P.ProtocolError):
        P.key_spec_of({"type": "dsa"})
    assert P.selector_matches({"name": "a"}, "a", {}, None)
    assert not P.selector_matches({"name": "a"}, "b", {}, None)
    sel = {"labels": {"site": "x"}, "os": "Linux"}
    assert P.selector_matches(sel, "n", {"site": "x", "more": "y"}, "linux")
    assert not P.selector_matches(sel, "n", {"site": "x"}, "darwin")
    assert not P.selector_matches(sel, "n", {"site": "z"}, "linux")
    assert P.describe_selector(sel) == "labels site=x os Linux"
    assert P.decode_public_key(P.encode_public_key(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(P.ProtocolError):
        P.decode_public_key(base64.b64encode(b"short").decode())

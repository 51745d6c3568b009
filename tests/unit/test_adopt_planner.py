"""Adoption without I/O: the planner's "observe only" rule, the configuration parsers
and the key and name mapping."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from certctl.adopt.certbot import parse_conf
from certctl.adopt.model import AdoptError, key_mapping, safe_name
from certctl.model import ActionKind, CertRecord, Observed, StateSnapshot, TargetObservation
from certctl.model import TargetState as TS
from certctl.plan.planner import OBSERVED_CUSTODY, plan
from tests.unit.test_planner import NOW, P_FILES, cert, inventory, version


def _observed(c, v, state: TS) -> Observed:  # type: ignore[no-untyped-def]
    snap = StateSnapshot(certs={c.name: CertRecord(c.name, v)}, deployments={})
    obs = {(c.name, P_FILES.id): TargetObservation(c.name, P_FILES.id, state)}
    return Observed(snap, obs)


def test_observed_version_is_never_deployed_before_renewal() -> None:
    c = cert()
    v = version(c, key_custody=OBSERVED_CUSTODY)
    for state in (TS.MISSING, TS.DIFFERS, TS.MATCH):
        assert plan(inventory(c), _observed(c, v, state), NOW).actions == ()


def test_observed_version_renews_in_its_window_with_deploys() -> None:
    c = cert()
    v = version(c, key_custody=OBSERVED_CUSTODY)
    later = v.not_after - timedelta(days=2)
    p = plan(inventory(c), _observed(c, v, TS.MATCH), later)
    assert [a.kind for a in p.actions] == [ActionKind.RENEW, ActionKind.DEPLOY]
    assert p.actions[0].reasons[0].code == "renewal_window"


def test_observed_custody_is_not_a_key_change_but_the_key_type_is() -> None:
    c = cert()
    v = version(c, key_custody=OBSERVED_CUSTODY, key_spec="rsa-2048")
    p = plan(inventory(c), _observed(c, v, TS.MATCH), NOW)
    assert [r.code for r in p.actions[0].reasons] == ["key_changed"]


def test_certbot_conf_parser_names_file_and_line() -> None:
    conf = parse_conf(
        b"cert = /x/live/a/cert.pem\n[renewalparams]\nserver = 'https://ca/dir'\n"
        b"[[webroot_map]]\na = /var/www\n",
        "r.conf",
    )
    assert conf.top["cert"] == ("/x/live/a/cert.pem", 1)
    assert conf.params["server"] == ("https://ca/dir", 3)
    assert conf.webroot_map["a"] == ("/var/www", 5)
    with pytest.raises(AdoptError, match=r"^r.conf:2: expected 'key = value'"):
        parse_conf(b"a = 1\nbroken\n", "r.conf")
    with pytest.raises(AdoptError, match=r"^r.conf:3: not UTF-8"):
        parse_conf(b"a = 1\n\nb = \xff\n", "r.conf")


def test_key_mapping_and_names() -> None:
    assert key_mapping(ec.generate_private_key(ec.SECP384R1()).public_key()) == {
        "type": "ecdsa",
        "curve": "P-384",
    }
    with pytest.raises(AdoptError, match="unsupported curve"):
        key_mapping(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(AdoptError, match="RSA 2048, 3072 or 4096"):
        key_mapping(rsa.generate_private_key(65537, 1024).public_key())
    assert safe_name("*.example.com") == "example.com"
    assert safe_name("a b/c") == "a-b-c"


def test_certbot_authenticators_map_to_challenges() -> None:
    from pathlib import Path

    from certctl.adopt.certbot import CertbotImport

    imp = CertbotImport(Path("/nonexistent"))

    def challenge(params: bytes) -> tuple[dict[str, object], list[str]]:
        notes: list[str] = []
        conf = parse_conf(b"[renewalparams]\n" + params, "r.conf")
        return imp._challenge(conf, "x", notes), notes

    assert challenge(b"authenticator = standalone\nhttp01_port = 8080\n")[0] == {
        "type": "http-01",
        "responder": {"listen": "0.0.0.0:8080"},
    }
    got, notes = challenge(
        b"authenticator = webroot\nwebroot_path = /srv/a,\n[[webroot_map]]\nx = /srv/b\n"
    )
    assert got == {"type": "http-01", "webroot": {"path": "/srv/a"}}
    assert "several webroots" in notes[0]
    got, notes = challenge(b"authenticator = dns-cloudflare\n")
    assert got["type"] == "dns-01" and "dns-cloudflare" in notes[0]
    with pytest.raises(AdoptError, match=r"r.conf:3: http01_port"):
        challenge(b"authenticator = standalone\nhttp01_port = eighty\n")


def test_certbot_conf_values_are_configobjs() -> None:
    """What certbot (configobj) reads: inline comments dropped, quotes and triple quotes
    removed, multi-line values kept whole, lists joined; errors keep file:line."""
    conf = parse_conf(
        b"renew_before_expiry = 20 days  # hand-edited\n"
        b"[renewalparams]\n"
        b"renew_hook = '''echo \"it's\"'''  # from --deploy-hook\n"
        b"post_hook = '''echo a\n"
        b"echo b # two lines\n"
        b"'''\n"
        b"webroot_path = /var/www/a, /var/www/b,\n"
        b"server = https://ca/dir # staging\n",
        "r.conf",
    )
    assert conf.top["renew_before_expiry"] == ("20 days", 1)
    assert conf.params["renew_hook"] == ('echo "it\'s"', 3)
    assert conf.params["post_hook"] == ("echo a\necho b # two lines\n", 4)
    assert conf.params["webroot_path"] == ("/var/www/a, /var/www/b", 7)
    assert conf.params["server"] == ("https://ca/dir", 8)
    with pytest.raises(AdoptError, match=r"^r.conf:2: .*[Dd]uplicate"):
        parse_conf(b"a = 1\na = 2\n", "r.conf")
    with pytest.raises(AdoptError, match=r"^r.conf:1: "):
        parse_conf(b'a = "unterminated\n', "r.conf")


def test_acmesh_base64_value_with_nul_names_file_and_line() -> None:
    import base64

    from certctl.adopt.acmesh import B64_END, B64_START
    from certctl.adopt.acmesh import parse_conf as parse_acmesh

    enc = base64.b64encode(b"systemctl reload nginx\x00; rm -rf /").decode()
    with pytest.raises(AdoptError, match=r"^d.conf:2: Le_ReloadCmd holds a NUL"):
        parse_acmesh(
            f"Le_Domain='d'\nLe_ReloadCmd='{B64_START}{enc}{B64_END}'\n".encode(), "d.conf"
        )

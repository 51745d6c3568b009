"""The loader's building blocks: names, durations and keys, rules, templates, YAML."""

from __future__ import annotations

import jinja2
import jinja2.sandbox
import pytest

from certctl.inventory import names, values, yamlload
from certctl.inventory.policy import Rules, Subject
from certctl.inventory.templating import Renderer, TemplateProblem
from certctl.model import KeySpec, Policy, Profile, RenewBefore


@pytest.mark.parametrize(
    "name",
    [
        "example.com",
        "www.example.com",
        "localhost",
        "a-b.c-d.example",
        "xn--bcher-kva.example",
        "*.example.com",
        "*.a.example.com",
        "10.0.0.1",
        "::1",
        "2001:db8::1",
        "A.EXAMPLE.COM",
        "a" * 63 + ".com",
        ".".join(["a" * 61] * 4),  # 247 characters
    ],
)
def test_valid_names(name: str) -> None:
    assert names.name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("exa mple.com", "invalid name 'exa mple.com'"),
        ("a.com; rm -rf /", "invalid name 'a.com; rm -rf /'"),
        ("a_b.com", "invalid name 'a_b.com'"),
        ("example.com.", "invalid name 'example.com.' (empty label)"),
        ("a..b", "invalid name 'a..b' (empty label)"),
        ("-a.com", "invalid name '-a.com' (a label cannot start or end with '-')"),
        (
            "*.com",
            "invalid wildcard '*.com' (a wildcard needs at least two labels after '*.', "
            "as in *.example.com)",
        ),
        ("*", "invalid wildcard '*' (as in *.example.com)"),
        ("1.2.3.999", "invalid name '1.2.3.999' (neither an IP address nor a DNS name)"),
        ("fe80::1%eth0", "invalid name 'fe80::1%eth0' (an IP address with a zone index)"),
        ("", "invalid name '' (empty)"),
        ("a\x00.com", "invalid name 'a\\x00.com'"),
        (
            "a@example.com",
            "invalid name 'a@example.com' (e-mail addresses need a profile with "
            "the emailProtection EKU)",
        ),
        ("a" * 254, "name is too long (254 characters, at most 253)"),
    ],
)
def test_invalid_names(name: str, message: str) -> None:
    assert names.name_problem(name) == message


def test_email_names_need_permission_and_wildcards_can_be_refused() -> None:
    assert names.name_problem("alice@example.com", allow_email=True) is None
    assert names.name_problem("alice@*.example.com", allow_email=True) == (
        "invalid name 'alice@*.example.com'"
    )
    assert "wildcard is not allowed" in str(names.name_problem("*.a.com", allow_wildcard=False))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("1y", 365 * 86400), ("2w", 14 * 86400),
     ("1d12h", 129600), ("45s", 45), (3600, 3600), ("3600", 3600), (7200.0, 7200)],
)  # fmt: skip
def test_durations(text: object, seconds: int) -> None:
    assert values.parse_duration(text) == (seconds, None)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0d", "a duration must be positive, got '0d'"),
        ("101y", "duration '101y' is too long (at most 100y)"),
        ("90 days", "expected a duration such as 90d, 12h, 30m or 1y, got '90 days'"),
        (1.5, "expected a whole number of seconds, got 1.5"),
        (True, "expected a duration, got true"),
    ],
)
def test_bad_durations(text: object, problem: str) -> None:
    assert values.parse_duration(text) == (None, problem)


def test_format_duration() -> None:
    assert [values.format_duration(s) for s in (7776000, 86400 * 7, 5400, 61, 730 * 86400)] == [
        "90d",
        "7d",
        "90m",
        "61s",
        "2y",
    ]


def test_renew_before_forms() -> None:
    assert values.parse_renew_before("33%") == (RenewBefore(fraction=0.33), None)
    assert values.parse_renew_before(0.25) == (RenewBefore(fraction=0.25), None)
    assert values.parse_renew_before("30d") == (RenewBefore(None, 30 * 86400), None)
    assert values.parse_renew_before(600) == (RenewBefore(None, 600), None)
    assert values.parse_renew_before("100%")[1] == (
        "a percentage must be between 0% and 100% (exclusive), got 100%"
    )
    assert values.parse_renew_before(1.5)[1] == (
        "a fraction must be between 0 and 1 (exclusive), got 1.5"
    )


def test_key_specs_and_merging() -> None:
    default = {"type": "ecdsa", "curve": "P-256", "rotation": "never"}
    merged = values.merge_key(default, {"type": "rsa", "size": 4096})
    assert merged == {"type": "rsa", "rotation": "never", "size": 4096}
    assert values.key_spec(merged) == (KeySpec("rsa", 4096, "never", "controller"), [])
    assert values.key_spec({"curve": "P-384"})[0] == KeySpec("ecdsa", 384)
    assert values.key_spec({"type": "rsa"})[0].size == 3072
    assert values.key_spec({"type": "ed25519", "size": 2048})[1] == [
        ("size", "size applies to rsa keys only (this key is ed25519)")
    ]
    assert values.merge_key(default, {"curve": "P-384"})["curve"] == "P-384"


@pytest.mark.parametrize(
    ("key", "allowed", "ok"),
    [
        (KeySpec("rsa", 4096), ("rsa-3072+",), True),
        (KeySpec("rsa", 3072), ("rsa-3072+",), True),
        (KeySpec("rsa", 2048), ("rsa-3072+",), False),
        (KeySpec("rsa", 4096), ("rsa-3072",), False),
        (KeySpec("ecdsa", 384), ("ecdsa-p256+",), True),
        (KeySpec("ecdsa", 256), ("ecdsa-p384",), False),
        (KeySpec("ed25519", 256), ("ed25519",), True),
        (KeySpec("ed25519", 256), ("ecdsa-p256+",), False),
        (KeySpec("ecdsa", 256), (), True),
    ],
)
def test_key_allowed(key: KeySpec, allowed: tuple[str, ...], ok: bool) -> None:
    assert values.key_allowed(key, allowed) is ok


def test_policy_rules() -> None:
    rules = Rules.for_policy(
        Policy("org", san_allow=("*.example.com", "example.com", "10.0.0.1"), max_ttl_s=100)
    )
    subject = Subject(
        KeySpec(),
        "ca",
        200,
        [(0, "www.example.com"), (1, "A.B.EXAMPLE.COM"), (2, "example.com"),
         (3, "badexample.com"), (4, "10.0.0.1"), (5, "*.example.com"), (6, "example.org")],
    )  # fmt: skip
    found = rules.check(subject)
    assert [f for f, _ in found] == ["ttl", 3, 6]
    assert found[1][1] == (
        "name 'badexample.com' is not allowed by policy 'org' "
        "(san_allow: *.example.com, example.com, 10.0.0.1)"
    )
    regex = Rules.for_profile(Profile("p", san_patterns=(r"[a-z]+\.internal",)))
    assert regex.check(Subject(KeySpec(), "ca", 1, [(0, "db.internal.evil.net")])) == [
        (0, "name 'db.internal.evil.net' does not match any san_patterns of profile 'p'")
    ]
    assert regex.check(Subject(KeySpec(), "ca", 1, [(0, "DB.internal")])) == []


# ---------------------------------------------------------------------------
# templates


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cert.__class__ }}",
        "{{ cert.update({'a': 1}) }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ 'a' * 100000000 }}",
        "{{ 9 ** 99999 }}",
        "{{ 'a'|center(100000000) }}",
        "{% set ns = namespace(s='a') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s }}",
        "{{ lipsum(100000) }}",
        "{% include '/etc/passwd' %}",
        "{{ missing }}",
        "{{ cert.missing }}",
        "{{ 1 / 0 }}",
        "{{ x",
    ],
)
def test_templates_that_must_fail_cleanly(source: str) -> None:
    with pytest.raises(TemplateProblem) as info:
        Renderer().render(source, {"cert": {"name": "www"}})
    assert "Traceback" not in str(info.value) and len(str(info.value)) <= 300


@pytest.mark.parametrize(
    "source",
    [
        "{{ cert.name }}.pem",
        "{{cert.name}}/{{ cert.name }}",
        "{{ n }}-{{ flag }}-{{ none }}-{{ cert.tags }}",
        "{{ cert.items }}",
        "{{ cert.name }}\n",
        "a {{ vars.domain }} b",
        "{{ cert.name | upper }}.{{ vars.domain }}",
        "{% if n > 1 %}{{ n }}{% endif %}",
        "{# comment #}x",
    ],
)
def test_fast_rendering_matches_jinja(source: str) -> None:
    context = {
        "cert": {"name": "www", "tags": ["a"], "items": "shadowed"},
        "vars": {"domain": "example.test"},
        "n": 2,
        "flag": True,
        "none": None,
    }
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
    assert Renderer().render(source, context) == env.from_string(source).render(context)


def test_plain_strings_are_not_templates() -> None:
    assert Renderer().render("no {template} here }}", {}) == "no {template} here }}"


# ---------------------------------------------------------------------------
# YAML


def test_yaml_keeps_positions_and_plain_keys() -> None:
    parsed, problems = yamlload.parse_yaml(b"a:\n  - x\n  - {on: yes, 80: 1.5, k: ~}\n", "f")
    assert problems == [] and parsed is not None
    doc = parsed.doc
    assert doc == {"a": ["x", {"on": True, "80": 1.5, "k": None}]}
    assert doc.locs["a"] == (1, 1, 2, 3)
    assert doc["a"].locs == [(2, 5), (3, 5)]
    assert yamlload.locate(doc, ("a", 1, "80")) == (3, 19)
    assert yamlload.locate(doc, ("a", 1, "80"), at_key=True) == (3, 15)
    assert yamlload.locate(doc, ("a", 7)) == (2, 3)  # the deepest position that exists


def test_quote_and_paths_are_short() -> None:
    assert yamlload.quote("x" * 100) == "'" + "x" * 60 + "…' (100 characters)"
    assert yamlload.format_path(("certificates", "www", "sans", 2)) == "certificates.www.sans[2]"
    assert yamlload.format_path(("issuers", "bad name")) == "issuers['bad name']"
    assert len(yamlload.format_path(("vars", "k" * 10_000))) < 80

"""The inventory loader: good inventories, and a corpus of bad ones with exact errors.

Connectors are the stand-ins of ``inventory_standins`` (the loader needs only their
``config_schema`` and ``check_placement``), so these tests do not depend on the
built-in connectors. ``bad_inventories/`` holds one case per file (or directory);
its ``# expect:`` header lines are the exact error lines, in order.
"""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest

from certctl.errors import InventoryError
from certctl.inventory import load_inventory
from certctl.inventory.loader import inventory_files
from certctl.model import KeySpec, Placement, RenewBefore, Secret
from tests.unit.inventory_standins import standin_registry

BAD = Path(__file__).parent / "bad_inventories"
DEMO = Path(__file__).parents[2] / "inventory"

BASE = """
defaults:
  issuer: ca
  profile: tls
  ttl: 30d
  key: {type: ecdsa, curve: P-256, rotation: always, custody: controller}
issuers:
  ca: {type: local_ca, root: {common_name: Test Root}}
profiles:
  tls:
    ekus: [serverAuth]
    max_ttl: 90d
    allowed_keys: [ecdsa-p256, ecdsa-p384, rsa-3072+, ed25519]
targets:
  files:
    type: file
    root: out
    cert_path: "{{ cert.name }}/cert.pem"
    key_path: "{{ cert.name }}/key.pem"
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(textwrap.dedent(text), encoding="utf-8")
    return directory


def load(directory: Path, files: dict[str, str]):  # type: ignore[no-untyped-def]
    return load_inventory(write(directory, files), standin_registry())


def errors(directory: Path, files: dict[str, str]) -> list[str]:
    with pytest.raises(InventoryError) as info:
        load(directory, files)
    return str(info.value).splitlines()


# ---------------------------------------------------------------------------
# good inventories


def test_demo_inventory_loads() -> None:
    inv = load_inventory(DEMO, standin_registry())
    assert sorted(inv.certificates) == ["api", "billing-client", "www"]
    www = inv.certificates["www"]
    assert www.common_name == "www.demo.internal" and www.sans == ("demo.internal",)
    assert [p.id for p in www.placements] == ["web-files", "lb-files"]
    assert www.placements[0].config["cert_path"] == "www/cert.pem"
    assert www.renew_before == RenewBefore(fraction=0.33)
    assert inv.certificates["api"].key == KeySpec("ecdsa", 384, "always", "controller")
    assert inv.certificates["api"].renew_before == RenewBefore(fraction=None, seconds=20 * 86400)
    assert inv.certificates["billing-client"].key.id == "ed25519"
    assert inv.profiles["tls-server"].max_ttl_s == 90 * 86400
    assert inv.policies["baseline"].san_allow == ("*.demo.internal", "demo.internal")
    assert inv.owners["platform"]["team"] == "sre"
    assert inv.files == tuple(
        os.path.relpath(DEMO / n) for n in ("certctl.yaml", "certificates.yaml", "targets.yaml")
    )
    assert inv.root == DEMO


def test_builtin_connectors_load_the_demo_when_present() -> None:
    from certctl.connectors import Registry

    try:
        registry = Registry().load_builtin()
    except Exception:  # the built-in connectors are written in parallel
        pytest.skip("built-in connectors are not importable yet")
    if "file" not in registry.targets or "local_ca" not in registry.issuers:
        pytest.skip("built-in file target / local CA are not there yet")
    inv = load_inventory(DEMO, registry)
    assert len(inv.certificates) == 3


def test_defaults_merge_and_typed_values(tmp_path: Path) -> None:
    inv = load(
        tmp_path,
        {
            "base.yaml": BASE,
            "certs.yaml": """
            certificates:
              plain: {common_name: plain.test}
              p384: {common_name: p384.test, key: {curve: P-384, rotation: never}}
              rsa: {common_name: rsa.test, key: {type: rsa}, ttl: 12h, renew_before: 0.25}
              rsa4k: {common_name: rsa4k.test, key: {type: rsa, size: 4096}, ttl: 3600}
              ed: {common_name: ed.test, key: {type: ed25519, custody: target}, renew_before: 5d}
              mixed: {common_name: mixed.test, ttl: 1d12h, renew_before: "10%", revoked: true,
                      revoke_reason: keyCompromise, tags: [a, b], revoke_on_remove: true}
            """,
        },
    )
    c = inv.certificates
    assert c["plain"].key == KeySpec("ecdsa", 256, "always", "controller")
    assert c["plain"].ttl_s == 30 * 86400 and c["plain"].issuer == "ca"
    assert c["plain"].profile == "tls" and c["plain"].renew_before == RenewBefore()
    assert c["p384"].key == KeySpec("ecdsa", 384, "never", "controller")
    # another type drops the default's curve instead of failing on it
    assert c["rsa"].key == KeySpec("rsa", 3072, "always", "controller")
    assert c["rsa"].ttl_s == 12 * 3600 and c["rsa"].renew_before == RenewBefore(fraction=0.25)
    assert c["rsa4k"].key.id == "rsa-4096" and c["rsa4k"].ttl_s == 3600
    assert c["ed"].key == KeySpec("ed25519", 256, "always", "target")
    assert c["ed"].renew_before == RenewBefore(fraction=None, seconds=5 * 86400)
    m = c["mixed"]
    assert m.ttl_s == 36 * 3600 and m.renew_before == RenewBefore(fraction=0.1)
    assert m.revoked and m.revoke_reason == "keyCompromise" and m.revoke_on_remove
    assert m.tags == ("a", "b") and c["plain"].revoke_reason == "unspecified"
    assert c["plain"].location.file.endswith("certs.yaml") and c["plain"].location.line == 3


def test_no_defaults_gives_model_defaults(tmp_path: Path) -> None:
    inv = load(
        tmp_path,
        {
            "inv.yaml": """
            issuers: {ca: {type: local_ca}}
            certificates: {a: {common_name: a.test, issuer: ca}}
            """
        },
    )
    a = inv.certificates["a"]
    assert a.ttl_s == 90 * 86400 and a.profile == "" and a.placements == ()
    assert a.key == KeySpec() and a.renew_before == RenewBefore() and a.owner is None


def test_templates_render_names_and_target_configs(tmp_path: Path) -> None:
    inv = load(
        tmp_path,
        {
            "base.yaml": BASE,
            "vars.yaml": """
            vars:
              domain: example.test
              env: prod
            """,
            "certs.yaml": """
            certificates:
              www:
                common_name: "www.{{ domain }}"
                sans: ["{{ vars.domain }}", "{{ cert.name }}-{{ env }}.{{ domain }}",
                       "{{ cert.common_name | replace('www', 'w3') }}"]
                targets: [files]
            """,
        },
    )
    www = inv.certificates["www"]
    assert www.common_name == "www.example.test"
    assert www.sans == ("example.test", "www-prod.example.test", "w3.example.test")
    assert www.placements == (Placement("files", "file", None, {}),)
    assert dict(www.placements[0].config) == {
        "root": "out",
        "cert_path": "www/cert.pem",
        "key_path": "www/key.pem",
    }
    # the target definition keeps its templates
    assert inv.targets["files"].config["cert_path"] == "{{ cert.name }}/cert.pem"


def test_groups_expand_into_placements_with_merged_vars(tmp_path: Path) -> None:
    inv = load(
        tmp_path,
        {
            "base.yaml": BASE,
            "hosts.yaml": """
            vars: {user: nobody, port: 22, site: hq}
            hosts:
              web1: {address: 10.0.0.1, vars: {port: 2222}}
              web2: {address: web2.example.test}
              edge1: {address: "2001:db8::1"}
              lonely:
            groups:
              all-web: {children: [web, edge], vars: {user: deploy, site: dc1}}
              web: {hosts: [web1, web2], vars: {user: www-deploy}}
              edge: {hosts: [edge1, web1]}
              empty: {}
            targets:
              remote:
                type: remote_file
                hosts: [all-web, lonely]
                path: "/etc/tls/{{ cert.name }}.pem"
                user: "{{ user }}@{{ host.name }}:{{ vars.port }}/{{ site }}"
                verify:
                  endpoint: "{{ host.address | default(host.name) }}:443"
                  sni: "{{ cert.common_name }}"
                password: {env: REMOTE_PASSWORD}
              nowhere: {type: remote_file, hosts: empty, path: /x}
            certificates:
              www: {common_name: www.test, targets: [files, remote, nowhere]}
            """,
        },
    )
    assert inv.groups["all-web"].hosts == ("web1", "web2", "edge1")
    assert inv.groups["empty"].hosts == ()
    assert inv.targets["remote"].hosts == ("web1", "web2", "edge1", "lonely")
    placements = inv.certificates["www"].placements
    assert [p.id for p in placements] == [
        "files",
        "remote@web1",
        "remote@web2",
        "remote@edge1",
        "remote@lonely",
    ]
    by_host = {p.host: p.config for p in placements}
    # inventory vars < group vars (parents first) < host vars
    assert by_host["web1"]["user"] == "www-deploy@web1:2222/dc1"
    assert by_host["edge1"]["user"] == "deploy@edge1:22/dc1"
    assert by_host["lonely"]["user"] == "nobody@lonely:22/hq"
    assert by_host["edge1"]["verify"] == {"endpoint": "2001:db8::1:443", "sni": "www.test"}
    assert by_host["lonely"]["verify"]["endpoint"] == "lonely:443"  # no address: default
    assert by_host["web2"]["path"] == "/etc/tls/www.pem"
    assert by_host["web2"]["password"] == Secret("env", "REMOTE_PASSWORD")


def test_unset_values_are_undefined_in_templates_not_none(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        {
            "base.yaml": BASE,
            "t.yaml": """
            hosts: {box: {}}
            targets:
              remote: {type: remote_file, hosts: box, path: "/{{ host.address }}/{{ cert.owner }}"}
            certificates:
              www: {common_name: www.test, targets: [remote]}
            """,
        },
    )
    assert len(lines) == 1 and lines[0].endswith(
        "targets.remote.path: template error: 'dict object' has no attribute 'address' "
        "(on host 'box')"
    )


def test_secrets_stay_unresolved_and_never_print(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CA_TOKEN", raising=False)
    inv = load(
        tmp_path,
        {
            "inv.yaml": """
            issuers:
              strict: {type: strict_ca, url: https://ca.test, token: {env: CA_TOKEN}}
              filed: {type: strict_ca, url: https://ca.test, token: {file: secrets/token}}
            """
        },
    )
    token = inv.issuers["strict"].config["token"]
    assert isinstance(token, Secret) and token.describe() == "env:CA_TOKEN"
    filed = inv.issuers["filed"].config["token"]
    assert isinstance(filed, Secret) and filed.kind == "file"
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text("s3cr3t-value\n")
    assert filed.reveal() == "s3cr3t-value"  # relative to the inventory directory
    monkeypatch.setenv("CA_TOKEN", "hunter2")
    assert token.reveal() == "hunter2"
    text = repr(inv) + str(inv.issuers) + f"{token}"
    assert "hunter2" not in text and "s3cr3t" not in text


def test_directory_loading_rules_and_digest(tmp_path: Path) -> None:
    inv_dir = write(
        tmp_path / "inv",
        {
            "b.yml": "certificates: {b: {common_name: b.test, issuer: ca}}\n",
            "a.yaml": "issuers: {ca: {type: local_ca}}\n",
            ".hidden.yaml": "this: is not loaded\n",
            "notes.txt": "neither is this",
        },
    )
    for sub in (".certctl", "connectors", "out"):
        write(inv_dir / sub, {"x.yaml": "garbage: [\n"})
    assert [p.name for p in inventory_files(inv_dir)] == ["a.yaml", "b.yml"]
    first = load_inventory(inv_dir, standin_registry())
    assert [Path(f).name for f in first.files] == ["a.yaml", "b.yml"]
    expected = hashlib.sha256()
    for name in ("a.yaml", "b.yml"):
        raw = (inv_dir / name).read_bytes()
        expected.update(len(name).to_bytes(4, "big") + name.encode())
        expected.update(len(raw).to_bytes(8, "big") + raw)
    assert first.digest == expected.hexdigest()
    assert load_inventory(inv_dir, standin_registry()).digest == first.digest
    (inv_dir / "b.yml").write_text("certificates: {b: {common_name: b2.test, issuer: ca}}\n")
    assert load_inventory(inv_dir, standin_registry()).digest != first.digest
    # a single file works too; its directory is the root
    single = load_inventory(inv_dir / "a.yaml", standin_registry())
    assert single.root == inv_dir and single.certificates == {}


def test_empty_sections_and_files_are_fine(tmp_path: Path) -> None:
    inv = load(tmp_path, {"a.yaml": "", "b.yaml": "hosts:\ncertificates:\nvars:\n"})
    assert inv.certificates == {} and inv.hosts == {}


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="no such file or directory"):
        load_inventory(tmp_path / "nope", standin_registry())
    with pytest.raises(InventoryError, match="no inventory files"):
        load_inventory(tmp_path, standin_registry())


def test_yaml_merge_keys_and_anchors(tmp_path: Path) -> None:
    inv = load(
        tmp_path,
        {
            "base.yaml": BASE,
            "certs.yaml": """
            certificates:
              a: &web {common_name: a.test, targets: [files], tags: [web]}
              b: {<<: *web, common_name: b.test}
            """,
        },
    )
    b = inv.certificates["b"]
    assert b.common_name == "b.test" and b.tags == ("web",) and len(b.placements) == 1


# ---------------------------------------------------------------------------
# errors


def test_all_problems_are_reported_sorted(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        {
            "a.yaml": "issuers: {ca: {type: local_ca}}\ncertificates:\n"
            "  z: {common_name: 'bad name', issuer: ca}\n",
            "b.yaml": "certificates:\n  y: {common_name: y.test, issuer: nope}\n"
            "  x: {common_name: x.test, issuer: ca, ttl: 5q}\n",
        },
    )
    assert [line.split(": ", 1)[0].rsplit(os.sep, 1)[-1] for line in lines] == [
        "a.yaml:3:20",
        "b.yaml:2:36",
        "b.yaml:3:45",
    ]


def test_huge_value_is_refused_without_echoing_it(tmp_path: Path) -> None:
    huge = "a" * (10 * 1024 * 1024)
    lines = errors(
        tmp_path,
        {
            "inv.yaml": f"issuers: {{ca: {{type: local_ca}}}}\ncertificates:\n  a:\n"
            f"    common_name: {huge}\n    issuer: ca\n"
        },
    )
    assert len(lines) == 1 and len(lines[0]) < 300
    assert lines[0].endswith(
        "certificates.a.common_name: value is too long (10485760 characters, at most 65536)"
    )


def test_file_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from certctl.inventory import yamlload

    monkeypatch.setattr(yamlload, "MAX_FILE_BYTES", 100)
    text = "vars:\n" + "".join(f"  v{i}: {i}\n" for i in range(30))
    lines = errors(tmp_path, {"inv.yaml": text})
    assert len(lines) == 1
    assert lines[0].endswith(f"inv.yaml: file is too large ({len(text)} bytes, at most 100)")


def test_many_problems_are_capped(tmp_path: Path) -> None:
    certs = "".join(f"  c{i}: {{common_name: c{i}.test, issuer: nope{i}}}\n" for i in range(300))
    lines = errors(
        tmp_path, {"inv.yaml": "issuers: {ca: {type: local_ca}}\ncertificates:\n" + certs}
    )
    assert len(lines) == 201 and lines[-1] == "... and 100 more problems"


def test_deep_nesting_and_recursion_are_refused(tmp_path: Path) -> None:
    assert (
        "nested too deeply"
        in errors(tmp_path / "a", {"i.yaml": "vars: {x: " + "[" * 80 + "]" * 80 + "}\n"})[0]
    )
    assert "recursive alias" in errors(tmp_path / "b", {"i.yaml": "vars: {x: &a [*a]}\n"})[0]


def test_invalid_utf8_is_located(tmp_path: Path) -> None:
    (tmp_path / "inv.yaml").write_bytes(b"vars:\n  x: caf\xe9\n")
    with pytest.raises(InventoryError) as info:
        load_inventory(tmp_path, standin_registry())
    assert str(info.value).endswith("inv.yaml:2:9: file is not valid UTF-8")


def test_policy_violation_names_policy_and_certificate(tmp_path: Path) -> None:
    lines = errors(
        tmp_path,
        {
            "base.yaml": BASE,
            "policy.yaml": """
            policies:
              weak-keys: {allowed_keys: [ecdsa-p384], allowed_issuers: [ca], max_ttl: 7d}
            """,
            "certs.yaml": "certificates:\n  www: {common_name: www.test}\n",
        },
    )
    tail = [line.split(": ", 1)[1] for line in lines]
    assert tail == [
        "certificates.www: key ecdsa-p256 is not allowed by policy 'weak-keys' "
        "(allowed_keys: ecdsa-p384) (key from defaults)",
        "certificates.www: ttl 30d is longer than policy 'weak-keys' allows (max_ttl 7d) "
        "(ttl from defaults)",
    ]


# ---------------------------------------------------------------------------
# the corpus of bad inventories


def _cases() -> list[str]:
    return sorted(p.name for p in BAD.iterdir() if p.suffix == ".yaml" or p.is_dir())


def _expected(case: Path) -> list[str]:
    files = [case] if case.is_file() else sorted(case.glob("*.yaml"))
    return [
        line[len("# expect: ") :]
        for f in files
        for line in f.read_text(encoding="utf-8").splitlines()
        if line.startswith("# expect: ")
    ]


@pytest.mark.parametrize("case", _cases())
def test_bad_inventory(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    expected = _expected(Path(case))
    assert expected, f"{case} has no '# expect:' lines"
    with pytest.raises(InventoryError) as info:
        load_inventory(Path(case), standin_registry())
    assert str(info.value).splitlines() == expected
    assert "Traceback" not in str(info.value)

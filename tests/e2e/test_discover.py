"""Discovery through the real ``certctl`` command: certctl's own deployed files are
found, matched to their keys and recognised as in the inventory and from a known
issuer; a stray self-signed certificate is not; a refused scan is one clear line."""

from __future__ import annotations

import json

from tests.e2e.conftest import MakeCerts, Workspace
from tests.integration.discovery_support import key_pem, make_cert, new_key, pem


def test_discover_own_and_stray_certificates(workspace: Workspace, make_certs: MakeCerts) -> None:
    ws = workspace
    ws.write("certs.yaml", make_certs({"www": "common_name: www.e2e.test\ntargets: [files]"}))
    assert ws.run("apply", "--auto-approve").code == 0
    stray_dir = ws.root / "out" / "files" / "stray"
    stray_dir.mkdir(parents=True)
    key = new_key()
    (stray_dir / "stray.pem").write_bytes(pem(make_cert("stray.e2e.test", key)))
    (stray_dir / "stray.key").write_bytes(key_pem(key))

    res = ws.run("discover", "files", str(ws.inv / "out"), str(stray_dir))
    assert res.code == 0, res.err
    assert "BEGIN" not in res.out and "PRIVATE" not in res.out
    res = ws.run("discovered", "--format", "json")
    assert res.code == 0, res.err
    doc = json.loads(res.out)
    by_path = {f["location"].rsplit("/", 2)[-2] + "/" + f["location"].rsplit("/", 1)[-1]: f
               for f in doc["findings"]}  # fmt: skip
    www = by_path["www/fullchain.pem"]
    assert www["key_path"].endswith("/www/key.pem")
    assert "not-in-inventory" not in www["categories"]
    assert "unknown-issuer" not in www["categories"]  # signed by the inventory's local CA
    stray = by_path["stray/stray.pem"]
    assert stray["key_path"].endswith("/stray/stray.key")
    assert {"self-signed", "unknown-issuer", "not-in-inventory"} <= set(stray["categories"])

    res = ws.run("discovered", "--not-in-inventory")
    assert res.code == 0 and "stray.e2e.test" in res.out and "CN=www.e2e.test" not in res.out

    res = ws.run("discover", "network", "224.0.0.0/4", "--ports", "443")
    assert res.code == 1 and "--allow-reserved" in res.err and "Traceback" not in res.err

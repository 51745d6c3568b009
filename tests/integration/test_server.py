"""``certctl serve`` with real clients, against both state backends.

The server runs in-process (uvicorn in a thread, on a free loopback port); the
inventory is applied and certificates are revoked with the real ``certctl`` command
(a subprocess), as an operator would. ``openssl crl`` / ``openssl ocsp`` check CRL and
OCSP; httpx talks to the read API; prometheus_client's parser reads /metrics.
"""

from __future__ import annotations

import base64
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from certctl.engine import Engine
from certctl.server.app import ServerSettings
from certctl.server.build import build_app

INVENTORY = """
defaults:
  issuer: ca
  profile: tls
  ttl: 30d
  key: {type: ecdsa, curve: P-256}
issuers:
  ca:
    type: local_ca
    root: {common_name: Serve Test Root CA, key: {type: ecdsa, curve: P-256}, ttl: 3650d}
    public_base_url: http://pki.serve.test
profiles:
  tls: {ekus: [serverAuth], max_ttl: 90d}
  client: {ekus: [clientAuth], max_ttl: 90d}
teams:
  frontend: {}
  backend: {}
owners:
  web: {email: web@serve.test, team: frontend}
  data: {email: data@serve.test, team: backend}
targets:
  files:
    type: file
    root: out
    cert_path: "{{ cert.name }}/cert.pem"
    key_path: "{{ cert.name }}/key.pem"
certificates:
  www: {common_name: www.serve.test, targets: [files], owner: web}
  api: {common_name: api.serve.test, targets: [files], owner: web}
  db: {common_name: db.serve.test, targets: [files], owner: data, profile: client}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    root: Path
    env: dict[str, str]
    url: str
    backend: str

    @property
    def inv(self) -> Path:
        return self.root / "inventory"

    @property
    def ca_pem(self) -> Path:
        return self.root / "ca.pem"

    def cert(self, name: str) -> Path:
        return self.inv / "out" / name / "cert.pem"

    def certctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "certctl", "-i", str(self.inv), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )

    def openssl_ocsp(self, name: str, *extra: str) -> str:
        proc = subprocess.run(
            ["openssl", "ocsp", "-issuer", str(self.ca_pem), "-cert", str(self.cert(name)),
             "-CAfile", str(self.ca_pem), "-url", f"{self.url}/.well-known/pki/ocsp/ca",
             "-timeout", "20", *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "Response verify OK" in proc.stderr + proc.stdout
        return proc.stdout

    def openssl_crl(self) -> str:
        der = httpx.get(f"{self.url}/.well-known/pki/crl/ca").content
        (self.root / "crl.der").write_bytes(der)
        proc = subprocess.run(
            ["openssl", "crl", "-inform", "DER", "-in", str(self.root / "crl.der"),
             "-CAfile", str(self.ca_pem), "-verify", "-noout", "-text"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "verify OK" in proc.stderr + proc.stdout
        return proc.stdout

    def serial(self, name: str) -> int:
        return x509.load_pem_x509_certificate(self.cert(name).read_bytes()).serial_number

    def token(self, name: str = "ops") -> str:
        r = self.certctl("apikey", "create", name)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()


class ThreadedServer:
    def __init__(self, app: object, port: int) -> None:
        config = uvicorn.Config(
            app,  # type: ignore[arg-type]
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive(), "the server thread died"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _setup(tmp_path: Path, state: str | None, backend: str) -> Served:
    inv = tmp_path / "inventory"
    inv.mkdir()
    (inv / "certctl.yaml").write_text(INVENTORY, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CERTCTL_")}
    if state is not None:
        env["CERTCTL_STATE"] = state
    served = Served(tmp_path, env, "", backend)
    r = served.certctl("apply", "--auto-approve")
    assert r.returncode == 0, r.stderr
    return served


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Served]:
    state = None
    if request.param == "postgres":
        make_pg_db: Callable[[], str] = request.getfixturevalue("make_pg_db")
        state = make_pg_db()
    yield from _serve(_setup(tmp_path, state, request.param), state, ServerSettings())


def _serve(s: Served, state: str | None, cfg: ServerSettings) -> Iterator[Served]:
    engine = Engine(inventory_path=s.inv, state_url=state)
    try:
        app, issuers = build_app(engine, cfg)
        assert issuers == ["ca"]
        port = _free_port()
        s.url = f"http://127.0.0.1:{port}"
        # The CA as a relying party gets it: from the state, never the key.
        store = engine.store()
        ca_pem = store.get("ca", "root/cert.pem")
        assert ca_pem is not None
        s.ca_pem.write_bytes(ca_pem)
        with ThreadedServer(app, port):
            yield s
    finally:
        engine.close()


@pytest.fixture
def served_sqlite(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(_setup(tmp_path, None, "sqlite"), None, ServerSettings())


def _ocsp_request(ca: x509.Certificate, serial: int, *, nonce: bytes | None = None) -> bytes:
    name_hash = hashes.Hash(hashes.SHA1())
    name_hash.update(ca.subject.public_bytes())
    key_bits = ca.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key_hash = hashes.Hash(hashes.SHA1())
    key_hash.update(key_bits)
    b = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        name_hash.finalize(),
        key_hash.finalize(),
        serial,
        hashes.SHA1(),
    )
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _post_ocsp(s: Served, der: bytes) -> ocsp.OCSPResponse:
    r = httpx.post(
        f"{s.url}/.well-known/pki/ocsp/ca",
        content=der,
        headers={"Content-Type": "application/ocsp-request"},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/ocsp-response"
    return ocsp.load_der_ocsp_response(r.content)


# ------------------------------------------------------------------ CRL


def test_crl_verifies_and_lists_revoked_serials(served: Served) -> None:
    s = served
    r = httpx.get(f"{s.url}/.well-known/pki/crl/ca")
    assert r.status_code == 200 and r.headers["content-type"] == "application/pkix-crl"
    text = s.openssl_crl()
    assert "No Revoked Certificates" in text
    first = x509.load_der_x509_crl(r.content)
    number0 = first.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    r2 = s.certctl("revoke", "www", "--reason", "keyCompromise", "--yes")
    assert r2.returncode == 0, r2.stderr
    text = s.openssl_crl()
    assert f"Serial Number: {s.serial('www'):X}" in text.replace(
        "Serial Number: 0", "Serial Number: "
    )
    assert "Key Compromise" in text
    assert f"{s.serial('api'):X}" not in text
    crl = x509.load_der_x509_crl((s.root / "crl.der").read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number0
    entry = crl.get_revoked_certificate_by_serial_number(s.serial("www"))
    assert entry is not None
    assert crl.next_update_utc is not None and crl.next_update_utc > crl.last_update_utc
    # the alias the local CA writes into its leaves serves the same CRL
    assert httpx.get(f"{s.url}/crl/ca.crl").content == (s.root / "crl.der").read_bytes()
    assert httpx.get(f"{s.url}/.well-known/pki/crl/nope").status_code == 404


# ----------------------------------------------------------------- OCSP


def test_openssl_ocsp_good_then_revoked_after_certctl_revoke(served: Served) -> None:
    s = served
    out = s.openssl_ocsp("www")
    assert f"{s.cert('www')}: good" in out
    out = s.openssl_ocsp("api", "-no_nonce")  # cached form (no nonce)
    assert ": good" in out

    r = s.certctl("revoke", "www", "--reason", "keyCompromise", "--yes")
    assert r.returncode == 0, r.stderr
    out = s.openssl_ocsp("www")
    assert f"{s.cert('www')}: revoked" in out and "Reason: keyCompromise" in out
    out = s.openssl_ocsp("www", "-no_nonce")
    assert ": revoked" in out
    assert ": good" in s.openssl_ocsp("api", "-no_nonce")


def test_ocsp_unknown_nonce_get_form_and_responder_certificate(served: Served) -> None:
    s = served
    ca = x509.load_pem_x509_certificate(s.ca_pem.read_bytes())
    nonce = os.urandom(16)
    resp = _post_ocsp(s, _ocsp_request(ca, s.serial("db"), nonce=nonce))
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    assert resp.next_update_utc is not None and resp.next_update_utc > resp.this_update_utc

    # the responder: issued by the CA, OCSPSigning, id-pkix-ocsp-nocheck, not the CA
    (responder,) = resp.certificates
    assert responder.issuer == ca.subject and responder.subject != ca.subject
    responder.verify_directly_issued_by(ca)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    pub = responder.public_key()
    from cryptography.hazmat.primitives.asymmetric import ec

    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))

    unknown = _post_ocsp(s, _ocsp_request(ca, 0x1234567890ABCDEF))
    assert unknown.certificate_status == ocsp.OCSPCertStatus.UNKNOWN
    assert len(unknown.extensions) == 0  # no nonce asked, none echoed

    # GET form: base64 of the DER request in the path (with '/' and '+' intact)
    der = _ocsp_request(ca, s.serial("db"))
    r = httpx.get(f"{s.url}/.well-known/pki/ocsp/ca/{base64.b64encode(der).decode()}")
    assert r.status_code == 200
    got = ocsp.load_der_ocsp_response(r.content)
    assert got.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert (
        httpx.get(f"{s.url}/.well-known/pki/ocsp/ca/{base64.b64encode(der).decode()}").content
        == r.content
    )  # cached

    # a request for another CA's certificate: the responder is not authoritative
    other = _ocsp_request(responder, s.serial("db"))
    assert _post_ocsp(s, other).response_status == ocsp.OCSPResponseStatus.UNAUTHORIZED


def test_responder_key_is_encrypted_in_the_vault(served: Served) -> None:
    s = served
    if s.backend == "sqlite":
        with sqlite3.connect(s.inv / ".certctl" / "state.db") as db:
            rows = dict(
                db.execute(
                    "SELECT key, value FROM issuer_vault WHERE issuer = 'ca' AND key LIKE 'ocsp/%'"
                ).fetchall()
            )
            secret = dict(db.execute("SELECT key, secret FROM issuer_vault").fetchall())
        assert b"PRIVATE KEY" not in bytes(rows["ocsp/key.pem"])
        assert secret["ocsp/key.pem"] == 1 and b"CERTIFICATE" in bytes(rows["ocsp/cert.pem"])
    engine = Engine(inventory_path=s.inv, state_url=s.env.get("CERTCTL_STATE"))
    try:
        key = engine.store().get("ca", "ocsp/key.pem")
        assert key is not None and b"PRIVATE KEY" in key  # decrypts with the state key
    finally:
        engine.close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.one_of(st.binary(max_size=600), st.binary(min_size=1, max_size=40).map(
    lambda b: b"\x30\x82" + b)))  # fmt: skip
def test_fuzzed_ocsp_requests_never_get_a_server_error(served_sqlite: Served, body: bytes) -> None:
    s = served_sqlite
    r = httpx.post(f"{s.url}/.well-known/pki/ocsp/ca", content=body)
    assert r.status_code == 200
    resp = ocsp.load_der_ocsp_response(r.content)
    assert resp.response_status in (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST,
        ocsp.OCSPResponseStatus.UNAUTHORIZED,
        ocsp.OCSPResponseStatus.SUCCESSFUL,
    )
    path = base64.urlsafe_b64encode(body).decode() or "x"
    g = httpx.get(f"{s.url}/.well-known/pki/ocsp/ca/{path}")
    assert g.status_code < 500


def test_oversized_and_junk_requests_are_refused_without_5xx(served_sqlite: Served) -> None:
    s = served_sqlite
    big = httpx.post(f"{s.url}/.well-known/pki/ocsp/ca", content=b"\x30" * 100_000)
    assert big.status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the cap applies while reading
        for _ in range(40):
            yield b"\x00" * 1024

    assert httpx.post(f"{s.url}/.well-known/pki/ocsp/ca", content=chunks()).status_code == 413
    empty = httpx.post(f"{s.url}/.well-known/pki/ocsp/ca", content=b"")
    assert ocsp.load_der_ocsp_response(empty.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    g = httpx.get(f"{s.url}/.well-known/pki/ocsp/ca/{'A' * 20000}")
    assert g.status_code < 500
    g = httpx.get(f"{s.url}/.well-known/pki/ocsp/ca/%%%%not-base64!!")
    assert g.status_code == 200
    assert ocsp.load_der_ocsp_response(g.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST
    )
    assert httpx.get(f"{s.url}/api/v1/certificates?limit=" + "9" * 5000).status_code < 500


# ------------------------------------------------------- health, metrics


def test_health_and_metrics_parse(served: Served) -> None:
    s = served
    assert httpx.get(f"{s.url}/healthz").text == "ok\n"
    assert httpx.get(f"{s.url}/readyz").status_code == 200
    assert s.certctl("revoke", "db", "--yes").returncode == 0
    r = httpx.get(f"{s.url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    by_status = {sm.labels["status"]: sm.value for sm in families["certctl_certificates"].samples}
    assert by_status["active"] == 2 and by_status["revoked"] == 1
    assert families["certctl_certificates_expiring"].samples[0].value == 2  # 30d certs
    expiry = {
        sm.labels["name"]: sm.value
        for sm in families["certctl_certificate_not_after_seconds"].samples
    }
    cert = x509.load_pem_x509_certificate(s.cert("www").read_bytes())
    assert expiry["www"] == cert.not_valid_after_utc.timestamp()
    events = {sm.labels["event"]: sm.value for sm in families["certctl_events"].samples}
    assert events["issue"] == 3 and events["revoke"] == 1 and events["deploy"] == 3


def test_run_counts_and_durations_on_metrics(served: Served) -> None:
    s = served

    def scrape() -> dict[str, list[tuple[str, dict[str, str], float]]]:
        r = httpx.get(f"{s.url}/metrics")
        assert r.status_code == 200
        return {
            f.name: [(sm.name, sm.labels, sm.value) for sm in f.samples]
            for f in text_string_to_metric_families(r.text)
        }

    def runs(fams: dict[str, list[tuple[str, dict[str, str], float]]]) -> dict[str, float]:
        return {
            labels["status"]: v
            for _, labels, v in fams["certctl_runs"]
            if labels["kind"] == "apply"
        }

    def histogram(fams: dict[str, list[tuple[str, dict[str, str], float]]]) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, labels, v in fams["certctl_run_duration_seconds"]:
            assert labels["kind"] == "apply"
            key = labels["le"] if name.endswith("_bucket") else name.rsplit("_", 1)[1]
            out[key] = v
        return out

    fams = scrape()
    assert runs(fams) == {"ok": 1}  # the fixture's `certctl apply`
    h = histogram(fams)
    assert h["count"] == 1 and h["+Inf"] == 1
    bounds = sorted((float(k), v) for k, v in h.items() if k not in ("count", "sum", "+Inf"))
    counts = [v for _, v in bounds]
    assert counts == sorted(counts) and counts[-1] <= 1  # cumulative buckets
    (last,) = [v for _, labels, v in fams["certctl_last_run_duration_seconds"]]
    assert h["sum"] == pytest.approx(last, abs=0.01) and h["sum"] > 0
    assert all(v == 1 for b, v in bounds if b >= last + 0.01)  # the run is in its bucket
    assert all(v == 0 for b, v in bounds if b < last - 0.01)  # and not below it

    assert s.certctl("revoke", "db", "--yes").returncode == 0  # a second apply run
    engine = Engine(inventory_path=s.inv, state_url=s.env.get("CERTCTL_STATE"))
    try:
        engine.store().begin_run("apply", "test", {})  # one still running
    finally:
        engine.close()
    fams = scrape()
    assert runs(fams) == {"ok": 2, "running": 1}
    h2 = histogram(fams)
    assert h2["count"] == 2 and h2["+Inf"] == 2 and h2["sum"] > h["sum"]
    api = httpx.get(
        f"{s.url}/api/v1/runs", headers={"Authorization": f"Bearer {s.token()}"}
    ).json()["items"]
    assert [r["status"] for r in api] == ["running", "ok", "ok"]


# -------------------------------------------------------------- read API


def test_read_api_needs_a_key_paginates_filters_and_revalidates(served: Served) -> None:
    s = served
    api = f"{s.url}/api/v1"
    assert httpx.get(f"{api}/certificates").status_code == 401
    bad = httpx.get(f"{api}/certificates", headers={"Authorization": "Bearer cctl_nope"})
    assert bad.status_code == 401
    token = s.token()
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as c:
        # cursor pagination walks every certificate exactly once, in name order
        names: list[str] = []
        url = f"{api}/certificates?limit=2"
        pages = 0
        while True:
            r = c.get(url)
            assert r.status_code == 200, r.text
            data = r.json()
            names += [item["name"] for item in data["items"]]
            pages += 1
            if data["next_cursor"] is None:
                break
            url = f"{api}/certificates?limit=2&cursor={data['next_cursor']}"
        assert names == ["api", "db", "www"] and pages == 2
        first = c.get(f"{api}/certificates?limit=1").json()["items"][0]
        assert first["status"] == "active" and first["issuer"] == "ca"
        assert int(first["serial"], 16) == s.serial("api")

        # ETag / If-None-Match -> 304, and a new ETag after a mutation
        r = c.get(f"{api}/certificates")
        etag = r.headers["etag"]
        again = c.get(f"{api}/certificates", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        other_query = c.get(f"{api}/certificates?status=active", headers={"If-None-Match": etag})
        assert other_query.status_code == 200  # the ETag covers the query
        assert s.certctl("revoke", "www", "--reason", "superseded", "--yes").returncode == 0
        after = c.get(f"{api}/certificates", headers={"If-None-Match": etag})
        assert after.status_code == 200 and after.headers["etag"] != etag
        www = next(i for i in after.json()["items"] if i["name"] == "www")
        assert www["status"] == "revoked" and www["revocation_reason"] == "superseded"

        # filters
        revoked = c.get(f"{api}/certificates?status=revoked").json()["items"]
        assert [i["name"] for i in revoked] == ["www"]
        assert c.get(f"{api}/certificates?issuer=other").json()["items"] == []
        soon = c.get(f"{api}/certificates?expiring_within_days=31").json()["items"]
        assert {i["name"] for i in soon} == {"api", "db", "www"}
        assert c.get(f"{api}/certificates?expiring_within_days=5").json()["items"] == []
        deps = c.get(f"{api}/deployments?cert=db").json()["items"]
        assert [(d["cert"], d["placement"], d["status"]) for d in deps] == [
            ("db", "files", "deployed")
        ]
        audit = c.get(f"{api}/audit?event=revoke").json()["items"]
        assert [(a["event"], a["cert"]) for a in audit] == [("revoke", "www")]
        page1 = c.get(f"{api}/audit?limit=2").json()
        page2 = c.get(f"{api}/audit?limit=2&cursor={page1['next_cursor']}").json()
        ids = [a["id"] for a in page1["items"] + page2["items"]]
        assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4

        runs = c.get(f"{api}/runs")
        assert runs.status_code == 200 and runs.json()["items"][0]["status"] == "ok"
        r304 = c.get(f"{api}/runs", headers={"If-None-Match": runs.headers["etag"]})
        assert r304.status_code == 304

        assert c.get(f"{api}/certificates?cursor=%%%").status_code == 400
        assert c.get(f"{api}/certificates?limit=0").status_code == 400
    # the X-API-Key header works too
    assert httpx.get(f"{api}/runs", headers={"X-API-Key": token}).status_code == 200


def test_api_keys_are_stored_hashed_and_shown_once(served_sqlite: Served) -> None:
    s = served_sqlite
    token = s.token("ci")
    assert token.startswith("cctl_") and len(token) >= 40
    again = s.certctl("apikey", "create", "ci")
    assert again.returncode == 1 and "already exists" in again.stderr
    listed = s.certctl("apikey", "list")
    assert listed.stdout.split() == ["ci"] and token not in listed.stdout
    with sqlite3.connect(s.inv / ".certctl" / "state.db") as db:
        dump = "\n".join(db.iterdump())
    assert token not in dump
    import hashlib

    assert hashlib.sha256(token.encode()).hexdigest() in dump


def test_rate_limits_answer_429_with_retry_after(tmp_path: Path) -> None:
    s = _setup(tmp_path, None, "sqlite")
    gen = _serve(s, None, ServerSettings(ip_rate=0.01, ip_burst=3, key_rate=0.01, key_burst=2))
    served_now = next(gen)
    try:
        token = served_now.token()
        h = {"Authorization": f"Bearer {token}"}
        codes = [
            httpx.get(f"{served_now.url}/api/v1/runs", headers=h).status_code for _ in range(3)
        ]
        assert codes == [200, 200, 429]  # the key's burst of 2 is spent
        r = httpx.get(f"{served_now.url}/api/v1/runs", headers=h)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        # unauthenticated requests spend the IP's bucket too (3 in all)
        assert httpx.get(f"{served_now.url}/api/v1/runs").status_code == 429
        # CRL/OCSP and health are not rate-limited
        assert httpx.get(f"{served_now.url}/healthz").status_code == 200
    finally:
        gen.close()


# ------------------------------------------------------------ bulk revoke


def test_bulk_revoke_dry_run_lists_exactly_what_is_revoked(served: Served) -> None:
    s = served
    dry = s.certctl("revoke", "--filter", "team=frontend", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    listed = sorted(line.split()[2] for line in dry.stdout.splitlines() if line.startswith("would"))
    assert listed == ["api", "www"]
    assert "2 certificate(s) would be revoked" in dry.stdout
    # nothing changed
    assert ": good" in s.openssl_ocsp("api", "-no_nonce")
    two = s.certctl(
        *("revoke", "--filter", "profile=tls", "--filter", "owner=web"),
        *("--filter", "target=files", "--reason", "cessationOfOperation", "--yes"),
    )
    assert two.returncode == 0, two.stderr
    assert sorted(
        line.split()[1] for line in two.stdout.splitlines() if line.startswith("Revoked")
    ) == ["api", "www"]
    assert ": revoked" in s.openssl_ocsp("api")
    assert ": good" in s.openssl_ocsp("db")
    none = s.certctl("revoke", "--filter", "issuer=ca", "--filter", "owner=web", "--dry-run")
    assert "0 certificate(s)" in none.stdout
    bad = s.certctl("revoke", "--filter", "colour=red", "--dry-run")
    assert bad.returncode == 1 and "bad filter" in bad.stderr


def test_ocsp_get_path_with_slashes_at_either_end_decodes() -> None:
    """Base64 may begin or end with '/': the GET form must not strip it (a flaky
    malformedRequest came from requests whose encoding ended with one)."""
    from certctl.server.app import decode_ocsp_get

    for der in (b"0\x01\xff", b"\xfc\x00\x000\x01", b"0\x82\x01\xff\xff\xff"):
        text = base64.b64encode(der).decode()
        assert text.startswith("/") or text.endswith("/"), text
        assert decode_ocsp_get(text) == der
        assert decode_ocsp_get(base64.urlsafe_b64encode(der).decode().rstrip("=")) == der
    assert decode_ocsp_get("not base64 at all!") is None

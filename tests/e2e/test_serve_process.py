"""``certctl serve`` as a real process: TLS with a certificate the local CA issued for
127.0.0.1 (httpx checks it against the CA), and a graceful stop on SIGTERM / SIGINT.
"""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from certctl.engine import Engine
from tests.e2e.conftest import MakeCerts, Workspace

SERVER = """
common_name: localhost
sans: [127.0.0.1, localhost]
targets: [files]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """A ``certctl serve`` subprocess; started, waited for, stopped by the test."""

    def __init__(self, ws: Workspace, *extra: str) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "certctl", "-i", str(ws.inv), "serve",
             "--port", str(self.port), *extra],
            env=ws.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip

    def wait_ready(self, url: str, verify: ssl.SSLContext | bool) -> None:
        deadline = time.monotonic() + 60  # start-up only: imports, loading the CA
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(f"{url}/healthz", verify=verify, timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "certctl serve did not answer"
            time.sleep(0.1)

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        out, err = self.proc.communicate()
        return out.decode() + err.decode()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=10)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def issued(workspace: Workspace, make_certs: MakeCerts) -> Workspace:
    ws = workspace
    ws.write("certs.yaml", make_certs({"server": SERVER}))
    # the policy of the shared inventory allows *.e2e.test only: widen it for this one
    base = (ws.inv / "base.yaml").read_text(encoding="utf-8")
    ws.write(
        "base.yaml",
        base.replace(
            'san_allow: ["*.e2e.test", "e2e.test"]',
            'san_allow: [localhost, 127.0.0.1, "*.e2e.test"]',
        ),
    )
    r = ws.run("apply", "--auto-approve")
    assert r.code == 0, r.err + r.out
    engine = Engine(inventory_path=ws.inv)
    try:
        root = engine.store().get("ca", "root/cert.pem")
    finally:
        engine.close()
    assert root is not None
    (ws.root / "ca.pem").write_bytes(root)
    return ws


@pytest.fixture
def tls_server(issued: Workspace) -> Iterator[tuple[Workspace, Serve]]:
    d = issued.inv / "out" / "files" / "server"
    srv = Serve(issued, "--tls-cert", str(d / "fullchain.pem"), "--tls-key", str(d / "key.pem"))
    try:
        yield issued, srv
    finally:
        srv.kill()


def test_tls_server_answers_over_https_with_the_local_ca(
    tls_server: tuple[Workspace, Serve],
) -> None:
    ws, srv = tls_server
    url = f"https://127.0.0.1:{srv.port}"
    trust = ssl.create_default_context(cafile=str(ws.root / "ca.pem"))
    srv.wait_ready(url, trust)
    with httpx.Client(verify=trust) as c:
        r = c.get(f"{url}/healthz")
        assert r.status_code == 200 and r.text == "ok\n"
        assert c.get(f"{url}/readyz").status_code == 200
        crl = c.get(f"{url}/.well-known/pki/crl/ca")
        assert crl.headers["content-type"] == "application/pkix-crl"
        peer = r.extensions["network_stream"].get_extra_info("ssl_object")
        assert peer is not None and peer.version() in ("TLSv1.2", "TLSv1.3")
    # a client without the local CA refuses the server; plain HTTP gets no answer
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{url}/healthz", verify=ssl.create_default_context())
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{srv.port}/healthz", timeout=5)
    assert srv.stop() == 0, srv.output()


def test_tls_options_go_together(issued: Workspace) -> None:
    d = issued.inv / "out" / "files" / "server"
    r = issued.run("serve", "--port", str(_free_port()), "--tls-cert", str(d / "fullchain.pem"))
    assert r.code == 1 and "--tls-cert and --tls-key go together" in r.err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_gracefully_with_exit_0(issued: Workspace, sig: int) -> None:
    srv = Serve(issued)
    try:
        url = f"http://127.0.0.1:{srv.port}"
        srv.wait_ready(url, False)
        with httpx.Client() as idle:  # an idle keep-alive connection does not hold it up
            assert idle.get(f"{url}/healthz").status_code == 200
            code = srv.stop(sig)
        out = srv.output()
        assert code == 0, out
        assert "Traceback" not in out and "Interrupted" not in out
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        srv.kill()

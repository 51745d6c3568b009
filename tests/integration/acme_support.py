"""Real Pebble + pebble-challtestsrv for the ACME tests and the benchmark.

:func:`start_pebble` starts Debian's ``pebble-challtestsrv`` (DNS on a loopback port,
every A query answered with 127.0.0.1, TXT records set through its management API)
and ``pebble`` on free loopback ports, with a TLS certificate for Pebble's listener
generated here (the package ships none) and Pebble's VA pointed at challtestsrv for
DNS. ``http_port`` is where Pebble's VA connects for http-01: certctl's responder (or a
webroot's web server) listens there. Pebble's log (``log_path``) lets tests count
finalized orders ("Issued certificate serial ... for order ...").

If the binaries are missing, scripts/test-deps.sh installs them (Debian package
``pebble``); the fixture fails with that hint rather than skipping.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

PEBBLE = "/usr/bin/pebble"
CHALLTESTSRV = "/usr/bin/pebble-challtestsrv"
EAB_KID = "kid-test"
EAB_HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_tcp_udp_port() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free TCP+UDP port")


def make_tls(dirpath: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a listener certificate for localhost / 127.0.0.1."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "certctl test TLS CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = dirpath / "ca.pem", dirpath / "cert.pem", dirpath / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@dataclass
class Pebble:
    directory: str
    ca_bundle: str
    http_port: int
    dns_port: int
    challtest_mgmt: str
    pebble_mgmt: str
    log_path: Path
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return self.directory.rsplit("/", 1)[0]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def issued_orders(self) -> list[str]:
        """Order ids Pebble issued a certificate for (one line per finalization)."""
        return re.findall(r"Issued certificate serial \S+ for order (\S+)", self.log())

    def set_txt(self, host: str, value: str) -> None:
        _post(f"{self.challtest_mgmt}/set-txt", {"host": host, "value": value})

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _post(url: str, body: dict[str, str]) -> None:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        resp.read()


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text(errors='replace')[-1500:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def start_pebble(
    *,
    always_valid: bool = False,
    nonce_reject: int | None = None,
    eab: bool = False,
    http_port: int | None = None,
    dns_server: str | None = None,
) -> Pebble:
    """Start challtestsrv + Pebble; ``nonce_reject`` None keeps Pebble's default (5%)."""
    for binary in (PEBBLE, CHALLTESTSRV):
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"{binary} missing: run scripts/test-deps.sh (Debian 'pebble')")
    work = Path(tempfile.mkdtemp(prefix="certctl-pebble-"))
    ca, cert, key = make_tls(work)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mgmt = free_port()
        dns_port = 0
        if dns_server is None:
            dns_port = _free_tcp_udp_port()
            ct_log = work / "challtestsrv.log"
            with ct_log.open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            CHALLTESTSRV,
                            "-management",
                            f"127.0.0.1:{mgmt}",
                            "-dns01",
                            f"127.0.0.1:{dns_port}",
                            "-http01",
                            "",
                            "-https01",
                            "",
                            "-tlsalpn01",
                            "",
                            "-defaultIPv4",
                            "127.0.0.1",
                            "-defaultIPv6",
                            "",
                        ],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            _wait_port(mgmt, procs[-1], "pebble-challtestsrv", ct_log)
            dns_server = f"127.0.0.1:{dns_port}"
        listen, pmgmt = free_port(), free_port()
        http_port = http_port or free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{listen}",
                "managementListenAddress": f"127.0.0.1:{pmgmt}",
                "certificate": str(cert),
                "privateKey": str(key),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": eab,
                "externalAccountMACKeys": {EAB_KID: EAB_HMAC} if eab else {},
            }
        }
        (work / "pebble.json").write_text(json.dumps(config), encoding="utf-8")
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1"}
        if always_valid:
            env["PEBBLE_VA_ALWAYS_VALID"] = "1"
        if nonce_reject is not None:
            env["PEBBLE_WFE_NONCEREJECT"] = str(nonce_reject)
        log = work / "pebble.log"
        with log.open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [PEBBLE, "-config", str(work / "pebble.json"), "-dnsserver", dns_server],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=work,
                )
            )
        _wait_port(listen, procs[-1], "pebble", log)
        peb = Pebble(
            directory=f"https://127.0.0.1:{listen}/dir",
            ca_bundle=str(ca),
            http_port=http_port,
            dns_port=dns_port,
            challtest_mgmt=f"http://127.0.0.1:{mgmt}",
            pebble_mgmt=f"https://127.0.0.1:{pmgmt}",
            log_path=log,
            workdir=work,
            procs=procs,
        )
        ctx = ssl.create_default_context(cafile=str(ca))
        with urllib.request.urlopen(peb.directory, context=ctx, timeout=10) as resp:
            json.loads(resp.read())
        return peb
    except BaseException:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def pebble_running(**kw: object) -> Iterator[Pebble]:
    peb = start_pebble(**kw)  # type: ignore[arg-type]
    try:
        yield peb
    finally:
        peb.stop()


# ------------------------------------------------------------------ BIND 9

NAMED = "/usr/sbin/named"
TSIG_NAME = "certctl-test."

NAMED_CONF = """\
key "{key}" {{ algorithm hmac-sha256; secret "{secret}"; }};
options {{
    directory "{dir}";
    listen-on port {port} {{ 127.0.0.1; }};
    listen-on-v6 {{ none; }};
    pid-file none;
    session-keyfile none;
    recursion no;
    dnssec-validation no;
    notify no;
}};
controls {{ }};
zone "{zone}" {{
    type primary;
    file "{dir}/{zone}.zone";
    allow-update {{ key "{key}"; }};
}};
"""

ZONE = """\
$TTL 60
@   IN SOA ns.{zone}. admin.{zone}. 1 60 60 600 60
@   IN NS  ns.{zone}.
ns  IN A   127.0.0.1
@   IN A   127.0.0.1
*   IN A   127.0.0.1
"""


@dataclass
class Bind:
    """A real BIND 9 ``named`` on a loopback port, one dynamic zone, one TSIG key."""

    port: int
    zone: str
    key_name: str
    secret: str  # base64, generated per run
    workdir: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_bind(zone: str = "bind.test") -> Bind:
    """Start ``named -g`` (foreground, no daemon) with a dynamic zone updatable with a
    fresh TSIG key. As root it keeps running as root (no ``-u``): fine in a throwaway
    directory. scripts/test-deps.sh installs Debian's ``bind9`` when it is missing."""
    import base64

    if not os.access(NAMED, os.X_OK):
        raise RuntimeError(f"{NAMED} missing: run scripts/test-deps.sh (Debian 'bind9')")
    work = Path(tempfile.mkdtemp(prefix="certctl-named-"))
    secret = base64.b64encode(os.urandom(32)).decode()
    port = _free_tcp_udp_port()
    (work / "named.conf").write_text(
        NAMED_CONF.format(key=TSIG_NAME, secret=secret, dir=work, port=port, zone=zone),
        encoding="utf-8",
    )
    (work / f"{zone}.zone").write_text(ZONE.format(zone=zone), encoding="utf-8")
    log = work / "named.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [NAMED, "-g", "-c", str(work / "named.conf")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=work,
        )
    try:
        _wait_port(port, proc, "named", log)
        deadline = time.monotonic() + 20
        while "all zones loaded" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"named did not load: {log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Bind(port, zone, TSIG_NAME, secret, work, log, proc)

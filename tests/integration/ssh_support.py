"""Real OpenSSH sshd and nginx for the SSH/service target tests.

:class:`Sshd` starts a throwaway ``/usr/sbin/sshd -D -e`` on a free loopback port
with its own config, a generated host key and an authorized generated client key
(the test user logs in as itself). :class:`Nginx` runs ``/usr/sbin/nginx`` with its
own prefix, config, pid file and error log (``daemon off``), serving TLS on a
loopback port from a directory the tests deploy into. Both refuse loudly (the tests
FAIL, never skip) when the binaries are missing: ``scripts/test-deps.sh`` installs
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

SSHD = "/usr/sbin/sshd"
NGINX = "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port}: {_tail(log)}")


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-1500:]
    except OSError:
        return "(no log)"


def need(binary: str) -> None:
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is needed: run scripts/test-deps.sh as root", pytrace=False)


class Sshd:
    def __init__(self, root: Path) -> None:
        need(SSHD)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key_file = root / "ssh_host_ed25519_key"
        host_key.write_private_key(str(self.host_key_file))
        os.chmod(self.host_key_file, 0o600)
        self.host_public = host_key.export_public_key("openssh").decode().strip()
        self.fingerprint = host_key.get_fingerprint("sha256")
        client = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = root / "id_ed25519"
        client.write_private_key(str(self.client_key))
        os.chmod(self.client_key, 0o600)
        (root / "authorized_keys").write_bytes(client.export_public_key("openssh"))
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_public}\n")
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key_file}\n"
            f"PidFile {root / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {root / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 200\n"
            "MaxSessions 64\n"
            "LogLevel ERROR\n"
        )
        self.log = root / "sshd.log"
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_listening(self.port, self.proc, "sshd", self.log)
        except BaseException:
            self.stop()
            raise

    def ssh_vars(self, **extra: object) -> dict[str, object]:
        return {
            "port": self.port,
            "user": self.user,
            "key_file": str(self.client_key),
            "known_hosts": str(self.known_hosts),
            **extra,
        }

    def connection(self, name: str = "box", **extra: object) -> dict[str, object]:
        return {"name": name, "address": "127.0.0.1", "vars": {"ssh": self.ssh_vars(**extra)}}

    def kill_sessions(self) -> int:
        """SIGKILL every per-connection sshd process (children of the listener): the
        client sees its connection drop. Returns how many were killed."""
        killed = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(entry.name), 9)
                    killed += 1
        return killed

    def stop(self) -> None:
        self.kill_sessions()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def self_signed(cn: str) -> tuple[bytes, bytes, str]:
    """(cert PEM, key PEM, sha256 fingerprint) of a throwaway certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, key_pem, cert.fingerprint(hashes.SHA256()).hex()


class Nginx:
    """nginx serving TLS on 127.0.0.1:port from ``certdir/<name>.crt|.key``."""

    def __init__(self, root: Path, certdir: Path, name: str = "web") -> None:
        need(NGINX)
        self.root = root
        self.certdir = certdir
        self.port = free_port()
        for d in ("logs", "tmp"):
            (root / d).mkdir(parents=True, exist_ok=True)
        certdir.mkdir(parents=True, exist_ok=True)
        cert, key, self.initial_fingerprint = self_signed("initial.nginx.test")
        self.cert_file = certdir / f"{name}.crt"
        self.key_file = certdir / f"{name}.key"
        self.cert_file.write_bytes(cert)
        self.key_file.write_bytes(key)
        os.chmod(self.key_file, 0o600)
        self.extra = root / "extra.conf"
        self.extra.write_text("")
        self.conf = root / "nginx.conf"
        tmp = root / "tmp"
        self.conf.write_text(
            "daemon off;\n"
            "worker_processes 1;\n"
            f"pid {root / 'nginx.pid'};\n"
            f"error_log {root / 'logs' / 'error.log'} warn;\n"
            "events { worker_connections 64; }\n"
            "http {\n"
            "  access_log off;\n"
            f"  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;\n"
            f"  fastcgi_temp_path {tmp}/fastcgi; uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n"
            f"  include {self.extra};\n"
            "  server {\n"
            f"    listen 127.0.0.1:{self.port} ssl;\n"
            f"    ssl_certificate {self.cert_file};\n"
            f"    ssl_certificate_key {self.key_file};\n"
            "    return 200 'ok';\n"
            "  }\n"
            "}\n"
        )
        self.flags = ["-p", str(root), "-c", str(self.conf), "-e", str(root / "logs" / "error.log")]
        self.log = root / "logs" / "stdout.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [NGINX, *self.flags],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_listening(self.port, self.proc, "nginx", self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def validate(self) -> list[str]:
        return [NGINX, "-t", "-q", *self.flags]

    @property
    def reload(self) -> list[str]:
        return [NGINX, *self.flags, "-s", "reload"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


HAPROXY = "/usr/sbin/haproxy"


class HAProxy:
    """HAProxy in master-worker mode (``-W -db``) terminating TLS on a loopback port
    with one combined PEM (chain + key) from ``certdir``; SIGUSR2 reloads it."""

    def __init__(self, root: Path, certdir: Path, name: str = "web") -> None:
        need(HAPROXY)
        self.root = root
        self.certdir = certdir
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        certdir.mkdir(parents=True, exist_ok=True)
        cert, key, self.initial_fingerprint = self_signed("initial.haproxy.test")
        self.pem = certdir / f"{name}.pem"
        self.pem.write_bytes(cert + key)
        os.chmod(self.pem, 0o600)
        self.conf = root / "haproxy.cfg"
        self.conf.write_text(
            "global\n"
            f"  pidfile {root / 'haproxy.pid'}\n"
            "defaults\n"
            "  mode http\n"
            "  timeout connect 2s\n"
            "  timeout client 5s\n"
            "  timeout server 5s\n"
            "frontend fe\n"
            f"  bind 127.0.0.1:{self.port} ssl crt {self.pem}\n"
            "  http-request return status 200\n"
        )
        self.log = root / "haproxy.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [HAPROXY, "-W", "-db", "-f", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_listening(self.port, self.proc, "haproxy", self.log)
        except BaseException:
            self.stop()
            raise

    @property
    def validate(self) -> list[str]:
        return [HAPROXY, "-c", "-q", "-f", str(self.conf)]

    @property
    def reload(self) -> list[str]:
        return ["kill", "-USR2", str(self.proc.pid)]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class CuttingProxy:
    """A TCP proxy (asyncio, in its own thread) in front of a real server that can
    cut every connection it carries: :meth:`arm` makes it drop both sides as soon as
    a client->server chunk of at least ``min_bytes`` arrives (e.g. an SFTP write,
    which is much larger than the small requests before it)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.armed: int | None = None
        self.cuts = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self.loop
        ).result(10)
        self.port = int(self.server.sockets[0].getsockname()[1])

    def arm(self, min_bytes: int) -> None:
        self.armed = min_bytes

    async def _handle(self, reader: Any, writer: Any) -> None:
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_w}

        async def pump(src: Any, dst: Any, upstream: bool) -> None:
            try:
                while data := await src.read(65536):
                    if upstream and self.armed is not None and len(data) >= self.armed:
                        self.armed = None
                        self.cuts += 1
                        for w in (writer, up_w):
                            w.transport.abort()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_w, True), pump(up_r, writer, False))
        self._writers -= {writer, up_w}

    def close(self) -> None:
        async def stop() -> None:
            self.server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

"""Git credentials in a ``--git`` URL reach git through GIT_ASKPASS, never its argv.

A real smart-HTTP git server (git's own ``git-http-backend`` run as CGI behind a
Python HTTP server that demands Basic auth) serves a repository; ``git`` on PATH is
a shim that records every argument list and then runs the real git."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from certctl.daemon.gitsource import GitError, GitSource, split_credentials

BACKEND = Path("/usr/lib/git-core/git-http-backend")
USER, PASSWORD = "deploy", "s3cr3t-t0ken:with@odd/chars"

pytestmark = pytest.mark.skipif(not BACKEND.exists(), reason="git-http-backend not installed")


def _handler(root: Path) -> type[BaseHTTPRequestHandler]:
    want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def _cgi(self) -> None:
            if self.headers.get("Authorization") != want:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="git"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            path, _, query = self.path.partition("?")
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            env = {
                "GIT_PROJECT_ROOT": str(root),
                "GIT_HTTP_EXPORT_ALL": "1",
                "REQUEST_METHOD": self.command,
                "PATH_INFO": path,
                "QUERY_STRING": query,
                "CONTENT_TYPE": self.headers.get("Content-Type", ""),
                "CONTENT_LENGTH": str(len(body)),
                "REMOTE_USER": USER,
                "PATH": os.environ["PATH"],
            }
            out = subprocess.run([str(BACKEND)], input=body, env=env, capture_output=True).stdout
            head, _, payload = out.partition(b"\r\n\r\n")
            status = 200
            headers = []
            for line in head.decode().split("\r\n"):
                name, _, value = line.partition(": ")
                if name.lower() == "status":
                    status = int(value.split()[0])
                elif name:
                    headers.append((name, value))
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = _cgi
        do_POST = _cgi

    return Handler


@pytest.fixture()
def git_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    root = tmp_path / "srv"
    work = tmp_path / "work"
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "certs.yaml").write_text("certificates: {}\n")
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.test"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "first"], check=True)
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(root / "pki.git")], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/pki.git", head.stdout.strip()
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture()
def argv_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A ``git`` shim first on PATH that appends its argv to a log, then runs git."""
    real = shutil.which("git")
    assert real
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    log = tmp_path / "argv.log"
    shim = shim_dir / "git"
    shim.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
    return log


def _quoted(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def test_credentials_in_url_fetch_without_appearing_on_the_command_line(
    git_server: tuple[str, str], argv_log: Path, tmp_path: Path
) -> None:
    url, head = git_server
    with_creds = url.replace("http://", f"http://{USER}:{_quoted(PASSWORD)}@")
    src = GitSource(with_creds, "main", tmp_path / "state" / "git")
    assert src.fetch() == head
    logged = argv_log.read_text()
    assert "fetch" in logged
    assert PASSWORD not in logged and _quoted(PASSWORD) not in logged
    assert f"{USER}@" not in logged
    askpass = tmp_path / "state" / "git" / "askpass.sh"
    assert askpass.stat().st_mode & 0o777 == 0o700
    assert PASSWORD not in askpass.read_text()  # the script reads the environment


def test_wrong_password_is_refused_and_not_echoed(
    git_server: tuple[str, str], argv_log: Path, tmp_path: Path
) -> None:
    url, _ = git_server
    src = GitSource(url.replace("http://", f"http://{USER}:wrong-pw@"), "main", tmp_path / "g")
    with pytest.raises(GitError) as err:
        src.fetch()
    assert "wrong-pw" not in str(err.value)


def test_credentials_from_the_environment(
    git_server: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, head = git_server
    monkeypatch.setenv("CERTCTL_GIT_USERNAME", USER)
    monkeypatch.setenv("CERTCTL_GIT_PASSWORD", PASSWORD)
    assert GitSource(url, "main", tmp_path / "g").fetch() == head


def test_split_credentials_only_touches_http_urls() -> None:
    assert split_credentials("https://u:p%40ss@h.example/r.git") == (
        "https://h.example/r.git",
        "u",
        "p@ss",
    )
    assert split_credentials("https://tok@h.example/r") == ("https://h.example/r", "tok", None)
    assert split_credentials("git@h.example:r.git") == ("git@h.example:r.git", None, None)
    assert split_credentials("ssh://git@h.example/r") == ("ssh://git@h.example/r", None, None)

"""Git as the inventory's source: fetch a branch, check a commit, check it out.

Layout under the work directory (``<state dir>/git``): ``repo.git`` (a bare
repository the branch is fetched into, as ``refs/certctl/<branch>``), ``checkout``
(the work tree of the commit in force; the engine's inventory lives there, at a
fixed path so relative target roots stay put) and ``candidate`` (a new commit
exported with ``git archive`` and loaded there first, so a commit that breaks the
inventory never replaces the one in force).

``git`` runs as argument lists with ``GIT_TERMINAL_PROMPT=0`` (never waits for a
password). A URL's user-info (``https://user:token@host``) is never printed and never
put on git's command line (which every local user can read in ``ps``): it is taken
out of the URL and handed to git through ``GIT_ASKPASS`` -- a small script in the
0700 work directory that prints ``CERTCTL_GIT_USERNAME`` / ``CERTCTL_GIT_PASSWORD``
from git's environment. Those two variables may also be set by the operator instead
of writing the credentials into the URL.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

from certctl.errors import PermanentError, TransientError

_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")
_SHA = re.compile(r"^[0-9a-f]{40,64}$")


def redact_url(url: str) -> str:
    """``https://user:token@host/x?access_token=t`` -> ``https://***@host/x?<redacted>``.

    URLs are rebuilt from their parsed parts (user info up to the LAST ``@`` before
    the host, and any query, are hidden); anything that does not parse as a URL with
    a scheme and host falls back to the pattern, which is also used on free text."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("***@", url)
    if not parts.scheme or not parts.netloc:
        return _USERINFO.sub("***@", url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """``https://user:tok@host/r.git`` -> (``https://host/r.git``, ``user``, ``tok``).

    Only http(s) URLs carry credentials this way; anything else (ssh, file paths,
    scp-like ``git@host:repo``) is returned unchanged with no credentials."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, None, None
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return url, None, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, password = userinfo.partition(":")
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(user) or None, unquote(password) if sep else None


_ASKPASS = """#!/bin/sh
# Written by certctl: answers git's credential prompts from its environment.
case "$1" in
  Username*) printf '%s\\n' "$CERTCTL_GIT_USERNAME" ;;
  *) printf '%s\\n' "$CERTCTL_GIT_PASSWORD" ;;
esac
"""


class GitError(TransientError):
    """A git command failed (fetch: the remote may be back next tick)."""


class GitSource:
    def __init__(
        self, url: str, branch: str, workdir: Path, subdir: str = "", timeout: float = 120.0
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", branch) or branch.startswith(("-", "/")):
            raise PermanentError(f"branch {branch!r} is not a plain branch name")
        if subdir and (Path(subdir).is_absolute() or ".." in Path(subdir).parts):
            raise PermanentError(f"--git-path {subdir!r} must be a relative path inside the repo")
        self.url, self._user, self._password = split_credentials(url)
        self.branch = branch
        self.workdir = workdir
        self.subdir = subdir.strip("/")
        self.timeout = timeout
        self.repo = workdir / "repo.git"
        self.checkout_dir = workdir / "checkout"
        self.candidate_dir = workdir / "candidate"
        self.ref = f"refs/certctl/{branch}"

    @property
    def inventory_path(self) -> Path:
        return self.checkout_dir / self.subdir if self.subdir else self.checkout_dir

    def candidate_inventory(self) -> Path:
        d = self.candidate_dir
        return d / self.subdir if self.subdir else d

    # ------------------------------------------------------------ plumbing
    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
        if self._user is not None:
            env["CERTCTL_GIT_USERNAME"] = self._user
        if self._password is not None:
            env["CERTCTL_GIT_PASSWORD"] = self._password
        if "CERTCTL_GIT_USERNAME" in env or "CERTCTL_GIT_PASSWORD" in env:
            env["GIT_ASKPASS"] = str(self._askpass())
        try:
            proc = subprocess.run(
                ["git", f"--git-dir={self.repo}", *args],
                capture_output=True,
                env=env,
                timeout=self.timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} timed out after {self.timeout:g}s") from None
        except FileNotFoundError:
            raise PermanentError("git is not installed") from None
        if check and proc.returncode != 0:
            err = redact_url(proc.stderr.decode("utf-8", "replace").strip())
            raise GitError(f"git {args[0]} failed ({proc.returncode}): {err[-600:]}")
        return proc

    def _askpass(self) -> Path:
        path = self.workdir / "askpass.sh"
        if not path.exists() or path.read_text() != _ASKPASS:
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = path.with_suffix(".tmp")
            tmp.unlink(missing_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
            with os.fdopen(fd, "w") as fh:
                fh.write(_ASKPASS)
            os.replace(tmp, path)
        return path

    def _init(self) -> None:
        if not (self.repo / "HEAD").exists():
            self.workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
            subprocess.run(
                ["git", "init", "-q", "--bare", str(self.repo)],
                check=True,
                capture_output=True,
                timeout=self.timeout,
            )

    # ------------------------------------------------------------ operations
    def fetch(self) -> str:
        """Fetch the branch; return its head commit."""
        self._init()
        self._git(
            "fetch",
            "-q",
            "--no-tags",
            "--force",
            "--",
            self.url,
            f"+refs/heads/{self.branch}:{self.ref}",
        )
        return self.rev_parse(self.ref)

    def rev_parse(self, rev: str) -> str:
        out = self._git("rev-parse", "--verify", "-q", f"{rev}^{{commit}}")
        sha = str(out.stdout.decode().strip())
        if not _SHA.match(sha):
            raise GitError(f"cannot resolve {rev}")
        return sha

    def has_commit(self, sha: str) -> bool:
        return self._git("cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode == 0

    def is_ancestor(self, older: str, newer: str) -> bool:
        """True when ``older`` is an ancestor of (or equal to) ``newer``."""
        res = self._git("merge-base", "--is-ancestor", older, newer, check=False)
        if res.returncode not in (0, 1):
            raise GitError(f"git merge-base failed for {older[:12]} {newer[:12]}")
        return res.returncode == 0

    def subject(self, sha: str) -> str:
        return str(self._git("log", "-1", "--format=%s", sha).stdout.decode().strip())[:200]

    def export_candidate(self, sha: str) -> Path:
        """Extract commit ``sha`` into ``candidate`` (replacing what was there)."""
        if self.candidate_dir.exists():
            shutil.rmtree(self.candidate_dir)
        self.candidate_dir.mkdir(parents=True)
        data = self._git("archive", "--format=tar", sha).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(self.candidate_dir, filter="data")
        return self.candidate_inventory()

    def checkout(self, sha: str) -> None:
        """Make ``checkout`` hold commit ``sha`` (untracked files, e.g. deployed
        output under relative target roots, are left alone)."""
        self.checkout_dir.mkdir(parents=True, exist_ok=True)
        self._git(f"--work-tree={self.checkout_dir}", "checkout", "-q", "-f", "--detach", sha)

    def cleanup(self) -> None:
        if self.candidate_dir.exists():
            shutil.rmtree(self.candidate_dir, ignore_errors=True)

"""``certctl import certbot [DIR]``: certbot lineages as inventory entries.

certbot keeps, per lineage NAME, ``renewal/NAME.conf`` (configobj-style INI: the
lineage's file paths at the top, ``[renewalparams]`` with ``server``,
``authenticator``, ``key_type``, ``webroot_path`` / ``[[webroot_map]]``, ``http01_port``,
``reuse_key``, ``renew_hook`` (``--deploy-hook``), ``pre_hook``, ``post_hook``), and the
files under ``live/NAME/{cert,chain,fullchain,privkey}.pem`` -- symlinks into
``archive/NAME/`` -- which is where services read them.

Decisions (see "Adoption and imports" in docs/architecture.md):

* Files are read only from ``DIR/live/NAME/`` and, through those symlinks, only from
  ``DIR/archive/NAME/``. The configuration's path values must end in
  ``live/NAME/<file>.pem`` (any prefix: a copied directory still imports); anything
  else -- ``privkey = /etc/shadow``, a symlink leaving the archive -- refuses the
  lineage, naming the file and line. Other lineages still import.
* certctl deploys where services read: a ``file`` target (a ``command`` target when
  the lineage has a deploy/post hook, whose ``reload`` runs the hook with certbot's
  ``RENEWED_LINEAGE``/``RENEWED_DOMAINS``) rooted at ``live/NAME``. Targets never write
  through symlinks, so the import replaces the four symlinks by regular files holding
  the same bytes, and renames ``renewal/NAME.conf`` to ``NAME.conf.certctl-imported``
  so that certbot's timer no longer renews the lineage (two renewers would fight).
  ``archive/`` is left alone. ``--dry-run`` changes nothing.
* The ACME server becomes an ``acme`` issuer (or the inventory's issuer with that
  directory URL). certbot's ACME account key is not copied: certctl registers its own
  account (a CA requiring EAB needs ``eab:`` added). ``standalone`` maps to the built-in
  http-01 responder on ``http01_port``, ``webroot`` to the http-01 webroot; DNS plugins
  and ``manual`` to a dns-01 hook placeholder that fails until filled in (with a note).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import configobj  # type: ignore[import-untyped]

from certctl.adopt import sources as src
from certctl.adopt.model import (
    AdoptError,
    Candidate,
    IssuerDraft,
    Takeover,
    TargetDraft,
    check_names,
    key_mapping,
    safe_name,
)
from certctl.model import SecretBytes

LE_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"
FILES = {
    "cert": "cert.pem",
    "chain": "chain.pem",
    "fullchain": "fullchain.pem",
    "privkey": "privkey.pem",
}
#: Runs each argument as its own ``sh -c`` command, like certbot runs each hook; the
#: exit status is the last failing hook's.
_EACH = 'rc=0; for hook in "$@"; do sh -c "$hook" || rc=$?; done; exit $rc'
PATH_KEYS = {
    "cert": "cert_path",
    "chain": "chain_path",
    "fullchain": "fullchain_path",
    "privkey": "key_path",
}


@dataclass
class Conf:
    """A parsed renewal configuration: values with their line numbers."""

    path: str
    top: dict[str, tuple[str, int]] = field(default_factory=dict)
    params: dict[str, tuple[str, int]] = field(default_factory=dict)
    webroot_map: dict[str, tuple[str, int]] = field(default_factory=dict)

    def where(self, line: int) -> str:
        return f"{self.path}:{line}"


def parse_conf(data: bytes, where: str) -> Conf:
    """A renewal configuration, its values as certbot reads them (with configobj, as
    certbot does: quoting, triple quotes, inline comments, lists) and each key's line
    for messages. Errors name file:line."""
    text = src.decode_text(data, where)
    conf = Conf(where)
    section: dict[str, tuple[str, int]] = conf.top
    lines = text.splitlines()
    open_quote: str | None = None  # inside a multi-line triple-quoted value
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if "\x00" in line:
            raise AdoptError(f"{where}:{lineno}: NUL character")
        if open_quote is not None:
            if open_quote in line:
                open_quote = None
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("[[") and line.endswith("]]"):
            name = line[2:-2].strip()
            # an unknown subsection is read and ignored
            section = conf.webroot_map if name == "webroot_map" else {}
            continue
        if line.startswith("[") and line.endswith("]"):
            name = line[1:-1].strip()
            section = conf.params if name == "renewalparams" else {}
            continue
        if "=" not in line:
            raise AdoptError(f"{where}:{lineno}: expected 'key = value' or a [section]")
        key, value = (p.strip() for p in line.split("=", 1))
        if not key:
            raise AdoptError(f"{where}:{lineno}: a value without a key")
        for q in ("'''", '"""'):
            if value.startswith(q) and q not in value[3:]:
                open_quote = q
        section[key] = (value, lineno)
    try:
        parsed = configobj.ConfigObj(
            lines, encoding="utf-8", default_encoding="utf-8", raise_errors=True
        )
        _take_values(conf.top, parsed, where)
        params = parsed.get("renewalparams")
        if isinstance(params, configobj.Section):
            _take_values(conf.params, params, where)
            wmap = params.get("webroot_map")
            if isinstance(wmap, configobj.Section):
                _take_values(conf.webroot_map, wmap, where)
    except configobj.ConfigObjError as exc:
        at = getattr(exc, "line_number", None) or 0
        raise AdoptError(f"{where}:{at}: {str(exc)[:200]}") from None
    return conf


def _take_values(out: dict[str, tuple[str, int]], section: Any, where: str) -> None:
    """Replace the raw text of each key in ``out`` by configobj's value (a list value
    is joined with ', ', as _list splits it)."""
    for key, (_, line) in list(out.items()):
        try:
            value = section[key] if key in section.scalars else None
        except configobj.InterpolationError as exc:
            raise AdoptError(f"{where}:{line}: {str(exc)[:200]}") from None
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        if isinstance(value, str):
            out[key] = (value, line)
        else:
            del out[key]


def _list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _true(conf: Conf, key: str) -> bool:
    return conf.params.get(key, ("", 0))[0].lower() in ("true", "yes", "1")


class CertbotImport(src.ToolImport):
    """Reads one certbot configuration directory into candidates."""

    def candidates(self, only: set[str] | None = None) -> list[Candidate]:
        renewal = self.dir / "renewal"
        if not renewal.is_dir():
            raise AdoptError(f"{self.dir} is not a certbot configuration directory (no renewal/)")
        out: list[Candidate] = []
        seen: set[str] = set()
        for conf_path in sorted(renewal.iterdir()):
            if conf_path.suffix != ".conf" or conf_path.name.startswith("."):
                continue
            lineage = conf_path.name[: -len(".conf")]
            if only is not None and lineage not in only:
                continue
            seen.add(lineage)
            try:
                out.append(self._lineage(lineage, conf_path))
            except AdoptError as exc:
                self.report.refused.append(f"lineage {lineage}: {exc}")
        if only is not None:
            for missing in sorted(only - seen):
                self.report.refused.append(f"lineage {missing}: no renewal/{missing}.conf")
        return out

    # -------------------------------------------------------------- one lineage
    def _lineage(self, lineage: str, conf_path: Path) -> Candidate:
        rel_conf = f"renewal/{conf_path.name}"
        shown = str(conf_path)
        conf = parse_conf(src.read_bounded(conf_path, "renewal configuration"), shown)
        live = self.dir / "live" / lineage
        own = self.dir / "archive" / lineage
        if os.path.islink(own):  # another lineage's archive, or anywhere
            raise AdoptError(
                f"{own} is a symbolic link; a lineage's files must be in its own archive "
                "directory; refusing to read it"
            )
        if os.path.islink(live):  # the take-over would write wherever it points
            raise AdoptError(f"{live} is a symbolic link, not certbot's directory; refusing it")
        archive = os.path.realpath(own)
        datas: dict[str, bytes] = {}
        takeovers: list[Takeover] = []
        modes: dict[str, int] = {}
        for role, fname in FILES.items():
            declared = conf.top.get(role)
            if declared is None:
                raise AdoptError(f"{shown}: no '{role} = ...' line")
            value, line = declared
            tail = os.path.normpath(value).split(os.sep)[-3:]
            if tail != ["live", lineage, fname]:
                raise AdoptError(
                    f"{conf.where(line)}: {role} = {value[:80]!r} is not "
                    f"live/{lineage}/{fname} of this directory; refusing to read it"
                )
            path = live / fname
            data, takeover, mode = self._read_live(path, archive)
            datas[role] = data
            modes[role] = mode
            if takeover is not None:
                takeovers.append(takeover)
        leaf = src.load_leaf(datas["cert"], str(live / "cert.pem"))
        try:
            check_names(leaf)
        except AdoptError as exc:
            raise AdoptError(f"{live / 'cert.pem'}: {exc}") from None
        src.load_chain(datas["chain"], str(live / "chain.pem"))
        if datas["fullchain"] != datas["cert"] + datas["chain"]:
            raise AdoptError(f"{live / 'fullchain.pem'} is not cert.pem followed by chain.pem")
        key_pem = src.check_key(datas["privkey"], leaf, str(live / "privkey.pem"))
        try:
            key = key_mapping(leaf.public_key(), reuse=_true(conf, "reuse_key"))
        except AdoptError as exc:
            raise AdoptError(f"{live / 'cert.pem'}: {exc}") from None
        notes: list[str] = []
        issuer = self._issuer(conf, lineage, notes)
        target = self._target(conf, lineage, live, leaf, modes, notes)
        renew_before = None
        rbe = conf.top.get("renew_before_expiry")
        if rbe is not None:
            renew_before = _duration(rbe[0])
            if renew_before is None:
                notes.append(f"renew_before_expiry {rbe[0]!r} not understood; the default applies")
        for pre in ("pre_hook",):
            if pre in conf.params:
                notes.append(
                    f"certbot ran a {pre} ({conf.params[pre][0][:60]!r}); certctl does not: "
                    "if it freed port 80 for the standalone authenticator, the built-in "
                    "responder needs that port too"
                )
        if _true(conf, "no_verify_ssl"):
            notes.append(
                "certbot skipped TLS verification of the ACME server (no_verify_ssl); certctl "
                "verifies it: set ca_bundle on the issuer for a private ACME CA"
            )
        return Candidate(
            name=safe_name(lineage),
            source=f"certbot {lineage} ({rel_conf} in {self.dir})",
            leaf=leaf,
            cert_pem=datas["cert"],
            chain_pem=datas["chain"],
            key_pem=key_pem,
            key=key,
            issuer=issuer,
            targets=[target],
            renew_before=renew_before,
            takeovers=takeovers,
            disable=[str(conf_path)],
            notes=notes,
        )

    def _read_live(self, path: Path, archive: str) -> tuple[bytes, Takeover | None, int]:
        """A live file: through its symlink, which must stay in the lineage's archive."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise AdoptError(f"{path} is missing") from None
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(path)
            real = os.path.realpath(path)
            if os.path.dirname(real) != archive:
                raise AdoptError(
                    f"{path} points to {real[:120]}, outside {archive}; refusing to read it"
                )
            data = src.read_bounded(real, "file")
            mode = src.mode_of(real)
            return data, Takeover(str(path), link, SecretBytes(data), mode), mode
        if stat.S_ISREG(st.st_mode):  # taken over before, or made by hand
            return src.read_bounded(path, "file"), None, stat.S_IMODE(st.st_mode)
        raise AdoptError(f"{path} is neither a file nor a symlink")

    def _issuer(self, conf: Conf, lineage: str, notes: list[str]) -> IssuerDraft:
        server = conf.params.get("server", (LE_PRODUCTION, 0))[0]
        parts = urlsplit(server)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            line = conf.params.get("server", ("", 0))[1]
            raise AdoptError(f"{conf.where(line)}: server {server[:80]!r} is not an http(s) URL")
        challenge = self._challenge(conf, lineage, notes)
        return self._acme_issuer(
            server,
            challenge,
            _issuer_base(parts.hostname, parts.port, server),
            f"the ACME server of certbot lineage {lineage} (server = {server}); certctl "
            "registers its own account (certbot's account key is not copied; add eab: if "
            "the CA requires external account binding); terms of service as agreed with certbot",
        )

    def _challenge(self, conf: Conf, lineage: str, notes: list[str]) -> dict[str, Any]:
        auth = conf.params.get("authenticator", ("standalone", 0))[0]
        if auth == "standalone":
            port = conf.params.get("http01_port", ("80", 0))[0]
            addr = conf.params.get("http01_address", ("0.0.0.0", 0))[0] or "0.0.0.0"  # noqa: S104
            if not port.isdigit() or not 0 < int(port) < 65536:
                line = conf.params["http01_port"][1]
                raise AdoptError(f"{conf.where(line)}: http01_port {port[:20]!r} is not a port")
            return {"type": "http-01", "responder": {"listen": f"{addr}:{int(port)}"}}
        if auth == "webroot":
            paths = {p for p, _ in conf.webroot_map.values()}
            paths.update(_list(conf.params.get("webroot_path", ("", 0))[0]))
            if not paths:
                raise AdoptError(f"{conf.path}: authenticator webroot without a webroot path")
            chosen = sorted(paths)[0]
            if len(paths) > 1:
                notes.append(
                    f"certbot used several webroots ({', '.join(sorted(paths))}); a certctl "
                    f"issuer has one: {chosen}"
                )
            return {"type": "http-01", "webroot": {"path": chosen}}
        if auth.startswith("dns") or auth == "manual":
            notes.append(
                f"certbot answered dns-01 with {auth!r}: set the issuer's challenge hook (add/"
                "remove commands) or rfc2136 settings; until then renewal fails"
            )
            return {
                "type": "dns-01",
                "hook": {
                    "add": ["false", f"certctl-import: configure the dns-01 hook ({auth})"],
                    "remove": ["true"],
                },
            }
        notes.append(
            f"certbot answered http-01 with its {auth!r} plugin, which edits the web server; "
            "certctl uses a webroot: serve /var/www/html/.well-known/acme-challenge/ (or "
            "change the issuer's webroot path)"
        )
        return {"type": "http-01", "webroot": {"path": "/var/www/html"}}

    def _target(
        self,
        conf: Conf,
        lineage: str,
        live: Path,
        leaf: Any,
        modes: dict[str, int],
        notes: list[str],
    ) -> TargetDraft:
        config: dict[str, Any] = {"root": str(live)}
        hooks = [
            conf.params[h][0]
            for h in ("renew_hook", "deploy_hook", "post_hook")
            if h in conf.params
        ]
        hooks = [h for h in dict.fromkeys(hooks) if h.strip()]
        config = {"type": "command" if hooks else "file", **config}
        for role, fname in FILES.items():
            config[PATH_KEYS[role]] = fname
        cert_mode = modes["cert"]
        if cert_mode != 0o644:
            config["mode"] = f"0{cert_mode:o}"
        if modes["privkey"] != 0o600:
            config["key_mode"] = f"0{modes['privkey']:o}"
        if len({modes["cert"], modes["chain"], modes["fullchain"]}) > 1:
            notes.append(
                "cert.pem, chain.pem and fullchain.pem have different modes; "
                f"certctl gives them all {cert_mode:04o} at the next deploy"
            )
        if hooks:
            from certctl.adopt.model import names_of

            config["validate"] = []
            # certbot runs each hook as its own shell command: joined into one script,
            # a hook ending in a comment (or an open quote) would swallow the next one.
            run = ["sh", "-c", *(hooks if len(hooks) == 1 else [_EACH, "certbot-hooks", *hooks])]
            config["reload"] = [
                "env",
                f"RENEWED_LINEAGE={live}",
                "RENEWED_DOMAINS=" + " ".join(names_of(leaf)),
                *run,
            ]
            comment = (
                f"certbot lineage {lineage}: the live/ files services read; reload runs the "
                "lineage's deploy/post hook as certbot did"
            )
        else:
            comment = f"certbot lineage {lineage}: the live/ files services read"
        return TargetDraft(f"certbot-{safe_name(lineage)}", config, comment)


def _issuer_base(host: str, port: int | None, server: str) -> str:
    if host.endswith("api.letsencrypt.org"):
        return "letsencrypt-staging" if "staging" in host else "letsencrypt"
    return safe_name(f"acme-{host}" + (f"-{port}" if port else ""))


def _duration(text: str) -> str | None:
    """certbot's ``renew_before_expiry = 30 days`` as an inventory duration."""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    unit = {"day": "d", "days": "d", "hour": "h", "hours": "h", "week": "w", "weeks": "w"}
    u = unit.get(parts[1].lower())
    return f"{int(parts[0])}{u}" if u else None

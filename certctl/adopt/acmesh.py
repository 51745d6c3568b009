"""``certctl import acme.sh [DIR]``: acme.sh certificates as inventory entries.

acme.sh keeps, per certificate, ``DIR/<domain>/`` (RSA) or ``DIR/<domain>_ecc/``
(ECDSA) holding ``<domain>.conf`` (shell assignments ``Le_Domain='…'``; values may be
wrapped as ``'__ACME_BASE64__START_<base64>__ACME_BASE64__END_'``), ``<domain>.cer``,
``<domain>.key``, ``ca.cer`` and ``fullchain.cer``. ``--install-cert`` copies them to
``Le_RealCertPath``, ``Le_RealCACertPath``, ``Le_RealKeyPath``,
``Le_RealFullChainPath`` and runs ``Le_ReloadCmd``.

Mapping: ``Le_Domain`` + ``Le_Alt`` are checked against the certificate's names (the
certificate is authoritative); ``Le_Keylength`` against its key; ``Le_API`` is the
ACME directory; ``Le_Webroot`` a path (http-01 webroot), ``standalone`` (built-in
responder on ``Le_HTTPPort``, default 80) or ``dns_*`` (a dns-01 hook placeholder with
a note). The install paths become a ``file`` target -- a ``command`` target whose
``reload`` runs ``Le_ReloadCmd`` with ``sh -c`` when there is one -- rooted at their
common directory; without install paths the target is acme.sh's own directory.
``Le_DeployHook`` (acme.sh deploy plugins) is not mapped: a note says which.
Files are read from the domain directory and the declared install paths only.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from certctl import pki
from certctl.adopt import sources as src
from certctl.adopt.model import (
    AdoptError,
    Candidate,
    IssuerDraft,
    TargetDraft,
    check_names,
    key_mapping,
    safe_name,
)

B64_START = "__ACME_BASE64__START_"
B64_END = "__ACME_BASE64__END_"
ZEROSSL = "https://acme.zerossl.com/v2/DV90"
_SAFE_PATH_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._/@+=,:%-")


def parse_conf(data: bytes, where: str) -> dict[str, tuple[str, int]]:
    """``NAME='value'`` lines (acme.sh writes single-quoted values); errors name
    file:line."""
    text = src.decode_text(data, where)
    out: dict[str, tuple[str, int]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if "\x00" in line:
            raise AdoptError(f"{where}:{lineno}: NUL character")
        key, sep, value = line.partition("=")
        if not sep or not key or not all(c.isalnum() or c == "_" for c in key):
            raise AdoptError(f"{where}:{lineno}: expected NAME='value'")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif value[:1] in ("'", '"'):
            raise AdoptError(f"{where}:{lineno}: unterminated quoted value")
        if value.startswith(B64_START) and value.endswith(B64_END):
            enc = value[len(B64_START) : -len(B64_END)]
            try:
                value = src.decode_text(base64.b64decode(enc, validate=True), f"{where}:{lineno}")
            except (binascii.Error, ValueError):
                raise AdoptError(f"{where}:{lineno}: {key} holds invalid base64") from None
            if "\x00" in value:  # no command or path holds one; argv cannot carry it
                raise AdoptError(f"{where}:{lineno}: {key} holds a NUL character")
        out[key] = (value, lineno)
    return out


def _set(conf: dict[str, tuple[str, int]], key: str) -> str | None:
    v = conf.get(key, ("", 0))[0].strip()
    return v if v and v.lower() != "no" else None


class AcmeShImport(src.ToolImport):
    def candidates(self, only: set[str] | None = None) -> list[Candidate]:
        if not self.dir.is_dir():
            raise AdoptError(f"{self.dir} is not a directory")
        out: list[Candidate] = []
        seen: set[str] = set()
        for sub in sorted(self.dir.iterdir()):
            if not sub.is_dir() or sub.is_symlink():
                continue
            ecc = sub.name.endswith("_ecc")
            domain = sub.name[: -len("_ecc")] if ecc else sub.name
            conf_path = sub / f"{domain}.conf"
            if not conf_path.is_file():
                continue  # ca/, deploy/, dnsapi/ ...
            if only is not None and domain not in only:
                continue
            seen.add(domain)
            try:
                out.append(self._one(domain, sub, conf_path, ecc))
            except AdoptError as exc:
                self.report.refused.append(f"{sub.name}: {exc}")
        if only is not None:
            for missing in sorted(only - seen):
                self.report.refused.append(f"{missing}: no {missing}/{missing}.conf")
        if not out and not self.report.refused:
            raise AdoptError(f"{self.dir}: no acme.sh certificate directories found")
        return out

    def _one(self, domain: str, sub: Path, conf_path: Path, ecc: bool) -> Candidate:
        where = str(conf_path)
        conf = parse_conf(src.read_bounded(conf_path, "acme.sh configuration"), where)
        cer = src.read_bounded(sub / f"{domain}.cer", "certificate")
        leaf = src.load_leaf(cer, str(sub / f"{domain}.cer"))
        ca = src.read_bounded(sub / "ca.cer", "CA certificate")
        src.load_chain(ca, str(sub / "ca.cer"))
        key_pem = src.check_key(
            src.read_bounded(sub / f"{domain}.key", "private key"), leaf, str(sub / f"{domain}.key")
        )
        try:
            names = check_names(leaf)
        except AdoptError as exc:
            raise AdoptError(f"{sub / (domain + '.cer')}: {exc}") from None
        declared = [conf.get("Le_Domain", (domain, 0))[0]]
        alt = _set(conf, "Le_Alt")
        if alt:
            declared += [a.strip() for a in alt.split(",") if a.strip()]
        if sorted(set(declared)) != sorted(set(names)):
            line = conf.get("Le_Domain", ("", 0))[1]
            raise AdoptError(
                f"{where}:{line}: Le_Domain/Le_Alt name {sorted(set(declared))} but "
                f"{domain}.cer is for {sorted(set(names))}"
            )
        key = key_mapping(leaf.public_key())
        kl = conf.get("Le_Keylength", ("", 0))
        if kl[0]:
            want = kl[0].lower()
            have = pki.key_spec_id(leaf.public_key())
            expect = {"ec-256": "ecdsa-p256", "ec-384": "ecdsa-p384"}.get(want, f"rsa-{want}")
            if expect != have:
                raise AdoptError(f"{where}:{kl[1]}: Le_Keylength {kl[0]!r} but the key is {have}")
        if ecc != key["type"].startswith("ecdsa"):
            self.report.notes.append(f"{sub.name}: directory name and key type disagree")
        notes: list[str] = []
        issuer = self._issuer(conf, domain, where, notes)
        target = self._target(conf, domain, sub, notes)
        hooks = _set(conf, "Le_DeployHook")
        if hooks:
            notes.append(
                f"acme.sh deploy hook(s) {hooks.strip(',')!r} are not mapped; add a target "
                "for where they deployed"
            )
        days = _set(conf, "Le_RenewalDays")
        renew_before = None
        if days and days.isdigit():
            notes.append(f"acme.sh renewed every {days} days; certctl renews by renew_before")
        cand = Candidate(
            name=safe_name(domain),
            source=f"acme.sh {sub.name}/{domain}.conf in {self.dir}",
            leaf=leaf,
            cert_pem=cer,
            chain_pem=ca,
            key_pem=key_pem,
            key=key,
            issuer=issuer,
            targets=[target],
            renew_before=renew_before,
            # renamed last (seed step 6), like certbot's: acme.sh --cron then skips it
            disable=[str(conf_path)],
            notes=notes,
        )
        # The install paths must hold what acme.sh holds (the seed records them as
        # deployed): checked here, so a stale one refuses this domain, not the import.
        from certctl.adopt.seed import placement_files

        placement_files(target.config, self.dir, cand)
        return cand

    def _issuer(
        self, conf: dict[str, tuple[str, int]], domain: str, where: str, notes: list[str]
    ) -> IssuerDraft:
        api, line = conf.get("Le_API", ("", 0))
        if not api:
            api = ZEROSSL
            notes.append(f"no Le_API: assumed acme.sh's default CA {ZEROSSL}")
        parts = urlsplit(api)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise AdoptError(f"{where}:{line}: Le_API {api[:80]!r} is not an http(s) URL")
        webroot = _set(conf, "Le_Webroot") or "standalone"
        first = webroot.split(",")[0].strip()
        challenge: dict[str, Any]
        if first.startswith("dns_") or first == "dns":
            notes.append(
                f"acme.sh answered dns-01 with {first!r}: set the issuer's challenge hook; "
                "until then renewal fails"
            )
            challenge = {
                "type": "dns-01",
                "hook": {
                    "add": ["false", f"certctl-import: configure the dns-01 hook ({first})"],
                    "remove": ["true"],
                },
            }
        elif first in ("standalone", "alpn", "tls"):
            port = _set(conf, "Le_HTTPPort") or "80"
            if not port.isdigit():
                port = "80"
            if first != "standalone":
                notes.append(f"acme.sh used {first}; certctl answers http-01 on port {port}")
            challenge = {"type": "http-01", "responder": {"listen": f"0.0.0.0:{port}"}}
        else:
            challenge = {"type": "http-01", "webroot": {"path": first}}
        host = parts.hostname
        base = (
            "letsencrypt"
            if host.endswith("api.letsencrypt.org") and "staging" not in host
            else "zerossl"
            if host == "acme.zerossl.com"
            else safe_name(f"acme-{host}" + (f"-{parts.port}" if parts.port else ""))
        )
        return self._acme_issuer(
            api,
            challenge,
            base,
            f"the ACME server of acme.sh {domain} (Le_API = {api}); certctl registers its own "
            "account (add eab: if the CA requires external account binding)",
        )

    def _target(
        self,
        conf: dict[str, tuple[str, int]],
        domain: str,
        sub: Path,
        notes: list[str],
    ) -> TargetDraft:
        installed = {
            role: _set(conf, key)
            for role, key in (
                ("cert_path", "Le_RealCertPath"),
                ("chain_path", "Le_RealCACertPath"),
                ("key_path", "Le_RealKeyPath"),
                ("fullchain_path", "Le_RealFullChainPath"),
            )
        }
        paths = {k: os.path.normpath(v) for k, v in installed.items() if v}
        reload = _set(conf, "Le_ReloadCmd")
        config: dict[str, Any]
        if paths:
            for p in paths.values():
                if not os.path.isabs(p) or not set(p) <= _SAFE_PATH_CHARS:
                    raise AdoptError(
                        f"{sub / (domain + '.conf')}: install path {p[:80]!r} must be absolute "
                        "and hold only letters, digits and ._-/@+=,:%"
                    )
            if len(set(paths.values())) != len(paths):
                raise AdoptError(f"{domain}: two install paths name the same file")
            root = os.path.commonpath([os.path.dirname(p) for p in paths.values()])
            config = {"root": root}
            config.update({k: os.path.relpath(p, root) for k, p in paths.items()})
            where = "the install paths (acme.sh --install-cert)"
        else:
            config = {
                "root": str(sub),
                "cert_path": f"{domain}.cer",
                "chain_path": "ca.cer",
                "fullchain_path": "fullchain.cer",
                "key_path": f"{domain}.key",
            }
            where = "acme.sh's own directory (no install paths were set)"
            notes.append("no install paths: certctl deploys into acme.sh's directory")
        for k, rel in list(config.items()):
            if k.endswith("_path"):
                mode = src.mode_of(os.path.join(config["root"], rel))
                if k == "key_path" and mode != 0o600:
                    config["key_mode"] = f"0{mode:o}"
                if k != "key_path" and mode != 0o644 and "mode" not in config:
                    config["mode"] = f"0{mode:o}"
        if reload:
            # acme.sh runs Le_ReloadCmd with these exported (e.g. `cat "$CERT_KEY_PATH"
            # "$CERT_FULLCHAIN_PATH" > haproxy.pem`): set them to the files certctl
            # deploys, or to acme.sh's own copy (not updated) for a role not installed.
            env = []
            for var, role, own in (
                ("CERT_PATH", "cert_path", f"{domain}.cer"),
                ("CERT_KEY_PATH", "key_path", f"{domain}.key"),
                ("CA_CERT_PATH", "chain_path", "ca.cer"),
                ("CERT_FULLCHAIN_PATH", "fullchain_path", "fullchain.cer"),
            ):
                if role in config:
                    env.append(f"{var}={os.path.join(config['root'], config[role])}")
                    continue
                env.append(f"{var}={sub / own}")
                if var in reload:
                    notes.append(
                        f"Le_ReloadCmd uses ${var}, which certctl does not deploy (no install "
                        f"path for it): it still names acme.sh's copy {sub / own}; add a "
                        f"{role} to target acmesh-{safe_name(domain)}"
                    )
            config = {
                "type": "command",
                **config,
                "validate": [],
                "reload": ["env", *env, f"Le_Domain={domain}", "sh", "-c", reload],
            }
            comment = (
                f"acme.sh {domain}: {where}; reload runs Le_ReloadCmd with acme.sh's "
                "CERT_PATH/CERT_KEY_PATH/CA_CERT_PATH/CERT_FULLCHAIN_PATH/Le_Domain"
            )
        else:
            config = {"type": "file", **config}
            comment = f"acme.sh {domain}: {where}"
        return TargetDraft(f"acmesh-{safe_name(domain)}", config, comment)

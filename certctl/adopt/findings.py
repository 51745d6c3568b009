"""``certctl adopt``: discovery findings (``certctl discover``) as inventory entries.

Findings with the same leaf fingerprint are one certificate with one placement per
place it was found. Per finding:

* a PEM file on the controller (host ``local``) whose matching key discovery found
  (``key_path``) and certctl can read (unencrypted, same public key) is adopted fully:
  a ``file`` target over the file(s) as they are (``fullchain_path`` when the file
  holds the chain too, ``combined_path`` when the key is in the same file), the key
  stored (encrypted) with the version, a deployment record for the files;
* anything else -- no key beside it, an encrypted or unreadable key, a file on another
  host, a DER/PKCS#12/JKS store, a TLS endpoint -- is adopted **observe only**: the
  version is recorded without a key (custody ``observed``), so certctl reports its
  expiry and renews it (new key) in its renewal window, but never redeploys it before.
  Files on an inventory host get an ``ssh`` target; endpoints an ``endpoints:`` entry.

The issuer is an inventory issuer when the leaf verifies against one of its CA
certificates (a local CA's stored root/intermediate, or a CA in a chain certctl
recorded for that issuer); otherwise the certificate is pointed at the placeholder
issuer ``unassigned``, an ``acme`` entry at a loopback address nothing answers, so the
inventory validates while no certificate is ever issued from it: the operator names a
real issuer before the renewal (the change reissues from it), or renewal fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from certctl import pki
from certctl.adopt import sources as src
from certctl.adopt.model import (
    AdoptError,
    Candidate,
    IssuerDraft,
    TargetDraft,
    check_names,
    is_ca,
    key_mapping,
    safe_name,
)
from certctl.discovery.model import Finding
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.model import SecretBytes

UNASSIGNED = IssuerDraft(
    "unassigned",
    {
        "type": "acme",
        "description": "PLACEHOLDER: adopted certificates whose issuer the inventory does not "
        "know. Point them at a real issuer before they are due for renewal.",
        "directory": "http://127.0.0.1:9/unassigned-issuer",
        "challenge": {"type": "http-01", "responder": {"listen": "127.0.0.1:9"}},
        "timeout_s": 2,
    },
    "PLACEHOLDER issuer (nothing answers at its address): set each certificate's issuer: "
    "to a real one before its renewal window; until then renewal fails and is reported",
)


#: A placement without a key file would, at the renewal, get a certificate whose new
#: key reaches no service: say so where the operator reads.
_NO_KEY_PATH = (
    "Before its renewal add key_path (where the service reads its key) to the target "
    "for {where}: without it the renewed certificate is deployed but its new key is not"
)


class FindingsAdoption:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.report = src.Report()

    def candidates(self, *, fingerprints: Sequence[str], host: str | None) -> list[Candidate]:
        store = self.engine.store()
        wanted = {f.lower().replace(":", "") for f in fingerprints}
        findings = [
            f for f in store.list_findings(host=host) if not wanted or f.fingerprint in wanted
        ]
        if not findings and not wanted:
            where = f" on host {host}" if host else ""
            self.report.notes.append(f"no findings recorded{where}: run certctl discover first")
        for fp in sorted(wanted - {f.fingerprint for f in findings}):
            self.report.refused.append(f"{fp[:16]}...: no such finding (run certctl discover)")
        managed = store.issued_fingerprints([f.fingerprint for f in findings])
        groups: dict[str, list[Finding]] = {}
        for f in findings:
            if f.fingerprint in managed:
                self.report.notes.append(f"{f.location}: already managed by certctl; skipped")
                continue
            if _is_ca_finding(f):
                self.report.notes.append(f"{f.location}: a CA certificate, not a leaf; skipped")
                continue
            groups.setdefault(f.fingerprint, []).append(f)
        cas = self._known_cas()
        try:
            inv = self.engine.inventory()
            hosts = set(inv.hosts)
        except CertctlError:
            hosts = set()
        out: list[Candidate] = []
        for group in groups.values():
            try:
                out.append(self._one(group, cas, hosts))
            except AdoptError as exc:
                self.report.refused.append(f"{group[0].location}: {exc}")
        return out

    # ------------------------------------------------------------------ issuers
    def _known_cas(self) -> list[tuple[str, x509.Certificate]]:
        """(inventory issuer, CA certificate) pairs to match leaves against."""
        out: list[tuple[str, x509.Certificate]] = []
        try:
            inv = self.engine.inventory()
        except CertctlError:
            return out
        store = self.engine.store()
        for name, issuer in sorted(inv.issuers.items()):
            if issuer.type != "local_ca":
                continue
            for label in ("intermediate", "root"):
                raw = store.get(name, f"{label}/cert.pem")
                if raw:
                    out.append((name, pki.load_cert_pem(raw)))
        for name, chain in store.issuer_chains():
            if name in inv.issuers:
                for ca in pki.parse_pem_chain(chain):
                    out.append((name, ca))
        return out

    @staticmethod
    def _issuer_for(
        leaf: x509.Certificate, cas: Sequence[tuple[str, x509.Certificate]]
    ) -> str | None:
        for name, ca in cas:
            if leaf.issuer == ca.subject and pki.signed_by(leaf, ca):
                return name
        return None

    # --------------------------------------------------------------- one finding
    def _one(
        self, group: list[Finding], cas: Sequence[tuple[str, x509.Certificate]], hosts: set[str]
    ) -> Candidate:
        first = group[0]
        certs = pki.parse_pem_chain(first.chain_pem.encode())
        if not certs:
            raise AdoptError("the finding holds no certificate")
        leaf = certs[0]
        if pki.fingerprint(leaf) != first.fingerprint:
            raise AdoptError("the finding's chain does not start with its leaf")
        check_names(leaf)
        cert_pem = pki.cert_pem(leaf)
        chain_pem = pki.chain_pem(certs[1:])
        issuer_name = self._issuer_for(leaf, cas)
        issuer = (
            IssuerDraft(issuer_name, {}, "", new=False) if issuer_name is not None else UNASSIGNED
        )
        notes: list[str] = []
        if issuer_name is None:
            notes.append(
                f"issued by {first.issuer[:80]}, which the inventory does not know: set issuer: "
                "to a real issuer before its renewal"
            )
        key_pem: SecretBytes | None = None
        targets: list[TargetDraft] = []
        endpoint: dict[str, Any] | None = None
        name = safe_name(_name_hint(leaf, first))
        for i, f in enumerate(group):
            suffix = "" if len(group) == 1 else f"-{i + 1}"
            if f.source == "network":
                if endpoint is None:
                    endpoint = {"endpoint": f.location, "certificate": name}
                    if f.sni:
                        endpoint["sni"] = f.sni
                else:
                    notes.append(f"also served at {f.location}")
                continue
            if f.format != "pem" or "#" in f.location:
                notes.append(
                    f"found in a {f.format} file {f.location}: not deployed by certctl (add a "
                    "target for it before the renewal)"
                )
                continue
            if f.host == "local":
                target, got_key, split = self._local_target(f, leaf, name + suffix, notes)
                if got_key is not None and key_pem is None:
                    key_pem = got_key
                    if split is not None:
                        cert_pem, chain_pem = split
                targets.append(target)
            elif f.host in hosts:
                targets.append(self._remote_target(f, name + suffix))
                if not {"key_path", "combined_path"} & set(targets[-1].config):
                    notes.append(_NO_KEY_PATH.format(where=f"{f.host}:{f.location}"))
            else:
                notes.append(f"found on host {f.host!r}, which the inventory does not define")
        if not targets:
            notes.append(
                "no target: certctl does not know where this certificate's files are, so "
                "the renewal would deploy it nowhere; add targets before its renewal"
            )
        remote = [t for t in targets if t.config.get("type") != "file"]
        keyless = [t for t in targets if t.config.get("type") == "file" and not t.has_key]
        if key_pem is not None and (remote or keyless or endpoint is not None):
            # One version, one key: only when every place holds the key certctl read
            # can it be recorded as deployed everywhere.
            key_pem = None
            notes.append(
                "found in places whose key certctl cannot read (another host, an endpoint, "
                "a file without its key): observe only until its renewal"
            )
            cert_pem, chain_pem = pki.cert_pem(leaf), pki.chain_pem(certs[1:])
        return Candidate(
            name=name,
            source=", ".join(f"{f.source} finding {f.host}:{f.location}" for f in group)[:300],
            leaf=leaf,
            cert_pem=cert_pem,
            chain_pem=chain_pem,
            key_pem=key_pem,
            key=key_mapping(leaf.public_key()),
            issuer=issuer,
            targets=targets,
            endpoint=endpoint,
            notes=notes,
        )

    def _local_target(
        self, f: Finding, leaf: x509.Certificate, name: str, notes: list[str]
    ) -> tuple[TargetDraft, SecretBytes | None, tuple[bytes, bytes] | None]:
        path = os.path.normpath(f.location)
        data = src.read_bounded(path, "certificate file")
        found = src.load_leaf(data, path)
        if pki.fingerprint(found) != f.fingerprint:
            raise AdoptError(f"{path} no longer holds the certificate discovery found")
        has_chain = len(src.load_chain(data, path)) > 1
        key_pem: SecretBytes | None = None
        combined = f.key_path is not None and os.path.normpath(f.key_path) == path
        if f.key_path is not None:
            try:
                raw = src.read_bounded(f.key_path, "private key")
                blocks = _key_block(raw) if combined else raw
                key_pem = src.check_key(blocks, leaf, f.key_path)
            except AdoptError as exc:
                notes.append(f"{exc}: observe only until its renewal")
        else:
            notes.append(
                f"no private key was found beside {path}: observe only until its renewal. "
                + _NO_KEY_PATH.format(where=path)
            )
        dirs = [os.path.dirname(path)]
        if f.key_path is not None and not combined:
            dirs.append(os.path.dirname(os.path.normpath(f.key_path)))
        root = os.path.commonpath(dirs)
        config: dict[str, Any] = {"type": "file", "root": root}
        role = "combined_path" if combined else "fullchain_path" if has_chain else "cert_path"
        config[role] = os.path.relpath(path, root)
        if f.key_path is not None and not combined:
            config["key_path"] = os.path.relpath(os.path.normpath(f.key_path), root)
        mode = src.mode_of(path)
        if combined and mode != 0o600:
            config["key_mode"] = f"0{mode:o}"
        elif not combined and mode != 0o644:
            config["mode"] = f"0{mode:o}"
        if "key_path" in config:
            kmode = src.mode_of(os.path.join(root, config["key_path"]))
            if kmode != 0o600:
                config["key_mode"] = f"0{kmode:o}"
        split = None
        if key_pem is not None and not combined:  # the bytes as found, for a redeploy
            split = _split_leaf(data) if has_chain else (data, b"")
        target = TargetDraft(name, config, f"where it was found: {path}")
        target.has_key = key_pem is not None
        return target, key_pem, split

    @staticmethod
    def _remote_target(f: Finding, name: str) -> TargetDraft:
        path = os.path.normpath(f.location)
        combined = f.key_path is not None and os.path.normpath(f.key_path) == path
        # the file's role as found: a renewal writes the same role back (a file that
        # held the chain keeps it; one that held the key gets the new key)
        try:
            has_chain = len(pki.parse_pem_chain(f.chain_pem.encode())) > 1
        except pki.PKIError:
            has_chain = False
        role = "combined_path" if combined else "fullchain_path" if has_chain else "cert_path"
        config: dict[str, Any] = {
            "type": "ssh",
            "hosts": [f.host],
            "root": os.path.dirname(path),
            role: os.path.basename(path),
        }
        if (
            f.key_path is not None
            and not combined
            and os.path.dirname(f.key_path) == os.path.dirname(path)
        ):
            config["key_path"] = os.path.basename(f.key_path)
        return TargetDraft(name, config, f"where it was found: {f.host}:{path}")


def _is_ca_finding(f: Finding) -> bool:
    try:
        certs = pki.parse_pem_chain(f.chain_pem.encode())
    except pki.PKIError:
        return False
    return bool(certs) and is_ca(certs[0])


def _name_hint(leaf: x509.Certificate, f: Finding) -> str:
    from certctl.adopt.model import names_of

    names = names_of(leaf)
    if names:
        return names[0].replace("*", "wildcard")
    return Path(f.location).stem or f.fingerprint[:12]


def _key_block(data: bytes) -> bytes:
    """The private key PEM block of a combined file."""
    start = data.find(b"-----BEGIN ")
    while start != -1:
        line_end = data.find(b"\n", start)
        header = data[start : line_end if line_end != -1 else len(data)]
        end_marker = header.replace(b"BEGIN", b"END", 1).strip()
        if b"PRIVATE KEY" in header:
            end = data.find(end_marker, start)
            if end == -1:
                break
            return data[start : end + len(end_marker)] + b"\n"
        start = data.find(b"-----BEGIN ", start + 1)
    raise AdoptError("no private key block in the combined file")


def _split_leaf(data: bytes) -> tuple[bytes, bytes]:
    """(leaf PEM, chain PEM) of a full-chain file as found, so that a redeploy writes
    the same bytes (``fullchain`` = cert + chain)."""
    marker = b"-----END CERTIFICATE-----"
    end = data.find(marker) + len(marker)
    if data[end : end + 1] == b"\n":
        end += 1
    return data[:end], data[end:]

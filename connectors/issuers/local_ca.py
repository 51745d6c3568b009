"""The built-in ``local_ca`` issuer: a CA that lives in certctl's own state.

Two ways to get the CA:

* **generated** (``root: {common_name, key, ttl}``): on first use the root (and the
  optional ``intermediate``) key and certificate are generated and stored through
  ``ctx.vault`` (keys with ``secret=True``, so the state store encrypts them). Later
  runs, and other processes, load them from there.
* **loaded** (``root: {cert_file, key_file}``, sub-CA mode): an existing CA from PEM
  files (relative to the inventory root). It must be a CA (BasicConstraints CA:true),
  may sign certificates (KeyUsage keyCertSign), and the key must match; otherwise a
  :class:`PermanentError` says which. ``cert_file`` may hold the CA's own chain after
  it; the chain is handed out with every leaf.

Leaves carry the certificate's names (DNS / IP / email / URI by classification),
BasicConstraints CA:false, a KeyUsage fitted to the EKUs and the key type, the
profile's EKUs, SKI/AKI and, with ``public_base_url``, a CRL distribution point
``<base>/crl/<issuer>.crl`` and an OCSP responder ``<base>/ocsp/<issuer>``.

Idempotence: :meth:`LocalCAIssuer.prepare` picks the serial and the validity start,
which the executor journals before :meth:`LocalCAIssuer.issue`. ``issue`` with the
same payload, key and request signs the same TBS certificate, and ECDSA signatures
are deterministic (RFC 6979; RSA PKCS#1 v1.5 and Ed25519 are by nature), so a
re-issue after a crash yields a byte-identical certificate: nothing is issued twice.
:meth:`LocalCAIssuer.revoke` records the revocation in the vault
(``revoked/<serial>`` and the ``revoked/index`` list) and succeeds if it already is.

CRL: :meth:`LocalCAIssuer.crl` keeps the signed CRL in the vault (monotonic number,
regenerated after a revocation or once half its validity passed). With ``crl_file``
(relative to the inventory root and confined there) the CRL is also written to that
file, atomically, by :meth:`LocalCAIssuer.after_run` once after any run that revoked
through this issuer, and by ``certctl crl NAME``.

The CA is loaded once per connector instance and cached: issuing costs one build and
one signature, with the fixed extensions prepared in advance.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from certctl import pki
from certctl.connectors import ConnectorContext, IssuedCert, Issuer, IssueRequest
from certctl.errors import CertctlError, PermanentError
from certctl.model import KeySpec, Secret, VersionRecord
from certctl.pki import crl, ocsp

#: RFC 5280 revocation reasons accepted by :meth:`LocalCAIssuer.revoke`.
REVOCATION_REASONS = tuple(crl.REASONS)
#: Validity start is set this far in the past to absorb clock skew between hosts.
BACKDATE = timedelta(minutes=1)
_DEFAULT_TTL = MappingProxyType({"root": 3650 * 86400, "intermediate": 1825 * 86400})
_DURATION_RE = re.compile(r"^(?:[0-9]+[smhdwy])+$")
_DURATION_PART = re.compile(r"([0-9]+)([smhdwy])")
_UNIT_S = MappingProxyType(
    {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
)

#: A path relative to the inventory root: not absolute, no ``~``, no ``..`` component,
#: no NUL or newline (checked again, after normalisation, by :func:`confined_path`).
_RELATIVE_PATH_RE = r"^(?![/~])(?!(?:.*/)?\.\.(?:/|$))[^\x00\r\n]+$"
_TEMP_MARK = ".certctl-"

_DURATION_SCHEMA = {
    "oneOf": [
        {"type": "integer", "minimum": 1, "description": "seconds"},
        {"type": "string", "pattern": _DURATION_RE.pattern, "description": "e.g. 3650d, 12h"},
    ]
}
_KEY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type"],
    "properties": {
        "type": {"enum": ["ecdsa", "rsa", "ed25519"]},
        "curve": {"enum": ["P-256", "P-384"]},
        "size": {"enum": [2048, 3072, 4096]},
    },
    "allOf": [
        {
            "if": {"properties": {"type": {"const": "rsa"}}},
            "then": {"not": {"required": ["curve"]}},
        },
        {
            "if": {"properties": {"type": {"const": "ecdsa"}}},
            "then": {"not": {"required": ["size"]}},
        },
        {
            "if": {"properties": {"type": {"const": "ed25519"}}},
            "then": {"allOf": [{"not": {"required": ["size"]}}, {"not": {"required": ["curve"]}}]},
        },
    ],
}
_SECRET_SCHEMA = {
    "oneOf": [
        {"type": "string"},
        {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {"env": {"type": "string"}, "file": {"type": "string"}},
        },
    ]
}
_CN_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 64}


@dataclass(frozen=True)
class _Level:
    """One CA level as configured (``root`` or ``intermediate``)."""

    label: str
    common_name: str | None
    key: KeySpec
    ttl_s: int
    cert_file: str | None = None
    key_file: str | None = None
    key_password: Secret | str | None = None

    @property
    def loaded(self) -> bool:
        return self.cert_file is not None


@dataclass
class _Signer:
    """The CA that signs leaves, with everything fixed per CA prepared once."""

    key: pki.PrivateKey
    cert: x509.Certificate
    algorithm: pki.keys.SigningHash
    deterministic: bool | None
    chain_pem: bytes
    root_pem: bytes
    not_after: datetime
    subject_attrs: list[x509.NameAttribute[str]]
    fixed: list[x509.Extension[x509.ExtensionType]]  # AKI, CRL DP, AIA
    by_profile: dict[tuple[tuple[str, ...], str], list[x509.Extension[x509.ExtensionType]]] = field(
        default_factory=dict
    )


class LocalCAIssuer(Issuer):
    """A CA kept in certctl's state (or loaded from PEM files). See the module doc."""

    type_name = "local_ca"
    config_schema: ClassVar[Mapping[str, Any]] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "local_ca issuer",
        "type": "object",
        "additionalProperties": False,
        "required": ["root"],
        "properties": {
            "type": {"const": "local_ca"},
            "description": {"type": "string"},
            "root": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "common_name": _CN_SCHEMA,
                    "key": _KEY_SCHEMA,
                    "ttl": _DURATION_SCHEMA,
                    "cert_file": {"type": "string", "minLength": 1},
                    "key_file": {"type": "string", "minLength": 1},
                    "key_password": _SECRET_SCHEMA,
                },
                "oneOf": [
                    {
                        "required": ["common_name"],
                        "not": {
                            "anyOf": [
                                {"required": ["cert_file"]},
                                {"required": ["key_file"]},
                                {"required": ["key_password"]},
                            ]
                        },
                    },
                    {
                        "required": ["cert_file", "key_file"],
                        "not": {
                            "anyOf": [
                                {"required": ["common_name"]},
                                {"required": ["key"]},
                                {"required": ["ttl"]},
                            ]
                        },
                    },
                ],
            },
            "intermediate": {
                "type": "object",
                "additionalProperties": False,
                "required": ["common_name"],
                "properties": {
                    "common_name": _CN_SCHEMA,
                    "key": _KEY_SCHEMA,
                    "ttl": _DURATION_SCHEMA,
                },
            },
            "public_base_url": {"type": "string", "pattern": "^https?://[^\\s]+$"},
            "organization": {"type": "string", "minLength": 1, "maxLength": 64},
            "organizational_unit": {"type": "string", "minLength": 1, "maxLength": 64},
            "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "crl_validity": _DURATION_SCHEMA,
            "ocsp_validity": _DURATION_SCHEMA,
            "ocsp_responder_ttl": _DURATION_SCHEMA,
            "crl_file": {
                "type": "string",
                "minLength": 1,
                "pattern": _RELATIVE_PATH_RE,
                "description": "a path relative to the inventory root, without '..'",
            },
        },
    }

    def __init__(self, name: str, config: Mapping[str, Any], ctx: ConnectorContext) -> None:
        super().__init__(name, config, ctx)
        root = config.get("root")
        if not isinstance(root, Mapping):
            raise PermanentError(f"issuer {name}: 'root' must be a mapping")
        self._root = _level("root", root, name)
        inter = config.get("intermediate")
        self._intermediate = _level("intermediate", inter, name) if inter is not None else None
        base = config.get("public_base_url")
        self._base_url = str(base).rstrip("/") if base else None
        self._subject = {
            "organization": _opt_str(config.get("organization")),
            "organizational_unit": _opt_str(config.get("organizational_unit")),
            "country": _opt_str(config.get("country")),
        }
        self._signer: _Signer | None = None
        self._crl_validity = timedelta(
            seconds=duration_s(config.get("crl_validity", "7d"), f"issuer {name}: crl_validity")
        )
        self.ocsp_validity = timedelta(
            seconds=duration_s(config.get("ocsp_validity", "1h"), f"issuer {name}: ocsp_validity")
        )
        self._responder_ttl = timedelta(
            seconds=duration_s(
                config.get("ocsp_responder_ttl", "30d"), f"issuer {name}: ocsp_responder_ttl"
            )
        )
        self._ocsp_signer: ocsp.Signer | None = None
        crl_file = config.get("crl_file")
        self.crl_path = (
            confined_path(ctx.inventory_root, str(crl_file), f"issuer {name}: crl_file")
            if crl_file
            else None
        )
        self._crl_file_stale = False

    # ------------------------------------------------------------- Issuer API
    async def prepare(self, req: IssueRequest) -> dict[str, Any]:
        """Pick the serial and validity start; the executor journals them first."""
        return self._new_payload()

    def _new_payload(self) -> dict[str, Any]:
        nb = (self.ctx.clock() - BACKDATE).astimezone(UTC).replace(microsecond=0)
        return {"serial": pki.random_serial_hex(), "not_before": nb.isoformat()}

    async def issue(self, req: IssueRequest, payload: Mapping[str, Any]) -> IssuedCert:
        """Sign the leaf for ``req`` with the serial/validity of ``payload``.

        Idempotent: the same payload, key and request give the same certificate bytes.
        A payload without a serial (journaled by another issuer type) gets a fresh one.
        """
        signer = self._signer if self._signer is not None else self.load()
        if "serial" not in payload:
            payload = self._new_payload()
        serial = pki.parse_serial(payload["serial"])
        not_before = _parse_time(payload.get("not_before"), self.name)
        cert = req.cert
        ttl = cert.ttl_s
        max_ttl = req.profile.max_ttl_s
        if max_ttl is not None and max_ttl < ttl:
            ttl = max_ttl
        not_after = min(not_before + timedelta(seconds=ttl), signer.not_after)
        if not_after <= not_before:
            raise PermanentError(
                f"issuer {self.name}: the CA expires at {signer.not_after.isoformat()}, "
                "before the certificate could start"
            )
        pub = req.public_key
        # key custody target: issue for the CSR's key only
        if req.csr_pem is not None and not pki.same_public_key(
            pki.csr_public_key(req.csr_pem, cert.names), pub
        ):
            raise PermanentError(f"issuer {self.name}: the CSR is for another key")
        kind = _key_kind(pub)
        ekus = tuple(req.profile.ekus)
        exts = signer.by_profile.get((ekus, kind))
        if exts is None:
            exts = signer.by_profile[(ekus, kind)] = _profile_extensions(ekus, kind)
        cn = cert.common_name
        attrs = signer.subject_attrs
        if cn and len(cn) <= pki.certs.MAX_CN:
            attrs = [*attrs, x509.NameAttribute(x509.NameOID.COMMON_NAME, cn)]
        try:
            san = x509.Extension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                not attrs,
                x509.SubjectAlternativeName(pki.general_names(cert.names)),
            )
            ski = x509.Extension(
                ExtensionOID.SUBJECT_KEY_IDENTIFIER,
                False,
                x509.SubjectKeyIdentifier.from_public_key(pub),
            )
            builder = x509.CertificateBuilder(
                issuer_name=signer.cert.subject,
                subject_name=x509.Name(attrs),
                public_key=pub,
                serial_number=serial,
                not_valid_before=not_before,
                not_valid_after=not_after,
                extensions=[*exts, san, ski, *signer.fixed],
            )
            leaf = builder.sign(
                signer.key, signer.algorithm, ecdsa_deterministic=signer.deterministic
            )
        except CertctlError:
            raise
        except (ValueError, TypeError) as exc:
            raise PermanentError(f"issuer {self.name}: cannot sign {cert.name}: {exc}") from exc
        return IssuedCert(
            cert_pem=pki.cert_pem(leaf),
            chain_pem=signer.chain_pem,
            serial=pki.serial_hex(serial),
            not_before=leaf.not_valid_before_utc,
            not_after=leaf.not_valid_after_utc,
            fingerprint=pki.fingerprint(leaf),
            root_pem=signer.root_pem,
        )

    async def revoke(self, version: VersionRecord, reason: str) -> None:
        """Record the revocation (``revoked/<serial>`` + ``revoked/index``); idempotent.

        A crash between the two writes is finished by the next call.
        """
        if reason not in REVOCATION_REASONS:
            raise PermanentError(
                f"issuer {self.name}: unknown revocation reason {reason!r} "
                f"(use one of {', '.join(REVOCATION_REASONS)})"
            )
        serial = pki.serial_hex(pki.parse_serial(version.serial))
        # Even when already revoked: a killed run may not have rewritten the file.
        self._crl_file_stale = self.crl_path is not None
        index = self.revoked_serials()
        if serial in index:
            return
        vault = self.ctx.vault
        key = f"revoked/{serial}"
        if vault.get(self.name, key) is None:
            record = {
                "serial": serial,
                "reason": reason,
                "revoked_at": self.ctx.clock().astimezone(UTC).isoformat(),
                "cert": version.cert,
                "version": version.version,
                "not_after": version.not_after.isoformat(),
            }
            vault.put(self.name, key, json.dumps(record, sort_keys=True).encode(), secret=False)
        vault.put(self.name, "revoked/index", json.dumps([*index, serial]).encode(), secret=False)

    # -------------------------------------------------------- for CRL / OCSP
    def revoked_serials(self) -> list[str]:
        """Serials revoked so far (hex), in revocation order."""
        raw = self.ctx.vault.get(self.name, "revoked/index")
        if not raw:
            return []
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise PermanentError(f"issuer {self.name}: revoked/index is corrupt") from exc
        return [str(s) for s in data]

    def revocation(self, serial: str) -> dict[str, Any] | None:
        """The recorded revocation of ``serial`` (reason, time...), or None."""
        raw = self.ctx.vault.get(self.name, f"revoked/{pki.serial_hex(pki.parse_serial(serial))}")
        return json.loads(raw) if raw else None

    def ca_certificate(self) -> x509.Certificate:
        """The certificate that signs leaves (the intermediate when there is one)."""
        return self.load().cert

    def revocation_entries(self) -> list[crl.RevokedEntry]:
        """Every revocation (serial, time, reason), in revocation order.

        Kept incrementally in the vault (``crl/entries``): only serials revoked since
        the last call are read one by one, so a CRL of 100,000 entries does not cost
        100,000 reads each time.
        """
        vault = self.ctx.vault
        index = self.revoked_serials()
        raw = vault.get(self.name, "crl/entries")
        rows: list[list[str]] = json.loads(raw) if raw else []
        if len(rows) > len(index) or (rows and rows[-1][0] != index[len(rows) - 1]):
            rows = []  # the index was rewritten: rebuild from the records
        if len(rows) < len(index):
            for serial in index[len(rows) :]:
                rec = self.revocation(serial) or {}
                at = rec.get("revoked_at") or self.ctx.clock().astimezone(UTC).isoformat()
                rows.append([serial, str(at), str(rec.get("reason", "unspecified"))])
            vault.put(self.name, "crl/entries", json.dumps(rows).encode(), secret=False)
        return [
            crl.RevokedEntry(pki.parse_serial(s), _parse_time(at, self.name), reason)
            for s, at, reason in rows
        ]

    def crl(self, *, force: bool = False) -> bytes:
        """The current DER CRL, regenerated when a revocation happened since the stored
        one, when half of its validity has passed, or when the CA changed.

        The CRL number is persisted before the CRL is signed, so it never repeats.
        """
        vault = self.ctx.vault
        signer = self.load()
        now = self.ctx.clock().astimezone(UTC)
        entries = self.revocation_entries()
        ca_fp = pki.fingerprint(signer.cert)
        meta_raw, der = vault.get(self.name, "crl/meta"), vault.get(self.name, "crl/der")
        if not force and meta_raw and der:
            meta = json.loads(meta_raw)
            this = datetime.fromisoformat(meta["this_update"])
            nxt = datetime.fromisoformat(meta["next_update"])
            fresh = this - BACKDATE <= now < this + (nxt - this) / 2
            if fresh and meta.get("revoked") == len(entries) and meta.get("ca") == ca_fp:
                return der
        number = int(vault.get(self.name, "crl/number") or b"0") + 1
        vault.put(self.name, "crl/number", str(number).encode(), secret=False)
        this_update = (now - BACKDATE).replace(microsecond=0)
        next_update = this_update + self._crl_validity
        der = crl.build_crl(
            signer.cert,
            signer.key,
            entries,
            number=number,
            this_update=this_update,
            next_update=next_update,
        )
        vault.put(self.name, "crl/der", der, secret=False)
        meta = {
            "number": number,
            "this_update": this_update.isoformat(),
            "next_update": next_update.isoformat(),
            "revoked": len(entries),
            "ca": ca_fp,
        }
        vault.put(self.name, "crl/meta", json.dumps(meta).encode(), secret=False)
        return der

    def after_run(self) -> None:
        """Rewrite ``crl_file`` once after a run that revoked through this issuer."""
        if self._crl_file_stale:
            self.publish_crl()
            self._crl_file_stale = False

    def publish_crl(self) -> bytes:
        """The current CRL (see :meth:`crl`), also written to ``crl_file`` when one is
        configured and its content differs: a temp file in the same directory, fsync,
        rename over the old one, fsync of the directory."""
        der = self.crl()
        if self.crl_path is not None:
            write_confined(self.ctx.inventory_root, self.crl_path, der, f"issuer {self.name}")
        return der

    def ocsp_signer(self) -> ocsp.Signer:
        """The OCSP responder certificate and key (``ocsp/cert.pem``, ``ocsp/key.pem``,
        the key encrypted), issued by this CA with id-pkix-ocsp-nocheck, and replaced
        once two thirds of its lifetime have passed or when the CA changed."""
        now = self.ctx.clock().astimezone(UTC)
        cached = self._ocsp_signer
        if cached is not None and not _due(cached.cert, now):
            return cached
        signer = self.load()
        vault = self.ctx.vault
        cert_pem = vault.get(self.name, "ocsp/cert.pem")
        key_pem = vault.get(self.name, "ocsp/key.pem")
        if cert_pem and key_pem:
            try:
                cert = pki.load_cert_pem(cert_pem)
                key = pki.load_key_pem(key_pem)
            except pki.PKIError as exc:
                raise PermanentError(
                    f"issuer {self.name}: stored OCSP responder is unreadable: {exc}"
                ) from exc
            if not _due(cert, now) and pki.signed_by(cert, signer.cert):
                self._ocsp_signer = ocsp.Signer(cert, key)
                return self._ocsp_signer
        key = pki.generate_key(KeySpec("ecdsa", 256))
        cert = ocsp.build_responder_cert(
            signer.cert,
            signer.key,
            key,
            issuer_label=_cn_of(signer.cert) or self.name,
            not_before=now - BACKDATE,
            lifetime=self._responder_ttl,
        )
        vault.put(self.name, "ocsp/key.pem", pki.key_to_pem(key).reveal(), secret=True)
        vault.put(self.name, "ocsp/cert.pem", pki.cert_pem(cert), secret=False)
        self._ocsp_signer = ocsp.Signer(cert, key)
        return self._ocsp_signer

    # ---------------------------------------------------------------- loading
    def load(self) -> _Signer:
        """Load (or generate and persist) the CA once; cached on the instance.

        Generation writes the key before the certificate: a crash in between leaves a
        key without a certificate, which the next load simply replaces (nothing was
        signed with it yet).
        """
        if self._signer is None:
            self._signer = self._build_signer()
        return self._signer

    def _build_signer(self) -> _Signer:
        now = self.ctx.clock().astimezone(UTC)
        upper: list[x509.Certificate] = []  # certificates above the signer, not the root
        root_cert: x509.Certificate | None
        if self._root.loaded:
            key, cert, upper, root_cert = self._load_files(now)
        else:
            key, cert = self._generated(self._root, None, now)
            root_cert = cert
        if self._intermediate is not None:
            key, cert = self._generated(self._intermediate, (key, cert), now)
            upper = [cert, *upper]
        algorithm = pki.signing_hash(key)
        aki = _aki_for(cert)
        fixed: list[x509.Extension[x509.ExtensionType]] = [
            x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki)
        ]
        if self._base_url is not None:
            crl = f"{self._base_url}/crl/{self.name}.crl"
            ocsp = f"{self._base_url}/ocsp/{self.name}"
            fixed.append(
                x509.Extension(
                    ExtensionOID.CRL_DISTRIBUTION_POINTS,
                    False,
                    x509.CRLDistributionPoints(
                        [
                            x509.DistributionPoint(
                                [x509.UniformResourceIdentifier(crl)], None, None, None
                            )
                        ]
                    ),
                )
            )
            fixed.append(
                x509.Extension(
                    ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
                    False,
                    x509.AuthorityInformationAccess(
                        [
                            x509.AccessDescription(
                                AuthorityInformationAccessOID.OCSP,
                                x509.UniformResourceIdentifier(ocsp),
                            )
                        ]
                    ),
                )
            )
        return _Signer(
            key=key,
            cert=cert,
            algorithm=algorithm,
            deterministic=True if isinstance(key, ec.EllipticCurvePrivateKey) else None,
            chain_pem=pki.chain_pem(upper),
            root_pem=pki.cert_pem(root_cert) if root_cert is not None else b"",
            not_after=cert.not_valid_after_utc,
            subject_attrs=pki.subject_attributes(None, **self._subject),
            fixed=fixed,
        )

    def _load_files(
        self, now: datetime
    ) -> tuple[pki.PrivateKey, x509.Certificate, list[x509.Certificate], x509.Certificate | None]:
        lvl = self._root
        assert lvl.cert_file is not None and lvl.key_file is not None
        cert_path = self._path(lvl.cert_file)
        key_path = self._path(lvl.key_file)
        where = f"issuer {self.name}: root cert_file {lvl.cert_file}"
        try:
            cert_bytes = cert_path.read_bytes()
            key_bytes = key_path.read_bytes()
        except OSError as exc:
            raise PermanentError(
                f"issuer {self.name}: cannot read {exc.filename}: {exc.strerror}"
            ) from exc
        try:
            certs = pki.parse_pem_chain(cert_bytes)
        except pki.PKIError as exc:
            raise PermanentError(f"{where}: {exc}") from exc
        if not certs:
            raise PermanentError(f"{where}: holds no certificate")
        password = lvl.key_password
        pw = password.reveal() if isinstance(password, Secret) else password
        try:
            key = pki.load_key_pem(key_bytes, pw.encode() if pw is not None else None)
        except pki.PKIError as exc:
            raise PermanentError(
                f"issuer {self.name}: root key_file {lvl.key_file}: {exc}"
            ) from exc
        ca = certs[0]
        self._check_ca(ca, key, where, now, signs_intermediate=self._intermediate is not None)
        chain = [c for c in certs if not pki.is_self_signed(c)]
        roots = [c for c in certs if pki.is_self_signed(c)]
        return key, ca, chain, roots[0] if roots else None

    def _check_ca(
        self,
        cert: x509.Certificate,
        key: pki.PrivateKey,
        where: str,
        now: datetime,
        *,
        signs_intermediate: bool,
    ) -> None:
        """Refuse a certificate that cannot act as this CA, saying why."""
        bc = pki.basic_constraints(cert)
        if bc is None or not bc.ca:
            raise PermanentError(
                f"{where} is not a CA certificate (it lacks BasicConstraints CA:true)"
            )
        ku = pki.key_usage(cert)
        if ku is None or not ku.key_cert_sign:
            raise PermanentError(
                f"{where} may not sign certificates (its KeyUsage lacks keyCertSign)"
            )
        if not pki.keys_match(key, cert.public_key()):
            raise PermanentError(f"{where}: the private key does not match the certificate")
        if cert.not_valid_after_utc <= now:
            raise PermanentError(f"{where} expired on {cert.not_valid_after_utc.isoformat()}")
        if cert.not_valid_before_utc > now + BACKDATE:
            raise PermanentError(
                f"{where} is not valid before {cert.not_valid_before_utc.isoformat()}"
            )
        if signs_intermediate and bc.path_length == 0:
            raise PermanentError(
                f"{where} has pathLenConstraint 0 and cannot sign the configured intermediate"
            )

    def _generated(
        self,
        lvl: _Level,
        parent: tuple[pki.PrivateKey, x509.Certificate] | None,
        now: datetime,
    ) -> tuple[pki.PrivateKey, x509.Certificate]:
        """The CA level from the vault, or generated and stored there on first use."""
        vault = self.ctx.vault
        cert_key, key_key = f"{lvl.label}/cert.pem", f"{lvl.label}/key.pem"
        stored_cert = vault.get(self.name, cert_key)
        stored_key = vault.get(self.name, key_key)
        where = f"issuer {self.name}: stored {lvl.label} CA"
        if stored_cert and stored_key:
            try:
                cert = pki.load_cert_pem(stored_cert)
                key = pki.load_key_pem(stored_key)
            except pki.PKIError as exc:
                raise PermanentError(f"{where} is unreadable: {exc}") from exc
            self._check_ca(
                cert,
                key,
                where,
                now,
                signs_intermediate=lvl.label == "root" and self._intermediate is not None,
            )
            want = (lvl.common_name, lvl.key.id)
            have = (_cn_of(cert), pki.key_spec_id(key))
            if want != have:
                raise PermanentError(
                    f"{where} (CN={have[0]}, {have[1]}) does not match the configuration "
                    f"(CN={want[0]}, {want[1]}); certctl does not rotate a CA on its own: "
                    "restore the configuration, or configure a new issuer"
                )
            if parent is not None and not pki.signed_by(cert, parent[1]):
                raise PermanentError(f"{where} was not signed by the current root CA")
            return key, cert
        key = pki.generate_key(lvl.key)
        cert = self._ca_cert(lvl, key, parent, now)
        vault.put(self.name, key_key, pki.key_to_pem(key).reveal(), secret=True)
        vault.put(self.name, cert_key, pki.cert_pem(cert), secret=False)
        return key, cert

    def _ca_cert(
        self,
        lvl: _Level,
        key: pki.PrivateKey,
        parent: tuple[pki.PrivateKey, x509.Certificate] | None,
        now: datetime,
    ) -> x509.Certificate:
        subject = pki.subject_name(lvl.common_name, **self._subject)
        not_before = (now - BACKDATE).replace(microsecond=0)
        not_after = not_before + timedelta(seconds=lvl.ttl_s)
        pub = key.public_key()
        if parent is None:
            signing_key, issuer_name, aki = key, subject, _aki_from_key(pub)
            path_length = None
        else:
            signing_key, issuer_name, aki = parent[0], parent[1].subject, _aki_for(parent[1])
            not_after = min(not_after, parent[1].not_valid_after_utc)
            path_length = 0
        builder = x509.CertificateBuilder(
            issuer_name=issuer_name,
            subject_name=subject,
            public_key=pub,
            serial_number=pki.random_serial(),
            not_valid_before=not_before,
            not_valid_after=not_after,
        )
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), False)
            .add_extension(aki, False)
        )
        try:
            return builder.sign(signing_key, pki.signing_hash(signing_key))
        except (ValueError, TypeError) as exc:
            raise PermanentError(
                f"issuer {self.name}: cannot create the {lvl.label} CA: {exc}"
            ) from exc

    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.ctx.inventory_root / p


CONNECTORS = [LocalCAIssuer]


# ---------------------------------------------------------------- helpers


def _level(label: str, raw: Any, issuer: str) -> _Level:
    if not isinstance(raw, Mapping):
        raise PermanentError(f"issuer {issuer}: {label!r} must be a mapping")
    cert_file = raw.get("cert_file")
    if cert_file is not None:
        if label != "root" or raw.get("key_file") is None:
            raise PermanentError(
                f"issuer {issuer}: cert_file and key_file go together, under root only"
            )
        password = raw.get("key_password")
        if password is not None and not isinstance(password, Secret | str):
            raise PermanentError(f"issuer {issuer}: root key_password must be a secret")
        return _Level(
            label,
            None,
            KeySpec(),
            0,
            cert_file=str(cert_file),
            key_file=str(raw["key_file"]),
            key_password=password,
        )
    cn = raw.get("common_name")
    if not isinstance(cn, str) or not cn:
        raise PermanentError(f"issuer {issuer}: {label} needs a common_name (or cert_file)")
    return _Level(
        label,
        cn,
        _key_spec(raw.get("key"), issuer, label),
        duration_s(raw.get("ttl", _DEFAULT_TTL[label]), f"issuer {issuer}: {label} ttl"),
    )


def _key_spec(raw: Any, issuer: str, label: str) -> KeySpec:
    if raw is None:
        return KeySpec("ecdsa", 256)
    if not isinstance(raw, Mapping):
        raise PermanentError(f"issuer {issuer}: {label} key must be a mapping")
    kind = raw.get("type", "ecdsa")
    if kind == "ecdsa":
        curve = str(raw.get("curve", "P-256")).upper()
        sizes = {"P-256": 256, "P-384": 384}
        if curve not in sizes:
            raise PermanentError(f"issuer {issuer}: {label} key curve {curve!r} not supported")
        return KeySpec("ecdsa", sizes[curve])
    if kind == "rsa":
        size = raw.get("size", 3072)
        if size not in pki.keys.RSA_SIZES:
            raise PermanentError(f"issuer {issuer}: {label} RSA key size {size!r} not supported")
        return KeySpec("rsa", int(size))
    if kind == "ed25519":
        return KeySpec("ed25519", 256)
    raise PermanentError(f"issuer {issuer}: {label} key type {kind!r} not supported")


def duration_s(value: Any, what: str) -> int:
    """Seconds from an int or a duration string such as ``3650d``, ``12h``, ``1d12h``."""
    if isinstance(value, bool):
        raise PermanentError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise PermanentError(f"{what}: must be positive")
        return value
    if isinstance(value, str) and _DURATION_RE.match(value.strip()):
        return sum(int(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(value))
    raise PermanentError(f"{what}: {value!r} is not a duration (e.g. 90d, 12h, 3600)")


def confined_path(root: Path, value: str, what: str) -> Path:
    """``value`` resolved under ``root``; refused when it would leave it."""
    if "\x00" in value or "\n" in value or "\r" in value:
        raise PermanentError(f"{what}: {value!r} contains a NUL or newline character")
    norm = os.path.normpath(value)
    if (
        os.path.isabs(value)
        or value.startswith("~")
        or norm in (".", "..")
        or norm.startswith("../")
    ):
        raise PermanentError(f"{what}: {value!r} escapes the inventory root")
    if _TEMP_MARK in os.path.basename(norm) and norm.endswith(".tmp"):
        raise PermanentError(f"{what}: {value!r} looks like a certctl temp file")
    return Path(os.path.normpath(os.path.join(root, norm)))


def write_confined(root: Path, path: Path, data: bytes, what: str) -> bool:
    """Atomically replace ``path`` (below ``root``) with ``data``; False when it already
    holds exactly that. Directories below ``root`` are created (0755); no component
    below ``root`` may be a symlink, and the file must be a regular file if it exists.
    """
    rel = path.relative_to(root).parts
    current = str(root)
    for i, part in enumerate(rel):
        current = os.path.join(current, part)
        last = i == len(rel) - 1
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            if last:
                break
            try:
                os.mkdir(current, 0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                raise PermanentError(f"{what}: cannot create {current}: {exc.strerror}") from exc
            st = os.lstat(current)
        except OSError as exc:
            raise PermanentError(f"{what}: cannot check {current}: {exc.strerror}") from exc
        if stat.S_ISLNK(st.st_mode):
            raise PermanentError(f"{what}: {path} passes through a symlink at {current}")
        if not last and not stat.S_ISDIR(st.st_mode):
            raise PermanentError(f"{what}: {current} is not a directory")
        if last:
            if not stat.S_ISREG(st.st_mode):
                raise PermanentError(f"{what}: {current} exists and is not a regular file")
            try:
                same = st.st_size == len(data) and _read_nofollow(current) == data
            except OSError as exc:
                raise PermanentError(f"{what}: cannot read {current}: {exc.strerror}") from exc
            if same:
                return False
    directory, name = os.path.split(str(path))
    tmp = os.path.join(directory, f".{name}{_TEMP_MARK}{secrets.token_hex(6)}.tmp")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o644)
        try:
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise PermanentError(f"{what}: cannot write {path}: {exc.strerror or exc}") from exc
    return True


def _read_nofollow(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _due(cert: x509.Certificate, now: datetime) -> bool:
    """A responder certificate is due for rotation after 2/3 of its lifetime."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) / 3


def _opt_str(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _parse_time(value: Any, issuer: str) -> datetime:
    if not isinstance(value, str):
        raise PermanentError(f"issuer {issuer}: payload lacks not_before")
    try:
        t = datetime.fromisoformat(value)
    except ValueError as exc:
        raise PermanentError(f"issuer {issuer}: bad not_before {value!r}") from exc
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _key_kind(pub: Any) -> str:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ecdsa"
    if isinstance(pub, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519"
    raise PermanentError(f"unsupported public key type {type(pub).__name__}")


def leaf_key_usage(ekus: Sequence[str], kind: str) -> x509.KeyUsage:
    """KeyUsage fitted to the EKUs and key type.

    digitalSignature always; keyEncipherment for RSA keys used for TLS (RSA key
    exchange) or S/MIME; keyAgreement for ECDSA S/MIME keys (ECDH);
    contentCommitment (non-repudiation) for S/MIME and time stamping.
    """
    enc = agree = commit = False
    for e in ekus:
        if e in ("serverAuth", "clientAuth"):
            enc = enc or kind == "rsa"
        elif e == "emailProtection":
            commit = True
            enc = enc or kind == "rsa"
            agree = agree or kind == "ecdsa"
        elif e == "timeStamping":
            commit = True
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=commit,
        key_encipherment=enc,
        data_encipherment=False,
        key_agreement=agree,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _profile_extensions(
    ekus: tuple[str, ...], kind: str
) -> list[x509.Extension[x509.ExtensionType]]:
    out: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(
            ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(ca=False, path_length=None)
        ),
        x509.Extension(ExtensionOID.KEY_USAGE, True, leaf_key_usage(ekus, kind)),
    ]
    if ekus:
        oids = list(dict.fromkeys(pki.eku_oid(e) for e in ekus))
        # RFC 3161: a time-stamping certificate's EKU is critical.
        out.append(
            x509.Extension(
                ExtensionOID.EXTENDED_KEY_USAGE,
                "timeStamping" in ekus,
                x509.ExtendedKeyUsage(oids),
            )
        )
    return out


def _aki_from_key(pub: Any) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(pub)


def _aki_for(ca: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return _aki_from_key(ca.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _cn_of(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None

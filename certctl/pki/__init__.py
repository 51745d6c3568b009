"""Key, CSR, certificate and chain helpers over :mod:`cryptography`.

The module-level API (re-exported here, implemented in :mod:`certctl.pki.keys`,
:mod:`certctl.pki.certs` and :mod:`certctl.pki.names`) is pure: no I/O, no clock, no
module-level state. Every library exception is translated into
:class:`certctl.pki.errors.PKIError` (a :class:`certctl.errors.PermanentError`).
Private keys only leave as :class:`certctl.model.SecretBytes`.
"""

from __future__ import annotations

from certctl.pki.certs import (
    EKU_OIDS,
    basic_constraints,
    build_csr,
    cert_pem,
    chain_pem,
    csr_pem,
    csr_public_key,
    describe,
    eku_name,
    eku_oid,
    fingerprint,
    is_self_signed,
    key_usage,
    load_cert_pem,
    parse_pem_chain,
    parse_serial,
    random_serial,
    random_serial_hex,
    same_public_key,
    sans,
    serial_hex,
    signed_by,
    subject_attributes,
    subject_name,
)
from certctl.pki.errors import PKIError
from certctl.pki.keys import (
    PrivateKey,
    PublicKey,
    generate_key,
    key_spec,
    key_spec_id,
    key_to_pem,
    keys_match,
    load_key_pem,
    signing_hash,
)
from certctl.pki.names import classify_name, general_name, general_names

__all__ = [
    "EKU_OIDS",
    "PKIError",
    "PrivateKey",
    "PublicKey",
    "basic_constraints",
    "build_csr",
    "cert_pem",
    "chain_pem",
    "classify_name",
    "csr_pem",
    "csr_public_key",
    "describe",
    "eku_name",
    "eku_oid",
    "fingerprint",
    "general_name",
    "general_names",
    "generate_key",
    "is_self_signed",
    "key_spec",
    "key_spec_id",
    "key_to_pem",
    "key_usage",
    "keys_match",
    "load_cert_pem",
    "load_key_pem",
    "parse_pem_chain",
    "parse_serial",
    "random_serial",
    "random_serial_hex",
    "same_public_key",
    "sans",
    "serial_hex",
    "signed_by",
    "signing_hash",
    "subject_attributes",
    "subject_name",
]

"""The local CA's CRL and OCSP responder material, with a clock the test moves.

Stand-in: the CA's durable storage is :class:`tests.conformance.StandInVault` (a dict);
the state store's vault is exercised by tests/integration/test_server.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from certctl.model import VersionRecord
from certctl.pki import crl as crl_pki
from certctl_connectors.issuers.local_ca import LocalCAIssuer
from tests.conformance import FixedClock, StandInVault
from tests.integration.test_local_ca import ROOT_ONLY, ctx, issue, request


def _version(ca: LocalCAIssuer, n: int) -> VersionRecord:
    req = request((f"h{n}.test",))
    issued = issue(ca, req)
    return VersionRecord(
        req.cert.name, 1, issued.serial, issued.not_before, issued.not_after,
        issued.fingerprint, "ca", "ecdsa-p256", req.cert.names, "",
    )  # fmt: skip


def test_crl_number_is_monotonic_and_regenerated_on_revocation_and_schedule(
    tmp_path: Path,
) -> None:
    clock = FixedClock()
    vault = StandInVault()
    config = {**ROOT_ONLY, "crl_validity": "4d"}
    ca = LocalCAIssuer("ca", config, ctx(tmp_path, vault, clock))
    first = ca.crl()
    assert ca.crl() == first  # cached in the vault: same bytes, same number
    assert crl_pki.crl_number(first) == 1
    v = _version(ca, 1)
    asyncio.run(ca.revoke(v, "keyCompromise"))
    second = ca.crl()
    assert crl_pki.crl_number(second) == 2
    parsed = x509.load_der_x509_crl(second)
    assert parsed.is_signature_valid(ca.ca_certificate().public_key())  # type: ignore[arg-type]
    entry = parsed.get_revoked_certificate_by_serial_number(int(v.serial, 16))
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    clock.advance(days=1)
    assert ca.crl() == second  # a quarter of the validity: still fresh
    clock.advance(days=1, seconds=120)
    third = ca.crl()  # past half of the validity: regenerated
    assert crl_pki.crl_number(third) == 3
    assert x509.load_der_x509_crl(third).last_update_utc == clock.now - timedelta(minutes=1)
    # another process (fresh instance) continues the numbering
    other = LocalCAIssuer("ca", config, ctx(tmp_path, vault, clock))
    assert crl_pki.crl_number(other.crl(force=True)) == 4
    # unspecified revocations carry no reason code (RFC 5280 5.3.1)
    v2 = _version(ca, 2)
    asyncio.run(ca.revoke(v2, "unspecified"))
    crl = x509.load_der_x509_crl(ca.crl())
    e2 = crl.get_revoked_certificate_by_serial_number(int(v2.serial, 16))
    assert e2 is not None and len(e2.extensions) == 0
    assert len(list(crl)) == 2


def test_ocsp_responder_is_rotated_before_it_expires(tmp_path: Path) -> None:
    clock = FixedClock()
    vault = StandInVault()
    ca = LocalCAIssuer(
        "ca", {**ROOT_ONLY, "ocsp_responder_ttl": "30d"}, ctx(tmp_path, vault, clock)
    )
    first = ca.ocsp_signer()
    assert "PRIVATE" not in repr(first)
    assert vault.secret[("ca", "ocsp/key.pem")] is True  # stored as a secret
    again = LocalCAIssuer("ca", {**ROOT_ONLY}, ctx(tmp_path, vault, clock)).ocsp_signer()
    assert again.cert == first.cert  # loaded, not re-issued
    clock.advance(days=19)
    assert ca.ocsp_signer().cert == first.cert
    clock.advance(days=2)  # past two thirds of 30 days
    rotated = ca.ocsp_signer()
    assert rotated.cert != first.cert
    assert rotated.cert.not_valid_after_utc > first.cert.not_valid_after_utc
    assert rotated.cert.not_valid_before_utc <= clock.now

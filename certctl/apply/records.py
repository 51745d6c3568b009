"""The state rows a new certificate version writes, built one way for every path that
stores one: the executor's issuance, an agent's CSR answered by the server, adoption."""

from __future__ import annotations

from certctl.connectors import IssuedCert
from certctl.model import Certificate, Profile, VersionRecord
from certctl.plan.planner import profile_digest, spec_digest
from certctl.state.base import CertUpdate


def new_version(
    cert: Certificate,
    profile: Profile,
    number: int,
    issued: IssuedCert,
    *,
    key_custody: str | None = None,
) -> VersionRecord:
    """Version ``number`` of ``cert``, as ``issued``, under the inventory's spec now
    (``key_custody`` defaults to the certificate's)."""
    return VersionRecord(
        cert=cert.name,
        version=number,
        serial=issued.serial,
        not_before=issued.not_before,
        not_after=issued.not_after,
        fingerprint=issued.fingerprint,
        issuer=cert.issuer,
        key_spec=cert.key.id,
        names=cert.names,
        profile_digest=profile_digest(cert, profile),
        key_custody=cert.key.custody if key_custody is None else key_custody,
    )


def settled(cert: Certificate, profile: Profile) -> CertUpdate:
    """The certificate's row once a new version is stored: failures and backoff
    cleared, no forced renewal, the spec it was made under, not retired."""
    return CertUpdate(
        cert.name,
        failures=0,
        clear_next_attempt=True,
        force_renew=False,
        spec_digest=spec_digest(cert, profile),
        retired=False,
    )

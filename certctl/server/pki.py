"""CRL and OCSP answers for the issuers that publish revocation (the local CA).

Which serials are revoked comes from the issuer (it recorded the revocation when it
confirmed it); whether a serial is known at all comes from the state store (the
versions that issuer signed). Caches:

* Signed OCSP responses for requests without a nonce, per (issuer, serial, hash),
  reused until shortly before their nextUpdate.
* The CRL per issuer (the issuer keeps the signed CRL in its vault and regenerates it
  when a revocation happened or half its validity has passed).

Both are dropped as soon as a revocation shows up: every answer first reads the
store's generation counter (one tiny query); when it moved, the revocation lists are
re-read (incrementally) and the caches of an issuer whose list changed are emptied.
Cached ``unknown`` answers are dropped on any change (the serial may be issued now).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol, runtime_checkable

from cryptography import x509

from certctl.errors import CertctlError
from certctl.pki import ocsp as ocspx
from certctl.pki.certs import serial_hex
from certctl.pki.crl import RevokedEntry
from certctl.state.base import StateStore

#: How long the server keeps a CRL in memory before asking the issuer again.
CRL_MEMO = timedelta(seconds=60)


@runtime_checkable
class RevocationAuthority(Protocol):
    """What an issuer offers to publish revocation (see the local CA)."""

    name: str
    ocsp_validity: timedelta

    def crl(self, *, force: bool = False) -> bytes: ...

    def ocsp_signer(self) -> ocspx.Signer: ...

    def ca_certificate(self) -> x509.Certificate: ...

    def revocation_entries(self) -> list[RevokedEntry]: ...


@dataclass
class _Cached:
    der: bytes
    until: datetime
    status: str


class PKIService:
    def __init__(
        self,
        store: StateStore,
        authorities: Mapping[str, RevocationAuthority],
        clock: Callable[[], datetime],
    ) -> None:
        self._store = store
        self._auth = dict(authorities)
        self._clock = clock
        self._lock = threading.RLock()
        self._generation = -1
        self._revoked: dict[str, dict[int, RevokedEntry]] = {n: {} for n in self._auth}
        self._responses: dict[tuple[str, int, str], _Cached] = {}
        self._crls: dict[str, tuple[bytes, datetime]] = {}
        self._hashes: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        self._known: set[tuple[str, int]] = set()

    @property
    def issuers(self) -> list[str]:
        return sorted(self._auth)

    def has(self, issuer: str) -> bool:
        return issuer in self._auth

    def warm(self) -> None:
        """Load every CA, responder and CRL now, so problems show at start-up."""
        for name in self.issuers:
            self._auth[name].ocsp_signer()
            self.crl(name)

    # ------------------------------------------------------------------ refresh
    def _refresh(self) -> None:
        gen = self._store.generation()
        if gen == self._generation:
            return
        with self._lock:
            if gen == self._generation:
                return
            for name, auth in self._auth.items():
                entries = auth.revocation_entries()
                if len(entries) != len(self._revoked[name]):
                    self._revoked[name] = {e.serial: e for e in entries}
                    self._crls.pop(name, None)
                    for key in [k for k in self._responses if k[0] == name]:
                        del self._responses[key]
            for key in [k for k, v in self._responses.items() if v.status == "unknown"]:
                del self._responses[key]
            self._generation = gen

    # ---------------------------------------------------------------------- CRL
    def crl(self, issuer: str) -> bytes:
        self._refresh()
        now = self._clock()
        with self._lock:
            memo = self._crls.get(issuer)
            if memo is not None and now < memo[1]:
                return memo[0]
            der = self._auth[issuer].crl()
            self._crls[issuer] = (der, now + CRL_MEMO)
            return der

    # --------------------------------------------------------------------- OCSP
    def ocsp(self, issuer: str, der: bytes) -> bytes:
        """A DER OCSP response; never raises for bad input (malformedRequest)."""
        try:
            req = ocspx.parse_request(der)
        except ocspx.MalformedRequest:
            return ocspx.MALFORMED
        try:
            return self._answer(issuer, req)
        except CertctlError:
            return ocspx.TRY_LATER  # state store or CA unavailable: the client retries

    def _answer(self, issuer: str, req: ocspx.Request) -> bytes:
        self._refresh()
        auth = self._auth[issuer]
        hkey = (issuer, req.hash_name)
        expected = self._hashes.get(hkey)
        if expected is None:
            expected = self._hashes[hkey] = ocspx.issuer_hashes(
                auth.ca_certificate(), req.hash_name
            )
        if expected != (req.issuer_name_hash, req.issuer_key_hash):
            return ocspx.UNAUTHORIZED  # not a certificate of this CA
        now = self._clock()
        key = (issuer, req.serial, req.hash_name)
        if req.nonce is None:
            hit = self._responses.get(key)
            if hit is not None and now < hit.until:
                return hit.der
        entry = self._revoked[issuer].get(req.serial)
        if entry is not None:
            status = "revoked"
        elif (issuer, req.serial) in self._known:
            status = "good"
        elif self._store.find_serial(issuer, serial_hex(req.serial)) is not None:
            self._known.add((issuer, req.serial))
            status = "good"
        else:
            status = "unknown"
        validity = auth.ocsp_validity
        this_update = now.replace(microsecond=0)
        next_update = this_update + validity
        der = ocspx.build_response(
            req,
            auth.ocsp_signer(),
            status=status,
            this_update=this_update,
            next_update=next_update,
            revoked_at=entry.revoked_at if entry is not None else None,
            reason=entry.reason if entry is not None else None,
        )
        if req.nonce is None:
            with self._lock:
                self._responses[key] = _Cached(der, next_update - validity / 10, status)
        return der

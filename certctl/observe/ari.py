"""Ask the issuers that offer it for their suggested renewal windows (RFC 9773 ARI).

One batch per issuer (the issuer bounds its own concurrency and caches answers in
its vault until the CA's Retry-After), only for certificates whose current version
is active and came from the issuer the inventory still names. An issuer that fails
is left out: the planner then falls back to the configured renewal window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from certctl.connectors import Issuer, Registry
from certctl.model import Inventory, StateSnapshot, VersionRecord

log = logging.getLogger(__name__)


def offers_renewal_info(cls: type[Issuer]) -> bool:
    return cls.renewal_windows is not Issuer.renewal_windows


def observe_renewal_windows(
    inv: Inventory,
    snapshot: StateSnapshot,
    issuer_for: Callable[[str], Issuer],
    registry: Registry,
) -> dict[str, tuple[datetime, datetime]]:
    """Issuers whose type does not offer renewal info are not even instantiated."""
    by_issuer: dict[str, list[VersionRecord]] = {}
    for cert in inv.certificates.values():
        rec = snapshot.certs.get(cert.name)
        if rec is None or rec.retired or cert.revoked:
            continue
        cur = rec.current
        if cur is None or cur.status != "active" or cur.issuer != cert.issuer:
            continue
        by_issuer.setdefault(cur.issuer, []).append(cur)
    out: dict[str, tuple[datetime, datetime]] = {}
    for name in sorted(by_issuer):
        spec = inv.issuers.get(name)
        cls = registry.issuers.get(spec.type) if spec is not None else None
        if cls is None or not offers_renewal_info(cls):
            continue
        try:
            windows = issuer_for(name).renewal_windows(by_issuer[name])
        except Exception:  # a CA that cannot answer must not stop the plan
            log.debug("renewal info from issuer %s failed", name, exc_info=True)
            continue
        for cert_name, (start, end) in windows.items():
            if start < end:
                out[cert_name] = (start, end)
    return out

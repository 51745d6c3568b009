"""Read back what each target holds, in one batch per target connector."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from certctl.connectors import ObserveItem
from certctl.model import Inventory, StateSnapshot, TargetObservation, TargetState


def observe_targets(
    inv: Inventory,
    snapshot: StateSnapshot,
    target_for: Callable[[str], Any],
) -> dict[tuple[str, str], TargetObservation]:
    """Observe every placement of every certificate that has a current version.

    Certificates never issued are not observed: they will be issued and deployed
    anyway. A connector that fails to observe yields UNKNOWN for its placements
    rather than failing the whole plan.
    """
    by_target: dict[str, list[ObserveItem]] = {}
    for cert in inv.certificates.values():
        rec = snapshot.certs.get(cert.name)
        if rec is None or rec.current is None or rec.retired:
            continue
        for p in cert.placements:
            if p.agent is not None:  # deployed by an agent: not reachable from here
                continue
            by_target.setdefault(p.target, []).append(
                ObserveItem(
                    placement=p,
                    cert=cert.name,
                    expected_fingerprint=rec.current.fingerprint,
                    record=snapshot.deployments.get((cert.name, p.id)),
                )
            )
    out: dict[tuple[str, str], TargetObservation] = {}
    for name in sorted(by_target):
        items = by_target[name]
        try:
            observations = target_for(name).observe(items)
        except Exception as exc:
            observations = [
                TargetObservation(i.cert, i.placement.id, TargetState.UNKNOWN, detail=str(exc))
                for i in items
            ]
        for o in observations:
            out[(o.cert, o.placement)] = o
    return out

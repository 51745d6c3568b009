"""Agent routing on the controller side (pure): the job an agent-routed placement needs.

The planner uses :func:`job_spec` to tell whether the open job of a placement is still
the one the inventory wants (same digest: wait on it; another: plan anew, and the
executor's enqueue supersedes the old one); the executor enqueues exactly these specs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from certctl.agent import protocol as P
from certctl.model import Certificate, Placement, Secret, SecretBytes


def _jsonable(value: Any) -> Any:
    """A placement config as JSON: Secret references stay references (``{env: X}``,
    ``{file: X}``, resolved on the agent's host); an inline secret is its value."""
    if isinstance(value, Secret):
        if value.kind == "value":
            return value.reveal()
        return {value.kind: value.ref}
    if isinstance(value, SecretBytes):
        raise TypeError("key material cannot be part of an agent job")
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def names_body(cert: Certificate) -> P.NamesBody:
    dns: list[str] = []
    ips: list[str] = []
    for name in cert.names:
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
        else:
            ips.append(name)
    return {"common_name": cert.common_name, "dns": dns, "ip": ips}


def job_spec(cert: Certificate, placement: Placement) -> P.AgentJobSpec:
    """The job for one agent-routed placement of ``cert``."""
    assert placement.agent is not None
    job = {
        "certificate": cert.name,
        "placement": placement.id,
        "version_hint": None,
        "key": P.key_body(cert.key),
        "names": names_body(cert),
        "target": {"type": placement.type, "config": _jsonable(placement.config)},
    }
    selector = dict(placement.agent)
    # The digest also covers what shapes the certificate but is not in the job (the
    # server issues through the inventory's issuer): a change there is a new job.
    shaped = {**job, "issuer": cert.issuer, "profile": cert.profile, "ttl": cert.ttl_s}
    return P.AgentJobSpec(
        cert.name,
        placement.id,
        selector,
        job,
        P.spec_digest(cert.name, placement.id, selector, shaped),
    )

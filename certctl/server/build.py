"""Wire an :class:`~certctl.engine.Engine` into the server application."""

from __future__ import annotations

import logging

from starlette.applications import Starlette

from certctl.agent.service import AgentServerSettings, AgentService, mount
from certctl.engine import Engine
from certctl.errors import CertctlError
from certctl.server.app import ServerSettings, create_app
from certctl.server.pki import PKIService, RevocationAuthority

log = logging.getLogger(__name__)


def build_app(
    engine: Engine, settings: ServerSettings, agents: AgentServerSettings | None = None
) -> tuple[Starlette, list[str]]:
    """The application over ``engine``'s store and its issuers that publish revocation
    (CAs, responder certificates and CRLs are loaded now, so problems show at start),
    with the agent API (``/agent/v1``) unless ``agents.enabled`` is false."""
    inv = engine.inventory()
    store = engine.store()
    authorities: dict[str, RevocationAuthority] = {}
    for name in sorted(inv.issuers):
        try:
            issuer = engine.issuer(name)
        except CertctlError as exc:
            log.warning("issuer %s: not served: %s", name, exc)
            continue
        if isinstance(issuer, RevocationAuthority):
            authorities[name] = issuer
    pki = PKIService(store, authorities, engine.clock)
    pki.warm()
    app = create_app(store, pki, engine.clock, settings)
    agents = agents if agents is not None else AgentServerSettings()
    if agents.enabled:
        mount(app, AgentService(engine, store, engine.clock, agents))
    return app, pki.issuers

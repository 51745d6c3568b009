"""``certctl serve``: CRL and OCSP for local-CA issuers, health, metrics, read API.

* :mod:`certctl.server.pki` -- CRL and OCSP answers with their caches.
* :mod:`certctl.server.auth` -- API keys (stored hashed) and rate limits.
* :mod:`certctl.server.metrics` -- the Prometheus collector over the state store.
* :mod:`certctl.server.app` -- the Starlette application and the uvicorn runner.
"""

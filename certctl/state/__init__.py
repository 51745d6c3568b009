"""Open a state store from a URL.

* ``None`` -- embedded SQLite at ``<inventory root>/.certctl/state.db`` (the directory
  is created 0700 with a ``.gitignore`` of ``*``).
* a plain path or ``sqlite:///path`` -- SQLite at that path.
* ``postgresql://...`` or ``postgres://...`` -- PostgreSQL, with a connection pool.

Pending migrations are applied on open (under a lock), so a fresh store just works;
``store.migrate()`` stays callable for ``certctl db upgrade``. The PostgreSQL driver
is only imported when a PostgreSQL URL is opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from certctl.errors import StateError
from certctl.state.base import StateStore
from certctl.state.common import STATE_DIR, BaseStore, ensure_state_dir

DB_FILE = "state.db"
_PG_SCHEMES = ("postgresql", "postgres")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def describe_url(url: str) -> str:
    """The URL fit for messages and logs: any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable state URL>"
    if not parts.scheme or parts.password is None:
        if parts.scheme in _PG_SCHEMES and "password=" in parts.query:
            return urlunsplit(parts._replace(query="<redacted>"))
        return url
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    user = parts.username or ""
    netloc = f"{user}:***@{host}"
    query = "<redacted>" if "password=" in parts.query else parts.query
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def open_store(
    url: str | None,
    *,
    inventory_root: Path,
    pool_size: int = 4,
    clock: Callable[[], datetime] = _utcnow,
    env: Mapping[str, str] | None = None,
) -> StateStore:
    """Open (creating and migrating as needed) the state store ``url`` names.

    ``env`` defaults to ``os.environ``; it is where ``CERTCTL_STATE_KEY`` is looked up.
    Errors are :class:`StateError` with a one-line reason, the URL's password redacted.
    """
    environ = os.environ if env is None else env
    store: StateStore
    if url is None or url == "":
        state_dir = ensure_state_dir(inventory_root / STATE_DIR, gitignore=True)
        store = _open_sqlite(state_dir / DB_FILE, clock, environ)
    else:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in _PG_SCHEMES:
            from certctl.state.postgres import PostgresStore

            # Without CERTCTL_STATE_KEY the key file lives in <inventory>/.certctl/,
            # created only when a key is first needed (planning needs none).
            store = PostgresStore(
                url,
                where=describe_url(url),
                key_dir=inventory_root / STATE_DIR,
                clock=clock,
                pool_size=pool_size,
                env=environ,
            )
        elif scheme == "sqlite":
            path = url.split("://", 1)[1]
            if not path:
                raise StateError("sqlite:// URL without a path; use sqlite:///path/to/state.db")
            store = _open_sqlite(Path(path).expanduser(), clock, environ)
        elif scheme:
            raise StateError(
                f"unsupported state store URL scheme {scheme!r} in {describe_url(url)}: use "
                "postgresql://user@host/db, sqlite:///path/to/state.db or a file path"
            )
        else:
            store = _open_sqlite(Path(url).expanduser(), clock, environ)
    try:
        store.migrate()
        if isinstance(store, BaseStore):
            store.verify_key_if_present()
    except BaseException:
        store.close()
        raise
    return store


def _open_sqlite(path: Path, clock: Callable[[], datetime], env: Mapping[str, str]) -> StateStore:
    from certctl.state.sqlite import SQLiteStore

    if path.exists() and path.is_dir():
        raise StateError(f"state database {path} is a directory")
    parent = path.parent
    if not parent.exists():
        ensure_state_dir(parent, gitignore=False)
    return SQLiteStore(path, key_dir=parent, clock=clock, env=env)


__all__ = ["DB_FILE", "describe_url", "open_store"]

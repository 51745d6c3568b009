"""API keys and rate limits of the read API.

A token is ``cctl_`` + 43 characters of base64url (32 random bytes). Only its SHA-256
(hex) is stored; a presented token is hashed and compared with every stored hash
using :func:`hmac.compare_digest` (no early exit), so neither the comparison nor the
number of keys checked depends on how much of a hash matched.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from certctl.state.base import StateStore

TOKEN_PREFIX = "cctl_"  # noqa: S105 - a prefix, not a secret


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


class KeyRing:
    """The stored key hashes, re-read at most every ``ttl`` seconds and whenever a
    token matches none (so a new key works at once; a deleted one stops within ttl)."""

    def __init__(
        self,
        store: StateStore,
        *,
        ttl: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._keys: list[tuple[str, bytes]] = []
        self._loaded_at = -math.inf
        self._lock = threading.Lock()

    def _load(self) -> None:
        self._keys = [(n, bytes.fromhex(h)) for n, h in self._store.api_keys()]
        self._loaded_at = self._clock()

    def _match(self, digest: bytes) -> str | None:
        found = None
        for name, stored in self._keys:
            if hmac.compare_digest(stored, digest) and found is None:
                found = name
        return found

    def verify(self, token: str | None) -> str | None:
        """The key's name, or None for a missing or unknown token."""
        if not token or len(token) > 200:
            return None
        digest = bytes.fromhex(hash_token(token))
        with self._lock:
            if self._clock() - self._loaded_at > self._ttl:
                self._load()
            name = self._match(digest)
            if name is None and self._clock() - self._loaded_at > 0.05:
                self._load()
                name = self._match(digest)
        return name


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """Token buckets: ``rate`` requests per second, bursts up to ``burst``."""

    MAX_BUCKETS = 50_000

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> float | None:
        """None if a request may pass (and count it), else the seconds to wait."""
        now = self._clock()
        with self._lock:
            b = self._buckets.get(key)
            if b is None:
                if len(self._buckets) >= self.MAX_BUCKETS:
                    self._prune(now)
                b = self._buckets[key] = _Bucket(float(self.burst), now)
            b.tokens = min(float(self.burst), b.tokens + (now - b.at) * self.rate)
            b.at = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return None
            return (1.0 - b.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [
            k for k, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) >= self.MAX_BUCKETS:  # still full: forget the oldest half
            for k in sorted(self._buckets, key=lambda k: self._buckets[k].at)[
                : self.MAX_BUCKETS // 2
            ]:
                del self._buckets[k]

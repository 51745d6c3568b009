"""Settings of the agent API of ``certctl serve``."""

from __future__ import annotations

from dataclasses import dataclass

from certctl.agent import protocol as P


@dataclass(frozen=True)
class AgentServerSettings:
    enabled: bool = True
    lease_s: float = P.LEASE_SECONDS
    max_body: int = P.MAX_BODY
    flush_interval: float = 1.0  # heartbeats written every ...
    poll_interval: float | None = None  # generation poll; None: 0.2 s SQLite, 1 s PostgreSQL
    board_refresh: float = 5.0  # the job board is re-read at least this often
    replay_max: int = 2_000_000  # nonces remembered at most (then 429)
    enroll_rate: float = 5.0  # enrollments per second per client IP
    enroll_burst: int = 20
    max_attempts: int = P.MAX_ATTEMPTS
    backoff_base_s: float = 30.0  # a failed job waits base * 2^(n-1), capped
    backoff_cap_s: float = 3600.0
    issue_concurrency: int = 8
    offline_after: float = float(P.OFFLINE_AFTER)  # the sweep's threshold (s); 0: no sweep
    sweep_interval: float = 15.0

-- Pull-mode agents (certctl.agent): enrolled agents, bootstrap tokens, agent jobs.
-- Same tables and meaning as migrations/postgres/0006_agents.sql.
-- agents: one row per enrolled agent; only the Ed25519 PUBLIC key is stored.
CREATE TABLE agents (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    public_key  TEXT NOT NULL,
    labels      TEXT NOT NULL,
    facts       TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('online', 'offline', 'revoked')),
    enrolled_at TEXT NOT NULL,
    last_seen   TEXT,
    revoked_at  TEXT,
    token       TEXT
);
-- agent_tokens: bootstrap tokens; only their SHA-256 (hex) is stored.
CREATE TABLE agent_tokens (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    uses_left  INTEGER,
    used       INTEGER NOT NULL DEFAULT 0,
    revoked_at TEXT
);
-- agent_jobs: one deployment through an agent. public_key/issue_payload journal the
-- CSR being issued (so a resubmission does not issue twice); version is what was issued.
CREATE TABLE agent_jobs (
    id              TEXT PRIMARY KEY,
    certificate     TEXT NOT NULL,
    placement       TEXT NOT NULL,
    selector        TEXT NOT NULL,
    job             TEXT NOT NULL,
    spec_digest     TEXT NOT NULL,
    state           TEXT NOT NULL
        CHECK (state IN ('queued', 'leased', 'issued', 'deployed', 'failed', 'dead')),
    agent           TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    lease_until     TEXT,
    next_attempt_at TEXT,
    detail          TEXT,
    version         INTEGER,
    public_key      TEXT,
    issue_payload   TEXT,
    fingerprint     TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL
);
CREATE INDEX agent_jobs_state ON agent_jobs (state, created_at);
CREATE INDEX agent_jobs_cert ON agent_jobs (certificate, placement);
CREATE INDEX agent_jobs_agent ON agent_jobs (agent, state);
-- Counters the server reads cheaply: jobs (new work) and agents (revocations).
CREATE TABLE agent_meta (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    jobs_generation   INTEGER NOT NULL,
    agents_generation INTEGER NOT NULL
);
INSERT INTO agent_meta (id, jobs_generation, agents_generation) VALUES (1, 0, 0);

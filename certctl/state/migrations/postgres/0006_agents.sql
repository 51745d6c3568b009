-- Pull-mode agents (certctl.agent): enrolled agents, bootstrap tokens, agent jobs.
-- Same tables and meaning as migrations/sqlite/0006_agents.sql.
-- agents: one row per enrolled agent; only the Ed25519 PUBLIC key is stored.
CREATE TABLE agents (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    public_key  text NOT NULL,
    labels      text NOT NULL,
    facts       text NOT NULL,
    status      text NOT NULL CHECK (status IN ('online', 'offline', 'revoked')),
    enrolled_at timestamptz NOT NULL,
    last_seen   timestamptz,
    revoked_at  timestamptz,
    token       text
);
-- agent_tokens: bootstrap tokens; only their SHA-256 (hex) is stored.
CREATE TABLE agent_tokens (
    name       text PRIMARY KEY,
    token_hash text NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz,
    uses_left  integer,
    used       integer NOT NULL DEFAULT 0,
    revoked_at timestamptz
);
-- agent_jobs: one deployment through an agent. public_key/issue_payload journal the
-- CSR being issued (so a resubmission does not issue twice); version is what was issued.
CREATE TABLE agent_jobs (
    id              text PRIMARY KEY,
    certificate     text NOT NULL,
    placement       text NOT NULL,
    selector        text NOT NULL,
    job             text NOT NULL,
    spec_digest     text NOT NULL,
    state           text NOT NULL
        CHECK (state IN ('queued', 'leased', 'issued', 'deployed', 'failed', 'dead')),
    agent           text,
    attempts        integer NOT NULL DEFAULT 0,
    lease_until     timestamptz,
    next_attempt_at timestamptz,
    detail          text,
    version         integer,
    public_key      text,
    issue_payload   text,
    fingerprint     text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
CREATE INDEX agent_jobs_state ON agent_jobs (state, created_at);
CREATE INDEX agent_jobs_cert ON agent_jobs (certificate, placement);
CREATE INDEX agent_jobs_agent ON agent_jobs (agent, state);
-- Counters the server reads cheaply: jobs (new work) and agents (revocations).
CREATE TABLE agent_meta (
    id                integer PRIMARY KEY CHECK (id = 1),
    jobs_generation   bigint NOT NULL,
    agents_generation bigint NOT NULL
);
INSERT INTO agent_meta (id, jobs_generation, agents_generation) VALUES (1, 0, 0);

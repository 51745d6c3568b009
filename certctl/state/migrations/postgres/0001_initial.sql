-- certctl state, PostgreSQL flavour. Same tables and meaning as migrations/sqlite.
-- Private keys and secret vault values are AES-GCM blobs (see certctl/state/crypto.py).
-- deployments.files is {role: [path, sha256, size, mtime_ns]}; certificate_versions.names
-- is a JSON array of DNS names, common name first.

-- One row: the generation counter (bumped by every write) and the key check value.
CREATE TABLE meta (
    id         integer PRIMARY KEY CHECK (id = 1),
    generation bigint NOT NULL DEFAULT 0,
    key_check  text
);
INSERT INTO meta (id, generation, key_check) VALUES (1, 0, NULL);

CREATE TABLE certificates (
    name             text PRIMARY KEY,
    current_version  integer,
    revoke_on_remove boolean NOT NULL DEFAULT false,
    retired          boolean NOT NULL DEFAULT false,
    failures         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz,
    spec_digest      text,
    force_renew      boolean NOT NULL DEFAULT false
);

CREATE TABLE certificate_versions (
    cert              text NOT NULL REFERENCES certificates (name),
    version           integer NOT NULL,
    serial            text NOT NULL,
    not_before        timestamptz NOT NULL,
    not_after         timestamptz NOT NULL,
    fingerprint       text NOT NULL,
    issuer            text NOT NULL,
    key_spec          text NOT NULL,
    names             jsonb NOT NULL,
    profile_digest    text NOT NULL,
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'superseded', 'revoked')),
    key_custody       text NOT NULL DEFAULT 'controller',
    revoked_at        timestamptz,
    revocation_reason text,
    cert_pem          bytea NOT NULL,
    chain_pem         bytea NOT NULL,
    key_enc           bytea,
    PRIMARY KEY (cert, version)
);
CREATE INDEX certificate_versions_active ON certificate_versions (cert) WHERE status = 'active';

CREATE TABLE deployments (
    cert          text NOT NULL,
    placement     text NOT NULL,
    version       integer NOT NULL,
    fingerprint   text NOT NULL,
    files         jsonb NOT NULL,
    status        text NOT NULL,
    deployed_at   timestamptz,
    config_digest text NOT NULL DEFAULT '',
    PRIMARY KEY (cert, placement)
);

CREATE TABLE runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind        text NOT NULL,
    holder      text NOT NULL,
    started_at  timestamptz NOT NULL,
    finished_at timestamptz,
    status      text NOT NULL,
    summary     jsonb NOT NULL DEFAULT '{}'
);

-- Append-only: nothing updates or deletes audit rows.
CREATE TABLE audit (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at        timestamptz NOT NULL,
    event     text NOT NULL,
    cert      text,
    placement text,
    run_id    bigint,
    detail    jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_cert ON audit (cert, id);
CREATE FUNCTION certctl_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit is append-only';
END;
$$;
CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION certctl_audit_append_only();

-- Intent before side effect. closed_at IS NULL means the outcome is unknown.
CREATE TABLE journal (
    seq        bigint GENERATED ALWAYS AS IDENTITY,
    id         text PRIMARY KEY,
    run_id     bigint,
    cert       text NOT NULL,
    action     text NOT NULL,
    placement  text,
    payload    jsonb NOT NULL DEFAULT '{}',
    key_enc    bytea,
    created_at timestamptz NOT NULL,
    closed_at  timestamptz,
    outcome    text
);
CREATE INDEX journal_open ON journal (created_at, seq) WHERE closed_at IS NULL;

CREATE TABLE issuer_vault (
    issuer     text NOT NULL,
    key        text NOT NULL,
    value      bytea NOT NULL,
    secret     boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (issuer, key)
);

-- Who holds a lock: the session advisory lock excludes, this row names the holder
-- (matched to the advisory lock through backend_pid).
CREATE TABLE locks (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    pid         integer NOT NULL,
    backend_pid integer,
    acquired_at timestamptz NOT NULL
);

-- certctl state, SQLite flavour. Same tables and meaning as migrations/postgres.
-- Timestamps are ISO-8601 text in UTC with microseconds ("2025-01-02T03:04:05.000006+00:00"),
-- which round-trips exactly and sorts as text. JSON columns hold JSON text.
-- Private keys and secret vault values are AES-GCM blobs (see certctl/state/crypto.py).
-- deployments.files is {role: [path, sha256, size, mtime_ns]}; certificate_versions.names
-- is a JSON array of DNS names, common name first.

-- One row: the generation counter (bumped by every write) and the key check value.
CREATE TABLE meta (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    generation INTEGER NOT NULL DEFAULT 0,
    key_check  TEXT
);
INSERT INTO meta (id, generation, key_check) VALUES (1, 0, NULL);

CREATE TABLE certificates (
    name             TEXT PRIMARY KEY,
    current_version  INTEGER,
    revoke_on_remove INTEGER NOT NULL DEFAULT 0,
    retired          INTEGER NOT NULL DEFAULT 0,
    failures         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT,
    spec_digest      TEXT,
    force_renew      INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE certificate_versions (
    cert              TEXT NOT NULL REFERENCES certificates (name),
    version           INTEGER NOT NULL,
    serial            TEXT NOT NULL,
    not_before        TEXT NOT NULL,
    not_after         TEXT NOT NULL,
    fingerprint       TEXT NOT NULL,
    issuer            TEXT NOT NULL,
    key_spec          TEXT NOT NULL,
    names             TEXT NOT NULL,
    profile_digest    TEXT NOT NULL,
    status            TEXT NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'superseded', 'revoked')),
    key_custody       TEXT NOT NULL DEFAULT 'controller',
    revoked_at        TEXT,
    revocation_reason TEXT,
    cert_pem          BLOB NOT NULL,
    chain_pem         BLOB NOT NULL,
    key_enc           BLOB,
    PRIMARY KEY (cert, version)
);
CREATE INDEX certificate_versions_active ON certificate_versions (cert) WHERE status = 'active';

CREATE TABLE deployments (
    cert          TEXT NOT NULL,
    placement     TEXT NOT NULL,
    version       INTEGER NOT NULL,
    fingerprint   TEXT NOT NULL,
    files         TEXT NOT NULL,
    status        TEXT NOT NULL,
    deployed_at   TEXT,
    config_digest TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (cert, placement)
);

CREATE TABLE runs (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,
    holder      TEXT NOT NULL,
    started_at  TEXT NOT NULL,
    finished_at TEXT,
    status      TEXT NOT NULL,
    summary     TEXT NOT NULL DEFAULT '{}'
);

-- Append-only: nothing updates or deletes audit rows.
CREATE TABLE audit (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        TEXT NOT NULL,
    event     TEXT NOT NULL,
    cert      TEXT,
    placement TEXT,
    run_id    INTEGER,
    detail    TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_cert ON audit (cert, id);
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only');
END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit is append-only');
END;

-- Intent before side effect. closed_at IS NULL means the outcome is unknown.
CREATE TABLE journal (
    seq        INTEGER PRIMARY KEY,
    id         TEXT NOT NULL UNIQUE,
    run_id     INTEGER,
    cert       TEXT NOT NULL,
    action     TEXT NOT NULL,
    placement  TEXT,
    payload    TEXT NOT NULL DEFAULT '{}',
    key_enc    BLOB,
    created_at TEXT NOT NULL,
    closed_at  TEXT,
    outcome    TEXT
);
CREATE INDEX journal_open ON journal (created_at, seq) WHERE closed_at IS NULL;

CREATE TABLE issuer_vault (
    issuer     TEXT NOT NULL,
    key        TEXT NOT NULL,
    value      BLOB NOT NULL,
    secret     INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (issuer, key)
);

-- Who holds (or last held) a lock. On SQLite the OS flock on state.db.lock is what
-- actually excludes; this row is for people looking at the database.
CREATE TABLE locks (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    backend_pid INTEGER,
    acquired_at TEXT NOT NULL
);

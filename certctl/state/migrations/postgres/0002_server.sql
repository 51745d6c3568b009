-- certctl serve: API keys, and the lookups the OCSP responder and the read API need.
-- Same tables and meaning as migrations/sqlite/0002_server.sql.

-- API keys of the read API: only the SHA-256 (hex) of each token is kept.
CREATE TABLE api_keys (
    name       text PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL
);

-- OCSP: find the version an issuer signed with a given serial.
CREATE INDEX certificate_versions_issuer_serial ON certificate_versions (issuer, serial);
-- Read API: audit filtered by event, newest first.
CREATE INDEX audit_event ON audit (event, id);

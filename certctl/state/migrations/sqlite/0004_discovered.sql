-- Discovery findings (certctl.discovery): one row per certificate seen at one place.
-- Keyed by (source, host, location, sni, fingerprint); sni is '' when none was sent.
-- A rescan updates the row and its seen_at; first_seen_at keeps the first sighting.
-- chain_pem holds certificates only, never a private key (key_path is only a path).
-- Same table and meaning as migrations/postgres/0004_discovered.sql.
CREATE TABLE discovered (
    source              TEXT NOT NULL CHECK (source IN ('file', 'network')),
    host                TEXT NOT NULL,
    location            TEXT NOT NULL,
    sni                 TEXT NOT NULL DEFAULT '',
    fingerprint         TEXT NOT NULL,
    format              TEXT NOT NULL,
    subject             TEXT NOT NULL,
    sans                TEXT NOT NULL,
    issuer              TEXT NOT NULL,
    serial              TEXT NOT NULL,
    not_before          TEXT NOT NULL,
    not_after           TEXT NOT NULL,
    key_algorithm       TEXT NOT NULL,
    key_size            INTEGER NOT NULL,
    self_signed         INTEGER NOT NULL,
    key_path            TEXT,
    chain_pem           TEXT NOT NULL,
    signature_algorithm TEXT NOT NULL DEFAULT '',
    key_in_store        INTEGER NOT NULL DEFAULT 0,
    first_seen_at       TEXT NOT NULL,
    seen_at             TEXT NOT NULL,
    PRIMARY KEY (source, host, location, sni, fingerprint)
);
CREATE INDEX discovered_fingerprint ON discovered (fingerprint);
CREATE INDEX discovered_not_after ON discovered (not_after);
-- "Is this finding a certificate certctl issued?" is a lookup by fingerprint.
CREATE INDEX certificate_versions_fingerprint ON certificate_versions (fingerprint);

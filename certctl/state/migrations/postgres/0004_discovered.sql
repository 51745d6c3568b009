-- Discovery findings (certctl.discovery): one row per certificate seen at one place.
-- Keyed by (source, host, location, sni, fingerprint); sni is '' when none was sent.
-- A rescan updates the row and its seen_at; first_seen_at keeps the first sighting.
-- chain_pem holds certificates only, never a private key (key_path is only a path).
-- Same table and meaning as migrations/sqlite/0004_discovered.sql.
CREATE TABLE discovered (
    source              text NOT NULL CHECK (source IN ('file', 'network')),
    host                text NOT NULL,
    location            text NOT NULL,
    sni                 text NOT NULL DEFAULT '',
    fingerprint         text NOT NULL,
    format              text NOT NULL,
    subject             text NOT NULL,
    sans                text NOT NULL,
    issuer              text NOT NULL,
    serial              text NOT NULL,
    not_before          timestamptz NOT NULL,
    not_after           timestamptz NOT NULL,
    key_algorithm       text NOT NULL,
    key_size            integer NOT NULL,
    self_signed         boolean NOT NULL,
    key_path            text,
    chain_pem           text NOT NULL,
    signature_algorithm text NOT NULL DEFAULT '',
    key_in_store        boolean NOT NULL DEFAULT false,
    first_seen_at       timestamptz NOT NULL,
    seen_at             timestamptz NOT NULL,
    PRIMARY KEY (source, host, location, sni, fingerprint)
);
CREATE INDEX discovered_fingerprint ON discovered (fingerprint);
CREATE INDEX discovered_not_after ON discovered (not_after);
-- "Is this finding a certificate certctl issued?" is a lookup by fingerprint.
CREATE INDEX certificate_versions_fingerprint ON certificate_versions (fingerprint);

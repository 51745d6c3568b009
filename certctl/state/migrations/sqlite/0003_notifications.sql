-- Notifications (certctl.notify): one row per (deduplication key, notifier).
-- The key (event:cert:serial:threshold...) makes each notification happen once;
-- status pending -> sent, or -> dead (dead-letter) after too many failed attempts.
-- Same tables and meaning as migrations/postgres/0003_notifications.sql.
CREATE TABLE notifications (
    key             TEXT NOT NULL,
    notifier        TEXT NOT NULL,
    event           TEXT NOT NULL,
    cert            TEXT,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TEXT,
    last_error      TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (key, notifier)
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);

-- Notifications (certctl.notify): one row per (deduplication key, notifier).
-- The key (event:cert:serial:threshold...) makes each notification happen once;
-- status pending -> sent, or -> dead (dead-letter) after too many failed attempts.
-- Same tables and meaning as migrations/sqlite/0003_notifications.sql.
CREATE TABLE notifications (
    key             text NOT NULL,
    notifier        text NOT NULL,
    event           text NOT NULL,
    cert            text,
    payload         text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'sent', 'dead')),
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL,
    PRIMARY KEY (key, notifier)
);
CREATE INDEX notifications_due ON notifications (status, next_attempt_at);

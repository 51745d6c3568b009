-- The job queue, the workers and the leader (certctl.workers). PostgreSQL only: many
-- `certctl worker` processes share these tables (FOR UPDATE SKIP LOCKED, leases).
-- The SQLite migration of the same number creates nothing (workers refuse SQLite).
--
-- jobs.state: queued -> leased -> done | failed (the handler reported a failure that
-- a retry would not fix) | dead (gave up after max_attempts: errors or expired
-- leases). A retry goes back to queued with run_after = now + backoff. attempts is
-- bumped by each claim and is the lease token: a completion is only accepted from
-- the worker named in leased_by with the attempt number it claimed.
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    kind         text NOT NULL,
    payload      jsonb NOT NULL DEFAULT '{}'::jsonb,
    dedupe_key   text,
    batch        text,
    state        text NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'leased', 'done', 'failed', 'dead')),
    attempts     integer NOT NULL DEFAULT 0,
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts > 0),
    run_after    timestamptz NOT NULL DEFAULT now(),
    leased_by    text,
    lease_until  timestamptz,
    last_error   text,
    result       jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- Enqueuing the same work twice while it is pending does it once.
CREATE UNIQUE INDEX jobs_dedupe ON jobs (dedupe_key)
    WHERE dedupe_key IS NOT NULL AND state IN ('queued', 'leased');
CREATE INDEX jobs_ready ON jobs (id) WHERE state = 'queued';
CREATE INDEX jobs_leases ON jobs (lease_until) WHERE state = 'leased';
CREATE INDEX jobs_batch ON jobs (batch) WHERE batch IS NOT NULL;

-- The side effect of the built-in `noop` job kind, written in the transaction that
-- completes the job (no key: a duplicate would show as a second row).
CREATE TABLE job_effects (
    job_id  bigint NOT NULL,
    worker  text NOT NULL,
    attempt integer NOT NULL,
    at      timestamptz NOT NULL DEFAULT now()
);

-- Live workers (heartbeats), for `certctl workers`.
CREATE TABLE workers (
    id           text PRIMARY KEY,
    host         text NOT NULL,
    pid          integer NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    leader       boolean NOT NULL DEFAULT false,
    jobs_done    bigint NOT NULL DEFAULT 0,
    stopped_at   timestamptz
);

-- The leader's lease (held together with a session advisory lock): a follower takes
-- over only when it gets the advisory lock AND the lease has expired.
CREATE TABLE leader (
    id          integer PRIMARY KEY CHECK (id = 1),
    holder      text,
    term        bigint NOT NULL DEFAULT 0,
    since       timestamptz,
    lease_until timestamptz
);
INSERT INTO leader (id) VALUES (1);

-- Webhooks (src/webhooks/; every statement in src/jobs/store/webhooks.rs and src/auth/store.rs).

-- An API key's default webhook URL (for jobs that name none) and its signing secret, `whsec_<base64>`, kept
-- in clear because the server signs with it (an HMAC key cannot be stored hashed). Keys made before this
-- release have none until `denoised keys rotate-webhook-secret` gives them one.
ALTER TABLE api_keys ADD COLUMN webhook_url TEXT;
ALTER TABLE api_keys ADD COLUMN webhook_secret TEXT;

-- A job's webhook, fixed at submission: the effective URL (the job's own or its key's default) and whether
-- `started` is sent besides the terminal event.
CREATE TABLE job_webhooks (
    job_id  TEXT    NOT NULL PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    url     TEXT    NOT NULL,
    started INTEGER NOT NULL CHECK (started IN (0, 1))
) STRICT;

-- The outbox: one row per event to deliver. A terminal event's row is written in the transaction that ends
-- the job, so no crash can lose it; a sender claims due rows under a lease (`next_attempt_at` moves to the
-- lease's end and `lease_owner` fences the outcome), so an attempt cut short by a crash is tried again.
CREATE TABLE webhook_deliveries (
    -- The `webhook-id` header, the same on every attempt: msg_<job id without dashes>_<event>[_<attempt>].
    id              TEXT    NOT NULL PRIMARY KEY,
    job_id          TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event           TEXT    NOT NULL CHECK (event IN ('started', 'completed', 'failed', 'cancelled')),
    -- `started`: the job's attempt number then (the body says it); NULL for terminal events.
    job_attempt     INTEGER,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    -- Attempts begun, charged at claim time.
    attempts        INTEGER NOT NULL CHECK (attempts >= 0),
    -- When the row is next due: the retry time, or while an attempt runs the end of its lease.
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    finished_at     INTEGER
) STRICT;

-- Senders look for due rows; job views and the started-before-terminal rule look by job.
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

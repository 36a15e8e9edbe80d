-- Webhooks: the same tables and meanings as migrations/sqlite/0007_webhooks.sql (read its comments).

ALTER TABLE api_keys ADD COLUMN webhook_url TEXT;
ALTER TABLE api_keys ADD COLUMN webhook_secret TEXT;

CREATE TABLE job_webhooks (
    job_id  TEXT COLLATE "C" NOT NULL PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    url     TEXT   NOT NULL,
    started BIGINT NOT NULL CHECK (started IN (0, 1))
);

CREATE TABLE webhook_deliveries (
    id              TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    job_id          TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    event           TEXT   NOT NULL CHECK (event IN ('started', 'completed', 'failed', 'cancelled')),
    job_attempt     BIGINT,
    status          TEXT   NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL CHECK (attempts >= 0),
    next_attempt_at BIGINT NOT NULL,
    lease_owner     TEXT,
    last_error      TEXT,
    created_at      BIGINT NOT NULL,
    finished_at     BIGINT
);

CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_job ON webhook_deliveries (job_id, created_at);

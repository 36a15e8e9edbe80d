-- The durable job queue on PostgreSQL: the same tables and meanings as migrations/sqlite/ (read its comments),
-- in one step since this backend starts at this release. Every statement that touches them is in
-- src/jobs/store/.
--
-- Conventions shared with SQLite, so one set of statements serves both:
--   * ids are UUID v7 in canonical lowercase text, collated "C" so they sort bytewise (creation order) whatever
--     the database's locale;
--   * every timestamp is BIGINT unix milliseconds (UTC); every integer is BIGINT (Rust i64).

CREATE TABLE jobs (
    id                      TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    kind                    TEXT   NOT NULL,
    status                  TEXT   NOT NULL
                            CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model                   TEXT   NOT NULL,
    params                  TEXT   NOT NULL CHECK (params::jsonb IS NOT NULL),
    priority                BIGINT NOT NULL DEFAULT 0,
    attempts                BIGINT NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts            BIGINT NOT NULL CHECK (max_attempts >= 1),
    lease_owner             TEXT,
    lease_expires_at        BIGINT,
    error_code              TEXT,
    error_message           TEXT,
    created_at              BIGINT NOT NULL,
    started_at              BIGINT,
    finished_at             BIGINT,
    owner                   TEXT,
    idempotency_key         TEXT,
    idempotency_fingerprint TEXT,
    input_bytes             BIGINT NOT NULL DEFAULT 0,
    -- Set when a client cancels a running job: its worker (in whatever process) stops at its next check.
    cancel_requested_at     BIGINT,
    CHECK ((status = 'running') = (lease_expires_at IS NOT NULL))
);

CREATE INDEX jobs_claim ON jobs (status, priority DESC, created_at, id);
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (COALESCE(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_finished_at ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_owner ON jobs (owner, id) WHERE owner IS NOT NULL;
CREATE INDEX jobs_owner_outstanding ON jobs (owner) WHERE status IN ('queued', 'running') AND owner IS NOT NULL;

CREATE TABLE images (
    job_id     TEXT COLLATE "C" NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx        BIGINT NOT NULL CHECK (idx >= 0),
    seed       BIGINT NOT NULL,
    width      BIGINT NOT NULL CHECK (width > 0),
    height     BIGINT NOT NULL CHECK (height > 0),
    format     TEXT   NOT NULL,
    path       TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    bytes      BIGINT NOT NULL CHECK (bytes >= 0),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE api_keys (
    id          TEXT   NOT NULL PRIMARY KEY,
    name        TEXT   NOT NULL,
    secret_hash TEXT   NOT NULL,
    admin       BIGINT NOT NULL CHECK (admin IN (0, 1)),
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

-- Worker processes of the fleet: each registers at start-up and beats while it runs (see GET /v1/workers).
CREATE TABLE workers (
    id           TEXT   NOT NULL PRIMARY KEY,
    host         TEXT   NOT NULL,
    pid          BIGINT NOT NULL,
    version      TEXT   NOT NULL,
    -- JSON array of the model names it serves, and of its devices ("cpu", "cuda:0", …).
    models       TEXT   NOT NULL,
    devices      TEXT   NOT NULL,
    started_at   BIGINT NOT NULL,
    heartbeat_at BIGINT NOT NULL
);

-- Every process's job events, in one order, so a follower on any API process sees every job's events:
-- written by the process that made the event, read back by every process (woken by NOTIFY
-- denoised_events, whose payload stays empty: previews do not fit its 8,000 bytes). Kept a few minutes.
CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,
    job_id     TEXT COLLATE "C" NOT NULL,
    -- The job's API key when the writer knew it; owner_known = 0 means "look it up".
    owner      TEXT,
    owner_known BIGINT NOT NULL,
    -- The event's JSON (its `type` and fields).
    body       TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX job_events_created ON job_events (created_at);

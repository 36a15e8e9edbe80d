-- The durable job queue (see src/jobs/store.rs for every statement that touches these tables).
--
-- Conventions:
--   * ids are UUID v7 in canonical lowercase hyphenated text, so they sort in creation order;
--   * every timestamp is INTEGER unix milliseconds (UTC);
--   * tables are STRICT so a wrongly typed bind fails loudly instead of being stored as-is.

CREATE TABLE jobs (
    id               TEXT    NOT NULL PRIMARY KEY,
    kind             TEXT    NOT NULL,
    status           TEXT    NOT NULL
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    model            TEXT    NOT NULL,
    params           TEXT    NOT NULL CHECK (json_valid(params)),
    priority         INTEGER NOT NULL DEFAULT 0,
    -- Claims so far, charged when a worker claims the job (a graceful release gives one back).
    attempts         INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts     INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- Fencing token of the worker holding the job; kept on terminal rows to record who finished it.
    lease_owner      TEXT,
    -- Set exactly while the job is running.
    lease_expires_at INTEGER,
    error_code       TEXT,
    error_message    TEXT,
    created_at       INTEGER NOT NULL,
    -- Start of the current (or last) attempt.
    started_at       INTEGER,
    finished_at      INTEGER,
    -- Reserved: the API key that submitted the job.
    owner            TEXT,
    -- Reserved: client-supplied key for idempotent submission.
    idempotency_key  TEXT,
    CHECK ((status = 'running') = (lease_expires_at IS NOT NULL))
) STRICT;

-- Claiming: the oldest job of the highest priority among the queued ones (id breaks ties within a millisecond).
CREATE INDEX jobs_claim ON jobs (status, priority DESC, created_at, id);

-- The reaper: running jobs by lease expiry.
CREATE INDEX jobs_running_lease ON jobs (lease_expires_at) WHERE status = 'running';

CREATE TABLE images (
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx        INTEGER NOT NULL CHECK (idx >= 0),
    -- A u64 seed stored as the i64 with the same bits (two's complement): seeds above i64::MAX read back
    -- negative in SQL but round-trip exactly through the store.
    seed       INTEGER NOT NULL,
    width      INTEGER NOT NULL CHECK (width > 0),
    height     INTEGER NOT NULL CHECK (height > 0),
    format     TEXT    NOT NULL,
    -- Relative to the server's data_dir.
    path       TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    bytes      INTEGER NOT NULL CHECK (bytes >= 0),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
) STRICT, WITHOUT ROWID;

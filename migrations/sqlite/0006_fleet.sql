-- Set when a client cancels a running job: its worker (in whatever process) stops at its next check.
ALTER TABLE jobs ADD COLUMN cancel_requested_at INTEGER;

-- Worker processes using this database: each registers at start-up and beats while it runs
-- (see GET /v1/workers).
CREATE TABLE workers (
    id           TEXT    NOT NULL PRIMARY KEY,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    version      TEXT    NOT NULL,
    -- JSON arrays of the model names it serves and of its devices ("cpu", "cuda:0", …).
    models       TEXT    NOT NULL CHECK (json_valid(models)),
    devices      TEXT    NOT NULL CHECK (json_valid(devices)),
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL
) STRICT;

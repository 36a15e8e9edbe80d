-- API keys (see src/auth/): only a SHA-256 of each secret is stored.
CREATE TABLE api_keys (
    -- The public part of the key (`dn_<id>_<secret>`), also what `jobs.owner` holds.
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    -- Lowercase hex SHA-256 of the whole key string.
    secret_hash TEXT    NOT NULL,
    admin       INTEGER NOT NULL CHECK (admin IN (0, 1)),
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
) STRICT;

-- A name identifies one live key (a revoked key's name may be reused).
CREATE UNIQUE INDEX api_keys_live_name ON api_keys (name) WHERE revoked_at IS NULL;

-- Idempotency keys are per tenant: two keys may use the same Idempotency-Key without meeting.
DROP INDEX jobs_idempotency_key;
CREATE UNIQUE INDEX jobs_idempotency_key ON jobs (COALESCE(owner, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Per-key listings and the outstanding-jobs limit.
CREATE INDEX jobs_owner ON jobs (owner, id) WHERE owner IS NOT NULL;

-- The per-key limit counts a key's outstanding jobs without reading its history.
CREATE INDEX jobs_owner_outstanding ON jobs (owner) WHERE status IN ('queued', 'running') AND owner IS NOT NULL;

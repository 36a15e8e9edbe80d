-- Per-key weight, rate and daily compute, fair sharing and rate buckets: see migrations/sqlite/0008_fair_share.sql.
ALTER TABLE api_keys ADD COLUMN weight BIGINT NOT NULL DEFAULT 1 CHECK (weight >= 1);
ALTER TABLE api_keys ADD COLUMN rate_per_minute BIGINT CHECK (rate_per_minute >= 1);
ALTER TABLE api_keys ADD COLUMN daily_image_steps BIGINT CHECK (daily_image_steps >= 1);

ALTER TABLE jobs ADD COLUMN cost BIGINT NOT NULL DEFAULT 0;
CREATE INDEX jobs_owner_created ON jobs (owner, created_at) WHERE owner IS NOT NULL;

CREATE TABLE fair_share (
    owner TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    pass  DOUBLE PRECISION NOT NULL
);

CREATE TABLE rate_buckets (
    owner      TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    tokens     DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL
);

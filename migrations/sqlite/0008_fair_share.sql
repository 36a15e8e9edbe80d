-- Operators' controls per API key: a share of the workers (`weight`), submissions per minute (a token bucket)
-- and compute per day (image-steps: n × steps of each job submitted in the last 24 hours). NULL: unlimited.
ALTER TABLE api_keys ADD COLUMN weight INTEGER NOT NULL DEFAULT 1 CHECK (weight >= 1);
ALTER TABLE api_keys ADD COLUMN rate_per_minute INTEGER CHECK (rate_per_minute >= 1);
ALTER TABLE api_keys ADD COLUMN daily_image_steps INTEGER CHECK (daily_image_steps >= 1);

-- What a job costs against its key's daily compute: its image-steps.
ALTER TABLE jobs ADD COLUMN cost INTEGER NOT NULL DEFAULT 0;
CREATE INDEX jobs_owner_created ON jobs (owner, created_at) WHERE owner IS NOT NULL;

-- Fair sharing between keys (stride scheduling): each owner's virtual time advances by 1/weight per job
-- claimed, and claims take the queued owner furthest behind. '' stands for jobs without a key.
CREATE TABLE fair_share (
    owner TEXT NOT NULL PRIMARY KEY,
    pass  REAL NOT NULL
) STRICT;

-- Submission rate per key: a token bucket of `rate_per_minute` tokens refilled continuously.
CREATE TABLE rate_buckets (
    owner      TEXT    NOT NULL PRIMARY KEY,
    tokens     REAL    NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

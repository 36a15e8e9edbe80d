-- Batch keys for jobs that may share denoiser calls: see migrations/sqlite/0009_batch_key.sql.
ALTER TABLE jobs ADD COLUMN batch_key TEXT COLLATE "C";
CREATE INDEX jobs_queued_batch_key ON jobs (batch_key) WHERE status = 'queued' AND batch_key IS NOT NULL;

-- Jobs that may share denoiser calls (text to image for the same model, picture size, steps, scheduler and
-- guidance on or off) have the same batch key; a worker that claims one claims more of the same key with it.
ALTER TABLE jobs ADD COLUMN batch_key TEXT;
CREATE INDEX jobs_queued_batch_key ON jobs (batch_key) WHERE status = 'queued' AND batch_key IS NOT NULL;

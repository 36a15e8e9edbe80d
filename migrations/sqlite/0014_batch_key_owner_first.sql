-- Cohort companions are claimed owner first too (see 0012): queued jobs of one batch key in claim order, so
-- the top priority, the owners waiting at it and each owner's oldest job are index seeks. Before, every
-- companion claim sorted all queued jobs of its key while holding the write connection (a queue of 40,000
-- jobs of one key made the slowest submissions wait 45 ms).
DROP INDEX jobs_queued_batch_key;
CREATE INDEX jobs_queued_batch_key ON jobs (batch_key, priority DESC, owner, created_at, id)
    WHERE status = 'queued' AND batch_key IS NOT NULL;

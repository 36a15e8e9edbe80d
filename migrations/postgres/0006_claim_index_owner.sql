-- The claim index with the owner in it: see migrations/sqlite/0011_claim_index_owner.sql.
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs (status, priority DESC, created_at, id, owner);

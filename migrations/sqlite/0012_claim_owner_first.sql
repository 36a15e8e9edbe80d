-- A SQLite claim picks the owner first: the owners with queued jobs at the top priority are walked through
-- this index (a skip scan, one seek per owner), each owner's oldest job is one more seek, and the owner whose
-- fair-share turn it is wins. No claim sorts the queue any more, so its cost follows the number of owners
-- waiting, not the number of jobs (measured in the README's "Performance" section). The order of jobs is the
-- one PostgreSQL's claim reads (priority, pass, age), which keeps using its own statement.
DROP INDEX jobs_claim;
CREATE INDEX jobs_claim ON jobs (status, priority DESC, owner, created_at, id);

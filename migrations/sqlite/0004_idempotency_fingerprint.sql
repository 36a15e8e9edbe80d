-- What an Idempotency-Key was first used for (a digest of the route and the request), so that the same key
-- sent with a different request is refused instead of answered with the first job. NULL: not recorded
-- (rows written before this column existed), any replay is accepted.
ALTER TABLE jobs ADD COLUMN idempotency_fingerprint TEXT;

-- Per key (jobs.owner): jobs queued or running, and bytes stored (uploads and images), kept by triggers, so
-- that a keyed submission checks `limits.max_outstanding_per_key` and `limits.max_stored_bytes_per_key`, and
-- `GET /v1/usage` answers, by reading one row instead of summing every job the key ever made (which grew with
-- the key's history: 683 submissions/s at tens of thousands of jobs).
-- Images are only ever removed with their job (ON DELETE CASCADE): their bytes are taken off when the job is
-- deleted, counted before the row goes.
CREATE TABLE owner_totals (
    owner        TEXT    NOT NULL PRIMARY KEY,
    outstanding  INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL
) STRICT;

INSERT INTO owner_totals (owner, outstanding, stored_bytes)
    SELECT j.owner,
           SUM(j.status IN ('queued', 'running')),
           SUM(j.input_bytes) + COALESCE((SELECT SUM(i.bytes) FROM images i JOIN jobs k ON k.id = i.job_id
                                          WHERE k.owner = j.owner), 0)
    FROM jobs j WHERE j.owner IS NOT NULL GROUP BY j.owner;

CREATE TRIGGER jobs_owner_totals_insert AFTER INSERT ON jobs WHEN NEW.owner IS NOT NULL
BEGIN
    INSERT INTO owner_totals (owner, outstanding, stored_bytes)
        VALUES (NEW.owner, NEW.status IN ('queued', 'running'), NEW.input_bytes)
        ON CONFLICT (owner) DO UPDATE SET outstanding = outstanding + excluded.outstanding,
                                          stored_bytes = stored_bytes + excluded.stored_bytes;
END;

CREATE TRIGGER jobs_owner_totals_status AFTER UPDATE OF status ON jobs
    WHEN NEW.owner IS NOT NULL AND (OLD.status IN ('queued', 'running')) <> (NEW.status IN ('queued', 'running'))
BEGIN
    UPDATE owner_totals
        SET outstanding = outstanding + (NEW.status IN ('queued', 'running')) - (OLD.status IN ('queued', 'running'))
        WHERE owner = NEW.owner;
END;

CREATE TRIGGER jobs_owner_totals_delete BEFORE DELETE ON jobs WHEN OLD.owner IS NOT NULL
BEGIN
    UPDATE owner_totals
        SET outstanding = outstanding - (OLD.status IN ('queued', 'running')),
            stored_bytes = stored_bytes - OLD.input_bytes
                           - COALESCE((SELECT SUM(bytes) FROM images WHERE job_id = OLD.id), 0)
        WHERE owner = OLD.owner;
END;

CREATE TRIGGER images_owner_totals_insert AFTER INSERT ON images
BEGIN
    UPDATE owner_totals SET stored_bytes = stored_bytes + NEW.bytes
        WHERE owner = (SELECT owner FROM jobs WHERE id = NEW.job_id);
END;

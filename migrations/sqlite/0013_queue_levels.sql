-- Queued jobs per priority, kept by triggers on every change to `jobs`, so that counting the queue (each
-- group of submissions checks `queue.max_queued`) and a new job's queue position read a few rows instead of
-- scanning every queued job: the cost of a submission no longer grows with the depth of the queue.
CREATE TABLE queue_levels (
    priority INTEGER NOT NULL PRIMARY KEY,
    queued   INTEGER NOT NULL CHECK (queued >= 0)
) STRICT;

INSERT INTO queue_levels (priority, queued)
    SELECT priority, COUNT(*) FROM jobs WHERE status = 'queued' GROUP BY priority;

CREATE TRIGGER jobs_queue_levels_insert AFTER INSERT ON jobs WHEN NEW.status = 'queued'
BEGIN
    INSERT INTO queue_levels (priority, queued) VALUES (NEW.priority, 1)
        ON CONFLICT (priority) DO UPDATE SET queued = queued + 1;
END;

CREATE TRIGGER jobs_queue_levels_update AFTER UPDATE OF status, priority ON jobs
    WHEN OLD.status = 'queued' OR NEW.status = 'queued'
BEGIN
    UPDATE queue_levels SET queued = queued - 1 WHERE OLD.status = 'queued' AND priority = OLD.priority;
    INSERT INTO queue_levels (priority, queued) SELECT NEW.priority, 1 WHERE NEW.status = 'queued'
        ON CONFLICT (priority) DO UPDATE SET queued = queued + 1;
END;

CREATE TRIGGER jobs_queue_levels_delete AFTER DELETE ON jobs WHEN OLD.status = 'queued'
BEGIN
    UPDATE queue_levels SET queued = queued - 1 WHERE priority = OLD.priority;
END;

-- Tree-Ring watermarks per API key: see migrations/sqlite/0010_watermarks.sql.
ALTER TABLE api_keys ADD COLUMN watermark_secret TEXT;
ALTER TABLE api_keys ADD COLUMN watermark_on BIGINT NOT NULL DEFAULT 0 CHECK (watermark_on IN (0, 1));

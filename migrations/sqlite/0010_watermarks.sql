-- Tree-Ring watermarks per API key (src/engine/watermark/): the secret its ring pattern is derived from, made
-- by `denoised keys create --watermark` or `keys update --watermark on`, and whether its text-to-image jobs
-- are watermarked unless they say otherwise. `keys update --watermark off` clears only the flag, so pictures
-- made before stay detectable.
ALTER TABLE api_keys ADD COLUMN watermark_secret TEXT;
ALTER TABLE api_keys ADD COLUMN watermark_on INTEGER NOT NULL DEFAULT 0 CHECK (watermark_on IN (0, 1));

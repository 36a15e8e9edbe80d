-- Bytes a job keeps in files beside its row (an edit's pictures, client latents), counted with its images
-- toward its key's storage quota.
ALTER TABLE jobs ADD COLUMN input_bytes INTEGER NOT NULL DEFAULT 0;

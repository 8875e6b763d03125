-- The SHA-256 of the binary a runner runs, so an upgrade between two builds of
-- one version can be confirmed.
ALTER TABLE runners ADD COLUMN binary_sha256 TEXT;

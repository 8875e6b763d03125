-- One-time tokens that let a runner import a box's archive (a move now, a
-- restore from a backup later). Only the token's SHA-256 is stored: the
-- runner learns it from its healthcheck answer, the import request presents
-- the token itself. One live token per box and runner; a new announcement
-- replaces the old one.
CREATE TABLE box_imports (
    box_id TEXT NOT NULL REFERENCES boxes (id) ON DELETE CASCADE,
    runner_id TEXT NOT NULL REFERENCES runners (id),
    token_sha256 TEXT NOT NULL,
    purpose TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (box_id, runner_id)
);
CREATE INDEX box_imports_runner ON box_imports (runner_id, expires_at);

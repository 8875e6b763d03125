-- BoxLite control plane schema, portable between PostgreSQL and SQLite:
-- ids are UUID text, times are BIGINT milliseconds since the epoch, JSON is TEXT,
-- flags are BIGINT 0/1 (sqlx's Any driver cannot read SQLite booleans).

CREATE TABLE organizations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_admin BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL
);
-- At most one operators' organization.
CREATE UNIQUE INDEX organizations_one_admin ON organizations (is_admin) WHERE is_admin = 1;

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    subject TEXT NOT NULL UNIQUE,
    email TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX users_organization ON users (organization_id);

CREATE TABLE api_keys (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    name TEXT NOT NULL,
    prefix TEXT NOT NULL,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_organization ON api_keys (organization_id);

CREATE TABLE runners (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token_sha256 TEXT NOT NULL UNIQUE,
    -- Key the control plane presents to this runner's API (it must send it, so
    -- it cannot be a hash).
    api_key TEXT NOT NULL,
    draining BIGINT NOT NULL DEFAULT 0,
    decommissioned_at BIGINT,
    version TEXT,
    address TEXT,
    capacity_cpu BIGINT NOT NULL DEFAULT 0,
    capacity_memory BIGINT NOT NULL DEFAULT 0,
    capacity_disk BIGINT NOT NULL DEFAULT 0,
    usage_cpu BIGINT NOT NULL DEFAULT 0,
    usage_memory BIGINT NOT NULL DEFAULT 0,
    usage_disk BIGINT NOT NULL DEFAULT 0,
    -- Sums of the limits of the live boxes pinned here (placement counts these).
    alloc_cpu BIGINT NOT NULL DEFAULT 0,
    alloc_memory BIGINT NOT NULL DEFAULT 0,
    alloc_disk BIGINT NOT NULL DEFAULT 0,
    alloc_boxes BIGINT NOT NULL DEFAULT 0,
    last_seen_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE boxes (
    id TEXT PRIMARY KEY,
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    runner_id TEXT NOT NULL REFERENCES runners (id),
    -- Target runner while a move copies the box there.
    migrate_to TEXT REFERENCES runners (id),
    image TEXT NOT NULL,
    cpu BIGINT NOT NULL,
    memory BIGINT NOT NULL,
    disk BIGINT NOT NULL,
    env TEXT NOT NULL,
    labels TEXT NOT NULL,
    network BIGINT NOT NULL,
    state TEXT NOT NULL,
    desired_state TEXT NOT NULL,
    error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    deleted_at BIGINT
);
CREATE INDEX boxes_organization ON boxes (organization_id, id);
-- The default listing (live boxes of an organization, by id) reads this in order.
CREATE INDEX boxes_organization_live ON boxes (organization_id, id) WHERE deleted_at IS NULL;
CREATE INDEX boxes_runner_live ON boxes (runner_id) WHERE deleted_at IS NULL;
CREATE INDEX boxes_migrate_to ON boxes (migrate_to) WHERE migrate_to IS NOT NULL;

CREATE TABLE box_labels (
    box_id TEXT NOT NULL REFERENCES boxes (id) ON DELETE CASCADE,
    label_key TEXT NOT NULL,
    label_value TEXT NOT NULL,
    PRIMARY KEY (box_id, label_key)
);
-- Label filters read the matching box ids in id order (merge with the listing order).
CREATE INDEX box_labels_key_value ON box_labels (label_key, label_value, box_id);

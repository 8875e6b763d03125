-- Concurrent one-shot execs per organization, counted in the database so the
-- limit holds across control plane replicas. Slot numbers run from 0 to the
-- configured limit; a slot is taken while `holder` is set and `expires_at`
-- (milliseconds) is ahead. The replica running the exec renews its lease, so
-- the slots of a replica that died free themselves.
CREATE TABLE exec_slots (
    organization_id TEXT NOT NULL REFERENCES organizations (id),
    slot BIGINT NOT NULL,
    holder TEXT,
    expires_at BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (organization_id, slot)
);

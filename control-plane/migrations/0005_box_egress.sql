-- A box's egress allow-list: private destinations (CIDR blocks, a JSON
-- array) an `egress` box may reach within the stage's allow-list. The
-- `network` column keeps its meaning: 0 = none (loopback only), 1 = egress.
ALTER TABLE boxes ADD COLUMN egress_allow TEXT NOT NULL DEFAULT '[]';

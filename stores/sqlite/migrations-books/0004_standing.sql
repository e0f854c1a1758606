-- A node's standing as a storer: a beta reputation per track (audits,
-- answers in time, uptime), audit counts, measured speed, and whether it
-- may get new data. New nodes start from the prior: alpha 1, beta 0.
ALTER TABLE nodes ADD COLUMN audit_alpha REAL NOT NULL DEFAULT 1.0;
ALTER TABLE nodes ADD COLUMN audit_beta REAL NOT NULL DEFAULT 0.0;
ALTER TABLE nodes ADD COLUMN timeout_alpha REAL NOT NULL DEFAULT 1.0;
ALTER TABLE nodes ADD COLUMN timeout_beta REAL NOT NULL DEFAULT 0.0;
ALTER TABLE nodes ADD COLUMN uptime_alpha REAL NOT NULL DEFAULT 1.0;
ALTER TABLE nodes ADD COLUMN uptime_beta REAL NOT NULL DEFAULT 0.0;
ALTER TABLE nodes ADD COLUMN passed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN timed_out INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN speed_bps INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN speed_at_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN excluded_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN held_back INTEGER NOT NULL DEFAULT 0;

-- When an audit proved a replica is not held (0: not lost).
ALTER TABLE replicas ADD COLUMN lost_ms INTEGER NOT NULL DEFAULT 0;

-- A node's standing as a storer: a beta reputation per track (audits,
-- answers in time, uptime), audit counts, measured speed, and whether it
-- may get new data. New nodes start from the prior: alpha 1, beta 0.
ALTER TABLE nodes
    ADD COLUMN audit_alpha   DOUBLE PRECISION NOT NULL DEFAULT 1,
    ADD COLUMN audit_beta    DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN timeout_alpha DOUBLE PRECISION NOT NULL DEFAULT 1,
    ADD COLUMN timeout_beta  DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN uptime_alpha  DOUBLE PRECISION NOT NULL DEFAULT 1,
    ADD COLUMN uptime_beta   DOUBLE PRECISION NOT NULL DEFAULT 0,
    ADD COLUMN passed        BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN failed        BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN timed_out     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN speed_bps     BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN speed_at_ms   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN excluded_ms   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN held_back     BOOLEAN NOT NULL DEFAULT FALSE;

-- When an audit proved a replica is not held (0: not lost).
ALTER TABLE replicas ADD COLUMN lost_ms BIGINT NOT NULL DEFAULT 0;

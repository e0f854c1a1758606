-- Bytes a node holds for others whose replicas passed an audit: with the
-- grant, what it may place on others (issue: a fair exchange).
ALTER TABLE nodes ADD COLUMN earned INTEGER NOT NULL DEFAULT 0;
-- When an audit of the replica first passed (0: not yet).
ALTER TABLE replicas ADD COLUMN proven_ms INTEGER NOT NULL DEFAULT 0;

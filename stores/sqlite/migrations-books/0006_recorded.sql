-- When the replica was recorded (or reported again after a loss of the
-- books): a delete the owner signed before it cannot release it.
ALTER TABLE replicas ADD COLUMN recorded_ms INTEGER NOT NULL DEFAULT 0;

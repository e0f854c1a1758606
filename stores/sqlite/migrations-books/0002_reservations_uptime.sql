-- Reservations that lapse, uptime kept as running totals, and a presence
-- log of changes only.
ALTER TABLE nodes ADD COLUMN online_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE nodes ADD COLUMN online_since_ms INTEGER NOT NULL DEFAULT 0;

CREATE TABLE reservations (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    owner      BLOB NOT NULL,
    storer     BLOB NOT NULL,
    size       INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX reservations_by_pair ON reservations(owner, storer, expires_ms);
CREATE INDEX reservations_by_expiry ON reservations(expires_ms);

-- Until now every heartbeat was logged; keep only the changes.
DELETE FROM presence WHERE rowid IN (
    SELECT p.rowid FROM presence p
    WHERE p.online = (SELECT q.online FROM presence q
                      WHERE q.node = p.node AND (q.at_ms < p.at_ms OR (q.at_ms = p.at_ms AND q.rowid < p.rowid))
                      ORDER BY q.at_ms DESC, q.rowid DESC LIMIT 1)
);

-- Manifest versions: the whole u64 range, order kept (top bit flipped).
UPDATE manifests SET version = version + (-9223372036854775807 - 1);

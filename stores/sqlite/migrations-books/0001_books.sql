-- The coordinator's books.
CREATE TABLE nodes (
    id            BLOB PRIMARY KEY NOT NULL,
    exchange_key  BLOB NOT NULL,
    offer         INTEGER NOT NULL,
    held          INTEGER NOT NULL DEFAULT 0,
    placed        INTEGER NOT NULL DEFAULT 0,
    online        INTEGER NOT NULL DEFAULT 0,
    last_seen_ms  INTEGER NOT NULL,
    registered_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE replicas (
    owner  BLOB NOT NULL,
    pack   BLOB NOT NULL,
    storer BLOB NOT NULL,
    size   INTEGER NOT NULL,
    root   BLOB NOT NULL,
    PRIMARY KEY (owner, pack, storer)
) WITHOUT ROWID;
CREATE INDEX replicas_by_storer ON replicas(storer);

CREATE TABLE manifests (
    node    BLOB PRIMARY KEY NOT NULL,
    version INTEGER NOT NULL,
    blob    BLOB NOT NULL
) WITHOUT ROWID;

-- Presence changes, for uptime windows.
CREATE TABLE presence (
    node   BLOB NOT NULL,
    at_ms  INTEGER NOT NULL,
    online INTEGER NOT NULL
);
CREATE INDEX presence_by_node ON presence(node, at_ms);

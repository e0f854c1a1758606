-- The node's catalog: a cache of what the packs say.
CREATE TABLE packs (
    id   BLOB PRIMARY KEY NOT NULL,
    size INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE blobs (
    kind       INTEGER NOT NULL,
    id         BLOB NOT NULL,
    pack       BLOB NOT NULL REFERENCES packs(id) ON DELETE CASCADE,
    offset     INTEGER NOT NULL,
    length     INTEGER NOT NULL,
    raw_length INTEGER NOT NULL,
    PRIMARY KEY (kind, id, pack)
) WITHOUT ROWID;
CREATE INDEX blobs_by_pack ON blobs(pack);

CREATE TABLE snapshots (
    id      BLOB PRIMARY KEY NOT NULL,
    time_ns INTEGER NOT NULL,
    host    TEXT NOT NULL,
    paths   TEXT NOT NULL,
    tags    TEXT NOT NULL,
    parent  BLOB,
    tree    BLOB NOT NULL
) WITHOUT ROWID;

CREATE TABLE kv (
    key   TEXT PRIMARY KEY NOT NULL,
    value BLOB NOT NULL
) WITHOUT ROWID;

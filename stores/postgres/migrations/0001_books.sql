-- The coordinator's books.
CREATE TABLE nodes (
    id              BYTEA PRIMARY KEY,
    exchange_key    BYTEA NOT NULL,
    offer           BIGINT NOT NULL,
    held            BIGINT NOT NULL DEFAULT 0,
    placed          BIGINT NOT NULL DEFAULT 0,
    online          BOOLEAN NOT NULL DEFAULT FALSE,
    last_seen_ms    BIGINT NOT NULL,
    registered_ms   BIGINT NOT NULL,
    online_ms       BIGINT NOT NULL DEFAULT 0,
    online_since_ms BIGINT NOT NULL DEFAULT 0,
    CHECK (held >= 0 AND placed >= 0)
);

-- Space promised by a match until a deadline; a recorded replica uses one up.
CREATE TABLE reservations (
    id         BIGSERIAL PRIMARY KEY,
    owner      BYTEA NOT NULL,
    storer     BYTEA NOT NULL,
    size       BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL
);
CREATE INDEX reservations_by_pair ON reservations (owner, storer, expires_ms);
CREATE INDEX reservations_by_expiry ON reservations (expires_ms);

CREATE TABLE replicas (
    owner  BYTEA NOT NULL,
    pack   BYTEA NOT NULL,
    storer BYTEA NOT NULL,
    size   BIGINT NOT NULL,
    root   BYTEA NOT NULL,
    PRIMARY KEY (owner, pack, storer)
);
CREATE INDEX replicas_by_storer ON replicas (storer);

-- version holds the u64 with its top bit flipped, so BIGINT order is u64 order.
CREATE TABLE manifests (
    node    BYTEA PRIMARY KEY,
    version BIGINT NOT NULL,
    blob    BYTEA NOT NULL
);

-- Presence changes (not heartbeats), for uptime windows.
CREATE TABLE presence (
    seq    BIGSERIAL PRIMARY KEY,
    node   BYTEA NOT NULL,
    at_ms  BIGINT NOT NULL,
    online BOOLEAN NOT NULL
);
CREATE INDEX presence_by_node ON presence (node, at_ms, seq);

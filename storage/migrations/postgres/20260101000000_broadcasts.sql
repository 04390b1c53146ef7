-- Broadcasts: the same tables and meaning as migrations/sqlite.
CREATE TABLE broadcasts (
    app           TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    broadcast_id  BYTEA  NOT NULL,
    payload       BYTEA  NOT NULL,
    required_tags TEXT   NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (app, seq)
);

CREATE INDEX broadcasts_by_id ON broadcasts (broadcast_id);
CREATE INDEX broadcasts_by_expires_at_ms ON broadcasts (expires_at_ms);

CREATE TABLE broadcast_heads (
    app      TEXT   NOT NULL PRIMARY KEY,
    last_seq BIGINT NOT NULL
);

-- Broadcasts: the same tables and meaning as migrations/sqlite.
CREATE TABLE broadcasts (
    app           VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    seq           BIGINT      NOT NULL,
    broadcast_id  BINARY(16)  NOT NULL,
    payload       MEDIUMBLOB  NOT NULL,
    required_tags TEXT        NOT NULL,
    created_at_ms BIGINT      NOT NULL,
    expires_at_ms BIGINT      NOT NULL,
    PRIMARY KEY (app, seq),
    KEY broadcasts_by_id (broadcast_id),
    KEY broadcasts_by_expires_at_ms (expires_at_ms)
) ENGINE = InnoDB;

CREATE TABLE broadcast_heads (
    app      VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    last_seq BIGINT      NOT NULL
) ENGINE = InnoDB;

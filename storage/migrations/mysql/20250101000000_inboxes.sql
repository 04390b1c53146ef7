-- Herald's inbox schema for MySQL 8 / MariaDB 10.6 and later: the same
-- tables, keys and meaning as migrations/sqlite. Every u64 (sequence, unix
-- milliseconds) is a signed BIGINT; the values fit. Ids compare byte for
-- byte (utf8mb4_bin): "Alice" and "alice" are two users, as on SQLite.

CREATE TABLE messages (
    app           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    user_id       VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    seq           BIGINT       NOT NULL,
    message_id    BINARY(16)   NOT NULL,
    payload       MEDIUMBLOB   NOT NULL,
    created_at_ms BIGINT       NOT NULL,
    expires_at_ms BIGINT       NOT NULL,
    PRIMARY KEY (app, user_id, seq),
    KEY messages_by_expires_at_ms (expires_at_ms)
) ENGINE = InnoDB;

-- The last sequence handed out per inbox; never reused after a purge. Its
-- row lock is what orders concurrent stores to one user across nodes.
CREATE TABLE inbox_heads (
    app      VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    user_id  VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    last_seq BIGINT       NOT NULL,
    PRIMARY KEY (app, user_id)
) ENGINE = InnoDB;

CREATE TABLE device_cursors (
    app           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    user_id       VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    device_id     VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    acked_seq     BIGINT       NOT NULL,
    updated_at_ms BIGINT       NOT NULL,
    PRIMARY KEY (app, user_id, device_id)
) ENGINE = InnoDB;

CREATE TABLE idempotency_keys (
    app           VARCHAR(64)  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    idem_key      VARCHAR(128) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    results       LONGTEXT     NOT NULL,
    expires_at_ms BIGINT       NOT NULL,
    PRIMARY KEY (app, idem_key),
    KEY idempotency_keys_by_expires_at_ms (expires_at_ms)
) ENGINE = InnoDB;

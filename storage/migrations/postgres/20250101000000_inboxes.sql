-- Herald's inbox schema for PostgreSQL: the same tables, keys and meaning
-- as migrations/sqlite. Every u64 (sequence, unix milliseconds) is a signed
-- BIGINT; the values fit.

CREATE TABLE messages (
    app           TEXT   NOT NULL,
    user_id       TEXT   NOT NULL,
    seq           BIGINT NOT NULL,
    message_id    BYTEA  NOT NULL,
    payload       BYTEA  NOT NULL,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (app, user_id, seq)
);

CREATE INDEX messages_by_expires_at_ms ON messages (expires_at_ms);

-- The last sequence handed out per inbox; never reused after a purge. Its
-- row lock is what orders concurrent stores to one user across nodes.
CREATE TABLE inbox_heads (
    app      TEXT   NOT NULL,
    user_id  TEXT   NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (app, user_id)
);

CREATE TABLE device_cursors (
    app           TEXT   NOT NULL,
    user_id       TEXT   NOT NULL,
    device_id     TEXT   NOT NULL,
    acked_seq     BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (app, user_id, device_id)
);

CREATE TABLE idempotency_keys (
    app           TEXT   NOT NULL,
    idem_key      TEXT   NOT NULL,
    results       TEXT   NOT NULL,
    expires_at_ms BIGINT NOT NULL,
    PRIMARY KEY (app, idem_key)
);

CREATE INDEX idempotency_keys_by_expires_at_ms ON idempotency_keys (expires_at_ms);

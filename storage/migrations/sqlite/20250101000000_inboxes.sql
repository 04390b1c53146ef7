-- Herald's inbox schema for SQLite. Every u64 (sequence, unix milliseconds)
-- is stored as a signed 64-bit INTEGER; the values fit. STRICT makes SQLite
-- refuse a value of the wrong type instead of silently storing it.

-- One row per message per recipient. A multicast stores one row per user,
-- all with the same message_id (one logical message).
CREATE TABLE messages (
    app           TEXT    NOT NULL,
    user_id       TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    message_id    BLOB    NOT NULL,
    payload       BLOB    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, user_id, seq)
) STRICT;

-- purge_expired walks messages by expiry.
CREATE INDEX messages_by_expires_at_ms ON messages (expires_at_ms);

-- The last sequence handed out per inbox. Kept apart from messages so a
-- sequence is never reused after its messages are purged.
CREATE TABLE inbox_heads (
    app      TEXT    NOT NULL,
    user_id  TEXT    NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (app, user_id)
) STRICT;

-- The highest sequence each device has acked; it only ever rises.
CREATE TABLE device_cursors (
    app           TEXT    NOT NULL,
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    acked_seq     INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, user_id, device_id)
) STRICT;

-- The outcome of a store() that carried an idempotency key, as JSON, so a
-- retry within the key's TTL gets the first answer instead of a duplicate.
CREATE TABLE idempotency_keys (
    app           TEXT    NOT NULL,
    idem_key      TEXT    NOT NULL,
    results       TEXT    NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, idem_key)
) STRICT;

CREATE INDEX idempotency_keys_by_expires_at_ms ON idempotency_keys (expires_at_ms);

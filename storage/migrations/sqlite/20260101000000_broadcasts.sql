-- Broadcasts: stored once per app, not once per user. `seq` is the app's
-- broadcast sequence; `required_tags` a JSON array of the tags a client
-- must carry to get it (empty: everyone).
CREATE TABLE broadcasts (
    app           TEXT    NOT NULL,
    seq           INTEGER NOT NULL,
    broadcast_id  BLOB    NOT NULL,
    payload       BLOB    NOT NULL,
    required_tags TEXT    NOT NULL,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (app, seq)
) STRICT;

CREATE INDEX broadcasts_by_id ON broadcasts (broadcast_id);
CREATE INDEX broadcasts_by_expires_at_ms ON broadcasts (expires_at_ms);

-- The last broadcast sequence handed out per app; never reused.
CREATE TABLE broadcast_heads (
    app      TEXT    NOT NULL PRIMARY KEY,
    last_seq INTEGER NOT NULL
) STRICT;

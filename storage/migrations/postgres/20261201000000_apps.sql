-- Apps: the same table and meaning as migrations/sqlite.
CREATE TABLE apps (
    id            TEXT   NOT NULL PRIMARY KEY,
    settings      TEXT   NOT NULL,
    secrets       TEXT   NOT NULL,
    version       BIGINT NOT NULL,
    deleted_at_ms BIGINT NOT NULL
);

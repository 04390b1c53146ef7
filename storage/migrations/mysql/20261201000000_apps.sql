-- Apps: the same table and meaning as migrations/sqlite.
CREATE TABLE apps (
    id            VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL PRIMARY KEY,
    settings      MEDIUMTEXT  NOT NULL,
    secrets       TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    deleted_at_ms BIGINT      NOT NULL
) ENGINE = InnoDB;

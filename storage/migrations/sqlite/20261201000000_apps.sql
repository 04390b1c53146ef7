-- Apps, as the admin API and the config file create them. Storage reads
-- none of `settings` and `secrets`: they are JSON the control plane owns.
-- `version` rises with every change (a writer changes only the version it
-- read, so two nodes' changes never silently overwrite each other);
-- `deleted_at_ms` marks an app whose rows are being deleted (0: live).
CREATE TABLE apps (
    id            TEXT    NOT NULL PRIMARY KEY,
    settings      TEXT    NOT NULL,
    secrets       TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    deleted_at_ms INTEGER NOT NULL
) STRICT;

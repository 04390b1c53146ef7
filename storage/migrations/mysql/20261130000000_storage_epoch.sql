-- This database's epoch: a random number written once, when the first
-- node opens a new database. Clients keep it with their resume points;
-- a database created anew (wiped) has another, so they know its
-- sequences start over.
CREATE TABLE storage_epoch (
    id    TINYINT NOT NULL PRIMARY KEY,
    epoch BIGINT  NOT NULL
);

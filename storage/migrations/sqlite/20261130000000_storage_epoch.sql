-- This database's epoch: a random number written once, when the first
-- node opens a new database. Clients keep it with their resume points;
-- a database created anew (wiped) has another, so they know its
-- sequences start over.
CREATE TABLE storage_epoch (
    id    INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    epoch INTEGER NOT NULL
) STRICT;

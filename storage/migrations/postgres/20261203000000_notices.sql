-- A message pushed with "delivery": "notify" keeps what its NOTIFY says
-- besides the size: 4 bytes of pull_spread_ms (big-endian), then the hint
-- as UTF-8. NULL for a message pushed whole.
ALTER TABLE messages ADD COLUMN notice BYTEA;

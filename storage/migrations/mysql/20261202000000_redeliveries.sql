-- Where a device's last fills on bind started (the seq they read after)
-- and how many binds in a row started there: a device that never acks
-- gets the same message on every bind, and past delivery.redeliveries_max
-- the server parks that message for it (moves its cursor past it).
ALTER TABLE device_cursors ADD COLUMN redelivery_after BIGINT NOT NULL DEFAULT 0;
ALTER TABLE device_cursors ADD COLUMN redeliveries BIGINT NOT NULL DEFAULT 0;

-- The sequence numbers that must never go back, kept where a Redis that
-- loses its data cannot take them: the highest heartbeat seq accepted from
-- each device and the highest kill-switch command seq issued to it. Written
-- behind (about once a second); see src/sequences.rs for the bound.
ALTER TABLE devices ADD COLUMN heartbeat_seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE devices ADD COLUMN command_seq BIGINT NOT NULL DEFAULT 0;

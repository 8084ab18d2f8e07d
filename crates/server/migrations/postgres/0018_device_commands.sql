-- 0018 what the kill-switch protocol needs beyond the command counter,
-- kept where a Redis that loses its data cannot take it: each device's
-- recent commands (the newest 100, as the shared history keeps) and the
-- position its phone acked up to. A phone that reconnects after such a
-- loss still receives the commands it never acked — and not the ones it
-- did, which replaying from seq 0 would resend. Commands are written
-- through; acked positions behind, about once a second (src/sequences.rs).
ALTER TABLE devices ADD COLUMN command_acked_seq BIGINT NOT NULL DEFAULT 0;
CREATE TABLE device_commands (
    device_id TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    seq       BIGINT NOT NULL,
    command   TEXT NOT NULL,
    issued_at BIGINT NOT NULL,
    PRIMARY KEY (device_id, seq)
);

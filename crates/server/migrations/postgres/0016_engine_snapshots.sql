-- Snapshots of each device's engine state (baselines, evidence, recent
-- seqs), kept where a Redis that loses its data cannot take them: without
-- them a lost state relearns the device from scratch, as a new device
-- would, which is what a remote-control session wants. Written behind, at
-- most one per device a minute; see src/signals/snapshots.rs for the bound.
CREATE TABLE engine_snapshots (
    device_id TEXT PRIMARY KEY REFERENCES devices (id) ON DELETE CASCADE,
    state     BYTEA NOT NULL,
    saved_at  BIGINT NOT NULL  -- when the state was taken (Unix ms); only a newer one replaces it
);

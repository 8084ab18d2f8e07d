-- 0010 refresh reuse interval: a spent refresh token keeps, sealed under a
-- key only its presenter can derive, the pair its rotation issued — so the
-- same client retrying within BLOCKREMOTE_REFRESH_REUSE_INTERVAL_SECONDS gets
-- that pair again instead of tripping reuse detection. Cleared when the
-- successor is itself rotated (src/auth/sessions.rs).
ALTER TABLE refresh_tokens ADD COLUMN successor_sealed BYTEA;

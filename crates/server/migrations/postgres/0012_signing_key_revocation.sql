-- 0012 `blockremote keys revoke`: a revoked key neither signs nor verifies,
-- at once, whatever its tokens' expiry (retired keys keep verifying until
-- their tokens expire). Private keys and server secrets are now stored
-- sealed under the key-encryption key in their existing BLOB columns (the
-- envelope is told apart from plaintext by its header; see auth/kek.rs).
ALTER TABLE signing_keys ADD COLUMN revoked_at TIMESTAMPTZ;

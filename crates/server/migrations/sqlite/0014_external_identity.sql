-- 0014 External identity (src/store/identity.rs): a bank maps its own
-- customers to BlockRemote users by an opaque `external_id` and never gives
-- BlockRemote a password. Such users may have no email and have no
-- password: both are stored as '' (no row can sign in with an empty
-- password hash, and the email index now skips ''), so the columns keep
-- their NOT NULL on both backends.
ALTER TABLE users ADD COLUMN external_id TEXT
    CHECK (external_id IS NULL OR length(external_id) BETWEEN 1 AND 128);
CREATE UNIQUE INDEX users_external_id_key ON users (external_id) WHERE external_id IS NOT NULL;
DROP INDEX users_email_key;
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE email <> '';

-- 0004 identity: signing keys, server secrets, admin API keys (SQLite).

-- JWT signing keys. Every replica reads this table, so a rotation made by
-- `blockremote keys rotate` reaches all of them. `private_der` is NULL for a
-- key whose private half is held outside the database (a PEM from a vault).
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    alg         TEXT NOT NULL CHECK (alg IN ('ES256', 'RS256')),
    private_der BLOB,
    public_jwk  TEXT NOT NULL,
    created_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    -- When the key stopped signing; it still verifies until tokens it signed expire.
    retired_at  TEXT
);

-- Server-side secrets generated once and shared by every replica
-- (for example the key of the IP HMAC).
CREATE TABLE server_secrets (
    name       TEXT PRIMARY KEY,
    value      BLOB NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Admin API keys: only the SHA-256 of a 256-bit random key is stored.
CREATE TABLE admin_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    key_sha256 BLOB NOT NULL UNIQUE,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    revoked_at TEXT
);

-- Refresh families are looked up by device on every sign-in.
CREATE INDEX refresh_families_device_status_idx ON refresh_families (device_id, status);

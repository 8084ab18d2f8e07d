-- 0001 base schema (SQLite).
--
-- Conventions: ids are hyphenated UUID text (v7, time-ordered) unless the client
-- chooses them (device ids); timestamps are fixed-width RFC 3339 UTC text
-- (`YYYY-MM-DDTHH:MM:SS.ffffffZ`, written by the application) so that they sort
-- lexically; JSON is TEXT; enumerations are TEXT with a
-- CHECK so a new value is one migration, not a type rewrite; no full IP address
-- is ever stored (ip_prefix is the /24 or /48, ip_hmac a keyed HMAC).

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    email         TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    status        TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'blocked')),
    created_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
-- Emails are compared case-insensitively; the application stores them lower-cased.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

CREATE TABLE devices (
    id                 TEXT PRIMARY KEY CHECK (length(id) BETWEEN 8 AND 64),
    user_id            TEXT NOT NULL REFERENCES users (id),
    fingerprint_sha256 BLOB NOT NULL,
    platform           TEXT NOT NULL CHECK (platform IN ('android', 'ios')),
    status             TEXT NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'revoked', 'quarantined', 'locked')),
    attestation_state  TEXT NOT NULL DEFAULT 'unknown'
                       CHECK (attestation_state IN ('unknown', 'verified', 'failed')),
    attestation_failures INTEGER NOT NULL DEFAULT 0,
    created_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_seen_at       TEXT
);
CREATE INDEX devices_user_id_idx ON devices (user_id, created_at);

-- One refresh family per device session; every rotation adds a token to it.
CREATE TABLE refresh_families (
    id                 TEXT PRIMARY KEY,
    user_id            TEXT NOT NULL REFERENCES users (id),
    device_id          TEXT NOT NULL REFERENCES devices (id),
    fingerprint_sha256 BLOB NOT NULL,
    status             TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    revoke_reason      TEXT,
    created_at         TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    revoked_at         TEXT
);
CREATE INDEX refresh_families_device_idx ON refresh_families (device_id, created_at);

-- Only the SHA-256 of a refresh token is stored.
CREATE TABLE refresh_tokens (
    token_sha256 BLOB PRIMARY KEY,
    family_id    TEXT NOT NULL REFERENCES refresh_families (id),
    jti          TEXT NOT NULL,
    issued_at    TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    used_at      TEXT
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id, issued_at);

CREATE TABLE business_events (
    id         TEXT PRIMARY KEY,
    type       TEXT NOT NULL,
    user_id    TEXT,
    device_id  TEXT,
    ip_prefix  TEXT,
    ip_hmac    TEXT,
    metadata   TEXT NOT NULL DEFAULT '{}',
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX business_events_type_idx ON business_events (type, created_at);
CREATE INDEX business_events_user_idx ON business_events (user_id, created_at);
CREATE INDEX business_events_device_idx ON business_events (device_id, created_at);
CREATE INDEX business_events_ip_hmac_idx ON business_events (ip_hmac, created_at);
CREATE INDEX business_events_ip_prefix_idx ON business_events (ip_prefix, created_at);

CREATE TABLE firewall_rules (
    name             TEXT PRIMARY KEY,
    event_type       TEXT NOT NULL,
    scope            TEXT NOT NULL CHECK (scope IN ('ip', 'ip_prefix', 'user', 'device')),
    threshold        INTEGER NOT NULL CHECK (threshold > 0),
    window_seconds   INTEGER NOT NULL CHECK (window_seconds > 0),
    lookback_seconds INTEGER NOT NULL CHECK (lookback_seconds >= 0),
    side_effect      TEXT NOT NULL CHECK (side_effect IN ('throttle', 'block_users', 'quarantine_devices')),
    mode             TEXT NOT NULL CHECK (mode IN ('enforce', 'simulate', 'off')),
    version          INTEGER NOT NULL DEFAULT 1,
    updated_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE firewall_decisions (
    id                  TEXT PRIMARY KEY,
    rule_name           TEXT NOT NULL,
    rule_version        INTEGER NOT NULL,
    threshold           INTEGER NOT NULL,
    window_seconds      INTEGER NOT NULL,
    mode                TEXT NOT NULL,
    scope               TEXT NOT NULL,
    scope_key           TEXT NOT NULL,
    affected_user_ids   TEXT NOT NULL DEFAULT '[]',
    affected_device_ids TEXT NOT NULL DEFAULT '[]',
    created_at          TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    undone_at           TEXT
);
CREATE INDEX firewall_decisions_created_idx ON firewall_decisions (created_at);

CREATE TABLE audit_logs (
    id                TEXT PRIMARY KEY,
    user_id           TEXT,
    device_id         TEXT,
    jti               TEXT,
    ip                TEXT,
    user_agent        TEXT,
    source            TEXT NOT NULL CHECK (source IN ('http', 'ws', 'grpc', 'worker')),
    threat_score      REAL,
    decision_reason   TEXT,
    attestation_state TEXT,
    action_taken      TEXT NOT NULL,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at);
CREATE INDEX audit_logs_device_idx ON audit_logs (device_id, created_at);
CREATE INDEX audit_logs_action_idx ON audit_logs (action_taken, created_at);
CREATE INDEX audit_logs_created_idx ON audit_logs (created_at);

-- The audit trail is append-only in the database itself: whatever the
-- application (or an operator with a SQL prompt) does, rows cannot change.
CREATE TRIGGER audit_logs_no_update BEFORE UPDATE ON audit_logs
BEGIN
    SELECT RAISE(ABORT, 'audit_logs is append-only: UPDATE refused');
END;

CREATE TRIGGER audit_logs_no_delete BEFORE DELETE ON audit_logs
BEGIN
    SELECT RAISE(ABORT, 'audit_logs is append-only: DELETE refused');
END;

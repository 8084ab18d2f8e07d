-- 0009 holds: each restriction on a device or a user is its own row
-- (src/store/holds.rs). `devices.status` and `users.status` stay as the
-- summary every request reads, recomputed whenever holds change.

CREATE TABLE holds (
    id          TEXT PRIMARY KEY,
    device_id   TEXT REFERENCES devices (id) ON DELETE CASCADE,
    user_id     TEXT REFERENCES users (id) ON DELETE CASCADE,
    source      TEXT NOT NULL
                CHECK (source IN ('admin', 'firewall', 'engine', 'refresh_reuse', 'attestation')),
    action      TEXT NOT NULL CHECK (action IN ('lock', 'quarantine', 'revoke', 'block')),
    reason      TEXT NOT NULL,
    decision_id TEXT REFERENCES firewall_decisions (id),
    created_by  TEXT,
    created_at  TEXT NOT NULL,
    CHECK ((device_id IS NULL) <> (user_id IS NULL))
);
CREATE INDEX holds_device_idx ON holds (device_id) WHERE device_id IS NOT NULL;
CREATE INDEX holds_user_idx ON holds (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX holds_decision_idx ON holds (decision_id) WHERE decision_id IS NOT NULL;

-- What was restricted before holds existed becomes an admin hold, so an
-- operator's unlock lifts it exactly as it did before. Ids are random UUIDs
-- in the hyphenated text the store uses.
INSERT INTO holds (id, device_id, source, action, reason, created_at)
SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-a'
       || substr(h, 18, 3) || '-' || substr(h, 21, 12),
       id, 'admin',
       CASE status WHEN 'locked' THEN 'lock' WHEN 'quarantined' THEN 'quarantine' ELSE 'revoke' END,
       'status_before_holds', updated_at
FROM (SELECT lower(hex(randomblob(16))) AS h, id, status, updated_at FROM devices WHERE status <> 'active');

INSERT INTO holds (id, user_id, source, action, reason, created_at)
SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-4' || substr(h, 14, 3) || '-a'
       || substr(h, 18, 3) || '-' || substr(h, 21, 12),
       id, 'admin', 'block', 'status_before_holds', updated_at
FROM (SELECT lower(hex(randomblob(16))) AS h, id, updated_at FROM users WHERE status <> 'active');

-- 0005 threat intelligence: blacklisted app hashes, domains and IPs/CIDRs.
-- Kept in the database so a restart (or the embedded default's in-process
-- state) never forgets a blacklist; every instance caches it in memory.

CREATE TABLE threat_intel (
    kind     TEXT NOT NULL CHECK (kind IN ('app_hash', 'domain', 'ip')),
    value    TEXT NOT NULL,
    reason   TEXT,
    added_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (kind, value)
);

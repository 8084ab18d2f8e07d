-- 0019 who did it and which request: an operator's action names the admin
-- key (by id: `admin:` and 8 hex digits of its hash) or `cli` (a command run
-- on a host with the database's credentials: source `cli`), and every row
-- written while serving a request carries that request's id, the
-- correlation id of its log lines. Both are hashed into the chain when set;
-- rows from before, which have neither, keep their hashes.
--
-- SQLite cannot change a CHECK in place: the table is rebuilt with every row
-- (ids, seqs and hashes unchanged), then its indexes and append-only
-- triggers are created again. Dropping the old table fires no trigger.
CREATE TABLE audit_logs_0019 (
    id                TEXT PRIMARY KEY,
    user_id           TEXT,
    device_id         TEXT,
    jti               TEXT,
    ip                TEXT,
    user_agent        TEXT,
    source            TEXT NOT NULL CHECK (source IN ('http', 'ws', 'grpc', 'worker', 'cli')),
    threat_score      REAL,
    decision_reason   TEXT,
    attestation_state TEXT,
    action_taken      TEXT NOT NULL,
    created_at        TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    seq               INTEGER,
    prev_hash         TEXT,
    row_hash          TEXT,
    actor             TEXT,
    request_id        TEXT
);
INSERT INTO audit_logs_0019 (id, user_id, device_id, jti, ip, user_agent, source, threat_score,
                             decision_reason, attestation_state, action_taken, created_at,
                             seq, prev_hash, row_hash)
    SELECT id, user_id, device_id, jti, ip, user_agent, source, threat_score,
           decision_reason, attestation_state, action_taken, created_at,
           seq, prev_hash, row_hash
    FROM audit_logs;
DROP TABLE audit_logs;
ALTER TABLE audit_logs_0019 RENAME TO audit_logs;
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at);
CREATE INDEX audit_logs_device_idx ON audit_logs (device_id, created_at);
CREATE INDEX audit_logs_action_idx ON audit_logs (action_taken, created_at);
CREATE INDEX audit_logs_created_idx ON audit_logs (created_at);
CREATE UNIQUE INDEX audit_logs_seq_idx ON audit_logs (seq);

CREATE TRIGGER audit_logs_no_update BEFORE UPDATE ON audit_logs
BEGIN
    SELECT RAISE(ABORT, 'audit_logs is append-only: UPDATE refused');
END;

CREATE TRIGGER audit_logs_no_delete BEFORE DELETE ON audit_logs
BEGIN
    SELECT RAISE(ABORT, 'audit_logs is append-only: DELETE refused');
END;

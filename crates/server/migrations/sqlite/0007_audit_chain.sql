-- 0007 tamper-evident audit trail: each row carries the hash of the row
-- before it (by seq), so an edited, removed or inserted row breaks the
-- chain that `blockremote audit verify` recomputes. Rows written before
-- this migration have no seq and stay outside the chain.
ALTER TABLE audit_logs ADD COLUMN seq INTEGER;
ALTER TABLE audit_logs ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_logs ADD COLUMN row_hash TEXT;
CREATE UNIQUE INDEX audit_logs_seq_idx ON audit_logs (seq);

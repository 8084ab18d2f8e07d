-- 0019 who did it and which request: an operator's action names the admin
-- key (by id: `admin:` and 8 hex digits of its hash) or `cli` (a command run
-- on a host with the database's credentials: source `cli`), and every row
-- written while serving a request carries that request's id, the
-- correlation id of its log lines. Both are hashed into the chain when set;
-- rows from before, which have neither, keep their hashes. Constraints and
-- columns changed on the partitioned parent apply to every partition.
ALTER TABLE audit_logs ADD COLUMN actor TEXT;
ALTER TABLE audit_logs ADD COLUMN request_id TEXT;
-- The source CHECK's name depends on the table's history (0017 created the
-- partitioned table while the old one still held `audit_logs_source_check`),
-- so it is found by what it checks.
DO $$
DECLARE
    name text;
BEGIN
    FOR name IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'audit_logs'::regclass AND contype = 'c'
          AND pg_get_constraintdef(oid) LIKE '%source%'
    LOOP
        EXECUTE format('ALTER TABLE audit_logs DROP CONSTRAINT %I', name);
    END LOOP;
END
$$;
ALTER TABLE audit_logs ADD CONSTRAINT audit_logs_source_check
    CHECK (source IN ('http', 'ws', 'grpc', 'worker', 'cli'));

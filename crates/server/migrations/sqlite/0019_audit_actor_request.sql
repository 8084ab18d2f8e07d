-- 0019 who did it and which request: an operator's action names the admin
-- key (by id: `admin:` and 8 hex digits of its hash) or `cli`, and every
-- row written while serving a request carries that request's id, the
-- correlation id of its log lines. Both are hashed into the chain when set;
-- rows from before, which have neither, keep their hashes.
ALTER TABLE audit_logs ADD COLUMN actor TEXT;
ALTER TABLE audit_logs ADD COLUMN request_id TEXT;

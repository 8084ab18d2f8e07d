-- 0017 on PostgreSQL, business_events and audit_logs move to monthly range
-- partitions (see migrations/postgres/0017_monthly_partitions.sql). SQLite
-- has no partitions: the embedded tables stay as they are, and retention
-- deletes events by age. Kept so both dialects number their migrations
-- alike.
SELECT 1;

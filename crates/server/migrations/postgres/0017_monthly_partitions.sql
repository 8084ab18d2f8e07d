-- 0017 the append-only tables in native range partitions by month.
--
-- business_events and audit_logs grow without end; one table each makes
-- retention a DELETE of millions of rows (bloat, long vacuum) and keeps
-- old rows in the indexes every query walks. By month, retention of events
-- drops whole partitions (`blockremote_drop_month_partitions`); audit
-- partitions are never dropped (the chain is verified from its first row).
--
-- Partitions are created ahead by `blockremote_ensure_month_partitions`,
-- run by every migrate and by the hourly retention job. A DEFAULT partition
-- catches a row no month takes (a clock far off); a month whose range
-- already has rows in it is left there rather than moved (audit rows can
-- never be deleted, so never moved), and a warning says so.
--
-- A partitioned table's primary and unique keys must include the
-- partition key: (id, created_at), and (seq, created_at) for the audit
-- chain, whose order is kept by the advisory lock every append takes (the
-- database alone no longer refuses a repeated seq; `audit verify` does).
-- Needs PostgreSQL 13 or later (row triggers on partitioned tables).

CREATE FUNCTION blockremote_ensure_month_partitions(parent text, months_back integer, months_ahead integer)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    first_month date := (date_trunc('month', now() AT TIME ZONE 'UTC')
                         - make_interval(months => months_back))::date;
    m date;
    lower_bound timestamptz;
    upper_bound timestamptz;
    name text;
    taken boolean;
    created integer := 0;
BEGIN
    IF parent NOT IN ('business_events', 'audit_logs') THEN
        RAISE EXCEPTION 'not a partitioned table of BlockRemote: %', parent;
    END IF;
    -- Replicas running this at once take turns.
    PERFORM pg_advisory_xact_lock(hashtext('blockremote_month_partitions'));
    FOR i IN 0 .. months_back + months_ahead LOOP
        m := (first_month + make_interval(months => i))::date;
        name := parent || '_' || to_char(m, 'YYYYMM');
        CONTINUE WHEN to_regclass(name) IS NOT NULL;
        lower_bound := m::timestamp AT TIME ZONE 'UTC';
        upper_bound := (m + interval '1 month')::timestamp AT TIME ZONE 'UTC';
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %I WHERE created_at >= $1 AND created_at < $2)',
                       parent || '_default')
            INTO taken USING lower_bound, upper_bound;
        IF taken THEN
            RAISE WARNING '%_default holds rows of %; that month stays there', parent, to_char(m, 'YYYY-MM');
            CONTINUE;
        END IF;
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                       name, parent, lower_bound, upper_bound);
        IF parent = 'audit_logs' THEN
            -- Row triggers are cloned onto partitions; statement triggers
            -- are not, and a partition can be truncated by name.
            EXECUTE format('CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON %I '
                           'FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change()', name);
        END IF;
        created := created + 1;
    END LOOP;
    RETURN created;
END;
$$;

-- Drops every monthly partition of business_events whose whole month is
-- before `cutoff`; the audit trail is never dropped this way.
CREATE FUNCTION blockremote_drop_month_partitions(parent text, cutoff timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part record;
    dropped integer := 0;
BEGIN
    IF parent <> 'business_events' THEN
        RAISE EXCEPTION 'only business_events partitions are dropped, not %', parent;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('blockremote_month_partitions'));
    FOR part IN
        SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = parent::regclass AND c.relname ~ ('^' || parent || '_[0-9]{6}$')
    LOOP
        IF (to_date(right(part.name, 6), 'YYYYMM') + interval '1 month')::timestamp AT TIME ZONE 'UTC'
           <= cutoff THEN
            EXECUTE format('DROP TABLE %I', part.name);
            dropped := dropped + 1;
        END IF;
    END LOOP;
    RETURN dropped;
END;
$$;

-- How many months back the oldest row of `old_table` is (at most 120).
CREATE FUNCTION blockremote_months_back(old_table text) RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    oldest timestamptz;
BEGIN
    EXECUTE format('SELECT min(created_at) FROM %I', old_table) INTO oldest;
    IF oldest IS NULL THEN
        RETURN 1;
    END IF;
    RETURN LEAST(120, GREATEST(1,
        ((extract(year FROM date_trunc('month', now() AT TIME ZONE 'UTC'))
          - extract(year FROM date_trunc('month', oldest AT TIME ZONE 'UTC'))) * 12
         + extract(month FROM date_trunc('month', now() AT TIME ZONE 'UTC'))
         - extract(month FROM date_trunc('month', oldest AT TIME ZONE 'UTC')))::integer));
END;
$$;

-- business_events
ALTER TABLE business_events RENAME TO business_events_unpartitioned;
ALTER TABLE business_events_unpartitioned RENAME CONSTRAINT business_events_pkey
    TO business_events_unpartitioned_pkey;
CREATE TABLE business_events (
    id         UUID NOT NULL,
    type       TEXT NOT NULL,
    user_id    UUID,
    device_id  TEXT,
    ip_prefix  TEXT,
    ip_hmac    TEXT,
    metadata   JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE business_events_default PARTITION OF business_events DEFAULT;
SELECT blockremote_ensure_month_partitions('business_events',
    blockremote_months_back('business_events_unpartitioned'), 12);
INSERT INTO business_events (id, type, user_id, device_id, ip_prefix, ip_hmac, metadata, created_at)
    SELECT id, type, user_id, device_id, ip_prefix, ip_hmac, metadata, created_at
    FROM business_events_unpartitioned;
DROP TABLE business_events_unpartitioned;
CREATE INDEX business_events_type_idx ON business_events (type, created_at);
CREATE INDEX business_events_user_idx ON business_events (user_id, created_at);
CREATE INDEX business_events_device_idx ON business_events (device_id, created_at);
CREATE INDEX business_events_ip_hmac_idx ON business_events (ip_hmac, created_at);
CREATE INDEX business_events_ip_prefix_idx ON business_events (ip_prefix, created_at);
CREATE INDEX business_events_created_idx ON business_events (created_at);

-- audit_logs
ALTER TABLE audit_logs RENAME TO audit_logs_unpartitioned;
ALTER TABLE audit_logs_unpartitioned RENAME CONSTRAINT audit_logs_pkey TO audit_logs_unpartitioned_pkey;
CREATE TABLE audit_logs (
    id                UUID NOT NULL,
    user_id           UUID,
    device_id         TEXT,
    jti               TEXT,
    ip                TEXT,
    user_agent        TEXT,
    source            TEXT NOT NULL CHECK (source IN ('http', 'ws', 'grpc', 'worker')),
    threat_score      DOUBLE PRECISION,
    decision_reason   TEXT,
    attestation_state TEXT,
    action_taken      TEXT NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    seq               BIGINT,
    prev_hash         TEXT,
    row_hash          TEXT,
    PRIMARY KEY (id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE audit_logs_default PARTITION OF audit_logs DEFAULT;
CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change();
SELECT blockremote_ensure_month_partitions('audit_logs',
    blockremote_months_back('audit_logs_unpartitioned'), 12);
INSERT INTO audit_logs (id, user_id, device_id, jti, ip, user_agent, source, threat_score,
                        decision_reason, attestation_state, action_taken, created_at,
                        seq, prev_hash, row_hash)
    SELECT id, user_id, device_id, jti, ip, user_agent, source, threat_score,
           decision_reason, attestation_state, action_taken, created_at,
           seq, prev_hash, row_hash
    FROM audit_logs_unpartitioned;
DROP TABLE audit_logs_unpartitioned;
DROP FUNCTION blockremote_months_back(text);
CREATE INDEX audit_logs_user_idx ON audit_logs (user_id, created_at);
CREATE INDEX audit_logs_device_idx ON audit_logs (device_id, created_at);
CREATE INDEX audit_logs_action_idx ON audit_logs (action_taken, created_at);
CREATE INDEX audit_logs_created_idx ON audit_logs (created_at);
CREATE UNIQUE INDEX audit_logs_seq_idx ON audit_logs (seq, created_at);
CREATE TRIGGER audit_logs_no_update BEFORE UPDATE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION audit_logs_refuse_change();
CREATE TRIGGER audit_logs_no_delete BEFORE DELETE ON audit_logs
    FOR EACH ROW EXECUTE FUNCTION audit_logs_refuse_change();
CREATE TRIGGER audit_logs_no_truncate BEFORE TRUNCATE ON audit_logs
    FOR EACH STATEMENT EXECUTE FUNCTION audit_logs_refuse_change();

-- 0002 plans, subscriptions and billing events (PostgreSQL).

CREATE TABLE plans (
    name                  TEXT PRIMARY KEY,
    rate_limit_per_minute INTEGER NOT NULL CHECK (rate_limit_per_minute > 0),
    -- Sliding refresh-token lifetime for sessions on this plan.
    refresh_ttl_seconds   INTEGER NOT NULL CHECK (refresh_ttl_seconds > 0)
);

CREATE TABLE subscriptions (
    user_id            UUID PRIMARY KEY REFERENCES users (id),
    plan               TEXT NOT NULL REFERENCES plans (name),
    status             TEXT NOT NULL CHECK (status IN ('active', 'canceled', 'past_due')),
    current_period_end TIMESTAMPTZ,
    -- `created` of the newest event applied, so an older event never rolls back.
    last_event_created BIGINT NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every billing webhook ever processed. The primary key is the replay
-- protection: an event id is applied at most once, forever.
CREATE TABLE billing_events (
    event_id       TEXT PRIMARY KEY,
    type           TEXT NOT NULL,
    signature      TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    created        BIGINT NOT NULL,
    processed_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX billing_events_processed_idx ON billing_events (processed_at);

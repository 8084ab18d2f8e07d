-- 0006 retention of business events: the periodic job deletes by age.
CREATE INDEX business_events_created_idx ON business_events (created_at);

-- 0003 seeded plans (API.md, "Plans and rate limits").
INSERT INTO plans (name, rate_limit_per_minute, refresh_ttl_seconds) VALUES
    ('trial',      120,  7 * 86400),
    ('paid_basic', 600, 30 * 86400),
    ('paid',      1200, 30 * 86400)
ON CONFLICT (name) DO NOTHING;

-- 0008 the abuse firewall: the default rules (API.md, "Running and
-- configuration"; operators tune them at run time), and what a decision
-- must remember of its rule besides what 0001 already keeps.

INSERT INTO firewall_rules (name, event_type, scope, threshold, window_seconds, lookback_seconds, side_effect, mode) VALUES
    ('create_user_per_ip', 'create:user', 'ip', 20, 3600, 21600, 'block_users', 'enforce'),
    ('login_failed_per_ip', 'login:failed', 'ip', 30, 900, 0, 'throttle', 'enforce'),
    ('attestation_failed_per_device', 'attestation:failed', 'device', 3, 3600, 0, 'quarantine_devices', 'enforce');

ALTER TABLE firewall_decisions ADD COLUMN side_effect TEXT NOT NULL DEFAULT 'throttle';
ALTER TABLE firewall_decisions ADD COLUMN lookback_seconds INTEGER NOT NULL DEFAULT 0;

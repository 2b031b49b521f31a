-- Limits carried by an access rule (sent to the gateways as a limit rule on the same grantee),
-- and the end of a key rotation's overlap (the previous key is retired automatically then).
ALTER TABLE access_rules ADD COLUMN requests_per_minute BIGINT;
ALTER TABLE access_rules ADD COLUMN tokens_per_minute BIGINT;
ALTER TABLE access_rules ADD COLUMN quota_tokens BIGINT;
ALTER TABLE access_rules ADD COLUMN quota_period TEXT
    CHECK (quota_period IN ('hourly', 'daily', 'weekly', 'monthly', 'yearly'));

ALTER TABLE subscriptions ADD COLUMN secondary_expires_at TIMESTAMPTZ;

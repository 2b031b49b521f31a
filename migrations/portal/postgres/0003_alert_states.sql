-- What the alerter last notified, per rule and subject (a pool member, a quota's subject, a
-- subscription key; '' for a rule watching one figure), so that a restart neither repeats a
-- firing notification nor forgets to send a resolution. A row exists while its subject fires or
-- is being watched (a member seen set aside, not yet for long enough).
CREATE TABLE alert_states (
    rule_name  TEXT NOT NULL,
    subject    TEXT NOT NULL,
    firing     BOOLEAN NOT NULL,
    -- Firing: since when it fires. Watched: since when its condition holds.
    since      TIMESTAMPTZ NOT NULL,
    observed   TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (rule_name, subject)
);

-- The portal's config database (PostgreSQL). JSON columns are text, as on SQLite.
CREATE TABLE settings (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE access_rules (
    id                   TEXT PRIMARY KEY,
    grantee_kind         TEXT NOT NULL CHECK (grantee_kind IN ('group', 'subscription', 'user', 'app_role')),
    grantee_id           TEXT NOT NULL,
    grantee_display_name TEXT NOT NULL DEFAULT '',
    deployments          TEXT NOT NULL,
    operations           TEXT NOT NULL,
    resources            BOOLEAN NOT NULL DEFAULT FALSE,
    created_at           TIMESTAMPTZ NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL
);

CREATE TABLE subscriptions (
    id                 TEXT PRIMARY KEY,
    display_name       TEXT NOT NULL,
    product            TEXT,
    primary_key_hash   TEXT NOT NULL,
    secondary_key_hash TEXT,
    state              TEXT NOT NULL CHECK (state IN ('active', 'suspended', 'revoked')),
    expires_at         TIMESTAMPTZ,
    created_at         TIMESTAMPTZ NOT NULL,
    created_by         TEXT NOT NULL,
    updated_at         TIMESTAMPTZ NOT NULL
);

CREATE TABLE backend_pools (
    id               TEXT PRIMARY KEY,
    deployments      TEXT NOT NULL,
    serves_resources BOOLEAN NOT NULL DEFAULT FALSE,
    created_at       TIMESTAMPTZ NOT NULL,
    updated_at       TIMESTAMPTZ NOT NULL
);

CREATE TABLE pool_members (
    pool_id     TEXT NOT NULL REFERENCES backend_pools (id) ON DELETE CASCADE,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('azure_openai', 'openai')),
    endpoint    TEXT NOT NULL,
    deployment  TEXT,
    api_version TEXT,
    priority    BIGINT NOT NULL,
    weight      BIGINT NOT NULL,
    -- A BackendCredential as JSON: secret references only, never a secret.
    credential  TEXT NOT NULL,
    PRIMARY KEY (pool_id, id)
);

CREATE TABLE gateways (
    id               TEXT PRIMARY KEY,
    url              TEXT NOT NULL UNIQUE,
    -- A secret reference (env:NAME, file:PATH or a Key Vault URL), never the token.
    admin_token_ref  TEXT NOT NULL,
    pushed_version   BIGINT,
    last_attempt_at  TIMESTAMPTZ,
    last_error       TEXT,
    created_at       TIMESTAMPTZ NOT NULL
);

CREATE TABLE snapshot_versions (
    version    BIGINT PRIMARY KEY,
    snapshot   TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE activity_log (
    id     BIGSERIAL PRIMARY KEY,
    at     TIMESTAMPTZ NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    before TEXT,
    after  TEXT
);

CREATE INDEX activity_log_at ON activity_log (at);

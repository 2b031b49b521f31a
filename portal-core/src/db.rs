//! The config database: SQLite (the default) or PostgreSQL, the same static SQL on both.
//!
//! Every query is a literal with `$n` bind parameters (both engines accept them); nothing is
//! ever formatted into SQL. [`ConfigDb::migrate`] is an explicit step that fails loudly.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use time::OffsetDateTime;

use crate::error::PortalError;

/// A connection pool on one of the two engines.
#[derive(Debug, Clone)]
pub enum Engine {
    /// SQLite, one writer connection (SQLite serialises writes anyway).
    Sqlite(SqlitePool),
    /// PostgreSQL.
    Postgres(PgPool),
}

/// The portal's config database.
#[derive(Debug, Clone)]
pub struct ConfigDb {
    /// The pool, public so the session store can share it.
    pub engine: Engine,
}

/// Runs the same expression against whichever pool the database has.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db.engine {
            Engine::Sqlite($pool) => $body,
            Engine::Postgres($pool) => $body,
        }
    };
}

/// Reads everything a snapshot is built from through `$conn` (a transaction), as
/// [`ConfigTables`].
macro_rules! read_config_tables {
    ($conn:expr) => {
        ConfigTables {
            base: sqlx::query_scalar(SETTING_VALUE_SQL)
                .bind(crate::snapshot::BASE_SETTING)
                .fetch_optional(&mut *$conn)
                .await?,
            subscriptions: sqlx::query_as(SUBSCRIPTIONS_SQL)
                .fetch_all(&mut *$conn)
                .await?,
            access_rules: sqlx::query_as(ACCESS_RULES_SQL)
                .fetch_all(&mut *$conn)
                .await?,
            pools: sqlx::query_as(POOLS_SQL).fetch_all(&mut *$conn).await?,
            members: sqlx::query_as(MEMBERS_SQL).fetch_all(&mut *$conn).await?,
        }
    };
}

/// Inside a transaction that changes what snapshots are built from, before its commit: takes
/// the config lock (PostgreSQL, `$postgres`; SQLite has one writer connection), reads the
/// tables as the change leaves them and returns [`PortalError::Invalid`] (the transaction then
/// rolls back) when a gateway would refuse the snapshot they make.
macro_rules! check_config {
    ($tx:expr, $postgres:expr) => {{
        if $postgres {
            sqlx::query(CONFIG_LOCK_SQL).execute(&mut *$tx).await?;
        }
        let tables = read_config_tables!($tx);
        crate::snapshot::check(&tables)?;
    }};
}

/// A subscription row: key hashes only.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct SubscriptionRow {
    /// Stable id.
    pub id: String,
    /// Human-readable name.
    pub display_name: String,
    /// Team or group the keys are for.
    pub product: Option<String>,
    /// `sha256:…` of the primary key.
    pub primary_key_hash: String,
    /// `sha256:…` of the secondary key (the previous key during a rotation's overlap).
    pub secondary_key_hash: Option<String>,
    /// When the rotation's overlap ends: the secondary key is retired then.
    pub secondary_expires_at: Option<OffsetDateTime>,
    /// `active`, `suspended` or `revoked`.
    pub state: String,
    /// After this instant the keys are refused.
    pub expires_at: Option<OffsetDateTime>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// Who created it.
    pub created_by: String,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

/// An access-rule row; list columns hold JSON arrays.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct AccessRuleRow {
    /// Stable id.
    pub id: String,
    /// `group`, `subscription`, `user` or `app_role`.
    pub grantee_kind: String,
    /// The group/user object id, subscription id or app-role value.
    pub grantee_id: String,
    /// A group's display name.
    pub grantee_display_name: String,
    /// JSON array of deployment patterns.
    pub deployments: String,
    /// JSON array of operation patterns.
    pub operations: String,
    /// Whether calls naming no deployment are granted.
    pub resources: bool,
    /// Calls per minute allowed to the grantee on the rule's deployments.
    pub requests_per_minute: Option<i64>,
    /// Tokens per minute allowed to the grantee on the rule's deployments.
    pub tokens_per_minute: Option<i64>,
    /// Tokens per quota period.
    pub quota_tokens: Option<i64>,
    /// `hourly`, `daily`, `weekly`, `monthly` or `yearly`.
    pub quota_period: Option<String>,
    /// When it last changed: its version, which an edit form carries (see [`next_version`]).
    pub updated_at: OffsetDateTime,
}

impl Default for AccessRuleRow {
    /// An empty rule, never written (its `updated_at` is the epoch).
    fn default() -> Self {
        AccessRuleRow {
            id: String::new(),
            grantee_kind: String::new(),
            grantee_id: String::new(),
            grantee_display_name: String::new(),
            deployments: String::new(),
            operations: String::new(),
            resources: false,
            requests_per_minute: None,
            tokens_per_minute: None,
            quota_tokens: None,
            quota_period: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }
}

/// A backend pool row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct PoolRow {
    /// Stable id.
    pub id: String,
    /// JSON array of deployment names.
    pub deployments: String,
    /// Whether the pool serves calls that name no deployment.
    pub serves_resources: bool,
    /// When it last changed (its deployments; not its members): its version, which an edit form
    /// carries.
    pub updated_at: OffsetDateTime,
}

/// A pool member row; the credential is a `BackendCredential` as JSON (secret references only).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct MemberRow {
    /// The pool it belongs to.
    pub pool_id: String,
    /// Stable id.
    pub id: String,
    /// `azure_openai` or `openai`.
    pub kind: String,
    /// Base URL.
    pub endpoint: String,
    /// Deployment name on this member.
    pub deployment: Option<String>,
    /// `api-version` for Azure members.
    pub api_version: Option<String>,
    /// Lower is tried first.
    pub priority: i64,
    /// Share inside a priority group.
    pub weight: i64,
    /// `BackendCredential` JSON.
    pub credential: String,
    /// When it last changed: its version, which an edit form carries.
    pub updated_at: OffsetDateTime,
}

/// A registered gateway.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct GatewayRow {
    /// Stable id.
    pub id: String,
    /// Base URL of the gateway.
    pub url: String,
    /// Secret reference of its admin token.
    pub admin_token_ref: String,
    /// The last version it accepted.
    pub pushed_version: Option<i64>,
    /// When the portal last tried to push.
    pub last_attempt_at: Option<OffsetDateTime>,
    /// Why the last push failed, if it did.
    pub last_error: Option<String>,
}

/// One pushed (or built) snapshot version.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct SnapshotVersionRow {
    /// The version.
    pub version: i64,
    /// The `ConfigSnapshot` JSON.
    pub snapshot: String,
    /// When it was built.
    pub created_at: OffsetDateTime,
    /// Who caused it.
    pub created_by: String,
}

/// One entry of the activity log.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct ActivityRow {
    /// Sequence number.
    pub id: i64,
    /// When.
    pub at: OffsetDateTime,
    /// Who.
    pub actor: String,
    /// What (`subscription.create`, …).
    pub action: String,
    /// Which object.
    pub target: String,
    /// The object before the change (JSON), if it existed.
    pub before: Option<String>,
    /// The object after the change (JSON), if it still exists.
    pub after: Option<String>,
}

/// What the alerter last notified of one subject of one rule (see `insights::alerts`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow, Serialize, Deserialize)]
pub struct AlertStateRow {
    /// The rule's name.
    pub rule_name: String,
    /// The subject within the rule (a pool member, a quota's subject, a subscription key); empty
    /// for a rule that watches one figure.
    pub subject: String,
    /// Whether its firing was notified (and its resolution not yet).
    pub firing: bool,
    /// Firing: since when it fires. Watched but not firing: since when its condition holds.
    pub since: OffsetDateTime,
    /// What was observed last, for a person.
    pub observed: String,
    /// When the row was written.
    pub updated_at: OffsetDateTime,
}

/// Everything a snapshot is built from, read at one moment (in one transaction).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigTables {
    /// The gateway settings (`snapshot.base`), if set.
    pub base: Option<String>,
    /// Every subscription, by id.
    pub subscriptions: Vec<SubscriptionRow>,
    /// Every access rule, by id.
    pub access_rules: Vec<AccessRuleRow>,
    /// Every pool, by id.
    pub pools: Vec<PoolRow>,
    /// Every pool member, by pool, priority and id.
    pub members: Vec<MemberRow>,
}

const SUBSCRIPTIONS_SQL: &str = "SELECT id, display_name, product, primary_key_hash, secondary_key_hash, secondary_expires_at, state, expires_at, created_at, created_by, updated_at FROM subscriptions ORDER BY id";
const ACCESS_RULES_SQL: &str = "SELECT id, grantee_kind, grantee_id, grantee_display_name, deployments, operations, resources, requests_per_minute, tokens_per_minute, quota_tokens, quota_period, updated_at FROM access_rules ORDER BY id";
const POOLS_SQL: &str =
    "SELECT id, deployments, serves_resources, updated_at FROM backend_pools ORDER BY id";
const MEMBERS_SQL: &str = "SELECT pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential, updated_at FROM pool_members ORDER BY pool_id, priority, id";
const SETTING_VALUE_SQL: &str = "SELECT value FROM settings WHERE key = $1";

/// Serialises the changes to what snapshots are built from, and the reads a snapshot is built
/// from, on PostgreSQL: a transaction-scoped advisory lock (its key is Gatehouse's own number),
/// so that two changes at once (two admins, two portal replicas) cannot each pass the check
/// without the other and together make a snapshot a gateway refuses.
const CONFIG_LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(4735867001)";

/// An activity entry to write.
#[derive(Debug, Clone)]
pub struct NewActivity<'a> {
    /// Who.
    pub actor: &'a str,
    /// What.
    pub action: &'a str,
    /// Which object.
    pub target: &'a str,
    /// Before (JSON).
    pub before: Option<String>,
    /// After (JSON).
    pub after: Option<String>,
}

impl ConfigDb {
    /// Connects to `sqlite:PATH` (created if missing) or `postgres://…`.
    pub async fn connect(url: &str) -> Result<ConfigDb, PortalError> {
        let engine = if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true);
            Engine::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await?,
            )
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Engine::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .connect_with(PgConnectOptions::from_str(url)?)
                    .await?,
            )
        } else {
            return Err(PortalError::invalid(
                "database",
                "the config database URL starts with sqlite: or postgres://",
            ));
        };
        Ok(ConfigDb { engine })
    }

    /// Applies the engine's migrations; fails on any problem.
    pub async fn migrate(&self) -> Result<(), PortalError> {
        match &self.engine {
            Engine::Sqlite(pool) => {
                sqlx::migrate!("../migrations/portal/sqlite")
                    .run(pool)
                    .await?
            }
            Engine::Postgres(pool) => {
                sqlx::migrate!("../migrations/portal/postgres")
                    .run(pool)
                    .await?
            }
        }
        Ok(())
    }

    /// Connects and migrates.
    pub async fn open(url: &str) -> Result<ConfigDb, PortalError> {
        let db = ConfigDb::connect(url).await?;
        db.migrate().await?;
        Ok(db)
    }

    /// Everything a snapshot is built from, read in one transaction (on PostgreSQL under the
    /// config lock, so that no change is seen in part).
    pub async fn config_tables(&self) -> Result<ConfigTables, PortalError> {
        let postgres = self.is_postgres();
        on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            if postgres {
                sqlx::query(CONFIG_LOCK_SQL).execute(&mut *tx).await?;
            }
            let tables = read_config_tables!(tx);
            tx.commit().await?;
            Ok(tables)
        }
        .await)
    }

    fn is_postgres(&self) -> bool {
        matches!(self.engine, Engine::Postgres(_))
    }

    // ---- subscriptions ----

    /// Every subscription, by id.
    pub async fn subscriptions(&self) -> Result<Vec<SubscriptionRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(SUBSCRIPTIONS_SQL)
            .fetch_all(pool)
            .await?))
    }

    /// One subscription.
    pub async fn subscription(&self, id: &str) -> Result<Option<SubscriptionRow>, PortalError> {
        const SQL: &str = "SELECT id, display_name, product, primary_key_hash, secondary_key_hash, secondary_expires_at, state, expires_at, created_at, created_by, updated_at FROM subscriptions WHERE id = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Inserts a subscription and its activity entry in one transaction.
    pub async fn insert_subscription(
        &self,
        row: &SubscriptionRow,
        activity: NewActivity<'_>,
    ) -> Result<(), PortalError> {
        const SQL: &str = "INSERT INTO subscriptions (id, display_name, product, primary_key_hash, secondary_key_hash, state, expires_at, created_at, created_by, updated_at, secondary_expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
        let postgres = self.is_postgres();
        on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            sqlx::query(SQL)
                .bind(&row.id)
                .bind(&row.display_name)
                .bind(&row.product)
                .bind(&row.primary_key_hash)
                .bind(&row.secondary_key_hash)
                .bind(&row.state)
                .bind(row.expires_at)
                .bind(row.created_at)
                .bind(&row.created_by)
                .bind(row.updated_at)
                .bind(row.secondary_expires_at)
                .execute(&mut *tx)
                .await
                .map_err(|error| {
                    if PortalError::is_unique_violation(&error) {
                        PortalError::invalid("id", "a subscription with this id exists")
                    } else {
                        error.into()
                    }
                })?;
            check_config!(tx, postgres);
            sqlx::query(ACTIVITY_SQL)
                .bind(OffsetDateTime::now_utc())
                .bind(activity.actor)
                .bind(activity.action)
                .bind(activity.target)
                .bind(&activity.before)
                .bind(&activity.after)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }
        .await)
    }

    /// Replaces a subscription's keys, state and expiry, and writes its activity entry, when the
    /// row is still as it was read (its `updated_at` is `read_at`). `false`, with nothing written,
    /// when it changed or went since: read it again and redo the change, so that two changes at
    /// once (a revocation and a rotation) cannot undo each other.
    pub async fn update_subscription(
        &self,
        row: &SubscriptionRow,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "UPDATE subscriptions SET display_name = $2, product = $3, primary_key_hash = $4, secondary_key_hash = $5, state = $6, expires_at = $7, updated_at = $8, secondary_expires_at = $9 WHERE id = $1 AND updated_at = $10";
        let postgres = self.is_postgres();
        let result: Result<u64, PortalError> = on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            let done = sqlx::query(SQL)
                .bind(&row.id)
                .bind(&row.display_name)
                .bind(&row.product)
                .bind(&row.primary_key_hash)
                .bind(&row.secondary_key_hash)
                .bind(&row.state)
                .bind(row.expires_at)
                .bind(row.updated_at)
                .bind(row.secondary_expires_at)
                .bind(read_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if done == 0 {
                // Changed (or removed) since it was read: nothing is written, nor logged.
                return Ok(0);
            }
            check_config!(tx, postgres);
            sqlx::query(ACTIVITY_SQL)
                .bind(OffsetDateTime::now_utc())
                .bind(activity.actor)
                .bind(activity.action)
                .bind(activity.target)
                .bind(&activity.before)
                .bind(&activity.after)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(done)
        }
        .await);
        Ok(result? > 0)
    }

    // ---- access rules ----

    /// Every access rule, by id.
    pub async fn access_rules(&self) -> Result<Vec<AccessRuleRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(ACCESS_RULES_SQL)
            .fetch_all(pool)
            .await?))
    }

    /// Inserts a new access rule (its `updated_at` as given) and writes its activity entry, in one
    /// transaction; `false`, with nothing written, when a rule with its id exists.
    pub async fn insert_access_rule(
        &self,
        row: &AccessRuleRow,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "INSERT INTO access_rules (id, grantee_kind, grantee_id, grantee_display_name, deployments, operations, resources, created_at, updated_at, requests_per_minute, tokens_per_minute, quota_tokens, quota_period) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12) ON CONFLICT (id) DO NOTHING";
        Ok(self
            .write(&[Statement::guarded(SQL, rule_binds(row))], activity)
            .await?
            .is_some())
    }

    /// Changes an access rule (to `row`, its new `updated_at` included) and writes its activity
    /// entry, in one transaction, when the rule is still as it was read: its `updated_at` is
    /// `read_at`. `false`, with nothing written, when it changed or went since.
    pub async fn update_access_rule(
        &self,
        row: &AccessRuleRow,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "UPDATE access_rules SET grantee_kind = $2, grantee_id = $3, grantee_display_name = $4, deployments = $5, operations = $6, resources = $7, updated_at = $8, requests_per_minute = $9, tokens_per_minute = $10, quota_tokens = $11, quota_period = $12 WHERE id = $1 AND updated_at = $13";
        let mut binds = rule_binds(row);
        binds.push(read_at.into());
        Ok(self
            .write(&[Statement::guarded(SQL, binds)], activity)
            .await?
            .is_some())
    }

    // ---- backend pools ----

    /// Every pool, by id.
    pub async fn pools(&self) -> Result<Vec<PoolRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(POOLS_SQL)
            .fetch_all(pool)
            .await?))
    }

    /// Every pool member, by pool, priority and id.
    pub async fn members(&self) -> Result<Vec<MemberRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(MEMBERS_SQL)
            .fetch_all(pool)
            .await?))
    }

    /// Replaces a pool and all its members, whatever they were, and writes the activity entry (for
    /// seeding and tests: the pages change one pool or member at a time, from the version they
    /// read).
    pub async fn replace_pool(
        &self,
        row: &PoolRow,
        members: &[MemberRow],
        activity: NewActivity<'_>,
    ) -> Result<(), PortalError> {
        const POOL: &str = "INSERT INTO backend_pools (id, deployments, serves_resources, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO UPDATE SET deployments = excluded.deployments, serves_resources = excluded.serves_resources, updated_at = excluded.updated_at";
        const CLEAR: &str = "DELETE FROM pool_members WHERE pool_id = $1";
        const MEMBER: &str = "INSERT INTO pool_members (pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let now = OffsetDateTime::now_utc();
        let postgres = self.is_postgres();
        on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            sqlx::query(POOL)
                .bind(&row.id)
                .bind(&row.deployments)
                .bind(row.serves_resources)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(CLEAR).bind(&row.id).execute(&mut *tx).await?;
            for member in members {
                sqlx::query(MEMBER)
                    .bind(&row.id)
                    .bind(&member.id)
                    .bind(&member.kind)
                    .bind(&member.endpoint)
                    .bind(&member.deployment)
                    .bind(&member.api_version)
                    .bind(member.priority)
                    .bind(member.weight)
                    .bind(&member.credential)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            check_config!(tx, postgres);
            sqlx::query(ACTIVITY_SQL)
                .bind(now)
                .bind(activity.actor)
                .bind(activity.action)
                .bind(activity.target)
                .bind(&activity.before)
                .bind(&activity.after)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(())
        }
        .await)
    }

    // ---- gateways ----

    /// Every registered gateway, by id.
    pub async fn gateways(&self) -> Result<Vec<GatewayRow>, PortalError> {
        const SQL: &str = "SELECT id, url, admin_token_ref, pushed_version, last_attempt_at, last_error FROM gateways ORDER BY id";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .fetch_all(pool)
            .await?))
    }

    /// Registers a gateway, or changes the URL and token reference of one with the same id. A
    /// gateway at a new URL is another process, which has been pushed nothing yet: its pushed
    /// version and last error are cleared, so that the next push reaches it.
    pub async fn upsert_gateway(
        &self,
        id: &str,
        url: &str,
        admin_token_ref: &str,
        activity: NewActivity<'_>,
    ) -> Result<(), PortalError> {
        const SQL: &str = "INSERT INTO gateways (id, url, admin_token_ref, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (id) DO UPDATE SET url = excluded.url, admin_token_ref = excluded.admin_token_ref, \
             pushed_version = CASE WHEN gateways.url = excluded.url THEN gateways.pushed_version END, \
             last_error = CASE WHEN gateways.url = excluded.url THEN gateways.last_error END";
        let now = OffsetDateTime::now_utc();
        let result: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            sqlx::query(SQL)
                .bind(id)
                .bind(url)
                .bind(admin_token_ref)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(ACTIVITY_SQL)
                .bind(now)
                .bind(activity.actor)
                .bind(activity.action)
                .bind(activity.target)
                .bind(&activity.before)
                .bind(&activity.after)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await);
        match result {
            Err(error) if PortalError::is_unique_violation(&error) => {
                Err(PortalError::invalid("url", "another gateway has this URL"))
            }
            other => Ok(other?),
        }
    }

    /// Records the outcome of a push to a gateway: the version it now runs, or the error.
    pub async fn record_push(
        &self,
        id: &str,
        pushed_version: Option<i64>,
        error: Option<&str>,
    ) -> Result<(), PortalError> {
        // Never lowered here: two pushes that end out of order (a publish and the catch-up)
        // leave the newer version recorded. (A gateway that says it runs an older version is
        // recorded so by `record_running_version`.)
        const SQL: &str = "UPDATE gateways SET pushed_version = CASE WHEN pushed_version IS NULL OR $2 > pushed_version THEN COALESCE($2, pushed_version) ELSE pushed_version END, last_attempt_at = $3, last_error = $4 WHERE id = $1";
        let now = OffsetDateTime::now_utc();
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(id)
            .bind(pushed_version)
            .bind(now)
            .bind(error)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Lowers the version recorded as pushed to gateway `id`, still registered at `url`, to
    /// `running`, the version it says it runs, when that is lower: the gateway came back without
    /// the versions it was pushed (an empty state directory, a last-known-good it could not
    /// load). The Gateways page then shows its lag, and the next push sends it the current
    /// version. `false` when nothing was lowered.
    pub async fn record_running_version(
        &self,
        id: &str,
        url: &str,
        running: i64,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "UPDATE gateways SET pushed_version = $3 WHERE id = $1 AND url = $2 AND pushed_version > $3";
        let lowered = on_pool!(self, |pool| sqlx::query(SQL)
            .bind(id)
            .bind(url)
            .bind(running)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(lowered > 0)
    }

    // ---- snapshot versions ----

    /// Stores a newly built snapshot; `false` (nothing stored) when the version is taken, by
    /// another portal replica that published at the same moment.
    pub async fn insert_snapshot(
        &self,
        version: i64,
        snapshot_json: &str,
        created_by: &str,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "INSERT INTO snapshot_versions (version, snapshot, created_at, created_by) VALUES ($1, $2, $3, $4)";
        let now = OffsetDateTime::now_utc();
        let result = on_pool!(self, |pool| sqlx::query(SQL)
            .bind(version)
            .bind(snapshot_json)
            .bind(now)
            .bind(created_by)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()));
        match result {
            Ok(_) => Ok(true),
            Err(error) if PortalError::is_unique_violation(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// The newest stored snapshot.
    pub async fn latest_snapshot(&self) -> Result<Option<SnapshotVersionRow>, PortalError> {
        const SQL: &str = "SELECT version, snapshot, created_at, created_by FROM snapshot_versions ORDER BY version DESC LIMIT 1";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .fetch_optional(pool)
            .await?))
    }

    /// The stored snapshot versions, newest first (without their JSON).
    pub async fn snapshot_versions(
        &self,
        limit: i64,
    ) -> Result<Vec<SnapshotVersionRow>, PortalError> {
        const SQL: &str = "SELECT version, '' AS snapshot, created_at, created_by FROM snapshot_versions ORDER BY version DESC LIMIT $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    // ---- settings ----

    /// A setting's value.
    pub async fn setting(&self, key: &str) -> Result<Option<String>, PortalError> {
        let value: Option<(String,)> = on_pool!(self, |pool| sqlx::query_as(SETTING_VALUE_SQL)
            .bind(key)
            .fetch_optional(pool)
            .await?);
        Ok(value.map(|(value,)| value))
    }

    /// Sets a setting, unchecked: for the settings no snapshot is built from (the gateway
    /// settings, [`crate::snapshot::BASE_SETTING`], go through [`ConfigDb::save_setting`], which
    /// checks them).
    pub async fn set_setting(&self, key: &str, value: &str) -> Result<(), PortalError> {
        on_pool!(self, |pool| sqlx::query(SETTING_SQL)
            .bind(key)
            .bind(value)
            .bind(OffsetDateTime::now_utc())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// A setting's value and its version (when it was last set).
    pub async fn setting_with_version(
        &self,
        key: &str,
    ) -> Result<Option<(String, OffsetDateTime)>, PortalError> {
        const SQL: &str = "SELECT value, updated_at FROM settings WHERE key = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(key)
            .fetch_optional(pool)
            .await?))
    }

    /// Sets a setting (its version becomes `updated_at`) and writes its activity entry, in one
    /// transaction, when it is still as it was read: unset (`read_at` `None`) or set at
    /// `read_at`. `false`, with nothing written, when it was set, changed or removed since.
    pub async fn save_setting(
        &self,
        key: &str,
        value: &str,
        updated_at: OffsetDateTime,
        read_at: Option<OffsetDateTime>,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const INSERT: &str = "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO NOTHING";
        const UPDATE: &str =
            "UPDATE settings SET value = $2, updated_at = $3 WHERE key = $1 AND updated_at = $4";
        let mut binds = vec![key.into(), value.into(), updated_at.into()];
        let sql = match read_at {
            None => INSERT,
            Some(read_at) => {
                binds.push(read_at.into());
                UPDATE
            }
        };
        Ok(self
            .write(&[Statement::guarded(sql, binds)], activity)
            .await?
            .is_some())
    }

    // ---- alert states ----

    /// Every stored alert state, by rule and subject.
    pub async fn alert_states(&self) -> Result<Vec<AlertStateRow>, PortalError> {
        const SQL: &str = "SELECT rule_name, subject, firing, since, observed, updated_at FROM alert_states ORDER BY rule_name, subject";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .fetch_all(pool)
            .await?))
    }

    /// Stores one alert state, replacing the one of the same rule and subject.
    pub async fn save_alert_state(&self, row: &AlertStateRow) -> Result<(), PortalError> {
        const SQL: &str = "INSERT INTO alert_states (rule_name, subject, firing, since, observed, updated_at) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (rule_name, subject) DO UPDATE SET firing = excluded.firing, since = excluded.since, observed = excluded.observed, updated_at = excluded.updated_at";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(&row.rule_name)
            .bind(&row.subject)
            .bind(row.firing)
            .bind(row.since)
            .bind(&row.observed)
            .bind(row.updated_at)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Forgets one alert state.
    pub async fn delete_alert_state(
        &self,
        rule_name: &str,
        subject: &str,
    ) -> Result<(), PortalError> {
        const SQL: &str = "DELETE FROM alert_states WHERE rule_name = $1 AND subject = $2";
        on_pool!(self, |pool| sqlx::query(SQL)
            .bind(rule_name)
            .bind(subject)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    // ---- signed-out sessions ----

    /// Records that the session whose id hashes to `session_hash` is signed out, until
    /// `expires_at` (Unix seconds; past it the session is refused anyway), and deletes the
    /// records whose time has passed: the table holds only the sign-outs of sessions that could
    /// still be alive.
    pub async fn record_signed_out(
        &self,
        session_hash: &str,
        expires_at: i64,
    ) -> Result<(), PortalError> {
        const CLEAN: &str = "DELETE FROM signed_out_sessions WHERE expires_at < $1";
        const INSERT: &str = "INSERT INTO signed_out_sessions (session_hash, expires_at) VALUES ($1, $2) ON CONFLICT (session_hash) DO UPDATE SET expires_at = excluded.expires_at";
        let now = OffsetDateTime::now_utc().unix_timestamp();
        on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            sqlx::query(CLEAN).bind(now).execute(&mut *tx).await?;
            sqlx::query(INSERT)
                .bind(session_hash)
                .bind(expires_at)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok::<(), PortalError>(())
        }
        .await)
    }

    /// Whether the session whose id hashes to `session_hash` was signed out.
    pub async fn is_signed_out(&self, session_hash: &str) -> Result<bool, PortalError> {
        const SQL: &str = "SELECT COUNT(*) FROM signed_out_sessions WHERE session_hash = $1";
        let count: i64 = on_pool!(self, |pool| sqlx::query_scalar(SQL)
            .bind(session_hash)
            .fetch_one(pool)
            .await?);
        Ok(count > 0)
    }

    /// How many sign-outs are recorded (expired ones included until the next sign-out).
    pub async fn signed_out_count(&self) -> Result<i64, PortalError> {
        const SQL: &str = "SELECT COUNT(*) FROM signed_out_sessions";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(SQL)
            .fetch_one(pool)
            .await?))
    }

    // ---- activity ----

    /// The newest activity entries.
    pub async fn activity(&self, limit: i64) -> Result<Vec<ActivityRow>, PortalError> {
        self.activity_rows(
            "SELECT id, at, actor, action, target, before, after FROM activity_log ORDER BY id DESC LIMIT $1",
            limit,
        )
        .await
    }

    /// The newest activity entries that change the configuration: every entry but the records of
    /// audit access (`audit.search`, `audit.view`, `audit.export`, …) and of sign-ins and
    /// sign-outs (`session.sign_in`, `session.sign_out`), which only admins read.
    pub async fn configuration_changes(&self, limit: i64) -> Result<Vec<ActivityRow>, PortalError> {
        self.activity_rows(
            "SELECT id, at, actor, action, target, before, after FROM activity_log WHERE action NOT LIKE 'audit.%' AND action NOT LIKE 'session.%' ORDER BY id DESC LIMIT $1",
            limit,
        )
        .await
    }

    async fn activity_rows(
        &self,
        sql: &'static str,
        limit: i64,
    ) -> Result<Vec<ActivityRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// Writes one activity entry on its own (changes write theirs in their own transaction).
    pub async fn log_activity(&self, activity: NewActivity<'_>) -> Result<(), PortalError> {
        on_pool!(self, |pool| sqlx::query(ACTIVITY_SQL)
            .bind(OffsetDateTime::now_utc())
            .bind(activity.actor)
            .bind(activity.action)
            .bind(activity.target)
            .bind(&activity.before)
            .bind(&activity.after)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }
}

const ACTIVITY_SQL: &str = "INSERT INTO activity_log (at, actor, action, target, before, after) VALUES ($1, $2, $3, $4, $5, $6)";

/// A value bound to a statement run by [`ConfigDb::write`].
#[derive(Debug, Clone)]
pub enum Bind {
    /// Text, or NULL.
    Text(Option<String>),
    /// An integer, or NULL.
    Int(Option<i64>),
    /// A boolean.
    Bool(bool),
    /// An instant, or NULL.
    Time(Option<OffsetDateTime>),
}

impl From<&str> for Bind {
    fn from(value: &str) -> Self {
        Bind::Text(Some(value.to_owned()))
    }
}

impl From<&String> for Bind {
    fn from(value: &String) -> Self {
        Bind::Text(Some(value.clone()))
    }
}

impl From<&Option<String>> for Bind {
    fn from(value: &Option<String>) -> Self {
        Bind::Text(value.clone())
    }
}

impl From<i64> for Bind {
    fn from(value: i64) -> Self {
        Bind::Int(Some(value))
    }
}

impl From<Option<i64>> for Bind {
    fn from(value: Option<i64>) -> Self {
        Bind::Int(value)
    }
}

impl From<bool> for Bind {
    fn from(value: bool) -> Self {
        Bind::Bool(value)
    }
}

impl From<OffsetDateTime> for Bind {
    fn from(value: OffsetDateTime) -> Self {
        Bind::Time(Some(value))
    }
}

/// One statement of a [`ConfigDb::write`] transaction.
#[derive(Debug, Clone)]
pub struct Statement {
    /// Static SQL with `$n` parameters.
    pub sql: &'static str,
    /// The parameters, in order.
    pub binds: Vec<Bind>,
    /// Whether the change depends on it affecting a row: when it affects none (the row it
    /// changes is no longer as it was read, or exists already), nothing is written.
    pub guard: bool,
}

impl Statement {
    /// A statement with its parameters.
    pub fn new(sql: &'static str, binds: Vec<Bind>) -> Statement {
        Statement {
            sql,
            binds,
            guard: false,
        }
    }

    /// A statement the change depends on (a conditional `UPDATE`, `DELETE` or an `INSERT … ON
    /// CONFLICT DO NOTHING`): when it affects no row, the whole change is not written.
    pub fn guarded(sql: &'static str, binds: Vec<Bind>) -> Statement {
        Statement {
            sql,
            binds,
            guard: true,
        }
    }
}

/// A row's next version (its `updated_at`): now, or, should the clock say otherwise, just after
/// the version it replaces (`read_at`), so that a change always makes a version no form holds.
/// In whole microseconds, as PostgreSQL keeps them: the version returned is the one stored on
/// either engine, so a form given it saves again without reading the row first.
pub fn next_version(read_at: Option<OffsetDateTime>) -> OffsetDateTime {
    let microsecond = time::Duration::microseconds(1);
    let at = match read_at {
        Some(read_at) => OffsetDateTime::now_utc().max(read_at + microsecond),
        None => OffsetDateTime::now_utc(),
    };
    at.replace_nanosecond(at.nanosecond() / 1000 * 1000)
        .unwrap_or(at)
}

/// Binds every value of a statement to a query, on whichever engine the arm is for.
macro_rules! bind_all {
    ($query:expr, $binds:expr) => {{
        let mut query = $query;
        for bind in $binds {
            query = match bind {
                Bind::Text(value) => query.bind(value.clone()),
                Bind::Int(value) => query.bind(*value),
                Bind::Bool(value) => query.bind(*value),
                Bind::Time(value) => query.bind(*value),
            };
        }
        query
    }};
}

/// An access rule's columns in the order `insert_access_rule` and `update_access_rule` bind
/// them: id, grantee kind, id and name, deployments, operations, resources, updated_at, limits.
fn rule_binds(row: &AccessRuleRow) -> Vec<Bind> {
    vec![
        (&row.id).into(),
        (&row.grantee_kind).into(),
        (&row.grantee_id).into(),
        (&row.grantee_display_name).into(),
        (&row.deployments).into(),
        (&row.operations).into(),
        row.resources.into(),
        row.updated_at.into(),
        row.requests_per_minute.into(),
        row.tokens_per_minute.into(),
        row.quota_tokens.into(),
        (&row.quota_period).into(),
    ]
}

/// A pool member's columns in the order `insert_member` and `update_member` bind them.
fn member_binds(member: &MemberRow) -> Vec<Bind> {
    vec![
        (&member.pool_id).into(),
        (&member.id).into(),
        (&member.kind).into(),
        (&member.endpoint).into(),
        (&member.deployment).into(),
        (&member.api_version).into(),
        member.priority.into(),
        member.weight.into(),
        (&member.credential).into(),
        member.updated_at.into(),
    ]
}

/// Sets a setting, whatever it was (see [`ConfigDb::set_setting`]).
const SETTING_SQL: &str = "INSERT INTO settings (key, value, updated_at) VALUES ($1, $2, $3) ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at";
const POOL_SQL: &str =
    "SELECT id, deployments, serves_resources, updated_at FROM backend_pools WHERE id = $1";
const RULE_SQL: &str = "SELECT id, grantee_kind, grantee_id, grantee_display_name, deployments, operations, resources, requests_per_minute, tokens_per_minute, quota_tokens, quota_period, updated_at FROM access_rules WHERE id = $1";
const MEMBER_SQL: &str = "SELECT pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential, updated_at FROM pool_members WHERE pool_id = $1 AND id = $2";

impl ConfigDb {
    /// Runs `statements` (a change to what snapshots are built from) and writes `activity`, all
    /// in one transaction: every change or none. The change is checked before its commit:
    /// [`PortalError::Invalid`] (field `configuration`), with nothing written, when a gateway
    /// would refuse the snapshot it makes. Returns the rows each statement affected, or `None`,
    /// with nothing written nor logged, when a [guarded](Statement::guarded) one affected none.
    pub async fn write(
        &self,
        statements: &[Statement],
        activity: NewActivity<'_>,
    ) -> Result<Option<Vec<u64>>, PortalError> {
        let now = OffsetDateTime::now_utc();
        let postgres = self.is_postgres();
        on_pool!(self, |pool| async {
            let mut tx = pool.begin().await?;
            let mut affected = Vec::with_capacity(statements.len());
            for statement in statements {
                let done = bind_all!(sqlx::query(statement.sql), &statement.binds)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if statement.guard && done == 0 {
                    // Changed (or removed, or created) since it was read: the transaction rolls
                    // back as it is dropped.
                    return Ok(None);
                }
                affected.push(done);
            }
            check_config!(tx, postgres);
            sqlx::query(ACTIVITY_SQL)
                .bind(now)
                .bind(activity.actor)
                .bind(activity.action)
                .bind(activity.target)
                .bind(&activity.before)
                .bind(&activity.after)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(affected))
        }
        .await)
    }

    /// One access rule.
    pub async fn access_rule(&self, id: &str) -> Result<Option<AccessRuleRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(RULE_SQL)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Deletes an access rule and writes its activity entry when it is still as it was read (its
    /// `updated_at` is `read_at`); `false`, with nothing written, when it changed or went since.
    pub async fn delete_access_rule(
        &self,
        id: &str,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        Ok(self
            .write(
                &[Statement::guarded(
                    "DELETE FROM access_rules WHERE id = $1 AND updated_at = $2",
                    vec![id.into(), read_at.into()],
                )],
                activity,
            )
            .await?
            .is_some())
    }

    /// One pool.
    pub async fn pool(&self, id: &str) -> Result<Option<PoolRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(POOL_SQL)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Creates a pool (without members; its `updated_at` as given) and writes the activity entry;
    /// `false`, with nothing written, when a pool with its id exists.
    pub async fn insert_pool(
        &self,
        row: &PoolRow,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "INSERT INTO backend_pools (id, deployments, serves_resources, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) ON CONFLICT (id) DO NOTHING";
        Ok(self
            .write(
                &[Statement::guarded(
                    SQL,
                    vec![
                        (&row.id).into(),
                        (&row.deployments).into(),
                        row.serves_resources.into(),
                        row.updated_at.into(),
                    ],
                )],
                activity,
            )
            .await?
            .is_some())
    }

    /// Changes a pool's deployments (its members stay) to `row`, its new `updated_at` included,
    /// and writes the activity entry, when the pool is still as it was read (its `updated_at` is
    /// `read_at`); `false`, with nothing written, when it changed or went since.
    pub async fn update_pool(
        &self,
        row: &PoolRow,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "UPDATE backend_pools SET deployments = $2, serves_resources = $3, updated_at = $4 WHERE id = $1 AND updated_at = $5";
        Ok(self
            .write(
                &[Statement::guarded(
                    SQL,
                    vec![
                        (&row.id).into(),
                        (&row.deployments).into(),
                        row.serves_resources.into(),
                        row.updated_at.into(),
                        read_at.into(),
                    ],
                )],
                activity,
            )
            .await?
            .is_some())
    }

    /// Deletes a pool with its members when the pool is still as it was read (its `updated_at`
    /// is `read_at`); `false`, with nothing written, when it changed or went since.
    pub async fn delete_pool(
        &self,
        id: &str,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        Ok(self
            .write(
                &[
                    // First, so that nothing is deleted unless the pool is as it was read.
                    Statement::guarded(
                        "DELETE FROM backend_pools WHERE id = $1 AND updated_at = $2",
                        vec![id.into(), read_at.into()],
                    ),
                    // Its members went with it (ON DELETE CASCADE); said again, not assumed.
                    Statement::new(
                        "DELETE FROM pool_members WHERE pool_id = $1",
                        vec![id.into()],
                    ),
                ],
                activity,
            )
            .await?
            .is_some())
    }

    /// One pool member.
    pub async fn member(&self, pool_id: &str, id: &str) -> Result<Option<MemberRow>, PortalError> {
        Ok(on_pool!(self, |pool| sqlx::query_as(MEMBER_SQL)
            .bind(pool_id)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Adds a member to its pool (its `updated_at` as given) and writes the activity entry;
    /// `false`, with nothing written, when the pool has a member with its id.
    pub async fn insert_member(
        &self,
        member: &MemberRow,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "INSERT INTO pool_members (pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (pool_id, id) DO NOTHING";
        Ok(self
            .write(&[Statement::guarded(SQL, member_binds(member))], activity)
            .await?
            .is_some())
    }

    /// Changes one pool member to `member`, its new `updated_at` included, and writes the
    /// activity entry, when the member is still as it was read (its `updated_at` is `read_at`);
    /// `false`, with nothing written, when it changed or went since.
    pub async fn update_member(
        &self,
        member: &MemberRow,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        const SQL: &str = "UPDATE pool_members SET kind = $3, endpoint = $4, deployment = $5, api_version = $6, priority = $7, weight = $8, credential = $9, updated_at = $10 WHERE pool_id = $1 AND id = $2 AND updated_at = $11";
        let mut binds = member_binds(member);
        binds.push(read_at.into());
        Ok(self
            .write(&[Statement::guarded(SQL, binds)], activity)
            .await?
            .is_some())
    }

    /// Deletes one pool member when it is still as it was read (its `updated_at` is `read_at`);
    /// `false`, with nothing written, when it changed or went since.
    pub async fn delete_member(
        &self,
        pool_id: &str,
        id: &str,
        read_at: OffsetDateTime,
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        Ok(self
            .write(
                &[Statement::guarded(
                    "DELETE FROM pool_members WHERE pool_id = $1 AND id = $2 AND updated_at = $3",
                    vec![pool_id.into(), id.into(), read_at.into()],
                )],
                activity,
            )
            .await?
            .is_some())
    }

    /// Replaces every access rule, pool and member with the given ones (a rollback), and writes
    /// the activity entry, in one transaction. Each row is written with its `updated_at` as given:
    /// a rollback gives them a new version, so that no form opened before it saves over what it
    /// puts back. Written only while `latest` is the newest stored version (the one the page
    /// showed); `false`, with nothing written, when another was stored since.
    pub async fn restore_rules_and_pools(
        &self,
        latest: i64,
        rules: &[AccessRuleRow],
        pools: &[PoolRow],
        members: &[MemberRow],
        activity: NewActivity<'_>,
    ) -> Result<bool, PortalError> {
        // Touches the newest stored version's row, and only while `latest` is the newest.
        const LATEST: &str = "UPDATE snapshot_versions SET created_by = created_by WHERE version = $1 \
             AND NOT EXISTS (SELECT 1 FROM snapshot_versions AS newer WHERE newer.version > $1)";
        const RULE: &str = "INSERT INTO access_rules (id, grantee_kind, grantee_id, grantee_display_name, deployments, operations, resources, created_at, updated_at, requests_per_minute, tokens_per_minute, quota_tokens, quota_period) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $11, $12)";
        const POOL: &str = "INSERT INTO backend_pools (id, deployments, serves_resources, created_at, updated_at) VALUES ($1, $2, $3, $4, $4)";
        const MEMBER: &str = "INSERT INTO pool_members (pool_id, id, kind, endpoint, deployment, api_version, priority, weight, credential, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
        let mut statements = vec![
            Statement::guarded(LATEST, vec![latest.into()]),
            Statement::new("DELETE FROM access_rules", vec![]),
            Statement::new("DELETE FROM pool_members", vec![]),
            Statement::new("DELETE FROM backend_pools", vec![]),
        ];
        statements.extend(
            rules
                .iter()
                .map(|rule| Statement::new(RULE, rule_binds(rule))),
        );
        statements.extend(pools.iter().map(|pool| {
            Statement::new(
                POOL,
                vec![
                    (&pool.id).into(),
                    (&pool.deployments).into(),
                    pool.serves_resources.into(),
                    pool.updated_at.into(),
                ],
            )
        }));
        statements.extend(
            members
                .iter()
                .map(|member| Statement::new(MEMBER, member_binds(member))),
        );
        Ok(self.write(&statements, activity).await?.is_some())
    }

    /// One stored snapshot version, with its JSON.
    pub async fn snapshot(&self, version: i64) -> Result<Option<SnapshotVersionRow>, PortalError> {
        const SQL: &str = "SELECT version, snapshot, created_at, created_by FROM snapshot_versions WHERE version = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(SQL)
            .bind(version)
            .fetch_optional(pool)
            .await?))
    }
}

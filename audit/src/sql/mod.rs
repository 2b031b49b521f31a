//! The embedded audit store on SQLite (one machine) or PostgreSQL (when it grows).
//!
//! Both engines hold the same tables with Azure Monitor's column names (see
//! `migrations/audit/{sqlite,postgres}`): `GatehouseGatewayLogs` (metadata, one row per call),
//! `GatehouseCallContent` (bodies, apart so that they can expire first),
//! `ApiManagementGatewayLlmLog` (prompt and completion in 32 KB pieces; on PostgreSQL a view over
//! `GatehouseLlmLogHeaders` and `GatehouseLlmLogPieces`), the view `ApiManagementGatewayLogs`
//! (metadata joined with bodies), full-text search of prompts and completions (on SQLite in a
//! file of its own, `search_index.rs`), and `GatehouseUsageRollup` for dashboards. On PostgreSQL
//! the per-call tables are partitioned by UTC day (`partitions.rs`).
//!
//! Every statement binds its values; no text of a record is ever formatted into SQL.

mod full_text;
mod gateway_claims;
mod message_text;
mod partitions;
mod read;
mod reindex;
mod retention;
mod retired_chains;
pub mod rollup;
mod search_blocks;
mod search_index;
mod search_merge;
mod sqlar;
mod verify;
mod write;

use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use gatehouse_schema::AuditRecord;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

pub use gateway_claims::{ClaimOutcome, GatewayClaim};
pub use partitions::{DAYS_AHEAD, DEFAULT_DAYS_BACK};
pub use read::{CallDetail, CallSummary, Cursor, Page, SearchFilter, UsagePoint, UsageQuery};
pub use retention::RetentionReport;
pub use search_index::path_for as search_index_path;

use crate::{AuditSink, SinkError};

/// Which database holds the store.
#[derive(Debug, Clone)]
pub(crate) enum Engine {
    /// SQLite: one writer connection (WAL), several readers.
    Sqlite {
        /// The single writer.
        writer: SqlitePool,
        /// Readers.
        reader: SqlitePool,
        /// The connection that copies the write-ahead log into the database file, beside the
        /// writer (see [`spawn_checkpointer`]).
        checkpointer: SqlitePool,
        /// The full-text index, in a file of its own that the readers attach.
        search: search_index::SearchIndex,
    },
    /// PostgreSQL.
    Postgres {
        /// Every connection of the store.
        pool: PgPool,
        /// Merges the full-text index's pending list after each batch.
        search_merge: search_merge::SearchMerge,
    },
}

/// An audit store in SQLite or PostgreSQL.
#[derive(Debug, Clone)]
pub struct SqlStore {
    pub(crate) engine: Engine,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported engine.
    #[error("unsupported audit store URL: use sqlite:PATH or postgres://…")]
    UnsupportedUrl,
    /// A database error.
    #[error("audit store: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("audit store migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A cursor that this store did not issue.
    #[error("the page cursor is not valid")]
    BadCursor,
}

impl From<StoreError> for SinkError {
    fn from(error: StoreError) -> Self {
        SinkError::Io(std::io::Error::other(error.to_string()))
    }
}

/// Calls up to which [`SqlStore::optimize`] refreshes the planner's statistics of a SQLite store:
/// counting the entries of every index of a million calls takes about a second when the store is
/// in memory.
pub const PLANNER_REFRESH_MAX_CALLS: i64 = 1_000_000;

/// The `ANALYZE` statements of the SQLite tables whose indexes the query planner chooses between,
/// written out (an identifier cannot be a bound parameter). The full-text index's shadow tables
/// are left out on purpose, see [`SqlStore::optimize`]; a test checks that every indexed table of
/// the schema is here.
pub const PLANNED_TABLES: [&str; 4] = [
    "ANALYZE GatehouseGatewayLogs",
    "ANALYZE GatehouseCallContent",
    "ANALYZE ApiManagementGatewayLlmLog",
    "ANALYZE GatehouseUsageRollup",
];

impl SqlStore {
    /// Connects to `sqlite:PATH` (created if missing) or `postgres://…`. Run [`SqlStore::migrate`]
    /// before use.
    pub async fn connect(url: &str) -> Result<SqlStore, StoreError> {
        SqlStore::connect_with_cache(url, DEFAULT_SQLITE_WRITER_CACHE_MIB).await
    }

    /// Like [`SqlStore::connect`], with the SQLite writer's page cache set to `writer_cache_mib`
    /// MiB (ignored on PostgreSQL). A larger cache keeps more index pages of a large store in
    /// memory, at the cost of the process's resident memory.
    pub async fn connect_with_cache(
        url: &str,
        writer_cache_mib: u32,
    ) -> Result<SqlStore, StoreError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(30))
                .foreign_keys(true);
            let writer = SqlitePoolOptions::new()
                .max_connections(1)
                .after_connect(|connection, _| Box::pin(sqlar::register(connection)))
                .connect_with(
                    options
                        .clone()
                        .pragma(
                            "cache_size",
                            format!("-{}", u64::from(writer_cache_mib.max(1)) * 1024),
                        )
                        .pragma("temp_store", "MEMORY")
                        .pragma("wal_autocheckpoint", WRITER_AUTOCHECKPOINT_PAGES),
                )
                .await?;
            let search =
                search_index::SearchIndex::connect(options.get_filename(), &options).await?;
            let search_path = search.path().to_owned();
            let reader = SqlitePoolOptions::new()
                .max_connections(4)
                .after_connect(move |connection, _| {
                    let search_path = search_path.clone();
                    Box::pin(async move {
                        sqlar::register(connection).await?;
                        search_index::attach(connection, &search_path).await
                    })
                })
                .connect_with(options.clone())
                .await?;
            // The checkpointer attaches the full-text index's file too: `PRAGMA wal_checkpoint`
            // without a schema checkpoints every attached database.
            let search_path = search.path().to_owned();
            let checkpointer = SqlitePoolOptions::new()
                .max_connections(1)
                .after_connect(move |connection, _| {
                    let search_path = search_path.clone();
                    Box::pin(async move { search_index::attach(connection, &search_path).await })
                })
                .connect_with(options)
                .await?;
            spawn_checkpointer(checkpointer.clone());
            Ok(SqlStore {
                engine: Engine::Sqlite {
                    writer,
                    reader,
                    checkpointer,
                    search,
                },
            })
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .after_connect(|connection, _| Box::pin(postgres_session(connection)))
                .connect_with(options)
                .await?;
            Ok(SqlStore {
                engine: Engine::Postgres {
                    search_merge: search_merge::SearchMerge::start(pool.clone()),
                    pool,
                },
            })
        } else {
            Err(StoreError::UnsupportedUrl)
        }
    }

    /// Applies the engine's migrations, failing loudly on any problem; on PostgreSQL then creates
    /// the daily partitions of the coming days ([`SqlStore::maintain_partitions`]; a failure there
    /// is logged, not returned).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.engine {
            Engine::Sqlite {
                writer,
                reader,
                search,
                ..
            } => {
                sqlx::migrate!("../migrations/audit/sqlite")
                    .run(writer)
                    .await?;
                search.migrate(reader).await?;
                self.optimize().await?;
            }
            Engine::Postgres { pool, .. } => {
                sqlx::migrate!("../migrations/audit/postgres")
                    .run(pool)
                    .await?;
                // Records are never refused for want of a partition (the DEFAULT partition takes
                // them) and the hourly run tries again, so a busy table is no reason to fail.
                if let Err(error) = self.maintain_partitions().await {
                    tracing::warn!(%error, "audit store: the coming days' partitions were not created; the hourly maintenance tries again");
                }
            }
        }
        Ok(())
    }

    /// Refreshes the statistics SQLite's query planner uses while the store is small enough for
    /// that to be quick ([`PLANNER_REFRESH_MAX_CALLS`]); nothing to do on PostgreSQL, whose
    /// autovacuum keeps them. Run at every open and after each hourly retention run.
    ///
    /// SQLite's `ANALYZE` counts every entry of every index exactly (`analysis_limit` bounds only
    /// the sampling that follows), holding the write lock throughout: on a store of 10 million
    /// calls, larger than memory, that took minutes. Past the bound the statistics last taken stay:
    /// what the planner reads from them (rows per user, per address, per day) keeps its
    /// proportions as the store grows. `PRAGMA optimize` is not used: it also analyzes the
    /// full-text index's shadow tables.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        self.refresh_planner_statistics(PLANNER_REFRESH_MAX_CALLS)
            .await
            .map(|_| ())
    }

    /// [`SqlStore::optimize`] with another bound: `ANALYZE` of each of [`PLANNED_TABLES`] when the
    /// calls table holds at most `max_calls` rows (estimated from its first and last `RecordId`,
    /// two index lookups). Returns whether it ran.
    pub async fn refresh_planner_statistics(&self, max_calls: i64) -> Result<bool, StoreError> {
        let Engine::Sqlite { writer, .. } = &self.engine else {
            return Ok(false);
        };
        let mut connection = writer.acquire().await?;
        // Two subqueries: SQLite answers a lone min() or max() from the end of the B-tree, but
        // scans the whole table for both in one SELECT.
        let (first, last): (Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT (SELECT min(RecordId) FROM GatehouseGatewayLogs), (SELECT max(RecordId) FROM GatehouseGatewayLogs)",
        )
        .fetch_one(&mut *connection)
        .await?;
        let calls = match (first, last) {
            (Some(first), Some(last)) => last - first + 1,
            _ => 0,
        };
        if calls > max_calls {
            return Ok(false);
        }
        sqlx::query("PRAGMA analysis_limit = 1000")
            .execute(&mut *connection)
            .await?;
        for analyze in PLANNED_TABLES {
            sqlx::query(analyze).execute(&mut *connection).await?;
        }
        Ok(true)
    }

    /// Connects and migrates.
    pub async fn open(url: &str) -> Result<SqlStore, StoreError> {
        SqlStore::open_with_cache(url, DEFAULT_SQLITE_WRITER_CACHE_MIB).await
    }

    /// Connects with [`SqlStore::connect_with_cache`] and migrates.
    pub async fn open_with_cache(url: &str, writer_cache_mib: u32) -> Result<SqlStore, StoreError> {
        let store = SqlStore::connect_with_cache(url, writer_cache_mib).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// The SQLite reader pool, for ad-hoc queries of the tables (e.g. the published KQL's SQL twins).
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.engine {
            Engine::Sqlite { reader, .. } => Some(reader),
            Engine::Postgres { .. } => None,
        }
    }

    /// The PostgreSQL pool, for ad-hoc queries of the tables.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.engine {
            Engine::Postgres { pool, .. } => Some(pool),
            Engine::Sqlite { .. } => None,
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        match &self.engine {
            Engine::Sqlite {
                writer,
                reader,
                checkpointer,
                search,
            } => {
                writer.close().await;
                reader.close().await;
                checkpointer.close().await;
                search.close().await;
            }
            Engine::Postgres { pool, .. } => pool.close().await,
        }
    }

    /// Finishes the full-text index's background work for what has been written: on PostgreSQL
    /// merges its pending lists into the index now (the store does it after each batch, beside
    /// the next one); on SQLite, whose index is written with each batch, waits until an index
    /// that is behind (`search_index.rs`) has caught up with the store.
    pub async fn settle_search_index(&self) -> Result<(), StoreError> {
        match &self.engine {
            Engine::Postgres { pool, .. } => search_merge::settle(pool).await,
            Engine::Sqlite { search, .. } => {
                search.caught_up().await;
                Ok(())
            }
        }
    }

    /// Stores records; a record whose `CorrelationId` is already stored (on PostgreSQL: with the
    /// same `TimeGenerated`, which a replayed record always repeats) is skipped, so a replayed
    /// batch is not counted twice. Returns how many were new.
    pub async fn write(&self, records: &[AuditRecord]) -> Result<usize, StoreError> {
        write::write(self, records).await
    }
}

impl AuditSink for SqlStore {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.write(records).await?;
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite { .. } => "sqlite",
            Engine::Postgres { .. } => "postgres",
        }
    }
}

/// The SQLite writer's page cache unless told otherwise, MiB.
pub const DEFAULT_SQLITE_WRITER_CACHE_MIB: u32 = 64;

/// Settings of every PostgreSQL session of the store. No JIT compilation: the store's statements
/// are short, index-led reads and batched writes, for which compiling took longer than running
/// (≈ 140 ms added to an 11 ms full-text search on 10 million calls; bench/README.md). Set with
/// `SET` rather than as a startup option, which connection poolers such as PgBouncer refuse. A
/// large pending list for the full-text index, which the store merges itself (`search_merge.rs`).
async fn postgres_session(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SET jit = off")
        .persistent(false)
        .execute(&mut *connection)
        .await?;
    sqlx::query(search_merge::SET_PENDING_LIST_LIMIT)
        .persistent(false)
        .execute(connection)
        .await?;
    Ok(())
}

/// How often the checkpointer copies the write-ahead log into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// The writer (and the full-text index's writer) checkpoints by itself only when the log has
/// grown this large (pages of 4 KiB: 64 MiB), which happens only when the checkpointer cannot
/// keep up or is not running.
const WRITER_AUTOCHECKPOINT_PAGES: &str = "16384";

/// Copies the write-ahead log into the database file from a connection of its own, so that the
/// writer does not do it inside a commit: at SQLite's default, every 1,000 pages the committing
/// writer checkpoints the whole log, which was 15 % of the writer's time under load. A passive
/// checkpoint never waits for the writer or the readers; once it has copied the whole log, the
/// writer starts the log over from its beginning, so the log stays small. Stops when the pool is
/// closed.
fn spawn_checkpointer(pool: SqlitePool) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(CHECKPOINT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if pool.is_closed() {
                break;
            }
            if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                if pool.is_closed() {
                    break;
                }
                tracing::warn!(%error, "audit store: checkpoint failed; the writer will checkpoint");
            }
        }
    });
}

/// A sortable fixed-width UTC timestamp for SQLite's TEXT time columns.
pub(crate) fn sqlite_time(at: time::OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// The 32-hex-digit key of an address (IPv4 as IPv4-mapped IPv6), so that a CIDR is a key range.
pub(crate) fn ip_key(ip: std::net::IpAddr) -> String {
    let v6 = match ip {
        std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        std::net::IpAddr::V6(v6) => v6,
    };
    hex_u128(u128::from(v6))
}

fn hex_u128(value: u128) -> String {
    format!("{value:032x}")
}

/// The key range of the IPv4 callers (IPv4-mapped IPv6, `::ffff:0:0/96`) when `net` is an IPv6
/// network that spans it without being inside it (`::/0`, `::/64`): its key range holds every
/// IPv4 caller too, and a search of it means IPv6 callers, so the range is left out.
pub(crate) fn ipv4_keys_left_out(net: ipnet::IpNet) -> Option<(String, String)> {
    let ipnet::IpNet::V6(v6) = net else {
        return None;
    };
    let mapped = ipnet::Ipv6Net::new(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped(), 96).ok()?;
    (v6.contains(&mapped) && v6 != mapped).then(|| net_key_range(ipnet::IpNet::V6(mapped)))
}

/// The inclusive key range of a network.
pub(crate) fn net_key_range(net: ipnet::IpNet) -> (String, String) {
    let (low, high) = match net {
        ipnet::IpNet::V4(v4) => (
            v4.network().to_ipv6_mapped(),
            v4.broadcast().to_ipv6_mapped(),
        ),
        ipnet::IpNet::V6(v6) => (v6.network(), v6.broadcast()),
    };
    (hex_u128(u128::from(low)), hex_u128(u128::from(high)))
}

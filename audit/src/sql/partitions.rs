//! Daily partitions of the PostgreSQL store (migration 0004).
//!
//! The per-call tables are partitioned by range of `TimeGenerated`, one partition per UTC day
//! named `<table>_pYYYYMMDD` (migration 0004 gave the months of an older history one partition
//! each, `<table>_pYYYYMM`), plus `<table>_default` for any time no partition covers, so that no
//! record is ever refused. The store creates the partitions of yesterday to
//! [`DAYS_AHEAD`] days ahead at open and at every retention run ([`SqlStore::maintain_partitions`]);
//! retention drops whole partitions ([`drop_days_before`]).
//!
//! Creating or dropping a partition takes a brief exclusive lock on its parent table (and on the
//! DEFAULT partition, which PostgreSQL checks): each is its own short transaction with a
//! `lock_timeout`, so that it never holds writers back for long, and all of them take one
//! advisory lock, so that several gateways can run the maintenance at once. A day that DEFAULT
//! already holds rows for has them moved into its new partition in the same transaction
//! (PostgreSQL refuses to create the partition otherwise).
//!
//! Partition names are built from dates computed here and table names from constants, quoted;
//! never from a record.

use std::collections::BTreeMap;

use sqlx::{PgPool, Postgres, Transaction};
use time::{Date, Duration, OffsetDateTime, Time};

use super::retired_chains::postgres_retire_partition;
use super::{Engine, SqlStore, StoreError};

/// Days ahead of today (UTC) whose partitions exist before the first record of the day arrives.
pub const DAYS_AHEAD: i64 = 3;

/// How far back a day that the DEFAULT partition holds rows for (records replayed late from the
/// journal) still gets a partition of its own at the next maintenance.
pub const DEFAULT_DAYS_BACK: i64 = 31;

/// The advisory lock all partition changes take (per database): "gatehous" in ASCII.
const PARTITION_LOCK: i64 = 0x6761_7465_686f_7573;

/// Longest wait for the parent table's lock before a partition change gives up (and is tried
/// again at the next run); writers queued behind it wait no longer than this.
const LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '5s'";

/// A table partitioned by day.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DailyTable {
    /// The parent table.
    pub(crate) name: &'static str,
    /// Its primary key, quoted, for batched deletes.
    pub(crate) key: &'static str,
    /// Storage parameters of its partitions (PostgreSQL keeps none on a partitioned table), as
    /// migration 0006 sets them on the partitions that existed then.
    pub(crate) storage: &'static str,
    /// Whether its rows are calls linked into audit chains, whose removal is noted
    /// (`retired_chains`).
    pub(crate) retires_chains: bool,
}

/// For tables of prompts and completions: TOAST compresses a row only past 8,160 bytes, not
/// PostgreSQL's default 2,032, so that a call's 2 KB prompt or completion and its vector stay in
/// the row as they are (or compressed), without the costlier trip to the TOAST table.
const WHOLE_ROWS: &str = " WITH (toast_tuple_target = 8160)";

/// Metadata, one row per call.
pub(crate) const CALLS: DailyTable = DailyTable {
    name: "GatehouseGatewayLogs",
    key: r#""RecordId", "TimeGenerated""#,
    storage: "",
    retires_chains: true,
};
/// Bodies and full text.
pub(crate) const CONTENT: DailyTable = DailyTable {
    name: "GatehouseCallContent",
    key: r#""CorrelationId", "TimeGenerated""#,
    storage: WHOLE_ROWS,
    retires_chains: false,
};
/// LLM log header rows (`SequenceNumber` 0): metadata.
pub(crate) const LLM_HEADERS: DailyTable = DailyTable {
    name: "GatehouseLlmLogHeaders",
    key: r#""CorrelationId", "SequenceNumber", "TimeGenerated""#,
    storage: "",
    retires_chains: false,
};
/// LLM log prompt and completion pieces (`SequenceNumber` > 0): content.
pub(crate) const LLM_PIECES: DailyTable = DailyTable {
    name: "GatehouseLlmLogPieces",
    key: r#""CorrelationId", "SequenceNumber", "TimeGenerated""#,
    storage: WHOLE_ROWS,
    retires_chains: false,
};

/// The full-text word index's blocks of calls (migration 0007): content.
pub(crate) const SEARCH_BLOCKS: DailyTable = DailyTable {
    name: "GatehouseSearchBlocks",
    key: r#""BlockId", "TimeGenerated""#,
    storage: "",
    retires_chains: false,
};

const TABLES: [DailyTable; 5] = [CALLS, CONTENT, LLM_HEADERS, LLM_PIECES, SEARCH_BLOCKS];

/// A quoted SQL identifier.
pub(crate) fn quoted(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The name of `table`'s partition for `day`.
fn partition_name(table: &str, day: Date) -> String {
    format!(
        "{table}_p{:04}{:02}{:02}",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// The partitions of `table` that may hold `day`: its day partition, the month partition that
/// migration 0004 gives older days, and the DEFAULT partition (whichever of them exist).
pub(crate) fn partition_names_for(table: &str, day: Date) -> [String; 3] {
    [
        partition_name(table, day),
        format!("{table}_p{:04}{:02}", day.year(), u8::from(day.month())),
        format!("{table}_default"),
    ]
}

/// The days `[from, to)` a partition holds: one day for a name from [`partition_name`]
/// (`_pYYYYMMDD`), a calendar month for `_pYYYYMM` (migration 0004 gives the months of a long
/// history one partition each), `None` for any other name (DEFAULT).
fn partition_range(table: &str, name: &str) -> Option<(Date, Date)> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = digits.get(0..4)?.parse().ok()?;
    let month = time::Month::try_from(digits.get(4..6)?.parse::<u8>().ok()?).ok()?;
    match digits.len() {
        8 => {
            let day = Date::from_calendar_date(year, month, digits[6..8].parse().ok()?).ok()?;
            Some((day, day.next_day()?))
        }
        6 => {
            let first = Date::from_calendar_date(year, month, 1).ok()?;
            let next = match month {
                time::Month::December => {
                    Date::from_calendar_date(year + 1, time::Month::January, 1)
                }
                _ => Date::from_calendar_date(year, month.next(), 1),
            };
            Some((first, next.ok()?))
        }
        _ => None,
    }
}

/// Midnight UTC at the start of `day`.
fn start_of(day: Date) -> OffsetDateTime {
    day.with_time(Time::MIDNIGHT).assume_utc()
}

/// A timestamptz literal for a partition bound (DDL takes no parameters).
fn bound_literal(day: Date) -> String {
    format!(
        "'{:04}-{:02}-{:02} 00:00:00+00'",
        day.year(),
        u8::from(day.month()),
        day.day()
    )
}

/// The partitions of `table` with the days `[from, to)` they hold, oldest first; the DEFAULT
/// partition is not listed.
async fn day_partitions(
    pool: &PgPool,
    table: DailyTable,
) -> Result<Vec<(Date, Date, String)>, StoreError> {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass($1)",
    )
    .bind(quoted(table.name))
    .fetch_all(pool)
    .await?;
    let mut days: Vec<(Date, Date, String)> = names
        .into_iter()
        .filter_map(|name| partition_range(table.name, &name).map(|(from, to)| (from, to, name)))
        .collect();
    days.sort();
    Ok(days)
}

/// A transaction that waits at most [`LOCK_TIMEOUT`] for a table lock and holds the partition
/// lock.
async fn partition_transaction(pool: &PgPool) -> Result<Transaction<'_, Postgres>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_TIMEOUT).execute(&mut *tx).await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(PARTITION_LOCK)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

async fn exists(tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<bool, StoreError> {
    Ok(sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(quoted(name))
        .fetch_one(&mut **tx)
        .await?)
}

/// Creates `table`'s partition for `day` unless it exists, moving the rows of that day out of the
/// DEFAULT partition into it. Returns whether it created one.
async fn create_day(pool: &PgPool, table: DailyTable, day: Date) -> Result<bool, StoreError> {
    let name = partition_name(table.name, day);
    let mut tx = partition_transaction(pool).await?;
    if exists(&mut tx, &name).await? {
        tx.commit().await?;
        return Ok(false);
    }
    let Some(next) = day.next_day() else {
        // The last day `time` knows: its records stay in DEFAULT.
        tx.commit().await?;
        return Ok(false);
    };
    let parent = quoted(table.name);
    let default = quoted(&format!("{}_default", table.name));
    let held_sql = format!(
        r#"SELECT EXISTS (SELECT 1 FROM {default} WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2)"#
    );
    let held: bool = sqlx::query_scalar(&held_sql)
        .bind(start_of(day))
        .bind(start_of(next))
        .persistent(false)
        .fetch_one(&mut *tx)
        .await?;
    if held {
        let stage = format!("CREATE TEMP TABLE gatehouse_moved (LIKE {parent}) ON COMMIT DROP");
        sqlx::query(&stage)
            .persistent(false)
            .execute(&mut *tx)
            .await?;
        let take = format!(
            r#"WITH moved AS (DELETE FROM {default} WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2 RETURNING *) INSERT INTO gatehouse_moved SELECT * FROM moved"#
        );
        sqlx::query(&take)
            .bind(start_of(day))
            .bind(start_of(next))
            .persistent(false)
            .execute(&mut *tx)
            .await?;
    }
    let create = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {parent} FOR VALUES FROM ({}) TO ({}){}",
        quoted(&name),
        bound_literal(day),
        bound_literal(next),
        table.storage
    );
    sqlx::query(&create)
        .persistent(false)
        .execute(&mut *tx)
        .await?;
    copy_statistics_targets(&mut tx, table, &name).await?;
    if held {
        let put = format!(
            "INSERT INTO {} SELECT * FROM gatehouse_moved",
            quoted(&name)
        );
        let moved = sqlx::query(&put)
            .persistent(false)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tracing::info!(
            partition = %name,
            moved,
            "audit store: rows moved from the DEFAULT partition into their day's new partition"
        );
    }
    tx.commit().await?;
    Ok(true)
}

/// Gives a new partition the planner statistics targets its parent's columns have (PostgreSQL
/// copies them to the partitions that exist when they are set, not to later ones). Migration
/// 0005 keeps a detailed sample of the full-text vector, so that a rare search term is estimated
/// as rare and looked up through the full-text index.
async fn copy_statistics_targets(
    tx: &mut Transaction<'_, Postgres>,
    table: DailyTable,
    partition: &str,
) -> Result<(), StoreError> {
    let targets: Vec<(String, i32)> = sqlx::query_as(
        "SELECT attname::text, attstattarget::int4 FROM pg_attribute \
         WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped AND attstattarget > 0",
    )
    .bind(quoted(table.name))
    .persistent(false)
    .fetch_all(&mut **tx)
    .await?;
    for (column, target) in targets {
        let set = format!(
            "ALTER TABLE {} ALTER COLUMN {} SET STATISTICS {target}",
            quoted(partition),
            quoted(&column)
        );
        sqlx::query(&set)
            .persistent(false)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

/// The days (UTC) that the DEFAULT partition of `table` holds rows for within `[from, to)`.
async fn default_days(
    pool: &PgPool,
    table: DailyTable,
    from: Date,
    to: Date,
) -> Result<Vec<Date>, StoreError> {
    let sql = format!(
        r#"SELECT DISTINCT ("TimeGenerated" AT TIME ZONE 'UTC')::date FROM {} WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2"#,
        quoted(&format!("{}_default", table.name))
    );
    Ok(sqlx::query_scalar(&sql)
        .bind(start_of(from))
        .bind(start_of(to))
        .persistent(false)
        .fetch_all(pool)
        .await?)
}

/// What [`drop_days_before`] dropped.
#[derive(Debug, Default)]
pub(crate) struct Dropped {
    /// Rows the dropped partitions held, per table, in the order the tables were given.
    pub(crate) rows: Vec<u64>,
    /// Partitions dropped.
    pub(crate) partitions: u64,
    /// Transactions used: one a day (or month) of partitions.
    pub(crate) transactions: u64,
}

/// Drops the whole partitions of `tables` that end at or before `cutoff`, counting their rows
/// first. The partitions of the same days go in one short transaction, so that (for the content
/// tables) no one sees a day's bodies without its pieces or the other way round.
pub(crate) async fn drop_days_before(
    pool: &PgPool,
    tables: &[DailyTable],
    cutoff: OffsetDateTime,
) -> Result<Dropped, StoreError> {
    let mut days: BTreeMap<(Date, Date), Vec<(usize, String)>> = BTreeMap::new();
    for (i, table) in tables.iter().enumerate() {
        for (from, to, name) in day_partitions(pool, *table).await? {
            days.entry((from, to)).or_default().push((i, name));
        }
    }
    let mut dropped = Dropped {
        rows: vec![0; tables.len()],
        ..Dropped::default()
    };
    for ((_, to), partitions) in days {
        if start_of(to) > cutoff {
            break;
        }
        let mut tx = partition_transaction(pool).await?;
        // Every partition of the day locked and counted before the first is dropped: a drop
        // takes its parent's exclusive lock until the commit, and a count of a day's content
        // after it would keep every write and read of that parent's table waiting that long.
        let mut counted = Vec::with_capacity(partitions.len());
        for (i, name) in partitions {
            if !exists(&mut tx, &name).await? {
                continue;
            }
            let partition = quoted(&name);
            // A late write into the old day waits for the drop (and then lands in DEFAULT), so
            // that the count is exactly what is dropped.
            let lock = format!("LOCK TABLE {partition} IN EXCLUSIVE MODE");
            sqlx::query(&lock)
                .persistent(false)
                .execute(&mut *tx)
                .await?;
            let count = format!("SELECT count(*) FROM {partition}");
            let held: i64 = sqlx::query_scalar(&count)
                .persistent(false)
                .fetch_one(&mut *tx)
                .await?;
            if tables[i].retires_chains {
                let retire = postgres_retire_partition(&partition);
                sqlx::query(&retire)
                    .persistent(false)
                    .execute(&mut *tx)
                    .await?;
            }
            counted.push((i, partition, held));
        }
        for (i, partition, held) in counted {
            let drop = format!("DROP TABLE {partition}");
            sqlx::query(&drop)
                .persistent(false)
                .execute(&mut *tx)
                .await?;
            dropped.rows[i] += u64::try_from(held).unwrap_or(0);
            dropped.partitions += 1;
        }
        tx.commit().await?;
        dropped.transactions += 1;
    }
    Ok(dropped)
}

impl SqlStore {
    /// PostgreSQL: creates the daily partitions of every partitioned table for yesterday to
    /// [`DAYS_AHEAD`] days ahead (UTC), and for the days within [`DEFAULT_DAYS_BACK`] days that
    /// the DEFAULT partition holds rows for, moving those rows into them. Safe to run from
    /// several gateways at once. Returns how many partitions it created; nothing to do on SQLite.
    pub async fn maintain_partitions(&self) -> Result<u64, StoreError> {
        let today = OffsetDateTime::now_utc().date();
        let first = today - Duration::days(1);
        let last = today + Duration::days(DAYS_AHEAD);
        let mut created = self.create_partitions(first, last).await?;
        if let Engine::Postgres { pool, .. } = &self.engine {
            let end = last + Duration::days(1);
            for table in TABLES {
                let days =
                    default_days(pool, table, today - Duration::days(DEFAULT_DAYS_BACK), end)
                        .await?;
                for day in days {
                    if create_day(pool, table, day).await? {
                        created += 1;
                    }
                }
            }
        }
        Ok(created)
    }

    /// PostgreSQL: creates the daily partitions of every partitioned table for the UTC days
    /// `first..=last` that have none, moving the rows the DEFAULT partition holds for those days
    /// into them. Returns how many it created; nothing to do on SQLite.
    pub async fn create_partitions(&self, first: Date, last: Date) -> Result<u64, StoreError> {
        let Engine::Postgres { pool, .. } = &self.engine else {
            return Ok(0);
        };
        let mut created = 0;
        for table in TABLES {
            let existing = day_partitions(pool, table).await?;
            let covered = |day: Date| {
                existing
                    .iter()
                    .any(|(from, to, _)| *from <= day && day < *to)
            };
            let mut day = first;
            while day <= last {
                if !covered(day) && create_day(pool, table, day).await? {
                    created += 1;
                }
                match day.next_day() {
                    Some(next) => day = next,
                    None => break,
                }
            }
        }
        Ok(created)
    }
}

#[cfg(test)]
mod tests {
    use time::macros::date;

    use super::*;

    #[test]
    fn a_day_may_be_in_its_day_month_or_default_partition() {
        let day = Date::from_calendar_date(2026, time::Month::March, 7).unwrap();
        assert_eq!(
            partition_names_for("T", day),
            ["T_p20260307", "T_p202603", "T_default"].map(String::from)
        );
        for name in &partition_names_for("T", day)[..2] {
            let (from, to) = partition_range("T", name).unwrap();
            assert!(from <= day && day < to, "{name}");
        }
    }

    #[test]
    fn partition_names_round_trip() {
        let table = "GatehouseCallContent";
        let name = partition_name(table, date!(2026 - 12 - 01));
        assert_eq!(name, "GatehouseCallContent_p20261201");
        assert_eq!(
            partition_range(table, &name),
            Some((date!(2026 - 12 - 01), date!(2026 - 12 - 02)))
        );
        assert_eq!(
            partition_range(table, "GatehouseCallContent_p202612"),
            Some((date!(2026 - 12 - 01), date!(2027 - 01 - 01)))
        );
        assert_eq!(
            partition_range(table, "GatehouseCallContent_p202602"),
            Some((date!(2026 - 02 - 01), date!(2026 - 03 - 01)))
        );
        assert_eq!(partition_range(table, "GatehouseCallContent_default"), None);
        assert_eq!(partition_range("GatehouseGatewayLogs", &name), None);
        assert_eq!(
            partition_range(table, "GatehouseCallContent_p20261332"),
            None
        );
        assert_eq!(
            partition_range(table, "GatehouseCallContent_p2026120"),
            None
        );
        assert_eq!(
            bound_literal(date!(2026 - 12 - 01)),
            "'2026-12-01 00:00:00+00'"
        );
    }
}

//! Retention: content (bodies, prompt and completion pieces, full text) can expire before the
//! metadata rows. SQLite removes both in small batches, each its own short transaction, so that
//! the writer is never locked out for long; PostgreSQL drops the whole daily partitions older than
//! the cutoff (see `partitions.rs`) and deletes the rest of the cutoff's day in such batches.
//!
//! A call's content goes whole or not at all: its bodies and its prompt and completion pieces are
//! removed in one transaction (on PostgreSQL, a day's partitions of both tables are dropped in
//! one), so that a verification of its chain, which reads a record and its pieces from one
//! snapshot, finds either all of the content the record was linked with or none of it; never
//! a part, which it could not tell from a change.
//!
//! Rollups are aggregates without content and are kept. So that a call removed here and
//! replayed later from a journal is not counted in them twice, the removal of calls notes how far
//! it removed each audit chain (`retired_chains`).

use serde::Serialize;
use time::OffsetDateTime;

use super::partitions::{
    CALLS, CONTENT, DailyTable, LLM_HEADERS, LLM_PIECES, SEARCH_BLOCKS, drop_days_before, quoted,
};
use super::retired_chains::{SQLITE_RETIRE_CALLS, postgres_expire_calls};
use super::search_index::SearchIndex;
use super::{Engine, SqlStore, StoreError, search_blocks, sqlite_time};

/// What a retention run removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RetentionReport {
    /// Calls whose bodies and full text were removed.
    pub content_removed: u64,
    /// Prompt and completion pieces removed from the LLM log.
    pub message_pieces_removed: u64,
    /// Calls whose metadata rows were removed.
    pub metadata_removed: u64,
    /// Transactions used.
    pub batches: u64,
    /// Whole daily partitions dropped (PostgreSQL; their rows are counted above).
    pub partitions_dropped: u64,
}

impl SqlStore {
    /// Removes content older than `content_before` and whole calls older than `metadata_before`,
    /// `batch` rows per transaction. Content of a call always goes no later than its metadata.
    pub async fn enforce_retention(
        &self,
        content_before: OffsetDateTime,
        metadata_before: OffsetDateTime,
        batch: u32,
    ) -> Result<RetentionReport, StoreError> {
        let content_before = content_before.max(metadata_before);
        let batch = i64::from(batch.max(1));
        let mut report = RetentionReport::default();
        match &self.engine {
            Engine::Sqlite { writer, search, .. } => {
                let content_cutoff = sqlite_time(content_before);
                let metadata_cutoff = sqlite_time(metadata_before);
                // Content call by call, a batch at a time: the calls with bodies, then any with
                // pieces only. A call's pieces and bodies go in one transaction, so that no one
                // (a verification of its chain above all) ever sees a call with one and not the
                // other.
                for expired in [EXPIRED_BODIES, EXPIRED_PIECES] {
                    loop {
                        let mut calls: Vec<(String, Option<i64>)> = sqlx::query_as(expired)
                            .bind(&content_cutoff)
                            .bind(batch)
                            .fetch_all(writer)
                            .await?;
                        let full = calls.len() as i64 >= batch;
                        let mut seen = std::collections::HashSet::new();
                        calls.retain(|(id, _)| seen.insert(id.clone()));
                        let (bodies, pieces) = remove_content(writer, search, &calls).await?;
                        report.batches += 1;
                        report.content_removed += bodies;
                        report.message_pieces_removed += pieces;
                        if !full {
                            break;
                        }
                    }
                }
                loop {
                    // IMMEDIATE: it reads before it writes (see `write`'s batch).
                    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
                    let ids: Vec<String> = sqlx::query_scalar(
                        "SELECT CorrelationId FROM GatehouseGatewayLogs WHERE TimeGenerated < ? ORDER BY TimeGenerated LIMIT ?",
                    )
                    .bind(&metadata_cutoff)
                    .bind(batch)
                    .fetch_all(&mut *tx)
                    .await?;
                    // How far each chain was removed, with the removal (`retired_chains`).
                    if !ids.is_empty() {
                        let json = serde_json::to_string(&ids).map_err(|error| {
                            StoreError::Database(sqlx::Error::Encode(Box::new(error)))
                        })?;
                        sqlx::query(SQLITE_RETIRE_CALLS)
                            .bind(json)
                            .execute(&mut *tx)
                            .await?;
                    }
                    for id in &ids {
                        sqlx::query(
                            "DELETE FROM ApiManagementGatewayLlmLog WHERE CorrelationId = ?",
                        )
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                        sqlx::query("DELETE FROM GatehouseGatewayLogs WHERE CorrelationId = ?")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    report.batches += 1;
                    report.metadata_removed += ids.len() as u64;
                    if (ids.len() as i64) < batch {
                        break;
                    }
                }
            }
            Engine::Postgres { pool, .. } => {
                // The DEFAULT partitions' rows of recent days go to their own partitions first,
                // and the coming days get theirs.
                self.maintain_partitions().await?;
                let r = &mut report;
                // A call's bodies and pieces go in one transaction (a day's partitions of both
                // tables together), then the pieces of any call captured without bodies.
                let (content, mut pieces) = expire_content(pool, content_before, batch, r).await?;
                pieces += expire(pool, LLM_PIECES, content_before, batch, r).await?;
                // A block of the word index is dated at its calls' UTC midnight: it goes once
                // its whole day is past the content cutoff, so that no call left of the cutoff's
                // day loses the block that finds it.
                let blocks_before = search_blocks::day_start(content_before);
                expire(pool, SEARCH_BLOCKS, blocks_before, batch, r).await?;
                let metadata = expire(pool, CALLS, metadata_before, batch, r).await?;
                expire(pool, LLM_HEADERS, metadata_before, batch, r).await?;
                report.content_removed += content;
                report.message_pieces_removed += pieces;
                report.metadata_removed += metadata;
            }
        }
        // Retention runs hourly: a good moment to refresh the planner's statistics.
        self.optimize().await?;
        Ok(report)
    }
}

/// SQLite: calls with bodies older than the cutoff (`?1`), at most `?2` of them, oldest first, with
/// their `RecordId` (none when their metadata is gone).
const EXPIRED_BODIES: &str = "SELECT c.CorrelationId, l.RecordId FROM GatehouseCallContent c \
     LEFT JOIN GatehouseGatewayLogs l ON l.CorrelationId = c.CorrelationId \
     WHERE c.TimeGenerated < ?1 ORDER BY c.TimeGenerated LIMIT ?2";

/// SQLite: calls with prompt or completion pieces older than the cutoff, as [`EXPIRED_BODIES`]:
/// those captured without bodies, once the calls with bodies are gone. Read through the pieces'
/// time index, so that only expired pieces are read: grouped by call without it, the planner
/// walks the whole table in key order, on the one writer connection, at every run.
/// A row a piece (a call with several pieces comes back once for each; the caller keeps one):
/// grouped by call in SQL, every expired piece would be read and sorted for each batch.
const EXPIRED_PIECES: &str = "SELECT m.CorrelationId, l.RecordId \
     FROM ApiManagementGatewayLlmLog m INDEXED BY ApiManagementGatewayLlmLog_Pieces \
     LEFT JOIN GatehouseGatewayLogs l ON l.CorrelationId = m.CorrelationId \
     WHERE m.SequenceNumber > 0 AND m.TimeGenerated < ?1 \
     ORDER BY m.TimeGenerated LIMIT ?2";

/// SQLite: removes the content of `calls` (correlation id, `RecordId`): their full-text entries,
/// then their LLM-log pieces and bodies in one transaction. The index's order lock is held
/// throughout, so that its catch-up, which indexes calls from their pieces, cannot index one of
/// them in between. A run stopped between the two steps finds the content again next time.
/// Returns (calls whose bodies were removed, pieces removed).
async fn remove_content(
    writer: &sqlx::SqlitePool,
    search: &SearchIndex,
    calls: &[(String, Option<i64>)],
) -> Result<(u64, u64), StoreError> {
    if calls.is_empty() {
        return Ok((0, 0));
    }
    let order = search.lock().await;
    let record_ids: Vec<i64> = calls.iter().filter_map(|(_, id)| *id).collect();
    search.remove_holding(&order, &record_ids).await?;
    let mut tx = writer.begin().await?;
    let (mut bodies, mut pieces) = (0, 0);
    for (id, _) in calls {
        pieces += sqlx::query(
            "DELETE FROM ApiManagementGatewayLlmLog WHERE CorrelationId = ? AND SequenceNumber > 0",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        bodies += sqlx::query("DELETE FROM GatehouseCallContent WHERE CorrelationId = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
    }
    tx.commit().await?;
    Ok((bodies, pieces))
}

/// PostgreSQL: removes the bodies older than `cutoff` and the pieces of the same calls: the whole
/// day partitions of both tables that end by the cutoff, a day per transaction, then the rest a
/// batch of calls per statement. Returns (calls whose bodies were removed, pieces removed).
async fn expire_content(
    pool: &sqlx::PgPool,
    cutoff: OffsetDateTime,
    batch: i64,
    report: &mut RetentionReport,
) -> Result<(u64, u64), StoreError> {
    // The pieces' partition first, then the bodies': the order in which a batch's content
    // transaction writes them (`write`), so that the two never wait for each other (a drop takes
    // its parent table whole; in the other order PostgreSQL found a deadlock and aborted one).
    let dropped = drop_days_before(pool, &[LLM_PIECES, CONTENT], cutoff).await?;
    report.partitions_dropped += dropped.partitions;
    report.batches += dropped.transactions;
    let (mut pieces, mut calls) = (dropped.rows[0], dropped.rows[1]);
    loop {
        let (removed, removed_pieces): (i64, i64) = sqlx::query_as(
            r#"WITH gone AS (
                   DELETE FROM "GatehouseCallContent"
                   WHERE "TimeGenerated" < $1 AND ("CorrelationId", "TimeGenerated") IN (
                       SELECT "CorrelationId", "TimeGenerated" FROM "GatehouseCallContent"
                       WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2)
                   RETURNING "CorrelationId", "TimeGenerated"),
               pieces AS (
                   DELETE FROM "GatehouseLlmLogPieces" p USING gone
                   WHERE p."TimeGenerated" < $1
                     AND p."CorrelationId" = gone."CorrelationId"
                     AND p."TimeGenerated" = gone."TimeGenerated"
                   RETURNING 1)
               SELECT (SELECT count(*) FROM gone), (SELECT count(*) FROM pieces)"#,
        )
        .bind(cutoff)
        .bind(batch)
        .fetch_one(pool)
        .await?;
        report.batches += 1;
        calls += u64::try_from(removed).unwrap_or(0);
        pieces += u64::try_from(removed_pieces).unwrap_or(0);
        if removed < batch {
            return Ok((calls, pieces));
        }
    }
}

/// Removes the rows of `table` older than `cutoff`: drops the day partitions that end by the cutoff
/// whole, then deletes what is left (rows of the day that holds the cutoff, and any in the DEFAULT
/// partition), `batch` rows per transaction, so that the window is exact. Returns how many rows.
async fn expire(
    pool: &sqlx::PgPool,
    table: DailyTable,
    cutoff: OffsetDateTime,
    batch: i64,
    report: &mut RetentionReport,
) -> Result<u64, StoreError> {
    let dropped = drop_days_before(pool, &[table], cutoff).await?;
    report.partitions_dropped += dropped.partitions;
    report.batches += dropped.transactions;
    let name = quoted(table.name);
    let key = table.key;
    // Each statement answers how many rows it deleted; that of calls also notes how far each
    // chain was removed (`retired_chains`).
    let sql = if table.retires_chains {
        postgres_expire_calls(&name, key)
    } else {
        format!(
            r#"WITH gone AS (DELETE FROM {name} WHERE "TimeGenerated" < $1 AND ({key}) IN (SELECT {key} FROM {name} WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2) RETURNING 1) SELECT count(*) FROM gone"#
        )
    };
    let mut deleted = dropped.rows[0];
    loop {
        let removed: i64 = sqlx::query_scalar(&sql)
            .bind(cutoff)
            .bind(batch)
            .fetch_one(pool)
            .await?;
        report.batches += 1;
        deleted += u64::try_from(removed).unwrap_or(0);
        if removed < batch {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Retention's read of expired pieces goes through the pieces' time index and sorts nothing:
    /// it reads the expired pieces only, not the whole table (`EXPLAIN QUERY PLAN`).
    #[tokio::test]
    async fn expired_pieces_are_read_through_their_time_index() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("audit.db").display());
        let store = SqlStore::open(&url).await.unwrap();
        let pool = store.sqlite_pool().unwrap();
        let explain = ["EXPLAIN QUERY PLAN ", EXPIRED_PIECES].concat();
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&explain)
            .bind("2026-01-01T00:00:00Z")
            .bind(500_i64)
            .fetch_all(pool)
            .await
            .unwrap();
        let steps: Vec<&str> = plan.iter().map(|(_, _, _, step)| step.as_str()).collect();
        assert!(
            steps
                .iter()
                .any(|step| step.contains("USING INDEX ApiManagementGatewayLlmLog_Pieces")),
            "{steps:?}"
        );
        assert!(
            !steps.iter().any(|step| step.contains("TEMP B-TREE")),
            "{steps:?}"
        );
    }
}

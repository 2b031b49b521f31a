//! Retention: content (bodies, prompt and completion pieces, full text) can expire before the
//! metadata rows. SQLite removes both in small batches, each its own short transaction, so that
//! the writer is never locked out for long; PostgreSQL drops the whole daily partitions older than
//! the cutoff (see `partitions.rs`) and deletes the rest of the cutoff's day in such batches.
//!
//! Rollups are aggregates without content and are kept.

use serde::Serialize;
use time::OffsetDateTime;

use super::partitions::{
    CALLS, CONTENT, DailyTable, LLM_HEADERS, LLM_PIECES, SEARCH_BLOCKS, drop_days_before, quoted,
};
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
                // The LLM log's pieces before the full-text index: the index's catch-up reads them,
                // so once they are gone it cannot index an expired call again after the loop
                // below has removed it.
                loop {
                    let removed = sqlx::query(
                        "DELETE FROM ApiManagementGatewayLlmLog WHERE rowid IN (SELECT rowid FROM ApiManagementGatewayLlmLog WHERE SequenceNumber > 0 AND TimeGenerated < ? LIMIT ?)",
                    )
                    .bind(&content_cutoff)
                    .bind(batch)
                    .execute(writer)
                    .await?
                    .rows_affected();
                    report.batches += 1;
                    report.message_pieces_removed += removed;
                    if (removed as i64) < batch {
                        break;
                    }
                }
                loop {
                    let expired: Vec<(String, Option<i64>)> = sqlx::query_as(
                        "SELECT c.CorrelationId, l.RecordId FROM GatehouseCallContent c LEFT JOIN GatehouseGatewayLogs l ON l.CorrelationId = c.CorrelationId WHERE c.TimeGenerated < ? ORDER BY c.TimeGenerated LIMIT ?",
                    )
                    .bind(&content_cutoff)
                    .bind(batch)
                    .fetch_all(writer)
                    .await?;
                    // The full-text index (its own file) first: a run stopped in between finds
                    // the content again next time and removes it then.
                    let record_ids: Vec<i64> = expired.iter().filter_map(|(_, id)| *id).collect();
                    search.remove(&record_ids).await?;
                    let mut tx = writer.begin().await?;
                    for (id, _) in &expired {
                        sqlx::query("DELETE FROM GatehouseCallContent WHERE CorrelationId = ?")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    report.batches += 1;
                    report.content_removed += expired.len() as u64;
                    if (expired.len() as i64) < batch {
                        break;
                    }
                }
                loop {
                    let mut tx = writer.begin().await?;
                    let ids: Vec<String> = sqlx::query_scalar(
                        "SELECT CorrelationId FROM GatehouseGatewayLogs WHERE TimeGenerated < ? ORDER BY TimeGenerated LIMIT ?",
                    )
                    .bind(&metadata_cutoff)
                    .bind(batch)
                    .fetch_all(&mut *tx)
                    .await?;
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
                let content = expire(pool, CONTENT, content_before, batch, r).await?;
                let pieces = expire(pool, LLM_PIECES, content_before, batch, r).await?;
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
    let (dropped_rows, dropped) = drop_days_before(pool, table, cutoff).await?;
    report.partitions_dropped += dropped;
    report.batches += dropped;
    let name = quoted(table.name);
    let key = table.key;
    let sql = format!(
        r#"DELETE FROM {name} WHERE "TimeGenerated" < $1 AND ({key}) IN (SELECT {key} FROM {name} WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2)"#
    );
    let mut deleted = dropped_rows;
    loop {
        let removed = sqlx::query(&sql)
            .bind(cutoff)
            .bind(batch)
            .execute(pool)
            .await?
            .rows_affected();
        report.batches += 1;
        deleted += removed;
        if (removed as i64) < batch {
            return Ok(deleted);
        }
    }
}

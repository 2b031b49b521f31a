//! Retention: content (bodies, prompt and completion pieces, full text) can expire before the
//! metadata rows, and both are removed in small batches, each its own short transaction, so that
//! the writer is never locked out for long.
//!
//! Rollups are aggregates without content and are kept.

use serde::Serialize;
use sqlx::Row;
use time::OffsetDateTime;

use super::{Engine, SqlStore, StoreError, sqlite_time};

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
            Engine::Sqlite { writer, .. } => {
                let content_cutoff = sqlite_time(content_before);
                let metadata_cutoff = sqlite_time(metadata_before);
                loop {
                    let mut tx = writer.begin().await?;
                    let ids: Vec<String> = sqlx::query_scalar(
                        "SELECT CorrelationId FROM GatehouseCallContent WHERE TimeGenerated < ? ORDER BY TimeGenerated LIMIT ?",
                    )
                    .bind(&content_cutoff)
                    .bind(batch)
                    .fetch_all(&mut *tx)
                    .await?;
                    for id in &ids {
                        sqlx::query("DELETE FROM GatehouseContentSearch WHERE rowid = (SELECT RecordId FROM GatehouseGatewayLogs WHERE CorrelationId = ?)")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                        sqlx::query("DELETE FROM GatehouseCallContent WHERE CorrelationId = ?")
                            .bind(id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    tx.commit().await?;
                    report.batches += 1;
                    report.content_removed += ids.len() as u64;
                    if (ids.len() as i64) < batch {
                        break;
                    }
                }
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
            Engine::Postgres(pool) => {
                loop {
                    let removed = sqlx::query(
                        r#"DELETE FROM "GatehouseCallContent" WHERE "CorrelationId" IN (SELECT "CorrelationId" FROM "GatehouseCallContent" WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2)"#,
                    )
                    .bind(content_before)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected();
                    report.batches += 1;
                    report.content_removed += removed;
                    if (removed as i64) < batch {
                        break;
                    }
                }
                loop {
                    let removed = sqlx::query(
                        r#"DELETE FROM "ApiManagementGatewayLlmLog" WHERE ctid IN (SELECT ctid FROM "ApiManagementGatewayLlmLog" WHERE "SequenceNumber" > 0 AND "TimeGenerated" < $1 LIMIT $2)"#,
                    )
                    .bind(content_before)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected();
                    report.batches += 1;
                    report.message_pieces_removed += removed;
                    if (removed as i64) < batch {
                        break;
                    }
                }
                loop {
                    let mut tx = pool.begin().await?;
                    let ids: Vec<String> = sqlx::query(
                        r#"DELETE FROM "GatehouseGatewayLogs" WHERE "RecordId" IN (SELECT "RecordId" FROM "GatehouseGatewayLogs" WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2) RETURNING "CorrelationId""#,
                    )
                    .bind(metadata_before)
                    .bind(batch)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map(|row| row.try_get(0))
                    .collect::<Result<_, _>>()?;
                    sqlx::query(r#"DELETE FROM "ApiManagementGatewayLlmLog" WHERE "CorrelationId" = ANY($1)"#)
                        .bind(&ids)
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    report.batches += 1;
                    report.metadata_removed += ids.len() as u64;
                    if (ids.len() as i64) < batch {
                        break;
                    }
                }
            }
        }
        // Retention runs hourly: a good moment to refresh the planner's statistics.
        self.optimize().await?;
        Ok(report)
    }
}

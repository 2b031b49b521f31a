//! Verifying the hash chains of stored records: each record is rebuilt from its rows, field for
//! field, and fed to the chain verifier in (chain, sequence) order.

use gatehouse_schema::audit::{BackendAttempt, ChainLink, TokenUsage};
use gatehouse_schema::{AuditRecord, OperationId};
use sqlx::types::Json;
use sqlx::{Row, Sqlite};
use time::OffsetDateTime;

use super::{Engine, SqlStore, StoreError, sqlite_time};
use crate::chain::{Verifier, VerifyReport};

/// How far around a verified range the records of a chain that spans it are looked for: a chain
/// holds the records of one UTC day.
const CHAIN_SPAN: time::Duration = time::Duration::days(1);

fn count(value: Option<i64>) -> u64 {
    value.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// Rebuilds the metadata part of a record from a row of `ApiManagementGatewayLogs`.
macro_rules! record_from_row {
    ($row:expr, $time:expr) => {{
        let row = $row;
        let prompt: Option<i64> = row.try_get("PromptTokens")?;
        let usage = match prompt {
            None => None,
            Some(prompt) => Some(TokenUsage {
                prompt_tokens: count(Some(prompt)),
                completion_tokens: count(row.try_get("CompletionTokens")?),
                total_tokens: count(row.try_get("TotalTokens")?),
                cached_tokens: count(row.try_get("CachedTokens")?),
                reasoning_tokens: count(row.try_get("ReasoningTokens")?),
                is_estimate: row.try_get("TokensEstimated")?,
            }),
        };
        let chain = match (
            row.try_get::<Option<String>, _>("ChainId")?,
            row.try_get::<Option<i64>, _>("ChainSequence")?,
            row.try_get::<Option<String>, _>("PreviousHash")?,
            row.try_get::<Option<String>, _>("RecordHash")?,
        ) {
            (Some(chain_id), Some(sequence), Some(previous_hash), Some(record_hash)) => {
                Some(ChainLink {
                    chain_id,
                    sequence: count(Some(sequence)),
                    previous_hash,
                    record_hash,
                    content_hash: row
                        .try_get::<Option<String>, _>("ContentHash")?
                        .unwrap_or_default(),
                })
            }
            _ => None,
        };
        let operation: String = row.try_get("OperationId")?;
        let Json(groups): Json<Vec<String>> = row.try_get("Groups")?;
        let Json(attempts): Json<Vec<BackendAttempt>> = row.try_get("Attempts")?;
        let response_code: i32 = row.try_get("ResponseCode")?;
        let backend_code: Option<i32> = row.try_get("BackendResponseCode")?;
        AuditRecord {
            time_generated: $time,
            correlation_id: row.try_get("CorrelationId")?,
            gateway_id: row.try_get("GatewayId")?,
            operation_id: OperationId::parse(&operation),
            caller_ip_address: row.try_get("CallerIpAddress")?,
            peer_ip_address: row.try_get("PeerIpAddress")?,
            method: row.try_get("Method")?,
            url: row.try_get("Url")?,
            client_protocol: row.try_get("ClientProtocol")?,
            response_code: u16::try_from(response_code).unwrap_or(0),
            is_request_success: row.try_get("IsRequestSuccess")?,
            backend_response_code: backend_code.and_then(|c| u16::try_from(c).ok()),
            backend_id: row.try_get("BackendId")?,
            backend_url: row.try_get("BackendUrl")?,
            request_size: count(row.try_get("RequestSize")?),
            response_size: count(row.try_get("ResponseSize")?),
            total_time: count(row.try_get("TotalTime")?),
            backend_time: count(row.try_get("BackendTime")?),
            time_to_first_byte: row
                .try_get::<Option<i64>, _>("TimeToFirstByte")?
                .map(|v| count(Some(v))),
            apim_subscription_id: row.try_get("ApimSubscriptionId")?,
            product_id: row.try_get("ProductId")?,
            user_id: row.try_get("UserId")?,
            user_name: row.try_get("UserName")?,
            tenant_id: row.try_get("EntraTenantId")?,
            groups,
            deployment_name: row.try_get("DeploymentName")?,
            model_name: row.try_get("ModelName")?,
            api_version: row.try_get("ApiVersion")?,
            is_stream_completion: row.try_get("IsStreamCompletion")?,
            usage,
            attempts,
            backend_request_body: row.try_get("BackendRequestBody")?,
            request_body_truncated: row.try_get("RequestBodyTruncated")?,
            backend_response_body: row.try_get("BackendResponseBody")?,
            response_body_truncated: row.try_get("ResponseBodyTruncated")?,
            request_messages: None,
            response_messages: None,
            client_aborted: row.try_get("ClientAborted")?,
            last_error_reason: row.try_get("LastErrorReason")?,
            last_error_message: row.try_get("LastErrorMessage")?,
            chain,
        }
    }};
}

fn join(pieces: Vec<Option<String>>) -> Option<String> {
    let pieces: Vec<String> = pieces.into_iter().flatten().collect();
    (!pieces.is_empty()).then(|| pieces.concat())
}

impl SqlStore {
    /// Verifies every chain with a record in `[from, to)`, or with records on both sides of it
    /// (every record it had in the range was removed), whole, and names the first record of each
    /// that was changed, removed, reordered or forked. Content removed by retention is not a
    /// break. A chain holds one UTC day of one gateway, so the records on both sides are looked
    /// for within a day of the range ([`CHAIN_SPAN`]), on the time index.
    pub async fn verify_chains(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<VerifyReport, StoreError> {
        let mut verifier = Verifier::new();
        match &self.engine {
            Engine::Sqlite { reader, .. } => {
                let chains: Vec<String> = sqlx::query_scalar(
                    "SELECT ChainId FROM GatehouseGatewayLogs WHERE TimeGenerated >= ?1 AND TimeGenerated < ?2 AND ChainId IS NOT NULL \
                     UNION \
                     SELECT * FROM (SELECT ChainId FROM GatehouseGatewayLogs WHERE TimeGenerated >= ?3 AND TimeGenerated < ?1 AND ChainId IS NOT NULL \
                     INTERSECT \
                     SELECT ChainId FROM GatehouseGatewayLogs WHERE TimeGenerated >= ?2 AND TimeGenerated < ?4 AND ChainId IS NOT NULL) \
                     ORDER BY 1",
                )
                .bind(sqlite_time(from))
                .bind(sqlite_time(to))
                .bind(sqlite_time(from - CHAIN_SPAN))
                .bind(sqlite_time(to + CHAIN_SPAN))
                .fetch_all(reader)
                .await?;
                for chain in chains {
                    let rows = sqlx::query::<Sqlite>("SELECT * FROM ApiManagementGatewayLogs WHERE ChainId = ? ORDER BY ChainSequence")
                        .bind(&chain)
                        .fetch_all(reader)
                        .await?;
                    for row in &rows {
                        let time: String = row.try_get("TimeGenerated")?;
                        let time = OffsetDateTime::parse(
                            &time,
                            &time::format_description::well_known::Rfc3339,
                        )
                        .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?;
                        let mut record = record_from_row!(row, time);
                        let pieces = sqlx::query("SELECT RequestMessages, ResponseMessages FROM ApiManagementGatewayLlmLog WHERE CorrelationId = ? AND SequenceNumber > 0 ORDER BY SequenceNumber")
                            .bind(&record.correlation_id)
                            .fetch_all(reader)
                            .await?;
                        record.request_messages = join(
                            pieces
                                .iter()
                                .map(|p| p.try_get(0))
                                .collect::<Result<_, _>>()?,
                        );
                        record.response_messages = join(
                            pieces
                                .iter()
                                .map(|p| p.try_get(1))
                                .collect::<Result<_, _>>()?,
                        );
                        verifier.check(record);
                    }
                }
            }
            Engine::Postgres { pool, .. } => {
                let chains: Vec<String> = sqlx::query_scalar(
                    r#"SELECT "ChainId" FROM "GatehouseGatewayLogs" WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2 AND "ChainId" IS NOT NULL
                       UNION
                       (SELECT "ChainId" FROM "GatehouseGatewayLogs" WHERE "TimeGenerated" >= $3 AND "TimeGenerated" < $1 AND "ChainId" IS NOT NULL
                        INTERSECT
                        SELECT "ChainId" FROM "GatehouseGatewayLogs" WHERE "TimeGenerated" >= $2 AND "TimeGenerated" < $4 AND "ChainId" IS NOT NULL)
                       ORDER BY 1"#,
                )
                .bind(from)
                .bind(to)
                .bind(from - CHAIN_SPAN)
                .bind(to + CHAIN_SPAN)
                .fetch_all(pool)
                .await?;
                for chain in chains {
                    // No time bound: a record whose TimeGenerated was moved to another day is
                    // still found, and named as changed.
                    let rows = sqlx::query(r#"SELECT * FROM "ApiManagementGatewayLogs" WHERE "ChainId" = $1 ORDER BY "ChainSequence""#)
                        .bind(&chain)
                        .fetch_all(pool)
                        .await?;
                    for row in &rows {
                        let time: OffsetDateTime = row.try_get("TimeGenerated")?;
                        let mut record = record_from_row!(row, time);
                        // The record's time names the day partition of its pieces.
                        let pieces = sqlx::query(r#"SELECT "RequestMessages", "ResponseMessages" FROM "GatehouseLlmLogPieces" WHERE "CorrelationId" = $1 AND "TimeGenerated" = $2 ORDER BY "SequenceNumber""#)
                            .bind(&record.correlation_id)
                            .bind(time)
                            .fetch_all(pool)
                            .await?;
                        record.request_messages = join(
                            pieces
                                .iter()
                                .map(|p| p.try_get(0))
                                .collect::<Result<_, _>>()?,
                        );
                        record.response_messages = join(
                            pieces
                                .iter()
                                .map(|p| p.try_get(1))
                                .collect::<Result<_, _>>()?,
                        );
                        verifier.check(record);
                    }
                }
            }
        }
        Ok(verifier.finish())
    }
}

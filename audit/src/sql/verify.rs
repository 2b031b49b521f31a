//! Verifying the hash chains of stored records: each record is rebuilt from its rows, field for
//! field, and fed to the chain verifier in (chain, sequence) order.

use std::collections::HashMap;

use gatehouse_schema::audit::{BackendAttempt, ChainLink, TokenUsage};
use gatehouse_schema::{AuditRecord, OperationId};
use sqlx::types::Json;
use sqlx::{QueryBuilder, Row, Sqlite};
use time::OffsetDateTime;

use super::{Engine, SqlStore, StoreError, sqlite_time};
use crate::chain::{PublishedHead, Verifier, VerifyReport, day_end_at_or_after, day_start};

/// The times whose records belong to the chains of the UTC days `[from, to)` touches: from the
/// start of `from`'s day to the first midnight at or after `to` (empty when the range is).
/// Every record of a chain lies in the chain's day, by its `TimeGenerated`
/// ([`Chainer::link`](crate::chain::Chainer::link)).
pub(crate) fn chain_days(
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> (OffsetDateTime, OffsetDateTime) {
    let start = day_start(from);
    if to <= from {
        return (start, start);
    }
    (start, day_end_at_or_after(to))
}

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
            time_to_first_token: row
                .try_get::<Option<i64>, _>("TimeToFirstToken")?
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

/// Records of a chain read per transaction: each page, and the prompt and completion pieces of
/// its records, come from one snapshot of the store, so that a retention run removing content
/// meanwhile is seen for a record whole or not at all; and a chain of a busy day (hundreds of
/// thousands of records, with their bodies) is never held in memory at once.
const PAGE: i64 = 256;

/// A chain's records are read in (`ChainSequence`, `RecordId`) order, from after this position.
type Position = (i64, i64);

/// Joins a record's pieces (in `SequenceNumber` order) into its `RequestMessages` and
/// `ResponseMessages`: `None` where no piece holds that side.
fn put_pieces(record: &mut AuditRecord, pieces: Vec<(Option<String>, Option<String>)>) {
    let (requests, responses): (Vec<_>, Vec<_>) = pieces.into_iter().unzip();
    record.request_messages = join(requests);
    record.response_messages = join(responses);
}

fn join(pieces: Vec<Option<String>>) -> Option<String> {
    let pieces: Vec<String> = pieces.into_iter().flatten().collect();
    (!pieces.is_empty()).then(|| pieces.concat())
}

/// The position of the last of a page's rows, when the page was full (so that more may follow).
fn next_position<R: Row>(rows: &[R]) -> Result<Option<Position>, StoreError>
where
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    if (rows.len() as i64) < PAGE {
        return Ok(None);
    }
    let Some(last) = rows.last() else {
        return Ok(None);
    };
    Ok(Some((
        last.try_get::<Option<i64>, _>("ChainSequence")?
            .unwrap_or(i64::MIN),
        last.try_get("RecordId")?,
    )))
}

impl SqlStore {
    /// Verifies every chain of a UTC day that `[from, to)` touches, whole, and names the first
    /// record of each that was changed, removed, reordered or forked. Content removed by
    /// retention is not a break. A chain holds one UTC day of one gateway, so a chain whose
    /// records in the range were all removed — the first ones of its day too — is still found
    /// by the records its day has left ([`chain_days`]).
    pub async fn verify_chains(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_chains_with(from, to, Verifier::new()).await
    }

    /// [`SqlStore::verify_chains`], with records made at or after `content_since` required to
    /// hold their content ([`Verifier::expecting_content_since`]): give it the start of the
    /// store's content window, and a record whose content was deleted inside the window is named
    /// `changed`.
    pub async fn verify_chains_expecting_content(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        content_since: OffsetDateTime,
    ) -> Result<VerifyReport, StoreError> {
        self.verify_chains_with(
            from,
            to,
            Verifier::new().expecting_content_since(content_since),
        )
        .await
    }

    /// [`SqlStore::verify_chains`] with `verifier` (for one that expects content, see
    /// [`Verifier::expecting_content_since`]), checking the chains against the heads the gateway
    /// published outside the store ([`Verifier::expect_published`]): those of the days the
    /// range touches are expected, so that the removal of a chain's last records, or of the whole
    /// chain, and records rewritten with every hash after them are found.
    pub async fn verify_chains_against(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        mut verifier: Verifier,
        published: &[PublishedHead],
    ) -> Result<VerifyReport, StoreError> {
        let days = chain_days(from, to);
        verifier.expect_published(published.iter().filter(|head| {
            head.day().is_some_and(|day| {
                let start = day.midnight().assume_utc();
                start >= days.0 && start < days.1
            })
        }));
        self.verify_chains_with(from, to, verifier).await
    }

    async fn verify_chains_with(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
        mut verifier: Verifier,
    ) -> Result<VerifyReport, StoreError> {
        let days = chain_days(from, to);
        // Records of the range without a chain link: written before chaining, or inserted. They
        // belong to no chain, so only a count of them finds them.
        let unchained: i64 = match &self.engine {
            Engine::Sqlite { reader, .. } => {
                sqlx::query_scalar(
                    "SELECT count(*) FROM GatehouseGatewayLogs \
                     WHERE TimeGenerated >= ?1 AND TimeGenerated < ?2 AND ChainId IS NULL",
                )
                .bind(sqlite_time(from))
                .bind(sqlite_time(to))
                .fetch_one(reader)
                .await?
            }
            Engine::Postgres { pool, .. } => {
                sqlx::query_scalar(
                    r#"SELECT count(*) FROM "GatehouseGatewayLogs"
                       WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2 AND "ChainId" IS NULL"#,
                )
                .bind(from)
                .bind(to)
                .fetch_one(pool)
                .await?
            }
        };
        match &self.engine {
            Engine::Sqlite { reader, .. } => {
                let chains: Vec<String> = sqlx::query_scalar(
                    "SELECT DISTINCT ChainId FROM GatehouseGatewayLogs \
                     WHERE TimeGenerated >= ?1 AND TimeGenerated < ?2 AND ChainId IS NOT NULL ORDER BY 1",
                )
                .bind(sqlite_time(days.0))
                .bind(sqlite_time(days.1))
                .fetch_all(reader)
                .await?;
                for chain in chains {
                    let mut after = None;
                    loop {
                        // A read transaction: one snapshot of the store for the page and its pieces.
                        let mut tx = reader.begin().await?;
                        let mut page = QueryBuilder::<Sqlite>::new(
                            "SELECT * FROM ApiManagementGatewayLogs WHERE ChainId = ",
                        );
                        page.push_bind(&chain);
                        if let Some((sequence, record)) = after {
                            page.push(" AND (ChainSequence, RecordId) > (")
                                .push_bind(sequence)
                                .push(", ")
                                .push_bind(record)
                                .push(")");
                        }
                        page.push(" ORDER BY ChainSequence, RecordId LIMIT ")
                            .push_bind(PAGE);
                        let rows = page.build().fetch_all(&mut *tx).await?;
                        let mut pieces = sqlite_pieces(&mut tx, &rows).await?;
                        tx.commit().await?;
                        for row in &rows {
                            let time: String = row.try_get("TimeGenerated")?;
                            let time = OffsetDateTime::parse(
                                &time,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .map_err(|e| StoreError::Database(sqlx::Error::Decode(Box::new(e))))?;
                            let mut record = record_from_row!(row, time);
                            let own = pieces.remove(&record.correlation_id);
                            put_pieces(&mut record, own.unwrap_or_default());
                            verifier.check(record);
                        }
                        match next_position(&rows)? {
                            Some(position) => after = Some(position),
                            None => break,
                        }
                    }
                }
            }
            Engine::Postgres { pool, .. } => {
                let chains: Vec<String> = sqlx::query_scalar(
                    r#"SELECT DISTINCT "ChainId" FROM "GatehouseGatewayLogs"
                       WHERE "TimeGenerated" >= $1 AND "TimeGenerated" < $2 AND "ChainId" IS NOT NULL ORDER BY 1"#,
                )
                .bind(days.0)
                .bind(days.1)
                .fetch_all(pool)
                .await?;
                for chain in chains {
                    let mut after = None;
                    loop {
                        let mut tx = pool.begin().await?;
                        // One snapshot for the page and its pieces (READ COMMITTED would take
                        // one per statement).
                        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                            .execute(&mut *tx)
                            .await?;
                        // No time bound: a record whose TimeGenerated was moved to another day
                        // is still found, and named as changed.
                        let (sequence, record) = after.unwrap_or((i64::MIN, i64::MIN));
                        let rows = sqlx::query(
                            r#"SELECT * FROM "ApiManagementGatewayLogs" WHERE "ChainId" = $1
                               AND ("ChainSequence", "RecordId") > ($2, $3)
                               ORDER BY "ChainSequence", "RecordId" LIMIT $4"#,
                        )
                        .bind(&chain)
                        .bind(sequence)
                        .bind(record)
                        .bind(PAGE)
                        .fetch_all(&mut *tx)
                        .await?;
                        let mut pieces = postgres_pieces(&mut tx, &rows).await?;
                        tx.commit().await?;
                        for row in &rows {
                            let time: OffsetDateTime = row.try_get("TimeGenerated")?;
                            let mut record = record_from_row!(row, time);
                            // A record's pieces are in the day partition of its time.
                            let own = pieces.remove(&(record.correlation_id.clone(), time));
                            put_pieces(&mut record, own.unwrap_or_default());
                            verifier.check(record);
                        }
                        match next_position(&rows)? {
                            Some(position) => after = Some(position),
                            None => break,
                        }
                    }
                }
            }
        }
        let mut report = verifier.finish();
        report.unchained += u64::try_from(unchained).unwrap_or(0);
        Ok(report)
    }
}

/// A record's prompt and completion pieces, in `SequenceNumber` order.
type Pieces = Vec<(Option<String>, Option<String>)>;

/// The pieces of the records `rows`, by `CorrelationId`, read in the transaction `tx`.
async fn sqlite_pieces(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    rows: &[sqlx::sqlite::SqliteRow],
) -> Result<HashMap<String, Pieces>, StoreError> {
    let mut pieces: HashMap<String, Pieces> = HashMap::new();
    if rows.is_empty() {
        return Ok(pieces);
    }
    let mut query = QueryBuilder::<Sqlite>::new(
        "SELECT CorrelationId, RequestMessages, ResponseMessages FROM ApiManagementGatewayLlmLog \
         WHERE SequenceNumber > 0 AND CorrelationId IN (",
    );
    let mut list = query.separated(", ");
    for row in rows {
        list.push_bind(row.try_get::<String, _>("CorrelationId")?);
    }
    query.push(") ORDER BY CorrelationId, SequenceNumber");
    let found: Vec<(String, Option<String>, Option<String>)> =
        query.build_query_as().fetch_all(&mut **tx).await?;
    for (id, request, response) in found {
        pieces.entry(id).or_default().push((request, response));
    }
    Ok(pieces)
}

/// The pieces of the records `rows`, by `CorrelationId` and `TimeGenerated`, read in the
/// transaction `tx`. A page's records are of one chain, so of one day: the time range of the
/// page limits the search to that day's partitions.
async fn postgres_pieces(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[sqlx::postgres::PgRow],
) -> Result<HashMap<(String, OffsetDateTime), Pieces>, StoreError> {
    let mut pieces: HashMap<(String, OffsetDateTime), Pieces> = HashMap::new();
    let mut ids = Vec::with_capacity(rows.len());
    let mut times = Vec::with_capacity(rows.len());
    for row in rows {
        ids.push(row.try_get::<String, _>("CorrelationId")?);
        times.push(row.try_get::<OffsetDateTime, _>("TimeGenerated")?);
    }
    let (Some(first), Some(last)) = (times.iter().min(), times.iter().max()) else {
        return Ok(pieces);
    };
    let found: Vec<(String, OffsetDateTime, Option<String>, Option<String>)> = sqlx::query_as(
        r#"SELECT "CorrelationId", "TimeGenerated", "RequestMessages", "ResponseMessages"
           FROM "GatehouseLlmLogPieces"
           WHERE "TimeGenerated" >= $1 AND "TimeGenerated" <= $2 AND "CorrelationId" = ANY($3)
           ORDER BY "CorrelationId", "TimeGenerated", "SequenceNumber""#,
    )
    .bind(*first)
    .bind(*last)
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await?;
    for (id, time, request, response) in found {
        pieces
            .entry((id, time))
            .or_default()
            .push((request, response));
    }
    Ok(pieces)
}

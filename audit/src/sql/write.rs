//! Writing records: metadata, content, LLM pieces, full-text and rollups, in one transaction (on
//! SQLite the full-text index in a second one, in its own file: `search_index.rs`).

use std::collections::HashSet;

use gatehouse_schema::AuditRecord;
use serde_json::value::RawValue;
use sqlx::types::Json;
use sqlx::{Postgres, QueryBuilder, Sqlite};

use super::retired_chains::RetiredChains;
use super::rollup::{RollupKey, RollupSums, fold, fold_in_lock_order};
use super::search_index::{IndexRow, SearchIndex};
use super::{
    Engine, SqlStore, StoreError, full_text, ip_key, message_text, search_blocks, sqlar,
    sqlite_time,
};
use crate::rows::{GatewayLogRow, LlmLogRow};

/// Rows per multi-row INSERT (SQLite allows 32,766 bound values; the widest table has 53 columns).
const ROWS_PER_STATEMENT: usize = 200;

const SQLITE_LOG_INSERT: &str = "INSERT INTO GatehouseGatewayLogs (RecordId, TimeGenerated, CorrelationId, OperationName, Category, GatewayId, OperationId, CallerIpAddress, CallerIpKey, PeerIpAddress, Method, Url, ClientProtocol, ResponseCode, IsRequestSuccess, BackendResponseCode, BackendId, BackendUrl, RequestSize, ResponseSize, TotalTime, BackendTime, TimeToFirstByte, ApimSubscriptionId, ProductId, UserId, UserName, EntraTenantId, Groups, DeploymentName, ModelName, ApiVersion, IsStreamCompletion, PromptTokens, CompletionTokens, TotalTokens, CachedTokens, ReasoningTokens, TokensEstimated, Attempts, AttemptCount, RequestBodyTruncated, ResponseBodyTruncated, ClientAborted, LastErrorReason, LastErrorMessage, ChainId, ChainSequence, PreviousHash, RecordHash, ContentHash, TimeToFirstToken) ";
/// Declares [`LogColumns`] — gateway-log rows as one array per column, for PostgreSQL's
/// `unnest` — from one list of (field, element type, how a row fills it, column, SQL type), so
/// that the fields, the values pushed, the bind order and the INSERT's column list cannot drift
/// apart.
macro_rules! postgres_log_columns {
    (|$row:ident, $key:ident| $($field:ident: $ty:ty = $value:expr => $column:literal $sql:literal,)*) => {
        /// Gateway-log rows as one array per column, for [`POSTGRES_LOG_INSERT`].
        #[derive(Default)]
        struct LogColumns {
            $($field: Vec<$ty>,)*
        }

        impl LogColumns {
            /// Adds the row of a record whose caller's address has the key `$key`.
            fn push(&mut self, $row: GatewayLogRow, $key: String) {
                $(self.$field.push($value);)*
            }

            /// Binds the arrays in the order of [`LOG_COLUMNS`].
            fn bind<'q>(
                self,
                query: sqlx::query::QueryScalar<'q, Postgres, String, sqlx::postgres::PgArguments>,
            ) -> sqlx::query::QueryScalar<'q, Postgres, String, sqlx::postgres::PgArguments> {
                query$(.bind(self.$field))*
            }
        }

        /// The gateway log's columns and their SQL types, in bind order: what
        /// [`POSTGRES_LOG_INSERT`] must name (checked by a test).
        #[cfg(test)]
        const LOG_COLUMNS: &[(&str, &str)] = &[$(($column, $sql),)*];
    };
}

postgres_log_columns! {
    |row, ip_key|
    time_generated: time::OffsetDateTime = row.time_generated => "TimeGenerated" "timestamptz",
    correlation_id: String = row.correlation_id => "CorrelationId" "text",
    operation_name: &'static str = row.operation_name => "OperationName" "text",
    category: &'static str = row.category => "Category" "text",
    gateway_id: String = row.gateway_id => "GatewayId" "text",
    operation_id: String = row.operation_id => "OperationId" "text",
    caller_ip_address: String = row.caller_ip_address => "CallerIpAddress" "text",
    caller_ip_key: String = ip_key => "CallerIpKey" "text",
    peer_ip_address: String = row.peer_ip_address => "PeerIpAddress" "text",
    method: String = row.method => "Method" "text",
    url: String = row.url => "Url" "text",
    client_protocol: String = row.client_protocol => "ClientProtocol" "text",
    response_code: i32 = row.response_code => "ResponseCode" "integer",
    is_request_success: bool = row.is_request_success => "IsRequestSuccess" "boolean",
    backend_response_code: Option<i32> = row.backend_response_code => "BackendResponseCode" "integer",
    backend_id: Option<String> = row.backend_id => "BackendId" "text",
    backend_url: Option<String> = row.backend_url => "BackendUrl" "text",
    request_size: i64 = row.request_size => "RequestSize" "bigint",
    response_size: i64 = row.response_size => "ResponseSize" "bigint",
    total_time: i64 = row.total_time => "TotalTime" "bigint",
    backend_time: i64 = row.backend_time => "BackendTime" "bigint",
    time_to_first_byte: Option<i64> = row.time_to_first_byte => "TimeToFirstByte" "bigint",
    apim_subscription_id: Option<String> = row.apim_subscription_id => "ApimSubscriptionId" "text",
    product_id: Option<String> = row.product_id => "ProductId" "text",
    user_id: Option<String> = row.user_id => "UserId" "text",
    user_name: Option<String> = row.user_name => "UserName" "text",
    entra_tenant_id: Option<String> = row.entra_tenant_id => "EntraTenantId" "text",
    groups: Json<Option<Box<RawValue>>> = json_or_null(row.groups) => "Groups" "jsonb",
    deployment_name: Option<String> = row.deployment_name => "DeploymentName" "text",
    model_name: Option<String> = row.model_name => "ModelName" "text",
    api_version: Option<String> = row.api_version => "ApiVersion" "text",
    is_stream_completion: bool = row.is_stream_completion => "IsStreamCompletion" "boolean",
    prompt_tokens: Option<i64> = row.prompt_tokens => "PromptTokens" "bigint",
    completion_tokens: Option<i64> = row.completion_tokens => "CompletionTokens" "bigint",
    total_tokens: Option<i64> = row.total_tokens => "TotalTokens" "bigint",
    cached_tokens: Option<i64> = row.cached_tokens => "CachedTokens" "bigint",
    reasoning_tokens: Option<i64> = row.reasoning_tokens => "ReasoningTokens" "bigint",
    tokens_estimated: bool = row.tokens_estimated => "TokensEstimated" "boolean",
    attempts: Json<Option<Box<RawValue>>> = json_or_null(row.attempts) => "Attempts" "jsonb",
    attempt_count: i32 = row.attempt_count => "AttemptCount" "integer",
    request_body_truncated: bool = row.request_body_truncated => "RequestBodyTruncated" "boolean",
    response_body_truncated: bool = row.response_body_truncated => "ResponseBodyTruncated" "boolean",
    client_aborted: bool = row.client_aborted => "ClientAborted" "boolean",
    last_error_reason: Option<String> = row.last_error_reason => "LastErrorReason" "text",
    last_error_message: Option<String> = row.last_error_message => "LastErrorMessage" "text",
    chain_id: Option<String> = row.chain_id => "ChainId" "text",
    chain_sequence: Option<i64> = row.chain_sequence => "ChainSequence" "bigint",
    previous_hash: Option<String> = row.previous_hash => "PreviousHash" "text",
    record_hash: Option<String> = row.record_hash => "RecordHash" "text",
    content_hash: Option<String> = row.content_hash => "ContentHash" "text",
    time_to_first_token: Option<i64> = row.time_to_first_token => "TimeToFirstToken" "bigint",
}

/// JSON text as a JSON value (`jsonb` on PostgreSQL, text on SQLite), sent as it is rather than
/// parsed and written again; `null` when it is not JSON (the rows' JSON columns are serialized by
/// `GatewayLogRow`, so this does not happen).
fn json_or_null(text: String) -> Json<Option<Box<RawValue>>> {
    Json(RawValue::from_string(text).ok())
}

/// The INSERT of gateway-log rows bound as [`LogColumns`]: one array per column (in the order
/// of [`LOG_COLUMNS`], which a test checks), unnested by the server, returning the
/// `CorrelationId`s of the calls not stored yet.
const POSTGRES_LOG_INSERT: &str = r#"INSERT INTO "GatehouseGatewayLogs" ("TimeGenerated", "CorrelationId", "OperationName", "Category", "GatewayId", "OperationId", "CallerIpAddress", "CallerIpKey", "PeerIpAddress", "Method", "Url", "ClientProtocol", "ResponseCode", "IsRequestSuccess", "BackendResponseCode", "BackendId", "BackendUrl", "RequestSize", "ResponseSize", "TotalTime", "BackendTime", "TimeToFirstByte", "ApimSubscriptionId", "ProductId", "UserId", "UserName", "EntraTenantId", "Groups", "DeploymentName", "ModelName", "ApiVersion", "IsStreamCompletion", "PromptTokens", "CompletionTokens", "TotalTokens", "CachedTokens", "ReasoningTokens", "TokensEstimated", "Attempts", "AttemptCount", "RequestBodyTruncated", "ResponseBodyTruncated", "ClientAborted", "LastErrorReason", "LastErrorMessage", "ChainId", "ChainSequence", "PreviousHash", "RecordHash", "ContentHash", "TimeToFirstToken") SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[], $13::integer[], $14::boolean[], $15::integer[], $16::text[], $17::text[], $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[], $22::bigint[], $23::text[], $24::text[], $25::text[], $26::text[], $27::text[], $28::jsonb[], $29::text[], $30::text[], $31::text[], $32::boolean[], $33::bigint[], $34::bigint[], $35::bigint[], $36::bigint[], $37::bigint[], $38::boolean[], $39::jsonb[], $40::integer[], $41::boolean[], $42::boolean[], $43::boolean[], $44::text[], $45::text[], $46::text[], $47::bigint[], $48::text[], $49::text[], $50::text[], $51::bigint[]) ON CONFLICT ("CorrelationId", "TimeGenerated") DO NOTHING RETURNING "CorrelationId""#;

const SQLITE_LLM_INSERT: &str = "INSERT INTO ApiManagementGatewayLlmLog (TimeGenerated, CorrelationId, OperationName, DeploymentName, ModelName, ApiVersion, IsStreamCompletion, PromptTokens, CompletionTokens, TotalTokens, SequenceNumber, RequestMessages, ResponseMessages) ";
/// On PostgreSQL the LLM log's header rows (`SequenceNumber` 0, metadata) and its pieces
/// (content) are kept in tables of their own, so that pieces can be dropped by day before headers;
/// the view `ApiManagementGatewayLlmLog` shows both. Rows come as one array per column.
/// Pieces, written before their call's metadata, are skipped for a call stored already (a
/// replay), as its bodies are ([`POSTGRES_CONTENT_INSERT`]).
macro_rules! postgres_llm_insert {
    ($table:literal, $filter:literal) => {
        concat!(
            r#"INSERT INTO ""#,
            $table,
            r#"" ("TimeGenerated", "CorrelationId", "OperationName", "DeploymentName", "ModelName", "ApiVersion", "IsStreamCompletion", "PromptTokens", "CompletionTokens", "TotalTokens", "SequenceNumber", "RequestMessages", "ResponseMessages") SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::boolean[], $8::bigint[], $9::bigint[], $10::bigint[], $11::integer[], $12::text[], $13::text[]) AS p ("TimeGenerated", "CorrelationId") "#,
            $filter,
            r#" ON CONFLICT ("CorrelationId", "SequenceNumber", "TimeGenerated") DO NOTHING"#
        )
    };
}
const POSTGRES_LLM_HEADERS_INSERT: &str = postgres_llm_insert!("GatehouseLlmLogHeaders", "");
const POSTGRES_LLM_PIECES_INSERT: &str = postgres_llm_insert!(
    "GatehouseLlmLogPieces",
    r#"WHERE NOT EXISTS (SELECT 1 FROM "GatehouseGatewayLogs" l WHERE l."CorrelationId" = p."CorrelationId" AND l."TimeGenerated" = p."TimeGenerated")"#
);

const SQLITE_ROLLUP_UPSERT_HEAD: &str = "INSERT INTO GatehouseUsageRollup (Granularity, Bucket, Dimension, DimensionValue, Requests, Errors, PromptTokens, CompletionTokens, TotalTokens, LatencySumMs, LatencyMaxMs) ";
const SQLITE_ROLLUP_UPSERT_TAIL: &str = " ON CONFLICT (Granularity, Dimension, Bucket, DimensionValue) DO UPDATE SET Requests = Requests + excluded.Requests, Errors = Errors + excluded.Errors, PromptTokens = PromptTokens + excluded.PromptTokens, CompletionTokens = CompletionTokens + excluded.CompletionTokens, TotalTokens = TotalTokens + excluded.TotalTokens, LatencySumMs = LatencySumMs + excluded.LatencySumMs, LatencyMaxMs = max(LatencyMaxMs, excluded.LatencyMaxMs)";
const POSTGRES_ROLLUP_UPSERT: &str = r#"INSERT INTO "GatehouseUsageRollup" AS r ("Granularity", "Bucket", "Dimension", "DimensionValue", "Requests", "Errors", "PromptTokens", "CompletionTokens", "TotalTokens", "LatencySumMs", "LatencyMaxMs") SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[]) ON CONFLICT ("Granularity", "Dimension", "Bucket", "DimensionValue") DO UPDATE SET "Requests" = r."Requests" + EXCLUDED."Requests", "Errors" = r."Errors" + EXCLUDED."Errors", "PromptTokens" = r."PromptTokens" + EXCLUDED."PromptTokens", "CompletionTokens" = r."CompletionTokens" + EXCLUDED."CompletionTokens", "TotalTokens" = r."TotalTokens" + EXCLUDED."TotalTokens", "LatencySumMs" = r."LatencySumMs" + EXCLUDED."LatencySumMs", "LatencyMaxMs" = GREATEST(r."LatencyMaxMs", EXCLUDED."LatencyMaxMs")"#;

/// Binds the columns of a gateway-log row in the order of the INSERT lists above; `$time` binds
/// the engine's time representation.
macro_rules! bind_log_row {
    ($b:expr, $row:expr, $time:expr, $ip_key:expr) => {{
        let row: GatewayLogRow = $row;
        $b.push_bind($time)
            .push_bind(row.correlation_id)
            .push_bind(row.operation_name)
            .push_bind(row.category)
            .push_bind(row.gateway_id)
            .push_bind(row.operation_id)
            .push_bind(row.caller_ip_address)
            .push_bind($ip_key)
            .push_bind(row.peer_ip_address)
            .push_bind(row.method)
            .push_bind(row.url)
            .push_bind(row.client_protocol)
            .push_bind(row.response_code)
            .push_bind(row.is_request_success)
            .push_bind(row.backend_response_code)
            .push_bind(row.backend_id)
            .push_bind(row.backend_url)
            .push_bind(row.request_size)
            .push_bind(row.response_size)
            .push_bind(row.total_time)
            .push_bind(row.backend_time)
            .push_bind(row.time_to_first_byte)
            .push_bind(row.apim_subscription_id)
            .push_bind(row.product_id)
            .push_bind(row.user_id)
            .push_bind(row.user_name)
            .push_bind(row.entra_tenant_id)
            .push_bind(json_or_null(row.groups))
            .push_bind(row.deployment_name)
            .push_bind(row.model_name)
            .push_bind(row.api_version)
            .push_bind(row.is_stream_completion)
            .push_bind(row.prompt_tokens)
            .push_bind(row.completion_tokens)
            .push_bind(row.total_tokens)
            .push_bind(row.cached_tokens)
            .push_bind(row.reasoning_tokens)
            .push_bind(row.tokens_estimated)
            .push_bind(json_or_null(row.attempts))
            .push_bind(row.attempt_count)
            .push_bind(row.request_body_truncated)
            .push_bind(row.response_body_truncated)
            .push_bind(row.client_aborted)
            .push_bind(row.last_error_reason)
            .push_bind(row.last_error_message)
            .push_bind(row.chain_id)
            .push_bind(row.chain_sequence)
            .push_bind(row.previous_hash)
            .push_bind(row.record_hash)
            .push_bind(row.content_hash)
            .push_bind(row.time_to_first_token);
    }};
}

macro_rules! bind_llm_row {
    ($b:expr, $row:expr, $time:expr) => {{
        let row: LlmLogRow = $row;
        $b.push_bind($time)
            .push_bind(row.correlation_id)
            .push_bind(row.operation_name)
            .push_bind(row.deployment_name)
            .push_bind(row.model_name)
            .push_bind(row.api_version)
            .push_bind(row.is_stream_completion)
            .push_bind(row.prompt_tokens)
            .push_bind(row.completion_tokens)
            .push_bind(row.total_tokens)
            .push_bind(row.sequence_number)
            .push_bind(row.request_messages)
            .push_bind(row.response_messages);
    }};
}

fn caller_key(record: &AuditRecord) -> String {
    record
        .caller_ip_address
        .parse()
        .map(ip_key)
        .unwrap_or_default()
}

/// A call's prompt and completion as recorded (JSON), for [`search_texts`].
fn messages(record: &AuditRecord) -> (Option<String>, Option<String>) {
    (
        record.request_messages.clone(),
        record.response_messages.clone(),
    )
}

/// What full-text search covers of each call: the text its prompt and its completion say
/// (`message_text`). Reading it out of the JSON takes a few µs a call: callers run this on a
/// blocking thread.
fn search_texts(messages: &[(Option<String>, Option<String>)]) -> Vec<(String, String)> {
    let text = |json: &Option<String>| {
        json.as_deref()
            .map(message_text::searchable)
            .unwrap_or_default()
    };
    messages
        .iter()
        .map(|(prompt, completion)| (text(prompt), text(completion)))
        .collect()
}

/// A body as SQLite's content table stores it: the stored bytes and the original size.
type StoredBody = (Option<Vec<u8>>, Option<i64>);

/// A call's request and response bodies as stored.
type StoredBodies = (StoredBody, StoredBody);

/// A body for SQLite's content table: the stored bytes and the original size, both NULL when
/// the call had no body.
fn stored_body(
    compressor: &mut sqlar::BodyCompressor,
    body: Option<&str>,
) -> (Option<Vec<u8>>, Option<i64>) {
    match body.map(|body| compressor.compress(body)) {
        Some(stored) => (Some(stored.data), Some(stored.size)),
        None => (None, None),
    }
}

pub(super) async fn write(store: &SqlStore, records: &[AuditRecord]) -> Result<usize, StoreError> {
    if records.is_empty() {
        return Ok(0);
    }
    match &store.engine {
        Engine::Sqlite {
            writer,
            reader,
            search,
            ..
        } => write_sqlite(writer, reader, search, records).await,
        Engine::Postgres { pool, search_merge } => {
            let new = match write_postgres(pool, records).await {
                // A NUL character, which `text` and `jsonb` refuse: the audit writer replaces
                // them before it links a record, so only records from elsewhere (a journal an
                // earlier version wrote) get here. Stored with the replacement instead of
                // refusing the whole batch on every retry; content already committed is kept
                // (it held no NUL) and the rest is written again.
                Err(error) if refuses_nul(&error) => {
                    let cleaned: Vec<AuditRecord> = records
                        .iter()
                        .cloned()
                        .map(|mut record| {
                            record.replace_nul();
                            record
                        })
                        .collect();
                    write_postgres(pool, &cleaned).await?
                }
                result => result?,
            };
            search_merge.after_write(
                records
                    .iter()
                    .map(|r| r.time_generated.to_offset(time::UtcOffset::UTC).date()),
            );
            Ok(new)
        }
    }
}

/// Whether PostgreSQL refused a NUL character: in `text` (`invalid byte sequence for encoding
/// "UTF8": 0x00`, 22021) or as `\u0000` in `jsonb` (`unsupported Unicode escape sequence`, 22P05).
fn refuses_nul(error: &StoreError) -> bool {
    match error {
        StoreError::Database(sqlx::Error::Database(database)) => {
            matches!(database.code().as_deref(), Some("22021" | "22P05"))
        }
        _ => false,
    }
}

async fn write_sqlite(
    pool: &sqlx::SqlitePool,
    reader: &sqlx::SqlitePool,
    search: &SearchIndex,
    records: &[AuditRecord],
) -> Result<usize, StoreError> {
    // The searchable text is read out of the messages on a blocking thread, and the bodies are
    // compressed on another, while the writers insert the metadata.
    let messages: Vec<_> = records.iter().map(messages).collect();
    let texts = tokio::task::spawn_blocking(move || search_texts(&messages));
    let bodies: Vec<(Option<String>, Option<String>)> = records
        .iter()
        .map(|r| {
            (
                r.backend_request_body.clone(),
                r.backend_response_body.clone(),
            )
        })
        .collect();
    let compressed = tokio::task::spawn_blocking(move || {
        let mut compressor = sqlar::BodyCompressor::new();
        bodies
            .iter()
            .map(|(request, response)| {
                (
                    stored_body(&mut compressor, request.as_deref()),
                    stored_body(&mut compressor, response.as_deref()),
                )
            })
            .collect::<Vec<_>>()
    });
    // Batches reach the full-text index in the order of their RecordIds.
    let _order = search.lock().await;
    // New calls are numbered above every call the index has had, even when retention has
    // removed them all: a number used again would sit at or below `IndexedThrough`, where a
    // batch the index missed is never caught up.
    let indexed_through = search.indexed_through().await?;
    // IMMEDIATE: the transaction reads before it writes, and SQLite does not wait (busy_timeout)
    // for a lock a reading transaction wants to raise to a write; another process writing the
    // file (the portal's `ANALYZE`, a reindex) would fail the batch at once.
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let ids = new_record_ids(&mut tx, records, indexed_through).await?;
    let new: Vec<(usize, &AuditRecord, i64)> = records
        .iter()
        .zip(&ids)
        .enumerate()
        .filter_map(|(index, (record, id))| id.map(|id| (index, record, id)))
        .collect();

    // The index's own connection indexes the new calls while this one writes them; a behind
    // index leaves them to its catch-up, which indexes calls in RecordId order.
    let (index_rows, through): (Vec<IndexRow>, Option<i64>) = if search.is_behind() {
        (Vec::new(), None)
    } else {
        let mut texts = texts.await.map_err(|error| {
            StoreError::Database(sqlx::Error::Protocol(format!(
                "reading the searchable text failed: {error}"
            )))
        })?;
        let rows = new
            .iter()
            .filter(|(_, r, _)| r.request_messages.is_some() || r.response_messages.is_some())
            .map(|&(index, _, id)| {
                let (prompt, completion) = std::mem::take(&mut texts[index]);
                (id, prompt, completion)
            })
            .collect();
        (rows, new.last().map(|&(_, _, id)| id))
    };
    let (staged, written) = futures::future::join(
        search.stage(index_rows, through),
        write_sqlite_rows(&mut tx, &new, compressed),
    )
    .await;
    if let Err(error) = written {
        // Dropping the staged index transaction rolls it back.
        drop(staged);
        return Err(error);
    }
    tx.commit().await?;
    search.commit(staged, reader).await;
    Ok(new.len())
}

/// Which records of a batch are new (not stored yet, not removed by retention already, and not
/// repeated earlier in the batch), and
/// the `RecordId` each new one gets: the next after the store's last or `floor` (the index's
/// `IndexedThrough`), whichever is higher, in the batch's order. Knowing them before the insert lets the full-text index
/// start at once. Read in the store's transaction: a write by another connection in between
/// makes the insert fail (SQLite's snapshot check) rather than number calls twice.
async fn new_record_ids(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    records: &[AuditRecord],
    floor: i64,
) -> Result<Vec<Option<i64>>, StoreError> {
    let batch = serde_json::to_string(
        &records
            .iter()
            .map(|r| r.correlation_id.as_str())
            .collect::<Vec<_>>(),
    )
    .map_err(|error| StoreError::Database(sqlx::Error::Encode(Box::new(error))))?;
    let stored: Vec<String> = sqlx::query_scalar(
        "SELECT CorrelationId FROM GatehouseGatewayLogs WHERE CorrelationId IN (SELECT value FROM json_each(?))",
    )
    .bind(batch)
    .fetch_all(&mut **tx)
    .await?;
    let stored_last: i64 =
        sqlx::query_scalar("SELECT coalesce(max(RecordId), 0) FROM GatehouseGatewayLogs")
            .fetch_one(&mut **tx)
            .await?;
    let retired = RetiredChains::sqlite(tx, records).await?;
    let mut last = stored_last.max(floor);
    let mut seen: HashSet<&str> = stored.iter().map(String::as_str).collect();
    Ok(records
        .iter()
        .map(|record| {
            (seen.insert(record.correlation_id.as_str()) && !retired.removed(record)).then(|| {
                last += 1;
                last
            })
        })
        .collect())
}

/// The metadata, LLM log, bodies (compressed by `compressed`, indexed like the batch) and rollups
/// of the `new` records of a batch (their index in the batch, the record, its `RecordId`), in the
/// store's transaction `tx`.
async fn write_sqlite_rows(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    new: &[(usize, &AuditRecord, i64)],
    compressed: tokio::task::JoinHandle<Vec<StoredBodies>>,
) -> Result<(), StoreError> {
    let metadata = new.chunks(ROWS_PER_STATEMENT).map(|chunk| {
        let mut query = QueryBuilder::<Sqlite>::new(SQLITE_LOG_INSERT);
        query.push_values(chunk, |mut b, &(_, record, id)| {
            b.push_bind(id);
            bind_log_row!(
                b,
                GatewayLogRow::from_record(record),
                sqlite_time(record.time_generated),
                caller_key(record)
            );
        });
        query.push(" ON CONFLICT (CorrelationId) DO NOTHING");
        query
    });
    let written = execute_pipelined(tx, metadata).await?;
    if written != new.len() as u64 {
        return Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "the store changed during the write: {written} of {} new calls inserted",
            new.len()
        ))));
    }

    let mut compressed = compressed.await.map_err(|error| {
        StoreError::Database(sqlx::Error::Protocol(format!(
            "compressing the bodies failed: {error}"
        )))
    })?;
    let with_content: Vec<(&AuditRecord, StoredBodies)> = new
        .iter()
        .filter(|(_, r, _)| r.backend_request_body.is_some() || r.backend_response_body.is_some())
        .map(|&(index, r, _)| (r, std::mem::take(&mut compressed[index])))
        .collect();
    let content = with_content.chunks(ROWS_PER_STATEMENT).map(|chunk| {
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO GatehouseCallContent (CorrelationId, TimeGenerated, BackendRequestBody, BackendRequestBodySize, BackendResponseBody, BackendResponseBodySize) ",
        );
        // Compressed as SQLite's archive format stores files; the view inflates them.
        query.push_values(chunk, |mut b, (record, ((request, request_size), (response, response_size)))| {
            b.push_bind(record.correlation_id.as_str())
                .push_bind(sqlite_time(record.time_generated))
                .push_bind(request.as_deref())
                .push_bind(*request_size)
                .push_bind(response.as_deref())
                .push_bind(*response_size);
        });
        // A call new to the metadata may still have its content row: retention's metadata step
        // ran between a batch's write and the journal's replay of it. The row is the call's own.
        query.push(" ON CONFLICT (CorrelationId) DO NOTHING");
        query
    });

    let llm_rows: Vec<LlmLogRow> = new
        .iter()
        .flat_map(|(_, r, _)| LlmLogRow::from_record(r))
        .collect();
    let llm = llm_rows.chunks(ROWS_PER_STATEMENT).map(|chunk| {
        let mut query = QueryBuilder::<Sqlite>::new(SQLITE_LLM_INSERT);
        query.push_values(chunk, |mut b, row| {
            bind_llm_row!(b, row.clone(), sqlite_time(row.time_generated));
        });
        query.push(" ON CONFLICT (CorrelationId, SequenceNumber) DO NOTHING");
        query
    });

    let rollups: Vec<_> = fold(new.iter().map(|&(_, r, _)| r)).into_iter().collect();
    let rollups = rollups.chunks(ROWS_PER_STATEMENT).map(|chunk| {
        let mut query = QueryBuilder::<Sqlite>::new(SQLITE_ROLLUP_UPSERT_HEAD);
        query.push_values(chunk, |mut b, (key, sums)| {
            b.push_bind(key.granularity.as_str())
                .push_bind(sqlite_time(key.bucket))
                .push_bind(key.dimension.as_str())
                .push_bind(key.value.as_str())
                .push_bind(sums.requests)
                .push_bind(sums.errors)
                .push_bind(sums.prompt_tokens)
                .push_bind(sums.completion_tokens)
                .push_bind(sums.total_tokens)
                .push_bind(sums.latency_sum_ms)
                .push_bind(sums.latency_max_ms);
        });
        query.push(SQLITE_ROLLUP_UPSERT_TAIL);
        query
    });
    execute_pipelined(tx, content.chain(llm).chain(rollups)).await?;
    Ok(())
}

/// Executes `statements` in order in `tx`, building each next one while the connection's thread
/// executes the one before (binding a few hundred rows' values takes about as long as inserting
/// them). Returns the rows they changed.
async fn execute_pipelined<'q>(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    mut statements: impl Iterator<Item = QueryBuilder<'q, Sqlite>>,
) -> Result<u64, StoreError> {
    let mut changed = 0;
    let Some(mut current) = statements.next() else {
        return Ok(0);
    };
    loop {
        // `join` polls the execution first, which hands the statement to the connection's
        // thread, then builds the next statement on this one.
        let (done, next) = futures::future::join(current.build().execute(&mut **tx), async {
            statements.next()
        })
        .await;
        changed += done?.rows_affected();
        match next {
            Some(next) => current = next,
            None => return Ok(changed),
        }
    }
}

/// Inserts LLM-log `rows` with `insert` (headers or pieces), skipping those stored already: one
/// array per column, unnested by the server (cheaper than a VALUES list of as many rows).
async fn insert_llm_rows(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    insert: &str,
    rows: Vec<LlmLogRow>,
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut columns = LlmColumns::default();
    for row in rows {
        columns.time_generated.push(row.time_generated);
        columns.correlation_id.push(row.correlation_id);
        columns.operation_name.push(row.operation_name);
        columns.deployment_name.push(row.deployment_name);
        columns.model_name.push(row.model_name);
        columns.api_version.push(row.api_version);
        columns.is_stream_completion.push(row.is_stream_completion);
        columns.prompt_tokens.push(row.prompt_tokens);
        columns.completion_tokens.push(row.completion_tokens);
        columns.total_tokens.push(row.total_tokens);
        columns.sequence_number.push(row.sequence_number);
        columns.request_messages.push(row.request_messages);
        columns.response_messages.push(row.response_messages);
    }
    sqlx::query(insert)
        .bind(columns.time_generated)
        .bind(columns.correlation_id)
        .bind(columns.operation_name)
        .bind(columns.deployment_name)
        .bind(columns.model_name)
        .bind(columns.api_version)
        .bind(columns.is_stream_completion)
        .bind(columns.prompt_tokens)
        .bind(columns.completion_tokens)
        .bind(columns.total_tokens)
        .bind(columns.sequence_number)
        .bind(columns.request_messages)
        .bind(columns.response_messages)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// LLM-log rows as columns, for [`insert_llm_rows`].
#[derive(Default)]
struct LlmColumns {
    time_generated: Vec<time::OffsetDateTime>,
    correlation_id: Vec<String>,
    operation_name: Vec<String>,
    deployment_name: Vec<String>,
    model_name: Vec<String>,
    api_version: Vec<String>,
    is_stream_completion: Vec<bool>,
    prompt_tokens: Vec<Option<i64>>,
    completion_tokens: Vec<Option<i64>>,
    total_tokens: Vec<Option<i64>>,
    sequence_number: Vec<i32>,
    request_messages: Vec<Option<String>>,
    response_messages: Vec<Option<String>>,
}

/// Rollup rows as columns, for [`POSTGRES_ROLLUP_UPSERT`].
#[derive(Default)]
struct RollupColumns {
    granularity: Vec<&'static str>,
    bucket: Vec<time::OffsetDateTime>,
    dimension: Vec<&'static str>,
    value: Vec<String>,
    requests: Vec<i64>,
    errors: Vec<i64>,
    prompt_tokens: Vec<i64>,
    completion_tokens: Vec<i64>,
    total_tokens: Vec<i64>,
    latency_sum_ms: Vec<i64>,
    latency_max_ms: Vec<i64>,
}

impl RollupColumns {
    fn push(&mut self, key: RollupKey, sums: RollupSums) {
        self.granularity.push(key.granularity.as_str());
        self.bucket.push(key.bucket);
        self.dimension.push(key.dimension.as_str());
        self.value.push(key.value);
        self.requests.push(sums.requests);
        self.errors.push(sums.errors);
        self.prompt_tokens.push(sums.prompt_tokens);
        self.completion_tokens.push(sums.completion_tokens);
        self.total_tokens.push(sums.total_tokens);
        self.latency_sum_ms.push(sums.latency_sum_ms);
        self.latency_max_ms.push(sums.latency_max_ms);
    }
}

/// Content (bodies, the full-text vector and the LLM log's pieces: the costly part) is written
/// by this many connections at once, each in its own transaction, while the metadata transaction
/// runs beside them; the metadata commits only after all content has.
const POSTGRES_CONTENT_WRITERS: usize = 3;

async fn write_postgres(pool: &sqlx::PgPool, records: &[AuditRecord]) -> Result<usize, StoreError> {
    // Calls that retention removed already are not stored again (`retired_chains`); rarely any.
    let retired = RetiredChains::postgres(pool, records).await?;
    if records.iter().any(|r| retired.removed(r)) {
        let kept: Vec<AuditRecord> = records
            .iter()
            .filter(|r| !retired.removed(r))
            .cloned()
            .collect();
        if kept.is_empty() {
            return Ok(0);
        }
        return write_postgres_batch(pool, &kept).await;
    }
    write_postgres_batch(pool, records).await
}

/// Writes `records` to PostgreSQL: content and metadata, skipping the calls stored already.
async fn write_postgres_batch(
    pool: &sqlx::PgPool,
    records: &[AuditRecord],
) -> Result<usize, StoreError> {
    // Content first (committed before the metadata that points at it): a batch retried after a
    // failure finds its content already there and skips it, and its metadata is still new, so
    // nothing is lost and nothing is counted twice.
    let with_content: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| {
            r.backend_request_body.is_some()
                || r.backend_response_body.is_some()
                || r.request_messages.is_some()
                || r.response_messages.is_some()
        })
        .collect();
    let share = with_content.len().div_ceil(POSTGRES_CONTENT_WRITERS).max(1);
    let content = futures::future::try_join_all(
        with_content
            .chunks(share)
            .map(|part| write_postgres_content(pool, part)),
    );
    let (main, content) =
        futures::future::join(write_postgres_metadata(pool, records), content).await;
    content?;
    let (mut tx, new, rollups) = main?;
    upsert_postgres_rollups(&mut tx, rollups).await?;
    tx.commit().await?;
    Ok(new)
}

/// The INSERT of content rows, bound as [`ContentColumns`]. The day partition's key includes
/// `"TimeGenerated"`, which a replayed record repeats.
/// A call whose metadata is stored already (a replay) gets no content: retention may have removed
/// it since, and must not see it come back.
const POSTGRES_CONTENT_INSERT: &str = r#"INSERT INTO "GatehouseCallContent" ("CorrelationId", "TimeGenerated", "BackendRequestBody", "BackendResponseBody", "SearchText", "SearchBlock") SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::text[], $4::text[], $5::tsvector[], $6::text[]) AS c ("CorrelationId", "TimeGenerated") WHERE NOT EXISTS (SELECT 1 FROM "GatehouseGatewayLogs" l WHERE l."CorrelationId" = c."CorrelationId" AND l."TimeGenerated" = c."TimeGenerated") ON CONFLICT ("CorrelationId", "TimeGenerated") DO NOTHING"#;

/// Content rows as one array per column, for [`POSTGRES_CONTENT_INSERT`].
#[derive(Default)]
struct ContentColumns<'a> {
    correlation_id: Vec<&'a str>,
    time_generated: Vec<time::OffsetDateTime>,
    request_body: Vec<Option<&'a str>>,
    response_body: Vec<Option<&'a str>>,
    search_text: Vec<full_text::TsVector>,
    search_block: Vec<Option<String>>,
}

/// Bodies, full-text vectors, their blocks in the word index (`search_blocks`) and LLM-log
/// pieces of `records`, in one transaction.
async fn write_postgres_content(
    pool: &sqlx::PgPool,
    records: &[&AuditRecord],
) -> Result<(), StoreError> {
    let messages: Vec<_> = records.iter().map(|r| messages(r)).collect();
    let times: Vec<time::OffsetDateTime> = records.iter().map(|r| r.time_generated).collect();
    let indexed = search_blocks::vectors_in_blocks(move || {
        search_texts(&messages)
            .iter()
            .zip(times)
            .map(|((prompt, completion), time)| {
                ((), time, full_text::TsVector::of(&[prompt, completion]))
            })
            .collect()
    });
    let mut tx = pool.begin().await?;

    let pieces: Vec<LlmLogRow> = records
        .iter()
        .flat_map(|r| LlmLogRow::from_record(r))
        .filter(|row| row.sequence_number > 0)
        .collect();
    insert_llm_rows(&mut tx, POSTGRES_LLM_PIECES_INSERT, pieces).await?;

    let indexed = indexed.await?;
    // The new blocks' ids and days, for a replayed batch (below).
    let block_ids: Vec<String> = indexed.blocks.iter().map(|b| b.id.clone()).collect();
    let first_day = indexed.blocks.iter().map(|b| b.day).min();
    let last_day = indexed.blocks.iter().map(|b| b.day).max();
    search_blocks::insert(&mut tx, indexed.blocks).await?;
    // One array per column, unnested by the server, as for the other tables: cheaper for it
    // than a VALUES list of as many rows (bench/README.md).
    let mut vectors = indexed.calls.into_iter();
    let mut inserted: u64 = 0;
    for chunk in records.chunks(ROWS_PER_STATEMENT) {
        let mut columns = ContentColumns::default();
        for (record, ((), vector, block)) in chunk.iter().zip(vectors.by_ref()) {
            columns.correlation_id.push(record.correlation_id.as_str());
            columns.time_generated.push(record.time_generated);
            columns
                .request_body
                .push(record.backend_request_body.as_deref());
            columns
                .response_body
                .push(record.backend_response_body.as_deref());
            columns.search_text.push(vector);
            columns.search_block.push(block);
        }
        let done = sqlx::query(POSTGRES_CONTENT_INSERT)
            .bind(columns.correlation_id)
            .bind(columns.time_generated)
            .bind(columns.request_body)
            .bind(columns.response_body)
            .bind(columns.search_text)
            .bind(columns.search_block)
            .execute(&mut *tx)
            .await?;
        inserted += done.rows_affected();
    }
    // A replayed batch finds some of its calls stored already, naming the blocks they were
    // given then: the new blocks only those calls would have named are taken out again.
    if inserted < records.len() as u64
        && let (Some(from), Some(to)) = (first_day, last_day)
    {
        search_blocks::delete_unnamed(&mut tx, block_ids, from, to).await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Metadata and LLM-log headers of the records not stored yet, in a transaction left open for
/// the caller to add the rollups to and commit ([`upsert_postgres_rollups`]). Returns it, how
/// many records were new, and their rollups in key order.
async fn write_postgres_metadata<'a>(
    pool: &'a sqlx::PgPool,
    records: &[AuditRecord],
) -> Result<
    (
        sqlx::Transaction<'a, Postgres>,
        usize,
        Vec<(RollupKey, RollupSums)>,
    ),
    StoreError,
> {
    let mut tx = pool.begin().await?;
    // One array per column, unnested by the server: cheaper for it than a VALUES list.
    let mut columns = LogColumns::default();
    for record in records {
        columns.push(GatewayLogRow::from_record(record), caller_key(record));
    }
    let mut inserted: HashSet<String> = columns
        .bind(sqlx::query_scalar(POSTGRES_LOG_INSERT))
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    // Taken out as it is found: a record the batch holds twice is new once, as on SQLite.
    let new: Vec<&AuditRecord> = records
        .iter()
        .filter(|r| inserted.remove(&r.correlation_id))
        .collect();

    // The LLM log's header rows; its pieces are written with the content.
    let headers: Vec<LlmLogRow> = new
        .iter()
        .flat_map(|r| LlmLogRow::from_record(r))
        .filter(|row| row.sequence_number == 0)
        .collect();
    insert_llm_rows(&mut tx, POSTGRES_LLM_HEADERS_INSERT, headers).await?;

    // In key order: every writer (two gateways on one store) locks the rows it upserts in the
    // same order, so two batches never each hold a row the other waits for (a deadlock aborts
    // one of them).
    let rollups = fold_in_lock_order(new.iter().copied());
    Ok((tx, new.len(), rollups))
}

/// Adds `rollups` to their rows in `tx`: the last statement of the metadata transaction, so
/// that the rows shared by every writer (the `all` row of the minute, the status classes) are
/// locked only for the moment before its commit, not while the content is written.
async fn upsert_postgres_rollups(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    rollups: Vec<(RollupKey, RollupSums)>,
) -> Result<(), StoreError> {
    // The rollups (≈ 4 rows a call) as one array per column, unnested by the server, which
    // costs it less than a VALUES list of as many rows (bench/README.md).
    if !rollups.is_empty() {
        let mut columns = RollupColumns::default();
        for (key, sums) in rollups {
            columns.push(key, sums);
        }
        sqlx::query(POSTGRES_ROLLUP_UPSERT)
            .bind(columns.granularity)
            .bind(columns.bucket)
            .bind(columns.dimension)
            .bind(columns.value)
            .bind(columns.requests)
            .bind(columns.errors)
            .bind(columns.prompt_tokens)
            .bind(columns.completion_tokens)
            .bind(columns.total_tokens)
            .bind(columns.latency_sum_ms)
            .bind(columns.latency_max_ms)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The INSERT names the columns, and casts the arrays, in the order [`LogColumns::bind`]
    /// binds them.
    #[test]
    fn the_postgres_log_insert_takes_the_arrays_in_bind_order() {
        let columns: Vec<String> = LOG_COLUMNS
            .iter()
            .map(|(column, _)| format!("\"{column}\""))
            .collect();
        let arrays: Vec<String> = LOG_COLUMNS
            .iter()
            .enumerate()
            .map(|(index, (_, sql))| format!("${}::{sql}[]", index + 1))
            .collect();
        let expected = format!(
            r#"INSERT INTO "GatehouseGatewayLogs" ({}) SELECT * FROM unnest({}) ON CONFLICT ("CorrelationId", "TimeGenerated") DO NOTHING RETURNING "CorrelationId""#,
            columns.join(", "),
            arrays.join(", ")
        );
        assert_eq!(POSTGRES_LOG_INSERT, expected);
        assert_eq!(LOG_COLUMNS.len(), 51);
    }

    #[test]
    fn json_columns_are_sent_as_they_are_or_as_null() {
        let sent = |text: &str| serde_json::to_string(&json_or_null(text.to_owned()).0).unwrap();
        assert_eq!(sent(r#"["a", "b"]"#), r#"["a", "b"]"#);
        assert_eq!(sent("not json"), "null");
    }
}

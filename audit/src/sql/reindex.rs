//! Indexing the prompts and completions of a time range again, from the LLM log, for calls whose
//! full-text entries an earlier version made: before 2026-12-03 the JSON of the messages was
//! indexed instead of what they say (`message_text`), and PostgreSQL's parser made the vectors
//! instead of the store (`full_text`), so those calls miss searches that find newer ones.
//!
//! The work goes in batches of [`REINDEX_BATCH`] calls, each its own short transaction, in
//! `TimeGenerated` order, while the store keeps writing: on SQLite each batch takes the index's
//! order lock, as a write of the store does; on PostgreSQL it updates the vectors of the batch's
//! rows in place and gives them new blocks in the word index (`search_blocks`). Calls whose content has expired have nothing to index and are left alone.

use std::collections::HashMap;

use sqlx::{Postgres, QueryBuilder, Sqlite};
use time::OffsetDateTime;

use super::search_index::{IndexRow, SearchIndex, rows_of_pieces, without_pieces};
use super::{
    Engine, SqlStore, StoreError, full_text, message_text, search_blocks, search_merge, sqlite_time,
};

/// Calls indexed again per transaction.
const REINDEX_BATCH: i64 = 512;

impl SqlStore {
    /// Indexes again, from the LLM log, the prompts and completions of the calls with
    /// `from <= TimeGenerated < to`, so that they are searched as calls written now are. Runs
    /// beside the store's writes. Returns how many calls were indexed again: on PostgreSQL every
    /// call with stored content (a call without messages gets an empty vector, as when it was
    /// written), on SQLite every call with a prompt or a completion.
    pub async fn reindex_search(
        &self,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        match &self.engine {
            Engine::Sqlite { reader, search, .. } => reindex_sqlite(reader, search, from, to).await,
            Engine::Postgres { pool, .. } => {
                let count = reindex_postgres(pool, from, to).await?;
                search_merge::settle(pool).await?;
                Ok(count)
            }
        }
    }
}

async fn reindex_sqlite(
    reader: &sqlx::SqlitePool,
    search: &SearchIndex,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<u64, StoreError> {
    let (from, to) = (sqlite_time(from), sqlite_time(to));
    let mut after: Option<(String, i64)> = None;
    let mut count = 0;
    loop {
        // Keyset pagination in the time index's order (its entries end with the RecordId), over
        // the calls with text: those past the content window have none, and no index entry.
        let mut query = QueryBuilder::<Sqlite>::new(
            "SELECT TimeGenerated, RecordId FROM GatehouseGatewayLogs l WHERE EXISTS \
             (SELECT 1 FROM ApiManagementGatewayLlmLog m WHERE m.CorrelationId = l.CorrelationId AND m.SequenceNumber > 0) \
             AND TimeGenerated < ",
        );
        query.push_bind(to.clone());
        match &after {
            Some((time, id)) => {
                query
                    .push(" AND (TimeGenerated, RecordId) > (")
                    .push_bind(time.clone())
                    .push(", ")
                    .push_bind(*id)
                    .push(")");
            }
            None => {
                query.push(" AND TimeGenerated >= ").push_bind(from.clone());
            }
        }
        query
            .push(" ORDER BY TimeGenerated, RecordId LIMIT ")
            .push_bind(REINDEX_BATCH);
        let calls: Vec<(String, i64)> = query.build_query_as().fetch_all(reader).await?;
        let Some(last) = calls.last().cloned() else {
            return Ok(count);
        };
        let ids: Vec<i64> = calls.iter().map(|(_, id)| *id).collect();
        let rows = index_rows(reader, &ids).await?;
        count += replace_entries(reader, search, &ids, rows).await?;
        after = Some(last);
    }
}

/// The index entries of the calls `ids` that have text, from their pieces in the LLM log.
async fn index_rows(reader: &sqlx::SqlitePool, ids: &[i64]) -> Result<Vec<IndexRow>, StoreError> {
    let mut query = QueryBuilder::<Sqlite>::new(
        "SELECT l.RecordId, m.RequestMessages, m.ResponseMessages \
         FROM GatehouseGatewayLogs l \
         JOIN ApiManagementGatewayLlmLog m ON m.CorrelationId = l.CorrelationId AND m.SequenceNumber > 0 \
         WHERE l.RecordId IN (",
    );
    let mut list = query.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    query.push(") ORDER BY l.RecordId, m.SequenceNumber");
    let pieces: Vec<(i64, Option<String>, Option<String>)> =
        query.build_query_as().fetch_all(reader).await?;
    rows_of_pieces(pieces).await
}

/// Replaces the index entries of the calls `ids` with `rows` (read from their pieces before),
/// then takes out again the entries of those whose content retention has removed since, in this
/// process or in the gateway's: an entry made from pieces read before their removal would
/// otherwise stay, and the call be found by words of its expired prompt. Retention removes a
/// call's entry and its pieces under the index's order lock, which the replacement takes too, so
/// an entry made here is either found here without its pieces or removed by retention after. Returns how many calls have entries again.
async fn replace_entries(
    reader: &sqlx::SqlitePool,
    search: &SearchIndex,
    ids: &[i64],
    rows: Vec<IndexRow>,
) -> Result<u64, StoreError> {
    let with_text: Vec<i64> = rows.iter().map(|row| row.0).collect();
    let replaced = search.replace(ids, rows).await?;
    if with_text.is_empty() {
        return Ok(replaced);
    }
    let gone = without_pieces(reader, with_text).await?;
    if !gone.is_empty() {
        search.remove(&gone).await?;
    }
    Ok(replaced.saturating_sub(gone.len() as u64))
}

/// One call of a PostgreSQL batch: its key in `GatehouseCallContent`.
type ContentKey = (String, OffsetDateTime);

async fn reindex_postgres(
    pool: &sqlx::PgPool,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<u64, StoreError> {
    let mut after: Option<ContentKey> = None;
    let mut count = 0;
    loop {
        let mut query = QueryBuilder::<Postgres>::new(
            r#"SELECT "CorrelationId", "TimeGenerated", coalesce("SearchBlock", "CorrelationId") FROM "GatehouseCallContent" WHERE "TimeGenerated" < "#,
        );
        query.push_bind(to);
        match &after {
            Some((id, time)) => {
                query
                    .push(r#" AND "TimeGenerated" >= "#)
                    .push_bind(*time)
                    .push(r#" AND ("TimeGenerated", "CorrelationId") > ("#)
                    .push_bind(*time)
                    .push(", ")
                    .push_bind(id.clone())
                    .push(")");
            }
            None => {
                query.push(r#" AND "TimeGenerated" >= "#).push_bind(from);
            }
        }
        query
            .push(r#" ORDER BY "TimeGenerated", "CorrelationId" LIMIT "#)
            .push_bind(REINDEX_BATCH);
        let rows: Vec<(String, OffsetDateTime, String)> =
            query.build_query_as().fetch_all(pool).await?;
        // Each call's key, and the block it had (for `delete_unnamed` below).
        let (calls, mut old_blocks): (Vec<ContentKey>, Vec<String>) = rows
            .into_iter()
            .map(|(id, time, block)| ((id, time), block))
            .unzip();
        let (Some(first), Some(last)) = (calls.first().cloned(), calls.last().cloned()) else {
            return Ok(count);
        };
        old_blocks.sort_unstable();
        old_blocks.dedup();
        let ids: Vec<String> = calls.iter().map(|(id, _)| id.clone()).collect();
        let pieces: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
            r#"SELECT "CorrelationId", "RequestMessages", "ResponseMessages" FROM "GatehouseLlmLogPieces" WHERE "TimeGenerated" >= $1 AND "TimeGenerated" <= $2 AND "CorrelationId" = ANY($3) ORDER BY "CorrelationId", "SequenceNumber""#,
        )
        .bind(first.1)
        .bind(last.1)
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        let indexed = search_blocks::vectors_in_blocks(move || vectors_of(&calls, pieces)).await?;
        // The calls' new blocks, and each call its vector and block, at once. The blocks the
        // calls had stay for the calls of theirs that are not in this batch, and go with the
        // last of them.
        let mut tx = pool.begin().await?;
        search_blocks::insert(&mut tx, indexed.blocks).await?;
        let mut update = QueryBuilder::<Postgres>::new(
            r#"UPDATE "GatehouseCallContent" c SET "SearchText" = v.s, "SearchBlock" = v.b FROM ("#,
        );
        update.push_values(indexed.calls, |mut row, ((id, time), vector, block)| {
            row.push_bind(id)
                .push_bind(time)
                .push_bind(vector)
                .push_bind(block)
                .push_unseparated("::text");
        });
        update
            .push(r#") AS v(id, t, s, b) WHERE c."CorrelationId" = v.id AND c."TimeGenerated" = v.t AND c."TimeGenerated" >= "#)
            .push_bind(first.1)
            .push(r#" AND c."TimeGenerated" <= "#)
            .push_bind(last.1);
        count += update.build().execute(&mut *tx).await?.rows_affected();
        // The blocks the calls had, once no call names them: left, they would double the word
        // index of every range indexed again.
        search_blocks::delete_unnamed(
            &mut tx,
            old_blocks,
            search_blocks::day_start(first.1),
            last.1,
        )
        .await?;
        tx.commit().await?;
        after = Some(last);
    }
}

/// The vector of each call of `calls`, built from its LLM-log pieces (in `SequenceNumber` order)
/// as the store builds it when it writes the call; a call without pieces gets an empty one.
fn vectors_of(
    calls: &[ContentKey],
    pieces: Vec<(String, Option<String>, Option<String>)>,
) -> Vec<(ContentKey, OffsetDateTime, full_text::TsVector)> {
    let mut messages: HashMap<String, (String, String)> = HashMap::new();
    for (id, request, response) in pieces {
        let (prompt, completion) = messages.entry(id).or_default();
        prompt.push_str(request.as_deref().unwrap_or_default());
        completion.push_str(response.as_deref().unwrap_or_default());
    }
    calls
        .iter()
        .map(|key| {
            let (prompt, completion) = messages
                .get(&key.0)
                .map(|(prompt, completion)| {
                    (
                        message_text::searchable(prompt),
                        message_text::searchable(completion),
                    )
                })
                .unwrap_or_default();
            (
                key.clone(),
                key.1,
                full_text::TsVector::of(&[&prompt, &completion]),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::SearchFilter;

    /// A reindex that read a call's pieces just before retention removed them (in the gateway,
    /// while the command ran) does not leave the call findable by its expired words.
    #[tokio::test]
    async fn an_entry_made_from_pieces_that_expired_meanwhile_is_taken_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqlStore::open(&format!("sqlite:{}", dir.path().join("audit.db").display()))
            .await
            .unwrap();
        let at = OffsetDateTime::now_utc() - time::Duration::days(3);
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let mut record = crate::queue::tests::record(&format!("call-{i}"));
                record.time_generated = at + time::Duration::seconds(i);
                record.operation_id = Some(gatehouse_schema::OperationId::ChatCompletionsCreate);
                record.request_messages = Some(format!(
                    r#"[{{"role":"user","content":"quarterly zebra report {i}"}}]"#
                ));
                record
            })
            .collect();
        store.write(&calls).await.unwrap();
        let Engine::Sqlite { reader, search, .. } = &store.engine else {
            unreachable!("a SQLite store")
        };
        let ids: Vec<i64> = sqlx::query_scalar("SELECT RecordId FROM GatehouseGatewayLogs")
            .fetch_all(reader)
            .await
            .unwrap();
        // The reindex reads the pieces; then retention removes the content (metadata stays) ...
        let stale = index_rows(reader, &ids).await.unwrap();
        assert_eq!(stale.len(), 3);
        let report = store
            .enforce_retention(OffsetDateTime::now_utc(), at - time::Duration::days(1), 100)
            .await
            .unwrap();
        assert_eq!(report.message_pieces_removed, 3, "{report:?}");
        // ... and only then does the reindex write its entries.
        assert_eq!(
            replace_entries(reader, search, &ids, stale).await.unwrap(),
            0
        );
        let mut filter =
            SearchFilter::between(at - time::Duration::hours(1), OffsetDateTime::now_utc());
        filter.text = Some("zebra".to_owned());
        assert!(store.search(&filter).await.unwrap().items.is_empty());
    }
}

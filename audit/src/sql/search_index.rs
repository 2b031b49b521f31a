//! SQLite's full-text index of prompts and completions, in a database file of its own beside the
//! store (`audit.db` → `audit.db-search`), written by a connection of its own.
//!
//! Indexing is the costliest part of writing a call (tokenizing 4 KB of text and adding ≈ 400
//! terms: about 40 % of the writer's time). SQLite lets one connection write a database file at a
//! time, so in the store's file the index was written one after the other with the metadata. In a
//! file of its own, its connection indexes a batch on the second core while the store's writer
//! inserts the batch's LLM log, bodies and rollups and commits them.
//!
//! The two files commit one after the other, never half of one: the index commits a batch after
//! the store has, together with `IndexedThrough`, the highest `RecordId` it holds. So the index
//! never holds a call that the store does not, and what it lacks (a crash between the two commits,
//! a failed index write, a store from before the index had its own file, a deleted index file) is
//! every call above `IndexedThrough`. Then the index is *behind*: batches are not indexed as they
//! are written, and a background task indexes the calls above `IndexedThrough` in order from the
//! LLM log's pieces, until it reaches the last call; searches meanwhile miss the calls not yet
//! indexed. The store's reader connections attach the file as `search`, so queries name the table
//! `GatehouseContentSearch` as before.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{QueryBuilder, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Mutex, MutexGuard, Notify};

use super::StoreError;
use super::message_text::searchable;

/// Calls indexed per transaction when the index catches up.
const CATCH_UP_BATCH: i64 = 512;

/// Rows per multi-row INSERT into the index (three bound values each).
const ROWS_PER_STATEMENT: usize = 500;

/// The index's page cache, MiB.
const CACHE_MIB: u64 = 32;

/// The full-text index of a SQLite store.
#[derive(Debug, Clone)]
pub(crate) struct SearchIndex {
    /// The one connection that writes the index's file.
    pool: SqlitePool,
    /// Where the file is, for the readers' `ATTACH`.
    path: PathBuf,
    /// Taken by each write of the store and each catch-up step, so that batches reach the index
    /// in the order of their `RecordId`s and `IndexedThrough` means "every call up to here".
    order: Arc<Mutex<()>>,
    /// The index lacks calls above `IndexedThrough`; writes leave indexing to the catch-up.
    behind: Arc<AtomicBool>,
    /// A catch-up task is running.
    catching_up: Arc<AtomicBool>,
    /// Told when a catch-up task stops.
    settled: Arc<Notify>,
}

/// The index's file for the store's file `store`: its name with `-search` appended, as SQLite
/// names a database's `-wal` and `-shm` files (the index has its own `-wal` and `-shm` beside it).
pub fn path_for(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_owned();
    name.push("-search");
    PathBuf::from(name)
}

/// Attaches the index's file to a store connection as the schema `search`.
pub(super) async fn attach(connection: &mut SqliteConnection, path: &Path) -> sqlx::Result<()> {
    sqlx::query("ATTACH DATABASE ? AS search")
        .bind(path.to_string_lossy().into_owned())
        .execute(connection)
        .await?;
    Ok(())
}

/// One call's text to index: its `RecordId`, prompt and completion.
pub(super) type IndexRow = (i64, String, String);

impl SearchIndex {
    /// Opens (creating it if missing) the index's file beside the store's file `store_path`.
    pub(super) async fn connect(
        store_path: &Path,
        options: &SqliteConnectOptions,
    ) -> Result<SearchIndex, StoreError> {
        let path = path_for(store_path);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(
                options
                    .clone()
                    .filename(&path)
                    .journal_mode(SqliteJournalMode::Wal)
                    .pragma("cache_size", format!("-{}", CACHE_MIB * 1024))
                    .pragma("temp_store", "MEMORY")
                    .pragma("wal_autocheckpoint", super::WRITER_AUTOCHECKPOINT_PAGES),
            )
            .await?;
        Ok(SearchIndex {
            pool,
            path,
            order: Arc::new(Mutex::new(())),
            behind: Arc::new(AtomicBool::new(false)),
            catching_up: Arc::new(AtomicBool::new(false)),
            settled: Arc::new(Notify::new()),
        })
    }

    /// The index's file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Creates or updates the index's tables, then compares `IndexedThrough` with the store's
    /// last call (read through `reader`) and starts catching up when the index lacks calls.
    pub(super) async fn migrate(&self, reader: &SqlitePool) -> Result<(), StoreError> {
        sqlx::migrate!("../migrations/audit/sqlite-search")
            .run(&self.pool)
            .await?;
        let last: Option<i64> =
            sqlx::query_scalar("SELECT max(RecordId) FROM GatehouseGatewayLogs")
                .fetch_one(reader)
                .await?;
        if last.unwrap_or(0) > self.indexed_through().await? {
            self.fall_behind(reader);
        }
        Ok(())
    }

    /// The highest `RecordId` the index holds every call up to.
    pub(super) async fn indexed_through(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT IndexedThrough FROM GatehouseSearchProgress WHERE Id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    /// Whether the index lacks calls that the store holds.
    pub(super) fn is_behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// Takes the order lock: held by a store write from before its metadata insert until the
    /// index has committed the batch.
    pub(super) async fn lock(&self) -> MutexGuard<'_, ()> {
        self.order.lock().await
    }

    /// Writes `rows` (the calls of one batch that have text, `RecordId`s above
    /// `IndexedThrough`) and the new `IndexedThrough`, `through` (the batch's last new
    /// `RecordId`), in a transaction left open: the caller commits it after the store's
    /// transaction has committed, and drops it (a rollback) when that failed. Nothing to do for
    /// a batch without new calls.
    pub(super) async fn stage(
        &self,
        rows: Vec<IndexRow>,
        through: Option<i64>,
    ) -> Result<Option<Transaction<'static, Sqlite>>, StoreError> {
        let Some(through) = through else {
            return Ok(None);
        };
        let mut tx = self.pool.begin().await?;
        insert(&mut tx, rows).await?;
        set_indexed_through(&mut tx, through).await?;
        Ok(Some(tx))
    }

    /// Commits a batch staged by [`SearchIndex::stage`]. On failure the index is behind and
    /// catches up from the store (read through `reader`).
    pub(super) async fn commit(
        &self,
        staged: Result<Option<Transaction<'static, Sqlite>>, StoreError>,
        reader: &SqlitePool,
    ) {
        let outcome = match staged {
            Ok(Some(tx)) => tx.commit().await.map_err(StoreError::from),
            Ok(None) => Ok(()),
            Err(error) => Err(error),
        };
        if let Err(error) = outcome {
            tracing::warn!(%error, "audit store: the full-text index missed a batch; it catches up from the LLM log");
            self.fall_behind(reader);
        }
    }

    /// Marks the index behind and starts the catch-up task unless it runs already.
    pub(super) fn fall_behind(&self, reader: &SqlitePool) {
        self.behind.store(true, Ordering::Release);
        if self.catching_up.swap(true, Ordering::AcqRel) {
            return;
        }
        let index = self.clone();
        let reader = reader.clone();
        tokio::spawn(async move {
            loop {
                match index.catch_up_step(&reader).await {
                    Ok(true) => continue,
                    Ok(false) => {
                        // A batch that failed after the last step marked the index behind again
                        // but found this task still running: go on, unless another task did.
                        index.catching_up.store(false, Ordering::Release);
                        if index.is_behind() && !index.catching_up.swap(true, Ordering::AcqRel) {
                            continue;
                        }
                        index.settled.notify_waiters();
                        return;
                    }
                    Err(error) => {
                        if index.pool.is_closed() || reader.is_closed() {
                            break;
                        }
                        tracing::warn!(%error, "audit store: catching up the full-text index failed; trying again in 5 s");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
            index.catching_up.store(false, Ordering::Release);
            index.settled.notify_waiters();
        });
    }

    /// Waits until the index is no longer behind: no catch-up runs and none is due (or the index
    /// is closed, which stops a catch-up).
    pub(super) async fn caught_up(&self) {
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            // Registered before the flags are read, so that a task stopping in between is heard.
            settled.as_mut().enable();
            let running = self.catching_up.load(Ordering::Acquire);
            if !running && (!self.is_behind() || self.pool.is_closed()) {
                return;
            }
            settled.await;
        }
    }

    /// Indexes the next calls above `IndexedThrough`, up to [`CATCH_UP_BATCH`] of them, from the
    /// LLM log's pieces. Returns whether there may be more; when there are none, the index is no
    /// longer behind.
    async fn catch_up_step(&self, reader: &SqlitePool) -> Result<bool, StoreError> {
        let order = self.lock().await;
        let from = self.indexed_through().await?;
        let ids: Vec<i64> = sqlx::query_scalar(
            "SELECT RecordId FROM GatehouseGatewayLogs WHERE RecordId > ? ORDER BY RecordId LIMIT ?",
        )
        .bind(from)
        .bind(CATCH_UP_BATCH)
        .fetch_all(reader)
        .await?;
        let Some(&through) = ids.last() else {
            self.behind.store(false, Ordering::Release);
            return Ok(false);
        };
        let pieces: Vec<(i64, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT l.RecordId, m.RequestMessages, m.ResponseMessages \
             FROM GatehouseGatewayLogs l \
             JOIN ApiManagementGatewayLlmLog m ON m.CorrelationId = l.CorrelationId AND m.SequenceNumber > 0 \
             WHERE l.RecordId > ? AND l.RecordId <= ? ORDER BY l.RecordId, m.SequenceNumber",
        )
        .bind(from)
        .bind(through)
        .fetch_all(reader)
        .await?;
        let rows = rows_of_pieces(pieces).await?;
        let with_text: Vec<i64> = rows.iter().map(|row| row.0).collect();
        // Another process on the same files (the portal, a reindex) may catch up too; the order
        // lock is this process's only. Under the index file's write lock, the calls are indexed
        // only if no one indexed past `from` meanwhile (the index keeps no text, so it would take
        // a second entry of a call without complaint).
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let now_through: i64 =
            sqlx::query_scalar("SELECT IndexedThrough FROM GatehouseSearchProgress WHERE Id = 1")
                .fetch_one(&mut *tx)
                .await?;
        if now_through != from {
            tx.rollback().await?;
            return Ok(true);
        }
        insert(&mut tx, rows).await?;
        set_indexed_through(&mut tx, through).await?;
        tx.commit().await?;
        // Retention in another process may have removed the calls' pieces since they were read
        // (it removes a call's entry first, then its pieces): their entries go again, as a
        // reindex's do (`reindex::replace_entries`).
        let gone = without_pieces(reader, with_text).await?;
        self.remove_holding(&order, &gone).await?;
        Ok(true)
    }

    /// Replaces the entries of the calls `ids` with `rows` (those of them that have text), leaving
    /// alone the calls above `IndexedThrough`: the writes or the catch-up index those as they are
    /// now. Returns how many calls have entries again.
    pub(super) async fn replace(
        &self,
        ids: &[i64],
        rows: Vec<IndexRow>,
    ) -> Result<u64, StoreError> {
        let _order = self.lock().await;
        let through = self.indexed_through().await?;
        let ids: Vec<i64> = ids.iter().copied().filter(|id| *id <= through).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let rows: Vec<IndexRow> = rows.into_iter().filter(|row| row.0 <= through).collect();
        let replaced = rows.len() as u64;
        let mut tx = self.pool.begin().await?;
        let mut delete =
            QueryBuilder::<Sqlite>::new("DELETE FROM GatehouseContentSearch WHERE rowid IN (");
        let mut list = delete.separated(", ");
        for id in &ids {
            list.push_bind(*id);
        }
        delete.push(")");
        delete.build().execute(&mut *tx).await?;
        insert(&mut tx, rows).await?;
        tx.commit().await?;
        Ok(replaced)
    }

    /// Removes calls from the index (their content expired).
    pub(super) async fn remove(&self, record_ids: &[i64]) -> Result<(), StoreError> {
        let order = self.lock().await;
        self.remove_holding(&order, record_ids).await
    }

    /// [`SearchIndex::remove`] for a caller that holds the order lock ([`SearchIndex::lock`]),
    /// so that it can remove what the index was made from before letting the catch-up go on.
    pub(super) async fn remove_holding(
        &self,
        _order: &MutexGuard<'_, ()>,
        record_ids: &[i64],
    ) -> Result<(), StoreError> {
        if record_ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for id in record_ids {
            sqlx::query("DELETE FROM GatehouseContentSearch WHERE rowid = ?")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Closes the index's connection.
    pub(super) async fn close(&self) {
        self.pool.close().await;
    }
}

/// Those of the calls `ids` (`RecordId`s) that no longer have LLM-log pieces: retention removed
/// their content since their entries were made from them.
pub(super) async fn without_pieces(
    reader: &SqlitePool,
    ids: Vec<i64>,
) -> Result<Vec<i64>, StoreError> {
    if ids.is_empty() {
        return Ok(ids);
    }
    let mut query = QueryBuilder::<Sqlite>::new(
        "SELECT DISTINCT l.RecordId FROM GatehouseGatewayLogs l \
         JOIN ApiManagementGatewayLlmLog m ON m.CorrelationId = l.CorrelationId AND m.SequenceNumber > 0 \
         WHERE l.RecordId IN (",
    );
    let mut list = query.separated(", ");
    for id in &ids {
        list.push_bind(*id);
    }
    query.push(")");
    let kept: std::collections::HashSet<i64> = query
        .build_query_scalar()
        .fetch_all(reader)
        .await?
        .into_iter()
        .collect();
    Ok(ids.into_iter().filter(|id| !kept.contains(id)).collect())
}

/// The rows to index for the calls whose LLM-log pieces are `pieces` (in `RecordId`, then
/// `SequenceNumber` order), read out of their JSON on a blocking thread.
pub(super) async fn rows_of_pieces(
    pieces: Vec<(i64, Option<String>, Option<String>)>,
) -> Result<Vec<IndexRow>, StoreError> {
    tokio::task::spawn_blocking(move || searchable_rows(join_pieces(pieces)))
        .await
        .map_err(|error| {
            StoreError::Database(sqlx::Error::Protocol(format!(
                "reading the searchable text failed: {error}"
            )))
        })
}

/// Joins the LLM log's pieces of each call (in `RecordId`, then `SequenceNumber` order) into its
/// prompt and completion, as the store wrote them.
fn join_pieces(pieces: Vec<(i64, Option<String>, Option<String>)>) -> Vec<IndexRow> {
    let mut rows: Vec<IndexRow> = Vec::new();
    for (id, request, response) in pieces {
        if rows.last().is_none_or(|(last, _, _)| *last != id) {
            rows.push((id, String::new(), String::new()));
        }
        if let Some((_, prompt, completion)) = rows.last_mut() {
            prompt.push_str(request.as_deref().unwrap_or_default());
            completion.push_str(response.as_deref().unwrap_or_default());
        }
    }
    rows
}

/// The rows to index for calls whose prompt and completion are `rows`, as recorded (JSON): what
/// they say, as the store indexes a call it writes (`message_text`).
fn searchable_rows(rows: Vec<IndexRow>) -> Vec<IndexRow> {
    rows.into_iter()
        .map(|(id, prompt, completion)| (id, searchable(&prompt), searchable(&completion)))
        .collect()
}

async fn insert(tx: &mut Transaction<'static, Sqlite>, rows: Vec<IndexRow>) -> sqlx::Result<()> {
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<IndexRow> = rows.by_ref().take(ROWS_PER_STATEMENT).collect();
        let mut query = QueryBuilder::<Sqlite>::new(
            "INSERT INTO GatehouseContentSearch (rowid, Prompt, Completion) ",
        );
        query.push_values(chunk, |mut b, (id, prompt, completion)| {
            b.push_bind(id).push_bind(prompt).push_bind(completion);
        });
        query.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn set_indexed_through(
    tx: &mut Transaction<'static, Sqlite>,
    through: i64,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE GatehouseSearchProgress SET IndexedThrough = max(IndexedThrough, ?) WHERE Id = 1",
    )
    .bind(through)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use gatehouse_schema::AuditRecord;
    use serde_json::json;
    use sqlx::{ConnectOptions as _, Connection as _};
    use time::OffsetDateTime;
    use time::macros::datetime;

    use super::*;
    use crate::sql::{Engine, SearchFilter, SqlStore};

    const T0: OffsetDateTime = datetime!(2026-12-03 09:00 UTC);

    /// A chat call whose prompt says `words`.
    fn call(i: usize, words: &str) -> AuditRecord {
        let prompt = json!([{"role": "user", "content": words}]).to_string();
        serde_json::from_value(json!({
            "TimeGenerated": (T0 + time::Duration::seconds(i as i64)).format(&time::format_description::well_known::Rfc3339).unwrap(),
            "CorrelationId": format!("call-{i:03}"), "GatewayId": "gw-1", "OperationId": "chatcompletions_create",
            "CallerIpAddress": "198.51.100.7", "PeerIpAddress": "198.51.100.7", "Method": "POST",
            "Url": "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", "ClientProtocol": "HTTP/1.1",
            "ResponseCode": 200, "IsRequestSuccess": true, "BackendResponseCode": 200,
            "BackendId": "east", "BackendUrl": null, "RequestSize": 100, "ResponseSize": 100,
            "TotalTime": 100, "BackendTime": 90, "TimeToFirstByte": null, "ApimSubscriptionId": "team-a",
            "ProductId": null, "UserId": null, "UserName": null, "TenantId": null,
            "DeploymentName": "gpt-4o", "ModelName": "gpt-4o-2024-08-06", "ApiVersion": "2024-10-21", "IsStreamCompletion": false,
            "Usage": null, "BackendRequestBody": null, "RequestBodyTruncated": false,
            "BackendResponseBody": null, "ResponseBodyTruncated": false,
            "RequestMessages": prompt, "ResponseMessages": null, "ClientAborted": false,
            "LastErrorReason": null, "LastErrorMessage": null
        }))
        .unwrap()
    }

    async fn found(store: &SqlStore, word: &str) -> Vec<String> {
        let page = store
            .search(&SearchFilter {
                text: Some(word.to_owned()),
                limit: 100,
                ..SearchFilter::between(T0, T0 + time::Duration::hours(1))
            })
            .await
            .unwrap();
        let mut ids: Vec<String> = page.items.into_iter().map(|c| c.correlation_id).collect();
        ids.sort();
        ids
    }

    /// The failure path of the two-file commit: while another connection holds the index file's
    /// write lock past the index's busy timeout, batches are stored all the same, the index falls
    /// behind and later batches leave their calls to the catch-up; once the lock is gone the
    /// catch-up indexes every call, once, and `IndexedThrough` reaches the last call.
    #[tokio::test]
    async fn calls_the_index_could_not_take_are_indexed_by_the_catch_up_once_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite:{}", dir.path().join("audit.db").display());
        let store = SqlStore::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let Engine::Sqlite { search, writer, .. } = &store.engine else {
            unreachable!("a sqlite: URL opens a SQLite store");
        };
        assert_eq!(store.write(&[call(0, "alpha")]).await.unwrap(), 1);
        assert_eq!(found(&store, "alpha").await, ["call-000"]);

        // The index's one connection gives up after 200 ms instead of 30 s.
        sqlx::query("PRAGMA busy_timeout = 200")
            .execute(&search.pool)
            .await
            .unwrap();
        let mut holder = SqliteConnectOptions::new()
            .filename(search.path())
            .connect()
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut holder)
            .await
            .unwrap();

        assert_eq!(
            store
                .write(&[call(1, "bravo"), call(2, "bravo charlie")])
                .await
                .unwrap(),
            2,
            "the store takes the batch the index cannot"
        );
        assert!(search.is_behind());
        assert_eq!(
            store.write(&[call(3, "charlie")]).await.unwrap(),
            1,
            "a batch written while the index is behind"
        );
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM GatehouseGatewayLogs")
            .fetch_one(writer)
            .await
            .unwrap();
        assert_eq!(stored, 4);
        assert!(found(&store, "bravo").await.is_empty());
        assert!(found(&store, "charlie").await.is_empty());
        assert_eq!(found(&store, "alpha").await, ["call-000"]);

        sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
        holder.close().await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), search.caught_up())
            .await
            .expect("the catch-up finishes within 30 s");
        assert!(!search.is_behind());
        assert_eq!(found(&store, "bravo").await, ["call-001", "call-002"]);
        assert_eq!(found(&store, "charlie").await, ["call-002", "call-003"]);
        assert_eq!(found(&store, "alpha").await, ["call-000"]);
        let last: i64 = sqlx::query_scalar("SELECT max(RecordId) FROM GatehouseGatewayLogs")
            .fetch_one(writer)
            .await
            .unwrap();
        assert_eq!(search.indexed_through().await.unwrap(), last);
        let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM GatehouseContentSearch")
            .fetch_one(&search.pool)
            .await
            .unwrap();
        assert_eq!(entries, 4, "every call indexed once");
    }

    #[test]
    fn the_index_file_is_the_store_file_with_search_appended() {
        assert_eq!(
            path_for(Path::new("/var/lib/gatehouse/audit.db")),
            PathBuf::from("/var/lib/gatehouse/audit.db-search")
        );
    }

    #[test]
    fn pieces_join_into_each_calls_prompt_and_completion() {
        let rows = join_pieces(vec![
            (3, Some("ab".into()), None),
            (3, Some("cd".into()), None),
            (3, None, Some("ef".into())),
            (7, None, Some("gh".into())),
        ]);
        assert_eq!(
            rows,
            vec![
                (3, "abcd".to_owned(), "ef".to_owned()),
                (7, String::new(), "gh".to_owned())
            ]
        );
    }
}

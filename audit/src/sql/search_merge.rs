//! PostgreSQL: merging the full-text index's pending list in the background.
//!
//! The full-text index (GIN over the words of blocks of calls, `"GatehouseSearchBlocks"."Words"`,
//! see `search_blocks.rs`) takes new blocks into a *pending list* (GIN's
//! fast update) and merges that list into the index proper when it grows past
//! `gin_pending_list_limit` (4 MB by default), inside the INSERT of whichever batch passed it.
//! That merge was ≈ 36 % of the server's time writing calls, and the batch that ran it took 3–5 ×
//! as long as the others while the rest of the machine waited for it.
//!
//! The store's sessions raise the limit to 64 MB ([`SET_PENDING_LIST_LIMIT`]), so that a write only appends,
//! and this task merges the list (`gin_clean_pending_list`) on a connection of its own after
//! each batch, while the next batch is written. Searches read the pending list as well as the
//! index, so a call is searchable as soon as its batch commits; the limit only matters when the
//! task cannot keep up (or may not merge: the function needs the index's owner), and then a
//! write merges as before.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use sqlx::PgPool;
use time::Date;
use tokio::sync::mpsc;

use super::StoreError;
use super::partitions::{SEARCH_BLOCKS, partition_names_for};

/// Sets the pending list's size at which a write merges it itself, on each of the store's
/// sessions: 64 MB, about 30 batches of 512 calls, far more than the task lets it reach.
pub(super) const SET_PENDING_LIST_LIMIT: &str = "SET gin_pending_list_limit = '64MB'";

/// Merges the pending lists of the full-text index's partitions that batches wrote to.
#[derive(Debug, Clone)]
pub(crate) struct SearchMerge {
    /// Days written since the last merge started.
    days: Arc<Mutex<BTreeSet<Date>>>,
    /// Wakes the task; at most one wake-up waits, so that merges coalesce.
    wake: mpsc::Sender<()>,
}

impl SearchMerge {
    /// Starts the task on `pool`. It ends when every handle is dropped or the pool is closed.
    pub(super) fn start(pool: PgPool) -> SearchMerge {
        let (wake, mut woken) = mpsc::channel(1);
        let merge = SearchMerge {
            days: Arc::default(),
            wake,
        };
        let days = Arc::clone(&merge.days);
        tokio::spawn(async move {
            let mut failing = false;
            while woken.recv().await.is_some() {
                if pool.is_closed() {
                    break;
                }
                let written: Vec<Date> =
                    std::mem::take(&mut *days.lock().unwrap_or_else(PoisonError::into_inner))
                        .into_iter()
                        .collect();
                match merge_pending(&pool, Some(&written)).await {
                    Ok(_) => failing = false,
                    Err(_) if pool.is_closed() => break,
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, "audit store: merging the full-text index's pending list failed; writes merge it when it reaches 64 MB");
                    }
                    Err(_) => {}
                }
            }
        });
        merge
    }

    /// Asks for a merge of the partitions holding `days` (the days of a batch just committed).
    pub(super) fn after_write(&self, days: impl IntoIterator<Item = Date>) {
        self.days
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(days);
        // A full channel means a merge is already asked for, which takes these days too.
        let _ = self.wake.try_send(());
    }
}

/// Merges the pending lists of every partition of the full-text index now, on `pool`; returns
/// when they are merged (a merge the task is running finishes first).
pub(super) async fn settle(pool: &PgPool) -> Result<(), StoreError> {
    merge_pending(pool, None).await.map(drop)
}

/// Merges the pending lists of the full-text index of the block partitions that hold `days`
/// (of every partition for `None`). Returns the pending-list pages merged.
async fn merge_pending(pool: &PgPool, days: Option<&[Date]>) -> Result<i64, StoreError> {
    let names: Option<Vec<String>> = days.map(|days| {
        days.iter()
            .flat_map(|&day| partition_names_for(SEARCH_BLOCKS.name, day))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    });
    Ok(sqlx::query_scalar(
        r#"SELECT coalesce(sum(gin_clean_pending_list(x.indexrelid::regclass)), 0)::bigint
           FROM pg_index x JOIN pg_inherits i ON i.inhrelid = x.indexrelid
           WHERE i.inhparent = '"GatehouseSearchBlocks_Words"'::regclass
             AND ($1::text[] IS NULL
                  OR x.indrelid IN (SELECT to_regclass(quote_ident(n)) FROM unnest($1::text[]) AS n))"#,
    )
    .bind(names)
    .fetch_one(pool)
    .await?)
}

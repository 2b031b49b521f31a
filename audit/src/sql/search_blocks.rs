//! PostgreSQL: the full-text word index holds blocks of calls, not single calls (migration 0007).
//!
//! A GIN entry per distinct word of every call (≈ 250 a call) was about half of the server's time
//! writing a call (bench/README.md, "What the full-text word index costs PostgreSQL"). Calls that
//! are written together share most of their words, so the store groups the calls of a batch into
//! blocks of up to [`CALLS_PER_BLOCK`] calls of one UTC day and indexes each block's words once
//! (`"GatehouseSearchBlocks"`); each call keeps its own vector, with positions, unindexed
//! (`"SearchText"`), and names its block (`"SearchBlock"`). A search finds the blocks that hold
//! every word ([`full_text::block_tsquery`]) through the index and checks each of their calls
//! against its own vector ([`full_text::tsquery`], phrases included), so it finds exactly the
//! calls it found before. A call without words belongs to no block.

use std::collections::HashMap;

use sqlx::{Postgres, Transaction};
use time::{Date, OffsetDateTime, Time, UtcOffset};

use super::StoreError;
use super::full_text::{self, TsVector};

/// Calls per block at most. On the store_write benchmark's text, blocks of 64 calls hold 8.8 ×
/// fewer index entries than single calls (5.7 × for blocks of 16); a search for a rare word
/// checks at most this many calls per block it finds.
pub(super) const CALLS_PER_BLOCK: usize = 64;

/// One block: its id, its day's UTC midnight (its `"TimeGenerated"`, which puts it in its
/// day's partition) and the union of its calls' words.
#[derive(Debug)]
pub(super) struct Block {
    pub(super) id: String,
    pub(super) day: OffsetDateTime,
    pub(super) words: TsVector,
}

/// Groups calls, given as their time and vector in write order, into blocks of one UTC day and
/// at most [`CALLS_PER_BLOCK`] calls whose vectors together stay within PostgreSQL's size of a
/// vector. Returns each call's block id (`None` for a call without words) and the blocks.
pub(super) fn blocks_of(
    calls: &[(OffsetDateTime, &TsVector)],
) -> (Vec<Option<String>>, Vec<Block>) {
    // The block of each day that still takes calls, as an index into `groups`.
    let mut open: HashMap<Date, usize> = HashMap::new();
    // Day, member calls (indexes into `calls`), their vectors' bytes.
    let mut groups: Vec<(Date, Vec<usize>, usize)> = Vec::new();
    for (index, (time, vector)) in calls.iter().enumerate() {
        if vector.is_empty() {
            continue;
        }
        let day = time.to_offset(UtcOffset::UTC).date();
        let size = vector.size();
        let slot = match open.get(&day) {
            Some(&slot)
                if groups[slot].1.len() < CALLS_PER_BLOCK
                    && groups[slot].2 + size <= full_text::MAX_VECTOR_BYTES =>
            {
                slot
            }
            _ => {
                groups.push((day, Vec::with_capacity(CALLS_PER_BLOCK), 0));
                open.insert(day, groups.len() - 1);
                groups.len() - 1
            }
        };
        groups[slot].1.push(index);
        groups[slot].2 += size;
    }
    let mut ids = vec![None; calls.len()];
    let blocks = groups
        .into_iter()
        .map(|(_, members, _)| {
            // Random: never a call's `CorrelationId` (the id of a block made by migration 0007),
            // nor another gateway's block.
            let id = uuid::Uuid::new_v4().to_string();
            for &member in &members {
                ids[member] = Some(id.clone());
            }
            Block {
                words: TsVector::union_of(members.iter().map(|&member| calls[member].1)),
                id,
                day: day_start(calls[members[0]].0),
            }
        })
        .collect();
    (ids, blocks)
}

/// Calls' vectors and the blocks they go in, from [`vectors_in_blocks`].
#[derive(Debug)]
pub(super) struct CallsInBlocks<K> {
    /// Each call's key, vector and block (`None` without words), in the order they were built.
    pub(super) calls: Vec<(K, TsVector, Option<String>)>,
    /// The blocks, for [`insert`].
    pub(super) blocks: Vec<Block>,
}

/// Builds calls' vectors with `build` (a key, the call's time and its vector each) and groups
/// them in blocks, on a blocking thread started at once: splitting text into words takes tens of
/// µs a call (≈ 30 µs for 4 KB), so the caller starts its transaction meanwhile and awaits the
/// result when it needs it.
pub(super) fn vectors_in_blocks<K: Send + 'static>(
    build: impl FnOnce() -> Vec<(K, OffsetDateTime, TsVector)> + Send + 'static,
) -> impl Future<Output = Result<CallsInBlocks<K>, StoreError>> {
    let task = tokio::task::spawn_blocking(move || {
        let built = build();
        let (block_ids, blocks) = blocks_of(
            &built
                .iter()
                .map(|(_, time, vector)| (*time, vector))
                .collect::<Vec<_>>(),
        );
        CallsInBlocks {
            calls: built
                .into_iter()
                .zip(block_ids)
                .map(|((key, _, vector), block)| (key, vector, block))
                .collect(),
            blocks,
        }
    });
    async move {
        task.await.map_err(|error| {
            StoreError::Database(sqlx::Error::Protocol(format!(
                "building the full-text vectors failed: {error}"
            )))
        })
    }
}

/// Inserts `blocks` in one statement. A block is new every time its calls are written, so a
/// replayed batch whose calls are stored already leaves a block that no call names: it is never
/// found by itself (searches go from blocks to their calls), and goes with its day.
pub(super) async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    blocks: Vec<Block>,
) -> Result<(), StoreError> {
    if blocks.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(blocks.len());
    let mut days = Vec::with_capacity(blocks.len());
    let mut words = Vec::with_capacity(blocks.len());
    for block in blocks {
        ids.push(block.id);
        days.push(block.day);
        words.push(block.words);
    }
    sqlx::query(
        r#"INSERT INTO "GatehouseSearchBlocks" ("BlockId", "TimeGenerated", "Words") SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::tsvector[])"#,
    )
    .bind(ids)
    .bind(days)
    .bind(words)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Deletes those of `blocks` (dated from `from` to `to`) that no call names any more: the blocks
/// calls had before `reindex-audit` gave them new ones, and the new blocks of a replayed batch
/// whose calls were stored already (they keep the blocks they had). A block that a call outside the batch
/// still names stays until that call is indexed again too. A block's calls are of its day, from
/// its `TimeGenerated` on (the day's midnight, or the call's own time for the blocks of
/// migration 0007), which bounds the look-up to a day's partitions.
pub(super) async fn delete_unnamed(
    tx: &mut Transaction<'_, Postgres>,
    blocks: Vec<String>,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Result<u64, StoreError> {
    if blocks.is_empty() {
        return Ok(0);
    }
    let deleted = sqlx::query(
        r#"DELETE FROM "GatehouseSearchBlocks" b WHERE b."BlockId" = ANY($1) AND b."TimeGenerated" >= $2 AND b."TimeGenerated" <= $3 AND NOT EXISTS (SELECT 1 FROM "GatehouseCallContent" c WHERE coalesce(c."SearchBlock", c."CorrelationId") = b."BlockId" AND c."TimeGenerated" >= b."TimeGenerated" AND c."TimeGenerated" < b."TimeGenerated" + interval '1 day')"#,
    )
    .bind(blocks)
    .bind(from)
    .bind(to)
    .execute(&mut **tx)
    .await?;
    Ok(deleted.rows_affected())
}

/// The UTC midnight that begins the day of `time`: the earliest `TimeGenerated` of a block
/// holding a call of that time.
pub(super) fn day_start(time: OffsetDateTime) -> OffsetDateTime {
    time.to_offset(UtcOffset::UTC)
        .date()
        .with_time(Time::MIDNIGHT)
        .assume_utc()
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn calls_are_grouped_by_day_in_blocks_of_at_most_64() {
        let vector = TsVector::of(&["some words"]);
        let empty = TsVector::of(&[""]);
        let before_midnight = datetime!(2026-12-04 23:59:59 UTC);
        let after_midnight = datetime!(2026-12-05 00:00:01 +01:00); // 2026-12-04 23:00:01 UTC
        let next_day = datetime!(2026-12-05 00:00:00 UTC);
        let mut calls: Vec<(OffsetDateTime, &TsVector)> = Vec::new();
        for i in 0..150 {
            let time = match i % 3 {
                0 => before_midnight,
                1 => after_midnight,
                _ => next_day,
            };
            calls.push((time, if i == 7 { &empty } else { &vector }));
        }
        let (ids, blocks) = blocks_of(&calls);
        assert_eq!(ids[7], None, "a call without words has no block");
        // 99 calls with words of 2026-12-04 (64 + 35), 50 of 2026-12-05.
        let sizes: Vec<(OffsetDateTime, usize)> = blocks
            .iter()
            .map(|block| {
                let members = ids
                    .iter()
                    .filter(|id| id.as_ref() == Some(&block.id))
                    .count();
                (block.day, members)
            })
            .collect();
        assert_eq!(
            sizes,
            [
                (datetime!(2026-12-04 00:00 UTC), 64),
                (datetime!(2026-12-05 00:00 UTC), 50),
                (datetime!(2026-12-04 00:00 UTC), 35),
            ]
        );
        for (id, (time, _)) in ids.iter().zip(&calls) {
            if let Some(id) = id {
                let block = blocks.iter().find(|b| &b.id == id).unwrap();
                assert_eq!(block.day.date(), time.to_offset(UtcOffset::UTC).date());
            }
        }
        assert!(
            blocks
                .iter()
                .all(|b| b.words == TsVector::union_of([&vector]))
        );
    }

    #[test]
    fn a_block_closes_before_its_words_pass_postgres_limit() {
        let words: String = (0..40_000).map(|i| format!("w{i} ")).collect();
        let big = TsVector::of(&[&words]);
        assert!(big.size() > full_text::MAX_VECTOR_BYTES / 3);
        let at = datetime!(2026-12-04 12:00 UTC);
        let calls = vec![(at, &big); 5];
        let (_, blocks) = blocks_of(&calls);
        assert!(blocks.len() >= 2, "{}", blocks.len());
        assert!(
            blocks
                .iter()
                .all(|b| b.words.size() <= full_text::MAX_VECTOR_BYTES)
        );
    }
}

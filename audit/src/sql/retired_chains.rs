//! How far metadata retention has removed each audit chain (`GatehouseRetiredChains`), so that a
//! call it removed is not stored, and counted in the rollups, a second time.
//!
//! A store recognises a batch written again by `CorrelationId`: the calls it holds already are
//! skipped. A call that metadata retention removed is no longer there to be recognised, so a
//! replay of it (a journal days behind, replayed again after a crash between a chunk's store and
//! its commit) would be stored again, and its requests, tokens and latency added to the rollups,
//! which retention keeps, a second time.
//!
//! Retention therefore notes, in the transaction that removes calls, the highest `ChainSequence`
//! it removed of each chain. The audit writer stores every chain's records in sequence order (one
//! store write at a time, the journal replayed in order before any newer batch; see
//! [`queue`](crate::queue)), so a call of a chain at or below that sequence that is not in the
//! store was stored before the removed call was: retention removed it too. The writer skips such
//! calls as it skips those it finds stored. Calls without a chain (records of a writer that links
//! none) are recognised by `CorrelationId` alone, as before.

use std::collections::HashMap;

use gatehouse_schema::AuditRecord;
use sqlx::{Postgres, Sqlite};

use super::StoreError;

/// SQLite: notes the highest sequence of each chain among the calls `?1` (a JSON array of
/// correlation ids) before retention removes them. `WHERE` before the upsert: SQLite's parser
/// needs it after a `SELECT`.
pub(super) const SQLITE_RETIRE_CALLS: &str = "INSERT INTO GatehouseRetiredChains (ChainId, MaxSequence) \
     SELECT ChainId, max(ChainSequence) FROM GatehouseGatewayLogs \
     WHERE CorrelationId IN (SELECT value FROM json_each(?1)) AND ChainId IS NOT NULL AND ChainSequence IS NOT NULL \
     GROUP BY ChainId \
     ON CONFLICT (ChainId) DO UPDATE SET MaxSequence = max(MaxSequence, excluded.MaxSequence)";

/// PostgreSQL: the upsert that follows a `SELECT "ChainId", max("ChainSequence") …` of the calls
/// being removed.
const POSTGRES_RETIRE_TAIL: &str = r#" ON CONFLICT ("ChainId") DO UPDATE SET "MaxSequence" = GREATEST("GatehouseRetiredChains"."MaxSequence", EXCLUDED."MaxSequence")"#;

/// PostgreSQL: notes the highest sequence of each chain held by the metadata partition
/// `partition` (quoted), before it is dropped whole, in the drop's transaction.
pub(super) fn postgres_retire_partition(partition: &str) -> String {
    format!(
        r#"INSERT INTO "GatehouseRetiredChains" ("ChainId", "MaxSequence") SELECT "ChainId", max("ChainSequence") FROM {partition} WHERE "ChainId" IS NOT NULL AND "ChainSequence" IS NOT NULL GROUP BY "ChainId"{POSTGRES_RETIRE_TAIL}"#
    )
}

/// PostgreSQL: deletes up to `$2` calls older than `$1` (oldest first) from the metadata table
/// `name` (quoted) by its key `key`, notes their chains' highest sequences in the same
/// statement, and answers how many calls it deleted.
pub(super) fn postgres_expire_calls(name: &str, key: &str) -> String {
    format!(
        r#"WITH gone AS (
               DELETE FROM {name} WHERE "TimeGenerated" < $1 AND ({key}) IN (
                   SELECT {key} FROM {name} WHERE "TimeGenerated" < $1 ORDER BY "TimeGenerated" LIMIT $2)
               RETURNING "ChainId", "ChainSequence"),
           retired AS (
               INSERT INTO "GatehouseRetiredChains" ("ChainId", "MaxSequence")
               SELECT "ChainId", max("ChainSequence") FROM gone
               WHERE "ChainId" IS NOT NULL AND "ChainSequence" IS NOT NULL GROUP BY "ChainId"{POSTGRES_RETIRE_TAIL})
           SELECT count(*) FROM gone"#
    )
}

const SQLITE_RETIRED: &str = "SELECT ChainId, MaxSequence FROM GatehouseRetiredChains WHERE ChainId IN (SELECT value FROM json_each(?1))";
const POSTGRES_RETIRED: &str =
    r#"SELECT "ChainId", "MaxSequence" FROM "GatehouseRetiredChains" WHERE "ChainId" = ANY($1)"#;

/// The highest sequence retention removed of each chain the batch's records are linked into.
#[derive(Debug, Default)]
pub(super) struct RetiredChains(HashMap<String, i64>);

impl RetiredChains {
    /// Reads them for `records` in the SQLite store's write transaction.
    pub(super) async fn sqlite(
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        records: &[AuditRecord],
    ) -> Result<Self, StoreError> {
        let chains = chain_ids(records);
        if chains.is_empty() {
            return Ok(Self::default());
        }
        let chains = serde_json::to_string(&chains)
            .map_err(|error| StoreError::Database(sqlx::Error::Encode(Box::new(error))))?;
        let rows: Vec<(String, i64)> = sqlx::query_as(SQLITE_RETIRED)
            .bind(chains)
            .fetch_all(&mut **tx)
            .await?;
        Ok(Self(rows.into_iter().collect()))
    }

    /// Reads them for `records` from the PostgreSQL store.
    pub(super) async fn postgres(
        pool: &sqlx::PgPool,
        records: &[AuditRecord],
    ) -> Result<Self, StoreError> {
        let chains = chain_ids(records);
        if chains.is_empty() {
            return Ok(Self::default());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as::<Postgres, _>(POSTGRES_RETIRED)
            .bind(chains)
            .fetch_all(pool)
            .await?;
        Ok(Self(rows.into_iter().collect()))
    }

    /// Whether retention removed `record` already: its chain was removed as far as its sequence
    /// or further. A record the store still holds can answer yes too (a long call of the cutoff's
    /// day, linked before a shorter one that was removed); it is skipped all the same, as a
    /// stored call is.
    pub(super) fn removed(&self, record: &AuditRecord) -> bool {
        record.chain.as_ref().is_some_and(|link| {
            self.0.get(&link.chain_id).is_some_and(|&max| {
                i64::try_from(link.sequence).is_ok_and(|sequence| sequence <= max)
            })
        })
    }
}

/// The distinct chain ids of `records`, in the order they first come.
fn chain_ids(records: &[AuditRecord]) -> Vec<&str> {
    let mut chains: Vec<&str> = Vec::new();
    for link in records.iter().filter_map(|r| r.chain.as_ref()) {
        if !chains.contains(&link.chain_id.as_str()) {
            chains.push(&link.chain_id);
        }
    }
    chains
}

//! What the store benchmarks share: counting the calls a store holds and appending a result as
//! one JSON line to `bench/out/<name>-<UTC timestamp>.json`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use gatehouse_audit::sql::SqlStore;
use time::OffsetDateTime;

/// Calls a store that never deleted a row holds, read without a scan: on SQLite the largest
/// `RecordId` (rows are numbered from 1 and a replayed call takes no number), on PostgreSQL the
/// exact count. `count(*)` on a SQLite store of millions of rows reads a whole index, minutes on a
/// store larger than the page cache; `store_read` fills and never deletes, so this is exact there.
pub async fn calls_held(store: &SqlStore) -> Result<i64> {
    match store.sqlite_pool() {
        Some(pool) => Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT max(RecordId) FROM GatehouseGatewayLogs",
        )
        .fetch_one(pool)
        .await?
        .unwrap_or(0)),
        None => count_calls(store).await,
    }
}

/// Rows of the calls table (`GatehouseGatewayLogs`), counted by the database.
pub async fn count_calls(store: &SqlStore) -> Result<i64> {
    if let Some(pool) = store.sqlite_pool() {
        Ok(
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM GatehouseGatewayLogs")
                .fetch_one(pool)
                .await?,
        )
    } else if let Some(pool) = store.postgres_pool() {
        Ok(
            sqlx::query_scalar::<_, i64>(r#"SELECT count(*) FROM "GatehouseGatewayLogs""#)
                .fetch_one(pool)
                .await?,
        )
    } else {
        bail!("the store is neither SQLite nor PostgreSQL")
    }
}

/// Appends `line` to `<out_dir>/<name>-<started as YYYYMMDDTHHMMSSZ>.json` (made if missing)
/// and returns the file's path.
pub fn append_result(
    out_dir: &Path,
    name: &str,
    started: OffsetDateTime,
    line: &serde_json::Value,
) -> Result<PathBuf> {
    use std::io::Write;
    let stamp = format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        started.year(),
        u8::from(started.month()),
        started.day(),
        started.hour(),
        started.minute(),
        started.second()
    );
    std::fs::create_dir_all(out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let path = out_dir.join(format!("{name}-{stamp}.json"));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    writeln!(file, "{line}").with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

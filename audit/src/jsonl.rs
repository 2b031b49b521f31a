//! A JSON-lines file sink: one record per line, appended and flushed per batch.
//!
//! The sink holds an exclusive lock (`flock`) on its file while it is open: two gateways
//! appending to one file would interleave their records and their hash chains, and the file
//! would no longer verify. A second sink on a locked file is refused.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use gatehouse_schema::AuditRecord;
use tokio::fs::File;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::{AuditSink, SinkError};

/// Appends records to a file, one JSON object per line.
#[derive(Debug)]
pub struct JsonLinesSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl JsonLinesSink {
    /// Opens (creating if needed) the file at `path` for appending, and locks it; fails with
    /// [`std::io::ErrorKind::WouldBlock`] when another sink (this process's or another's) holds
    /// it.
    pub async fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let opened = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&opened)?;
            match file.try_lock() {
                Ok(()) => Ok(file),
                Err(std::fs::TryLockError::WouldBlock) => Err(std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "another process (a second gateway?) appends to this file: two writers would \
                     interleave their records and hash chains",
                )),
                Err(std::fs::TryLockError::Error(error)) => Err(error),
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(JsonLinesSink {
            path,
            file: Mutex::new(File::from_std(file)),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AuditSink for JsonLinesSink {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut buffer = Vec::with_capacity(records.len() * 2048);
            for record in records {
                serde_json::to_writer(&mut buffer, record)?;
                buffer.push(b'\n');
            }
            let mut file = self.file.lock().await;
            file.write_all(&buffer).await?;
            file.flush().await?;
            file.sync_data().await?;
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "jsonl"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_sink_on_one_file_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit").join("calls.jsonl");
        let first = JsonLinesSink::open(&path).await.unwrap();
        // A lock is held by an open file, so a second open in this process conflicts as another
        // process's would.
        let refused = JsonLinesSink::open(&path).await.unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::WouldBlock);
        assert!(
            refused.to_string().contains("appends to this file"),
            "{refused}"
        );
        drop(first);
        JsonLinesSink::open(&path)
            .await
            .expect("free again once the first is gone");
    }
}

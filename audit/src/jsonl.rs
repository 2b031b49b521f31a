//! A JSON-lines file sink: one record per line, appended and flushed per batch.

use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use gatehouse_schema::AuditRecord;
use tokio::fs::{File, OpenOptions};
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
    /// Opens (creating if needed) the file at `path` for appending.
    pub async fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        Ok(JsonLinesSink {
            path,
            file: Mutex::new(file),
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

//! A JSON-lines file sink: one record per line, appended and flushed per batch.
//!
//! The sink holds an exclusive lock (`flock`) on its file while it is open: two gateways
//! appending to one file would interleave their records and their hash chains, and the file
//! would no longer verify. A second sink on a locked file is refused.
//!
//! A write cut short (the process killed in the middle of a batch, a full disk) leaves a torn
//! line at the end of the file, and the next record would run into it and be unreadable with it.
//! So the sink cuts a torn line back to the last whole one when it opens the file, and again
//! before the next write after a failed one (the failed batch is written again from the queue's
//! journal). A torn line is never a record: no record was acknowledged before its line was whole
//! and synced.

use std::io::{Read as _, Seek as _, SeekFrom};
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
    file: Mutex<Appender>,
}

/// The open file, and whether its last write failed (and may have left part of its batch).
#[derive(Debug)]
struct Appender {
    file: File,
    /// The file's length with the batches written whole and acknowledged, only.
    stored: u64,
    failed: bool,
}

impl JsonLinesSink {
    /// Opens (creating if needed) the file at `path` for appending, and locks it; fails with
    /// [`std::io::ErrorKind::WouldBlock`] when another sink (this process's or another's) holds
    /// it. A torn last line is cut back to the last whole one.
    pub async fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let opened = path.clone();
        let file = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&opened)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        "another process (a second gateway?) appends to this file: two writers \
                         would interleave their records and hash chains",
                    ));
                }
                Err(std::fs::TryLockError::Error(error)) => return Err(error),
            }
            cut_torn_line(&mut file, &opened)?;
            let stored = file.metadata()?.len();
            Ok((file, stored))
        })
        .await
        .map_err(std::io::Error::other)??;
        let (file, stored) = file;
        Ok(JsonLinesSink {
            path,
            file: Mutex::new(Appender {
                file: File::from_std(file),
                stored,
                failed: false,
            }),
        })
    }

    /// The file written to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Cuts the file back to the end of its last whole line when it ends in a torn one; returns the
/// bytes cut.
fn cut_torn_line(file: &mut std::fs::File, path: &Path) -> std::io::Result<u64> {
    const CHUNK: u64 = 64 * 1024;
    let length = file.metadata()?.len();
    let mut end = length;
    let mut chunk = Vec::new();
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        chunk.resize(usize::try_from(end - start).unwrap_or(0), 0);
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk)?;
        if let Some(newline) = memchr::memrchr(b'\n', &chunk) {
            end = start + newline as u64 + 1;
            break;
        }
        end = start;
    }
    let torn = length - end;
    if torn > 0 {
        file.set_len(end)?;
        file.sync_data()?;
        tracing::warn!(
            file = %path.display(),
            bytes = torn,
            "the audit file ended in a torn line (a write cut short); cut back to its last whole line"
        );
    }
    Ok(torn)
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
            let mut appender = self.file.lock().await;
            if appender.failed {
                // The failed batch is not stored, whatever of it reached the file: the queue
                // writes its records again (now, or from its journal), so the file goes back to
                // its stored batches, torn line and whole lines of the batch alike.
                let cut = appender
                    .file
                    .metadata()
                    .await?
                    .len()
                    .saturating_sub(appender.stored);
                appender.file.set_len(appender.stored).await?;
                appender.file.sync_data().await?;
                if cut > 0 {
                    tracing::warn!(
                        file = %self.path.display(),
                        bytes = cut,
                        "cut back what a failed write had appended to the audit file; its records are written again"
                    );
                }
                appender.failed = false;
            }
            // Marked failed until the batch is on disk: a write dropped half way (the queue
            // abandons a write that hangs) returns no error, yet may have left part of its batch,
            // which the next write must cut before it appends.
            appender.failed = true;
            let file = &mut appender.file;
            file.write_all(&buffer).await?;
            file.flush().await?;
            file.sync_data().await?;
            appender.stored += buffer.len() as u64;
            appender.failed = false;
            Ok(())
        })
    }

    fn name(&self) -> &'static str {
        "jsonl"
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt as _;

    use super::*;
    use crate::queue::tests::record;

    #[tokio::test]
    async fn a_write_dropped_half_way_is_cut_back_before_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        let sink = JsonLinesSink::open(&path).await.unwrap();
        sink.write_batch(&[record("before")]).await.unwrap();
        // Many writes of the file (2 MiB each): the first poll starts the first parts only.
        let mut big = record("big");
        big.backend_request_body = Some("x".repeat(16 << 20));
        let batch = [big];
        assert!(
            sink.write_batch(&batch).now_or_never().is_none(),
            "the write is not done at its first poll"
        );
        sink.write_batch(&[record("after")]).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|line| {
                serde_json::from_str::<AuditRecord>(line)
                    .expect("every line is a whole record")
                    .correlation_id
            })
            .collect();
        // The dropped batch is cut back whole, whatever of it reached the file: the queue
        // writes it again, so a copy kept here would be a second one.
        assert_eq!(ids, ["before", "after"]);
    }

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

    #[tokio::test]
    async fn a_torn_last_line_is_cut_back_before_the_next_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        // A whole line, then a write cut short in the middle of a record.
        std::fs::write(&path, b"{\"seq\":1}\n{\"seq\":2,\"Url\":\"https://ga").unwrap();
        let sink = JsonLinesSink::open(&path).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"{\"seq\":1}\n");
        let record = crate::queue::tests::record("call-after-the-cut");
        sink.write_batch(std::slice::from_ref(&record))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        let written: AuditRecord = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(written.correlation_id, record.correlation_id);
    }

    #[test]
    fn a_file_of_whole_lines_or_none_is_left_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        for content in [&b""[..], b"{}\n{}\n", b"no newline at all"] {
            let path = dir.path().join("f.jsonl");
            std::fs::write(&path, content).unwrap();
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .unwrap();
            let cut = cut_torn_line(&mut file, &path).unwrap();
            let expected: &[u8] = if content.ends_with(b"\n") || content.is_empty() {
                content
            } else {
                b""
            };
            assert_eq!(std::fs::read(&path).unwrap(), expected);
            assert_eq!(cut, (content.len() - expected.len()) as u64);
        }
    }

    #[tokio::test]
    async fn after_a_failed_write_what_it_appended_is_cut_back_before_the_next() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("calls.jsonl");
        let sink = JsonLinesSink::open(&path).await.unwrap();
        let first = crate::queue::tests::record("first");
        sink.write_batch(std::slice::from_ref(&first))
            .await
            .unwrap();
        // A write that failed half-way: a whole line and part of the next are on disk, its
        // batch is not stored.
        let whole = serde_json::to_string(&crate::queue::tests::record("whole-of-failed")).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(format!("{whole}\n{{\"CorrelationId\":\"lost-half").as_bytes())
            .unwrap();
        sink.file.lock().await.failed = true;
        let next = crate::queue::tests::record("next");
        sink.write_batch(std::slice::from_ref(&next)).await.unwrap();
        assert_eq!(
            crate::queue::tests::correlation_ids(&path),
            ["first", "next"]
        );
    }
}

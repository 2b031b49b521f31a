//! Stateful objects stick to the member that created them.
//!
//! Files, batches, fine-tuning jobs, assistants, threads, stored responses and vector stores exist
//! only on the backend instance that created them (the reference architecture: "load balancing of
//! stateful operations … isn't supported"). The gateway remembers object id → member id and sends
//! every later call about that object to the same member. The map is an append-only JSON-lines
//! journal in the state directory, so it survives restarts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

/// One journal line: an object was created on a member (or deleted, `member: None`).
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    id: String,
    member: Option<String>,
}

/// The object → member map.
#[derive(Debug)]
pub struct AffinityMap {
    objects: RwLock<HashMap<String, String>>,
    journal: Mutex<tokio::fs::File>,
    path: PathBuf,
}

impl AffinityMap {
    /// Loads the journal in `state_dir` (creating it) and compacts it.
    pub async fn open(state_dir: &Path) -> std::io::Result<AffinityMap> {
        tokio::fs::create_dir_all(state_dir).await?;
        let path = state_dir.join("affinity.jsonl");
        let mut objects = HashMap::new();
        match tokio::fs::read_to_string(&path).await {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    // A torn last line after a crash is skipped, not fatal.
                    let Ok(entry) = serde_json::from_str::<Entry>(line) else {
                        tracing::warn!(path = %path.display(), "skipping unreadable affinity journal line");
                        continue;
                    };
                    match entry.member {
                        Some(member) => objects.insert(entry.id, member),
                        None => objects.remove(&entry.id),
                    };
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        // Compact: rewrite only the live entries, atomically.
        let compacted = path.with_extension("jsonl.tmp");
        let mut text = String::new();
        for (id, member) in &objects {
            let line = serde_json::to_string(&Entry {
                id: id.clone(),
                member: Some(member.clone()),
            })
            .map_err(std::io::Error::other)?;
            text.push_str(&line);
            text.push('\n');
        }
        tokio::fs::write(&compacted, text).await?;
        tokio::fs::rename(&compacted, &path).await?;
        let journal = tokio::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .await?;
        Ok(AffinityMap {
            objects: RwLock::new(objects),
            journal: Mutex::new(journal),
            path,
        })
    }

    /// The member that created `id`, if known.
    pub fn member_of(&self, id: &str) -> Option<String> {
        self.objects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Records that `id` was created on `member`, durably.
    pub async fn remember(&self, id: &str, member: &str) -> std::io::Result<()> {
        self.append(Entry {
            id: id.to_owned(),
            member: Some(member.to_owned()),
        })
        .await?;
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), member.to_owned());
        Ok(())
    }

    /// Forgets `id` (it was deleted).
    pub async fn forget(&self, id: &str) -> std::io::Result<()> {
        self.append(Entry {
            id: id.to_owned(),
            member: None,
        })
        .await?;
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        Ok(())
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn append(&self, entry: Entry) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = self.journal.lock().await;
        journal.write_all(&line).await?;
        journal.sync_data().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reopen_and_honours_deletes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let map = AffinityMap::open(dir.path()).await.unwrap();
            map.remember("file-1", "east").await.unwrap();
            map.remember("file-2", "west").await.unwrap();
            map.forget("file-1").await.unwrap();
        }
        let map = AffinityMap::open(dir.path()).await.unwrap();
        assert_eq!(map.member_of("file-1"), None);
        assert_eq!(map.member_of("file-2").as_deref(), Some("west"));
    }
}

//! Stateful objects stick to the member that created them.
//!
//! Files, batches, fine-tuning jobs, assistants, threads, stored responses and vector stores exist
//! only on the backend instance that created them (the reference architecture: "load balancing of
//! stateful operations … isn't supported"). The gateway remembers object id → member id and sends
//! every later call about that object to the same member. The map is an append-only JSON-lines
//! journal in the state directory, so it survives restarts.
//!
//! Replicas behind a load balancer share the map through Redis (`server.affinity.redis_url`):
//! a gateway writes what it learns there before it answers the create call, and looks up an id it
//! does not know there before it routes. Each key is `{prefix}gatehouse:affinity:{object id}`
//! holding the member id, without expiry (an object lives until it is deleted), removed when the
//! object is deleted through any replica. When Redis cannot be reached, a gateway goes on with
//! what it knows itself, counts the failure in `gatehouse_affinity_store_errors_total` and logs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::settings::AffinitySettings;
use crate::warning_throttle::WarningThrottle;

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
    shared: Option<SharedAffinity>,
}

impl AffinityMap {
    /// Loads the journal in `state_dir` (creating it) and compacts it; `shared` is the map
    /// shared with other replicas, if any.
    pub async fn open(
        state_dir: &Path,
        shared: Option<SharedAffinity>,
    ) -> std::io::Result<AffinityMap> {
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
            shared,
        })
    }

    /// The member that created `id`, if this gateway knows it (see [`AffinityMap::learn`]).
    pub fn member_of(&self, id: &str) -> Option<String> {
        self.objects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// Pins `id` to `member` in this gateway's memory at once, without waiting for the journal
    /// or the shared map ([`AffinityMap::remember`] writes those, and must follow): for an
    /// object learnt at the end of an answer, before the client has all of it and can ask about
    /// the object.
    pub fn pin(&self, id: &str, member: &str) {
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), member.to_owned());
    }

    /// Looks up in the shared map the members of those `ids` this gateway does not know yet
    /// (objects created through another replica), so that [`AffinityMap::member_of`] knows
    /// them. One round trip for all of them; nothing without a shared map or unknown ids. A
    /// shared map that cannot be read leaves them unknown.
    pub async fn learn(&self, ids: &[String]) {
        let Some(shared) = &self.shared else { return };
        if ids.is_empty() {
            // Most calls name no object: they never touch the lock.
            return;
        }
        let unknown: Vec<&str> = {
            let objects = self.objects.read().unwrap_or_else(PoisonError::into_inner);
            ids.iter()
                .map(String::as_str)
                .filter(|id| !objects.contains_key(*id))
                .collect()
        };
        if unknown.is_empty() {
            return;
        }
        match shared.members_of(&unknown).await {
            Ok(members) => {
                let mut objects = self.objects.write().unwrap_or_else(PoisonError::into_inner);
                for (id, member) in unknown.iter().zip(members) {
                    if let Some(member) = member {
                        objects.insert((*id).to_owned(), member);
                    }
                }
            }
            Err(error) => shared.failed("look up objects", &error),
        }
    }

    /// Records that `id` was created on `member`, durably, and in the shared map. A journal that
    /// fails (a full disk) loses the object at the next start, not now: it is pinned in memory
    /// and in the shared map all the same, and the error is returned.
    pub async fn remember(&self, id: &str, member: &str) -> std::io::Result<()> {
        let journaled = self
            .append(Entry {
                id: id.to_owned(),
                member: Some(member.to_owned()),
            })
            .await;
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned(), member.to_owned());
        if let Some(shared) = &self.shared
            && let Err(error) = shared.remember(id, member).await
        {
            shared.failed("share a new object", &error);
        }
        journaled
    }

    /// Forgets `id` (it was deleted), here and in the shared map; like [`AffinityMap::remember`]
    /// even when the journal fails.
    pub async fn forget(&self, id: &str) -> std::io::Result<()> {
        let journaled = self
            .append(Entry {
                id: id.to_owned(),
                member: None,
            })
            .await;
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(shared) = &self.shared
            && let Err(error) = shared.forget(id).await
        {
            shared.failed("remove a deleted object", &error);
        }
        journaled
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
        // tokio's file writes in the background: `flush` waits for that write and returns its
        // error (`sync_data` alone would leave it to the next append).
        journal.flush().await?;
        journal.sync_data().await
    }
}

/// The object map shared by gateway replicas, in Redis.
pub struct SharedAffinity {
    connection: ConnectionManager,
    prefix: String,
    timeout: Duration,
    errors: Counter,
    /// At most one warning every [`WARNING_INTERVAL`].
    warnings: WarningThrottle,
}

/// How often failures of the shared map are logged, at most.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

impl std::fmt::Debug for SharedAffinity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedAffinity")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl SharedAffinity {
    /// The shared map `settings` name, if any (it connects on first use); `errors` counts its
    /// failures.
    pub fn new(
        settings: &AffinitySettings,
        errors: Counter,
    ) -> anyhow::Result<Option<SharedAffinity>> {
        let Some(url) = &settings.redis_url else {
            return Ok(None);
        };
        let url = url
            .resolve()
            .map_err(|e| anyhow::anyhow!("server.affinity.redis_url: {e}"))?;
        let timeout = Duration::from_millis(settings.store_timeout_ms);
        let connection = crate::redis_connection::connect_lazily(&url, timeout, None)
            .map_err(|e| anyhow::anyhow!("server.affinity.redis_url: {e}"))?;
        Ok(Some(SharedAffinity {
            connection,
            prefix: settings.key_prefix.clone(),
            timeout,
            errors,
            warnings: WarningThrottle::new(WARNING_INTERVAL),
        }))
    }

    fn key(&self, id: &str) -> String {
        format!("{}gatehouse:affinity:{id}", self.prefix)
    }

    async fn members_of(&self, ids: &[&str]) -> Result<Vec<Option<String>>, String> {
        let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
        // MGET of one key answers a one-element array, as of several.
        self.run(redis::cmd("MGET").arg(keys)).await
    }

    async fn remember(&self, id: &str, member: &str) -> Result<(), String> {
        self.run(redis::cmd("SET").arg(self.key(id)).arg(member))
            .await
    }

    async fn forget(&self, id: &str) -> Result<(), String> {
        self.run::<i64>(redis::cmd("DEL").arg(self.key(id)))
            .await
            .map(drop)
    }

    /// Runs one command within the timeout. The error names its kind, never the URL.
    async fn run<T: redis::FromRedisValue>(&self, command: &mut redis::Cmd) -> Result<T, String> {
        let mut connection = self.connection.clone();
        tokio::time::timeout(self.timeout, command.query_async(&mut connection))
            .await
            .map_err(|_| format!("no answer within {} ms", self.timeout.as_millis()))?
            .map_err(|e| format!("{:?}", e.kind()))
    }

    fn failed(&self, what: &str, error: &str) {
        self.errors.inc();
        if !self.warnings.should_warn() {
            return;
        }
        tracing::warn!(
            %error,
            "could not {what} in the shared object map (Redis); going on with this gateway's own \
             map (every failure is counted in gatehouse_affinity_store_errors_total)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn survives_reopen_and_honours_deletes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            map.remember("file-1", "east").await.unwrap();
            map.remember("file-2", "west").await.unwrap();
            map.forget("file-1").await.unwrap();
        }
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        assert_eq!(map.member_of("file-1"), None);
        assert_eq!(map.member_of("file-2").as_deref(), Some("west"));
    }

    /// A journal that cannot be written (a full disk) does not unpin the object now.
    #[tokio::test]
    async fn an_object_is_pinned_even_when_its_journal_line_fails() {
        let dir = tempfile::tempdir().unwrap();
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        // The journal handle swapped for a read-only one: every append fails.
        *map.journal.lock().await = tokio::fs::File::open(map.path()).await.unwrap();
        assert!(map.remember("file-3", "east").await.is_err());
        assert_eq!(map.member_of("file-3").as_deref(), Some("east"));
        assert!(map.forget("file-3").await.is_err());
        assert_eq!(map.member_of("file-3"), None);
    }
}

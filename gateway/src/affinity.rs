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
//! holding the member id, without expiry (an object lives until it is deleted; a stored response
//! 30 days, [`RESPONSE_LIFETIME`]), removed when the object is deleted through any replica. When Redis cannot be reached, a gateway goes on with
//! what it knows itself, counts the failure in `gatehouse_affinity_store_errors_total` and logs it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::classify::ObjectFamily;
use crate::settings::AffinitySettings;
use crate::warning_throttle::WarningThrottle;

/// How long a stored response lives on its member: Azure OpenAI and OpenAI keep a response
/// (`store`, the default) for 30 days. Its pin goes with it, so that a gateway serving the
/// Responses API does not remember every response it ever saw.
pub const RESPONSE_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// How long an upload in parts is remembered: an upload expires an hour after it was created
/// (OpenAI's API reference, `POST /uploads`); the file it becomes is pinned on its own, for good.
pub const UPLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// How long an object learnt from the shared map is remembered here without being used again
/// by name (it is looked up in the shared map again after that).
const LEARNT_LIFETIME: Duration = RESPONSE_LIFETIME;

/// The journal is compacted (expired and deleted objects dropped) once this many lines, or as
/// many as it held objects when it last was, were appended since.
const COMPACT_AFTER_LINES: usize = 10_000;

/// Until when an object of `family` is remembered (unix seconds): `None` for objects that live
/// until they are deleted.
pub fn expiry_of(family: ObjectFamily, now: OffsetDateTime) -> Option<i64> {
    let lifetime = match family {
        // Stored responses and stored chat completions are kept 30 days; a container expires
        // after a spell of disuse that its owner sets, so 30 days bounds what is remembered of it.
        ObjectFamily::Response | ObjectFamily::ChatCompletion | ObjectFamily::Container => {
            RESPONSE_LIFETIME
        }
        ObjectFamily::Upload => UPLOAD_LIFETIME,
        ObjectFamily::File
        | ObjectFamily::Batch
        | ObjectFamily::FineTuningJob
        | ObjectFamily::Assistant
        | ObjectFamily::Thread
        | ObjectFamily::VectorStore
        | ObjectFamily::Conversation
        | ObjectFamily::Eval => return None,
    };
    Some((now + lifetime).unix_timestamp())
}

/// One journal line: an object was created on a member (or deleted, `member: None`), and until
/// when it lives, when it expires by itself.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    id: String,
    member: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<i64>,
}

/// Where an object lives, and until when.
#[derive(Debug, Clone)]
struct Pin {
    member: String,
    until: Option<i64>,
}

impl Pin {
    fn live_at(&self, now: i64) -> bool {
        self.until.is_none_or(|until| until > now)
    }
}

/// The journal file, its length with every line written whole, whether the last append failed
/// (or was dropped half way), leaving what the next must cut back first, and what decides its
/// next compaction.
#[derive(Debug)]
struct Journal {
    file: tokio::fs::File,
    len: u64,
    failed: bool,
    /// Lines appended since the journal was last compacted.
    appended: usize,
    /// How many objects the journal held when it was last compacted.
    compacted: usize,
}

/// The object → member map.
#[derive(Debug)]
pub struct AffinityMap {
    objects: RwLock<HashMap<String, Pin>>,
    journal: Mutex<Journal>,
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
                        Some(member) => objects.insert(
                            entry.id,
                            Pin {
                                member,
                                until: entry.until,
                            },
                        ),
                        None => objects.remove(&entry.id),
                    };
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        let journal = compact(&path, &mut objects).await?;
        Ok(AffinityMap {
            objects: RwLock::new(objects),
            journal: Mutex::new(journal),
            path,
            shared,
        })
    }

    /// The member that created `id`, if this gateway knows it and it has not expired (see
    /// [`AffinityMap::learn`]).
    pub fn member_of(&self, id: &str) -> Option<String> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        self.objects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .filter(|pin| pin.live_at(now))
            .map(|pin| pin.member.clone())
    }

    /// Pins `id` to `member` (until `until`, unix seconds, for an object that expires) in this
    /// gateway's memory at once, without waiting for the journal or the shared map
    /// ([`AffinityMap::remember`] writes those, and must follow): for an object learnt at the end
    /// of an answer, before the client has all of it and can ask about the object.
    pub fn pin(&self, id: &str, member: &str, until: Option<i64>) {
        self.objects
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id.to_owned(),
                Pin {
                    member: member.to_owned(),
                    until,
                },
            );
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
        let now = OffsetDateTime::now_utc();
        let unknown: Vec<&str> = {
            let objects = self.objects.read().unwrap_or_else(PoisonError::into_inner);
            ids.iter()
                .map(String::as_str)
                .filter(|id| {
                    !objects
                        .get(*id)
                        .is_some_and(|pin| pin.live_at(now.unix_timestamp()))
                })
                .collect()
        };
        if unknown.is_empty() {
            return;
        }
        match shared.members_of(&unknown).await {
            Ok(members) => {
                let until = Some((now + LEARNT_LIFETIME).unix_timestamp());
                let mut objects = self.objects.write().unwrap_or_else(PoisonError::into_inner);
                for (id, member) in unknown.iter().zip(members) {
                    if let Some(member) = member {
                        objects.insert((*id).to_owned(), Pin { member, until });
                    }
                }
            }
            Err(error) => shared.failed("look up objects", &error),
        }
    }

    /// Records that `id` was created on `member` (living until `until`, unix seconds, when it
    /// expires by itself), durably, and in the shared map. A journal that fails (a full disk)
    /// loses the object at the next start, not now: it is pinned in memory and in the shared
    /// map all the same, and the error is returned.
    pub async fn remember(
        &self,
        id: &str,
        member: &str,
        until: Option<i64>,
    ) -> std::io::Result<()> {
        self.remember_if(id, member, until, false).await
    }

    /// [`AffinityMap::remember`], or nothing when `only_if_pinned` and `id` is no longer pinned
    /// to `member` in memory.
    async fn remember_if(
        &self,
        id: &str,
        member: &str,
        until: Option<i64>,
        only_if_pinned: bool,
    ) -> std::io::Result<()> {
        let entry = Entry {
            id: id.to_owned(),
            member: Some(member.to_owned()),
            until,
        };
        let journaled = match self.append(entry, only_if_pinned).await {
            Ok(false) => return Ok(()),
            Ok(true) => Ok(()),
            Err(error) => Err(error),
        };
        if let Some(shared) = &self.shared
            && let Err(error) = shared.remember(id, member, until).await
        {
            shared.failed("share a new object", &error);
        }
        journaled
    }

    /// Writes to the journal and the shared map what [`AffinityMap::pin`] pinned in memory,
    /// unless the object was forgotten meanwhile: a client that deleted it as soon as it had its
    /// id (the pin is written on a task after the answer) does not find it pinned again.
    pub async fn remember_pinned(
        &self,
        id: &str,
        member: &str,
        until: Option<i64>,
    ) -> std::io::Result<()> {
        self.remember_if(id, member, until, true).await
    }

    /// Forgets `id` (it was deleted), here and in the shared map; like [`AffinityMap::remember`]
    /// even when the journal fails.
    pub async fn forget(&self, id: &str) -> std::io::Result<()> {
        let entry = Entry {
            id: id.to_owned(),
            member: None,
            until: None,
        };
        let journaled = self.append(entry, false).await.map(|_| ());
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

    /// How many objects this gateway remembers (expired ones until the next compaction).
    pub fn len(&self) -> usize {
        self.objects
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether it remembers none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Applies `entry` to the objects in memory and appends it to the journal as one line, whole
    /// or not at all: what a failed write left is cut back, so that the next line does not land
    /// on a torn one. Every so often the journal is compacted. Both happen under the journal's
    /// lock, so a compaction (which rewrites the journal from memory) never misses a line
    /// written before it, its own included. With `only_if_pinned`, a pin that is no longer in
    /// memory (its object was deleted meanwhile) is neither applied nor written: `Ok(false)`.
    async fn append(&self, entry: Entry, only_if_pinned: bool) -> std::io::Result<bool> {
        let mut line = serde_json::to_vec(&entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut journal = self.journal.lock().await;
        {
            let mut objects = self.objects.write().unwrap_or_else(PoisonError::into_inner);
            match &entry.member {
                Some(member) => {
                    if only_if_pinned
                        && objects
                            .get(&entry.id)
                            .is_none_or(|pin| &pin.member != member)
                    {
                        return Ok(false);
                    }
                    objects.insert(
                        entry.id,
                        Pin {
                            member: member.clone(),
                            until: entry.until,
                        },
                    );
                }
                None => {
                    objects.remove(&entry.id);
                }
            }
        }
        if journal.failed {
            let len = journal.len;
            journal.file.set_len(len).await?;
            journal.failed = false;
        }
        // Marked failed until the line is on disk: a write that fails, or is dropped half way,
        // may leave part of it.
        journal.failed = true;
        journal.file.write_all(&line).await?;
        // tokio's file writes in the background: `flush` waits for that write and returns its
        // error (`sync_data` alone would leave it to the next append).
        journal.file.flush().await?;
        journal.file.sync_data().await?;
        journal.failed = false;
        journal.len += line.len() as u64;
        journal.appended += 1;
        if journal.appended >= COMPACT_AFTER_LINES.max(journal.compacted) {
            journal.appended = 0;
            let mut objects = self
                .objects
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match compact(&self.path, &mut objects).await {
                Ok(compacted) => {
                    *journal = compacted;
                    // Expired objects leave memory too (those pinned meanwhile stay).
                    let now = OffsetDateTime::now_utc().unix_timestamp();
                    self.objects
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .retain(|_, pin| pin.live_at(now));
                }
                Err(error) => {
                    tracing::warn!(%error, path = %self.path.display(), "could not compact the affinity journal; it goes on growing until the next try");
                }
            }
        }
        Ok(true)
    }
}

/// Drops the expired objects of `objects` and rewrites the journal at `path` with the others,
/// atomically (written, synced, renamed, the directory synced); the journal opened for appends.
async fn compact(path: &Path, objects: &mut HashMap<String, Pin>) -> std::io::Result<Journal> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    objects.retain(|_, pin| pin.live_at(now));
    let mut text = String::new();
    for (id, pin) in objects.iter() {
        let line = serde_json::to_string(&Entry {
            id: id.clone(),
            member: Some(pin.member.clone()),
            until: pin.until,
        })
        .map_err(std::io::Error::other)?;
        text.push_str(&line);
        text.push('\n');
    }
    let len = text.len() as u64;
    let target = path.to_path_buf();
    tokio::task::spawn_blocking(move || gatehouse_audit::write_atomic(&target, text.as_bytes()))
        .await
        .map_err(std::io::Error::other)??;
    let file = tokio::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .await?;
    Ok(Journal {
        file,
        len,
        failed: false,
        appended: 0,
        compacted: objects.len(),
    })
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

    async fn remember(&self, id: &str, member: &str, until: Option<i64>) -> Result<(), String> {
        let mut command = redis::cmd("SET");
        command.arg(self.key(id)).arg(member);
        if let Some(until) = until {
            // Redis forgets it when the object expires.
            command.arg("EXAT").arg(until);
        }
        self.run(&mut command).await
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
            map.remember("file-1", "east", None).await.unwrap();
            map.remember("file-2", "west", None).await.unwrap();
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
        map.journal.lock().await.file = tokio::fs::File::open(map.path()).await.unwrap();
        assert!(map.remember("file-3", "east", None).await.is_err());
        assert_eq!(map.member_of("file-3").as_deref(), Some("east"));
        assert!(map.forget("file-3").await.is_err());
        assert_eq!(map.member_of("file-3"), None);
    }

    /// What a failed write left of its line is cut back: the next line, written whole, is read
    /// back at the next start.
    #[tokio::test]
    async fn a_failed_line_is_cut_back_and_the_next_one_survives_a_restart() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            map.remember("file-1", "east", None).await.unwrap();
            // A write that failed half way (a full disk): part of a line is on disk.
            std::fs::OpenOptions::new()
                .append(true)
                .open(map.path())
                .unwrap()
                .write_all(b"{\"id\":\"file-3\",\"mem")
                .unwrap();
            map.journal.lock().await.failed = true;
            map.remember("file-4", "west", None).await.unwrap();
        }
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        assert_eq!(map.member_of("file-1").as_deref(), Some("east"));
        assert_eq!(map.member_of("file-4").as_deref(), Some("west"));
        assert_eq!(map.member_of("file-3"), None);
    }

    /// A stored response's pin expires with it: gone from memory and, at the next compaction,
    /// from the journal; objects without an end stay.
    #[tokio::test]
    async fn expired_pins_are_forgotten_and_compacted_away() {
        let dir = tempfile::tempdir().unwrap();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            map.remember("resp_old", "east", Some(now - 1))
                .await
                .unwrap();
            map.remember("resp_new", "east", Some(now + 3600))
                .await
                .unwrap();
            map.remember("file-1", "west", None).await.unwrap();
            assert_eq!(map.member_of("resp_old"), None, "expired");
            assert_eq!(map.member_of("resp_new").as_deref(), Some("east"));
        }
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        assert_eq!(map.len(), 2);
        let journal = std::fs::read_to_string(map.path()).unwrap();
        assert!(!journal.contains("resp_old"), "{journal}");
        assert!(
            journal.contains("resp_new") && journal.contains("file-1"),
            "{journal}"
        );
        // Compaction while running: after enough lines, the journal holds the live objects only.
        for i in 0..COMPACT_AFTER_LINES {
            map.remember(&format!("resp_{i}"), "east", Some(now - 1))
                .await
                .unwrap();
        }
        let journal = std::fs::read_to_string(map.path()).unwrap();
        assert!(
            journal.lines().count() < 10,
            "{} lines",
            journal.lines().count()
        );
        // Memory too (the last one was pinned after the compaction).
        assert!(map.len() <= 3, "{} objects", map.len());
    }

    /// The line whose write compacts the journal is in the compacted journal: the object it pins
    /// survives a restart, the object it forgets does not come back.
    #[tokio::test]
    async fn the_line_that_compacts_the_journal_is_kept_by_the_compaction() {
        let dir = tempfile::tempdir().unwrap();
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            for i in 0..COMPACT_AFTER_LINES {
                map.remember(&format!("file-{i}"), "east", None)
                    .await
                    .unwrap();
            }
        }
        let last = format!("file-{}", COMPACT_AFTER_LINES - 1);
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            assert_eq!(map.member_of(&last).as_deref(), Some("east"));
            // The 10,000th line from now compacts again (10,000 objects live): it forgets.
            for i in 0..COMPACT_AFTER_LINES - 1 {
                map.remember(&format!("file-{i}"), "east", None)
                    .await
                    .unwrap();
            }
            map.forget("file-0").await.unwrap();
        }
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        assert_eq!(map.member_of(&last).as_deref(), Some("east"));
        assert_eq!(map.member_of("file-0"), None);
        assert_eq!(map.len(), COMPACT_AFTER_LINES - 1);
    }

    /// An object deleted before its pin was written is not pinned again by the write.
    #[tokio::test]
    async fn a_pin_written_after_its_object_was_deleted_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let map = AffinityMap::open(dir.path(), None).await.unwrap();
            map.pin("file-1", "east", None);
            map.forget("file-1").await.unwrap();
            map.remember_pinned("file-1", "east", None).await.unwrap();
            assert_eq!(map.member_of("file-1"), None);
            map.pin("file-2", "west", None);
            map.remember_pinned("file-2", "west", None).await.unwrap();
        }
        let map = AffinityMap::open(dir.path(), None).await.unwrap();
        assert_eq!(map.member_of("file-1"), None);
        assert_eq!(map.member_of("file-2").as_deref(), Some("west"));
    }
}

//! One gateway per state directory.
//!
//! `server.state_dir` holds what a gateway keeps between starts: the audit journal (records the
//! store has not taken yet, replayed at start), the object map, the last-known-good
//! configuration and the gateway-id claim. Two gateways started on one directory (a service
//! manager and a hand-started copy, two containers on one volume) would replay the same journal
//! twice, append to it from both, and compact the object map under each other. So a serving
//! gateway holds an exclusive lock (`flock`) on `state_dir/gateway.lock` for as long as it runs,
//! and a second one refuses to start, naming the first one's process id. The operating system
//! drops the lock when the process ends, however it ends, so a crash leaves nothing to clean.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::path::Path;

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "gateway.lock";

/// The held lock of a state directory; dropping it releases the lock.
#[derive(Debug)]
pub struct StateDirLock {
    /// Open for as long as the lock is held.
    _file: File,
}

impl StateDirLock {
    /// Takes the lock of `state_dir` (created if missing) and writes this process's id into the
    /// lock file, or fails when another process holds it.
    pub fn take(state_dir: &Path) -> anyhow::Result<StateDirLock> {
        std::fs::create_dir_all(state_dir).map_err(|error| {
            anyhow::anyhow!(
                "server.state_dir: cannot create {}: {error}",
                state_dir.display()
            )
        })?;
        let path = state_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|error| anyhow::anyhow!("cannot open {}: {error}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                // The holder wrote its id after taking the lock; a read that finds none still
                // refuses.
                let _ = file.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                anyhow::bail!(
                    "server.state_dir {} is in use by another gateway{holder}: two gateways on one \
                     state directory would replay and append to the same audit journal; give each \
                     gateway its own state_dir",
                    state_dir.display()
                );
            }
            Err(TryLockError::Error(error)) => {
                anyhow::bail!("cannot lock {}: {error}", path.display());
            }
        }
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{}", std::process::id()))
            .map_err(|error| anyhow::anyhow!("cannot write {}: {error}", path.display()))?;
        Ok(StateDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_of_one_directory_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = StateDirLock::take(&state).unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join(LOCK_FILE))
                .unwrap()
                .trim(),
            std::process::id().to_string()
        );
        // A lock is held by an open file, so a second open in this process conflicts as another
        // process's would.
        let error = StateDirLock::take(&state).unwrap_err().to_string();
        assert!(
            error.contains("is in use by another gateway")
                && error.contains(&format!("(process {})", std::process::id())),
            "{error}"
        );
        drop(first);
        StateDirLock::take(&state).expect("free again once the first is gone");
    }

    #[test]
    fn other_directories_are_locked_on_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let _a = StateDirLock::take(&dir.path().join("a")).unwrap();
        let _b = StateDirLock::take(&dir.path().join("b")).unwrap();
    }
}

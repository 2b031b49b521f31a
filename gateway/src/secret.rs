//! Secrets that cannot be printed by accident, and the resolution of secret references.
//!
//! `env:` and `file:` references are read when a snapshot is built. Key Vault references are
//! fetched into the [`SecretStore`] before a snapshot is built ([`SecretStore::prefetch`]), then
//! refreshed in the background ([`SecretStore::spawn_refresher`]); whoever uses one holds a
//! [`SecretValue`] and reads the current value per use, so a rotated secret takes effect without
//! a restart.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use gatehouse_schema::config::{SecretRef, SecretSource};

use crate::key_vault::KeyVaultClient;
use crate::sync::lock;

/// A secret value. `Debug` and `Display` print `*****`; read it only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Every call site is a place where the secret leaves its wrapper.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// Why a secret reference could not be resolved. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable `{0}` is not set")]
    MissingEnv(String),
    /// The file could not be read.
    #[error("secret file `{path}` could not be read: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret is empty.
    #[error("secret `{0}` is empty")]
    Empty(String),
    /// A Key Vault secret could not be fetched (the reason never holds the value).
    #[error("Key Vault secret `{reference}` could not be fetched: {reason}")]
    KeyVault {
        /// The secret URL.
        reference: String,
        /// Why.
        reason: String,
    },
}

/// The largest file the gateway reads for a snapshot (a `file:` secret, a member's CA or client
/// identity): PEM bundles and keys are kilobytes.
pub const MAX_SNAPSHOT_FILE_BYTES: u64 = 1024 * 1024;

/// Reads a file a snapshot names: a regular file (not a FIFO, which would block the reader, nor
/// a device such as `/dev/zero`, which never ends) of at most [`MAX_SNAPSHOT_FILE_BYTES`].
pub fn read_bounded(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_SNAPSHOT_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_SNAPSHOT_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_SNAPSHOT_FILE_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// Reads the secret an `env:` or `file:` reference points to. A trailing newline of a file is not
/// part of the secret. A Key Vault reference needs the network: use a [`SecretStore`].
pub fn resolve(reference: &SecretRef) -> Result<Secret<String>, SecretError> {
    let value = match reference.source() {
        SecretSource::KeyVault(url) => {
            return Err(SecretError::KeyVault {
                reference: url.to_owned(),
                reason: "Key Vault references are resolved by the running gateway only".to_owned(),
            });
        }
        SecretSource::Env(name) => {
            std::env::var(name).map_err(|_| SecretError::MissingEnv(name.to_owned()))?
        }
        SecretSource::File(path) => read_bounded(path)
            .and_then(|bytes| String::from_utf8(bytes).map_err(std::io::Error::other))
            .map_err(|source| SecretError::File {
                path: path.to_owned(),
                source,
            })?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
    };
    if value.is_empty() {
        return Err(SecretError::Empty(reference.as_str().to_owned()));
    }
    Ok(Secret::new(value))
}

/// The current value of a secret, shared by everyone who uses it. `env:` and `file:` values change
/// when a snapshot is built again; Key Vault values when the store refreshes them.
#[derive(Clone)]
pub struct SecretValue(Arc<ArcSwap<Secret<String>>>);

impl SecretValue {
    /// A value holder starting at `value`.
    pub fn new(value: Secret<String>) -> Self {
        SecretValue(Arc::new(ArcSwap::from_pointee(value)))
    }

    /// The value now (cheap: one atomic load).
    pub fn current(&self) -> Arc<Secret<String>> {
        self.0.load_full()
    }

    /// Replaces the value; returns whether it changed.
    fn replace(&self, value: Secret<String>) -> bool {
        if self.0.load().expose() == value.expose() {
            return false;
        }
        self.0.store(Arc::new(value));
        true
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(*****)")
    }
}

/// Whether a key of [`SecretStore`]'s values is a Key Vault reference: keys are references as
/// written, and only `env:` and `file:` are not URLs.
fn is_key_vault(key: &str) -> bool {
    !key.starts_with("env:") && !key.starts_with("file:")
}

/// The values of a [`SecretStore`] at one moment ([`SecretStore::checkpoint`]).
#[derive(Debug)]
pub struct SecretCheckpoint(Vec<(SecretValue, Arc<Secret<String>>)>);

/// The secrets a gateway uses, by reference, shared across snapshots: Key Vault values are fetched
/// once, kept, and refreshed in the background. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct SecretStore {
    inner: Arc<StoreInner>,
}

#[derive(Debug, Default)]
struct StoreInner {
    values: Mutex<HashMap<String, SecretValue>>,
    /// Why the last fetch of a Key Vault reference failed, for references without a value.
    failures: Mutex<HashMap<String, String>>,
    key_vault: Option<KeyVaultClient>,
}

impl SecretStore {
    /// A store that fetches Key Vault references with `key_vault` (none: they are refused).
    pub fn new(key_vault: Option<KeyVaultClient>) -> Self {
        SecretStore {
            inner: Arc::new(StoreInner {
                key_vault,
                ..StoreInner::default()
            }),
        }
    }

    /// The value holder of `reference`: `env:` and `file:` are read now (and the shared holder
    /// updated); a Key Vault reference must have been fetched by [`SecretStore::prefetch`].
    pub fn resolve(&self, reference: &SecretRef) -> Result<SecretValue, SecretError> {
        let key = reference.as_str();
        if let SecretSource::KeyVault(url) = reference.source() {
            if let Some(value) = lock(&self.inner.values).get(key) {
                return Ok(value.clone());
            }
            let reason = lock(&self.inner.failures)
                .get(key)
                .cloned()
                .unwrap_or_else(|| "it was not fetched".to_owned());
            return Err(SecretError::KeyVault {
                reference: url.to_owned(),
                reason,
            });
        }
        let value = resolve(reference)?;
        let mut values = lock(&self.inner.values);
        match values.get(key) {
            Some(holder) => {
                holder.replace(value);
                Ok(holder.clone())
            }
            None => {
                let holder = SecretValue::new(value);
                values.insert(key.to_owned(), holder.clone());
                Ok(holder)
            }
        }
    }

    /// Fetches every Key Vault reference among `references` that the store holds no value for,
    /// concurrently. Failures are remembered for [`SecretStore::resolve`] to report.
    pub async fn prefetch<'a>(&self, references: impl IntoIterator<Item = &'a SecretRef>) {
        let missing: HashSet<&str> = {
            let values = lock(&self.inner.values);
            references
                .into_iter()
                .filter_map(|reference| match reference.source() {
                    SecretSource::KeyVault(url) if !values.contains_key(url) => Some(url),
                    _ => None,
                })
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let Some(key_vault) = &self.inner.key_vault else {
            let mut failures = lock(&self.inner.failures);
            for url in missing {
                failures.insert(
                    url.to_owned(),
                    "Key Vault references need the gateway's own Entra credential (`server.entra_credential`)".to_owned(),
                );
            }
            return;
        };
        let fetches = missing
            .into_iter()
            .map(|url| async move { (url, key_vault.get_secret(url).await) });
        for (url, outcome) in futures::future::join_all(fetches).await {
            match outcome {
                Ok(value) => {
                    lock(&self.inner.failures).remove(url);
                    lock(&self.inner.values).insert(url.to_owned(), SecretValue::new(value));
                }
                Err(error) => {
                    tracing::warn!(reference = url, %error, "Key Vault secret could not be fetched");
                    lock(&self.inner.failures).insert(url.to_owned(), error.to_string());
                }
            }
        }
    }

    /// Fetches every Key Vault value again. A failure keeps the last value and logs a warning.
    /// Returns how many values changed.
    pub async fn refresh(&self) -> usize {
        let Some(key_vault) = &self.inner.key_vault else {
            return 0;
        };
        let entries: Vec<(String, SecretValue)> = lock(&self.inner.values)
            .iter()
            .filter(|(key, _)| is_key_vault(key))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        let fetches = entries.iter().map(|(url, holder)| async move {
            match key_vault.get_secret(url).await {
                Ok(value) => {
                    let changed = holder.replace(value);
                    if changed {
                        tracing::info!(reference = %url, "Key Vault secret changed; the new value is in use");
                    }
                    changed
                }
                Err(error) => {
                    tracing::warn!(reference = %url, %error, "Key Vault secret refresh failed; keeping the last value");
                    false
                }
            }
        });
        futures::future::join_all(fetches)
            .await
            .into_iter()
            .filter(|changed| *changed)
            .count()
    }

    /// Refreshes the Key Vault values every `every` until the store is dropped.
    pub fn spawn_refresher(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let Some(inner) = store.upgrade() else {
                    return;
                };
                SecretStore { inner }.refresh().await;
            }
        })
    }

    /// The `env:` and `file:` values the store holds now, to put back with
    /// [`SecretStore::restore`] when the snapshot they were read for is not installed:
    /// [`SecretStore::resolve`] reads them again into the holders the running configuration
    /// shares. Key Vault values are left out: only the refresher changes them, and a rotation it
    /// installs while a push is prepared must survive the push being refused.
    pub fn checkpoint(&self) -> SecretCheckpoint {
        SecretCheckpoint(
            lock(&self.inner.values)
                .iter()
                .filter(|(key, _)| !is_key_vault(key))
                .map(|(_, holder)| (holder.clone(), holder.current()))
                .collect(),
        )
    }

    /// Puts back the values of `checkpoint` (holders made since keep theirs: nothing running
    /// uses them).
    pub fn restore(&self, checkpoint: SecretCheckpoint) {
        for (holder, value) in checkpoint.0 {
            holder.0.store(value);
        }
    }

    /// Forgets every value whose reference is not in `keep`.
    pub fn retain(&self, keep: &HashSet<&str>) {
        lock(&self.inner.values).retain(|key, _| keep.contains(key.as_str()));
        lock(&self.inner.failures).retain(|key, _| keep.contains(key.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("sk-very-secret".to_owned());
        assert_eq!(format!("{secret:?} {secret}"), "***** *****");
        assert_eq!(secret.expose(), "sk-very-secret");
    }

    #[test]
    fn file_secret_drops_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "abc123\n").unwrap();
        let reference = SecretRef::try_from(format!("file:{}", path.display())).unwrap();
        assert_eq!(resolve(&reference).unwrap().expose(), "abc123");
        let missing = SecretRef::try_from("env:GATEHOUSE_TEST_SURELY_UNSET".to_owned()).unwrap();
        assert!(matches!(resolve(&missing), Err(SecretError::MissingEnv(_))));
    }

    #[tokio::test]
    async fn store_shares_one_holder_per_reference_and_refuses_unfetched_key_vault() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "one").unwrap();
        let reference = SecretRef::try_from(format!("file:{}", path.display())).unwrap();
        let store = SecretStore::default();
        let holder = store.resolve(&reference).unwrap();
        std::fs::write(&path, "two").unwrap();
        let again = store.resolve(&reference).unwrap();
        assert_eq!(holder.current().expose(), "two", "one holder, updated");
        assert_eq!(again.current().expose(), "two");
        assert_eq!(format!("{holder:?}"), "SecretValue(*****)");

        let vault = SecretRef::try_from("https://v.vault.azure.net/secrets/k".to_owned()).unwrap();
        store.prefetch([&vault]).await;
        let error = store.resolve(&vault).unwrap_err().to_string();
        assert!(error.contains("server.entra_credential"), "{error}");
    }

    /// A refused push puts back the `env:`/`file:` values it read, never a Key Vault value the
    /// refresher rotated meanwhile (the old one may be revoked).
    #[test]
    fn a_restore_puts_back_files_and_keeps_a_key_vault_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "old-file").unwrap();
        let file = SecretRef::try_from(format!("file:{}", path.display())).unwrap();
        let store = SecretStore::default();
        let file_holder = store.resolve(&file).unwrap();
        let vault_url = "https://v.vault.azure.net/secrets/k";
        let vault_holder = SecretValue::new(Secret::new("old-vault".to_owned()));
        lock(&store.inner.values).insert(vault_url.to_owned(), vault_holder.clone());

        let checkpoint = store.checkpoint();
        // The push being prepared reads the file again; the refresher rotates the vault value.
        std::fs::write(&path, "new-file").unwrap();
        store.resolve(&file).unwrap();
        vault_holder.replace(Secret::new("rotated-vault".to_owned()));
        store.restore(checkpoint);

        assert_eq!(file_holder.current().expose(), "old-file");
        assert_eq!(vault_holder.current().expose(), "rotated-vault");
    }
}

//! Process settings and the configuration file.
//!
//! The file has two parts: `server` (how this process listens, where it keeps state, where its
//! audit records go — fixed for the life of the process) and `snapshot` (rules, subscriptions,
//! pools — replaceable at run time through the config endpoint).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::config::{EntraIdentity, SecretRef};
use serde::Deserialize;

use crate::secret::Secret;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Process settings.
    pub server: ServerSettings,
    /// The initial configuration snapshot.
    pub snapshot: ConfigSnapshot,
}

/// Settings of one gateway process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to listen on; bind a private address to keep the gateway off public networks.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Name of this gateway instance in audit records and metrics, and of its audit hash
    /// chains: unique to the instance (default: the machine's host name).
    #[serde(default = "default_gateway_id")]
    pub gateway_id: String,
    /// Directory for the last-known-good snapshot and the object-affinity map.
    pub state_dir: PathBuf,
    /// Token that authorises `PUT /_gatehouse/config`; without it the endpoint is off.
    #[serde(default)]
    pub admin_token: Option<SecretRef>,
    /// Take only admin requests signed with the admin token (as the portal sends them), never
    /// the token itself as `Authorization: Bearer`: a gateway the portal manages then has no
    /// use for its token outside the portal.
    #[serde(default)]
    pub admin_signed_only: bool,
    /// TLS termination; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// Where audit records go.
    #[serde(default)]
    pub audit: AuditSettings,
    /// `json` (default) or `text`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// Whether every call writes an info-level log line (default true).
    #[serde(default = "default_true")]
    pub access_log: bool,
    /// How often the files members' TLS settings name (CA, client identity) are read for
    /// changes, in seconds (default 30; see `Gateway::reload_backend_tls`).
    #[serde(default = "default_backend_tls_reload_seconds")]
    pub backend_tls_reload_seconds: u64,
    /// How long, once asked to stop, the gateway goes on accepting and serving calls while
    /// `/readyz` answers 503, before it stops accepting and drains, in seconds (default 0). Behind
    /// a load balancer that reads `/readyz`, set it to the time the balancer takes to notice
    /// (probe interval × failures to mark down), so that no call reaches a closed listener.
    #[serde(default)]
    pub shutdown_delay_seconds: u64,
    /// Whether `/readyz` answers 200 (default) while the gateway runs on its configuration
    /// file's snapshot because the newer snapshot last pushed to it could not be built at start
    /// (a secret it names is gone, Key Vault cannot be reached) or read. `false`: 503 until a
    /// push installs a snapshot, so that a load balancer sends calls to replicas that run the
    /// pushed configuration; but a Key Vault outage during a rolling restart then takes every
    /// restarted replica out of rotation.
    #[serde(default = "default_true")]
    pub ready_on_config_fallback: bool,
    /// How long shutdown waits for in-flight calls (streams included) to finish, in seconds.
    #[serde(default = "default_drain_seconds")]
    pub shutdown_drain_seconds: u64,
    /// How long an HTTP/1.1 client has to send a request's head (request line and headers), in
    /// seconds (default 60), counted from when the gateway starts waiting for it: a connection
    /// that sends its head slowly, or a kept-alive one idle this long between calls, is closed.
    /// An HTTP/2 connection silent this long is pinged, and closed when the ping is not answered
    /// within the same time again.
    #[serde(default = "default_client_timeout_seconds")]
    pub request_head_timeout_seconds: u64,
    /// The longest pause while a request body arrives, in seconds (default 60); a client that
    /// sends nothing for this long is answered 408 and the call goes to no backend.
    #[serde(default = "default_client_timeout_seconds")]
    pub request_body_timeout_seconds: u64,
    /// The longest a client may leave its answer untaken, in seconds (default 60, nginx's
    /// `send_timeout`): when the gateway cannot write to an HTTP/1.1 connection, or an HTTP/2
    /// client keeps a stream's window closed, for this long, the connection is closed (HTTP/1.1)
    /// or the stream reset (HTTP/2) and the call recorded as client-aborted.
    #[serde(default = "default_client_timeout_seconds")]
    pub send_timeout_seconds: u64,
    /// The longest a Realtime API session may pass no event either way, nor a ping or pong of the
    /// client's, in seconds (default 600, as long as Amazon API Gateway lets a WebSocket idle): it
    /// is then closed on both sides, and its record says `realtime_idle_timeout`.
    #[serde(default = "default_realtime_idle_timeout_seconds")]
    pub realtime_idle_timeout_seconds: u64,
    /// Threads that serve calls; absent: `TOKIO_WORKER_THREADS`, else one per CPU.
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// Where usage-limit counters live and what happens when that store fails.
    #[serde(default)]
    pub limits: LimitSettings,
    /// Where the map of stateful objects to the members that hold them is shared with other
    /// replicas.
    #[serde(default)]
    pub affinity: AffinitySettings,
    /// The gateway's own Microsoft Entra ID identity, which reads Key Vault secret references:
    /// `{type: entra_client_secret, tenant_id, client_id, secret, authority_host?}`,
    /// `{type: entra_certificate, tenant_id, client_id, certificate, authority_host?}` or
    /// `{type: managed_identity, client_id?, endpoint?}`. Its own secret is an `env:` or `file:`
    /// reference. Without it, Key Vault references are refused.
    #[serde(default)]
    pub entra_credential: Option<EntraIdentity>,
    /// How often Key Vault secrets in use are fetched again, in seconds (default 300): a rotated
    /// backend key takes effect within this time. A failed refresh keeps the last value.
    #[serde(default = "default_key_vault_refresh_seconds")]
    pub key_vault_refresh_seconds: u64,
    /// The only secret references a snapshot's members may name, as prefixes:
    /// `env:NAME_PREFIX`, `file:/absolute/directory/`, or the start of a Key Vault secret URL
    /// (`https://{vault}.vault.azure.net/secrets/aoai-`). Absent: any reference, except the
    /// gateway's own secrets and files, which a snapshot never names (see
    /// `gateway/src/secret_policy.rs`).
    #[serde(default)]
    pub snapshot_secret_refs: Option<Vec<String>>,
}

fn default_key_vault_refresh_seconds() -> u64 {
    300
}

fn default_client_timeout_seconds() -> u64 {
    60
}

fn default_realtime_idle_timeout_seconds() -> u64 {
    600
}

impl ServerSettings {
    /// The client timeouts, each at least one second.
    pub fn client_timeouts(&self) -> anyhow::Result<crate::ClientTimeouts> {
        anyhow::ensure!(
            self.request_head_timeout_seconds > 0,
            "server.request_head_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.request_body_timeout_seconds > 0,
            "server.request_body_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.send_timeout_seconds > 0,
            "server.send_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.realtime_idle_timeout_seconds > 0,
            "server.realtime_idle_timeout_seconds must be at least 1"
        );
        Ok(crate::ClientTimeouts {
            request_head: std::time::Duration::from_secs(self.request_head_timeout_seconds),
            request_body: std::time::Duration::from_secs(self.request_body_timeout_seconds),
            send: std::time::Duration::from_secs(self.send_timeout_seconds),
            realtime_idle: std::time::Duration::from_secs(self.realtime_idle_timeout_seconds),
        })
    }
}

/// Where the counters of `snapshot.limits` live: in this process, or in Redis when several
/// replicas share limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS), or a secret reference
    /// (`env:NAME`, `file:/path`) to such a URL. Absent: counters (and the reservations of work
    /// that goes on after its call, `crate::deferred_work`) are kept in this process only.
    /// The URL may hold a password, so it is never logged.
    #[serde(default)]
    pub redis_url: Option<RedisUrl>,
    /// Text put in front of every Redis key (before `gatehouse:limit:` and
    /// `gatehouse:deferred:`), to share one Redis
    /// between several gateway fleets. A Redis Cluster needs a hash tag here, e.g. `{gh}:`.
    #[serde(default)]
    pub key_prefix: String,
    /// What a call gets when the Redis store cannot be reached: `fail_open` (default: admitted
    /// unchecked, counted in `gatehouse_limit_store_errors_total`, logged) or `fail_closed` (503).
    #[serde(default)]
    pub on_store_error: OnStoreError,
    /// Completion tokens reserved for a call that names no `max_tokens`,
    /// `max_completion_tokens` or `max_output_tokens`.
    #[serde(default = "default_completion_tokens")]
    pub default_completion_tokens: u64,
    /// How long one Redis round trip may take before it counts as a store error (ms).
    #[serde(default = "default_store_timeout_ms")]
    pub store_timeout_ms: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            redis_url: None,
            key_prefix: String::new(),
            on_store_error: OnStoreError::default(),
            default_completion_tokens: default_completion_tokens(),
            store_timeout_ms: default_store_timeout_ms(),
        }
    }
}

fn default_completion_tokens() -> u64 {
    1024
}

fn default_store_timeout_ms() -> u64 {
    500
}

/// Where the map of stateful objects (files, batches, assistants, …) to the member that created
/// them is shared. Every gateway keeps its own copy in `state_dir`; replicas behind a load
/// balancer also share it in Redis, so that an object created through one replica is found
/// through any other.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinitySettings {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS), or a secret reference
    /// (`env:NAME`, `file:/path`) to such a URL. Absent: the map is this gateway's alone. The URL
    /// may hold a password, so it is never logged.
    #[serde(default)]
    pub redis_url: Option<RedisUrl>,
    /// Text put in front of every Redis key (before `gatehouse:affinity:`), to share one Redis
    /// between several gateway fleets. A Redis Cluster needs a hash tag here, e.g. `{gh}:`.
    #[serde(default)]
    pub key_prefix: String,
    /// How long one Redis round trip may take before it counts as a store error (ms).
    #[serde(default = "default_store_timeout_ms")]
    pub store_timeout_ms: u64,
}

impl Default for AffinitySettings {
    fn default() -> Self {
        AffinitySettings {
            redis_url: None,
            key_prefix: String::new(),
            store_timeout_ms: default_store_timeout_ms(),
        }
    }
}

/// What a call gets when the limit store fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Admit the call without checking its limits.
    #[default]
    FailOpen,
    /// Refuse the call with 503.
    FailClosed,
}

/// The Redis URL setting: the URL itself or a secret reference to it. `Debug` never shows a
/// URL, which may carry a password.
#[derive(Clone, Deserialize)]
#[serde(from = "String")]
pub enum RedisUrl {
    /// A `redis://` or `rediss://` URL written in the settings.
    Plain(Secret<String>),
    /// A reference to the URL (`env:NAME`, `file:/path`).
    Reference(SecretRef),
}

impl From<String> for RedisUrl {
    fn from(text: String) -> Self {
        match SecretRef::try_from(text.clone()) {
            Ok(reference) => RedisUrl::Reference(reference),
            Err(_) => RedisUrl::Plain(Secret::new(text)),
        }
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisUrl::Plain(_) => f.write_str("RedisUrl(*****)"),
            RedisUrl::Reference(reference) => write!(f, "RedisUrl({})", reference.as_str()),
        }
    }
}

impl RedisUrl {
    /// The URL, read from its reference when it is one.
    pub fn resolve(&self) -> Result<Secret<String>, crate::secret::SecretError> {
        match self {
            RedisUrl::Plain(url) => Ok(url.clone()),
            RedisUrl::Reference(reference) => crate::secret::resolve(reference),
        }
    }
}

/// Certificate and key for TLS termination, reloaded when either file changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
    /// How often the files are read and compared with what is served, in seconds (default 10):
    /// a pair that holds something else is loaded (by content, not modification time).
    #[serde(default = "default_reload_seconds")]
    pub reload_interval_seconds: u64,
}

fn default_reload_seconds() -> u64 {
    10
}

fn default_backend_tls_reload_seconds() -> u64 {
    30
}

/// Audit record destination: at most one of `database`, `azure_monitor`, `jsonl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSettings {
    /// The embedded store: `sqlite:PATH` or `postgres://user@host/db` (a password comes from
    /// `PGPASSWORD`, never from this file).
    #[serde(default)]
    pub database: Option<String>,
    /// Azure Monitor Logs through the Logs Ingestion API.
    #[serde(default)]
    pub azure_monitor: Option<gatehouse_audit::azure_monitor::AzureMonitorConfig>,
    /// A JSON-lines file.
    #[serde(default)]
    pub jsonl: Option<PathBuf>,
    /// Records the queue holds in memory, counting the room calls in progress hold for theirs.
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Bytes of records the queue and its writer may hold in memory (bodies and messages
    /// included); at it, calls wait for room as they do for a full queue.
    #[serde(default = "default_queue_max_bytes")]
    pub queue_max_bytes: u64,
    /// How long a call waits for room in a full queue before it is served without (or, failing
    /// closed, refused) (ms). A full queue means records come faster than even the journal takes
    /// them: calls slow down to that pace instead of losing records.
    #[serde(default = "default_room_wait_ms")]
    pub room_wait_ms: u64,
    /// How long a store write may take before its batch goes to the disk journal (ms).
    #[serde(default = "default_sink_timeout_ms")]
    pub sink_timeout_ms: u64,
    /// Largest size of the disk journal (bytes).
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    /// Refuse calls (503) when they could not be recorded, instead of serving them.
    #[serde(default)]
    pub fail_closed: bool,
    /// At most how long after a record is linked into its hash chain the chain's head is logged
    /// (`audit chain head`, target `gatehouse_audit::chain_head`), in seconds (default 60): kept
    /// apart from the store, these lines let `verify-audit --heads` find a chain's last records
    /// removed or records rewritten with their hashes.
    #[serde(default = "default_chain_heads_seconds")]
    pub chain_heads_seconds: u64,
    /// Days bodies, prompts and completions are kept in `database` (none: kept forever).
    #[serde(default)]
    pub content_retention_days: Option<u32>,
    /// Days metadata rows are kept in `database` (none: kept forever).
    #[serde(default)]
    pub metadata_retention_days: Option<u32>,
    /// With `database`: how long this gateway's claim of its `gateway_id` in the store lasts
    /// without renewal (it is renewed every third of this). A gateway started with an id whose
    /// claim is renewed within this refuses to start; one that finds a claim not renewed for this
    /// long (its holder stopped without giving it up) takes it.
    #[serde(default = "default_gateway_id_claim_seconds")]
    pub gateway_id_claim_seconds: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            database: None,
            azure_monitor: None,
            jsonl: None,
            queue_capacity: default_queue_capacity(),
            queue_max_bytes: default_queue_max_bytes(),
            room_wait_ms: default_room_wait_ms(),
            sink_timeout_ms: default_sink_timeout_ms(),
            journal_max_bytes: default_journal_max_bytes(),
            fail_closed: false,
            chain_heads_seconds: default_chain_heads_seconds(),
            content_retention_days: None,
            metadata_retention_days: None,
            gateway_id_claim_seconds: default_gateway_id_claim_seconds(),
        }
    }
}

fn default_chain_heads_seconds() -> u64 {
    gatehouse_audit::DEFAULT_PUBLISH_HEADS_EVERY.as_secs()
}

fn default_gateway_id_claim_seconds() -> u64 {
    30
}

fn default_room_wait_ms() -> u64 {
    u64::try_from(gatehouse_audit::DEFAULT_ROOM_WAIT.as_millis()).unwrap_or(u64::MAX)
}

fn default_sink_timeout_ms() -> u64 {
    5_000
}

fn default_queue_max_bytes() -> u64 {
    gatehouse_audit::DEFAULT_MAX_BYTES
}

fn default_journal_max_bytes() -> u64 {
    gatehouse_audit::DEFAULT_JOURNAL_MAX_BYTES
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

/// The machine's host name (a pod's name in Kubernetes), so that replicas started from one
/// configuration file get ids of their own (their audit hash chains are named after it); `gateway`
/// on a machine without one.
fn default_gateway_id() -> String {
    let name = gethostname::gethostname();
    let name = name.to_string_lossy();
    match name.trim() {
        "" => "gateway".to_owned(),
        name => name.to_owned(),
    }
}

fn default_queue_capacity() -> usize {
    10_000
}

fn default_true() -> bool {
    true
}

fn default_drain_seconds() -> u64 {
    30
}

/// Why the configuration file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The YAML does not match the schema; the message names the field path.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Field path and problem.
        message: String,
    },
}

impl ConfigFile {
    /// Reads and parses a configuration file, naming the exact field on error.
    pub fn load(path: &Path) -> Result<ConfigFile, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| LoadError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses configuration YAML text.
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        let deserializer = serde_yaml_ng::Deserializer::from_str(text);
        serde_path_to_error::deserialize(deserializer).map_err(|error| {
            let path = error.path().to_string();
            let inner = error.into_inner();
            format!("at `{path}`: {inner}")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotated_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/gateway.yaml");
        let file = ConfigFile::load(&path).unwrap();
        assert_eq!(file.snapshot.pools[0].members.len(), 3);
        assert!(file.server.admin_token.is_some());
        assert_eq!(file.snapshot.limits.len(), 2);
        assert_eq!(file.server.limits.on_store_error, OnStoreError::FailOpen);
        assert!(matches!(
            file.server.limits.redis_url,
            Some(RedisUrl::Reference(_))
        ));
        assert!(matches!(
            file.server.affinity.redis_url,
            Some(RedisUrl::Reference(_))
        ));
        // The example leaves the id to each machine: its host name, as the kernel has it.
        if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            assert_eq!(file.server.gateway_id, host.trim());
        }
        assert!(matches!(
            file.server.entra_credential,
            Some(EntraIdentity::ManagedIdentity { .. })
        ));
        assert_eq!(file.server.key_vault_refresh_seconds, 300);
        assert_eq!(file.server.audit.queue_max_bytes, 256 << 20);
        assert_eq!(
            file.server.client_timeouts().unwrap(),
            crate::ClientTimeouts::default()
        );
        let member = &file.snapshot.pools[0].members[0];
        assert_eq!(member.response_timeout_ms, 300_000);
        assert_eq!(member.response_idle_timeout_ms, 300_000);
        assert!(matches!(
            member.credential,
            gatehouse_schema::config::BackendCredential::ApiKey { ref secret }
                if matches!(secret.source(), gatehouse_schema::config::SecretSource::KeyVault(_))
        ));
    }

    #[test]
    fn client_timeouts_are_whole_seconds_of_at_least_one() {
        let settings = |extra: &str| -> ServerSettings {
            serde_yaml_ng::from_str(&format!("state_dir: /tmp/gh\n{extra}")).unwrap()
        };
        let defaults = settings("").client_timeouts().unwrap();
        assert_eq!(defaults.request_head, std::time::Duration::from_secs(60));
        assert_eq!(defaults.request_body, std::time::Duration::from_secs(60));
        assert_eq!(defaults.send, std::time::Duration::from_secs(60));
        assert_eq!(defaults.realtime_idle, std::time::Duration::from_secs(600));
        let set = settings(
            "request_head_timeout_seconds: 5\nrequest_body_timeout_seconds: 7\nsend_timeout_seconds: 9\n\
             realtime_idle_timeout_seconds: 11",
        )
        .client_timeouts()
        .unwrap();
        assert_eq!(set.request_head, std::time::Duration::from_secs(5));
        assert_eq!(set.request_body, std::time::Duration::from_secs(7));
        assert_eq!(set.send, std::time::Duration::from_secs(9));
        assert_eq!(set.realtime_idle, std::time::Duration::from_secs(11));
        for field in [
            "request_body_timeout_seconds",
            "send_timeout_seconds",
            "realtime_idle_timeout_seconds",
        ] {
            let zero = settings(&format!("{field}: 0"))
                .client_timeouts()
                .unwrap_err()
                .to_string();
            assert!(zero.contains(&format!("server.{field}")), "{zero}");
        }
    }

    #[test]
    fn a_wrong_field_is_named_with_its_path() {
        let text = "server: {state_dir: /tmp/x}\nsnapshot:\n  version: 1\n  pools:\n    - id: p\n      deployments: [d]\n      members:\n        - {id: m, endpoint: 'http://x', priority: high}\n";
        let error = ConfigFile::parse(text).unwrap_err();
        assert!(
            error.starts_with("at `snapshot.pools[0].members[0].priority`"),
            "{error}"
        );
    }
}

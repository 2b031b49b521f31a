//! The `gatehouse-gateway` command.

use std::io::{IsTerminal as _, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse_audit::azure_monitor::AzureMonitorSink;
use gatehouse_audit::sql::SqlStore;
use gatehouse_audit::{AuditQueue, AuditSink, JsonLinesSink, QueueSettings, WriterHandle};
use gatehouse_gateway::entra_credential::{TokenCredential, is_key_vault};
use gatehouse_gateway::gateway_claim::GatewayIdClaim;
use gatehouse_gateway::key_vault::KeyVaultClient;
use gatehouse_gateway::runtime::{Resolver, Runtime};
use gatehouse_gateway::secret::SecretStore;
use gatehouse_gateway::secret_policy::SecretRefPolicy;
use gatehouse_gateway::settings::{AuditSettings, LogFormat, RedisUrl, ServerSettings};
use gatehouse_gateway::state_lock::StateDirLock;
use gatehouse_gateway::{ConfigFile, Gateway, GatewayParts, SecretSettings, auth, secret, server};
use gatehouse_schema::config::SecretRef;

/// mimalloc: the gateway allocates many short-lived buffers per call, where glibc's allocator
/// showed up as ~12% of CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gatehouse gateway: a drop-in Azure OpenAI / OpenAI endpoint with keys, failover and audit.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve model calls with the configuration file.
    Serve {
        /// YAML configuration file (see examples/gateway.yaml).
        #[arg(long, short, env = "GATEHOUSE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        /// YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Verify the hash chain of audit records in a JSON-lines file (--jsonl) or an audit database
    /// (--database), and name the first record that was changed or removed. With --from/--to,
    /// every chain (one per gateway and day) with records in that range is checked whole.
    VerifyAudit {
        /// JSON-lines audit file.
        #[arg(
            long,
            conflicts_with = "database",
            required_unless_present = "database"
        )]
        jsonl: Option<PathBuf>,
        /// Audit database: `sqlite:PATH` or `postgres://…`.
        #[arg(long)]
        database: Option<String>,
        /// Only chains with records at or after this RFC 3339 time.
        #[arg(long)]
        from: Option<String>,
        /// Only chains with records before this RFC 3339 time.
        #[arg(long)]
        to: Option<String>,
        /// The store's content retention (`audit.content_retention_days`): a record younger
        /// than this that lacks the content it was linked with is named `changed` (without it,
        /// missing content is taken for content retention removed). A JSON-lines file, which
        /// nothing removes content from, is always checked so.
        #[arg(long, requires = "database")]
        content_retention_days: Option<u32>,
        /// The gateway's JSON log lines (or those a log collector kept) holding the heads it
        /// published (`audit chain head`): each chain of the range must reach its newest head,
        /// with the hash published for it, so that the removal of a chain's last records (or of
        /// a whole chain) and records rewritten with every hash after them are found. Needs
        /// --from: give a range inside the store's metadata window (a day retention removed
        /// would be reported removed).
        #[arg(long, requires = "from")]
        heads: Option<PathBuf>,
    },
    /// Refresh the query planner's statistics of a SQLite audit store in full. The store does
    /// this itself at every start and after each hourly retention run (when a retention is set)
    /// while it holds at most 1,000,000 calls; past that,
    /// run this in a quiet hour: it reads every index and holds the write lock meanwhile (the
    /// gateway's records wait in its journal).
    AnalyzeAudit {
        /// Audit database: `sqlite:PATH`.
        #[arg(long)]
        database: String,
    },
    /// Index the prompts and completions of a time range of an audit store again, from its LLM
    /// log, so that calls an earlier version indexed are searched as new ones are. Runs beside a
    /// gateway that writes to the store, in batches of 512 calls.
    ReindexAudit {
        /// Audit database: `sqlite:PATH` or `postgres://…`.
        #[arg(long)]
        database: String,
        /// Calls at or after this RFC 3339 time (default: the oldest).
        #[arg(long)]
        from: Option<String>,
        /// Calls before this RFC 3339 time (default: now).
        #[arg(long)]
        to: Option<String>,
    },
    /// Print a new subscription key and, on a second line, its hash for the configuration.
    Keygen,
    /// Read a key on standard input and print its hash for the configuration.
    HashKey,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Keygen => {
            let key = auth::generate_key();
            write_lines(&[&key, &auth::hash_key(&key).to_string()])
        }
        Command::HashKey => {
            let mut key = String::new();
            std::io::stdin().read_to_string(&mut key)?;
            write_lines(&[&auth::hash_key(key.trim_end_matches(['\r', '\n'])).to_string()])
        }
        Command::Check { config } => {
            let file = ConfigFile::load(&config)?;
            check_server_settings(&file.server)
                .map_err(|error| anyhow::anyhow!("{}: {error:#}", config.display()))?;
            let secrets = secret_settings(&file.server, &config)?;
            // Key Vault references are fetched, as the running gateway would.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let resolver = Resolver {
                        secrets: SecretStore::new(
                            secrets.entra_credential.map(KeyVaultClient::new),
                        ),
                        credentials: Arc::default(),
                        policy: Arc::new(secrets.snapshot_refs),
                        clients: Arc::default(),
                    };
                    Runtime::prepare(file.snapshot, &Default::default(), &resolver).await
                })
                .map_err(|errors| anyhow::anyhow!("{}: {errors}", config.display()))?;
            write_lines(&["configuration is valid"])
        }
        Command::VerifyAudit {
            jsonl,
            database,
            from,
            to,
            content_retention_days,
            heads,
        } => verify_audit(
            jsonl.as_deref(),
            database.as_deref(),
            from.as_deref(),
            to.as_deref(),
            content_retention_days,
            heads.as_deref(),
        ),
        Command::AnalyzeAudit { database } => analyze_audit(&database),
        Command::ReindexAudit { database, from, to } => {
            reindex_audit(&database, from.as_deref(), to.as_deref())
        }
        Command::Serve { config } => {
            let file = ConfigFile::load(&config)?;
            init_logging(file.server.log_format);
            check_server_settings(&file.server)?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = file.server.worker_threads {
                runtime.worker_threads(threads);
            }
            runtime.enable_all().build()?.block_on(serve(file, &config))
        }
    }
}

fn analyze_audit(database: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        database.starts_with("sqlite:"),
        "--database: statistics are refreshed for SQLite stores (PostgreSQL's autovacuum keeps its own)"
    );
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = SqlStore::open(database).await.context("--database")?;
            let started = std::time::Instant::now();
            store.refresh_planner_statistics(i64::MAX).await?;
            write_lines(&[&format!(
                "planner statistics refreshed in {:.1} s",
                started.elapsed().as_secs_f64()
            )])
        })
}

/// Parses an optional RFC 3339 time of the command line.
fn parse_time(text: Option<&str>) -> anyhow::Result<Option<time::OffsetDateTime>> {
    text.map(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339))
        .transpose()
        .context("times are RFC 3339, e.g. 2026-12-01T00:00:00Z")
}

fn reindex_audit(database: &str, from: Option<&str>, to: Option<&str>) -> anyhow::Result<()> {
    let from = parse_time(from)?.unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let to = parse_time(to)?.unwrap_or_else(time::OffsetDateTime::now_utc);
    anyhow::ensure!(from < to, "--from must be before --to");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let store = SqlStore::open(database).await.context("--database")?;
            let started = std::time::Instant::now();
            let indexed = store.reindex_search(from, to).await;
            store.close().await;
            write_lines(&[&format!(
                "{} calls indexed again in {:.1} s",
                indexed?,
                started.elapsed().as_secs_f64()
            )])
        })
}

fn verify_audit(
    jsonl: Option<&std::path::Path>,
    database: Option<&str>,
    from: Option<&str>,
    to: Option<&str>,
    content_retention_days: Option<u32>,
    heads: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let (from, to) = (parse_time(from)?, parse_time(to)?);
    let published = match heads {
        Some(path) => {
            let published = gatehouse_audit::chain::read_published_heads(path)
                .with_context(|| format!("--heads {}", path.display()))?;
            anyhow::ensure!(
                !published.is_empty(),
                "--heads {}: no `{}` line in it (the gateway logs them as JSON, at info level, \
                 target gatehouse_audit::chain_head)",
                path.display(),
                gatehouse_audit::chain::HEAD_MESSAGE
            );
            published
        }
        None => Vec::new(),
    };
    let report = match (jsonl, database) {
        (Some(path), _) => gatehouse_audit::chain::verify_jsonl(path, from, to, &published)?,
        (None, Some(url)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async {
                let store = SqlStore::connect(url).await?;
                let from = from.unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                let to =
                    to.unwrap_or_else(|| time::OffsetDateTime::now_utc() + time::Duration::days(1));
                let verifier = match content_retention_days {
                    Some(days) => gatehouse_audit::chain::Verifier::new().expecting_content_since(
                        time::OffsetDateTime::now_utc() - time::Duration::days(i64::from(days)),
                    ),
                    None => gatehouse_audit::chain::Verifier::new(),
                };
                let report = store
                    .verify_chains_against(from, to, verifier, &published)
                    .await;
                store.close().await;
                report
            })?,
        (None, None) => anyhow::bail!("name --jsonl FILE or --database URL"),
    };
    let mut lines = Vec::new();
    for chain in &report.chains {
        lines.push(format!(
            "{}: {} records{}",
            chain.chain_id,
            chain.records,
            if chain.is_intact() { ", intact" } else { "" }
        ));
    }
    if report.unchained > 0 {
        lines.push(format!("{} records carry no chain link", report.unchained));
    }
    if report.unreadable > 0 {
        lines.push(format!("{} lines are not audit records", report.unreadable));
    }
    if let Some((chain, broken)) = report.first_break() {
        lines.push(format!(
            "FIRST BREAK in {}: record {} (CorrelationId {}): {:?} — {}",
            chain.chain_id, broken.sequence, broken.correlation_id, broken.reason, broken.detail
        ));
    }
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    write_lines(&refs)?;
    if report.is_intact() {
        Ok(())
    } else {
        anyhow::bail!("the audit chain does not verify")
    }
}

fn write_lines(lines: &[&str]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

/// What `serve` refuses in the server settings before it opens anything, so that `check` refuses
/// it too: thread count, client timeouts, the TLS certificate and key, the audit sink's shape,
/// and the secrets the settings name (the admin token, the Redis URLs).
fn check_server_settings(settings: &ServerSettings) -> anyhow::Result<()> {
    if settings.worker_threads == Some(0) {
        anyhow::bail!("server.worker_threads must be at least 1");
    }
    settings.client_timeouts()?;
    if let Some(tls) = &settings.tls {
        server::check_tls(tls)?;
    }
    check_audit_settings(&settings.audit, settings.entra_credential.is_some())?;
    if let Some(reference) = &settings.admin_token {
        secret::resolve(reference).context("server.admin_token")?;
    }
    for (name, url) in [
        ("server.limits.redis_url", &settings.limits.redis_url),
        ("server.affinity.redis_url", &settings.affinity.redis_url),
    ] {
        if let Some(url) = url {
            url.resolve().context(name)?;
        }
    }
    Ok(())
}

/// The audit settings' own shape: one sink at most, a claim period, and an identity for Azure
/// Monitor (its own `credential`, or the gateway's: `has_identity`).
fn check_audit_settings(audit: &AuditSettings, has_identity: bool) -> anyhow::Result<()> {
    let named = [
        audit.database.is_some(),
        audit.azure_monitor.is_some(),
        audit.jsonl.is_some(),
    ];
    anyhow::ensure!(
        audit.gateway_id_claim_seconds > 0,
        "server.audit.gateway_id_claim_seconds must be at least 1"
    );
    if named.iter().filter(|n| **n).count() > 1 {
        anyhow::bail!(
            "server.audit: name one of `database`, `azure_monitor` and `jsonl`, not several"
        );
    }
    anyhow::ensure!(
        audit
            .azure_monitor
            .as_ref()
            .is_none_or(|monitor| monitor.credential.is_some() || has_identity),
        "server.audit.azure_monitor.credential: name the app registration the sink signs in as \
         (tenant_id, client_id, client_secret), or give the gateway an identity of its own \
         (server.entra_credential) to sign in with"
    );
    // Failing closed means refusing the calls the gateway cannot record: with nowhere to record
    // them, it would serve every call unrecorded instead.
    anyhow::ensure!(
        !audit.fail_closed || named.contains(&true),
        "server.audit.fail_closed is set but no destination is named (`database`, `azure_monitor` \
         or `jsonl`): every call would be served unrecorded"
    );
    Ok(())
}

/// The one audit sink the settings name, and the SQL store when it is that; `identity` is the
/// gateway's own, which Azure Monitor signs in with when it names no credential of its own.
async fn audit_sink(
    audit: &AuditSettings,
    identity: Option<&TokenCredential>,
) -> anyhow::Result<Option<(Arc<dyn AuditSink>, Option<SqlStore>)>> {
    check_audit_settings(audit, identity.is_some())?;
    if let Some(url) = &audit.database {
        let store = SqlStore::open(url).await.context("server.audit.database")?;
        tokio::spawn(maintain_audit_store(
            store.clone(),
            audit.content_retention_days,
            audit.metadata_retention_days,
        ));
        return Ok(Some((Arc::new(store.clone()), Some(store))));
    }
    if let Some(config) = &audit.azure_monitor {
        let sink = match identity {
            Some(identity) => {
                AzureMonitorSink::with_identity(config.clone(), Arc::new(identity.clone()))
            }
            None => AzureMonitorSink::new(config.clone()),
        }
        .context("server.audit.azure_monitor")?;
        return Ok(Some((Arc::new(sink), None)));
    }
    if let Some(path) = &audit.jsonl {
        let sink = JsonLinesSink::open(path)
            .await
            .with_context(|| format!("opening audit file {}", path.display()))?;
        return Ok(Some((Arc::new(sink), None)));
    }
    Ok(None)
}

/// Every hour: removes expired content and metadata when a retention is set (PostgreSQL drops
/// whole daily partitions, the rest goes in small batches), and on PostgreSQL creates the daily
/// partitions of the coming days (which the retention run also does).
async fn maintain_audit_store(
    store: SqlStore,
    content_days: Option<u32>,
    metadata_days: Option<u32>,
) {
    const FOREVER: time::Duration = time::Duration::days(365 * 1000);
    let days = |d: Option<u32>| d.map_or(FOREVER, |d| time::Duration::days(i64::from(d)));
    let retention = content_days.is_some() || metadata_days.is_some();
    let mut ticker = tokio::time::interval(Duration::from_secs(3600));
    loop {
        ticker.tick().await;
        if !retention {
            if let Err(error) = store.maintain_partitions().await {
                tracing::warn!(%error, "audit partition maintenance failed; retrying in an hour");
            }
            continue;
        }
        let now = time::OffsetDateTime::now_utc();
        let metadata_before = now - days(metadata_days);
        let content_before = now - days(content_days).min(days(metadata_days));
        match store
            .enforce_retention(content_before, metadata_before, 500)
            .await
        {
            Ok(report) => tracing::info!(?report, "audit retention enforced"),
            Err(error) => tracing::warn!(%error, "audit retention failed; retrying in an hour"),
        }
    }
}

/// Environment variables that hold secrets of the gateway's own whatever its settings say: the
/// PostgreSQL password of the audit store (libpq's and sqlx's `PGPASSWORD`), App Service's
/// managed-identity header and the older `MSI_SECRET`, and proxy URLs (they may carry
/// `user:password`).
const HOST_SECRET_VARIABLES: &[&str] = &[
    "PGPASSWORD",
    "IDENTITY_HEADER",
    "MSI_SECRET",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

/// The gateway's own Entra credential and the Key Vault refresh interval, from the settings.
/// Which secret references a snapshot may name: never those the server settings use, nor the
/// configuration file, the TLS files or anything in the state directory; and only under
/// `server.snapshot_secret_refs` when it is set (see `gateway/src/secret_policy.rs`).
fn snapshot_ref_policy(
    settings: &ServerSettings,
    config: &Path,
) -> anyhow::Result<SecretRefPolicy> {
    let mut reserved: Vec<SecretRef> = settings.admin_token.iter().cloned().collect();
    if let Some((_, reference)) = settings
        .entra_credential
        .as_ref()
        .and_then(|identity| identity.secret_ref())
    {
        reserved.push(reference.clone());
    }
    for url in [&settings.limits.redis_url, &settings.affinity.redis_url]
        .into_iter()
        .flatten()
    {
        if let RedisUrl::Reference(reference) = url {
            reserved.push(reference.clone());
        }
    }
    if let Some(credential) = settings
        .audit
        .azure_monitor
        .as_ref()
        .and_then(|monitor| monitor.credential.as_ref())
    {
        reserved.push(credential.client_secret.clone());
    }
    // What the gateway's libraries read from the environment as secrets of their own: the audit
    // store's PostgreSQL password, App Service's managed-identity header, a proxy URL with its
    // credentials. Reserved whether or not this gateway uses them.
    for name in HOST_SECRET_VARIABLES {
        reserved.push(SecretRef::try_from(format!("env:{name}")).map_err(|e| anyhow::anyhow!(e))?);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let from_env_or_home = |variable: &str, under_home: &str| {
        std::env::var_os(variable)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|home| home.join(under_home)))
    };
    // libpq's and sqlx's password file and TLS client key, and a key the database URL names.
    let mut postgres_files: Vec<PathBuf> = [
        from_env_or_home("PGPASSFILE", ".pgpass"),
        from_env_or_home("PGSSLKEY", ".postgresql/postgresql.key"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if let Some(database) = &settings.audit.database
        && let Ok(url) = url::Url::parse(database)
    {
        postgres_files.extend(
            url.query_pairs()
                .filter(|(name, _)| name == "sslkey")
                .map(|(_, path)| PathBuf::from(path.into_owned())),
        );
    }
    let mut files: Vec<&Path> = vec![config];
    files.extend(postgres_files.iter().map(PathBuf::as_path));
    if let Some(tls) = &settings.tls {
        files.extend([tls.cert_file.as_path(), tls.key_file.as_path()]);
    }
    SecretRefPolicy::new(
        reserved,
        &files,
        &[settings.state_dir.as_path()],
        settings.snapshot_secret_refs.as_deref(),
    )
    .map_err(|problem| anyhow::anyhow!(problem))
}

fn secret_settings(settings: &ServerSettings, config: &Path) -> anyhow::Result<SecretSettings> {
    let entra_credential = match &settings.entra_credential {
        Some(identity) => {
            if let Some((field, reference)) = identity.secret_ref() {
                anyhow::ensure!(
                    !is_key_vault(reference),
                    "server.entra_credential.{field}: the gateway's own credential cannot be read from Key Vault; use env: or file:"
                );
            }
            let credential = TokenCredential::from_identity(identity, &SecretStore::default())
                .map_err(|error| anyhow::anyhow!("server.entra_credential.{error}"))?;
            Some(credential)
        }
        None => None,
    };
    anyhow::ensure!(
        settings.key_vault_refresh_seconds > 0,
        "server.key_vault_refresh_seconds must be at least 1"
    );
    Ok(SecretSettings {
        entra_credential,
        key_vault_refresh: Duration::from_secs(settings.key_vault_refresh_seconds),
        snapshot_refs: snapshot_ref_policy(settings, config)?,
    })
}

async fn serve(file: ConfigFile, config: &Path) -> anyhow::Result<()> {
    let settings = file.server;
    // Before anything in the state directory is read: held until the process ends.
    let _state_lock = StateDirLock::take(&settings.state_dir)?;
    let secrets = secret_settings(&settings, config)?;
    let mut claim = None;
    let mut renewing = None;
    let conflict = Arc::new(std::sync::OnceLock::new());
    let journal_dir = settings.state_dir.join("audit-journal");
    let (audit, writer) = match audit_sink(&settings.audit, secrets.entra_credential.as_ref())
        .await?
    {
        Some((sink, store)) => {
            // Before the journal is replayed and before any call: a gateway_id held by a running
            // gateway stops this one here.
            if let Some(store) = store {
                let taken = Arc::new(
                    GatewayIdClaim::take(
                        store,
                        &settings.gateway_id,
                        &settings.state_dir,
                        Duration::from_secs(settings.audit.gateway_id_claim_seconds),
                    )
                    .await?,
                );
                renewing = Some(taken.keep(Arc::clone(&conflict)));
                claim = Some(taken);
            }
            let queue_settings = QueueSettings {
                capacity: settings.audit.queue_capacity,
                max_bytes: settings.audit.queue_max_bytes,
                journal_dir: Some(journal_dir.clone()),
                sink_timeout: Duration::from_millis(settings.audit.sink_timeout_ms),
                journal_max_bytes: settings.audit.journal_max_bytes,
                fail_closed: settings.audit.fail_closed,
                room_wait: Duration::from_millis(settings.audit.room_wait_ms),
                publish_heads_every: Duration::from_secs(settings.audit.chain_heads_seconds.max(1)),
            };
            let (queue, writer) = AuditQueue::start_with(sink, queue_settings)
                .await
                .context("starting the audit queue")?;
            (Some(queue), Some(writer))
        }
        None => {
            tracing::warn!("no audit sink configured: calls are not recorded");
            (None, None)
        }
    };
    let admin_token = match &settings.admin_token {
        Some(reference) => Some(secret::resolve(reference).context("server.admin_token")?),
        None => None,
    };
    let gateway = Gateway::new(GatewayParts {
        id: settings.gateway_id.clone(),
        snapshot: file.snapshot,
        state_dir: settings.state_dir.clone(),
        admin_token,
        admin_signed_only: settings.admin_signed_only,
        audit,
        access_log: settings.access_log,
        limits: settings.limits.clone(),
        affinity: settings.affinity.clone(),
        secrets,
        client_timeouts: settings.client_timeouts()?,
        ready_on_config_fallback: settings.ready_on_config_fallback,
    })
    .await?;
    let _ = conflict.set(gateway.metrics.gateway_id_conflict.clone());
    let tls_watch = tokio::spawn(watch_backend_tls(
        Arc::clone(&gateway),
        Duration::from_secs(settings.backend_tls_reload_seconds.max(1)),
    ));
    let (listening, task) =
        server::spawn(Arc::clone(&gateway), settings.listen, settings.tls.clone()).await?;
    tracing::info!(
        addr = %listening.addr,
        tls = settings.tls.is_some(),
        version = gateway.runtime().snapshot.version,
        "gatehouse gateway listening"
    );
    server::shutdown_signal().await;
    // From here on a second signal ends the delay and the drain at once: an operator (or a
    // supervisor about to kill) who cannot wait still gets the records flushed.
    let mut hurried = Box::pin(server::shutdown_signal());
    let mut hurry = false;
    gateway.begin_shutdown();
    let delay = Duration::from_secs(settings.shutdown_delay_seconds);
    if !delay.is_zero() {
        tracing::info!(
            delay_seconds = settings.shutdown_delay_seconds,
            "shutting down; not ready, serving calls until the delay is over"
        );
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut hurried => hurry = true,
        }
    }
    let drain = if hurry {
        tracing::warn!("asked again to stop: no drain");
        Duration::ZERO
    } else {
        tracing::info!(
            drain_seconds = settings.shutdown_drain_seconds,
            "shutting down; draining in-flight calls"
        );
        Duration::from_secs(settings.shutdown_drain_seconds)
    };
    let mut drain_ends = tokio::time::Instant::now() + drain;
    listening.shutdown(drain);
    // A server that failed still has its calls' records to flush: its error is returned after.
    let mut task = task;
    let served = tokio::select! {
        served = &mut task => served,
        () = &mut hurried, if !hurry => {
            tracing::warn!("asked again to stop: the drain ends now");
            hurry = true;
            drain_ends = tokio::time::Instant::now();
            listening.stop_now();
            task.await
        }
    };
    let served = served
        .map_err(anyhow::Error::from)
        .and_then(|served| served.map_err(anyhow::Error::from));
    // An upgraded connection (a Realtime session) is not one the server's drain waited for: what
    // is left of the drain is the sessions', to end by themselves. Those still open after it are
    // closed with the calls below.
    let sessions = tokio::select! {
        ended = gateway.calls.sessions_ended(drain_ends) => ended,
        () = &mut hurried, if !hurry => {
            tracing::warn!("asked again to stop: Realtime sessions are closed now");
            gateway.calls.sessions_ended(tokio::time::Instant::now()).await
        }
    };
    if let Err(open) = sessions {
        tracing::info!(
            open,
            "Realtime sessions still open when the drain ended are closed"
        );
    }
    // The drain is over and every connection closed, but calls cut off by it go on on tasks of
    // their own (waiting for an answer's head, or reading the rest of one for the record): they
    // stop waiting now and hand their records on, and only then is the queue flushed.
    let unrecorded = gateway.calls.stop(CALLS_GRACE).await.err();
    if let Some(running) = unrecorded {
        tracing::error!(
            running,
            limit_ms = CALLS_GRACE.as_millis(),
            "calls still running after the shutdown's drain did not finish their records in time: \
             their records are lost"
        );
    }
    tls_watch.abort();
    drop(gateway);
    let flushed = match writer {
        Some(writer) => {
            let limit = Duration::from_millis(settings.audit.sink_timeout_ms) + FLUSH_GRACE;
            flush_audit(writer, limit, &journal_dir).await
        }
        None => Ok(()),
    };
    if let Some(renewing) = renewing {
        renewing.abort();
    }
    if let Some(claim) = claim {
        claim.release().await;
    }
    flushed?;
    served?;
    // Records lost make the exit status say so, for the supervisor (docs/audit.md).
    if let Some(running) = unrecorded {
        anyhow::bail!("the records of {running} calls still running at shutdown are lost");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Every `interval`, builds the running snapshot again when a file its members' TLS settings
/// name changed on disk (`Gateway::reload_backend_tls`).
async fn watch_backend_tls(gateway: Arc<Gateway>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        match gateway.reload_backend_tls().await {
            Ok(true) => tracing::info!("a member's TLS files changed: its client was built again"),
            Ok(false) => {}
            Err(problems) => tracing::error!(
                %problems,
                "a member's TLS files changed but do not build; it keeps its running client"
            ),
        }
    }
}

/// How long calls cut off by the end of the shutdown's drain may take to finish their records
/// once told to (they stop waiting on their backends at once; counting a cut answer's tokens
/// or journaling a created object may take a moment).
const CALLS_GRACE: Duration = Duration::from_secs(5);

/// How long the audit queue's last flush may take at shutdown beyond one sink timeout (a sink
/// write in flight ends or goes to the journal after one): the writer, told the limit, sends
/// batches to a slow sink for half of it and keeps the other half to append what is left to the
/// journal on a slow disk ([`WriterHandle::finish_within`]).
const FLUSH_GRACE: Duration = Duration::from_secs(30);

/// Waits at most `limit` for the audit writer to store or journal every record it was handed,
/// telling it the limit, so that it journals what a slow sink has no time left for. An error
/// (the process then exits non-zero) when records were lost: could be neither stored nor
/// journaled, or were still in memory when the limit passed (the writer without a journal
/// retries a failing or slow sink until then, a journal on a hung disk never answers).
async fn flush_audit(
    writer: WriterHandle,
    limit: Duration,
    journal_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let stats = match writer.finish_within(limit).await {
        Ok(stats) => stats,
        Err(overrun) => {
            tracing::error!(
                limit_ms = limit.as_millis(),
                in_memory = overrun.stats.depth,
                journal = %journal_dir.display(),
                "the audit queue was not flushed in time: the records still in memory are lost; \
                 those already in the journal are replayed at the next start"
            );
            anyhow::bail!(
                "the audit queue was not flushed within {} ms: records lost",
                limit.as_millis()
            );
        }
    };
    if stats.depth > 0 {
        tracing::error!(
            lost = stats.depth,
            journaled = stats.journal_records,
            journal = %journal_dir.display(),
            "audit records could be neither stored nor journaled at shutdown: lost"
        );
        anyhow::bail!(
            "{} audit records could be neither stored nor journaled at shutdown",
            stats.depth
        );
    }
    if stats.journal_records > 0 {
        tracing::info!(
            journaled = stats.journal_records,
            journal = %journal_dir.display(),
            "audit records stay in the journal; the next start stores them"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::future::BoxFuture;
    use gatehouse_audit::SinkError;
    use gatehouse_schema::AuditRecord;

    use super::*;

    #[test]
    fn failing_closed_with_nowhere_to_record_is_refused() {
        let nowhere = AuditSettings {
            fail_closed: true,
            ..AuditSettings::default()
        };
        let error = check_audit_settings(&nowhere, false)
            .unwrap_err()
            .to_string();
        assert!(error.contains("server.audit.fail_closed"), "{error}");
        let to_a_file = AuditSettings {
            fail_closed: true,
            jsonl: Some("audit.jsonl".into()),
            ..AuditSettings::default()
        };
        check_audit_settings(&to_a_file, false).unwrap();
        check_audit_settings(&AuditSettings::default(), false).unwrap();
    }

    /// Azure Monitor signs in with its own credential or the gateway's identity: with neither,
    /// the settings are refused before anything starts.
    #[test]
    fn azure_monitor_without_a_credential_needs_the_gateways_identity() {
        let monitor: gatehouse_audit::azure_monitor::AzureMonitorConfig =
            serde_json::from_value(serde_json::json!({
                "endpoint": "https://dce.example.ingest.monitor.azure.com",
                "dcr_immutable_id": "dcr-0123",
            }))
            .unwrap();
        let settings = AuditSettings {
            azure_monitor: Some(monitor),
            ..AuditSettings::default()
        };
        let error = check_audit_settings(&settings, false)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("server.audit.azure_monitor.credential")
                && error.contains("server.entra_credential"),
            "{error}"
        );
        check_audit_settings(&settings, true).unwrap();
    }

    /// A sink whose writes never end.
    struct Hanging;

    impl AuditSink for Hanging {
        fn write_batch<'a>(&'a self, _: &'a [AuditRecord]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(std::future::pending())
        }

        fn name(&self) -> &'static str {
            "hanging"
        }
    }

    /// A sink whose writes fail at once.
    struct Failing;

    impl AuditSink for Failing {
        fn write_batch<'a>(&'a self, _: &'a [AuditRecord]) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async { Err(SinkError::Io(std::io::Error::other("the store is down"))) })
        }

        fn name(&self) -> &'static str {
            "failing"
        }
    }

    /// A record of a call with id `id`.
    fn record(id: &str) -> AuditRecord {
        serde_json::from_value(serde_json::json!({
            "TimeGenerated": "2026-01-01T00:00:00Z", "CorrelationId": id, "GatewayId": "test",
            "CallerIpAddress": "127.0.0.1", "PeerIpAddress": "127.0.0.1", "Method": "POST",
            "Url": "/", "ClientProtocol": "HTTP/1.1", "ResponseCode": 200,
            "IsRequestSuccess": true, "RequestSize": 0, "ResponseSize": 0, "TotalTime": 0,
            "BackendTime": 0, "IsStreamCompletion": false, "RequestBodyTruncated": false,
            "ResponseBodyTruncated": false, "ClientAborted": false,
        }))
        .unwrap()
    }

    /// A writer without a journal retries a sink that never answers for ever: the flush gives up
    /// at its limit, and the process is to exit non-zero.
    #[tokio::test]
    async fn a_flush_that_does_not_end_in_time_is_an_error() {
        let (queue, writer) = AuditQueue::start(Arc::new(Hanging), 16);
        assert!(queue.submit(record("kept-in-memory")));
        drop(queue);
        let dir = tempfile::tempdir().unwrap();
        // Bounded, so that a flush without a limit fails the test instead of hanging it.
        let flushed = tokio::time::timeout(
            Duration::from_secs(20),
            flush_audit(writer, Duration::from_millis(200), dir.path()),
        )
        .await
        .expect("the flush gives up at its limit");
        let error = flushed.expect_err("records were lost");
        assert!(error.to_string().contains("not flushed"), "{error}");
    }

    /// Records that neither the sink nor the journal takes at shutdown are lost: the flush says
    /// so, and the process is to exit non-zero.
    #[tokio::test]
    async fn records_neither_stored_nor_journaled_are_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let journal_dir = dir.path().join("audit-journal");
        let settings = QueueSettings {
            journal_dir: Some(journal_dir.clone()),
            ..QueueSettings::default()
        };
        let (queue, writer) = AuditQueue::start_with(Arc::new(Failing), settings)
            .await
            .unwrap();
        // The journal's directory becomes a file: no segment can be made in it.
        std::fs::remove_dir_all(&journal_dir).unwrap();
        std::fs::write(&journal_dir, "not a directory").unwrap();
        assert!(queue.submit(record("lost")));
        drop(queue);
        let flushed = tokio::time::timeout(
            Duration::from_secs(20),
            flush_audit(writer, Duration::from_secs(15), &journal_dir),
        )
        .await
        .expect("the writer stops");
        let error = flushed.expect_err("the record was lost");
        assert!(
            error.to_string().contains("neither stored nor journaled"),
            "{error}"
        );
    }

    /// A flush that stores everything is no error.
    #[tokio::test]
    async fn a_flush_that_stores_everything_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        let sink = Arc::new(gatehouse_audit::MemorySink::default());
        let (queue, writer) = AuditQueue::start(sink.clone(), 16);
        assert!(queue.submit(record("stored")));
        drop(queue);
        flush_audit(writer, Duration::from_secs(15), dir.path())
            .await
            .unwrap();
        assert_eq!(sink.records().len(), 1);
    }
}

//! The `gatehouse-gateway` command.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use gatehouse_audit::{AuditQueue, JsonLinesSink};
use gatehouse_gateway::settings::LogFormat;
use gatehouse_gateway::{ConfigFile, Gateway, GatewayParts, auth, runtime, secret, server};

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
            runtime::Runtime::build(file.snapshot, &Default::default())
                .map_err(|errors| anyhow::anyhow!("{}: {errors}", config.display()))?;
            write_lines(&["configuration is valid"])
        }
        Command::Serve { config } => {
            let file = ConfigFile::load(&config)?;
            init_logging(file.server.log_format);
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve(file))
        }
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(file: ConfigFile) -> anyhow::Result<()> {
    let settings = file.server;
    let (audit, writer) = match &settings.audit.jsonl {
        Some(path) => {
            let sink = JsonLinesSink::open(path)
                .await
                .with_context(|| format!("opening audit file {}", path.display()))?;
            let (queue, writer) = AuditQueue::start(Arc::new(sink), settings.audit.queue_capacity);
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
        audit,
    })
    .await?;
    let (listening, task) =
        server::spawn(Arc::clone(&gateway), settings.listen, settings.tls.clone()).await?;
    tracing::info!(
        addr = %listening.addr,
        tls = settings.tls.is_some(),
        version = gateway.runtime().snapshot.version,
        "gatehouse gateway listening"
    );
    server::shutdown_signal().await;
    tracing::info!(
        drain_seconds = settings.shutdown_drain_seconds,
        "shutting down; draining in-flight calls"
    );
    listening.shutdown(Duration::from_secs(settings.shutdown_drain_seconds));
    task.await??;
    // Every response is finished, so every record is queued; flush them.
    drop(gateway);
    if let Some(writer) = writer {
        writer.finish().await;
    }
    tracing::info!("stopped");
    Ok(())
}

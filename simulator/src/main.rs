//! `gatehouse-simulator`: runs one simulator instance until Ctrl-C (or SIGTERM).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use gatehouse_simulator::{Simulator, SimulatorConfig};
use tracing_subscriber::EnvFilter;

/// Gatehouse SIMULATOR: an OpenAI / Azure OpenAI compatible backend that returns deterministic,
/// simulated answers (it is not a model). For first runs without Azure and for tests.
///
/// Control routes: POST /_simulator/fault with {"kind":"throttle","retry_after_ms":2000,"times":1},
/// {"kind":"server_error","status":500}, {"kind":"break_stream_after","chunks":3},
/// {"kind":"stall_stream_after","chunks":3} or {"kind":"none"}; GET /_simulator/stats.
#[derive(Debug, Parser)]
#[command(name = "gatehouse-simulator", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the log says which).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// Simulator id: sent in the x-gatehouse-simulator header and part of every object id.
    #[arg(long, default_value = "sim")]
    id: String,
    /// Milliseconds between the content chunks of a streamed answer.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Content chunks per streamed answer.
    #[arg(long, default_value_t = 5)]
    stream_chunks: usize,
    /// Name of an environment variable holding the key every request must carry
    /// (api-key or Authorization: Bearer). Without it, any key or none is accepted.
    #[arg(long, value_name = "NAME")]
    api_key_env: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let require_api_key = match &args.api_key_env {
        Some(name) => Some(
            std::env::var(name)
                .ok()
                .filter(|key| !key.is_empty())
                .with_context(|| format!("--api-key-env {name}: the variable is unset or empty"))?,
        ),
        None => None,
    };
    let config = SimulatorConfig {
        id: args.id,
        chunk_delay: Duration::from_millis(args.chunk_delay_ms),
        stream_chunks: args.stream_chunks,
        require_api_key,
        require_bearer_prefix: None,
    };
    let simulator = Simulator::start(config, args.listen).await?;
    stop_signal().await?;
    tracing::info!("gatehouse simulator shutting down");
    simulator.shutdown().await;
    Ok(())
}

/// Resolves on Ctrl-C, or on SIGTERM where there is one.
async fn stop_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("could not listen for SIGTERM")?;
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => interrupted.context("could not listen for Ctrl-C"),
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("could not listen for Ctrl-C")
    }
}

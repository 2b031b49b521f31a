//! Starting, reaching and stopping a simulator instance on a socket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::SimulatorConfig;
use crate::fault::Fault;
use crate::routes;
use crate::state::{SeenRequest, SimulatorState};

/// How long [`RunningSimulator::shutdown`] waits for open connections before cutting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Entry point: an OpenAI / Azure OpenAI compatible **simulator** (simulated answers, not a model).
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (port 0 picks a free port) and serves the simulator on it in the background.
    pub async fn start(
        config: SimulatorConfig,
        addr: SocketAddr,
    ) -> anyhow::Result<RunningSimulator> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("simulator could not listen on {addr}"))?;
        Self::serve(SimulatorState::new(config), listener)
    }

    /// Serves the simulator on a listener the caller bound, with the given state.
    pub fn serve(state: SimulatorState, listener: TcpListener) -> anyhow::Result<RunningSimulator> {
        let addr = listener
            .local_addr()
            .context("simulator could not read its listening address")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Self::router(state.clone());
        let id = state.config().id.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    // Resolves on an explicit stop and when every handle is dropped.
                    let _ = stopped.await;
                })
                .await;
            if let Err(error) = served {
                tracing::error!(simulator = %id, %error, "simulator stopped with an error");
            }
        });
        let running = RunningSimulator {
            state,
            addr,
            server: Arc::new(ServerHandle {
                stop: Mutex::new(Some(stop)),
                task: Mutex::new(Some(task)),
            }),
        };
        tracing::info!(
            simulator = %running.state.config().id,
            url = %running.url(),
            "gatehouse simulator listening (simulated answers, not a model)"
        );
        Ok(running)
    }

    /// The simulator's routes over `state`, for in-process use as a `tower::Service` without a
    /// socket.
    pub fn router(state: SimulatorState) -> Router {
        routes::router(state)
    }
}

/// A simulator serving on a socket. Clones share the instance; the server stops on
/// [`RunningSimulator::shutdown`] or when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct RunningSimulator {
    state: SimulatorState,
    addr: SocketAddr,
    server: Arc<ServerHandle>,
}

#[derive(Debug)]
struct ServerHandle {
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl RunningSimulator {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, `http://127.0.0.1:PORT` (a wildcard listen address is given as loopback).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// Its configured id, as sent in `x-gatehouse-simulator`.
    pub fn id(&self) -> &str {
        &self.state.config().id
    }

    /// Requests answered, `/_simulator` control routes not counted.
    pub fn hits(&self) -> u64 {
        self.state.hits()
    }

    /// Every request seen (the last [`crate::SEEN_REQUESTS_KEPT`]), oldest first.
    pub fn requests(&self) -> Vec<SeenRequest> {
        self.state.requests()
    }

    /// Switches the fault in force.
    pub fn set_fault(&self, fault: Fault) {
        self.state.set_fault(fault);
    }

    /// The fault in force (a counted fault reverts to [`Fault::None`] once used up).
    pub fn fault(&self) -> Fault {
        self.state.fault()
    }

    /// The shared state, for what the methods above do not cover.
    pub fn state(&self) -> &SimulatorState {
        &self.state
    }

    /// Stops accepting, lets open requests finish (at most a few seconds), then returns.
    pub async fn shutdown(self) {
        let stop = self
            .server
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
        let task = self
            .server
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
        {
            tracing::warn!(simulator = %self.id(), "simulator connections still open; cutting them");
            task.abort();
        }
        tracing::info!(simulator = %self.id(), "gatehouse simulator stopped");
    }
}

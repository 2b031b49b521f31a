//! Gatehouse **simulator**: an OpenAI- and Azure OpenAI-compatible backend that returns
//! deterministic, simulated answers. It is not a model.
//!
//! It serves two purposes:
//! - the backend the product's run command starts, so a first call works without Azure;
//! - the stub upstream of the gateway's integration tests, run in-process: each instance has a
//!   stable id (sent back in the `x-gatehouse-simulator` header and embedded in every object id
//!   it creates), counts its hits, records the requests it saw, and can be told to fail
//!   ([`Fault`]).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use gatehouse_simulator::{Fault, RetryHint, Simulator, SimulatorConfig};
//!
//! let sim = Simulator::start(
//!     SimulatorConfig { id: "sim-a".into(), ..SimulatorConfig::default() },
//!     "127.0.0.1:0".parse()?,
//! )
//! .await?;
//! sim.set_fault(Fault::Throttle { hint: RetryHint::RetryAfterMs(2000), times: Some(1) });
//! // … call sim.url() …
//! assert_eq!(sim.hits(), 0);
//! sim.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! Routes: see [`Simulator::router`] and the table in the `routes` module: OpenAI style `/v1/…`,
//! Azure v1 `/openai/v1/…`, Azure classic `/openai/deployments/{deployment}/…?api-version=` and
//! `/openai/{files,batches,…}?api-version=`; control routes `POST /_simulator/fault`,
//! `GET /_simulator/stats`.

mod answer;
mod config;
mod control;
mod error;
mod fault;
mod inference;
mod objects;
mod observe;
mod request;
mod routes;
mod server;
mod sse;
mod state;

pub use config::SimulatorConfig;
pub use fault::{Fault, RetryHint};
pub use observe::SIMULATOR_HEADER;
pub use server::{RunningSimulator, Simulator};
pub use state::{SEEN_REQUESTS_KEPT, SeenRequest, SimulatorState};

//! What one simulator instance remembers: its settings, the requests it saw, the fault in force
//! and the objects it created.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::config::SimulatorConfig;
use crate::fault::{Fault, FaultSwitch};
use crate::objects::ObjectStore;

/// How many requests [`SimulatorState::requests`] keeps; older ones are forgotten so a
/// long-running simulator does not grow without bound.
pub const SEEN_REQUESTS_KEPT: usize = 10_000;

/// One request as the simulator received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenRequest {
    /// HTTP method, e.g. `"POST"`.
    pub method: String,
    /// Path with query, e.g. `"/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"`.
    pub path: String,
    /// Headers in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The request body, exactly as received.
    pub body: Bytes,
}

impl SeenRequest {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// Shared state of one simulator instance; cheap to clone. It is the axum state of
/// [`crate::Simulator::router`], so a test can also drive the router in-process.
#[derive(Clone, Debug)]
pub struct SimulatorState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: SimulatorConfig,
    /// Prefix of every id this instance makes: the configured id plus a random tag, so two
    /// instances configured with the same id still never share an object id.
    id_prefix: String,
    hits: AtomicU64,
    next_serial: AtomicU64,
    seen: Mutex<VecDeque<SeenRequest>>,
    fault: Mutex<FaultSwitch>,
    objects: Mutex<ObjectStore>,
}

impl SimulatorState {
    /// Fresh state: no requests seen, no fault, no objects.
    pub fn new(config: SimulatorConfig) -> Self {
        let id_part: String = config
            .id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let random = uuid::Uuid::new_v4().simple().to_string();
        let id_prefix = format!("{id_part}-{}", &random[..8]);
        Self {
            inner: Arc::new(Inner {
                config,
                id_prefix,
                hits: AtomicU64::new(0),
                next_serial: AtomicU64::new(1),
                seen: Mutex::new(VecDeque::new()),
                fault: Mutex::new(FaultSwitch::default()),
                objects: Mutex::new(ObjectStore::default()),
            }),
        }
    }

    /// The settings this instance runs with.
    pub fn config(&self) -> &SimulatorConfig {
        &self.inner.config
    }

    /// Requests answered so far, control routes (`/_simulator/…`) not counted. Every request
    /// counts, whatever its answer (faults, 401, 404 included).
    pub fn hits(&self) -> u64 {
        self.inner.hits.load(Ordering::SeqCst)
    }

    /// The requests seen so far, oldest first (the last [`SEEN_REQUESTS_KEPT`]).
    pub fn requests(&self) -> Vec<SeenRequest> {
        lock(&self.inner.seen).iter().cloned().collect()
    }

    /// Switches the fault in force.
    pub fn set_fault(&self, fault: Fault) {
        tracing::info!(simulator = %self.inner.config.id, ?fault, "simulator fault set");
        lock(&self.inner.fault).set(fault);
    }

    /// The fault in force.
    pub fn fault(&self) -> Fault {
        lock(&self.inner.fault).current().clone()
    }

    /// Counts and keeps one request.
    pub(crate) fn record(&self, request: SeenRequest) {
        self.inner.hits.fetch_add(1, Ordering::SeqCst);
        let mut seen = lock(&self.inner.seen);
        if seen.len() == SEEN_REQUESTS_KEPT {
            seen.pop_front();
        }
        seen.push_back(request);
    }

    /// The fault switch, locked.
    pub(crate) fn fault_switch(&self) -> MutexGuard<'_, FaultSwitch> {
        lock(&self.inner.fault)
    }

    /// The objects this instance created, locked.
    pub(crate) fn objects(&self) -> MutexGuard<'_, ObjectStore> {
        lock(&self.inner.objects)
    }

    /// A new id unique to this instance: `{prefix}{sep}{instance id}-{tag}-{serial}`, e.g.
    /// `file-sim-a-1f2e3d4c-7`.
    pub(crate) fn new_id(&self, prefix: &str, separator: char) -> String {
        let serial = self.inner.next_serial.fetch_add(1, Ordering::SeqCst);
        format!("{prefix}{separator}{}-{serial}", self.inner.id_prefix)
    }
}

/// Seconds since the Unix epoch, for `created` fields.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Locks a mutex; a panic in another holder does not make the data unusable here.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

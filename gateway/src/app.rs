//! The gateway: shared state and the HTTP surface.
//!
//! Unauthenticated routes are the short list in [`OPEN_ROUTES`]; everything else is a model call
//! and goes through the pipeline in [`crate`]'s documentation, in [`serve_call`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use gatehouse_audit::{AuditQueue, RecordSlot};
use gatehouse_schema::{AuditRecord, ConfigSnapshot};
use http::request::Parts;
use time::OffsetDateTime;
use tracing::Instrument;

use crate::affinity::{AffinityMap, SharedAffinity};
use crate::auth::Principal;
use crate::client_gone::ToCompletion;
use crate::entra_credential::TokenCredential;
use crate::error::GatewayError;
use crate::in_flight::CallsInFlight;
use crate::key_vault::KeyVaultClient;
use crate::limits::{self, Admission, LimitSubject, Limiter, Renaming};
use crate::metrics::{
    BackendCertificateLabels, BackendLabels, CallLabels, Metrics, OperationLabels, TokenLabels,
};
use crate::pool::{HealthRegistry, Pool};
use crate::record::{CallRecord, Holds};
use crate::runtime::Resolver;
use crate::runtime::{Runtime, ValidationErrors};
use crate::secret::Secret;
use crate::secret::{SecretCheckpoint, SecretStore};
use crate::secret_policy::SecretRefPolicy;
use crate::settings::{AffinitySettings, LimitSettings};
use crate::{admin, auth, authorize, caller, classify, proxy};

/// Routes served without a subscription key.
pub const OPEN_ROUTES: &[&str] = &["/healthz", "/readyz", "/metrics"];

/// Everything a running gateway shares between requests.
#[derive(Debug)]
pub struct Gateway {
    /// Name of this instance.
    pub id: String,
    runtime: ArcSwap<Runtime>,
    health: HealthRegistry,
    resolver: Resolver,
    entra_credential: Option<TokenCredential>,
    /// Object → member map for stateful calls.
    pub affinity: AffinityMap,
    audit: Option<AuditQueue>,
    /// Metrics.
    pub metrics: Metrics,
    pub(crate) admin_token: Option<Secret<String>>,
    pub(crate) admin_signed_only: bool,
    pub(crate) state_dir: PathBuf,
    pub(crate) config_writes: tokio::sync::Mutex<()>,
    access_log: bool,
    /// How long clients may take to send a call.
    pub client_timeouts: ClientTimeouts,
    /// Gives up HTTP/2 answers whose client leaves the stream's window closed.
    pub(crate) stall_watch: crate::stream_window::StallWatch,
    /// Validates Entra ID tokens (signing keys and Graph answers are cached across snapshots).
    pub tokens: crate::entra::TokenValidator,
    /// Usage-limit counters.
    pub limiter: Limiter,
    /// Background responses and runs whose work goes on after their call.
    pub(crate) deferred: crate::deferred_work::DeferredWork,
    /// The calls that have not handed their records on yet; a shutdown waits for them.
    pub calls: CallsInFlight,
    /// Counts the runtimes installed after the first: sessions that outlive a call (the Realtime
    /// API's) watch it to judge their caller again under each new snapshot.
    installs: tokio::sync::watch::Sender<u64>,
    /// Where each member stands after the pages of merged lists (`crate::list_merge`).
    pub(crate) list_cursors: crate::list_merge::ListCursors,
    /// Set when the process was asked to stop: `/readyz` answers 503 from then on.
    stopping: std::sync::atomic::AtomicBool,
    /// Whether `/readyz` answers 200 while the gateway runs on its file's snapshot because the
    /// newer last-known-good one could not be built (`server.ready_on_config_fallback`).
    ready_on_config_fallback: bool,
}

/// How to build a [`Gateway`].
#[derive(Debug)]
pub struct GatewayParts {
    /// Instance name.
    pub id: String,
    /// The snapshot to start on (the last-known-good one is preferred when newer and it builds).
    pub snapshot: ConfigSnapshot,
    /// State directory.
    pub state_dir: PathBuf,
    /// Admin token for the config endpoint.
    pub admin_token: Option<Secret<String>>,
    /// Whether admin requests must be signed with the token (no `Authorization: Bearer`).
    pub admin_signed_only: bool,
    /// Where audit records go.
    pub audit: Option<AuditQueue>,
    /// Whether every call writes a log line (the audit record holds the same and more).
    pub access_log: bool,
    /// Where usage-limit counters live.
    pub limits: LimitSettings,
    /// Where the map of stateful objects to members is shared with other replicas.
    pub affinity: AffinitySettings,
    /// The gateway's own Entra credential and how Key Vault secrets are kept.
    pub secrets: SecretSettings,
    /// How long clients may take to send a call.
    pub client_timeouts: ClientTimeouts,
    /// Whether `/readyz` answers 200 on the file's snapshot when the newer last-known-good one
    /// could not be built or read (`server.ready_on_config_fallback`).
    pub ready_on_config_fallback: bool,
}

/// How long a client may take to send a call, and to take its answer, so that connections that
/// send or read slowly or not at all (slowloris, slow reads) do not hold the gateway's connections
/// and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// HTTP/1.1: the time to send a request's head (request line and headers), counted from when
    /// the gateway starts waiting for it, so a kept-alive connection idle this long between calls
    /// is closed as well. HTTP/2: a connection from which nothing has arrived this long is pinged,
    /// and closed when the ping is not answered within the same time again. Any connection must
    /// send its first byte within it.
    pub request_head: Duration,
    /// The longest pause while the request body arrives; the call is then answered 408 and goes
    /// to no backend.
    pub request_body: Duration,
    /// The longest a client may leave the gateway's answer untaken before the gateway gives up
    /// on it; the call's record is completed from the backend and marked client-aborted. On an
    /// HTTP/1.1 connection (the connection's buffers full, the gateway unable to write) the
    /// connection is closed; on HTTP/2 (the stream's flow-control window closed) the stream is
    /// reset and the connection's other streams go on. A Realtime session's client that leaves
    /// an event untaken this long (or a member that does) ends the session.
    pub send: Duration,
    /// The longest a Realtime session may pass no event either way, nor a ping or pong of the
    /// client's (the member's own say nothing of the client);
    /// it is then closed on both sides (1001, going away), so that a client gone without closing
    /// its connection does not hold a member's session.
    pub realtime_idle: Duration,
}

impl Default for ClientTimeouts {
    /// 60 s each, and 600 s for an idle Realtime session.
    fn default() -> Self {
        ClientTimeouts {
            request_head: Duration::from_secs(60),
            request_body: Duration::from_secs(60),
            send: Duration::from_secs(60),
            realtime_idle: Duration::from_secs(600),
        }
    }
}

/// The gateway's own Entra identity (it reads Key Vault secrets, and is there for other outbound
/// calls such as Microsoft Graph) and how often Key Vault values are fetched again.
#[derive(Debug, Clone)]
pub struct SecretSettings {
    /// The gateway's own credential; without it, Key Vault references are refused.
    pub entra_credential: Option<TokenCredential>,
    /// How often every Key Vault value in use is fetched again (a rotated secret takes effect
    /// within this time).
    pub key_vault_refresh: Duration,
    /// Which secret references a snapshot may name.
    pub snapshot_refs: SecretRefPolicy,
}

impl Default for SecretSettings {
    fn default() -> Self {
        SecretSettings {
            entra_credential: None,
            key_vault_refresh: Duration::from_secs(300),
            snapshot_refs: SecretRefPolicy::default(),
        }
    }
}

/// What `gatehouse_config_last_known_good_refused` holds when not even the version of the saved
/// snapshot could be read: the largest value the exposition takes.
const UNREADABLE_VERSION: u64 = i64::MAX.unsigned_abs();

/// The paths [`Gateway::router`] has routes for; every other path is a model call.
pub const ROUTED_PATHS: [&str; 5] = [
    "/healthz",
    "/readyz",
    "/metrics",
    admin::CONFIG_PATH,
    gatehouse_schema::backends::BACKENDS_PATH,
];

impl Gateway {
    /// Builds a gateway; fails when the snapshot it starts on is invalid (a last-known-good one
    /// that no longer builds gives way to the file's) or the state directory unusable.
    pub async fn new(parts: GatewayParts) -> anyhow::Result<Arc<Gateway>> {
        let health = HealthRegistry::default();
        let key_vault = parts
            .secrets
            .entra_credential
            .clone()
            .map(KeyVaultClient::new);
        let has_key_vault = key_vault.is_some();
        let resolver = Resolver {
            secrets: SecretStore::new(key_vault),
            credentials: Arc::default(),
            policy: Arc::new(parts.secrets.snapshot_refs.clone()),
            clients: Arc::default(),
        };
        let metrics = Metrics::default();
        let saved = match admin::load_last_known_good(&parts.state_dir).await? {
            admin::LastKnownGood::Saved(saved) => Some(*saved),
            admin::LastKnownGood::None => None,
            admin::LastKnownGood::Unreadable(version) => {
                // Refused as one that cannot be built is: the gauge says so.
                metrics
                    .last_known_good_refused
                    .set(version.unwrap_or(UNREADABLE_VERSION));
                None
            }
        }
        .filter(|saved| saved.version > parts.snapshot.version);
        let runtime = start_runtime(saved, parts.snapshot, &health, &resolver, &metrics).await?;
        if has_key_vault {
            // Stops by itself when the gateway (and with it the store) is dropped.
            resolver
                .secrets
                .spawn_refresher(parts.secrets.key_vault_refresh);
        }
        let affinity = AffinityMap::open(
            &parts.state_dir,
            SharedAffinity::new(&parts.affinity, metrics.affinity_store_errors.clone())?,
        )
        .await?;
        let identity_client = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(15))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let tokens = crate::entra::TokenValidator::new(
            identity_client.clone(),
            crate::entra::graph::GroupResolver::new(
                identity_client,
                parts.secrets.entra_credential.clone().map(
                    |credential| -> Arc<dyn crate::entra::graph::AccessTokenSource> {
                        Arc::new(credential)
                    },
                ),
            ),
        );
        let limiter = Limiter::new(&parts.limits, metrics.limit_store_errors.clone())?;
        let deferred = crate::deferred_work::DeferredWork::new(&parts.limits)?;
        Ok(Arc::new(Gateway {
            id: parts.id,
            runtime: ArcSwap::from_pointee(runtime),
            health,
            resolver,
            entra_credential: parts.secrets.entra_credential,
            affinity,
            audit: parts.audit,
            metrics,
            admin_token: parts.admin_token,
            admin_signed_only: parts.admin_signed_only,
            state_dir: parts.state_dir,
            config_writes: tokio::sync::Mutex::new(()),
            access_log: parts.access_log,
            client_timeouts: parts.client_timeouts,
            stall_watch: crate::stream_window::StallWatch::new(parts.client_timeouts.send),
            tokens,
            limiter,
            deferred,
            calls: CallsInFlight::default(),
            installs: tokio::sync::watch::Sender::new(0),
            list_cursors: crate::list_merge::ListCursors::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            ready_on_config_fallback: parts.ready_on_config_fallback,
        }))
    }

    /// Marks the gateway as stopping: `/readyz` answers 503 from now on, so that a load balancer
    /// sends new calls elsewhere while this one still serves them (`server.shutdown_delay_seconds`).
    pub fn begin_shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The runtime now in force.
    pub fn runtime(&self) -> Arc<Runtime> {
        self.runtime.load_full()
    }

    /// The gateway's own Entra credential (`server.entra_credential`), for outbound calls such as
    /// Key Vault or Microsoft Graph.
    pub fn entra_credential(&self) -> Option<&TokenCredential> {
        self.entra_credential.as_ref()
    }

    /// Validates a snapshot, fetches its Key Vault secrets and builds its runtime without
    /// installing it. `env:` and `file:` secrets are read again into the holders the running
    /// configuration shares (a rotated key file takes effect with the next snapshot); a snapshot
    /// refused here puts them back, and so must [`Gateway::abandon`] one that is not installed.
    pub(crate) async fn prepare(
        &self,
        snapshot: ConfigSnapshot,
    ) -> Result<(Runtime, SecretCheckpoint), ValidationErrors> {
        let checkpoint = self.resolver.secrets.checkpoint();
        match Runtime::prepare(snapshot, &self.health, &self.resolver).await {
            Ok(runtime) => Ok((runtime, checkpoint)),
            Err(errors) => {
                self.resolver.secrets.restore(checkpoint);
                Err(errors)
            }
        }
    }

    /// Puts back the secrets of the running configuration after a prepared snapshot that is not
    /// installed (its last-known-good copy could not be written).
    pub(crate) fn abandon(&self, checkpoint: SecretCheckpoint) {
        self.resolver.secrets.restore(checkpoint);
    }

    /// Installs a prepared runtime atomically, and forgets secrets and credentials it no longer
    /// uses.
    pub(crate) fn install(&self, runtime: Runtime) {
        self.metrics.config_version.set(runtime.snapshot.version);
        // The pushed snapshot replaced the last-known-good one that could not be built.
        self.metrics.last_known_good_refused.set(0);
        self.swap_in(runtime);
    }

    /// Builds new clients for the members of the running snapshot whose TLS files (a private
    /// CA, a client certificate and key) read otherwise than when their clients were built, as
    /// when a certificate is renewed on disk, and swaps them in (`Runtime::with_renewed_clients`:
    /// nothing else is read again); members set aside as failing (their TLS handshakes refused)
    /// are tried again at once. `Ok(false)` when no file changed; an error naming the members
    /// whose files do not build (a certificate written half way), which keep their clients and
    /// are tried again at the next check, the other members' clients renewed all the same.
    pub async fn reload_backend_tls(&self) -> Result<bool, String> {
        // Not beside a push: one runtime replaces another at a time.
        let _guard = self.config_writes.lock().await;
        let current = self.runtime();
        let clients = Arc::clone(&self.resolver.clients);
        let (runtime, problems) =
            tokio::task::spawn_blocking(move || current.with_renewed_clients(&clients))
                .await
                .map_err(|error| error.to_string())?;
        self.metrics
            .backend_tls_reload_failing
            .set(u64::from(!problems.is_empty()));
        let renewed = runtime.is_some();
        if let Some(runtime) = runtime {
            self.swap_in(runtime);
        }
        if problems.is_empty() {
            Ok(renewed)
        } else {
            Err(problems.join("; "))
        }
    }

    fn swap_in(&self, mut runtime: Runtime) {
        self.resolver.retain_for(&runtime);
        // Tokens that passed under the previous identity policy are judged again, and calls still
        // on the previous runtime (waiting for room in the audit queue, say) do not remember
        // what they judge under it.
        runtime.policy_generation = self.tokens.next_policy_generation();
        self.runtime.store(Arc::new(runtime));
        self.installs.send_modify(|installed| *installed += 1);
    }

    /// Changes each time a runtime is installed (a pushed snapshot took effect).
    pub(crate) fn installs(&self) -> tokio::sync::watch::Receiver<u64> {
        self.installs.subscribe()
    }

    /// The HTTP router: the operational and admin routes ([`ROUTED_PATHS`]), and every other
    /// path as a model call. The server sends only [`ROUTED_PATHS`] through it and model calls
    /// straight to the call pipeline ([`Gateway::serve`]), which answers them the same.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(ready))
            .route("/metrics", get(metrics))
            .route(
                admin::CONFIG_PATH,
                get(admin::get_config).put(admin::put_config),
            )
            .route(
                gatehouse_schema::backends::BACKENDS_PATH,
                get(admin::get_backends),
            )
            .fallback(any(serve_call))
            .with_state(Arc::clone(self))
    }

    /// Serves a model call from `peer`: the router's fallback, without the router.
    pub async fn serve(self: Arc<Self>, peer: SocketAddr, request: Request) -> Response {
        serve_call(State(self), ConnectInfo(peer), request).await
    }

    /// Room for a call's record in the audit queue: while records come faster than the audit
    /// writer keeps them, calls wait here, so that none is lost. `None` without a queue, or when
    /// the queue has none to give.
    pub(crate) async fn record_room(&self) -> Option<RecordSlot> {
        match &self.audit {
            Some(queue) => queue.reserve().await.ok(),
            None => None,
        }
    }

    /// Does what a finished call's answer says about work that goes on after a call
    /// (`crate::deferred_work`), if anything, then [`Gateway::finish`]es the call:
    ///
    /// - work started (or continued by tool outputs) and not over: the call's reservation is
    ///   left for the call that will see the work end; when the object has an entry already
    ///   (a run waiting for tool outputs again), the run's reservation covers this call's work,
    ///   so its own is given back (and a create's entry takes the place of one that tool
    ///   outputs, answered first, left, whose reservation is given back);
    /// - work seen ended: the reservation left for it is settled with the usage the object
    ///   reports, which this call's record carries (with the deployment that ran it), and this
    ///   call's own reservation is given back.
    pub(crate) async fn finish_following(
        &self,
        mut record: AuditRecord,
        mut holds: Holds,
        follow: Option<crate::deferred_work::Follow>,
    ) {
        use crate::deferred_work::{Entry, Follow, Left};
        match follow {
            None => {}
            Some(Follow::Leave {
                id,
                deployment,
                starts,
            }) => {
                let entry = Entry {
                    reservation: holds.reservation.take(),
                    deployment,
                };
                match self.deferred.leave(&id, entry, starts).await {
                    Left::Kept { replaced } => {
                        // Tool outputs answered before the run's create left its entry: the
                        // run's reservation covers their work.
                        if let Some(reservation) = replaced.and_then(|entry| entry.reservation) {
                            self.limiter.reconcile(reservation, Some(0));
                        }
                    }
                    Left::Present(entry) => {
                        holds.reservation = entry.reservation;
                        holds.counted_with_deferred_work = true;
                    }
                    Left::Failed(entry) => holds.reservation = entry.reservation,
                }
            }
            Some(Follow::Ended { id, usage }) => {
                if let Some(entry) = self.deferred.take(&id).await {
                    if let Some(reservation) = entry.reservation {
                        self.limiter
                            .reconcile(reservation, usage.as_ref().map(|u| u.total_tokens));
                    }
                    holds.counted_with_deferred_work = true;
                    if record.usage.is_none() {
                        record.usage = usage;
                    }
                    if record.deployment_name.is_none() {
                        record.deployment_name = entry.deployment;
                    }
                }
            }
        }
        self.finish(record, holds);
    }

    /// Whether a call must be refused because it could not be recorded (fail closed, when so
    /// configured): the queue refuses calls, or the call got no room (`has_room`) in a queue set
    /// to fail closed.
    pub(crate) fn refuses_unrecorded(&self, has_room: bool) -> bool {
        self.audit
            .as_ref()
            .is_some_and(|queue| queue.refuses_calls() || (queue.fail_closed() && !has_room))
    }

    /// Counts a finished call, settles its token reservation with its usage, and hands its
    /// record to the audit queue — in the room the call took for it, never waiting.
    pub(crate) fn finish(&self, record: AuditRecord, holds: Holds) {
        if let Some(reservation) = holds.reservation {
            // Work counted with the deferred work it continued or ended used nothing of its own.
            let used = if holds.counted_with_deferred_work {
                Some(0)
            } else {
                limits::tokens_used(&record)
            };
            self.limiter.reconcile(reservation, used);
        }
        let operation = record
            .operation_id
            .map_or("unknown", |o| o.as_str())
            .to_owned();
        let runtime = self.runtime();
        let deployment = runtime
            .deployment_label(record.deployment_name.as_deref())
            .to_owned();
        self.metrics
            .requests
            .get_or_create(&CallLabels {
                operation: operation.clone(),
                deployment: deployment.clone(),
                backend: record
                    .backend_id
                    .clone()
                    .unwrap_or_else(|| "none".to_owned()),
                status: record.response_code,
            })
            .inc();
        let labels = OperationLabels { operation };
        self.metrics
            .duration
            .get_or_create(&labels)
            .observe(record.total_time as f64 / 1000.0);
        if let Some(first) = record.time_to_first_byte {
            self.metrics
                .first_byte
                .get_or_create(&labels)
                .observe(first as f64 / 1000.0);
        }
        if let Some(first) = record.time_to_first_token {
            self.metrics
                .first_token
                .get_or_create(&labels)
                .observe(first as f64 / 1000.0);
        }
        if let Some(usage) = record.usage {
            for (kind, count) in [
                ("prompt", usage.prompt_tokens),
                ("completion", usage.completion_tokens),
                ("cached", usage.cached_tokens),
                ("reasoning", usage.reasoning_tokens),
            ] {
                if count > 0 {
                    self.metrics
                        .tokens
                        .get_or_create(&TokenLabels {
                            deployment: deployment.clone(),
                            kind: kind.to_owned(),
                        })
                        .inc_by(count);
                }
            }
        }
        if self.access_log {
            log_call(&record);
        }
        match (holds.slot, &self.audit) {
            (Some(slot), _) => slot.submit(record),
            (None, Some(queue)) => {
                queue.submit(record);
            }
            (None, None) => {}
        }
    }
}

/// The runtime a gateway starts on: the last-known-good snapshot `saved` (newer than the
/// configuration file's, when given) if it can still be built, else the file's `snapshot`.
///
/// A pushed snapshot can stop building while the gateway is down: a `file:` or `env:` secret it
/// names was removed, Key Vault cannot be reached, `server.snapshot_secret_refs` was tightened.
/// Refusing to start would loop for ever, whatever the operator puts in the file; instead the
/// gateway says why and starts on the file's snapshot. The last-known-good file is left where it
/// is, for inspection and for the next start (a Key Vault outage passes); the next push replaces
/// it. `gatehouse_config_last_known_good_refused` holds its version until then.
async fn start_runtime(
    saved: Option<ConfigSnapshot>,
    snapshot: ConfigSnapshot,
    health: &HealthRegistry,
    resolver: &Resolver,
    metrics: &Metrics,
) -> anyhow::Result<Runtime> {
    let file_version = snapshot.version;
    let mut refused = None;
    if let Some(saved) = saved {
        let version = saved.version;
        let checkpoint = resolver.secrets.checkpoint();
        match Runtime::prepare(saved, health, resolver).await {
            Ok(runtime) => {
                tracing::info!(version, "starting on the last-known-good configuration");
                metrics.config_version.set(version);
                return Ok(runtime);
            }
            Err(errors) => {
                resolver.secrets.restore(checkpoint);
                // The problems name field paths and secret references, never a secret's value.
                tracing::error!(
                    version,
                    file_version,
                    problems = %errors,
                    "the last-known-good configuration could not be built; starting on the \
                     configuration file's snapshot (the last-known-good file is kept)"
                );
                metrics.last_known_good_refused.set(version);
                refused = Some((version, errors));
            }
        }
    }
    let runtime =
        Runtime::prepare(snapshot, health, resolver)
            .await
            .map_err(|e: ValidationErrors| match &refused {
                None => anyhow::anyhow!("invalid configuration: {e}"),
                Some((version, saved)) => anyhow::anyhow!(
                    "invalid configuration: {e} (and the last-known-good configuration, version \
                 {version}, could not be built either: {saved})"
                ),
            })?;
    // Secrets and credentials read for the refused snapshot alone are not kept (nor refreshed).
    resolver.retain_for(&runtime);
    metrics.config_version.set(runtime.snapshot.version);
    Ok(runtime)
}

/// The access-log line of a call.
fn log_call(record: &AuditRecord) {
    tracing::info!(
        operation = record.operation_id.map_or("unknown", |o| o.as_str()),
        deployment = record.deployment_name.as_deref().unwrap_or(""),
        backend = record.backend_id.as_deref().unwrap_or(""),
        status = record.response_code,
        attempts = record.attempts.len(),
        total_ms = record.total_time,
        caller_ip = %record.caller_ip_address,
        error = record.last_error_reason.as_deref().unwrap_or(""),
        "call finished"
    );
}

/// `/readyz`: 503 while the gateway cannot serve a model call — no pool configured, or, set to
/// fail closed, an audit store it cannot record into (every call would be refused; a load
/// balancer then sends them to a replica that can) — or once it was asked to stop; and, unless
/// `server.ready_on_config_fallback`, while it runs on its file's snapshot because the pushed one
/// it saved could not be built or read.
async fn ready(State(gateway): State<Arc<Gateway>>) -> Response {
    let refused = gateway.metrics.last_known_good_refused.get();
    if gateway.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response()
    } else if !gateway.ready_on_config_fallback && refused != 0 {
        let which = if refused == UNREADABLE_VERSION {
            "the last-known-good configuration cannot be read".to_owned()
        } else {
            format!("the last-known-good configuration (version {refused}) could not be built")
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "running on the configuration file's snapshot: {which} \
                 (server.ready_on_config_fallback is false; a push ends it)"
            ),
        )
            .into_response()
    } else if gateway.runtime().pools.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "no backend pool configured",
        )
            .into_response()
    } else if gateway
        .audit
        .as_ref()
        .is_some_and(|queue| queue.refuses_calls())
    {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "calls are refused: the audit store cannot record them (audit.fail_closed)",
        )
            .into_response()
    } else {
        "ready".into_response()
    }
}

async fn metrics(State(gateway): State<Arc<Gateway>>) -> Response {
    let text = gateway
        .metrics
        .scrape(|metrics| refresh_metrics(&gateway, metrics));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Sets the gauges read at scrape time: members' availability and the audit queue's state.
fn refresh_metrics(gateway: &Gateway, metrics: &crate::metrics::Metrics) {
    let now = Instant::now();
    // The members of the running snapshot only: one a newer snapshot removed is not reported
    // at its last state for ever.
    metrics.backend_available.clear();
    metrics.backend_tls_certificate_expiry.clear();
    for pool in &gateway.runtime().pools {
        for member in &pool.members {
            let available = i64::from(member.health.set_aside_state(now).is_none());
            metrics
                .backend_available
                .get_or_create(&BackendLabels {
                    pool: pool.id.clone(),
                    backend: member.config.id.clone(),
                })
                .set(available);
            let expiry = member.client.certificate_expiry();
            for (file, not_after) in [
                ("ca", expiry.ca),
                ("client_identity", expiry.client_identity),
            ] {
                if let Some(not_after) = not_after {
                    metrics
                        .backend_tls_certificate_expiry
                        .get_or_create(&BackendCertificateLabels {
                            pool: pool.id.clone(),
                            backend: member.config.id.clone(),
                            file: file.to_owned(),
                        })
                        .set(not_after);
                }
            }
        }
    }
    if let Some(queue) = &gateway.audit {
        let stats = queue.stats();
        metrics
            .audit_queue_depth
            .set(i64::try_from(stats.depth).unwrap_or(i64::MAX));
        metrics.audit_queue_bytes.set(stats.depth_bytes);
        Metrics::catch_up(&metrics.audit_rejected, stats.rejected);
        Metrics::catch_up(&metrics.audit_room_waits, stats.waited);
        Metrics::catch_up(&metrics.audit_write_errors, stats.write_errors);
        Metrics::catch_up(&metrics.audit_rows_left_out, stats.sink_rows_left_out);
        metrics.audit_journal_bytes.set(stats.journal_bytes);
        metrics.audit_journal_records.set(stats.journal_records);
        Metrics::catch_up(&metrics.audit_records_written, stats.written);
        Metrics::catch_up(
            &metrics.audit_journal_records_skipped,
            stats.journal_skipped,
        );
        Metrics::catch_up(&metrics.audit_journal_errors, stats.journal_errors);
        metrics.audit_sink_up.set(u64::from(stats.sink_up));
    }
}

/// One model call, through the pipeline.
async fn serve_call(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let runtime = gateway.runtime();
    let (parts, body) = request.into_parts();
    // 1. Request id: the record's CorrelationId is always the gateway's own, so that no client
    //    can make two calls share one (the store keeps one record per CorrelationId: a reused id
    //    would hide the second call). The client's own id is echoed and passed on.
    let correlation_id = uuid::Uuid::now_v7().to_string();
    let client_request_id = client_request_id(&parts);
    let echoed_id = HeaderValue::from_str(
        client_request_id
            .as_deref()
            .unwrap_or(correlation_id.as_str()),
    );
    // 2. Caller address.
    let caller = caller::resolve(peer, &parts.headers, &runtime.snapshot.trusted_proxies);
    // At the error level, so that a warning or an error inside the call names its request id
    // whatever level the logs are filtered to (`RUST_LOG=warn`).
    let span = tracing::error_span!(
        "call",
        request_id = %correlation_id,
        client_request_id = tracing::field::Empty
    );
    if let Some(id) = &client_request_id {
        span.record("client_request_id", id.as_str());
    }
    let record = CallRecord::new(
        &gateway.id,
        &correlation_id,
        client_request_id,
        &parts,
        caller,
        started,
    );
    // The Realtime API is a WebSocket session, relayed by its own module.
    if let Some(style) = crate::classify::realtime_style(parts.uri.path()) {
        drop(body);
        // A client that leaves during the handshake (while a member's side opens) still gets
        // its record, as any call's client does.
        let gone = record.client_gone.clone();
        let in_flight = gateway.calls.enter();
        let session = crate::realtime::serve(gateway, style, parts, record).instrument(span);
        let mut response = ToCompletion::new(session, gone, in_flight).await;
        if let Ok(value) = echoed_id {
            response.headers_mut().insert("x-request-id", value);
        }
        if let Ok(value) = HeaderValue::from_str(&correlation_id) {
            response.headers_mut().insert(CORRELATION_ID_HEADER, value);
        }
        return response;
    }
    let gone = record.client_gone.clone();
    let in_flight = gateway.calls.enter();
    let call = async move {
        let mut record = Some(record);
        // Boxed where it is made: the pipeline's future is the call's largest (it holds the
        // proxy's), and every future around it is moved as it is built and wrapped (here into
        // its span and `ToCompletion`); those moves copy a pointer, not the pipeline's bytes.
        match Box::pin(pipeline(&gateway, runtime, &parts, body, &mut record)).await {
            Ok(response) => response,
            Err(error) => {
                if let Some(mut record) = record.take() {
                    let holds = record.take_holds();
                    gateway.finish(record.finish_error(&error), holds);
                }
                error.into_response()
            }
        }
    };
    // Should the client leave before the answer's head, the call is finished on a task of its
    // own.
    let mut response = ToCompletion::new(call.instrument(span), gone, in_flight).await;
    if let Ok(value) = echoed_id {
        response.headers_mut().insert("x-request-id", value);
    }
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        response.headers_mut().insert(CORRELATION_ID_HEADER, value);
    }
    response
}

/// The response header that names the call's `CorrelationId` in the audit store.
pub const CORRELATION_ID_HEADER: &str = "x-gatehouse-correlation-id";

async fn pipeline(
    gateway: &Arc<Gateway>,
    runtime: Arc<Runtime>,
    parts: &Parts,
    body: Body,
    record: &mut Option<CallRecord>,
) -> Result<Response, GatewayError> {
    let slot = gateway.record_room().await;
    let has_slot = slot.is_some();
    if let Some(record) = record.as_mut() {
        record.holds.slot = slot;
    }
    // 3. Authenticate, before reading a byte of the body.
    let principal = authenticate(gateway, &runtime, parts).await?;
    if let Some(record) = record.as_mut() {
        record.principal(&principal);
    }
    if gateway.refuses_unrecorded(has_slot) {
        return Err(GatewayError::AuditUnavailable);
    }
    // The body, bounded; buffered so that a failed attempt can be replayed on another member.
    let reading = Instant::now();
    let body = read_body(
        parts,
        body,
        runtime.snapshot.max_request_body_bytes,
        gateway.client_timeouts.request_body,
    )
    .await?;
    if let Some(record) = record.as_mut() {
        record.waited += reading.elapsed();
        record.record.request_size = body.len() as u64;
    }
    // A push applied while the call waited for room in the audit queue or for its body (which
    // may take minutes, a pause at a time) judges it: the call goes on wholly under the runtime
    // now in force, its caller authenticated again against that runtime's keys and identity
    // settings, so that a subscription revoked or a rule removed by a push answered 200 stops the
    // calls still arriving. It never mixes the two: everything below reads one runtime.
    let (runtime, principal) = match gateway.runtime() {
        current if Arc::ptr_eq(&current, &runtime) => (runtime, principal),
        current => {
            let principal = authenticate(gateway, &current, parts).await?;
            if let Some(record) = record.as_mut() {
                record.principal(&principal);
            }
            let limit = current.snapshot.max_request_body_bytes;
            if body.len() as u64 > limit {
                return Err(GatewayError::BodyTooLarge { limit });
            }
            (current, principal)
        }
    };
    let runtime = &*runtime;
    let capture_limit = runtime.snapshot.capture.max_request_body_bytes;
    // 4. Classify.
    let call = classify::classify(
        &parts.method,
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
        &body,
    )?;
    if let Some(record) = record.as_mut() {
        record.call(&call);
        record.response_capture_limit = runtime.snapshot.capture.max_response_body_bytes;
        if capture_limit > 0 && call.body_kind != classify::BodyKind::Multipart {
            let mut capture = crate::capture::BodyCapture::new(capture_limit);
            // The record's copy leaves out the credentials a body carries for a service the
            // model calls (`data_sources`, an MCP tool's headers); the member gets them.
            // The tree's copy, even when nothing in it was replaced: the bytes may give a member
            // twice, and hold in the copy the tree dropped what the tree's copy does not show.
            if call.peek.as_ref().is_some_and(|peek| peek.credentials) {
                if let Some(copy) = call.json().and_then(crate::body_credentials::record_copy) {
                    capture.push(&copy);
                }
            } else {
                capture.push(&body);
            }
            record.record.request_body_truncated = capture.truncated();
            record.record.backend_request_body = capture.into_text();
        }
        // Metadata-only capture (limit 0) keeps no prompt either.
        if capture_limit > 0 {
            record.record.request_messages = crate::capture::within_limit(
                crate::capture::request_messages(&call),
                capture_limit,
            );
        }
    }
    // 5. Authorize.
    authorize::authorize(runtime.snapshot.access_rules.as_deref(), &principal, &call)?;
    // 6. Limit: reserve the call's request and tokens, or refuse it before any backend sees it.
    let mut admission = limit(gateway, runtime, &principal, &call).await?;
    if let Some(record) = record.as_mut() {
        record.holds.reservation = admission.take_reservation();
    }
    // 7–9. Route, proxy, capture.
    let mut response =
        proxy::forward(gateway, runtime, &principal, call, parts, body, record).await?;
    admission.write_headers(response.headers_mut());
    Ok(response)
}

/// Step 3: the caller, by the keys and identity settings of `runtime`.
pub(crate) async fn authenticate(
    gateway: &Gateway,
    runtime: &Runtime,
    parts: &Parts,
) -> Result<Principal, GatewayError> {
    auth::authenticate(
        &runtime.keys,
        &runtime.snapshot.identity,
        runtime.policy_generation,
        &gateway.tokens,
        &parts.headers,
        parts.uri.query(),
        OffsetDateTime::now_utc(),
    )
    .await
}

/// Step 6: the usage limits of the snapshot, for calls a pool serves and for calls that run a
/// model without naming a deployment a pool serves (a Responses call continuing a stored
/// response, which goes to the member that holds it); any other call is answered 404 without
/// reaching a backend, and costs nothing.
pub(crate) async fn limit(
    gateway: &Gateway,
    runtime: &Runtime,
    principal: &Principal,
    call: &classify::Call,
) -> Result<Admission, GatewayError> {
    let rules = &runtime.snapshot.limits;
    if rules.is_empty() {
        return Ok(Admission::default());
    }
    let pool = runtime.pool_for(call.deployment.as_deref());
    // A deployment no pool serves is answered 404 when the call is routed, whatever objects it
    // names (see `proxy::target`): it charges no counter, and makes none for an invented name.
    if pool.is_none() && (call.deployment.is_some() || !call.operation.is_inference()) {
        return Ok(Admission::default());
    }
    let runs = renamed_runs(pool);
    gateway
        .limiter
        .admit_call(
            rules,
            &LimitSubject::of(principal),
            call,
            renaming(pool, &runs),
        )
        .await
        .map_err(|refusal| {
            gateway.metrics.limit_refused(&refusal);
            GatewayError::Limit(refusal)
        })
}

/// Charges `tokens` that `call` used without a reservation (a response a Realtime member started
/// by itself) to the caller's token counters under the snapshot's rules: refuses nothing, the
/// work is done.
pub(crate) async fn charge(
    gateway: &Gateway,
    runtime: &Runtime,
    principal: &Principal,
    call: &classify::Call,
    tokens: u64,
) {
    let rules = &runtime.snapshot.limits;
    if rules.is_empty() {
        return;
    }
    let pool = runtime.pool_for(call.deployment.as_deref());
    let runs = renamed_runs(pool);
    gateway
        .limiter
        .charge(
            rules,
            &LimitSubject::of(principal),
            call,
            renaming(pool, &runs),
            tokens,
        )
        .await;
}

/// The deployments the members of `pool` rename every call to: a member that renames runs its
/// own deployment whatever the call names.
fn renamed_runs(pool: Option<&Arc<Pool>>) -> Vec<&str> {
    pool.iter()
        .flat_map(|pool| &pool.members)
        .filter_map(|member| member.config.deployment.as_deref())
        .collect()
}

/// The renaming of `pool` for the limits, when its members rename (`runs` not empty).
fn renaming<'a>(pool: Option<&'a Arc<Pool>>, runs: &'a [&'a str]) -> Option<Renaming<'a>> {
    pool.filter(|_| !runs.is_empty()).map(|pool| Renaming {
        pool: &pool.id,
        runs,
    })
}

/// How much of a refused (too large) body the gateway still reads, and for how long, before it
/// answers 413: see [`linger`].
const LINGER_BYTES: u64 = 1024 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);

/// Reads the whole request body, at most `limit` bytes, waiting at most `idle` for each piece.
pub(crate) async fn read_body(
    parts: &Parts,
    body: Body,
    limit: u64,
    idle: Duration,
) -> Result<bytes::Bytes, GatewayError> {
    use http_body_util::BodyExt as _;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        if declared.is_some_and(|length| length <= limit.saturating_add(LINGER_BYTES)) {
            linger(body).await;
        }
        return Err(GatewayError::BodyTooLarge { limit });
    }
    let mut body = body;
    let mut pieces: Vec<bytes::Bytes> = Vec::new();
    let mut length: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => return Err(GatewayError::RequestTimeout { idle }),
        };
        let Ok(frame) = frame else {
            return Err(GatewayError::BadRequest {
                message: "The request body could not be read.".to_owned(),
                param: None,
            });
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        length += data.len() as u64;
        if length > limit {
            linger(body).await;
            return Err(GatewayError::BodyTooLarge { limit });
        }
        pieces.push(data);
    }
    Ok(match pieces.len() {
        0 => bytes::Bytes::new(),
        1 => pieces.swap_remove(0),
        _ => pieces.concat().into(),
    })
}

/// Reads and drops what the client still sends of a body the gateway refuses, up to
/// [`LINGER_BYTES`] and for at most [`LINGER_TIME`], so that the refusal reaches it: a connection
/// closed with unread data in it is reset by the kernel, and the reset can destroy the answer
/// before the client has read it (the client then sees a broken connection instead of a 413).
pub(crate) async fn linger(mut body: Body) {
    use http_body_util::BodyExt as _;
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut read: u64 = 0;
    while read <= LINGER_BYTES {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |data| data.len() as u64);
            }
            _ => break,
        }
    }
}

/// The client's `x-request-id` when it is a sane token (nothing that could smuggle text into a
/// log line or a header).
fn client_request_id(parts: &Parts) -> Option<String> {
    parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
        })
        .map(str::to_owned)
}

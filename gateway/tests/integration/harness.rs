//! Starting simulators and a gateway, and waiting for audit records.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use gatehouse_audit::{AuditQueue, AuditSink, MemorySink, QueueSettings, SinkError, WriterHandle};
use gatehouse_gateway::secret::Secret;
use gatehouse_gateway::server::{self, Listening};
use gatehouse_gateway::settings::{AffinitySettings, LimitSettings};
use gatehouse_gateway::{ClientTimeouts, Gateway, GatewayParts, SecretSettings};
use gatehouse_schema::{AuditRecord, ConfigSnapshot};
use gatehouse_simulator::{RunningSimulator, Simulator, SimulatorConfig};
pub use gatehouse_test_support::TestDatabase;
use serde_json::{Value, json};

/// The client key every test subscription accepts.
pub const KEY: &str = "ghk_TestClientKey0000000000000000000000000";
/// The admin token of test gateways.
pub const ADMIN_TOKEN: &str = "test-admin-token-1234567890";
/// The key test backends require from the gateway (set in the environment as `GH_TEST_BACKEND_KEY`).
pub const BACKEND_KEY: &str = "backend-secret-key-abcdef";

/// Log lines written as JSON while the guard [`CapturedLogs::install`] returns lives, on the
/// test's thread: a current-thread test, whose gateway runs its tasks on that thread too.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl CapturedLogs {
    /// Captures every event at `level` and above until the guard is dropped.
    pub fn install(level: tracing::Level) -> (CapturedLogs, tracing::subscriber::DefaultGuard) {
        let logs = CapturedLogs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .with_max_level(level)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// Everything written so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The first line whose message is `message`, as JSON; panics with every line if none is.
    pub fn line(&self, message: &str) -> Value {
        let text = self.text();
        text.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|l| l["fields"]["message"] == message)
            .unwrap_or_else(|| panic!("no `{message}` line in:\n{text}"))
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A sink whose writes wait while its gate is shut: the first write holds the writer, and the
/// queue behind it fills, so that calls wait for room in it.
#[derive(Clone)]
pub struct Gated {
    /// `true` opens the gate.
    pub open: Arc<tokio::sync::watch::Sender<bool>>,
    /// Writes begun.
    pub started: Arc<AtomicU64>,
    /// What the writes stored once through the gate.
    pub inner: MemorySink,
}

impl Gated {
    /// A gated sink, shut.
    pub fn shut() -> Gated {
        Gated {
            open: Arc::new(tokio::sync::watch::Sender::new(false)),
            started: Arc::new(AtomicU64::new(0)),
            inner: MemorySink::new(),
        }
    }

    /// Queue settings under which the first record's write holds the writer at the gate and
    /// `capacity` more records fill the queue: no journal (the writer takes nothing while a write
    /// is in flight), and waits for the sink and for room long enough for any test.
    pub fn holding(capacity: usize) -> QueueSettings {
        QueueSettings {
            capacity,
            journal_dir: None,
            sink_timeout: Duration::from_secs(60),
            room_wait: Duration::from_secs(30),
            ..QueueSettings::default()
        }
    }

    /// A queue into this sink with [`Gated::holding`] settings.
    pub async fn queue(&self, capacity: usize) -> (AuditQueue, WriterHandle) {
        AuditQueue::start_with(Arc::new(self.clone()), Self::holding(capacity))
            .await
            .unwrap()
    }

    /// Waits (at most a second) until a first write has begun and holds the writer.
    pub async fn wait_for_a_write(&self) {
        for _ in 0..50 {
            if self.started.load(Ordering::SeqCst) >= 1 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no write began");
    }
}

impl AuditSink for Gated {
    fn write_batch<'a>(
        &'a self,
        records: &'a [AuditRecord],
    ) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            self.started.fetch_add(1, Ordering::SeqCst);
            let _ = self.open.subscribe().wait_for(|open| *open).await;
            self.inner.write_batch(records).await
        })
    }
    fn name(&self) -> &'static str {
        "gated"
    }
}

/// A gateway whose one pool serves `gpt-4o` from one OpenAI member at `url` (its API under
/// `{url}/v1`).
pub async fn openai_gateway(url: &str) -> TestGateway {
    TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [
            {"id": "openai", "kind": "openai", "endpoint": format!("{url}/v1"), "priority": 1, "weight": 1},
        ]}]),
    ))
    .await
}

/// Serves `app` on a free loopback port, for as long as the test runs; its base URL.
pub async fn serve_stub(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A simulator with `id` and default settings.
pub async fn simulator(id: &str) -> RunningSimulator {
    simulator_with(SimulatorConfig {
        id: id.to_owned(),
        ..SimulatorConfig::default()
    })
    .await
}

/// A simulator with the given settings.
pub async fn simulator_with(config: SimulatorConfig) -> RunningSimulator {
    Simulator::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

/// A record's attempts as (member, status, outcome), for comparing with what a test expects.
pub fn attempts_of(record: &AuditRecord) -> Vec<(&str, Option<u16>, Option<&str>)> {
    record
        .attempts
        .iter()
        .map(|a| (a.backend_id.as_str(), a.status, a.error.as_deref()))
        .collect()
}

/// A pool member entry for a simulator (Azure dialect unless `kind` says otherwise).
pub fn member(id: &str, url: &str, priority: u32) -> Value {
    json!({"id": id, "endpoint": url, "priority": priority, "weight": 1})
}

/// A snapshot with one subscription (key [`KEY`]) and the given pools.
pub fn snapshot(version: u64, pools: Value) -> ConfigSnapshot {
    let hash = gatehouse_gateway::auth::hash_key(KEY).to_string();
    serde_json::from_value(json!({
        "version": version,
        "subscriptions": [{"id": "team-a", "display_name": "Team A", "product": "research", "primary_key_hash": hash}],
        "pools": pools,
        "trusted_proxies": ["127.0.0.0/8"],
    }))
    .unwrap()
}

/// What a test gateway is started with besides its snapshot and audit queue.
#[derive(Default)]
struct Settings {
    secrets: SecretSettings,
    limits: LimitSettings,
    affinity: AffinitySettings,
    client_timeouts: ClientTimeouts,
    admin_signed_only: bool,
    /// `server.ready_on_config_fallback: false` (the product's default is true).
    unready_on_config_fallback: bool,
}

/// A running gateway with an in-memory audit sink.
pub struct TestGateway {
    pub url: String,
    pub gateway: Arc<Gateway>,
    pub sink: MemorySink,
    pub listening: Listening,
    pub state_dir: Arc<tempfile::TempDir>,
    writer: Option<WriterHandle>,
    client: reqwest::Client,
}

impl TestGateway {
    /// Starts a gateway on a fresh state directory.
    pub async fn start(snapshot: ConfigSnapshot) -> TestGateway {
        Self::start_in(snapshot, Arc::new(tempfile::tempdir().unwrap())).await
    }

    /// Starts a gateway on an existing state directory (a restart).
    pub async fn start_in(
        snapshot: ConfigSnapshot,
        state_dir: Arc<tempfile::TempDir>,
    ) -> TestGateway {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 10_000);
        Self::start_with_queue(snapshot, state_dir, sink, queue, writer).await
    }

    /// Starts a gateway on an existing state directory (a restart) whose `/readyz` answers 503
    /// while it runs on its file's snapshot because the last-known-good one could not be built
    /// (`server.ready_on_config_fallback: false`).
    pub async fn start_in_unready_on_config_fallback(
        snapshot: ConfigSnapshot,
        state_dir: Arc<tempfile::TempDir>,
    ) -> TestGateway {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 10_000);
        let settings = Settings {
            unready_on_config_fallback: true,
            ..Settings::default()
        };
        Self::start_with_everything(snapshot, state_dir, sink, queue, writer, settings)
            .await
            .unwrap()
    }

    /// Starts a gateway with its own Entra credential and Key Vault refresh settings.
    pub async fn start_with_secrets(
        snapshot: ConfigSnapshot,
        secrets: SecretSettings,
    ) -> TestGateway {
        Self::try_start_with_secrets(snapshot, secrets)
            .await
            .unwrap()
    }

    /// Like [`TestGateway::start_with_secrets`], returning the start-up error.
    pub async fn try_start_with_secrets(
        snapshot: ConfigSnapshot,
        secrets: SecretSettings,
    ) -> anyhow::Result<TestGateway> {
        Self::start_fresh(
            snapshot,
            Settings {
                secrets,
                ..Settings::default()
            },
        )
        .await
    }

    /// Starts a gateway whose records go to `queue`; `sink` is what [`TestGateway::records`] reads.
    pub async fn start_with_queue(
        snapshot: ConfigSnapshot,
        state_dir: Arc<tempfile::TempDir>,
        sink: MemorySink,
        queue: AuditQueue,
        writer: WriterHandle,
    ) -> TestGateway {
        Self::start_with_everything(
            snapshot,
            state_dir,
            sink,
            queue,
            writer,
            Settings::default(),
        )
        .await
        .unwrap()
    }

    /// Starts a gateway with one pool (`gpt-4o` on `backend_url`) whose records go through a
    /// queue with `settings` into `sink`; `records` is what [`TestGateway::records`] reads.
    pub async fn start_recording(
        backend_url: &str,
        sink: Arc<dyn AuditSink>,
        settings: QueueSettings,
        state_dir: Arc<tempfile::TempDir>,
        records: MemorySink,
    ) -> TestGateway {
        let (queue, writer) = AuditQueue::start_with(sink, settings).await.unwrap();
        let pools = json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", backend_url, 1)]}]);
        Self::start_with_queue(snapshot(1, pools), state_dir, records, queue, writer).await
    }

    /// Starts a gateway with one pool (`gpt-4o` on `backend_url`) whose records go into `gated`
    /// through a queue of `capacity` ([`Gated::holding`]).
    pub async fn start_gated(backend_url: &str, gated: &Gated, capacity: usize) -> TestGateway {
        Self::start_recording(
            backend_url,
            Arc::new(gated.clone()),
            Gated::holding(capacity),
            Arc::new(tempfile::tempdir().unwrap()),
            gated.inner.clone(),
        )
        .await
    }

    /// Starts a gateway on a fresh state directory with these limit-store settings.
    pub async fn start_with_limits(snapshot: ConfigSnapshot, limits: LimitSettings) -> TestGateway {
        Self::start_fresh(
            snapshot,
            Settings {
                limits,
                ..Settings::default()
            },
        )
        .await
        .unwrap()
    }

    /// Starts a gateway on a fresh state directory with these client timeouts.
    pub async fn start_with_client_timeouts(
        snapshot: ConfigSnapshot,
        client_timeouts: ClientTimeouts,
    ) -> TestGateway {
        Self::start_fresh(
            snapshot,
            Settings {
                client_timeouts,
                ..Settings::default()
            },
        )
        .await
        .unwrap()
    }

    /// Starts a gateway that takes only signed admin requests (`server.admin_signed_only`).
    pub async fn start_taking_signed_admin_requests_only(snapshot: ConfigSnapshot) -> TestGateway {
        Self::start_fresh(
            snapshot,
            Settings {
                admin_signed_only: true,
                ..Settings::default()
            },
        )
        .await
        .unwrap()
    }

    /// Starts a gateway on a fresh state directory, its records in memory.
    async fn start_fresh(
        snapshot: ConfigSnapshot,
        settings: Settings,
    ) -> anyhow::Result<TestGateway> {
        let sink = MemorySink::new();
        let (queue, writer) = AuditQueue::start(Arc::new(sink.clone()), 10_000);
        let state_dir = Arc::new(tempfile::tempdir().unwrap());
        Self::start_with_everything(snapshot, state_dir, sink, queue, writer, settings).await
    }

    async fn start_with_everything(
        snapshot: ConfigSnapshot,
        state_dir: Arc<tempfile::TempDir>,
        sink: MemorySink,
        queue: AuditQueue,
        writer: WriterHandle,
        settings: Settings,
    ) -> anyhow::Result<TestGateway> {
        let gateway = Gateway::new(GatewayParts {
            id: "test-gateway".to_owned(),
            snapshot,
            state_dir: state_dir.path().to_path_buf(),
            admin_token: Some(Secret::new(ADMIN_TOKEN.to_owned())),
            admin_signed_only: settings.admin_signed_only,
            audit: Some(queue),
            access_log: true,
            secrets: settings.secrets,
            limits: settings.limits,
            affinity: settings.affinity,
            client_timeouts: settings.client_timeouts,
            ready_on_config_fallback: !settings.unready_on_config_fallback,
        })
        .await?;
        let (listening, _task) =
            server::spawn(Arc::clone(&gateway), "127.0.0.1:0".parse().unwrap(), None).await?;
        Ok(TestGateway {
            url: format!("http://{}", listening.addr),
            gateway,
            sink,
            listening,
            state_dir,
            writer: Some(writer),
            client: reqwest::Client::builder().no_proxy().build().unwrap(),
        })
    }

    /// A request builder to `path` with the client key in `api-key`.
    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.url))
            .header("api-key", KEY)
    }

    /// The same as [`TestGateway::post`], over `version`: HTTP/2 with prior knowledge, on a
    /// client of its own; anything else as `post`.
    pub fn post_over(&self, version: http::Version, path: &str) -> reqwest::RequestBuilder {
        if version != http::Version::HTTP_2 {
            return self.post(path);
        }
        reqwest::Client::builder()
            .no_proxy()
            .http2_prior_knowledge()
            .build()
            .unwrap()
            .post(format!("{}{path}", self.url))
            .header("api-key", KEY)
    }

    /// `PUT /_gatehouse/config` of `snapshot` with the admin token.
    pub async fn push_config(&self, snapshot: &impl serde::Serialize) -> reqwest::Response {
        self.raw(reqwest::Method::PUT, "/_gatehouse/config")
            .bearer_auth(ADMIN_TOKEN)
            .json(snapshot)
            .send()
            .await
            .unwrap()
    }

    /// A GET with the client key.
    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client
            .get(format!("{}{path}", self.url))
            .header("api-key", KEY)
    }

    /// A request without any key.
    pub fn raw(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.url))
    }

    /// Waits until at least `count` records were written, and returns them all.
    pub async fn records(&self, count: usize) -> Vec<AuditRecord> {
        for _ in 0..200 {
            let records = self.sink.records();
            if records.len() >= count {
                return records;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!(
            "expected {count} audit records, have {}",
            self.sink.records().len()
        );
    }

    /// The text of `GET /metrics`.
    pub async fn metrics(&self) -> String {
        self.raw(reqwest::Method::GET, "/metrics")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Stops the gateway and waits until its records are flushed.
    pub async fn stop(mut self) {
        self.listening.shutdown(Duration::from_secs(5));
        drop(self.gateway);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(writer) = self.writer.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer.finish()).await;
        }
    }
}

/// A chat request body.
pub fn chat(model: Option<&str>, stream: bool) -> Value {
    let mut body = json!({
        "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of Norway?"}],
        "stream": stream,
    });
    if let Some(model) = model {
        body["model"] = json!(model);
    }
    body
}

/// The classic Azure chat path for a deployment.
pub fn chat_path(deployment: &str) -> String {
    format!("/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21")
}

/// Asserts an Azure-shaped error body and returns its message.
pub async fn azure_error(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    let body: Value = response.json().await.expect("error body is JSON");
    let message = body["error"]["message"]
        .as_str()
        .expect("error.message")
        .to_owned();
    assert!(body["error"]["code"].is_string(), "error.code in {body}");
    assert!(!message.is_empty());
    message
}

/// Uploads `content` as a batch input file (`purpose=batch`) through the gateway at `url` with
/// the client key, and returns the new file's id.
pub async fn upload_batch_file(url: &str, content: impl Into<Vec<u8>>) -> String {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content.into())
                .file_name("input.jsonl")
                .mime_str("application/jsonl")
                .unwrap(),
        );
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{url}/openai/files?api-version=2024-10-21"))
        .header("api-key", KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let file: Value = response.json().await.unwrap();
    file["id"].as_str().unwrap().to_owned()
}

/// A file holding [`BACKEND_KEY`] and its `file:` secret reference; keep the file alive.
pub fn backend_key_file() -> (tempfile::NamedTempFile, String) {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, format!("{BACKEND_KEY}\n").as_bytes()).unwrap();
    let reference = format!("file:{}", file.path().display());
    (file, reference)
}

/// A free localhost port (bound, then released for the gateway to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `gatehouse-gateway serve` process (text logs at `info` into a file); killed when dropped.
pub struct GatewayProcess {
    /// Its base URL.
    pub url: String,
    child: tokio::process::Child,
    dir: tempfile::TempDir,
}

impl GatewayProcess {
    /// Starts one with `snapshot` and `server.limits`, and waits until `/healthz` answers.
    pub async fn start(name: &str, snapshot: &ConfigSnapshot, limits: Value) -> GatewayProcess {
        Self::start_with(name, snapshot, json!({ "limits": limits })).await
    }

    /// Starts one with `snapshot` and the `server` settings in `settings` (an object, which may
    /// set `state_dir`), and waits until `/healthz` answers.
    pub async fn start_with(
        name: &str,
        snapshot: &ConfigSnapshot,
        settings: Value,
    ) -> GatewayProcess {
        match Self::try_start_with(name, snapshot, settings).await {
            Ok(gateway) => gateway,
            Err(log) => panic!("gateway {name} did not come up; its log:\n{log}"),
        }
    }

    /// Like [`GatewayProcess::start_with`]; a gateway that exits instead of coming up gives its
    /// log as the error.
    pub async fn try_start_with(
        name: &str,
        snapshot: &ConfigSnapshot,
        settings: Value,
    ) -> Result<GatewayProcess, String> {
        Self::try_start_with_env(name, snapshot, settings, &[]).await
    }

    /// Like [`GatewayProcess::start_with`], with `env` added to the process's environment.
    pub async fn start_with_env(
        name: &str,
        snapshot: &ConfigSnapshot,
        settings: Value,
        env: &[(&str, &str)],
    ) -> GatewayProcess {
        match Self::try_start_with_env(name, snapshot, settings, env).await {
            Ok(gateway) => gateway,
            Err(log) => panic!("gateway {name} did not come up; its log:\n{log}"),
        }
    }

    async fn try_start_with_env(
        name: &str,
        snapshot: &ConfigSnapshot,
        settings: Value,
        env: &[(&str, &str)],
    ) -> Result<GatewayProcess, String> {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut server = json!({
            "listen": format!("127.0.0.1:{port}"),
            "gateway_id": name,
            "state_dir": dir.path().join("state"),
            "log_format": "text",
            "access_log": false,
        });
        for (key, value) in settings.as_object().expect("server settings are an object") {
            server[key] = value.clone();
        }
        let config = json!({ "server": server, "snapshot": snapshot });
        // YAML is a superset of JSON.
        let path = dir.path().join("gateway.yaml");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let log_path = dir.path().join("gateway.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_gatehouse-gateway"))
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        for _ in 0..800 {
            if client
                .get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                return Ok(GatewayProcess { url, child, dir });
            }
            if let Some(status) = child.try_wait().unwrap() {
                let log = std::fs::read_to_string(&log_path).unwrap();
                return Err(format!("{status}\n{log}"));
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(format!(
            "no answer from /healthz within 20 s; its log:\n{}",
            std::fs::read_to_string(&log_path).unwrap()
        ))
    }

    /// Its `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// The configuration file it was started with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// Its state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What it has logged so far (its standard error).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap()
    }

    /// Kills it (SIGKILL: nothing of its shutdown runs).
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }

    /// Stops it as a service manager does (SIGTERM), waits until it has exited, and returns its
    /// log.
    pub async fn terminate(mut self) -> String {
        self.send_sigterm();
        let exit = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("exits within 20 s of SIGTERM")
            .unwrap();
        assert!(exit.success(), "{exit}");
        self.log()
    }

    /// Sends it SIGTERM, and returns at once.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits at most `limit` for it to exit: its exit status (`None` if still running, then
    /// killed) and its log.
    pub async fn exit_within(
        mut self,
        limit: Duration,
    ) -> (Option<std::process::ExitStatus>, String) {
        let exit = tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()
            .map(Result::unwrap);
        if exit.is_none() {
            let _ = self.child.kill().await;
        }
        (exit, self.log())
    }
}

/// The Redis server of the tests (keys under a prefix of each test's own).
pub const REDIS: &str = "redis://127.0.0.1:6379";

/// The Redis keys under `prefix`.
pub async fn redis_keys(prefix: &str) -> Vec<String> {
    let mut connection = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut connection)
        .await
        .unwrap()
}

/// Deletes every Redis key under `prefix`.
pub async fn delete_keys(prefix: &str) {
    let keys = redis_keys(prefix).await;
    if keys.is_empty() {
        return;
    }
    let mut connection = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: i64 = redis::cmd("DEL")
        .arg(keys)
        .query_async(&mut connection)
        .await
        .unwrap();
}

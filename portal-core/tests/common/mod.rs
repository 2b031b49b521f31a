//! A fresh config database per test, on SQLite (a temp dir) or PostgreSQL (127.0.0.1:5432, a
//! database created for the test and dropped after it).
#![allow(dead_code, reason = "each test file uses a part")]

use std::net::SocketAddr;
use std::sync::Arc;

use gatehouse_gateway::secret::Secret;
use gatehouse_gateway::secret_policy::SecretRefPolicy;
use gatehouse_gateway::server::{self, Listening};
use gatehouse_gateway::{Gateway, GatewayParts, SecretSettings};
use gatehouse_portal_core::push::Publisher;
use gatehouse_portal_core::secret::AdminTokenRefs;
use gatehouse_portal_core::{ConfigDb, SessionUser};
use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::portal::Role;
use gatehouse_simulator::{RunningSimulator, Simulator, SimulatorConfig};
use gatehouse_test_support::TestDatabase;
use serde_json::json;
use time::OffsetDateTime;

/// A database and what keeps it alive (a temp dir, or a PostgreSQL database dropped with it).
/// The config database is dropped first, its PostgreSQL database after it.
pub struct TestDb {
    pub db: ConfigDb,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    _database: Option<TestDatabase>,
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("portal.db").display());
    TestDb {
        db: ConfigDb::open(&url).await.unwrap(),
        url,
        _dir: Some(dir),
        _database: None,
    }
}

pub async fn postgres() -> TestDb {
    let database = TestDatabase::new("gh_portal").await;
    let url = database.url.clone();
    TestDb {
        db: ConfigDb::open(&url).await.unwrap(),
        url,
        _dir: None,
        _database: Some(database),
    }
}

/// The gateway admin token references the tests' portals may read: files in the temp
/// directory, where each test writes its gateway's token.
pub fn test_token_refs() -> AdminTokenRefs {
    AdminTokenRefs::parse(&format!("file:{}/", std::env::temp_dir().display())).unwrap()
}

/// A publisher on `db` that reads the tests' token files.
pub fn publisher(db: &ConfigDb) -> Arc<Publisher> {
    Arc::new(
        Publisher::new(db.clone(), std::time::Duration::from_secs(5))
            .unwrap()
            .with_admin_token_refs(test_token_refs()),
    )
}

/// The admin token of the test gateways.
pub const ADMIN_TOKEN: &str = "portal-test-admin-token-0123456789";

/// A temporary directory with [`ADMIN_TOKEN`] in a file (and a line break, as editors write
/// one), and the `file:` reference a gateway is registered with; the directory must outlive it.
pub fn admin_token_file() -> (tempfile::TempDir, String) {
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let token_ref = format!("file:{}", token_file.display());
    (secrets, token_ref)
}

/// An in-process gateway on loopback.
pub struct TestGateway {
    pub url: String,
    pub listening: Listening,
    /// Its state directory (kept as long as the gateway).
    pub state_dir: tempfile::TempDir,
}

/// A gateway on `addr` (port 0: any), started empty at version 0 so that the portal's first
/// version is accepted, with [`ADMIN_TOKEN`].
pub async fn gateway_at(addr: SocketAddr) -> TestGateway {
    gateway_with(addr, SecretSettings::default()).await
}

/// A gateway as [`gateway_at`] whose snapshots may name secret references only under
/// `prefixes` (its `server.snapshot_secret_refs`).
pub async fn gateway_allowing_refs(prefixes: &[String]) -> TestGateway {
    let policy = SecretRefPolicy::new(Vec::new(), &[], &[], Some(prefixes)).unwrap();
    let secrets = SecretSettings {
        snapshot_refs: policy,
        ..SecretSettings::default()
    };
    gateway_with("127.0.0.1:0".parse().unwrap(), secrets).await
}

async fn gateway_with(addr: SocketAddr, secrets: SecretSettings) -> TestGateway {
    gateway_on(addr, secrets, json!({"version": 0})).await
}

/// A gateway on any loopback port started on the file snapshot `snapshot` (not empty at 0).
pub async fn gateway_on_snapshot(snapshot: serde_json::Value) -> TestGateway {
    gateway_on(
        "127.0.0.1:0".parse().unwrap(),
        SecretSettings::default(),
        snapshot,
    )
    .await
}

async fn gateway_on(
    addr: SocketAddr,
    secrets: SecretSettings,
    snapshot: serde_json::Value,
) -> TestGateway {
    let (gateway, state) = gateway_started_on(secrets, snapshot).await;
    let (listening, _task) = server::spawn(gateway, addr, None).await.unwrap();
    TestGateway {
        url: format!("http://{}", listening.addr),
        listening,
        state_dir: state,
    }
}

/// Stops `gateway` and starts another at its address with an empty state directory, as a
/// gateway that restarts without the versions it was pushed (a lost state directory, a
/// last-known-good it could not load) comes back: at version 0.
pub async fn restart_empty(gateway: TestGateway) -> TestGateway {
    let addr = gateway.listening.addr;
    gateway.listening.shutdown(std::time::Duration::ZERO);
    drop(gateway);
    let (fresh, state) = empty_gateway(SecretSettings::default()).await;
    // The stopped gateway lets go of its address soon after the shutdown.
    let mut attempts = 0;
    loop {
        match server::spawn(Arc::clone(&fresh), addr, None).await {
            Ok((listening, _task)) => {
                return TestGateway {
                    url: format!("http://{}", listening.addr),
                    listening,
                    state_dir: state,
                };
            }
            Err(error) => {
                attempts += 1;
                assert!(
                    attempts < 100,
                    "{addr} stayed taken after the gateway stopped: {error}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// A gateway at version 0 in a new state directory, not listening yet.
async fn empty_gateway(secrets: SecretSettings) -> (Arc<Gateway>, tempfile::TempDir) {
    gateway_started_on(secrets, json!({"version": 0})).await
}

async fn gateway_started_on(
    secrets: SecretSettings,
    snapshot: serde_json::Value,
) -> (Arc<Gateway>, tempfile::TempDir) {
    let state = tempfile::tempdir().unwrap();
    let snapshot: ConfigSnapshot = serde_json::from_value(snapshot).unwrap();
    let gateway = Gateway::new(GatewayParts {
        admin_signed_only: false,
        id: "portal-test".to_owned(),
        snapshot,
        state_dir: state.path().to_path_buf(),
        admin_token: Some(Secret::new(ADMIN_TOKEN.to_owned())),
        audit: None,
        access_log: false,
        limits: Default::default(),
        affinity: Default::default(),
        secrets,
        client_timeouts: Default::default(),
        ready_on_config_fallback: true,
    })
    .await
    .unwrap();
    (gateway, state)
}

/// The simulator backend on a free loopback port.
pub async fn simulator() -> RunningSimulator {
    Simulator::start(
        SimulatorConfig {
            id: "sim".to_owned(),
            ..SimulatorConfig::default()
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap()
}

/// A signed-in Admin.
pub fn admin() -> SessionUser {
    SessionUser {
        subject: "admin-oid".into(),
        name: "Ada Admin".into(),
        roles: vec![Role::Admin],
        led_groups: vec![],
        signed_in_at: OffsetDateTime::now_utc(),
        dev: false,
    }
}

//! The audit store's fault test: under a steady load through the gateway, PostgreSQL stops for 30 s
//! and starts again, then the gateway restarts. Every call a client saw answered is on record, and
//! the hash chain verifies.
//!
//! The test runs its own PostgreSQL cluster (`initdb` + `postgres` from the machine's PostgreSQL
//! packages, on a free port, in a temporary directory) so that stopping it disturbs nothing else.
//! `GATEHOUSE_OUTAGE_SECONDS` shortens the outage for a quick local run.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatehouse_audit::sql::SqlStore;
use gatehouse_audit::{MemorySink, QueueSettings};
use time::OffsetDateTime;

use crate::harness::*;

/// A PostgreSQL cluster of the test's own.
struct PrivatePostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    server: Option<Child>,
    /// Run the server binaries as this user (PostgreSQL refuses to run as root).
    run_as: Option<&'static str>,
}

impl PrivatePostgres {
    /// `initdb` a cluster in a temporary directory and start it.
    fn start() -> PrivatePostgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let run_as = is_root().then_some("postgres");
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .args(["-R", user])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown of the cluster directory failed");
        }
        let port = free_port();
        let mut cluster = PrivatePostgres {
            bin,
            dir,
            port,
            server: None,
            run_as,
        };
        let data = cluster.data_dir();
        let output = cluster
            .command("initdb")
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "-D",
            ])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        cluster.start_server();
        cluster
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        match self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(path);
                command
            }
            None => Command::new(path),
        }
    }

    fn start_server(&mut self) {
        let data = self.data_dir();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.server = Some(child);
    }

    /// Stops the server the way an operator (or a crash of the service) would: fast shutdown.
    fn stop_server(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.server.take() {
            let _ = child.wait();
        }
    }

    /// Waits until the server accepts connections.
    async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if sqlx::PgPool::connect(&self.url()).await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the private PostgreSQL did not start"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.stop_server();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The directory of `initdb` and `postgres`: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn postgres_bin_dir() -> PathBuf {
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path().join("bin"))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    candidates.sort();
    candidates.pop().expect(
        "PostgreSQL server binaries (initdb, postgres) are needed: install the postgresql package",
    )
}

fn outage() -> Duration {
    let seconds = std::env::var("GATEHOUSE_OUTAGE_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(seconds)
}

/// A gateway recording into `store`, journaling in `state_dir` when the store is down.
async fn gateway(
    store: &SqlStore,
    state_dir: Arc<tempfile::TempDir>,
    sim_url: &str,
) -> TestGateway {
    let settings = QueueSettings {
        journal_dir: Some(state_dir.path().join("audit-journal")),
        sink_timeout: Duration::from_millis(500),
        ..QueueSettings::default()
    };
    TestGateway::start_recording(
        sim_url,
        Arc::new(store.clone()),
        settings,
        state_dir,
        MemorySink::new(),
    )
    .await
}

async fn recorded(store_url: &str) -> i64 {
    let Ok(pool) = sqlx::PgPool::connect(store_url).await else {
        return -1;
    };
    let count = sqlx::query_scalar("SELECT COUNT(*) FROM \"GatehouseGatewayLogs\"")
        .fetch_one(&pool)
        .await
        .unwrap_or(-1);
    pool.close().await;
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_under_load_loses_no_record() {
    let mut postgres = PrivatePostgres::start();
    postgres.ready().await;
    let store_url = postgres.url();
    let store = SqlStore::open(&store_url).await.unwrap();
    let sim = simulator("outage").await;
    let state_dir = Arc::new(tempfile::tempdir().unwrap());
    let gw = gateway(&store, Arc::clone(&state_dir), &sim.url()).await;

    // Steady load: four clients, one call after another, until told to stop.
    let answered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::new();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (answered, stop, client) = (Arc::clone(&answered), Arc::clone(&stop), client.clone());
        let url = format!("{}{}", gw.url, chat_path("gpt-4o"));
        clients.push(tokio::spawn(async move {
            // Bounded: at most 100,000 calls per client and until `stop`.
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let response = client
                    .post(&url)
                    .header("api-key", KEY)
                    .json(&chat(None, false))
                    .send()
                    .await;
                if let Ok(response) = response
                    && response.bytes().await.is_ok()
                {
                    answered.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before_outage = answered.load(Ordering::SeqCst);
    postgres.stop_server();
    tokio::time::sleep(outage()).await;
    let during_outage = answered.load(Ordering::SeqCst) - before_outage;
    postgres.start_server();
    postgres.ready().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.unwrap();
    }
    let answered = answered.load(Ordering::SeqCst);
    assert!(
        before_outage > 0 && during_outage > 0,
        "the load ran throughout ({before_outage} before, {during_outage} during the outage)"
    );

    // The gateway restarts; whatever its journal still holds is replayed.
    gw.stop().await;
    let gw = gateway(&store, Arc::clone(&state_dir), &sim.url()).await;
    // The replay's pace depends on the machine (on a loaded CI host the journal of a 30 s outage
    // takes minutes): wait while the count still grows, and fail once it has stalled for 30 s
    // (or after 10 minutes in all).
    let give_up = Instant::now() + Duration::from_secs(600);
    let mut stalled_since = Instant::now();
    let mut count = recorded(&store_url).await;
    while count < i64::try_from(answered).unwrap()
        && stalled_since.elapsed() < Duration::from_secs(30)
        && Instant::now() < give_up
    {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = recorded(&store_url).await;
        if now > count {
            stalled_since = Instant::now();
        }
        count = now;
    }
    assert_eq!(
        count,
        i64::try_from(answered).unwrap(),
        "records in the store vs calls the clients saw answered ({during_outage} during the outage)"
    );
    assert_eq!(
        sim.hits(),
        answered,
        "every answered call reached the backend once"
    );

    let now = OffsetDateTime::now_utc();
    let report = store
        .verify_chains(
            now - time::Duration::hours(1),
            now + time::Duration::hours(1),
        )
        .await
        .unwrap();
    assert!(
        report.is_intact(),
        "the hash chain breaks: {:?}",
        report.first_break()
    );
    assert!(!report.chains.is_empty());
    eprintln!(
        "{answered} calls answered ({during_outage} during a {:?} PostgreSQL outage), {count} records, hash chain intact",
        outage()
    );
    gw.stop().await;
    store.close().await;
    drop(postgres);
}

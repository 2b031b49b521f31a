//! One `gateway_id`, one running gateway: gateways whose audit store is the SQL store claim their
//! id in it, so that a second gateway configured with a running one's id does not start and fork
//! that id's audit chains (`gateway/src/gateway_claim.rs`). Real gateway processes, the real
//! PostgreSQL server and a SQLite file.

use std::time::Duration;

use gatehouse_audit::sql::{ClaimOutcome, SqlStore};
use serde_json::{Value, json};

use crate::harness::*;

fn pool(url: &str) -> Value {
    json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", url, 1)]}])
}

const WAITING: &str = "another gateway holds this gateway_id in the audit store";
const TAKEN_OVER: &str = "the earlier claim of this gateway_id lapsed";

#[tokio::test]
async fn a_second_gateway_with_a_running_gateways_id_does_not_start() {
    let simulator = simulator("ids-pg").await;
    let snapshot = snapshot(1, pool(&simulator.url()));
    let database = TestDatabase::new("gh_gateway").await;
    let settings = json!({"audit": {"database": database.url, "gateway_id_claim_seconds": 2}});
    let host = gethostname();

    let first = GatewayProcess::start_with("shared-id", &snapshot, settings.clone()).await;
    let refused = GatewayProcess::try_start_with("shared-id", &snapshot, settings.clone())
        .await
        .err()
        .expect("a second gateway with the id of a running one must not start");
    assert!(
        refused.contains("server.gateway_id \"shared-id\" belongs to a running gateway on host")
            && refused.contains(&format!("{host:?}"))
            && refused.contains("Give each gateway its own server.gateway_id"),
        "{refused}"
    );
    // A different id starts beside it.
    let other = GatewayProcess::start_with("other-id", &snapshot, settings.clone()).await;
    other.terminate().await;

    // Stopped as a service is stopped, the first gives its id up: the next one takes it at once.
    first.terminate().await;
    let second = GatewayProcess::start_with("shared-id", &snapshot, settings.clone()).await;
    assert!(!second.log().contains(WAITING), "{}", second.log());

    // Killed, the second leaves its claim behind: a gateway on another state directory waits
    // until the claim lapses (2 s) and takes it.
    second.stop().await;
    let state = tempfile::tempdir().unwrap();
    let mut on_state = settings.clone();
    on_state["state_dir"] = json!(state.path());
    let third = GatewayProcess::start_with("shared-id", &snapshot, on_state.clone()).await;
    let log = third.log();
    assert!(log.contains(WAITING) && log.contains(TAKEN_OVER), "{log}");

    // The same gateway killed and restarted (its state directory keeps its instance id) holds
    // its claim again at once.
    third.stop().await;
    let again = GatewayProcess::start_with("shared-id", &snapshot, on_state).await;
    assert!(!again.log().contains(WAITING), "{}", again.log());
    let log = again.terminate().await;
    assert!(!log.contains("could not give up"), "{log}");

    let store = SqlStore::open(&database.url).await.unwrap();
    assert_eq!(store.gateway_id_holder("shared-id").await.unwrap(), None);
    store.close().await;
    drop(database);
}

#[tokio::test]
async fn a_gateway_whose_id_is_taken_while_it_runs_says_so_in_its_log_and_metrics() {
    let simulator = simulator("ids-sqlite").await;
    let snapshot = snapshot(1, pool(&simulator.url()));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let gateway = GatewayProcess::start_with(
        "taken-id",
        &snapshot,
        json!({"audit": {"database": url, "gateway_id_claim_seconds": 1}}),
    )
    .await;
    assert_eq!(conflict(&gateway).await, 0);

    // Another gateway with the id took it over (as it may when this one could not renew for
    // longer than the lapse) and keeps renewing it.
    let store = SqlStore::open(&url).await.unwrap();
    let file = sqlx::SqlitePool::connect(&url).await.unwrap();
    let lapse = Duration::from_secs(1);
    let mut taken = false;
    for _ in 0..100 {
        let now = time::OffsetDateTime::now_utc();
        if !taken {
            sqlx::query(
                "UPDATE GatehouseGatewayClaims SET InstanceId = 'intruder', Host = 'intruder-host', SeenAtMs = ?1 WHERE GatewayId = 'taken-id'",
            )
            .bind(i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap())
            .execute(&file)
            .await
            .unwrap();
            taken = true;
        }
        assert_eq!(
            store
                .claim_gateway_id("taken-id", "intruder", "intruder-host", now, lapse)
                .await
                .unwrap(),
            ClaimOutcome::Held
        );
        if conflict(&gateway).await == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(conflict(&gateway).await, 1);
    let log = gateway.log();
    assert!(
        log.contains("another gateway now holds this gateway_id") && log.contains("intruder-host"),
        "{log}"
    );

    // The other one gone (no more renewals), the claim lapses and is this gateway's again.
    let mut back = false;
    for _ in 0..100 {
        if conflict(&gateway).await == 0 {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the lapsed claim was not taken back");
    assert!(matches!(
        store.gateway_id_holder("taken-id").await.unwrap(),
        Some(holder) if holder.instance_id != "intruder"
    ));
    file.close().await;
    store.close().await;
    gateway.terminate().await;
}

/// A gateway that takes its id and then starts slowly (its snapshot's backend key is in a Key
/// Vault whose token comes seconds later) keeps renewing its claim meanwhile: another gateway
/// cannot take the id while the first is starting, and then runs beside it.
#[tokio::test]
async fn a_gateway_keeps_its_claim_while_it_starts_slowly() {
    use crate::azure_identity_double::{CLIENT_ID, EntraDouble, KeyVaultDouble, Proof, TENANT};
    const SECRET: &str = "gateway-own-secret-S3~0123456789abcdef";
    let entra = EntraDouble::start(Proof::Secret(SECRET.to_owned()), 3600).await;
    let vault = KeyVaultDouble::start(&entra).await;
    vault.set("aoai-key", "kv-backend-key");
    let simulator = simulator("ids-slow-start").await;
    let mut member = member("a", &simulator.url(), 1);
    member["credential"] = json!({"type": "api_key", "secret": vault.reference("aoai-key")});
    let snapshot = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member]}]),
    );
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("gateway-secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let lapse = Duration::from_secs(1);
    let start_takes = Duration::from_secs(4);
    entra.set_delay(start_takes);
    let settings = json!({
        "audit": {"database": url, "gateway_id_claim_seconds": 1},
        "entra_credential": {"type": "entra_client_secret", "tenant_id": TENANT,
                             "client_id": CLIENT_ID, "secret": format!("file:{}", secret_file.display()),
                             "authority_host": entra.url},
    });
    let starting =
        tokio::spawn(
            async move { GatewayProcess::start_with("slow-id", &snapshot, settings).await },
        );
    // Once the gateway holds the id, the claim stays its own for as long as the start takes:
    // an intruder's claim is refused every time, not taken after the lapse.
    // (Read with a plain connection until the claim is there: the gateway makes the store.)
    loop {
        if let Ok(file) = sqlx::SqlitePool::connect(&url).await {
            let held: Result<i64, _> = sqlx::query_scalar(
                "SELECT COUNT(*) FROM GatehouseGatewayClaims WHERE GatewayId = 'slow-id'",
            )
            .fetch_one(&file)
            .await;
            file.close().await;
            if held.is_ok_and(|count| count == 1) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = SqlStore::open(&url).await.unwrap();
    let claimed = std::time::Instant::now();
    while claimed.elapsed() < start_takes - Duration::from_millis(500) {
        let outcome = store
            .claim_gateway_id(
                "slow-id",
                "intruder",
                "intruder-host",
                time::OffsetDateTime::now_utc(),
                lapse,
            )
            .await
            .unwrap();
        assert!(
            matches!(outcome, ClaimOutcome::HeldByAnother(_)),
            "the claim lapsed {:?} into the start: {outcome:?}",
            claimed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    store.close().await;
    let gateway = starting.await.unwrap();
    assert_eq!(conflict(&gateway).await, 0);
    gateway.terminate().await;
}

/// The gateway's `gatehouse_gateway_id_conflict`.
async fn conflict(gateway: &GatewayProcess) -> i64 {
    gateway
        .metrics()
        .await
        .lines()
        .find_map(|line| line.strip_prefix("gatehouse_gateway_id_conflict "))
        .expect("the metric is exposed")
        .trim()
        .parse()
        .unwrap()
}

fn gethostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_owned()
}

/// A TCP relay to `target` that passes bytes both ways until frozen, and then holds its
/// connections open without passing another: a server that stopped answering.
struct FreezableRelay {
    port: u16,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezableRelay {
    async fn to(target: String) -> FreezableRelay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&frozen);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pass(
                    client_read,
                    server_write,
                    std::sync::Arc::clone(&flag),
                ));
                tokio::spawn(pass(
                    server_read,
                    client_write,
                    std::sync::Arc::clone(&flag),
                ));
            }
        });
        FreezableRelay { port, frozen }
    }

    fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until `frozen`; then holds both open for ever.
async fn pass(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut buffer = vec![0; 16 * 1024];
    loop {
        let read = from.read(&mut buffer).await.unwrap_or(0);
        if frozen.load(std::sync::atomic::Ordering::SeqCst) {
            let _held = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if read == 0 || to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

/// A gateway whose audit store stops answering (a hung PostgreSQL, its connections open) still
/// stops when told to: giving its id up is bounded in time, and the claim is left to lapse.
#[tokio::test]
async fn a_store_that_stops_answering_does_not_keep_the_gateway_from_stopping() {
    let simulator = simulator("ids-hung").await;
    let snapshot = snapshot(1, pool(&simulator.url()));
    let database = TestDatabase::new("gh_gateway").await;
    // postgres://user@host:port/name: the relay goes to host:port.
    let (before, after) = database.url.split_once('@').unwrap();
    let (server, name) = after.split_once('/').unwrap();
    let relay = FreezableRelay::to(server.to_owned()).await;
    let through_relay = format!("{before}@127.0.0.1:{}/{name}", relay.port);
    let settings = json!({"audit": {"database": through_relay}});
    let gateway = GatewayProcess::start_with("hung-store", &snapshot, settings).await;
    relay.freeze();
    let log = gateway.terminate().await;
    assert!(
        log.contains("could not give up the claim of this gateway_id")
            && log.contains("did not answer within"),
        "{log}"
    );
    drop(database);
}

//! One state directory, one running gateway; one JSON-lines audit file, one writer. A second
//! gateway started on a running one's `server.state_dir` (its audit journal, object map and
//! last-known-good configuration) or on its JSON-lines audit file does not start, and says why
//! (`gateway/src/state_lock.rs`, `audit/src/jsonl.rs`). Real gateway processes.

use serde_json::{Value, json};

use crate::harness::*;

fn pool(url: &str) -> Value {
    json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", url, 1)]}])
}

#[tokio::test]
async fn a_second_gateway_on_a_running_gateways_state_dir_does_not_start() {
    let simulator = simulator("state-dir").await;
    let snapshot = snapshot(1, pool(&simulator.url()));
    let state = tempfile::tempdir().unwrap();
    let settings = json!({"state_dir": state.path()});

    let first = GatewayProcess::start_with("first", &snapshot, settings.clone()).await;
    let refused = GatewayProcess::try_start_with("second", &snapshot, settings.clone())
        .await
        .err()
        .expect("a second gateway on the state directory of a running one must not start");
    assert!(
        refused.contains(&format!(
            "server.state_dir {} is in use by another gateway (process ",
            state.path().display()
        )) && refused.contains("give each gateway its own state_dir"),
        "{refused}"
    );
    // The first goes on serving.
    let answered = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/healthz", first.url))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);

    // Killed, the first leaves no lock behind: the operating system drops it with the process.
    first.stop().await;
    let second = GatewayProcess::start_with("second", &snapshot, settings).await;
    second.terminate().await;
}

#[tokio::test]
async fn a_second_gateway_on_a_running_gateways_audit_file_does_not_start() {
    let simulator = simulator("jsonl-file").await;
    let snapshot = snapshot(1, pool(&simulator.url()));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("calls.jsonl");
    // Each gateway has a state directory of its own (the harness's): only the file is shared.
    let settings = json!({"audit": {"jsonl": file}});

    let first = GatewayProcess::start_with("first", &snapshot, settings.clone()).await;
    let refused = GatewayProcess::try_start_with("second", &snapshot, settings.clone())
        .await
        .err()
        .expect("a second gateway appending to a running one's audit file must not start");
    assert!(
        refused.contains(&format!("opening audit file {}", file.display()))
            && refused.contains("another process (a second gateway?) appends to this file"),
        "{refused}"
    );
    first.terminate().await;
    let second = GatewayProcess::start_with("second", &snapshot, settings).await;
    second.terminate().await;
}

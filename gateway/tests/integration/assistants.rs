//! A run that names no model runs its assistant's: with access rules, that deployment must be
//! granted to the caller as if the run named it, read from the member the run goes to.

use gatehouse_simulator::{Fault, RetryHint};
use serde_json::{Value, json};

use crate::harness::*;

const API: &str = "api-version=2024-05-01-preview";

/// A gateway whose subscription may make resource calls and run `gpt-4o-mini` only.
async fn gateway_with_rules(sim_url: &str) -> TestGateway {
    let mut value = serde_json::to_value(snapshot(
        1,
        json!([{"id": "p", "deployments": ["*"], "serves_resources": true,
                "members": [member("a", sim_url, 1)]}]),
    ))
    .unwrap();
    value["access_rules"] = json!([
        {"id": "mini-and-resources", "grantee": {"kind": "subscription", "id": "team-a"},
         "deployments": ["gpt-4o-mini"], "resources": true}
    ]);
    TestGateway::start(serde_json::from_value(value).unwrap()).await
}

/// Creates an assistant on `model` at the simulator itself, as one made before the rules were
/// narrowed, or by someone else, is; its id.
async fn assistant_at_member(sim_url: &str, model: &str) -> String {
    let response = reqwest::Client::new()
        .post(format!("{sim_url}/openai/assistants?{API}"))
        .header("api-key", BACKEND_KEY)
        .json(&json!({"model": model, "instructions": "help"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The runs the simulator was sent (it answers them 404: it has no runs, and need not).
fn runs_sent(sim: &gatehouse_simulator::RunningSimulator) -> usize {
    sim.requests()
        .iter()
        .filter(|seen| seen.method == "POST" && seen.path.contains("/runs"))
        .count()
}

/// The reads of assistant `id` the simulator was sent.
fn assistant_reads(sim: &gatehouse_simulator::RunningSimulator, id: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|seen| {
            seen.method == "GET" && seen.path.starts_with(&format!("/openai/assistants/{id}?"))
        })
        .count()
}

#[tokio::test]
async fn a_run_without_a_model_runs_only_an_assistant_whose_deployment_the_caller_is_granted() {
    let sim = simulator("assistant-runs").await;
    let gw = gateway_with_rules(&sim.url()).await;
    let ungranted = assistant_at_member(&sim.url(), "gpt-4o").await;
    let granted = assistant_at_member(&sim.url(), "gpt-4o-mini").await;

    // A run, and a thread-and-run, on the ungranted assistant: refused before any run is sent.
    for path in ["/openai/threads/thread_1/runs", "/openai/threads/runs"] {
        let response = gw
            .post(&format!("{path}?{API}"))
            .json(&json!({"assistant_id": ungranted}))
            .send()
            .await
            .unwrap();
        let message = azure_error(response, 403).await;
        assert!(
            message.contains("The run's assistant runs deployment 'gpt-4o'"),
            "{message}"
        );
    }
    assert_eq!(runs_sent(&sim), 0);
    assert_eq!(assistant_reads(&sim, &ungranted), 2);
    // The gateway read the assistant with the member's credential, never the client's key.
    for seen in sim.requests() {
        assert!(
            seen.headers.iter().all(|(_, value)| !value.contains(KEY)),
            "{:?}",
            seen.headers
        );
    }

    // A run naming a granted model overrides the assistant's: the assistant is not read.
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": ungranted, "model": "gpt-4o-mini"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "the simulator's answer to the run");
    assert_eq!(runs_sent(&sim), 1);
    assert_eq!(assistant_reads(&sim, &ungranted), 2);

    // The granted assistant runs.
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": granted}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "the simulator's answer to the run");
    assert_eq!(runs_sent(&sim), 2);
    assert_eq!(assistant_reads(&sim, &granted), 1);

    // An assistant the member does not have: its 404 reaches the client, no run is sent.
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": "asst_missing"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].is_object(), "{body}");
    assert_eq!(runs_sent(&sim), 2);

    // An assistant id that is not one: 400, nothing read.
    let before = sim.requests().len();
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": "../files/x"}))
        .send()
        .await
        .unwrap();
    let message = azure_error(response, 400).await;
    assert!(message.contains("assistant_id"), "{message}");
    assert_eq!(sim.requests().len(), before);

    // A throttled member cannot say what the run runs: the run is not sent, the client is told
    // when to come back.
    sim.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(7),
        times: Some(1),
    });
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": granted}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(runs_sent(&sim), 2);

    // The refusals are on record like every call.
    let records = gw.records(7).await;
    let refused: Vec<_> = records
        .iter()
        .filter(|record| record.response_code == 403)
        .collect();
    assert_eq!(refused.len(), 2, "{records:?}");
    assert!(
        refused
            .iter()
            .all(|record| record.last_error_reason.as_deref() == Some("not_permitted"))
    );
}

/// Without access rules nothing is read: the run goes straight to its member.
#[tokio::test]
async fn without_access_rules_a_run_is_sent_without_reading_its_assistant() {
    let sim = simulator("assistant-runs-open").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["*"], "serves_resources": true,
                "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let assistant = assistant_at_member(&sim.url(), "gpt-4o").await;
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .json(&json!({"assistant_id": assistant}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "the simulator's answer to the run");
    assert_eq!(runs_sent(&sim), 1);
    assert_eq!(assistant_reads(&sim, &assistant), 0);
}

/// The assistant is read with the client's `OpenAI-Beta`: OpenAI answers an Assistants read
/// without `assistants=v2` with 400 `invalid_beta`, so a run through an OpenAI member would get
/// that answer instead of running.
#[tokio::test]
async fn the_assistant_is_read_with_the_clients_openai_beta_header() {
    let sim = simulator("assistant-runs-beta").await;
    let gw = gateway_with_rules(&sim.url()).await;
    let assistant = assistant_at_member(&sim.url(), "gpt-4o-mini").await;
    let response = gw
        .post(&format!("/openai/threads/thread_1/runs?{API}"))
        .header("OpenAI-Beta", "assistants=v2")
        .json(&json!({"assistant_id": assistant}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404, "the simulator's answer to the run");
    let read = sim
        .requests()
        .into_iter()
        .find(|seen| {
            seen.method == "GET"
                && seen
                    .path
                    .starts_with(&format!("/openai/assistants/{assistant}?"))
        })
        .expect("the assistant was read");
    assert_eq!(read.header("openai-beta"), Some("assistants=v2"));
    // Nothing else of the client's is: never its key.
    assert!(
        read.headers.iter().all(|(_, value)| !value.contains(KEY)),
        "{:?}",
        read.headers
    );
    assert_eq!(runs_sent(&sim), 1);
}

//! Alert rules against the embedded store (SQLite) and a local webhook receiver: each rule fires
//! once and resolves once, and a notification that could not be delivered is delivered later.
#![expect(clippy::unwrap_used, reason = "test code")]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use gatehouse_audit::AuditRecord;
use gatehouse_portal_core::insights::AuditSource;
use gatehouse_portal_core::insights::alerts::{Alerter, parse_rules};
use gatehouse_portal_core::insights::embedded::EmbeddedSource;
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use serde_json::Value;
use time::{Duration, OffsetDateTime};

#[derive(Default)]
struct Receiver {
    messages: Mutex<Vec<String>>,
    fail_next: AtomicU32,
}

async fn receive(State(receiver): State<Arc<Receiver>>, Json(body): Json<Value>) -> StatusCode {
    if receiver.fail_next.load(Ordering::SeqCst) > 0 {
        receiver.fail_next.fetch_sub(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    receiver
        .messages
        .lock()
        .unwrap()
        .push(body["text"].as_str().unwrap().to_owned());
    StatusCode::OK
}

fn record(i: usize, at: OffsetDateTime, status: u16, total_time: u64) -> AuditRecord {
    AuditRecord {
        time_generated: at,
        correlation_id: format!("alert-{i:04}"),
        gateway_id: "gw-1".to_owned(),
        operation_id: Some(OperationId::ChatCompletionsCreate),
        caller_ip_address: "198.51.100.7".to_owned(),
        peer_ip_address: "10.0.0.1".to_owned(),
        method: "POST".to_owned(),
        url: "/openai/deployments/chat/chat/completions".to_owned(),
        client_protocol: "HTTP/1.1".to_owned(),
        response_code: status,
        is_request_success: status < 400,
        backend_response_code: Some(status),
        backend_id: Some("east".to_owned()),
        backend_url: None,
        request_size: 1,
        response_size: 1,
        total_time,
        backend_time: total_time,
        time_to_first_byte: None,
        apim_subscription_id: Some("team-a".to_owned()),
        product_id: None,
        user_id: Some("oid".to_owned()),
        user_name: None,
        tenant_id: None,
        groups: vec!["g-red".to_owned()],
        deployment_name: Some("chat".to_owned()),
        model_name: Some("gpt-4o".to_owned()),
        api_version: None,
        is_stream_completion: false,
        usage: Some(TokenUsage {
            prompt_tokens: 100,
            completion_tokens: 100,
            total_tokens: 200,
            ..TokenUsage::default()
        }),
        attempts: vec![],
        backend_request_body: None,
        request_body_truncated: false,
        backend_response_body: None,
        response_body_truncated: false,
        request_messages: None,
        response_messages: None,
        client_aborted: false,
        last_error_reason: None,
        last_error_message: None,
        chain: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_rule_fires_once_and_resolves_once() {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let source = EmbeddedSource::open(&url).await.unwrap();
    // Noon today: 4 calls in the last 10 minutes, 2 failing and slow.
    let now = OffsetDateTime::now_utc().replace_time(time::macros::time!(12:00));
    let mut records = vec![
        record(0, now - Duration::minutes(9), 200, 100),
        record(1, now - Duration::minutes(8), 200, 100),
        record(2, now - Duration::minutes(7), 500, 5_000),
        record(3, now - Duration::minutes(6), 502, 6_000),
    ];
    source.store().write(&records).await.unwrap();
    let rules = parse_rules(
        r#"[{"name": "errors", "condition": {"kind": "error_rate", "minutes": 10, "above": 0.25, "min_requests": 4}},
            {"name": "slow", "condition": {"kind": "latency_p95", "minutes": 10, "above_ms": 2000}},
            {"name": "red budget", "condition": {"kind": "daily_tokens", "dimension": "group", "value": "g-red", "above": 500}},
            {"name": "blue budget", "condition": {"kind": "daily_tokens", "dimension": "group", "value": "g-blue", "above": 500}}]"#,
    )
    .unwrap();
    let embedded = source.clone();
    let source: Arc<dyn AuditSource> = Arc::new(source);
    let alerter = Alerter::new(source, rules, Some(hook.parse().unwrap())).unwrap();

    let fired = alerter.tick(now).await;
    assert_eq!(fired.len(), 3, "{fired:?}");
    assert!(
        fired[0].starts_with("FIRING: errors: 50.0% errors in 4 calls"),
        "{fired:?}"
    );
    // p95 from the latency histogram: within a bucket (about 12 %) of the slowest call, 6000 ms.
    let p95: i64 = fired[1]
        .strip_prefix("FIRING: slow: p95 latency ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("{fired:?}"));
    assert!((5_300..=6_800).contains(&p95), "{fired:?}");
    assert!(
        fired[2].starts_with("FIRING: red budget: 800 tokens today"),
        "{fired:?}"
    );
    assert_eq!(receiver.messages.lock().unwrap().clone(), fired);
    // Still true a minute later: nothing new is sent.
    assert!(alerter.tick(now + Duration::minutes(1)).await.is_empty());
    let states = alerter.states();
    assert!(states[0].firing && states[1].firing && states[2].firing && !states[3].firing);
    assert_eq!(states[0].since, Some(now));

    // Twelve good, fast calls: the error rate and the latency resolve, once each; the first
    // delivery fails and is made at the next evaluation.
    for i in 0..12 {
        records.push(record(
            10 + i,
            now + Duration::seconds(70 + i as i64),
            200,
            50,
        ));
    }
    embedded.store().write(&records[4..]).await.unwrap();
    receiver.fail_next.store(1, Ordering::SeqCst);
    let later = now + Duration::minutes(9);
    let first = alerter.tick(later).await;
    assert_eq!(
        first.len(),
        1,
        "one of two resolutions could not be delivered: {first:?}"
    );
    let states = alerter.states();
    assert!(
        states
            .iter()
            .any(|s| s.error.as_deref() == Some("webhook answered HTTP 503"))
    );
    let second = alerter.tick(later + Duration::seconds(1)).await;
    assert_eq!(second.len(), 1, "{second:?}");
    let mut resolved: Vec<String> = first.into_iter().chain(second).collect();
    resolved.sort();
    assert!(resolved[0].starts_with("RESOLVED: errors:"), "{resolved:?}");
    assert!(resolved[1].starts_with("RESOLVED: slow:"), "{resolved:?}");
    assert!(alerter.tick(later + Duration::seconds(2)).await.is_empty());

    // The next day the budget starts again.
    let tomorrow = now + Duration::days(1);
    let next_day = alerter.tick(tomorrow).await;
    assert_eq!(next_day.len(), 1);
    assert!(next_day[0].starts_with("RESOLVED: red budget: 0 tokens today"));
    assert_eq!(receiver.messages.lock().unwrap().len(), 6);
}

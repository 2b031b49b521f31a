//! Usage limits (pipeline step 6): 429 for rates, 403 for quotas, tokens reserved before the call
//! and reconciled after it, in one process and across two gateway processes sharing Redis.

use std::time::{Duration, Instant};

use gatehouse_gateway::settings::{LimitSettings, OnStoreError, RedisUrl};
use gatehouse_schema::ConfigSnapshot;
use gatehouse_simulator::RunningSimulator;
use serde_json::{Value, json};

use crate::harness::*;

/// Nothing listens here: a Redis that is down.
const NO_REDIS: &str = "redis://127.0.0.1:1";

/// A snapshot with one pool (`gpt-4o` on `sim`) and these limit rules.
fn limited(sim: &RunningSimulator, limits: Value) -> ConfigSnapshot {
    let mut snapshot = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    snapshot.limits = serde_json::from_value(limits).unwrap();
    snapshot
}

/// The harness's chat request with `max_tokens`.
fn chat_with_max(max_tokens: u64, stream: bool) -> Value {
    let mut body = chat(None, stream);
    body["max_tokens"] = json!(max_tokens);
    body
}

fn header(response: &reqwest::Response, name: &str) -> Option<u64> {
    response
        .headers()
        .get(name)
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

/// Limit settings on Redis under a prefix of this test's own.
fn on_redis(url: &str, policy: OnStoreError) -> LimitSettings {
    LimitSettings {
        redis_url: Some(RedisUrl::from(url.to_owned())),
        key_prefix: format!("test:{}:", uuid::Uuid::new_v4()),
        on_store_error: policy,
        ..LimitSettings::default()
    }
}

#[tokio::test]
async fn a_token_rate_limit_answers_429_with_exact_waits_and_no_backend_call() {
    let sim = simulator("tpm").await;
    let gw = TestGateway::start(limited(
        &sim,
        json!([{"id": "team-tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 100}]),
    ))
    .await;
    let first = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(60, false))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let reserved = header(&first, "x-gatehouse-consumed-tokens").unwrap();
    assert!(reserved > 60, "prompt + max_tokens, got {reserved}");
    assert_eq!(
        header(&first, "x-gatehouse-remaining-tokens"),
        Some(100 - reserved)
    );
    first.bytes().await.unwrap();

    let refused = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(60, false))
        .send()
        .await
        .unwrap();
    let seconds = header(&refused, "retry-after").expect("Retry-After");
    let millis = header(&refused, "retry-after-ms").expect("retry-after-ms");
    let message = azure_error(refused, 429).await;
    assert!(
        message.starts_with("Requests to deployment 'gpt-4o' have exceeded the token rate limit of 100 tokens per minute set by limit 'team-tpm'."),
        "{message}"
    );
    // The wait is the deficit at 100 tokens a minute: at most a whole call's worth (60 s per
    // 100 tokens), and Retry-After is its whole seconds rounded up.
    assert!(millis > 0 && millis <= reserved * 600, "{millis} ms");
    assert_eq!(seconds, millis.div_ceil(1000));
    assert_eq!(sim.hits(), 1, "the refused call never reached a backend");

    // The refused call is on record, and counted per limit.
    let records = gw.records(2).await;
    let record = records.iter().find(|r| r.response_code == 429).unwrap();
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("token_rate_limited")
    );
    assert!(record.attempts.is_empty());
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            r#"gatehouse_limit_refusals_total{limit="team-tpm",kind="tokens_per_minute"} 1"#
        ),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_request_rate_limit_counts_calls_and_reports_what_is_left() {
    let sim = simulator("rpm").await;
    let gw = TestGateway::start(limited(
        &sim,
        json!([{"id": "two-a-minute", "subject": {"kind": "subscription", "id": "team-a"},
                "deployments": ["gpt-*"], "requests_per_minute": 2}]),
    ))
    .await;
    // A deployment no pool serves is answered 404 and counts nothing, though the rule covers it.
    for _ in 0..3 {
        let unserved = gw
            .post(&chat_path("gpt-unserved"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        azure_error(unserved, 404).await;
    }
    let mut remaining = Vec::new();
    for _ in 0..2 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        remaining.push(header(&response, "x-gatehouse-remaining-requests").unwrap());
        // No token limit applies: no token headers.
        assert_eq!(header(&response, "x-gatehouse-remaining-tokens"), None);
        assert_eq!(header(&response, "x-gatehouse-consumed-tokens"), None);
    }
    assert_eq!(remaining, [1, 0]);
    let refused = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    // One call refills in 30 s at two a minute.
    let millis = header(&refused, "retry-after-ms").unwrap();
    assert!((1..=30_000).contains(&millis), "{millis}");
    let message = azure_error(refused, 429).await;
    assert!(
        message.contains("request rate limit of 2 requests per minute"),
        "{message}"
    );
    assert_eq!(sim.hits(), 2);
    gw.stop().await;
}

#[tokio::test]
async fn an_exhausted_quota_answers_403_until_the_period_ends() {
    let sim = simulator("quota").await;
    let gw = TestGateway::start(limited(
        &sim,
        json!([{"id": "daily", "subject": {"kind": "each_subscription"},
                "token_quota": {"tokens": 200, "period": "daily"}}]),
    ))
    .await;
    let mut admitted = 0;
    let mut refusal = None;
    for _ in 0..20 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(20, false))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            assert!(header(&response, "x-gatehouse-remaining-quota-tokens").is_some());
            response.bytes().await.unwrap();
            admitted += 1;
            // Let the call's reconciliation land before the next one.
            gw.records(admitted).await;
        } else {
            refusal = Some(response);
            break;
        }
    }
    let refusal = refusal.expect("the quota ran out within 20 calls");
    assert!(admitted >= 2, "{admitted}");
    let wait = header(&refusal, "retry-after").unwrap();
    assert!((1..=86_400).contains(&wait), "{wait}");
    let message = azure_error(refusal, 403).await;
    assert!(
        message.starts_with("Token quota is exceeded. Limit 'daily' allows 200 tokens per day to deployment 'gpt-4o';"),
        "{message}"
    );
    assert_eq!(sim.hits(), admitted as u64);
    // What was admitted, by the backend's own counts, stays within the quota.
    let used: u64 = gw
        .records(admitted + 1)
        .await
        .iter()
        .filter_map(|r| r.usage.map(|u| u.total_tokens))
        .sum();
    assert!(used <= 200, "{used}");
    gw.stop().await;
}

#[tokio::test]
async fn unused_reservations_are_refunded_for_plain_and_streamed_calls() {
    let sim = simulator("refund").await;
    for stream in [false, true] {
        let gw = TestGateway::start(limited(
            &sim,
            json!([{"id": "tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 1000}]),
        ))
        .await;
        // 500 completion tokens reserved; the simulator answers in about twenty.
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(500, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let reserved = header(&response, "x-gatehouse-consumed-tokens").unwrap();
        assert!(reserved > 500);
        response.bytes().await.unwrap();
        // The record is handed on after the reservation is settled.
        let record = gw.records(1).await.remove(0);
        assert_eq!(record.is_stream_completion, stream);
        let used = record.usage.unwrap().total_tokens;
        assert!(used < 100, "{used}");

        // Without the refund only 1000 - reserved < 500 would be left, and this call refused.
        let next = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(500, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 200, "stream: {stream}");
        let reserved_next = header(&next, "x-gatehouse-consumed-tokens").unwrap();
        let remaining = header(&next, "x-gatehouse-remaining-tokens").unwrap();
        // Left: the limit minus the first call's real usage and this reservation (plus whatever
        // refilled meanwhile, which only adds; never more than the limit minus the reservation).
        assert!(
            (1000 - used - reserved_next..=1000 - reserved_next).contains(&remaining),
            "{remaining} left after {used} used and {reserved_next} reserved"
        );
        next.bytes().await.unwrap();
        gw.stop().await;
    }
}

/// The tokens the simulator reports for the harness's chat request, measured.
async fn tokens_per_call(sim: &RunningSimulator) -> u64 {
    let answer: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}{}", sim.url(), chat_path("gpt-4o")))
        .json(&chat_with_max(16, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    answer["usage"]["total_tokens"].as_u64().unwrap()
}

/// The bound every concurrency test checks: the tokens admitted stay within the limit, plus what
/// refilled while the test ran (the bucket refills at limit/60 per second), plus one call's
/// estimation error (the estimate of one call, an upper bound of its error).
fn assert_within_limit(
    admitted_tokens: u64,
    admitted_calls: usize,
    limit: u64,
    elapsed: Duration,
    estimate: u64,
) {
    let refilled = (elapsed.as_secs_f64() * limit as f64 / 60.0).ceil() as u64;
    assert!(
        admitted_tokens <= limit + refilled + estimate,
        "{admitted_calls} calls used {admitted_tokens} tokens; limit {limit}, refilled {refilled}, one estimate {estimate}"
    );
    // The limit did bind: not every call was admitted.
    assert!(admitted_calls < 50, "{admitted_calls} of 50 admitted");
}

#[tokio::test]
async fn fifty_parallel_calls_cannot_overrun_a_token_limit() {
    let sim = simulator("parallel").await;
    let per_call = tokens_per_call(&sim).await;
    // Unlimited, the fifty calls would use more than the limit.
    assert!(50 * per_call > 1000, "{per_call}");
    let gw = TestGateway::start(limited(
        &sim,
        json!([{"id": "tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 1000}]),
    ))
    .await;
    let started = Instant::now();
    let calls = (0..50).map(|_| {
        let request = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(16, false));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let reserved = header(&response, "x-gatehouse-consumed-tokens");
            response.bytes().await.unwrap();
            (status, reserved)
        }
    });
    let answers = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert!(answers.iter().all(|(s, _)| *s == 200 || *s == 429));
    let estimate = answers.iter().find_map(|(_, r)| *r).unwrap();
    let records = gw.records(50).await;
    let used: u64 = records
        .iter()
        .filter(|r| r.response_code == 200)
        .map(|r| r.usage.unwrap().total_tokens)
        .sum();
    assert_eq!(sim.hits() as usize, admitted + 1);
    assert_within_limit(used, admitted, 1000, elapsed, estimate);
    gw.stop().await;
}

#[tokio::test]
async fn two_gateway_processes_sharing_redis_hold_the_same_bound() {
    let sim = simulator("replicas").await;
    let per_call = tokens_per_call(&sim).await;
    assert!(50 * per_call > 1000, "{per_call}");
    let snapshot = limited(
        &sim,
        json!([{"id": "tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 1000}]),
    );
    let prefix = format!("test:replicas:{}:", uuid::Uuid::new_v4());
    let limits = json!({"redis_url": REDIS, "key_prefix": prefix, "on_store_error": "fail_closed"});
    let one = GatewayProcess::start("replica-1", &snapshot, limits.clone()).await;
    let two = GatewayProcess::start("replica-2", &snapshot, limits).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = Instant::now();
    let calls = (0..50).map(|i| {
        let url = if i % 2 == 0 { &one.url } else { &two.url };
        let request = client
            .post(format!("{url}{}", chat_path("gpt-4o")))
            .header("api-key", KEY)
            .json(&chat_with_max(16, false));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let reserved = header(&response, "x-gatehouse-consumed-tokens");
            let body: Value = response.json().await.unwrap();
            let used = body["usage"]["total_tokens"].as_u64();
            (status, reserved, used, i % 2)
        }
    });
    let answers = futures::future::join_all(calls).await;
    let elapsed = started.elapsed();
    assert!(
        answers.iter().all(|(s, ..)| *s == 200 || *s == 429),
        "{:?}",
        answers.iter().map(|a| a.0).collect::<Vec<_>>()
    );
    let admitted: Vec<_> = answers.iter().filter(|(s, ..)| *s == 200).collect();
    let estimate = admitted.iter().find_map(|(_, r, ..)| *r).unwrap();
    let used: u64 = admitted.iter().map(|(_, _, u, _)| u.unwrap()).sum();
    // Both replicas admitted calls, and together they stayed within the one limit.
    for replica in [0, 1] {
        assert!(
            admitted.iter().any(|(.., r)| *r == replica),
            "replica {replica} admitted nothing"
        );
    }
    assert_eq!(sim.hits() as usize, admitted.len() + 1);
    assert_within_limit(used, admitted.len(), 1000, elapsed, estimate);
    one.stop().await;
    two.stop().await;
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn redis_limits_hold_in_process_and_refunds_reach_redis() {
    let sim = simulator("redis-in-process").await;
    let settings = on_redis(REDIS, OnStoreError::FailClosed);
    let prefix = settings.key_prefix.clone();
    let gw = TestGateway::start_with_limits(
        limited(
            &sim,
            json!([{"id": "tpm", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 1000}]),
        ),
        settings,
    )
    .await;
    let first = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(500, false))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let reserved = header(&first, "x-gatehouse-consumed-tokens").unwrap();
    first.bytes().await.unwrap();
    let used = gw.records(1).await[0].usage.unwrap().total_tokens;
    // The refund runs on its own task; a bounded wait for it to land in Redis.
    let mut left = 0;
    for _ in 0..100 {
        let probe = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(1, false))
            .send()
            .await
            .unwrap();
        assert_eq!(probe.status(), 200);
        left = header(&probe, "x-gatehouse-remaining-tokens").unwrap();
        let probe_reserved = header(&probe, "x-gatehouse-consumed-tokens").unwrap();
        probe.bytes().await.unwrap();
        if left + probe_reserved + used + 200 >= 1000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        left + reserved > 1000,
        "the refund never arrived: {left} left"
    );
    gw.stop().await;
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn an_unreachable_redis_fails_open_by_default() {
    let sim = simulator("fail-open").await;
    let gw = TestGateway::start_with_limits(
        limited(
            &sim,
            json!([{"id": "rpm", "subject": {"kind": "each_subscription"}, "requests_per_minute": 1}]),
        ),
        on_redis(NO_REDIS, OnStoreError::FailOpen),
    )
    .await;
    for _ in 0..2 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        // Admitted unchecked: the second call passes a one-a-minute limit, and no limit headers.
        assert_eq!(response.status(), 200);
        assert_eq!(header(&response, "x-gatehouse-remaining-requests"), None);
    }
    assert_eq!(sim.hits(), 2);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("gatehouse_limit_store_errors_total 2"),
        "{metrics}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_unreachable_redis_refuses_calls_when_failing_closed() {
    let sim = simulator("fail-closed").await;
    let gw = TestGateway::start_with_limits(
        limited(
            &sim,
            json!([{"id": "rpm", "subject": {"kind": "each_subscription"}, "requests_per_minute": 100}]),
        ),
        on_redis(NO_REDIS, OnStoreError::FailClosed),
    )
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(response, 503).await;
    assert!(message.contains("cannot check usage limits"), "{message}");
    assert!(!message.contains("127.0.0.1"), "{message}");
    assert_eq!(sim.hits(), 0);
    let record = gw.records(1).await.remove(0);
    assert_eq!(
        record.last_error_reason.as_deref(),
        Some("limit_store_unavailable")
    );
    gw.stop().await;
}

#[tokio::test]
async fn calls_outside_a_rule_are_not_limited() {
    let sim = simulator("outside").await;
    let mut snapshot = limited(
        &sim,
        json!([
            {"id": "other-team", "subject": {"kind": "subscription", "id": "team-b"}, "requests_per_minute": 1},
            {"id": "mini-only", "subject": {"kind": "each_subscription"}, "deployments": ["*-mini"], "requests_per_minute": 1}
        ]),
    );
    // Another team, with a key of its own (a limit names a subscription of the snapshot).
    snapshot.subscriptions.push(
        serde_json::from_value(json!({"id": "team-b", "display_name": "Team B", "product": "research",
            "primary_key_hash": gatehouse_gateway::auth::hash_key("ghk_TeamBKey000000000000000000000000000").to_string()}))
        .unwrap(),
    );
    let gw = TestGateway::start(snapshot).await;
    for _ in 0..3 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(
            response
                .headers()
                .get("x-gatehouse-consumed-tokens")
                .is_none()
        );
    }
    gw.stop().await;
}

/// A pool whose member renames every call to a deployment of its own runs that one deployment
/// under any name a client gives: a per-deployment limit counts its calls on one counter, however
/// many names are invented. A pool that does not rename keeps a counter per name.
#[tokio::test]
async fn a_renaming_pool_counts_every_name_as_its_one_deployment() {
    let sim = simulator("renaming-limits").await;
    let mut renaming = member("a", &sim.url(), 1);
    renaming["deployment"] = json!("gpt-4o");
    let mut snapshot = snapshot(
        1,
        json!([
            {"id": "any-name", "deployments": ["*"], "members": [renaming]},
            {"id": "named", "deployments": ["m1", "m2"], "members": [member("b", &sim.url(), 1)]}
        ]),
    );
    snapshot.limits = serde_json::from_value(json!([
        {"id": "per-deployment", "subject": {"kind": "each_subscription"},
         "requests_per_minute": 2, "each_deployment": true}
    ]))
    .unwrap();
    let gw = TestGateway::start(snapshot).await;
    let call = |name: &'static str| gw.post(&chat_path(name)).json(&chat(None, false)).send();
    for name in ["alpha", "beta"] {
        let response = call(name).await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
    }
    let refused = call("gamma").await.unwrap();
    let message = azure_error(refused, 429).await;
    assert!(message.contains("per-deployment"), "{message}");
    // The named pool's deployments each have their own counter.
    for name in ["m1", "m1", "m2", "m2"] {
        let response = call(name).await.unwrap();
        assert_eq!(response.status(), 200, "{name}");
    }
    assert_eq!(call("m1").await.unwrap().status(), 429);
}

/// A rule for a deployment covers the calls a renaming pool runs on it, under whatever name they
/// give: an invented name does not escape the limit of the model it runs.
#[tokio::test]
async fn a_rule_for_a_deployment_covers_the_calls_a_pool_renames_to_it() {
    let sim = simulator("renamed-rule").await;
    let mut renaming = member("a", &sim.url(), 1);
    renaming["deployment"] = json!("gpt-4o");
    let mut snapshot = snapshot(
        1,
        json!([{"id": "any-name", "deployments": ["*"], "members": [renaming]}]),
    );
    snapshot.limits = serde_json::from_value(json!([
        {"id": "gpt-4o-rate", "deployments": ["gpt-4o"], "subject": {"kind": "each_subscription"},
         "requests_per_minute": 1}
    ]))
    .unwrap();
    let gw = TestGateway::start(snapshot).await;
    let call = |name: &'static str| gw.post(&chat_path(name)).json(&chat(None, false)).send();
    assert_eq!(call("alpha").await.unwrap().status(), 200);
    let refused = call("beta").await.unwrap();
    let message = azure_error(refused, 429).await;
    assert!(message.contains("gpt-4o-rate"), "{message}");
    assert_eq!(sim.hits(), 1);
}

/// A chat completion of gpt-4o that used 20 tokens, whatever it is asked.
fn chat_of_20_tokens() -> axum::routing::MethodRouter {
    axum::routing::post(|| async {
        axum::Json(
            json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Oslo."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 15, "completion_tokens": 5, "total_tokens": 20}}),
        )
    })
}

/// A pool of the one member at `url`, running `deployment` and serving resource calls, under a
/// daily token quota of `tokens` for each subscription per rule of `rules`: its id, and whether it
/// covers `deployment` alone (else every call).
fn daily_quotas(
    url: &str,
    deployment: &str,
    rules: &[(&str, bool)],
    tokens: u64,
) -> ConfigSnapshot {
    let mut snapshot = snapshot(
        1,
        json!([{"id": "p", "deployments": [deployment], "serves_resources": true,
            "members": [member("a", url, 1)]}]),
    );
    let rules: Vec<Value> = rules
        .iter()
        .map(|(id, deployment_only)| {
            let mut rule = json!({"id": id, "subject": {"kind": "each_subscription"},
                "token_quota": {"tokens": tokens, "period": "daily"}});
            if *deployment_only {
                rule["deployments"] = json!([deployment]);
            }
            rule
        })
        .collect();
    snapshot.limits = serde_json::from_value(Value::Array(rules)).unwrap();
    snapshot
}

/// Each record's operation, total tokens and deployment, in the order the records came.
fn tokens_by_call(
    records: &[gatehouse_schema::AuditRecord],
) -> Vec<(String, Option<u64>, Option<String>)> {
    records
        .iter()
        .map(|r| {
            (
                r.operation_id.map(|o| o.to_string()).unwrap_or_default(),
                r.usage.map(|u| u.total_tokens),
                r.deployment_name.clone(),
            )
        })
        .collect()
}

/// A member for the background-response test: a chat call uses 20 tokens; a background
/// response is answered `queued` without usage (its model work comes after the call); the first
/// fetch of a response finds it `in_progress`, every later one `completed` with the 20,010 tokens
/// it used, as the Responses API does (`GET /responses/{id}` returns the response object with
/// its `usage` once it has ended).
async fn responses_member() -> String {
    use axum::routing::{get, post};
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new()
        .route("/openai/deployments/gpt-4o/chat/completions", chat_of_20_tokens())
        .route(
            "/openai/v1/responses",
            post(|| async {
                axum::Json(json!({"id": "resp_bg", "object": "response", "model": "gpt-4o",
                    "status": "queued", "background": true, "output": [], "usage": null}))
            }),
        )
        .route(
            "/openai/v1/responses/{id}",
            get(move |axum::extract::Path(id): axum::extract::Path<String>| {
                let fetch = fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if fetch == 0 {
                        return axum::Json(json!({"id": id, "object": "response", "model": "gpt-4o",
                            "status": "in_progress", "background": true, "output": [], "usage": null}));
                    }
                    axum::Json(json!({"id": id, "object": "response", "model": "gpt-4o", "status": "completed",
                        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A long essay."}]}],
                        "usage": {"input_tokens": 10, "output_tokens": 20000, "total_tokens": 20010}}))
                }
            }),
        );
    serve_stub(app).await
}

/// A background response is answered before its model runs: what was reserved for it stays
/// charged until a fetch sees it end, and is then settled with the usage it reports — once,
/// and on that fetch's record, so that the usage figures hold it. A stored object fetched again
/// after that carries the usage of work already counted: it is not charged to the caller again
/// (nor put on the fetch's record), however often it is polled.
#[tokio::test]
async fn a_background_response_is_charged_what_it_used_once_a_fetch_sees_it_end() {
    let url = responses_member().await;
    const QUOTA: u64 = 1_000_000;
    let gw = TestGateway::start(daily_quotas(&url, "gpt-4o", &[("daily", false)], QUOTA)).await;
    let probe = || async {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat_with_max(10, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let reserved = header(&response, "x-gatehouse-consumed-tokens").unwrap();
        let remaining = header(&response, "x-gatehouse-remaining-quota-tokens").unwrap();
        response.bytes().await.unwrap();
        (reserved, remaining)
    };
    let (reserved, remaining) = probe().await;
    assert_eq!(remaining, QUOTA - reserved);

    let created = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o", "input": "Write an essay.", "background": true, "max_output_tokens": 5000}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let background = header(&created, "x-gatehouse-consumed-tokens").unwrap();
    assert!(background > 5000, "{background}");
    created.bytes().await.unwrap();
    let fetch = || async {
        let fetched = gw.get("/openai/v1/responses/resp_bg").send().await.unwrap();
        assert_eq!(fetched.status(), 200);
        fetched.json::<Value>().await.unwrap()
    };
    // Still running: the reservation stays as it was.
    assert_eq!(fetch().await["status"], "in_progress");
    gw.records(3).await;
    let (reserved, remaining) = probe().await;
    assert_eq!(remaining, QUOTA - 20 - background - reserved);

    for _ in 0..3 {
        assert_eq!(fetch().await["usage"]["total_tokens"], 20010);
    }
    let records = gw.records(7).await;
    let mut usage = tokens_by_call(&records);
    usage.sort();
    let get = |tokens: Option<u64>, deployment: Option<&str>| {
        (
            "get_response".to_owned(),
            tokens,
            deployment.map(str::to_owned),
        )
    };
    assert_eq!(
        usage,
        [
            (
                "chatcompletions_create".to_owned(),
                Some(20),
                Some("gpt-4o".to_owned())
            ),
            (
                "chatcompletions_create".to_owned(),
                Some(20),
                Some("gpt-4o".to_owned())
            ),
            (
                "create_response".to_owned(),
                None,
                Some("gpt-4o".to_owned())
            ),
            get(None, None),
            get(None, None),
            get(None, None),
            // The fetch that saw it end, under the deployment that ran it.
            get(Some(20010), Some("gpt-4o")),
        ]
    );

    // Charged: the two chats' 20 tokens each and the background response's 20,010.
    let (reserved, remaining) = probe().await;
    assert_eq!(remaining, QUOTA - 20 - 20 - 20010 - reserved);
    gw.stop().await;
}

/// A background response fetched at its end with an answer too large to parse whole (over
/// 8 MiB: the image-generation tool's images in its output) is settled too: its `object`, `id`
/// and `status` come from the answer's start, its usage from the answer's end.
#[tokio::test]
async fn a_background_response_too_large_to_parse_is_settled_from_its_ends() {
    use axum::routing::{get, post};
    let image = "A".repeat(9 * 1024 * 1024);
    let app = axum::Router::new()
        .route(
            "/openai/v1/responses",
            post(|| async {
                axum::Json(json!({"id": "resp_big", "object": "response", "model": "gpt-4o",
                    "status": "queued", "background": true, "output": [], "usage": null}))
            }),
        )
        .route(
            "/openai/v1/responses/{id}",
            // In the API's order (the response object opens with its id, object and status),
            // which `json!` would not keep.
            get(move || {
                let body = format!(
                    r#"{{"id":"resp_big","object":"response","created_at":1,"status":"completed","model":"gpt-4o","output":[{{"type":"image_generation_call","id":"ig_1","status":"completed","result":"{image}"}}],"usage":{{"input_tokens":100,"output_tokens":6000,"total_tokens":6100}}}}"#
                );
                async move { ([(http::header::CONTENT_TYPE, "application/json")], body) }
            }),
        );
    let url = serve_stub(app).await;
    const QUOTA: u64 = 1_000_000;
    let gw = TestGateway::start(daily_quotas(&url, "gpt-4o", &[("daily", false)], QUOTA)).await;
    let created = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o", "input": "Draw a cat.", "background": true, "max_output_tokens": 10000}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let reserved = header(&created, "x-gatehouse-consumed-tokens").unwrap();
    assert!(reserved > 10_000, "{reserved}");
    created.bytes().await.unwrap();
    let fetched = gw
        .get("/openai/v1/responses/resp_big")
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    assert!(fetched.bytes().await.unwrap().len() > 9 * 1024 * 1024);
    let record = gw.records(2).await.remove(1);
    assert_eq!(record.usage.map(|u| u.total_tokens), Some(6100));
    // The reservation is settled at 6,100: a call reserving nothing sees what is left.
    let next = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o", "input": "x", "background": true, "max_output_tokens": 1}))
        .send()
        .await
        .unwrap();
    let next_reserved = header(&next, "x-gatehouse-consumed-tokens").unwrap();
    let remaining = header(&next, "x-gatehouse-remaining-quota-tokens").unwrap();
    assert_eq!(remaining, QUOTA - 6100 - next_reserved);
    gw.stop().await;
}

/// A member for the run test: a run created waits for tool outputs; tool outputs submitted
/// answer the run queued again; the run fetched has `completed` with the 3,000 tokens its steps
/// used, as the Assistants API reports a run's `usage` once it has ended.
async fn runs_member() -> String {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route(
            "/openai/threads/{thread}/runs",
            post(|| async {
                axum::Json(json!({"id": "run_1", "object": "thread.run", "thread_id": "thread_1",
                    "status": "requires_action", "model": "gpt-4o", "usage": null,
                    "required_action": {"type": "submit_tool_outputs", "submit_tool_outputs":
                        {"tool_calls": [{"id": "call_1", "type": "function",
                            "function": {"name": "weather", "arguments": "{}"}}]}}}))
            }),
        )
        .route(
            "/openai/threads/{thread}/runs/{run}/submit_tool_outputs",
            post(|| async {
                axum::Json(json!({"id": "run_1", "object": "thread.run", "thread_id": "thread_1",
                    "status": "queued", "model": "gpt-4o", "usage": null}))
            }),
        )
        .route(
            "/openai/threads/{thread}/runs/{run}",
            get(|| async {
                axum::Json(json!({"id": "run_1", "object": "thread.run", "thread_id": "thread_1",
                    "status": "completed", "model": "gpt-4o",
                    "usage": {"prompt_tokens": 2000, "completion_tokens": 1000, "total_tokens": 3000}}))
            }),
        );
    serve_stub(app).await
}

/// An Assistants run that waits for tool outputs goes on through calls that name no deployment
/// and may reach another replica: its reservation waits in Redis for the call that sees the run
/// end, and is settled there with the run's usage, once — on the rule for the deployment it
/// runs, which the later calls do not name, and on the rule over every call, which charges the
/// tool outputs' own reservations back.
#[tokio::test]
async fn a_run_that_waits_for_tool_outputs_is_charged_what_it_used_across_replicas() {
    let url = runs_member().await;
    let snapshot = daily_quotas(
        &url,
        "gpt-4o",
        &[("gpt-4o-daily", true), ("all-daily", false)],
        1_000_000,
    );
    let settings = on_redis(REDIS, OnStoreError::FailClosed);
    let prefix = settings.key_prefix.clone();
    let one = TestGateway::start_with_limits(snapshot.clone(), settings.clone()).await;
    let two = TestGateway::start_with_limits(snapshot, settings).await;
    const RUNS: &str = "/openai/threads/thread_1/runs";
    const VERSION: &str = "?api-version=2024-05-01-preview";

    let created = one
        .post(&format!("{RUNS}{VERSION}"))
        .json(&json!({"assistant_id": "asst_1", "model": "gpt-4o",
            "max_prompt_tokens": 1000, "max_completion_tokens": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    assert_eq!(header(&created, "x-gatehouse-consumed-tokens"), Some(1500));
    created.bytes().await.unwrap();
    one.records(1).await;
    assert_eq!(quota_by_rule(&prefix).await, [1500, 1500]);

    // Twice, on the other replica: tool outputs reserve no tokens of their own (the run's
    // reservation covers its every step), charge nothing, and leave the run's entry as it is.
    for _ in 0..2 {
        let submitted = two
            .post(&format!("{RUNS}/run_1/submit_tool_outputs{VERSION}"))
            .json(&json!({"tool_outputs": [{"tool_call_id": "call_1", "output": "22 degrees and sunny"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(submitted.status(), 200);
        submitted.bytes().await.unwrap();
    }
    two.records(2).await;
    settled_to(&prefix, [1500, 1500]).await;

    let fetch = |gw: &TestGateway| gw.get(&format!("{RUNS}/run_1{VERSION}")).send();
    let fetched = fetch(&one).await.unwrap();
    assert_eq!(fetched.status(), 200);
    fetched.bytes().await.unwrap();
    let record = one.records(2).await.remove(1);
    assert_eq!(record.operation_id.unwrap().to_string(), "get_run");
    assert_eq!(record.usage.map(|u| u.total_tokens), Some(3000));
    assert_eq!(record.deployment_name.as_deref(), Some("gpt-4o"));
    settled_to(&prefix, [3000, 3000]).await;

    // Counted once: a fetch on either replica adds nothing.
    for gw in [&one, &two] {
        let again = fetch(gw).await.unwrap();
        assert_eq!(again.status(), 200);
        again.bytes().await.unwrap();
    }
    let records = [one.records(3).await, two.records(3).await].concat();
    let counted: Vec<u64> = records
        .iter()
        .filter_map(|r| r.usage.map(|u| u.total_tokens))
        .collect();
    assert_eq!(counted, [3000]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(quota_by_rule(&prefix).await, [3000, 3000]);
    assert!(
        !redis_keys(&prefix)
            .await
            .iter()
            .any(|key| key.contains("gatehouse:deferred:")),
        "the run's entry was left behind"
    );
    one.stop().await;
    two.stop().await;
    delete_keys(&prefix).await;
}

/// An SSE answer of `events` (name, data), ended by `done` as the Assistants API ends a stream.
fn run_events(events: &[(&str, Value)]) -> axum::response::Response {
    let mut body = String::new();
    for (name, data) in events {
        body.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    body.push_str("event: done\ndata: [DONE]\n\n");
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from(body))
        .unwrap()
}

/// A streamed run stops for a tool call (`thread.run.requires_action`, no usage yet); the tool
/// outputs, streamed too, take it to `thread.run.completed` with the usage of its every step.
/// That usage is charged once, to the rule for the deployment the run names (the tool outputs
/// name none), in place of what the run reserved.
#[tokio::test]
async fn a_streamed_run_that_stops_for_a_tool_is_charged_its_usage_once() {
    use axum::routing::post;
    let run = |status: &str, usage: Value| {
        json!({"id": "run_1", "object": "thread.run", "thread_id": "thread_1",
            "assistant_id": "asst_1", "status": status, "model": "gpt-4o", "usage": usage})
    };
    let (waiting, completed) = (
        run("requires_action", Value::Null),
        run(
            "completed",
            json!({"prompt_tokens": 2000, "completion_tokens": 1000, "total_tokens": 3000}),
        ),
    );
    let queued = run("queued", Value::Null);
    let app = axum::Router::new()
        .route(
            "/openai/deployments/gpt-4o/chat/completions",
            chat_of_20_tokens(),
        )
        .route(
            "/openai/threads/{thread}/runs",
            post({
                let queued = queued.clone();
                move || async move {
                    run_events(&[
                        ("thread.run.created", queued.clone()),
                        ("thread.run.requires_action", waiting),
                    ])
                }
            }),
        )
        .route(
            "/openai/threads/{thread}/runs/{run}/submit_tool_outputs",
            post(move || async move {
                run_events(&[
                    ("thread.run.queued", queued),
                    ("thread.run.completed", completed),
                ])
            }),
        );
    let url = serve_stub(app).await;
    const QUOTA: u64 = 1_000_000;
    let gw = TestGateway::start(daily_quotas(
        &url,
        "gpt-4o",
        &[("gpt-4o-daily", true)],
        QUOTA,
    ))
    .await;
    let version = "?api-version=2024-05-01-preview";
    let created = gw
        .post(&format!("/openai/threads/thread_1/runs{version}"))
        .json(
            &json!({"assistant_id": "asst_1", "model": "gpt-4o", "stream": true,
            "max_prompt_tokens": 1000, "max_completion_tokens": 500}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    assert_eq!(header(&created, "x-gatehouse-consumed-tokens"), Some(1500));
    assert!(created.text().await.unwrap().contains("requires_action"));
    let submitted = gw
        .post(&format!("/openai/threads/thread_1/runs/run_1/submit_tool_outputs{version}"))
        .json(&json!({"stream": true, "tool_outputs": [{"tool_call_id": "call_1", "output": "22 degrees"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(submitted.status(), 200);
    assert!(
        submitted
            .text()
            .await
            .unwrap()
            .contains("thread.run.completed")
    );
    let records = gw.records(2).await;
    let gpt_4o = Some("gpt-4o".to_owned());
    assert_eq!(
        tokens_by_call(&records),
        [
            ("create_run".to_owned(), None, gpt_4o.clone()),
            // Under the deployment the run's create named, which tool outputs do not name.
            ("submit_tool_outputs_to_run".to_owned(), Some(3000), gpt_4o),
        ]
    );
    let probe = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(10, false))
        .send()
        .await
        .unwrap();
    let reserved = header(&probe, "x-gatehouse-consumed-tokens").unwrap();
    let remaining = header(&probe, "x-gatehouse-remaining-quota-tokens").unwrap();
    assert_eq!(remaining, QUOTA - 3000 - reserved);
    gw.stop().await;
}

/// An eval run is answered queued and runs its model (and its graders) over the eval's items
/// afterwards: when a fetch sees it end, its usage (`per_model_usage`, summed) is charged to the
/// rule for the deployment its data source names, and put on that fetch's record.
#[tokio::test]
async fn an_eval_run_is_charged_what_its_models_used_once_a_fetch_sees_it_end() {
    use axum::routing::{get, post};
    let run = |status: &str, usage: Value| {
        json!({"id": "evalrun_1", "object": "eval.run", "eval_id": "eval_1", "status": status,
            "model": "gpt-4o-mini", "name": "nightly", "per_model_usage": usage})
    };
    let queued = run("queued", Value::Null);
    let completed = run(
        "completed",
        json!([{"model_name": "gpt-4o-mini", "invocation_count": 40, "prompt_tokens": 4000,
                "completion_tokens": 2000, "total_tokens": 6000, "cached_tokens": 0},
               {"model_name": "o3-mini", "invocation_count": 40, "prompt_tokens": 3000,
                "completion_tokens": 1000, "total_tokens": 4000, "cached_tokens": 0}]),
    );
    let app = axum::Router::new()
        .route(
            "/openai/evals/{eval}/runs",
            post(move || async move { axum::Json(queued) }),
        )
        .route(
            "/openai/evals/{eval}/runs/{run}",
            get(move || async move { axum::Json(completed) }),
        );
    let url = serve_stub(app).await;
    const QUOTA: u64 = 100_000;
    let gw = TestGateway::start(daily_quotas(
        &url,
        "gpt-4o-mini",
        &[("mini-daily", true)],
        QUOTA,
    ))
    .await;
    let version = "?api-version=2025-04-01-preview";
    let create = || {
        gw.post(&format!("/openai/evals/eval_1/runs{version}"))
            .json(
                &json!({"name": "nightly", "data_source": {"type": "completions",
                "model": "gpt-4o-mini", "source": {"type": "file_id", "id": "file-1"}}}),
            )
            .send()
    };
    let created = create().await.unwrap();
    assert_eq!(created.status(), 200);
    // Limited under the deployment it runs, though its path names none.
    assert_eq!(
        header(&created, "x-gatehouse-remaining-quota-tokens"),
        Some(QUOTA)
    );
    created.bytes().await.unwrap();
    let fetch = || {
        gw.get(&format!("/openai/evals/eval_1/runs/evalrun_1{version}"))
            .send()
    };
    for _ in 0..2 {
        let fetched = fetch().await.unwrap();
        assert_eq!(fetched.status(), 200);
        fetched.bytes().await.unwrap();
    }
    let records = gw.records(3).await;
    let counted = tokens_by_call(&records);
    assert_eq!(
        counted[1..],
        [
            (
                "getevalrun".to_owned(),
                Some(10_000),
                Some("gpt-4o-mini".to_owned())
            ),
            ("getevalrun".to_owned(), None, None),
        ]
    );
    let next = create().await.unwrap();
    assert_eq!(
        header(&next, "x-gatehouse-remaining-quota-tokens"),
        Some(QUOTA - 10_000)
    );
    gw.stop().await;
}

/// The tokens used of each quota counter under `prefix`, in the order of their keys.
async fn quota_by_rule(prefix: &str) -> Vec<u64> {
    let mut keys: Vec<String> = redis_keys(prefix)
        .await
        .into_iter()
        .filter(|key| key.contains("gatehouse:limit:"))
        .collect();
    keys.sort();
    let mut connection = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut used = Vec::new();
    for key in keys {
        let value: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("u")
            .query_async(&mut connection)
            .await
            .unwrap();
        used.push(value.map_or(0, |u| u.parse().unwrap()));
    }
    used
}

/// Waits (bounded) for the quota counters under `prefix` to read `expected`: settlements in
/// Redis run on tasks of their own.
async fn settled_to(prefix: &str, expected: [u64; 2]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = quota_by_rule(prefix).await;
        if used == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{used:?}, expected {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Responses call that continues a stored response names no model and runs on the member that
/// holds it: a rule over every call limits it although no pool serves resource calls. An
/// Assistants run names its deployment in its body: a rule for that deployment limits it.
#[tokio::test]
async fn calls_that_run_a_model_without_naming_a_deployment_are_limited() {
    use axum::routing::post;
    let app = axum::Router::new()
        .route(
            "/openai/v1/responses",
            post(|| async {
                axum::Json(json!({"id": "resp_1", "object": "response", "model": "gpt-4o", "status": "completed",
                    "output": [], "usage": {"input_tokens": 5, "output_tokens": 5, "total_tokens": 10}}))
            }),
        )
        .route(
            "/openai/threads/{thread}/runs",
            post(|| async {
                axum::Json(json!({"id": "run_1", "object": "thread.run", "status": "queued", "model": "gpt-4o"}))
            }),
        );
    let url = serve_stub(app).await;

    let mut continuing = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &url, 1)]}]),
    );
    continuing.limits = serde_json::from_value(json!([{"id": "every-call",
        "subject": {"kind": "each_subscription"}, "requests_per_minute": 2}]))
    .unwrap();
    let gw = TestGateway::start(continuing).await;
    let respond = |body: Value| gw.post("/openai/v1/responses").json(&body).send();
    let first = respond(json!({"model": "gpt-4o", "input": "Hello"}))
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let next = json!({"input": "And again", "previous_response_id": "resp_1"});
    let second = respond(next.clone()).await.unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-gatehouse-remaining-requests"), Some(0));
    second.bytes().await.unwrap();
    let message = azure_error(respond(next).await.unwrap(), 429).await;
    assert!(message.contains("every-call"), "{message}");
    gw.stop().await;

    let mut runs = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [member("a", &url, 1)]}]),
    );
    runs.limits = serde_json::from_value(json!([{"id": "gpt-4o-rate", "deployments": ["gpt-4o"],
        "subject": {"kind": "each_subscription"}, "requests_per_minute": 2,
        "tokens_per_minute": 4000}]))
    .unwrap();
    let gw = TestGateway::start(runs).await;
    let run = |body: Value| {
        gw.post("/openai/threads/thread_1/runs?api-version=2024-05-01-preview")
            .json(&body)
            .send()
    };
    // A queued run reports no usage: what it allows itself stays charged, its prompt
    // (`max_prompt_tokens`) and its completion (`max_completion_tokens`, else the default).
    let first = run(json!({"assistant_id": "asst_1", "model": "gpt-4o",
        "max_prompt_tokens": 1000, "max_completion_tokens": 500}))
    .await
    .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-gatehouse-consumed-tokens"), Some(1500));
    assert_eq!(header(&first, "x-gatehouse-remaining-tokens"), Some(2500));
    first.bytes().await.unwrap();
    // Recorded under the deployment it runs.
    let record = gw.records(1).await.remove(0);
    assert_eq!(record.deployment_name.as_deref(), Some("gpt-4o"));
    let second = run(json!({"assistant_id": "asst_1", "model": "gpt-4o"}))
        .await
        .unwrap();
    assert_eq!(second.status(), 200);
    assert_eq!(header(&second, "x-gatehouse-consumed-tokens"), Some(1024));
    second.bytes().await.unwrap();
    let message = azure_error(
        run(json!({"assistant_id": "asst_1", "model": "gpt-4o"}))
            .await
            .unwrap(),
        429,
    )
    .await;
    assert!(message.contains("gpt-4o-rate"), "{message}");
    gw.stop().await;
}

/// A relay to the tests' Redis that holds Redis's replies back by `delay` while `slow` is set.
async fn slow_redis(
    slow: std::sync::Arc<std::sync::atomic::AtomicBool>,
    delay: Duration,
) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let slow = slow.clone();
            tokio::spawn(async move {
                let redis = tokio::net::TcpStream::connect("127.0.0.1:6379")
                    .await
                    .unwrap();
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_redis, mut to_redis) = redis.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut from_client, &mut to_redis).await });
                let mut buffer = vec![0; 64 * 1024];
                while let Ok(n @ 1..) = from_redis.read(&mut buffer).await {
                    if slow.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(delay).await;
                    }
                    if to_client.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    url
}

/// The tokens a quota's counter in Redis holds, read from its hash (`u`).
async fn quota_used(prefix: &str) -> u64 {
    let keys = redis_keys(prefix).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let mut connection = redis::Client::open(REDIS)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let used: Option<String> = redis::cmd("HGET")
        .arg(&keys[0])
        .arg("u")
        .query_async(&mut connection)
        .await
        .unwrap();
    used.map_or(0, |u| u.parse().unwrap())
}

/// Redis answering a charge after the gateway stopped waiting for it: the call is refused
/// (failing closed), and what the script charged after all is given back, so that a slow Redis
/// does not use up a quota with calls that never ran.
#[tokio::test]
async fn a_charge_redis_makes_after_the_gateway_gave_up_is_given_back() {
    let sim = simulator("slow-redis").await;
    let slow = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = slow_redis(slow.clone(), Duration::from_millis(600)).await;
    let mut settings = on_redis(&url, OnStoreError::FailClosed);
    settings.store_timeout_ms = 200;
    let prefix = settings.key_prefix.clone();
    let gw = TestGateway::start_with_limits(
        limited(
            &sim,
            json!([{"id": "daily", "subject": {"kind": "each_subscription"},
                    "token_quota": {"tokens": 100000, "period": "daily"}}]),
        ),
        settings,
    )
    .await;
    let first = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(500, false))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let used = gw.records(1).await[0].usage.unwrap().total_tokens;
    let deadline = Instant::now() + Duration::from_secs(5);
    while quota_used(&prefix).await != used {
        assert!(
            Instant::now() < deadline,
            "the first call was never settled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    slow.store(true, std::sync::atomic::Ordering::SeqCst);
    let refused = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat_with_max(500, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(refused, 503).await;
    assert!(message.contains("cannot check usage limits"), "{message}");
    assert_eq!(sim.hits(), 1);
    // The late reply arrives 600 ms after the script ran; the give-back follows it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    slow.store(false, std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = quota_used(&prefix).await;
    while held != used && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        held = quota_used(&prefix).await;
    }
    assert_eq!(held, used, "the refused call's charge stayed");
    gw.stop().await;
    delete_keys(&prefix).await;
}

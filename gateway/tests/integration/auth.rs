//! Subscription keys: accepted from every documented place, refused without a backend call.

use gatehouse_schema::config::SubscriptionState;
use serde_json::json;
use time::{Duration, OffsetDateTime};

use crate::harness::*;

#[tokio::test]
async fn a_key_is_accepted_from_each_header_and_the_query() {
    let sim = simulator("auth-a").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    ))
    .await;
    let path = chat_path("gpt-4o");
    let body = chat(None, false);
    let variants = [
        gw.raw(reqwest::Method::POST, &path).header("api-key", KEY),
        gw.raw(reqwest::Method::POST, &path)
            .header("Ocp-Apim-Subscription-Key", KEY),
        gw.raw(reqwest::Method::POST, &path)
            .header("authorization", format!("Bearer {KEY}")),
        gw.raw(
            reqwest::Method::POST,
            &format!("{path}&subscription-key={KEY}"),
        ),
    ];
    for request in variants {
        let response = request.json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(sim.hits(), 4);
    let records = gw.records(4).await;
    assert!(
        records
            .iter()
            .all(|r| r.apim_subscription_id.as_deref() == Some("team-a"))
    );
    assert!(
        records
            .iter()
            .all(|r| r.product_id.as_deref() == Some("research"))
    );
    // The query key is not kept in the recorded URL.
    assert!(
        records.iter().all(|r| !r.url.contains(KEY)),
        "{:?}",
        records.iter().map(|r| &r.url).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn missing_wrong_and_revoked_keys_get_401_and_no_backend_call() {
    let sim = simulator("auth-b").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    let mut revoked = config.subscriptions[0].clone();
    revoked.id = "revoked".into();
    revoked.primary_key_hash = gatehouse_gateway::auth::hash_key("ghk_revoked");
    revoked.state = SubscriptionState::Revoked;
    config.subscriptions.push(revoked);
    let gw = TestGateway::start(config).await;
    let path = chat_path("gpt-4o");

    let missing = gw
        .raw(reqwest::Method::POST, &path)
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(missing, 401).await;
    assert!(message.contains("missing subscription key"), "{message}");

    let wrong = gw
        .raw(reqwest::Method::POST, &path)
        .header("api-key", "ghk_wrong")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    let message = azure_error(wrong, 401).await;
    assert!(message.contains("invalid subscription key"), "{message}");

    let revoked = gw
        .raw(reqwest::Method::POST, &path)
        .header("api-key", "ghk_revoked")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(revoked, 401).await;

    assert_eq!(
        sim.hits(),
        0,
        "no backend may be called for an unauthenticated request"
    );
    let records = gw.records(3).await;
    assert!(
        records
            .iter()
            .all(|r| r.response_code == 401 && r.backend_id.is_none())
    );
}

#[tokio::test]
async fn a_previous_key_is_refused_once_its_overlap_has_ended_without_a_new_snapshot() {
    let sim = simulator("auth-overlap").await;
    let mut config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
    );
    let previous = "ghk_PreviousKey000000000000000000000000000";
    let mut ended = config.subscriptions[0].clone();
    ended.id = "rotated".into();
    ended.primary_key_hash = gatehouse_gateway::auth::hash_key("ghk_CurrentKey");
    ended.secondary_key_hash = Some(gatehouse_gateway::auth::hash_key(previous));
    ended.secondary_expires_at = Some(OffsetDateTime::now_utc() - Duration::seconds(1));
    let mut running = config.subscriptions[0].clone();
    running.id = "overlapping".into();
    running.primary_key_hash = gatehouse_gateway::auth::hash_key("ghk_NewKey");
    running.secondary_key_hash = Some(gatehouse_gateway::auth::hash_key("ghk_OldKey"));
    running.secondary_expires_at = Some(OffsetDateTime::now_utc() + Duration::hours(1));
    config.subscriptions.extend([ended, running]);
    let gw = TestGateway::start(config).await;
    let path = chat_path("gpt-4o");
    let call = |key: &str| {
        gw.raw(reqwest::Method::POST, &path)
            .header("api-key", key)
            .json(&chat(None, false))
            .send()
    };

    let message = azure_error(call(previous).await.unwrap(), 401).await;
    assert!(message.contains("replaced"), "{message}");
    assert_eq!(sim.hits(), 0, "a refused key never reaches a backend");

    for key in ["ghk_CurrentKey", "ghk_NewKey", "ghk_OldKey"] {
        let response = call(key).await.unwrap();
        assert_eq!(response.status(), 200, "{key}");
    }
    assert_eq!(sim.hits(), 3);
}

#[tokio::test]
async fn the_callers_key_never_reaches_the_backend_which_gets_its_own() {
    let (_key_file, key_ref) = backend_key_file();
    let sim = simulator("auth-c").await;
    let mut azure = member("azure", &sim.url(), 1);
    azure["credential"] = json!({"type": "api_key", "secret": key_ref});
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [azure]}]),
    ))
    .await;
    let response = gw
        .raw(reqwest::Method::POST, &chat_path("gpt-4o"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("cookie", "session=abc")
        .header("openai-organization", "org-someone-else")
        .header("openai-project", "proj_someone_else")
        .header("x-client-ip", "203.0.113.9")
        .header("true-client-ip", "203.0.113.9")
        .header("x-azure-clientip", "203.0.113.9")
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = &sim.requests()[0];
    assert_eq!(seen.header("api-key"), Some(BACKEND_KEY));
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("cookie"), None);
    // The organization and project billed are the member key's, not the caller's choice.
    assert_eq!(seen.header("openai-organization"), None);
    assert_eq!(seen.header("openai-project"), None);
    // Nor does a caller's claim of its address reach it.
    assert!(
        seen.headers.iter().all(|(_, v)| v != "203.0.113.9"),
        "{:?}",
        seen.headers
    );
    assert!(
        seen.headers.iter().all(|(_, v)| !v.contains(KEY)),
        "client key leaked: {:?}",
        seen.headers
    );
}

/// A key whose rule grants calls without a deployment (`resources`) and one model family: a
/// fine-tuning job on that family's base model is relayed, one on another base model is refused
/// with 403 naming it, before any backend sees it; an assistant, an eval run and an eval's
/// grader on it likewise.
#[tokio::test]
async fn a_resources_rule_grants_fine_tuning_only_on_the_base_models_it_names() {
    let sim = simulator("auth-fine-tuning").await;
    let value = with_rules(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o-mini"], "serves_resources": true,
                "members": [member("a", &sim.url(), 1)]}]),
        json!([
            {"id": "team-a-tuning", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": ["gpt-4o-mini*"], "resources": true}
        ]),
    );
    let gw = TestGateway::start(value).await;
    let create = |path: &str, model: &str| {
        gw.post(path)
            .json(&json!({"model": model, "training_file": "file-abc123"}))
            .send()
    };
    let jobs = "/openai/fine_tuning/jobs?api-version=2024-10-21";

    let granted = create(jobs, "gpt-4o-mini-2024-07-18").await.unwrap();
    assert_ne!(granted.status(), 403, "{}", granted.text().await.unwrap());
    assert_eq!(sim.hits(), 1, "the granted job reached the backend");

    // An eval run's model, and an eval's graders' models (which each run of it calls), are
    // judged as the deployments they are.
    let evals = "/openai/evals?api-version=2025-04-01-preview";
    let eval_runs = "/openai/evals/eval_1/runs?api-version=2025-04-01-preview";
    let run_on = |model: &str| {
        json!({"name": "nightly", "data_source": {"type": "completions", "model": model,
               "source": {"type": "file_id", "id": "file-abc123"}}})
    };
    let graded_by = |model: &str| {
        json!({"name": "tone", "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
        "testing_criteria": [
            {"type": "string_check", "name": "exact", "input": "{{sample.output_text}}", "reference": "yes", "operation": "eq"},
            {"type": "multi", "name": "both", "calculate_output": "a", "graders": {
                "a": {"type": "score_model", "name": "judge", "model": model, "input": []}}}
        ]})
    };
    for (path, body) in [
        (eval_runs, run_on("gpt-4o-mini")),
        (evals, graded_by("gpt-4o-mini-2024-07-18")),
    ] {
        let granted = gw.post(path).json(&body).send().await.unwrap();
        assert_ne!(
            granted.status(),
            403,
            "{path}: {}",
            granted.text().await.unwrap()
        );
    }
    let relayed = sim.hits();
    assert_eq!(relayed, 3, "the granted calls reached the backend");
    for (path, body, model) in [
        (eval_runs, run_on("o1"), "o1"),
        (evals, graded_by("gpt-4o"), "gpt-4o"),
    ] {
        let refused = gw.post(path).json(&body).send().await.unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        let message = azure_error(refused, 403).await;
        assert!(
            message.contains(&format!("deployment '{model}'")),
            "{message}"
        );
    }
    assert_eq!(
        sim.hits(),
        relayed,
        "no refused eval call reached the backend"
    );

    for (path, model) in [
        (jobs, "gpt-4o-2024-08-06"),
        (
            "/openai/assistants?api-version=2024-05-01-preview",
            "gpt-4o",
        ),
    ] {
        let refused = create(path, model).await.unwrap();
        assert_eq!(refused.status(), 403, "{path}");
        let body: serde_json::Value = refused.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("deployment '{model}'")),
            "{message}"
        );
    }
    assert_eq!(sim.hits(), 3, "no refused call reached the backend");
}

/// With access rules in force a Responses call names its model, also when it continues a stored
/// response: without one it would run the stored response's model, which no rule was asked
/// about (one created on a deployment the caller may not use, by someone who may). Refused with
/// 400 before any backend sees it; the same call naming a granted deployment is relayed.
#[tokio::test]
async fn a_responses_call_without_a_model_is_refused_when_rules_are_in_force() {
    let sim = simulator("auth-responses-model").await;
    let value = with_rules(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o-mini"], "serves_resources": true,
                "members": [member("a", &sim.url(), 1)]}]),
        json!([
            {"id": "team-a", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": ["gpt-4o-mini"], "resources": true}
        ]),
    );
    let gw = TestGateway::start(value).await;
    let continued = gw
        .post("/openai/v1/responses")
        .json(&json!({"input": "And again", "previous_response_id": "resp_of_someone_else"}))
        .send()
        .await
        .unwrap();
    let message = azure_error(continued, 400).await;
    assert!(message.contains("`model`"), "{message}");
    assert_eq!(sim.hits(), 0);
    let named = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o-mini", "input": "Hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), 200);
    assert_eq!(sim.hits(), 1);
}

/// `snapshot(version, pools)` with `rules` as its access rules.
fn with_rules(
    version: u64,
    pools: serde_json::Value,
    rules: serde_json::Value,
) -> gatehouse_schema::config::ConfigSnapshot {
    let mut value = serde_json::to_value(snapshot(version, pools)).unwrap();
    value["access_rules"] = rules;
    serde_json::from_value(value).unwrap()
}

/// A reinforcement fine-tuning job grades every sample with its grader's model: that model is
/// judged as a deployment too, also inside a `multi` grader, nested as deep as the body goes.
#[tokio::test]
async fn a_fine_tuning_jobs_grader_model_must_be_granted_too() {
    let sim = simulator("auth-rft-grader").await;
    let value = with_rules(
        1,
        json!([{"id": "p", "deployments": ["o4-mini"], "serves_resources": true,
                "members": [member("a", &sim.url(), 1)]}]),
        json!([
            {"id": "team-a-tuning", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": ["o4-mini*"], "resources": true}
        ]),
    );
    let gw = TestGateway::start(value).await;
    let jobs = "/openai/fine_tuning/jobs?api-version=2025-04-01-preview";
    let graded_by = |grader: serde_json::Value| {
        json!({"model": "o4-mini-2025-04-16", "training_file": "file-1", "validation_file": "file-2",
               "method": {"type": "reinforcement", "reinforcement": {"grader": grader}}})
    };
    let score =
        |model: &str| json!({"type": "score_model", "name": "g", "model": model, "input": []});
    let multi = |inner: serde_json::Value| json!({"type": "multi", "name": "m", "calculate_output": "a", "graders": {"a": inner}});
    let granted = gw
        .post(jobs)
        .json(&graded_by(score("o4-mini-2025-04-16")))
        .send()
        .await
        .unwrap();
    assert_ne!(granted.status(), 403, "{}", granted.text().await.unwrap());
    assert_eq!(sim.hits(), 1, "the granted job reached the backend");
    for grader in [
        score("o3"),
        multi(score("o3")),
        multi(multi(multi(multi(score("o3"))))),
    ] {
        let refused = gw.post(jobs).json(&graded_by(grader)).send().await.unwrap();
        let message = azure_error(refused, 403).await;
        assert!(message.contains("deployment 'o3'"), "{message}");
    }
    assert_eq!(sim.hits(), 1, "no refused job reached the backend");

    // An eval run's Responses data source may give its model an image tool: its model is
    // judged too, and one naming none is refused.
    let runs = "/openai/evals/eval_1/runs?api-version=2025-04-01-preview";
    let run_with = |tool: serde_json::Value| {
        json!({"name": "nightly", "data_source": {"type": "responses", "model": "o4-mini",
               "source": {"type": "file_id", "id": "file-1"},
               "sampling_params": {"tools": [tool]}}})
    };
    let refused = gw
        .post(runs)
        .json(&run_with(
            json!({"type": "image_generation", "model": "gpt-image-1"}),
        ))
        .send()
        .await
        .unwrap();
    let message = azure_error(refused, 403).await;
    assert!(message.contains("'gpt-image-1'"), "{message}");
    let unnamed = gw
        .post(runs)
        .json(&run_with(json!({"type": "image_generation"})))
        .send()
        .await
        .unwrap();
    azure_error(unnamed, 400).await;
    assert_eq!(sim.hits(), 1, "no refused eval run reached the backend");
}

/// A Responses call's `image_generation` tool runs an image deployment: Azure's, named in the
/// `x-ms-oai-image-generation-deployment` header, or OpenAI's, in the tool's `model`. Either must
/// be granted; a tool that names no model (it would run the member's default) is refused; a
/// header that names no valid deployment is refused. None of the refused calls reaches a member.
#[tokio::test]
async fn a_responses_image_tool_runs_only_a_granted_image_deployment() {
    let sim = simulator("auth-image-tool").await;
    let value = with_rules(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o", "gpt-image-1"],
                "members": [member("a", &sim.url(), 1)]}]),
        json!([
            {"id": "team-a-chat", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": ["gpt-4o"]}
        ]),
    );
    let gw = TestGateway::start(value).await;
    let draw = |tool: serde_json::Value| json!({"model": "gpt-4o", "input": "Draw a cat", "tools": [tool]});
    let send = |header: Option<&'static str>, body: serde_json::Value| {
        let mut request = gw.post("/openai/v1/responses").json(&body);
        if let Some(value) = header {
            request = request.header("x-ms-oai-image-generation-deployment", value);
        }
        request.send()
    };
    let plain = send(None, json!({"model": "gpt-4o", "input": "Hello"}))
        .await
        .unwrap();
    assert_eq!(plain.status(), 200);
    assert_eq!(sim.hits(), 1);

    let by_header = send(
        Some("gpt-image-1"),
        draw(json!({"type": "image_generation"})),
    )
    .await
    .unwrap();
    let message = azure_error(by_header, 403).await;
    assert!(
        message.contains("image_generation") && message.contains("'gpt-image-1'"),
        "{message}"
    );
    // The header is judged even without the tool in the body: a stored prompt may bring it.
    let header_alone = send(
        Some("gpt-image-1"),
        json!({"model": "gpt-4o", "input": "Hello"}),
    )
    .await
    .unwrap();
    azure_error(header_alone, 403).await;
    let by_model = send(
        None,
        draw(json!({"type": "image_generation", "model": "gpt-image-1"})),
    )
    .await
    .unwrap();
    azure_error(by_model, 403).await;
    // Spelt with escapes, the tool is the same tool.
    let escaped = gw
        .post("/openai/v1/responses")
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","input":"Draw","tools":[{"type":"image\u005fgeneration","model":"gpt-image-1"}]}"#)
        .send()
        .await
        .unwrap();
    azure_error(escaped, 403).await;
    let unnamed = send(None, draw(json!({"type": "image_generation"})))
        .await
        .unwrap();
    let message = azure_error(unnamed, 400).await;
    assert!(
        message.contains("x-ms-oai-image-generation-deployment"),
        "{message}"
    );
    // The header twice (the member might run either), a tool's `type` given twice (the member
    // might read the first): refused.
    let twice = gw
        .post("/openai/v1/responses")
        .header("x-ms-oai-image-generation-deployment", "gpt-4o")
        .header("x-ms-oai-image-generation-deployment", "gpt-image-1")
        .json(&draw(json!({"type": "image_generation"})))
        .send()
        .await
        .unwrap();
    azure_error(twice, 400).await;
    let doubled = gw
        .post("/openai/v1/responses")
        .header("content-type", "application/json")
        .body(r#"{"model":"gpt-4o","input":"Draw","tools":[{"type":"image_generation","type":"function","name":"f","model":"gpt-image-1"}]}"#)
        .send()
        .await
        .unwrap();
    let message = azure_error(doubled, 400).await;
    assert!(message.contains("`type` more than once"), "{message}");
    let invalid = send(
        Some("../gpt-image-1"),
        draw(json!({"type": "image_generation"})),
    )
    .await
    .unwrap();
    azure_error(invalid, 400).await;
    assert_eq!(sim.hits(), 1, "no refused call reached the backend");

    // Granted, the header reaches the member as the client sent it.
    let value = with_rules(
        2,
        json!([{"id": "p", "deployments": ["gpt-4o", "gpt-image-1"],
                "members": [member("a", &sim.url(), 1)]}]),
        json!([
            {"id": "team-a-chat", "grantee": {"kind": "subscription", "id": "team-a"},
             "deployments": ["gpt-4o", "gpt-image-*"]}
        ]),
    );
    let pushed = gw.push_config(&value).await;
    assert_eq!(pushed.status(), 200, "{}", pushed.text().await.unwrap());
    let granted = send(
        Some("gpt-image-1"),
        draw(json!({"type": "image_generation"})),
    )
    .await
    .unwrap();
    assert_eq!(granted.status(), 200, "{}", granted.text().await.unwrap());
    let seen = sim.requests().pop().unwrap();
    assert_eq!(
        seen.header("x-ms-oai-image-generation-deployment"),
        Some("gpt-image-1")
    );
}

/// A member's answer keeps its own account to itself: the OpenAI organization and project of the
/// member's key and its cookies do not reach the caller; its rate-limit headers do.
#[tokio::test]
async fn the_members_account_and_cookies_never_reach_the_caller() {
    let member_url = serve_stub(axum::Router::new().fallback(|| async {
        (
            [
                ("openai-organization", "org-gateway-account"),
                ("openai-project", "proj_gateway"),
                ("set-cookie", "__cf_bm=member-session; HttpOnly"),
                ("x-ratelimit-remaining-requests", "499"),
                ("content-type", "application/json"),
            ],
            r#"{"id":"chatcmpl-1","object":"chat.completion","model":"gpt-4o","choices":[]}"#,
        )
    }))
    .await;
    let gw = openai_gateway(&member_url).await;
    let response = gw
        .post("/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    for name in ["openai-organization", "openai-project", "set-cookie"] {
        assert_eq!(headers.get(name), None, "{name} reached the caller");
    }
    assert_eq!(headers["x-ratelimit-remaining-requests"], "499");
}

/// A field the client's `Connection` header names was meant for the client's own hop (RFC 9110
/// §7.6.1): it does not reach the backend, and neither does one a member's `Connection` names
/// reach the client; the fields no `Connection` names pass, and `Content-Type` always does.
#[tokio::test]
async fn fields_named_by_connection_stay_on_their_hop() {
    let member_url = serve_stub(axum::Router::new().fallback(
        |headers: axum::http::HeaderMap| async move {
            let seen = |name: &str| headers.get(name).is_some();
            let body = json!({
                "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o", "choices": [],
                "seen_hop": seen("x-client-hop"),
                "seen_other": seen("x-client-other"),
                "seen_type": seen("content-type"),
            });
            (
                [
                    ("connection", "keep-alive, X-Member-Hop"),
                    ("x-member-hop", "member-only"),
                    ("x-ratelimit-remaining-requests", "499"),
                    ("content-type", "application/json"),
                ],
                body.to_string(),
            )
        },
    ))
    .await;
    let gw = openai_gateway(&member_url).await;
    let response = gw
        .post("/v1/chat/completions")
        .header("connection", "X-Client-Hop , content-type")
        .header("x-client-hop", "client-only")
        .header("x-client-other", "passes")
        .json(&chat(Some("gpt-4o"), false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers().get("x-member-hop"), None);
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "499");
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body["seen_hop"], false,
        "the client's hop field reached the member"
    );
    assert_eq!(body["seen_other"], true);
    assert_eq!(body["seen_type"], true);
}

//! Alert rules against a local webhook receiver, with the config database on SQLite and on
//! PostgreSQL: each rule kind fires once and resolves once (usage rules on the embedded audit
//! store, `backend_set_aside` on a real in-process gateway whose member the simulator throttles,
//! `quota_nearly_used` on the published limit rules and the rollups, `key_expiring` on the
//! subscriptions), a notification that could not be delivered is delivered later, and the state
//! survives a restart of the alerter.
#![expect(clippy::unwrap_used, clippy::panic, reason = "test code")]

mod common;

use common::{ADMIN_TOKEN, TestGateway, admin, gateway_at};

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use futures::FutureExt;
use futures::future::BoxFuture;
use gatehouse_audit::AuditRecord;
use gatehouse_portal_core::insights::alerts::{
    AlertRule, AlertSetupError, Alerter, parse_rules, quota_window,
};
use gatehouse_portal_core::insights::embedded::EmbeddedSource;
use gatehouse_portal_core::insights::{
    Answer, AuditSource, CallFull, CallPage, ChainCheck, Figures, Granularity, InsightsError,
    SearchRequest, TimeRange, UsagePoint, UsageRequest, UsageTotal,
};
use gatehouse_portal_core::ops::{NewSubscription, PortalSettings};
use gatehouse_portal_core::pools::{MemberInput, PoolInput};
use gatehouse_portal_core::rules::AccessRuleInput;
use gatehouse_portal_core::snapshot::BASE_SETTING;
use gatehouse_portal_core::{ConfigDb, Portal};
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::TokenUsage;
use gatehouse_schema::backends::MemberAvailability;
use gatehouse_schema::limits::QuotaPeriod;
use gatehouse_simulator::{Fault, RetryHint, Simulator, SimulatorConfig};
use serde_json::{Value, json};
use time::macros::datetime;
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

/// A webhook receiver on a free loopback port, and its URL.
async fn receiver() -> (Arc<Receiver>, url::Url) {
    let receiver = Arc::new(Receiver::default());
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&receiver));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (receiver, hook.parse().unwrap())
}

impl Receiver {
    fn messages(&self) -> Vec<String> {
        self.messages.lock().unwrap().clone()
    }
}

/// An embedded audit store (SQLite) in a temp dir.
async fn audit_store() -> (EmbeddedSource, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    (EmbeddedSource::open(&url).await.unwrap(), dir)
}

/// A portal on `db` (no gateway registered unless a test registers one).
fn portal(db: &ConfigDb) -> Portal {
    Portal {
        db: db.clone(),
        publisher: common::publisher(db),
        settings: PortalSettings::default(),
    }
}

fn rules(json: Value) -> Vec<AlertRule> {
    parse_rules(&json.to_string()).unwrap()
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
        time_to_first_token: None,
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

async fn each_usage_rule_fires_once_and_resolves_once(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let (source, _dir) = audit_store().await;
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
    let alerter = Alerter::new(db, Some(source), rules, Some(hook))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());

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

/// The embedded store, with a `PartialError` warning beside every answer while `partial` is set
/// (what the Log Analytics source returns when a query passes the Query API's limits: the rows
/// it could read, and the warning), counting the questions asked bucket by bucket.
#[derive(Debug)]
struct PartialSource {
    inner: EmbeddedSource,
    partial: AtomicBool,
    bucketed: AtomicU32,
}

impl PartialSource {
    fn with_warnings<T>(&self, mut answer: Answer<T>) -> Answer<T> {
        if self.partial.load(Ordering::SeqCst) {
            answer.warnings.push("PartialError: There were some errors when processing your query.; Query result set has exceeded the internal record count limit 500000".to_owned());
        }
        answer
    }
}

impl AuditSource for PartialSource {
    fn kind(&self) -> &'static str {
        "partial"
    }

    fn figures(
        &self,
        range: TimeRange,
        granularity: Granularity,
    ) -> BoxFuture<'_, Result<Answer<Figures>, InsightsError>> {
        async move {
            let answer = self.inner.figures(range, granularity).await?;
            Ok(self.with_warnings(answer))
        }
        .boxed()
    }

    fn usage<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsagePoint>>, InsightsError>> {
        async move {
            self.bucketed.fetch_add(1, Ordering::SeqCst);
            let answer = self.inner.usage(request).await?;
            Ok(self.with_warnings(answer))
        }
        .boxed()
    }

    fn usage_totals<'a>(
        &'a self,
        request: &'a UsageRequest,
    ) -> BoxFuture<'a, Result<Answer<Vec<UsageTotal>>, InsightsError>> {
        async move {
            let answer = self.inner.usage_totals(request).await?;
            Ok(self.with_warnings(answer))
        }
        .boxed()
    }

    fn search<'a>(
        &'a self,
        request: &'a SearchRequest,
    ) -> BoxFuture<'a, Result<Answer<CallPage>, InsightsError>> {
        self.inner.search(request)
    }

    fn call<'a>(
        &'a self,
        correlation_id: &'a str,
    ) -> BoxFuture<'a, Result<Answer<Option<CallFull>>, InsightsError>> {
        self.inner.call(correlation_id)
    }

    fn verify_chain<'a>(
        &'a self,
        call: &'a CallFull,
    ) -> BoxFuture<'a, Result<ChainCheck, InsightsError>> {
        self.inner.verify_chain(call)
    }
}

/// A window of seven hours reaches seven hours back, not to the start of the hour before: errors
/// seven and a half hours ago do not fire an error-rate rule over the last 420 minutes (rollups
/// are read by the minute, not by the hour, for windows of any length).
async fn a_long_window_reaches_no_further_back_than_its_minutes(db: ConfigDb) {
    let (_receiver, hook) = receiver().await;
    let (source, _dir) = audit_store().await;
    let now = OffsetDateTime::now_utc().replace_time(time::macros::time!(10:59));
    let old_errors: Vec<AuditRecord> = (0..4)
        .map(|i| {
            record(
                i,
                now - Duration::minutes(450) + Duration::seconds(i as i64),
                500,
                100,
            )
        })
        .collect();
    source.store().write(&old_errors).await.unwrap();
    let rules = parse_rules(
        r#"[{"name": "errors", "condition": {"kind": "error_rate", "minutes": 420, "above": 0.5, "min_requests": 1}},
            {"name": "slow", "condition": {"kind": "latency_p95", "minutes": 420, "above_ms": 50}}]"#,
    )
    .unwrap();
    let source: Arc<dyn AuditSource> = Arc::new(source);
    let alerter = Alerter::new(db, Some(source), rules, Some(hook))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    let fired = alerter.tick(now).await;
    assert!(fired.is_empty(), "{fired:?}");
    // Half an hour later than the errors' window, the same calls are inside it.
    let fired = alerter.tick(now - Duration::minutes(40)).await;
    assert_eq!(fired.len(), 2, "{fired:?}");
}

async fn a_partial_answer_neither_fires_nor_resolves(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let (embedded, _dir) = audit_store().await;
    let portal = portal(&db);
    db.set_setting(
        BASE_SETTING,
        &json!({"version": 0, "limits": [{
            "id": "users-daily",
            "subject": {"kind": "each_user"},
            "token_quota": {"tokens": 1000, "period": "daily"}
        }]})
        .to_string(),
    )
    .await
    .unwrap();
    portal.publisher.publish("test").await.unwrap();
    let now = datetime!(2025-03-12 12:00 UTC);
    embedded
        .store()
        .write(&[usage(1, now - Duration::minutes(5), "team-a", "oid-1", 900)])
        .await
        .unwrap();
    let source = Arc::new(PartialSource {
        inner: embedded,
        partial: AtomicBool::new(true),
        bucketed: AtomicU32::new(0),
    });
    let rules = rules(json!([
        {"name": "budget", "condition": {"kind": "daily_tokens", "dimension": "group", "value": "g-red", "above": 500}},
        {"name": "quota", "condition": {"kind": "quota_nearly_used", "percent": 75}},
        {"name": "slow", "condition": {"kind": "latency_p95", "minutes": 10, "above_ms": 50}},
        {"name": "errors", "condition": {"kind": "error_rate", "minutes": 10, "above": 0.5, "min_requests": 1}}
    ]));
    let shared: Arc<dyn AuditSource> = Arc::clone(&source) as Arc<dyn AuditSource>;
    let alerter = Alerter::new(db, Some(shared), rules, Some(hook))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    let partial = "the audit source answered in part: PartialError: There were some errors";

    // Above every threshold but errors, answered in part: nothing fires; the page says why.
    assert_eq!(alerter.tick(now).await, Vec::<String>::new());
    for state in alerter.states() {
        assert!(!state.firing, "{state:?}");
        assert!(
            state.error.as_deref().is_some_and(|e| e.contains(partial)),
            "{state:?}"
        );
    }
    assert!(
        alerter.states()[1]
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("limit rule users-daily: ")),
        "{:?}",
        alerter.states()[1]
    );

    // Answered in full: they fire.
    source.partial.store(false, Ordering::SeqCst);
    let fired = alerter.tick(now + Duration::minutes(1)).await;
    assert_eq!(fired.len(), 3, "{fired:?}");
    assert!(
        fired[0].starts_with("FIRING: budget: 900 tokens today"),
        "{fired:?}"
    );
    assert!(
        fired[1].starts_with("FIRING: quota: user oid-1 used 900 of 1000"),
        "{fired:?}"
    );
    assert!(fired[2].starts_with("FIRING: slow: "), "{fired:?}");
    assert!(alerter.states().iter().all(|s| s.error.is_none()));

    // The next day nothing holds any more, but the answers are partial: nothing resolves, the
    // state is kept.
    source.partial.store(true, Ordering::SeqCst);
    let tomorrow = now + Duration::days(1);
    assert_eq!(alerter.tick(tomorrow).await, Vec::<String>::new());
    let states = alerter.states();
    assert!(
        states[0].firing && states[1].firing && states[2].firing,
        "{states:?}"
    );
    assert_eq!(states[1].subjects.len(), 1);
    assert_eq!(states[1].subjects[0].subject, "users-daily/user/oid-1");
    assert!(
        states[..3]
            .iter()
            .all(|s| s.error.as_deref().is_some_and(|e| e.contains(partial))),
        "{states:?}"
    );

    // Answered in full again: they resolve, once.
    source.partial.store(false, Ordering::SeqCst);
    let resolved = alerter.tick(tomorrow + Duration::minutes(1)).await;
    assert_eq!(resolved.len(), 3, "{resolved:?}");
    assert!(
        resolved.iter().all(|r| r.starts_with("RESOLVED: ")),
        "{resolved:?}"
    );
    assert_eq!(receiver.messages(), [fired, resolved].concat());
    // The quota and the budget are totals per subject: never a row per subject and bucket.
    assert_eq!(source.bucketed.load(Ordering::SeqCst), 0);
}

/// Two simulators in pool `chat`: `flaky` tried first, `steady` behind it; a key that may call.
struct Fleet {
    portal: Portal,
    gateway: TestGateway,
    flaky: gatehouse_simulator::RunningSimulator,
    _steady: gatehouse_simulator::RunningSimulator,
    key: String,
    _secrets: tempfile::TempDir,
}

async fn fleet(db: &ConfigDb) -> Fleet {
    let user = admin();
    let gateway = gateway_at("127.0.0.1:0".parse().unwrap()).await;
    let start = |id: &str| {
        Simulator::start(
            SimulatorConfig {
                id: id.to_owned(),
                ..SimulatorConfig::default()
            },
            "127.0.0.1:0".parse().unwrap(),
        )
    };
    let flaky = start("flaky").await.unwrap();
    let steady = start("steady").await.unwrap();
    let portal = portal(db);
    let secrets = tempfile::tempdir().unwrap();
    let token_file = secrets.path().join("admin-token");
    std::fs::write(&token_file, ADMIN_TOKEN).unwrap();
    portal
        .register_gateway(
            Some(&user),
            "gw",
            &gateway.url,
            &format!("file:{}", token_file.display()),
        )
        .await
        .unwrap();
    portal
        .save_pool(
            Some(&user),
            PoolInput {
                id: "chat".into(),
                deployments: "gpt-4o".into(),
                serves_resources: false,
                ..PoolInput::default()
            },
            false,
        )
        .await
        .unwrap();
    for (id, simulator, priority) in [("flaky", &flaky, "1"), ("steady", &steady, "2")] {
        portal
            .save_member(
                Some(&user),
                MemberInput {
                    pool_id: "chat".into(),
                    id: id.into(),
                    kind: "azure_openai".into(),
                    endpoint: simulator.url(),
                    priority: priority.into(),
                    ..MemberInput::default()
                },
            )
            .await
            .unwrap();
    }
    let key = portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap()
        .key;
    portal
        .save_access_rule(
            Some(&user),
            AccessRuleInput {
                id: "team-a".into(),
                grantee_kind: "subscription".into(),
                grantee_id: "team-a".into(),
                deployments: "gpt-4o".into(),
                ..AccessRuleInput::default()
            },
            false,
        )
        .await
        .unwrap();
    Fleet {
        portal,
        gateway,
        flaky,
        _steady: steady,
        key,
        _secrets: secrets,
    }
}

impl Fleet {
    /// One chat call; `flaky` answers 429 asking for `ms` of rest, the gateway sets it aside and
    /// `steady` answers.
    async fn throttle_flaky(&self, ms: u64) {
        self.flaky.set_fault(Fault::Throttle {
            hint: RetryHint::RetryAfterMs(ms),
            times: Some(1),
        });
        let status = reqwest::Client::new()
            .post(format!(
                "{}/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21",
                self.gateway.url
            ))
            .header("api-key", &self.key)
            .json(&json!({"messages": [{"role": "user", "content": "hello"}]}))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 200, "failed over to steady");
        assert_eq!(self.flaky_state().await, MemberAvailability::Throttled);
    }

    async fn flaky_state(&self) -> MemberAvailability {
        let reports = self.portal.backend_health(Some(&admin())).await.unwrap();
        let states = reports[0].result.as_ref().unwrap();
        states
            .members
            .iter()
            .find(|m| m.member == "flaky")
            .unwrap()
            .state
    }

    /// Waits (real time) until the gateway takes calls on `flaky` again.
    async fn until_flaky_available(&self) {
        for _ in 0..100 {
            if self.flaky_state().await == MemberAvailability::Available {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("flaky stayed set aside");
    }
}

async fn a_member_set_aside_too_long_fires_and_resolves(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let fleet = fleet(&db).await;
    let rules = rules(json!([
        {"name": "aside", "condition": {"kind": "backend_set_aside", "minutes": 5, "pool": "chat"}},
        {"name": "typo", "condition": {"kind": "backend_set_aside", "minutes": 5, "pool": "chats"}}
    ]));
    // No audit source: this kind reads the gateways and the config database only.
    let alerter = Alerter::new(db.clone(), None, rules.clone(), Some(hook.clone()))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    assert!(alerter.tick(t0).await.is_empty(), "every member available");
    assert_eq!(
        alerter.states()[0].observed.as_deref(),
        Some("0 of 2 members set aside")
    );
    assert_eq!(
        alerter.states()[1].error.as_deref(),
        Some("pool: pool `chats` is not in the configuration")
    );

    // Throttled for 6 s of real time; the alerter's clock is the `now` it is given.
    fleet.throttle_flaky(6_000).await;
    assert!(alerter.tick(t0 + Duration::minutes(1)).await.is_empty());
    let watched = &alerter.states()[0];
    assert!(!watched.firing);
    assert_eq!(watched.subjects.len(), 1);
    assert_eq!(watched.subjects[0].subject, "gw/chat/flaky");
    assert_eq!(watched.subjects[0].since, t0 + Duration::minutes(1));
    assert!(
        alerter.tick(t0 + Duration::minutes(6)).await.is_empty(),
        "exactly 5 minutes is not longer than 5"
    );
    let fired = alerter
        .tick(t0 + Duration::minutes(6) + Duration::seconds(1))
        .await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(
        fired[0].starts_with(
            "FIRING: aside: member flaky of pool chat on gateway gw: throttled since "
        ),
        "{fired:?}"
    );
    assert!(fired[0].ends_with("(5 min; threshold 5 min)"), "{fired:?}");
    assert!(alerter.tick(t0 + Duration::minutes(7)).await.is_empty());
    let state = &alerter.states()[0];
    assert!(state.firing);
    assert_eq!(state.since, Some(t0 + Duration::minutes(1)));

    // A restarted alerter knows it fires already.
    drop(alerter);
    let alerter = Alerter::new(db.clone(), None, rules.clone(), Some(hook.clone()))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    assert!(alerter.states()[0].firing, "loaded from the database");
    assert!(alerter.tick(t0 + Duration::minutes(8)).await.is_empty());

    fleet.until_flaky_available().await;
    let resolved = alerter.tick(t0 + Duration::minutes(9)).await;
    assert_eq!(
        resolved,
        ["RESOLVED: aside: member flaky of pool chat on gateway gw: available again"]
    );
    assert!(alerter.states()[0].subjects.is_empty());

    // Set aside again after being available: the clock starts again.
    fleet.throttle_flaky(6_000).await;
    assert!(alerter.tick(t0 + Duration::minutes(10)).await.is_empty());
    assert!(
        alerter.tick(t0 + Duration::minutes(14)).await.is_empty(),
        "4 minutes since it was set aside again"
    );
    let again = alerter
        .tick(t0 + Duration::minutes(15) + Duration::seconds(1))
        .await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(
        again[0].starts_with("FIRING: aside: member flaky"),
        "{again:?}"
    );
    assert_eq!(
        receiver.messages(),
        [&fired[..], &resolved[..], &again[..]].concat()
    );
}

/// A call of `subscription` by `user` with `tokens` tokens.
fn usage(i: usize, at: OffsetDateTime, subscription: &str, user: &str, tokens: u64) -> AuditRecord {
    let mut record = record(i, at, 200, 100);
    record.apim_subscription_id = Some(subscription.to_owned());
    record.user_id = Some(user.to_owned());
    record.usage = Some(TokenUsage {
        prompt_tokens: tokens / 2,
        completion_tokens: tokens - tokens / 2,
        total_tokens: tokens,
        ..TokenUsage::default()
    });
    record
}

async fn a_quota_nearly_used_fires_and_resolves_with_the_next_period(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let (source, _dir) = audit_store().await;
    let portal = portal(&db);
    let user = admin();
    // A limit of the operator's own (the snapshot base): every user, 2000 tokens a month.
    db.set_setting(
        BASE_SETTING,
        &json!({"version": 0, "limits": [{
            "id": "users-monthly",
            "subject": {"kind": "each_user"},
            "token_quota": {"tokens": 2000, "period": "monthly"}
        }]})
        .to_string(),
    )
    .await
    .unwrap();
    portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-a".into(),
                display_name: "Team A".into(),
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    // An access rule's limit (published as `rule:team-a`): 1000 tokens a day.
    portal
        .save_access_rule(
            Some(&user),
            AccessRuleInput {
                id: "team-a".into(),
                grantee_kind: "subscription".into(),
                grantee_id: "team-a".into(),
                deployments: "*".into(),
                quota_tokens: "1000".into(),
                quota_period: "daily".into(),
                ..AccessRuleInput::default()
            },
            false,
        )
        .await
        .unwrap();

    // Wednesday 12 March 2025, noon: team-a (user oid-1) used 800 tokens today, 200 of them
    // before midnight... of the day before, which this day's quota does not count.
    let now = datetime!(2025-03-12 12:00 UTC);
    source
        .store()
        .write(&[
            usage(1, now - Duration::hours(13), "team-a", "oid-1", 300),
            usage(2, now - Duration::hours(2), "team-a", "oid-1", 400),
            usage(3, now - Duration::minutes(5), "team-a", "oid-1", 400),
            usage(4, now - Duration::minutes(4), "team-b", "oid-2", 100),
        ])
        .await
        .unwrap();
    let rules = rules(json!([
        {"name": "quota", "condition": {"kind": "quota_nearly_used", "percent": 75}},
        {"name": "users", "condition": {"kind": "quota_nearly_used", "percent": 50, "limit": "users-monthly"}},
        {"name": "typo", "condition": {"kind": "quota_nearly_used", "percent": 50, "limit": "users-daily"}}
    ]));
    let source: Arc<dyn AuditSource> = Arc::new(source);
    let missing = Alerter::new(db.clone(), None, rules.clone(), None)
        .await
        .unwrap_err();
    assert!(matches!(missing, AlertSetupError::NoAuditSource(ref name) if name == "quota"));
    let alerter = Alerter::new(db.clone(), Some(source), rules, Some(hook))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());

    let fired = alerter.tick(now).await;
    assert_eq!(
        fired,
        [
            "FIRING: quota: subscription team-a used 800 of 1000 tokens (80.0%, threshold 75%) of limit rule rule:team-a this day (UTC, since 2025-03-12 00:00 UTC); counted on every deployment, the rule covers *",
            "FIRING: users: user oid-1 used 1100 of 2000 tokens (55.0%, threshold 50%) of limit rule users-monthly this month (UTC, since 2025-03-01 00:00 UTC)",
        ]
    );
    let states = alerter.states();
    assert_eq!(
        states[0].observed.as_deref(),
        Some("1 subjects at 75% or more of their quota (2 quotas)")
    );
    assert_eq!(states[1].subjects.len(), 1);
    assert_eq!(states[1].subjects[0].subject, "users-monthly/user/oid-1");
    assert_eq!(
        states[2].error.as_deref(),
        Some("limit: limit rule `users-daily` is not in the published configuration")
    );
    assert!(alerter.tick(now + Duration::minutes(1)).await.is_empty());

    // The next day the daily quota starts again; the monthly one still holds.
    let tomorrow = alerter.tick(now + Duration::days(1)).await;
    assert_eq!(tomorrow.len(), 1, "{tomorrow:?}");
    assert!(
        tomorrow[0].starts_with("RESOLVED: quota: subscription team-a used 0 of 1000 tokens (0.0%"),
        "{tomorrow:?}"
    );
    // April: oid-1 made no call in the new month, and is resolved all the same.
    let april = alerter.tick(datetime!(2025-04-01 00:30 UTC)).await;
    assert_eq!(april.len(), 1, "{april:?}");
    assert!(
        april[0].starts_with("RESOLVED: users: user oid-1 used 0 of 2000 tokens"),
        "{april:?}"
    );
    assert_eq!(
        receiver.messages(),
        [&fired[..], &tomorrow[..], &april[..]].concat()
    );
}

async fn a_key_expiring_fires_and_resolves(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let portal = portal(&db);
    let user = admin();
    let today = OffsetDateTime::now_utc().date();
    let mut keys = Vec::new();
    for (id, days) in [("team-k", Some(10)), ("team-r", Some(3)), ("team-n", None)] {
        let expires_on = days
            .map(|d: i64| (today + Duration::days(d)).to_string())
            .unwrap_or_default();
        keys.push(
            portal
                .create_subscription(
                    Some(&user),
                    NewSubscription {
                        id: id.into(),
                        display_name: format!("Team {id}"),
                        expires_on,
                        ..NewSubscription::default()
                    },
                )
                .await
                .unwrap()
                .key,
        );
    }
    let alerter = Alerter::new(
        db.clone(),
        None,
        rules(json!([{"name": "keys", "condition": {"kind": "key_expiring", "days": 7}}])),
        Some(hook),
    )
    .await
    .unwrap()
    .with_admin_token_refs(common::test_token_refs());
    let now = OffsetDateTime::now_utc();
    let first = alerter.tick(now).await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        first[0].starts_with(&format!(
            "FIRING: keys: subscription team-r (Team team-r): primary key expires {} 23:59 UTC (in 3 days",
            today + Duration::days(3)
        )),
        "{first:?}"
    );
    assert_eq!(
        alerter.states()[0].observed.as_deref(),
        Some("1 of 3 keys expire within 7 days or have expired")
    );
    let later = alerter.tick(now + Duration::days(4)).await;
    assert_eq!(later.len(), 1, "{later:?}");
    assert!(
        later[0]
            .starts_with("FIRING: keys: subscription team-k (Team team-k): primary key expires"),
        "{later:?}"
    );

    // Revoked: resolved. Rotated: the previous key is watched too, until it is retired.
    portal
        .revoke_subscription(Some(&user), "team-r")
        .await
        .unwrap();
    let rotated = portal
        .rotate_subscription_key(Some(&user), "team-k", "")
        .await
        .unwrap()
        .key;
    keys.push(rotated);
    let mut changed = alerter
        .tick(now + Duration::days(4) + Duration::minutes(1))
        .await;
    changed.sort();
    assert_eq!(changed.len(), 2, "{changed:?}");
    assert!(
        changed[0]
            .starts_with("FIRING: keys: subscription team-k (Team team-k): secondary key expires"),
        "{changed:?}"
    );
    assert_eq!(
        changed[1],
        "RESOLVED: keys: subscription team-r (Team team-r): revoked"
    );
    portal
        .retire_secondary_key(Some(&user), "team-k", "")
        .await
        .unwrap();
    let retired = alerter
        .tick(now + Duration::days(4) + Duration::minutes(2))
        .await;
    assert_eq!(
        retired,
        ["RESOLVED: keys: subscription team-k (Team team-k): secondary key retired"]
    );
    // Expired and not revoked: still firing, not notified again.
    assert!(alerter.tick(now + Duration::days(12)).await.is_empty());
    assert!(
        alerter.states()[0].subjects[0]
            .observed
            .contains("primary key expired"),
        "{:?}",
        alerter.states()
    );

    let sent = receiver.messages();
    assert_eq!(sent.len(), 5);
    let hashes: Vec<String> = db
        .subscriptions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.primary_key_hash)
        .collect();
    for text in &sent {
        for secret in keys.iter().chain(&hashes) {
            assert!(!text.contains(secret.as_str()), "{text}");
        }
        assert!(!text.contains("sha256"), "{text}");
    }
}

async fn the_state_survives_a_restart(db: ConfigDb) {
    let (receiver, hook) = receiver().await;
    let portal = portal(&db);
    let user = admin();
    let tomorrow = (OffsetDateTime::now_utc().date() + Duration::days(1)).to_string();
    for id in ["team-x", "team-y"] {
        portal
            .create_subscription(
                Some(&user),
                NewSubscription {
                    id: id.into(),
                    display_name: id.into(),
                    expires_on: tomorrow.clone(),
                    ..NewSubscription::default()
                },
            )
            .await
            .unwrap();
    }
    let rules = rules(json!([{"name": "keys", "condition": {"kind": "key_expiring", "days": 2}}]));
    let now = OffsetDateTime::now_utc();
    let first = Alerter::new(db.clone(), None, rules.clone(), Some(hook.clone()))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    assert_eq!(first.tick(now).await.len(), 2);
    drop(first);

    // Restarted: the two keys still expire; nothing is sent again.
    let second = Alerter::new(db.clone(), None, rules.clone(), Some(hook.clone()))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    let state = &second.states()[0];
    assert!(state.firing && state.subjects.len() == 2, "{state:?}");
    assert!(state.checked_at.is_none());
    assert!(second.tick(now + Duration::minutes(1)).await.is_empty());
    // A resolution whose delivery fails is not stored as delivered...
    portal
        .revoke_subscription(Some(&user), "team-x")
        .await
        .unwrap();
    receiver.fail_next.store(1, Ordering::SeqCst);
    assert!(second.tick(now + Duration::minutes(2)).await.is_empty());
    assert_eq!(
        second.states()[0].error.as_deref(),
        Some("webhook answered HTTP 503")
    );
    drop(second);

    // ...so after a restart it is sent, with the one that resolved while the alerter was down.
    portal
        .revoke_subscription(Some(&user), "team-y")
        .await
        .unwrap();
    let third = Alerter::new(db.clone(), None, rules.clone(), Some(hook.clone()))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    let mut resolved = third.tick(now + Duration::minutes(3)).await;
    resolved.sort();
    assert_eq!(
        resolved,
        [
            "RESOLVED: keys: subscription team-x (team-x): revoked",
            "RESOLVED: keys: subscription team-y (team-y): revoked",
        ]
    );
    assert!(third.tick(now + Duration::minutes(4)).await.is_empty());
    assert_eq!(receiver.messages().len(), 4);
    assert!(db.alert_states().await.unwrap().is_empty());

    // The state of a rule no longer configured is dropped at start.
    portal
        .create_subscription(
            Some(&user),
            NewSubscription {
                id: "team-z".into(),
                display_name: "team-z".into(),
                expires_on: tomorrow,
                ..NewSubscription::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(third.tick(now + Duration::minutes(5)).await.len(), 1);
    assert_eq!(db.alert_states().await.unwrap().len(), 1);
    drop(third);
    let renamed = rules_renamed(&rules);
    let fourth = Alerter::new(db.clone(), None, renamed, Some(hook))
        .await
        .unwrap()
        .with_admin_token_refs(common::test_token_refs());
    assert!(db.alert_states().await.unwrap().is_empty());
    let fired = fourth.tick(now + Duration::minutes(6)).await;
    assert_eq!(fired.len(), 1, "{fired:?}");
    assert!(
        fired[0].starts_with("FIRING: key ends: subscription team-z (team-z): primary key expires"),
        "{fired:?}"
    );
}

fn rules_renamed(rules: &[AlertRule]) -> Vec<AlertRule> {
    rules
        .iter()
        .map(|rule| AlertRule {
            name: "key ends".to_owned(),
            condition: rule.condition.clone(),
        })
        .collect()
}

/// The portal counts a quota over the gateway's calendar window (`QuotaPeriod::window`, checked in
/// `schema`); this checks its conversion to instants.
#[test]
fn quota_windows_are_the_gateways() {
    let at = datetime!(2024-02-29 23:59:59 UTC);
    assert_eq!(
        quota_window(QuotaPeriod::Monthly, at),
        (
            datetime!(2024-02-01 00:00 UTC),
            datetime!(2024-03-01 00:00 UTC)
        )
    );
    assert_eq!(
        quota_window(QuotaPeriod::Weekly, at),
        (
            datetime!(2024-02-26 00:00 UTC),
            datetime!(2024-03-04 00:00 UTC)
        )
    );
    assert_eq!(
        quota_window(QuotaPeriod::Hourly, at),
        (
            datetime!(2024-02-29 23:00 UTC),
            datetime!(2024-03-01 00:00 UTC)
        )
    );
}

macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let test = super::common::sqlite().await;
                    super::$name(test.db.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    let test = super::common::postgres().await;
                    super::$name(test.db.clone()).await;
                }
            )*
        }
    };
}

on_both_engines!(
    each_usage_rule_fires_once_and_resolves_once,
    a_member_set_aside_too_long_fires_and_resolves,
    a_quota_nearly_used_fires_and_resolves_with_the_next_period,
    a_key_expiring_fires_and_resolves,
    the_state_survives_a_restart,
    a_partial_answer_neither_fires_nor_resolves,
    a_long_window_reaches_no_further_back_than_its_minutes,
);

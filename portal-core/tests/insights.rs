//! The dashboards and the audit search over the embedded store, on SQLite and on PostgreSQL:
//! records go in through the audit crate's writer (chained like the gateway's), then the source
//! and the role-checked operations are asked.
#![expect(clippy::unwrap_used, clippy::expect_used, reason = "test code")]

mod common;

use std::sync::Arc;

use futures::StreamExt;
use gatehouse_audit::AuditRecord;
use gatehouse_audit::chain::Chainer;
use gatehouse_audit::sql::SqlStore;
use gatehouse_portal_core::insights::embedded::EmbeddedSource;
use gatehouse_portal_core::insights::service::{
    ExportFormat, MAX_USAGE_POINTS, PriceTable, UsagePoints,
};
use gatehouse_portal_core::insights::{
    AuditSource, ChainCheck, Dimension, Insights, InsightsError, SearchForm, SearchRequest,
    TimeRange, UsageTotal, csv,
};
use gatehouse_portal_core::{ConfigDb, PortalError, SessionUser};
use gatehouse_schema::OperationId;
use gatehouse_schema::audit::{BackendAttempt, TokenUsage};
use gatehouse_schema::portal::Role;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const T0: OffsetDateTime = datetime!(2026-11-30 10:00 UTC);

struct Call {
    user: (&'static str, &'static str),
    ip: &'static str,
    groups: &'static [&'static str],
    model: &'static str,
    prompt: String,
    status: u16,
    tokens: (u64, u64),
    total_time: u64,
    ttfb: Option<u64>,
}

fn record(i: usize, at: OffsetDateTime, call: Call) -> AuditRecord {
    AuditRecord {
        time_generated: at,
        correlation_id: format!("call-{i:03}"),
        gateway_id: "gw-1".to_owned(),
        operation_id: Some(OperationId::ChatCompletionsCreate),
        caller_ip_address: call.ip.to_owned(),
        peer_ip_address: "10.0.0.1".to_owned(),
        method: "POST".to_owned(),
        url: "/openai/deployments/chat/chat/completions".to_owned(),
        client_protocol: "HTTP/1.1".to_owned(),
        response_code: call.status,
        is_request_success: call.status < 400,
        backend_response_code: Some(call.status),
        backend_id: Some("east".to_owned()),
        backend_url: None,
        request_size: 100,
        response_size: 200,
        total_time: call.total_time,
        backend_time: call.total_time,
        time_to_first_byte: call.ttfb,
        // Twice the first byte: the dashboard's time to first token must read this, not that.
        time_to_first_token: call.ttfb.map(|ms| ms * 2),
        apim_subscription_id: Some("team-a".to_owned()),
        product_id: None,
        user_id: Some(call.user.0.to_owned()),
        user_name: Some(call.user.1.to_owned()),
        tenant_id: None,
        groups: call.groups.iter().map(|g| (*g).to_owned()).collect(),
        deployment_name: Some("chat".to_owned()),
        model_name: Some(call.model.to_owned()),
        api_version: Some("2024-10-21".to_owned()),
        is_stream_completion: false,
        usage: Some(TokenUsage {
            prompt_tokens: call.tokens.0,
            completion_tokens: call.tokens.1,
            total_tokens: call.tokens.0 + call.tokens.1,
            ..TokenUsage::default()
        }),
        attempts: vec![BackendAttempt {
            backend_id: "east".to_owned(),
            status: Some(call.status),
            elapsed_ms: call.total_time,
            error: None,
        }],
        backend_request_body: Some(format!("{{\"model\":\"{}\"}}", call.model)),
        request_body_truncated: false,
        backend_response_body: Some("{}".to_owned()),
        response_body_truncated: false,
        request_messages: Some(format!(
            "[{{\"role\":\"user\",\"content\":\"{}\"}}]",
            call.prompt
        )),
        response_messages: Some("[\"ok <b>done</b>\"]".to_owned()),
        client_aborted: false,
        last_error_reason: None,
        last_error_message: None,
        chain: None,
    }
}

const ALICE: (&str, &str) = ("oid-alice", "alice@contoso.com");
const BOB: (&str, &str) = ("oid-bob", "+bob@contoso.com");
const CAROL: (&str, &str) = ("oid-carol", "carol@contoso.com");

/// 12 calls in [T0, T0 + 12 min), one more two hours before (the previous range), all chained.
async fn seed(store: &SqlStore) {
    let mut records = vec![record(
        99,
        T0 - Duration::hours(2),
        Call {
            user: ("oid-dave", "dave"),
            ip: "192.0.2.1",
            groups: &["g-red"],
            model: "gpt-4o",
            prompt: "earlier".into(),
            status: 200,
            tokens: (1, 1),
            total_time: 50,
            ttfb: Some(5),
        },
    )];
    records.push(record(
        0,
        T0,
        Call {
            user: ALICE,
            ip: "198.51.100.7",
            groups: &["g-red"],
            model: "gpt-4o",
            prompt: "the secret launch plan <script>alert(1)</script>".into(),
            status: 200,
            tokens: (10, 20),
            total_time: 100,
            ttfb: Some(30),
        },
    ));
    records.push(record(
        1,
        T0 + Duration::seconds(30),
        Call {
            user: BOB,
            ip: "203.0.113.9",
            groups: &["g-blue"],
            model: "gpt-4o-mini",
            prompt: "weather".into(),
            status: 429,
            tokens: (5, 0),
            total_time: 300,
            ttfb: None,
        },
    ));
    for i in 0..10 {
        records.push(record(
            i + 2,
            T0 + Duration::minutes(i as i64 + 1),
            Call {
                user: CAROL,
                ip: "198.51.100.20",
                groups: &["g-red", "g-blue"],
                model: "gpt-4o",
                prompt: format!("hello number {i}"),
                status: 200,
                tokens: (100, 50),
                total_time: 20 + 10 * i as u64,
                ttfb: Some(5 + i as u64),
            },
        ));
    }
    let mut chainer = Chainer::in_memory();
    for record in &mut records {
        chainer.link(record);
    }
    assert_eq!(store.write(&records).await.unwrap(), 13);
}

fn user(roles: &[Role], led: &[&str]) -> SessionUser {
    SessionUser {
        subject: format!("s-{roles:?}"),
        name: format!("{roles:?}"),
        roles: roles.to_vec(),
        led_groups: led.iter().map(|g| (*g).to_owned()).collect(),
        signed_in_at: OffsetDateTime::now_utc(),
        dev: false,
    }
}

fn range() -> TimeRange {
    TimeRange::new(T0 - Duration::hours(1), T0 + Duration::hours(2)).unwrap()
}

fn search(form: SearchForm) -> SearchRequest {
    SearchRequest::parse(
        &SearchForm {
            from: "2026-11-30T09:00".into(),
            to: "2026-11-30T12:00".into(),
            ..form
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

fn forbidden<T: std::fmt::Debug>(result: Result<T, InsightsError>) -> bool {
    matches!(result, Err(InsightsError::Portal(PortalError::Forbidden)))
}

async fn exercise(source: EmbeddedSource, db: ConfigDb) {
    let source: Arc<dyn AuditSource> = Arc::new(source);
    let insights = Insights::new(
        Some(Arc::clone(&source)),
        db.clone(),
        PriceTable::parse("gpt-4o=2.5/10").unwrap(),
    );
    let admin = user(&[Role::Admin], &[]);
    let auditor = user(&[Role::Auditor], &[]);
    let viewer = user(&[Role::Viewer], &[]);
    let lead = user(&[Role::TeamLead], &["g-red"]);

    // Overview: figures, percentiles (from the histograms), cost, and the previous range.
    let overview = insights
        .overview(Some(&viewer), range())
        .await
        .unwrap()
        .value;
    let f = &overview.current.figures;
    assert_eq!((f.requests, f.errors), (12, 1));
    assert_eq!((f.prompt_tokens, f.completion_tokens), (1015, 520));
    // From the latency histograms: within a bucket (about 12 %) of the exact nearest rank
    // (latency p50 70, p95 300; time to first token, twice the first byte, p50 20, p95 60).
    let close = |got: Option<i64>, exact: i64| {
        let got = got.expect("a percentile");
        assert!(
            (got - exact).abs() as f64 <= (exact as f64 * 0.13).max(1.0),
            "{got} is not within a bucket of {exact}"
        );
    };
    close(f.latency.p50_ms, 70);
    close(f.latency.p95_ms, 300);
    close(f.time_to_first_token.p50_ms, 20);
    close(f.time_to_first_token.p95_ms, 60);
    // gpt-4o: 1010 prompt, 520 completion; gpt-4o-mini has no price.
    let expected = 1010.0 / 1e6 * 2.5 + 520.0 / 1e6 * 10.0;
    assert!((overview.current.cost.usd - expected).abs() < 1e-9);
    assert_eq!(overview.current.cost.unpriced_models, ["gpt-4o-mini"]);
    assert_eq!(overview.previous.figures.requests, 1);
    assert_eq!(overview.previous.range.to, overview.current.range.from);
    assert!(forbidden(insights.overview(Some(&lead), range()).await));

    // Usage by group: the admin sees both, the lead only theirs, and only by group.
    let usage = insights
        .usage(Some(&admin), range(), Dimension::Group)
        .await
        .unwrap()
        .value;
    let totals: Vec<(&str, i64)> = usage
        .totals
        .iter()
        .map(|t| (t.value.as_str(), t.requests))
        .collect();
    assert_eq!(totals, [("g-red", 11), ("g-blue", 11)]);
    let mine = insights
        .usage(Some(&lead), range(), Dimension::Group)
        .await
        .unwrap()
        .value;
    assert_eq!(mine.totals.len(), 1);
    assert_eq!(mine.totals[0].value, "g-red");
    assert!(mine.points.is_empty(), "the table reads totals only");
    assert_eq!(mine.restricted_to, Some(vec!["g-red".to_owned()]));
    // The chart's and the CSV's buckets are restricted alike.
    for which in [UsagePoints::All, UsagePoints::Top(1)] {
        let over_time = insights
            .usage_over_time(Some(&lead), range(), Dimension::Group, which)
            .await
            .unwrap()
            .value;
        assert_eq!(over_time.totals, mine.totals);
        assert!(!over_time.points.is_empty());
        assert!(over_time.points.iter().all(|p| p.value == "g-red"));
    }
    assert!(forbidden(
        insights
            .usage_over_time(Some(&lead), range(), Dimension::Model, UsagePoints::All)
            .await
    ));
    assert!(forbidden(
        insights.usage(Some(&lead), range(), Dimension::Model).await
    ));
    assert!(forbidden(
        insights
            .usage(Some(&viewer), range(), Dimension::Group)
            .await
    ));
    let leads_nothing = user(&[Role::TeamLead], &[]);
    let nothing = insights
        .usage(Some(&leads_nothing), range(), Dimension::Group)
        .await
        .unwrap()
        .value;
    assert!(nothing.totals.is_empty());
    let by_model = insights
        .usage(Some(&admin), range(), Dimension::Model)
        .await
        .unwrap()
        .value;
    assert_eq!(by_model.totals[0].value, "gpt-4o");

    // Search: by name, by object id, by network, by words, by status; keyset pages.
    let ids = |page: &gatehouse_portal_core::insights::CallPage| {
        page.items
            .iter()
            .map(|c| c.correlation_id.clone())
            .collect::<Vec<_>>()
    };
    let find = |form: SearchForm| {
        let insights = insights.clone();
        let auditor = auditor.clone();
        async move {
            insights
                .search(Some(&auditor), &search(form))
                .await
                .unwrap()
                .value
        }
    };
    let by_name = find(SearchForm {
        user: "alice@contoso.com".into(),
        ..SearchForm::default()
    })
    .await;
    assert_eq!(ids(&by_name), ["call-000"]);
    let by_oid = find(SearchForm {
        user: "oid-alice".into(),
        ..SearchForm::default()
    })
    .await;
    assert_eq!(ids(&by_oid), ["call-000"]);
    let by_net = find(SearchForm {
        caller: "198.51.100.0/24".into(),
        ..SearchForm::default()
    })
    .await;
    assert_eq!(by_net.items.len(), 11);
    let by_words = find(SearchForm {
        text: "launch plan".into(),
        ..SearchForm::default()
    })
    .await;
    assert_eq!(ids(&by_words), ["call-000"]);
    let no_match = find(SearchForm {
        text: "launch nothing".into(),
        ..SearchForm::default()
    })
    .await;
    assert!(no_match.items.is_empty());
    let throttled = find(SearchForm {
        status: "429".into(),
        model: "gpt-4o-mini".into(),
        ..SearchForm::default()
    })
    .await;
    assert_eq!(ids(&throttled), ["call-001"]);
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = find(SearchForm {
            caller: "198.51.100.0/24".into(),
            limit: "5".into(),
            cursor: cursor.clone(),
            ..SearchForm::default()
        })
        .await;
        assert!(page.items.len() <= 5);
        seen.extend(ids(&page));
        match page.next {
            Some(next) => cursor = next,
            None => break,
        }
    }
    assert_eq!(
        seen,
        ids(&by_net),
        "pages hold every row once, newest first"
    );
    assert_eq!(seen.first().unwrap(), "call-011");
    let bad_cursor = insights
        .search(
            Some(&auditor),
            &search(SearchForm {
                cursor: "nonsense".into(),
                ..SearchForm::default()
            }),
        )
        .await;
    assert!(matches!(
        bad_cursor,
        Err(InsightsError::Invalid {
            field: "cursor",
            ..
        })
    ));

    // Only auditors and admins search; refusals are not recorded as searches.
    let before = db.activity(1000).await.unwrap().len();
    for who in [&viewer, &lead] {
        assert!(forbidden(
            insights
                .search(Some(who), &search(SearchForm::default()))
                .await
        ));
        assert!(forbidden(insights.call(Some(who), "call-000", false).await));
    }
    assert!(matches!(
        insights.search(None, &search(SearchForm::default())).await,
        Err(InsightsError::Portal(PortalError::NotSignedIn))
    ));
    assert_eq!(db.activity(1000).await.unwrap().len(), before);

    // The detail, its chain, and the access log.
    let detail = insights
        .call(Some(&auditor), "call-000", true)
        .await
        .unwrap()
        .value;
    assert!(
        detail
            .call
            .request_messages
            .as_deref()
            .unwrap()
            .contains("secret launch plan <script>")
    );
    assert_eq!(detail.call.backend_id.as_deref(), Some("east"));
    // The bodies as captured.
    assert_eq!(
        detail.call.request_body.as_deref(),
        Some("{\"model\":\"gpt-4o\"}")
    );
    assert_eq!(detail.call.response_body.as_deref(), Some("{}"));
    assert_eq!(detail.call.prompt_tokens, Some(10));
    assert!(detail.call.chain.is_some());
    assert_eq!(detail.chain_check, Some(ChainCheck::Intact { records: 13 }));
    assert!(matches!(
        insights.call(Some(&admin), "no-such-call", false).await,
        Err(InsightsError::Portal(PortalError::NotFound(_)))
    ));
    let log = db.activity(1000).await.unwrap();
    let searches = log.iter().filter(|e| e.action == "audit.search").count();
    assert!(searches >= 10, "{searches}");
    let missing = log
        .iter()
        .find(|e| e.action == "audit.view" && e.target == "no-such-call")
        .unwrap();
    assert_eq!(missing.actor, admin.actor());
    let viewed = log
        .iter()
        .find(|e| e.action == "audit.view" && e.target == "call-000")
        .unwrap();
    assert_eq!(viewed.actor, auditor.actor());
    assert!(
        log.iter()
            .any(|e| e.action == "audit.search" && e.target.contains("user=alice@contoso.com"))
    );

    // The export streams every match (12 in range), CSV-safe.
    let rows: Vec<_> = insights
        .export(
            Some(&auditor),
            search(SearchForm::default()),
            ExportFormat::Csv,
        )
        .await
        .unwrap()
        .collect()
        .await;
    assert_eq!(rows.len(), 12);
    let bob = rows
        .iter()
        .map(|r| r.as_ref().unwrap())
        .find(|r| r.correlation_id == "call-001")
        .unwrap();
    assert!(
        csv::call_line(bob).contains(",'+bob@contoso.com,"),
        "{}",
        csv::call_line(bob)
    );
    assert!(
        log.len() < db.activity(1000).await.unwrap().len(),
        "the export is recorded"
    );
    assert!(forbidden(
        insights
            .export(
                Some(&viewer),
                search(SearchForm::default()),
                ExportFormat::JsonLines
            )
            .await
            .map(|_| ())
    ));

    // Without a source, the operations say so (after the role check).
    let unconfigured = Insights::new(None, db, PriceTable::default());
    assert!(matches!(
        unconfigured.overview(Some(&admin), range()).await,
        Err(InsightsError::NotConfigured)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_store_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let source = EmbeddedSource::open(&url).await.unwrap();
    seed(source.store()).await;
    let config = common::sqlite().await;
    exercise(source, config.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_embedded_store_on_postgres() {
    let audit = gatehouse_test_support::TestDatabase::new("gh_insights").await;
    let source = EmbeddedSource::open(&audit.url).await.unwrap();
    seed(source.store()).await;
    let config = common::postgres().await;
    exercise(source.clone(), config.db.clone()).await;
    source.store().close().await;
}

/// One model's calls in three hours of an 8-hour range (hourly buckets), another model's in one:
/// the usage report's points are the rollups' buckets, each with its own sums.
async fn usage_points_are_per_bucket(source: EmbeddedSource, db: ConfigDb) {
    let call = |model: &'static str, tokens: (u64, u64)| Call {
        user: ALICE,
        ip: "198.51.100.7",
        groups: &["g-red"],
        model,
        prompt: "hello".into(),
        status: 200,
        tokens,
        total_time: 100,
        ttfb: Some(10),
    };
    let records = vec![
        record(0, T0 + Duration::minutes(5), call("gpt-4o", (10, 20))),
        record(1, T0 + Duration::minutes(50), call("gpt-4o", (1, 2))),
        record(2, T0 + Duration::minutes(70), call("gpt-4o", (100, 50))),
        record(3, T0 + Duration::minutes(75), call("gpt-4o-mini", (7, 7))),
        record(4, T0 + Duration::minutes(181), call("gpt-4o", (5, 5))),
    ];
    assert_eq!(source.store().write(&records).await.unwrap(), 5);
    let insights = Insights::new(Some(Arc::new(source)), db, PriceTable::default());
    let admin = user(&[Role::Admin], &[]);
    let range = TimeRange::new(T0 - Duration::hours(1), T0 + Duration::hours(7)).unwrap();
    let report = insights
        .usage_over_time(Some(&admin), range, Dimension::Model, UsagePoints::All)
        .await
        .unwrap()
        .value;
    assert!(report.points_complete);
    let points: Vec<(OffsetDateTime, i64, i64)> = report
        .points
        .iter()
        .filter(|p| p.value == "gpt-4o")
        .map(|p| (p.bucket, p.requests, p.total_tokens))
        .collect();
    assert_eq!(
        points,
        [
            (T0, 2, 33),
            (T0 + Duration::hours(1), 1, 150),
            (T0 + Duration::hours(3), 1, 10),
        ],
        "{:?}",
        report.points
    );
    assert_eq!(report.points.len(), 4, "{:?}", report.points);
    assert!(
        report.points.windows(2).all(|w| w[0].bucket <= w[1].bucket),
        "by time: {:?}",
        report.points
    );
    let totals: Vec<(&str, i64, i64)> = report
        .totals
        .iter()
        .map(|t| (t.value.as_str(), t.requests, t.total_tokens))
        .collect();
    assert_eq!(totals, [("gpt-4o", 4, 193), ("gpt-4o-mini", 1, 14)]);
    // The table's totals, asked of the store as totals (GROUP BY value), are the points added up.
    let table = insights
        .usage(Some(&admin), range, Dimension::Model)
        .await
        .unwrap();
    assert!(table.warnings.is_empty());
    assert!(table.value.points.is_empty(), "the table reads no bucket");
    let mut summed = UsageTotal::sum_by_value(&report.points);
    summed.sort_by_key(|t| std::cmp::Reverse(t.total_tokens));
    assert_eq!(table.value.totals, summed);
    assert_eq!(table.value.totals, report.totals);
}

/// More buckets × values than `MAX_USAGE_POINTS` (30 days by the hour, 150 users): the table's
/// totals come whole, the CSV's every bucket is refused with a 422 that says why, and the chart
/// reads the buckets of its top values only.
#[tokio::test(flavor = "multi_thread")]
async fn usage_points_beyond_the_bound_are_read_for_the_top_values_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let source = EmbeddedSource::open(&url).await.unwrap();
    let users: Vec<(&'static str, &'static str)> = (0..150)
        .map(|i| {
            let id: &'static str = Box::leak(format!("oid-{i:03}").into_boxed_str());
            let name: &'static str = Box::leak(format!("user-{i:03}@contoso.com").into_boxed_str());
            (id, name)
        })
        .collect();
    let records: Vec<AuditRecord> = users
        .iter()
        .enumerate()
        .map(|(i, user)| {
            record(
                i,
                T0 - Duration::days(i as i64 % 29) - Duration::minutes(i as i64),
                Call {
                    user: *user,
                    ip: "198.51.100.7",
                    groups: &["g-red"],
                    model: "gpt-4o",
                    prompt: "hello".to_owned(),
                    status: 200,
                    tokens: (i as u64 + 1, 1),
                    total_time: 100,
                    ttfb: Some(10),
                },
            )
        })
        .collect();
    assert_eq!(source.store().write(&records).await.unwrap(), 150);
    let config = common::sqlite().await;
    let insights = Insights::new(
        Some(Arc::new(source)),
        config.db.clone(),
        PriceTable::default(),
    );
    let admin = user(&[Role::Admin], &[]);
    let range = TimeRange::new(T0 - Duration::days(30), T0 + Duration::hours(1)).unwrap();
    const { assert!(721 * 150 > MAX_USAGE_POINTS) };
    let table = insights
        .usage(Some(&admin), range, Dimension::User)
        .await
        .unwrap()
        .value;
    assert_eq!(table.totals.len(), 150);
    assert_eq!(table.totals[0].value, "oid-149");
    assert_eq!(table.totals[0].total_tokens, 151);
    match insights
        .usage_over_time(Some(&admin), range, Dimension::User, UsagePoints::All)
        .await
    {
        Err(error @ InsightsError::Invalid { .. }) => {
            assert_eq!(error.status(), 422);
            assert!(
                error.to_string().contains("choose a shorter range"),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    let chart = insights
        .usage_over_time(Some(&admin), range, Dimension::User, UsagePoints::Top(6))
        .await
        .unwrap()
        .value;
    assert!(!chart.points_complete);
    assert_eq!(chart.totals, table.totals);
    let drawn: std::collections::BTreeSet<&str> =
        chart.points.iter().map(|p| p.value.as_str()).collect();
    let top: std::collections::BTreeSet<&str> = table
        .totals
        .iter()
        .take(6)
        .map(|t| t.value.as_str())
        .collect();
    assert_eq!(drawn, top);
    // A short range fits: every value's buckets.
    let day = TimeRange::new(T0 - Duration::hours(2), T0 + Duration::hours(3)).unwrap();
    let all = insights
        .usage_over_time(Some(&admin), day, Dimension::User, UsagePoints::All)
        .await
        .unwrap()
        .value;
    assert!(all.points_complete);
    assert_eq!(all.points.len(), all.totals.len());
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_points_are_per_bucket_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite:{}", dir.path().join("audit.db").display());
    let source = EmbeddedSource::open(&url).await.unwrap();
    let config = common::sqlite().await;
    usage_points_are_per_bucket(source, config.db.clone()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_points_are_per_bucket_on_postgres() {
    let audit = gatehouse_test_support::TestDatabase::new("gh_insights_buckets").await;
    let source = EmbeddedSource::open(&audit.url).await.unwrap();
    let config = common::postgres().await;
    usage_points_are_per_bucket(source.clone(), config.db.clone()).await;
    source.store().close().await;
}

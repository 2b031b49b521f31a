use std::time::Duration;

use serde_json::json;
use time::macros::datetime;

use super::local::LocalStore;
use super::redis::RedisStore;
use super::*;
use crate::secret::Secret;

/// Seconds since the epoch of a UTC date-time.
fn at(moment: OffsetDateTime) -> i64 {
    moment.unix_timestamp()
}

fn rule(value: Value) -> LimitRule {
    serde_json::from_value(value).unwrap()
}

fn limiter() -> Limiter {
    Limiter::new(&LimitSettings::default(), Counter::default()).unwrap()
}

fn team_a() -> LimitSubject<'static> {
    LimitSubject {
        subscription: Some("team-a"),
        user: None,
        groups: &[],
    }
}

fn tokens(prompt: u64, completion: u64) -> Estimate {
    Estimate {
        prompt_tokens: prompt,
        completion_tokens: completion,
    }
}

/// Deployment patterns and user ids match ignoring ASCII case, as access rules match them: a
/// rule entered as `GPT-4o*` for `5F1C…` limits that user's calls to `gpt-4o-mini`, and a
/// deployment spelled two ways has one counter.
#[tokio::test]
async fn rules_match_deployments_and_users_ignoring_case() {
    let limiter = limiter();
    let rules = vec![
        rule(
            json!({"id": "mixed", "subject": {"kind": "user", "id": "5F1C0D3E-8A2B-4C6D-9E0F-123456789ABC"},
                    "requests_per_minute": 1, "deployments": ["GPT-4o*"]}),
        ),
        rule(
            json!({"id": "per-deployment", "subject": {"kind": "each_user"},
                    "requests_per_minute": 2, "each_deployment": true}),
        ),
    ];
    let user = LimitSubject {
        subscription: None,
        user: Some("5f1c0d3e-8a2b-4c6d-9e0f-123456789abc"),
        groups: &[],
    };
    limiter
        .admit(
            &rules,
            &user,
            Some("gpt-4o-mini"),
            None,
            Estimate::default(),
        )
        .await
        .unwrap();
    let refused = limiter
        .admit(
            &rules,
            &user,
            Some("gpt-4o-mini"),
            None,
            Estimate::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(refused.limit_id(), "mixed", "{refused}");
    // `o3` and `O3` share one counter of the per-deployment rule.
    for spelling in ["o3", "O3"] {
        limiter
            .admit(&rules, &user, Some(spelling), None, Estimate::default())
            .await
            .unwrap();
    }
    let refused = limiter
        .admit(&rules, &user, Some("o3"), None, Estimate::default())
        .await
        .unwrap_err();
    assert_eq!(refused.limit_id(), "per-deployment", "{refused}");
}

#[test]
fn buckets_refill_continuously_and_waits_are_exact() {
    // 600 per minute: 10 per second, 1 per 100 ms.
    assert_eq!(bucket::drained(600.0, 1_000_000, 600), 590.0);
    assert_eq!(bucket::drained(5.0, 60_000_000, 600), 0.0);
    assert_eq!(
        bucket::drained(5.0, -1_000_000, 600),
        5.0,
        "a clock step back"
    );
    assert_eq!(bucket::wait_ms(590.0, 10, 600), 0);
    // 25 tokens short at 10 per second: 2.5 s.
    assert_eq!(bucket::wait_ms(600.0, 25, 600), 2_500);
    assert_eq!(bucket::wait_ms(595.0, 25, 600), 2_000);
    // An overrun bucket (debt from a reconciliation) waits for the debt too.
    assert_eq!(bucket::wait_ms(660.0, 1, 600), 6_100);
}

#[test]
fn completion_allowance_reads_the_body() {
    let chat = OperationId::ChatCompletionsCreate;
    assert_eq!(completion_allowance(chat, Some(&json!({})), 1024), 1024);
    assert_eq!(
        completion_allowance(chat, Some(&json!({"max_tokens": 50})), 1024),
        50
    );
    assert_eq!(
        completion_allowance(
            chat,
            Some(&json!({"max_tokens": 50, "max_completion_tokens": 70})),
            1024
        ),
        70
    );
    assert_eq!(
        completion_allowance(chat, Some(&json!({"max_tokens": 50, "n": 3})), 1024),
        150
    );
    assert_eq!(
        completion_allowance(
            OperationId::CompletionsCreate,
            Some(&json!({"max_tokens": 10, "n": 2, "best_of": 4})),
            1024
        ),
        40
    );
    assert_eq!(
        completion_allowance(
            OperationId::CreateResponse,
            Some(&json!({"max_output_tokens": 300})),
            1024
        ),
        300
    );
    assert_eq!(
        completion_allowance(OperationId::EmbeddingsCreate, Some(&json!({})), 1024),
        0
    );
    assert_eq!(
        completion_allowance(OperationId::ImageGenerationsCreate, None, 1024),
        0
    );
}

#[tokio::test]
async fn a_chat_estimate_is_the_prompt_plus_the_allowed_completion() {
    let body = bytes::Bytes::from(
        json!({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 40})
            .to_string(),
    );
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        "application/json".parse().unwrap(),
    );
    let call = crate::classify::classify(
        &http::Method::POST,
        "/openai/deployments/gpt-4o/chat/completions",
        Some("api-version=2024-10-21"),
        &headers,
        &body,
    )
    .unwrap();
    let estimate = Estimate::of_call(&call, 1024).await;
    // 3 per message + "user" (1) + "Hello there" (2) + 3 priming.
    assert_eq!(estimate, tokens(9, 40));
}

fn tpm_bucket(key: &str, per_minute: u64, cost: u64) -> Bucket {
    Bucket {
        key: key.to_owned(),
        kind: BucketKind::Tokens { per_minute },
        cost,
        rule: 0,
    }
}

fn quota_bucket(key: &str, tokens: u64, period: QuotaPeriod, cost: u64) -> Bucket {
    Bucket {
        key: key.to_owned(),
        kind: BucketKind::Quota { tokens, period },
        cost,
        rule: 0,
    }
}

const T0: i64 = 1_741_790_107_000_000; // 2025-03-12 14:35:07 UTC, in µs

#[test]
fn the_local_store_charges_all_or_nothing() {
    let store = LocalStore::default();
    let small = tpm_bucket("a", 100, 60);
    let large = tpm_bucket("b", 1_000, 60);
    assert_eq!(
        store.admit(&[small.clone(), large.clone()], T0),
        StoreAnswer::Admitted(vec![(40, 0), (940, 0)])
    );
    // `a` has 40 left: the next 60 are refused, for exactly 20 tokens / (100 / 60 s) = 12 s,
    // and `b` is not charged either.
    assert_eq!(
        store.admit(&[large.clone(), small.clone()], T0),
        StoreAnswer::Refused {
            bucket: 1,
            wait_ms: 12_000
        }
    );
    assert_eq!(
        store.admit(std::slice::from_ref(&large), T0),
        StoreAnswer::Admitted(vec![(880, 0)])
    );
    // 12 s later the call fits, and only just.
    assert_eq!(
        store.admit(std::slice::from_ref(&small), T0 + 12_000_000 - 1_000),
        StoreAnswer::Refused {
            bucket: 0,
            wait_ms: 1
        }
    );
    assert_eq!(
        store.admit(&[small], T0 + 12_000_000),
        StoreAnswer::Admitted(vec![(0, 0)])
    );
}

/// A quota as large as a counter holds, charged with the largest cost a client's `max_tokens`
/// can make: no overflow (a panic in a debug build, a counter wrapping to almost nothing in a
/// release one).
#[test]
fn the_local_store_never_overflows_a_quota() {
    let store = LocalStore::default();
    let bucket = |cost| quota_bucket("q", u64::MAX, QuotaPeriod::Daily, cost);
    assert!(matches!(
        store.admit(&[bucket(u64::MAX)], T0),
        StoreAnswer::Admitted(_)
    ));
    assert!(matches!(
        store.admit(&[bucket(u64::MAX)], T0),
        StoreAnswer::Admitted(_) | StoreAnswer::Refused { .. }
    ));
    assert!(matches!(
        store.admit(&[bucket(1)], T0),
        StoreAnswer::Admitted(_) | StoreAnswer::Refused { .. }
    ));
}

#[test]
fn the_local_store_refuses_the_longest_wait_and_quotas_first() {
    let store = LocalStore::default();
    let start = at(datetime!(2025-03-12 0:00 UTC));
    let end = at(datetime!(2025-03-13 0:00 UTC));
    let quota = quota_bucket("q", 100, QuotaPeriod::Daily, 90);
    assert_eq!(
        store.admit(&[quota.clone(), tpm_bucket("t", 100, 90)], T0),
        StoreAnswer::Admitted(vec![(10, start), (10, 0)])
    );
    // Both refuse; the quota answers, with the time to the end of the day.
    assert_eq!(
        store.admit(&[tpm_bucket("t", 100, 90), quota.clone()], T0),
        StoreAnswer::Refused {
            bucket: 1,
            wait_ms: u64::try_from((end * 1_000_000 - T0) / 1_000).unwrap()
        }
    );
    // Two rates refuse: the longer wait answers.
    assert_eq!(
        store.admit(&[tpm_bucket("t", 100, 20), tpm_bucket("u", 10, 20)], T0),
        StoreAnswer::Refused {
            bucket: 1,
            wait_ms: 60_000
        }
    );
    // The next day starts at zero.
    assert_eq!(
        store.admit(&[quota], end * 1_000_000),
        StoreAnswer::Admitted(vec![(10, end)])
    );
}

/// 2025-03-12 14:59:57 UTC: the hour ends in 3 s, the day in 9 h 3 s.
const NEAR_THE_HOUR: i64 = 1_741_791_597_000_000;

/// The buckets of [`refusing_buckets_give_the_longest_wait`], charged 90 of 100 each at
/// [`NEAR_THE_HOUR`], then asked for 20 more.
fn refusing_buckets(cost: u64) -> [Bucket; 3] {
    [
        quota_bucket("h", 100, QuotaPeriod::Hourly, cost),
        quota_bucket("d", 100, QuotaPeriod::Daily, cost),
        tpm_bucket("t", 100, cost),
    ]
}

/// What a store answers for each refusal of [`refusing_buckets`]: several quotas refuse, the one
/// that ends last answers; a quota that ends (in 3 s) before a refusing rate drains (6 s)
/// answers with the rate's wait, so that a retry after it is not refused again.
fn refusing_buckets_give_the_longest_wait() -> [(Vec<Bucket>, StoreAnswer); 2] {
    let [hour, day, rate] = refusing_buckets(20);
    let end_of_day = at(datetime!(2025-03-13 0:00 UTC)) * 1_000_000;
    [
        (
            vec![hour.clone(), day],
            StoreAnswer::Refused {
                bucket: 1,
                wait_ms: u64::try_from((end_of_day - NEAR_THE_HOUR) / 1_000).unwrap(),
            },
        ),
        (
            vec![rate, hour],
            StoreAnswer::Refused {
                bucket: 1,
                wait_ms: 6_000,
            },
        ),
    ]
}

#[test]
fn the_local_store_gives_the_longest_wait_of_every_refusing_bucket() {
    let store = LocalStore::default();
    assert!(matches!(
        store.admit(&refusing_buckets(90), NEAR_THE_HOUR),
        StoreAnswer::Admitted(_)
    ));
    for (buckets, refused) in refusing_buckets_give_the_longest_wait() {
        assert_eq!(store.admit(&buckets, NEAR_THE_HOUR), refused);
    }
}

#[test]
fn the_local_store_reconciles() {
    let store = LocalStore::default();
    let start = at(datetime!(2025-03-12 0:00 UTC));
    let buckets = [
        tpm_bucket("t", 1_000, 500),
        quota_bucket("q", 1_000, QuotaPeriod::Daily, 500),
    ];
    store.admit(&buckets, T0);
    let adjust = |delta: i64, window_start: i64, now: i64| {
        store.adjust(
            &[
                Adjustment {
                    key: "t".to_owned(),
                    kind: buckets[0].kind,
                    delta,
                    window_start: 0,
                },
                Adjustment {
                    key: "q".to_owned(),
                    kind: buckets[1].kind,
                    delta,
                    window_start,
                },
            ],
            now,
        );
    };
    // The call used 100 of the 500 reserved: 400 come back.
    adjust(-400, start, T0);
    assert_eq!(
        store.admit(&[tpm_bucket("t", 1_000, 0)], T0),
        StoreAnswer::Admitted(vec![(900, 0)])
    );
    // Another used 300 more than reserved: the excess is charged.
    adjust(300, start, T0);
    assert_eq!(
        store.admit(
            &[
                tpm_bucket("t", 1_000, 0),
                quota_bucket("q", 1_000, QuotaPeriod::Daily, 0)
            ],
            T0
        ),
        StoreAnswer::Admitted(vec![(600, 0), (600, start)])
    );
    // A refund never goes below zero, and a correction for yesterday's window is dropped.
    adjust(-10_000, start - 86_400, T0);
    assert_eq!(
        store.admit(
            &[
                tpm_bucket("t", 1_000, 0),
                quota_bucket("q", 1_000, QuotaPeriod::Daily, 0)
            ],
            T0
        ),
        StoreAnswer::Admitted(vec![(1_000, 0), (600, start)])
    );
    // A call admitted yesterday that used 200 more than it reserved: the work was done, so the
    // excess counts in the window of now.
    adjust(200, start - 86_400, T0);
    assert_eq!(
        store.admit(
            &[
                tpm_bucket("t", 1_000, 0),
                quota_bucket("q", 1_000, QuotaPeriod::Daily, 0)
            ],
            T0
        ),
        StoreAnswer::Admitted(vec![(800, 0), (400, start)])
    );
}

/// Work already done is charged whatever the counters hold, and a quota in its window of the
/// time of the charge: a new one if it has begun since the call was admitted.
#[test]
fn the_local_store_charges_done_work_in_the_window_of_now() {
    let store = LocalStore::default();
    let before = at(datetime!(2025-03-12 10:59:59 UTC)) * 1_000_000;
    let after = at(datetime!(2025-03-12 11:00:01 UTC)) * 1_000_000;
    let eleven = at(datetime!(2025-03-12 11:00 UTC));
    // The session's handshake, admitted at 10:59:59, reserved nothing.
    store.admit(&[quota_bucket("q", 100, QuotaPeriod::Hourly, 0)], before);
    // 150 tokens of a response that began by itself end at 11:00:01: charged past the quota.
    store.charge(
        &[
            quota_bucket("q", 100, QuotaPeriod::Hourly, 150),
            tpm_bucket("t", 100, 150),
        ],
        after,
    );
    assert_eq!(
        store.admit(&[quota_bucket("q", 100, QuotaPeriod::Hourly, 0)], after),
        StoreAnswer::Refused {
            bucket: 0,
            wait_ms: 3_599_000
        }
    );
    assert!(matches!(
        store.admit(&[tpm_bucket("t", 100, 0)], after),
        StoreAnswer::Refused { bucket: 0, .. }
    ));
    // The next hour starts empty.
    assert_eq!(
        store.admit(
            &[quota_bucket("q", 100, QuotaPeriod::Hourly, 0)],
            after + 3_600_000_000
        ),
        StoreAnswer::Admitted(vec![(100, eleven + 3_600)])
    );
}

#[test]
fn the_local_store_forgets_drained_counters() {
    let store = LocalStore::default();
    for i in 0..5_000 {
        store.admit(&[tpm_bucket(&format!("k{i}"), 60, 1)], T0);
    }
    // A minute later every bucket has drained; the next sweep removes them.
    for i in 0..5_000 {
        store.admit(&[tpm_bucket("live", 1_000_000, 1)], T0 + 61_000_000 + i);
    }
    assert!(store.len() < 100, "{} counters left", store.len());
}

#[tokio::test]
async fn rules_apply_by_subject_and_deployment() {
    let limiter = limiter();
    let rules = vec![
        rule(
            json!({"id": "each", "subject": {"kind": "each_subscription"}, "requests_per_minute": 2}),
        ),
        rule(
            json!({"id": "group", "subject": {"kind": "group", "id": "g1"}, "requests_per_minute": 3,
                    "deployments": ["gpt-4o*"]}),
        ),
        rule(
            json!({"id": "per-deployment", "subject": {"kind": "user", "id": "u1"},
                    "requests_per_minute": 1, "each_deployment": true}),
        ),
    ];
    let groups = vec!["g1".to_owned()];
    let alice = LimitSubject {
        subscription: Some("s1"),
        user: Some("u1"),
        groups: &groups,
    };
    let bob = LimitSubject {
        subscription: Some("s2"),
        user: Some("u2"),
        groups: &groups,
    };
    let admitted = limiter
        .admit(&rules, &alice, Some("gpt-4o"), None, Estimate::default())
        .await
        .unwrap();
    // Three rules applied; the tightest has nothing left.
    assert_eq!(admitted.remaining_requests, Some(0));
    assert!(admitted.reservation.is_none(), "no token limit applies");
    // `per-deployment` (one a minute) refuses, for exactly a minute.
    let refused = limiter
        .admit(&rules, &alice, Some("gpt-4o"), None, Estimate::default())
        .await
        .unwrap_err();
    assert_eq!(refused.limit_id(), "per-deployment", "{refused}");
    assert!(
        matches!(refused, LimitRefusal::Rate { retry_after, .. } if retry_after == Duration::from_secs(60))
    );
    // The per-deployment counter of u1 is separate for another deployment.
    limiter
        .admit(
            &rules,
            &alice,
            Some("gpt-4o-mini"),
            None,
            Estimate::default(),
        )
        .await
        .unwrap();
    let refused = limiter
        .admit(&rules, &alice, Some("o3"), None, Estimate::default())
        .await
        .unwrap_err();
    assert_eq!(refused.limit_id(), "each", "{refused}");
    // Bob has his own subscription counter but shares the group's: 3 - 2 = 1 left.
    let admitted = limiter
        .admit(&rules, &bob, Some("gpt-4o"), None, Estimate::default())
        .await
        .unwrap();
    assert_eq!(admitted.remaining_requests, Some(0));
    let refused = limiter
        .admit(&rules, &bob, Some("gpt-4o"), None, Estimate::default())
        .await
        .unwrap_err();
    assert_eq!(refused.limit_id(), "group");
    assert!(matches!(refused, LimitRefusal::Rate { tokens: false, .. }));
    // The group's rule does not cover other deployments.
    limiter
        .admit(&rules, &bob, Some("o3"), None, Estimate::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn an_estimate_larger_than_a_limit_is_refused_outright() {
    let limiter = limiter();
    let rules = vec![rule(
        json!({"id": "small", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 1000}),
    )];
    let refused = limiter
        .admit(&rules, &team_a(), Some("gpt-4o"), None, tokens(100, 1024))
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        LimitRefusal::TooLarge {
            capacity: 1000,
            estimate: 1124,
            ..
        }
    ));
    let message = refused.to_string();
    assert!(
        message.contains("1124 tokens") && message.contains("'small'"),
        "{message}"
    );
    assert_eq!(refused.retry_after(), None);
}

#[tokio::test]
async fn admissions_report_headers_and_reconcile() {
    let limiter = limiter();
    let rules = vec![rule(json!({
        "id": "team", "subject": {"kind": "subscription", "id": "team-a"},
        "requests_per_minute": 100, "tokens_per_minute": 1000,
        "token_quota": {"tokens": 5000, "period": "monthly"}
    }))];
    let mut admission = limiter
        .admit(&rules, &team_a(), Some("gpt-4o"), None, tokens(100, 500))
        .await
        .unwrap();
    let mut headers = HeaderMap::new();
    admission.write_headers(&mut headers);
    let header = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
    assert_eq!(header(REMAINING_REQUESTS_HEADER), "99");
    assert_eq!(header(REMAINING_TOKENS_HEADER), "400");
    assert_eq!(header(REMAINING_QUOTA_TOKENS_HEADER), "4400");
    assert_eq!(header(CONSUMED_TOKENS_HEADER), "600");
    let reservation = admission.take_reservation().unwrap();
    assert_eq!(reservation.estimate(), 600);
    // The call used 150: 450 come back (a little more refilled meanwhile, at most).
    limiter.reconcile(reservation, Some(150));
    let after = limiter
        .admit(&rules, &team_a(), Some("gpt-4o"), None, tokens(0, 0))
        .await
        .unwrap();
    let remaining = after.remaining_tokens.unwrap();
    assert!((850..=1000).contains(&remaining), "{remaining}");
    assert_eq!(after.remaining_quota_tokens, Some(4850));
}

/// A reservation settled a minute or more after it was charged (work that went on after its
/// call, `crate::deferred_work`) gives its refund back to quotas only: a tokens-per-minute
/// bucket has drained it already, and a refund there would be room the caller could bank.
#[tokio::test]
async fn a_late_refund_reaches_quotas_only() {
    let limiter = limiter();
    let rules = vec![rule(json!({
        "id": "team", "subject": {"kind": "subscription", "id": "team-a"},
        "tokens_per_minute": 1000, "token_quota": {"tokens": 5000, "period": "monthly"}
    }))];
    // Reserves `estimate`, settles it two minutes after its charge at `used`, and answers what
    // is left then: of the tokens per minute, and of the quota.
    let settled_late = |estimate: Estimate, used: u64| {
        let (limiter, rules) = (&limiter, &rules);
        async move {
            let mut admission = limiter
                .admit(rules, &team_a(), Some("gpt-4o"), None, estimate)
                .await
                .unwrap();
            let mut reservation = admission.take_reservation().unwrap();
            reservation.charged_at_us -= 120_000_000;
            limiter.reconcile(reservation, Some(used));
            let after = limiter
                .admit(rules, &team_a(), Some("gpt-4o"), None, tokens(0, 0))
                .await
                .unwrap();
            (
                after.remaining_tokens.unwrap(),
                after.remaining_quota_tokens,
            )
        }
    };
    let (per_minute, quota) = settled_late(tokens(100, 500), 150).await;
    assert!((400..=420).contains(&per_minute), "{per_minute}");
    assert_eq!(quota, Some(4850));

    // An excess is charged to both, however late.
    let (per_minute, quota) = settled_late(tokens(0, 100), 300).await;
    assert!((100..=120).contains(&per_minute), "{per_minute}");
    assert_eq!(quota, Some(4550));
}

#[test]
fn usage_settles_reservations() {
    let (parts, ()) = http::Request::new(()).into_parts();
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let caller = crate::caller::Caller {
        client: local,
        peer: local,
    };
    let mut record =
        crate::record::CallRecord::new("g", "c", None, &parts, caller, std::time::Instant::now())
            .finish(503, 0);
    // No backend answered: nothing was used.
    assert_eq!(tokens_used(&record), Some(0));
    record
        .attempts
        .push(gatehouse_schema::audit::BackendAttempt {
            backend_id: "m".to_owned(),
            status: Some(200),
            elapsed_ms: 1,
            error: None,
        });
    // Answered, usage unknown: the estimate stays charged.
    assert_eq!(tokens_used(&record), None);
    record.usage = Some(TokenUsage {
        prompt_tokens: 10,
        completion_tokens: 5,
        total_tokens: 15,
        cached_tokens: 0,
        reasoning_tokens: 0,
        is_estimate: false,
    });
    assert_eq!(tokens_used(&record), Some(15));
}

#[test]
fn refusals_read_like_azure_and_api_management() {
    let rate = LimitRefusal::Rate {
        limit: "team-tpm".to_owned(),
        deployment: Some("gpt-4o".to_owned()),
        tokens: true,
        per_minute: 1000,
        retry_after: Duration::from_millis(2_300),
    };
    assert_eq!(
        rate.to_string(),
        "Requests to deployment 'gpt-4o' have exceeded the token rate limit of 1000 tokens per minute set by limit 'team-tpm'. Please retry after 3 seconds."
    );
    let quota = LimitRefusal::Quota {
        limit: "monthly".to_owned(),
        deployment: None,
        tokens: 50_000,
        period: QuotaPeriod::Monthly,
        retry_after: Duration::from_secs(3 * 3600 + 4 * 60 + 1),
    };
    let message = quota.to_string();
    assert!(
        message.starts_with("Token quota is exceeded. Limit 'monthly' allows 50000 tokens per month to this gateway;"),
        "{message}"
    );
    assert!(
        message.ends_with("Try again in 3 hours and 4 minutes."),
        "{message}"
    );
    assert_eq!(
        spoken_duration(Duration::from_secs(21 * 60 + 33)),
        "21 minutes and 33 seconds"
    );
    assert_eq!(spoken_duration(Duration::from_millis(200)), "1 second");
}

// ---- The Redis store, against the Redis at 127.0.0.1:6379 ----

const REDIS_URL: &str = "redis://127.0.0.1:6379";

/// A store and a key prefix of its own; `cleanup` deletes every key under it.
struct RedisFixture {
    store: RedisStore,
    prefix: String,
}

impl RedisFixture {
    fn new(test: &str) -> RedisFixture {
        RedisFixture {
            store: RedisStore::new(&Secret::new(REDIS_URL.to_owned()), Duration::from_secs(5))
                .unwrap(),
            prefix: format!("test:{test}:{}:", uuid::Uuid::new_v4()),
        }
    }

    fn key(&self, name: &str) -> String {
        format!("{}{KEY_NAMESPACE}{name}", self.prefix)
    }

    async fn connection(&self) -> ::redis::aio::MultiplexedConnection {
        ::redis::Client::open(REDIS_URL)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Milliseconds to live of every key under the prefix.
    async fn ttls(&self) -> Vec<(String, i64)> {
        let mut connection = self.connection().await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap();
        let mut ttls = Vec::new();
        for key in keys {
            let ttl: i64 = ::redis::cmd("PTTL")
                .arg(&key)
                .query_async(&mut connection)
                .await
                .unwrap();
            ttls.push((key, ttl));
        }
        ttls
    }

    async fn cleanup(self) {
        let mut connection = self.connection().await;
        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query_async(&mut connection)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: i64 = ::redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut connection)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn redis_charges_all_or_nothing_with_exact_waits() {
    let redis = RedisFixture::new("all-or-nothing");
    let (a, b) = (redis.key("a"), redis.key("b"));
    assert_eq!(
        redis
            .store
            .admit(
                &[tpm_bucket(&a, 100, 60), tpm_bucket(&b, 1_000, 60)],
                Some(T0)
            )
            .await
            .unwrap(),
        StoreAnswer::Admitted(vec![(40, 0), (940, 0)])
    );
    assert_eq!(
        redis
            .store
            .admit(
                &[tpm_bucket(&b, 1_000, 60), tpm_bucket(&a, 100, 60)],
                Some(T0)
            )
            .await
            .unwrap(),
        StoreAnswer::Refused {
            bucket: 1,
            wait_ms: 12_000
        }
    );
    assert_eq!(
        redis
            .store
            .admit(&[tpm_bucket(&b, 1_000, 60)], Some(T0))
            .await
            .unwrap(),
        StoreAnswer::Admitted(vec![(880, 0)]),
        "the refused call charged nothing"
    );
    assert_eq!(
        redis
            .store
            .admit(&[tpm_bucket(&a, 100, 60)], Some(T0 + 12_000_000))
            .await
            .unwrap(),
        StoreAnswer::Admitted(vec![(0, 0)])
    );
    // Every key expires.
    let ttls = redis.ttls().await;
    assert_eq!(ttls.len(), 2);
    assert!(ttls.iter().all(|(_, ttl)| *ttl > 0), "{ttls:?}");
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_gives_the_longest_wait_of_every_refusing_bucket() {
    let redis = RedisFixture::new("longest-wait");
    let keyed = |buckets: Vec<Bucket>| -> Vec<Bucket> {
        buckets
            .into_iter()
            .map(|b| Bucket {
                key: redis.key(&b.key),
                ..b
            })
            .collect()
    };
    assert!(matches!(
        redis
            .store
            .admit(&keyed(refusing_buckets(90).to_vec()), Some(NEAR_THE_HOUR))
            .await
            .unwrap(),
        StoreAnswer::Admitted(_)
    ));
    for (buckets, refused) in refusing_buckets_give_the_longest_wait() {
        assert_eq!(
            redis
                .store
                .admit(&keyed(buckets), Some(NEAR_THE_HOUR))
                .await
                .unwrap(),
            refused
        );
    }
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_quota_windows_match_the_calendar() {
    let redis = RedisFixture::new("windows");
    let moments = [
        datetime!(2025-03-12 14:35:07 UTC),
        datetime!(2025-01-01 0:00 UTC),
        datetime!(2024-12-31 23:59:59 UTC),
        datetime!(2024-02-29 12:00 UTC),
        datetime!(2025-03-10 0:00 UTC),
        datetime!(2025-03-09 23:59:59 UTC),
        datetime!(2100-02-28 23:00 UTC),
        datetime!(2000-03-01 0:00 UTC),
    ];
    let periods = [
        QuotaPeriod::Hourly,
        QuotaPeriod::Daily,
        QuotaPeriod::Weekly,
        QuotaPeriod::Monthly,
        QuotaPeriod::Yearly,
    ];
    for (m, moment) in moments.into_iter().enumerate() {
        let now = at(moment) * 1_000_000 + 250_000;
        for period in periods {
            let (start, end) = period.window(at(moment));
            let key = redis.key(&format!("{m}:{}", period.as_str()));
            // A charge lands in the window the script computes; a refusal waits for its end.
            assert_eq!(
                redis
                    .store
                    .admit(&[quota_bucket(&key, 10, period, 10)], Some(now))
                    .await
                    .unwrap(),
                StoreAnswer::Admitted(vec![(0, start)]),
                "{moment} {period:?}"
            );
            assert_eq!(
                redis
                    .store
                    .admit(&[quota_bucket(&key, 10, period, 1)], Some(now))
                    .await
                    .unwrap(),
                StoreAnswer::Refused {
                    bucket: 0,
                    wait_ms: u64::try_from((end * 1_000_000 - now) / 1_000).unwrap()
                },
                "{moment} {period:?}"
            );
            // The next window starts afresh.
            assert_eq!(
                redis
                    .store
                    .admit(&[quota_bucket(&key, 10, period, 1)], Some(end * 1_000_000))
                    .await
                    .unwrap(),
                StoreAnswer::Admitted(vec![(9, end)]),
                "{moment} {period:?}"
            );
        }
    }
    redis.cleanup().await;
}

/// A call admitted in one quota window and settled in the next, with no other charge between
/// (nothing moved the counter to the new window): its excess counts in the window of now, not in
/// the one that ended, and a refund is dropped. The same in Redis as in the process.
#[tokio::test]
async fn an_excess_settled_after_the_window_ended_counts_in_the_window_of_now() {
    let redis = RedisFixture::new("rollover");
    let local = LocalStore::default();
    let q = redis.key("q");
    let before = at(datetime!(2025-03-12 23:59:50 UTC));
    let after = at(datetime!(2025-03-13 00:00:20 UTC));
    let (yesterday, today) = (
        at(datetime!(2025-03-12 0:00 UTC)),
        at(datetime!(2025-03-13 0:00 UTC)),
    );
    let admitted = [quota_bucket(&q, 1_000, QuotaPeriod::Daily, 300)];
    assert_eq!(
        redis
            .store
            .admit(&admitted, Some(before * 1_000_000))
            .await
            .unwrap(),
        StoreAnswer::Admitted(vec![(700, yesterday)])
    );
    assert_eq!(
        local.admit(&admitted, before * 1_000_000),
        StoreAnswer::Admitted(vec![(700, yesterday)])
    );
    let settle = |delta: i64| {
        [Adjustment {
            key: q.clone(),
            kind: admitted[0].kind,
            delta,
            window_start: yesterday,
        }]
    };
    for delta in [200, -50] {
        redis
            .store
            .adjust(&settle(delta), Some(after * 1_000_000))
            .await
            .unwrap();
        local.adjust(&settle(delta), after * 1_000_000);
    }
    let probe = [quota_bucket(&q, 1_000, QuotaPeriod::Daily, 0)];
    let now = (after + 10) * 1_000_000;
    assert_eq!(
        redis.store.admit(&probe, Some(now)).await.unwrap(),
        StoreAnswer::Admitted(vec![(800, today)])
    );
    assert_eq!(
        local.admit(&probe, now),
        StoreAnswer::Admitted(vec![(800, today)])
    );
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_reconciles_like_the_local_store() {
    let redis = RedisFixture::new("reconcile");
    let local = LocalStore::default();
    let start = at(datetime!(2025-03-12 0:00 UTC));
    let (t, q) = (redis.key("t"), redis.key("q"));
    let buckets = [
        tpm_bucket(&t, 1_000, 500),
        quota_bucket(&q, 1_000, QuotaPeriod::Daily, 500),
    ];
    let probe = [
        tpm_bucket(&t, 1_000, 0),
        quota_bucket(&q, 1_000, QuotaPeriod::Daily, 0),
    ];
    let adjustments = |delta: i64, window_start: i64| {
        [
            Adjustment {
                key: t.clone(),
                kind: buckets[0].kind,
                delta,
                window_start: 0,
            },
            Adjustment {
                key: q.clone(),
                kind: buckets[1].kind,
                delta,
                window_start,
            },
        ]
    };
    let both = async |now: i64| {
        let remote = redis.store.admit(&probe, Some(now)).await.unwrap();
        assert_eq!(remote, local.admit(&probe, now));
        remote
    };
    assert_eq!(
        redis.store.admit(&buckets, Some(T0)).await.unwrap(),
        local.admit(&buckets, T0)
    );
    for (delta, window, expected) in [
        (-400, start, vec![(900, 0), (900, start)]),
        (300, start, vec![(600, 0), (600, start)]),
        (-10_000, start - 86_400, vec![(1_000, 0), (600, start)]),
        (200, start - 86_400, vec![(800, 0), (400, start)]),
    ] {
        redis
            .store
            .adjust(&adjustments(delta, window), Some(T0))
            .await
            .unwrap();
        local.adjust(&adjustments(delta, window), T0);
        assert_eq!(both(T0).await, StoreAnswer::Admitted(expected));
    }
    // Six seconds later a 1,000-per-minute bucket has drained 100.
    assert_eq!(
        both(T0 + 6_000_000).await,
        StoreAnswer::Admitted(vec![(900, 0), (400, start)])
    );
    let ttls = redis.ttls().await;
    assert!(ttls.iter().all(|(_, ttl)| *ttl > 0), "{ttls:?}");
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_charges_done_work_like_the_local_store() {
    let redis = RedisFixture::new("charge");
    let local = LocalStore::default();
    let (t, q) = (redis.key("t"), redis.key("q"));
    let before = at(datetime!(2025-03-12 10:59:59 UTC)) * 1_000_000;
    let after = at(datetime!(2025-03-12 11:00:01 UTC)) * 1_000_000;
    let probe = [
        tpm_bucket(&t, 100, 0),
        quota_bucket(&q, 100, QuotaPeriod::Hourly, 0),
    ];
    assert_eq!(
        redis.store.admit(&probe, Some(before)).await.unwrap(),
        local.admit(&probe, before)
    );
    let work = [
        tpm_bucket(&t, 100, 150),
        quota_bucket(&q, 100, QuotaPeriod::Hourly, 150),
    ];
    redis.store.charge(&work, Some(after)).await.unwrap();
    local.charge(&work, after);
    let remote = redis.store.admit(&probe, Some(after)).await.unwrap();
    assert_eq!(remote, local.admit(&probe, after));
    assert_eq!(
        remote,
        StoreAnswer::Refused {
            bucket: 1,
            wait_ms: 3_599_000
        }
    );
    let ttls = redis.ttls().await;
    assert!(ttls.iter().all(|(_, ttl)| *ttl > 0), "{ttls:?}");
    redis.cleanup().await;
}

#[tokio::test]
async fn redis_uses_its_own_clock() {
    let redis = RedisFixture::new("clock");
    let q = redis.key("q");
    let answer = redis
        .store
        .admit(&[quota_bucket(&q, 10, QuotaPeriod::Hourly, 1)], None)
        .await
        .unwrap();
    let StoreAnswer::Admitted(levels) = answer else {
        panic!("{answer:?}");
    };
    // The window the script chose is the current hour (by Redis's clock, which is this machine's).
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let (start, _) = QuotaPeriod::Hourly.window(now);
    assert!(
        levels[0].1 == start || levels[0].1 == start - 3_600,
        "{levels:?}"
    );
    assert_eq!(levels[0].0, 9);
    redis.cleanup().await;
}

#[tokio::test]
async fn an_unreachable_redis_is_a_store_error() {
    let store = RedisStore::new(
        &Secret::new("redis://127.0.0.1:1".to_owned()),
        Duration::from_secs(2),
    )
    .unwrap();
    let error = store
        .admit(&[tpm_bucket("x", 10, 1)], None)
        .await
        .unwrap_err();
    assert!(matches!(error, StoreError::Redis(_)), "{error}");
}

#[tokio::test]
async fn a_redis_url_with_a_password_is_never_printed() {
    let settings: LimitSettings = serde_yaml_ng::from_str(
        "redis_url: redis://:hunter2@cache.internal:6380/0\non_store_error: fail_closed\n",
    )
    .unwrap();
    let limiter = Limiter::new(&settings, Counter::default()).unwrap();
    let printed = format!("{settings:?} {limiter:?}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("redis"));
    let bad: LimitSettings = serde_yaml_ng::from_str("redis_url: 'not a url :hunter2'\n").unwrap();
    let error = Limiter::new(&bad, Counter::default())
        .unwrap_err()
        .to_string();
    assert!(!error.contains("hunter2"), "{error}");
}

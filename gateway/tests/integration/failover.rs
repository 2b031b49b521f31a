//! The failover table: what a 429, a 5xx, a refused connection, a silent member and a broken or
//! stalled stream do.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use gatehouse_simulator::{Fault, RetryHint, RunningSimulator, SimulatorConfig};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;

use crate::harness::*;

/// A gateway with one pool serving `gpt-4o` over `members`.
async fn pool_gateway(members: Value) -> TestGateway {
    TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": members}]),
    ))
    .await
}

/// Two members in one priority group would split traffic at random; a lower priority for the
/// second makes "first, then the other" deterministic.
async fn two_member_gateway(first: &str, second: &str) -> TestGateway {
    pool_gateway(json!([
        member("first", first, 1),
        member("second", second, 2)
    ]))
    .await
}

/// The whole number a response header holds.
fn header_number(response: &reqwest::Response, name: &str) -> u64 {
    response.headers()[name].to_str().unwrap().parse().unwrap()
}

/// A pool of two: `first` breaks its streams after `chunks` chunks sent `delay` apart, `second`
/// answers whole.
async fn first_breaks_its_streams(
    delay: Duration,
    chunks: usize,
) -> (RunningSimulator, RunningSimulator, TestGateway) {
    let first = simulator_with(SimulatorConfig {
        id: "first".into(),
        chunk_delay: delay,
        ..SimulatorConfig::default()
    })
    .await;
    let second = simulator("second").await;
    first.set_fault(Fault::BreakStreamAfter { chunks });
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    (first, second, gw)
}

/// Sends a streamed chat call and checks that its answer comes back whole (within 10 s, so that
/// a stall fails the test instead of hanging it).
async fn a_whole_stream(gw: &TestGateway) {
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("the answer comes without a stall")
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
}

#[tokio::test]
async fn a_throttled_member_is_set_aside_for_the_time_each_header_asks() {
    let in_one_minute = SystemTime::now() + Duration::from_secs(60);
    let cases: Vec<(RetryHint, Duration)> = vec![
        (RetryHint::RetryAfterMs(30_000), Duration::from_secs(30)),
        (RetryHint::RetryAfterSeconds(20), Duration::from_secs(20)),
        (
            RetryHint::RetryAfterHttpDate(in_one_minute),
            Duration::from_secs(60),
        ),
        (
            RetryHint::RateLimitResetRequests("45s".into()),
            Duration::from_secs(45),
        ),
        (
            RetryHint::RateLimitResetTokens("1m30s".into()),
            Duration::from_secs(90),
        ),
        (RetryHint::None, Duration::from_secs(10)),
    ];
    for (hint, expected) in cases {
        let first = simulator("first").await;
        let second = simulator("second").await;
        first.set_fault(Fault::Throttle {
            hint: hint.clone(),
            times: None,
        });
        let gw = two_member_gateway(&first.url(), &second.url()).await;

        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.status(),
            200,
            "{hint:?}: the second member answers at once"
        );
        assert_eq!((first.hits(), second.hits()), (1, 1), "{hint:?}");

        // While set aside, the first member gets nothing.
        for _ in 0..3 {
            let response = gw
                .post(&chat_path("gpt-4o"))
                .json(&chat(None, false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
        assert_eq!((first.hits(), second.hits()), (1, 4), "{hint:?}");

        // The set-aside time is the one the header asked for.
        let pool = &gw.gateway.runtime().pools[0];
        let (_, remaining) = pool.members[0]
            .health
            .set_aside_state(std::time::Instant::now())
            .expect("set aside");
        assert!(
            remaining <= expected && remaining + Duration::from_secs(3) >= expected,
            "{hint:?}: {remaining:?} vs {expected:?}"
        );

        let records = gw.records(4).await;
        let attempts: Vec<_> = records[0]
            .attempts
            .iter()
            .map(|a| (a.backend_id.as_str(), a.status))
            .collect();
        assert_eq!(
            attempts,
            [("first", Some(429)), ("second", Some(200))],
            "{hint:?}"
        );
        assert_eq!(records[0].backend_id.as_deref(), Some("second"));
    }
}

#[tokio::test]
async fn a_member_comes_back_when_its_wait_is_over() {
    let first = simulator("first").await;
    let second = simulator("second").await;
    first.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterMs(300),
        times: Some(1),
    });
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    gw.post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!((first.hits(), second.hits()), (1, 1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        (first.hits(), second.hits()),
        (2, 1),
        "priority 1 takes traffic again"
    );
}

#[tokio::test]
async fn server_errors_and_refused_connections_fail_over() {
    let first = simulator("first").await;
    let second = simulator("second").await;
    first.set_fault(Fault::ServerError {
        status: 500,
        times: None,
    });
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!((first.hits(), second.hits()), (1, 1));

    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let third = simulator("third").await;
    let gw = two_member_gateway(&closed, &third.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(third.hits(), 1);
    let records = gw.records(1).await;
    assert_eq!(records[0].attempts[0].status, None);
    assert_eq!(
        records[0].attempts[0].error.as_deref(),
        Some("connect_failed")
    );
}

#[tokio::test]
async fn a_429_that_asks_for_no_wait_is_still_a_429() {
    // `retry-after-ms: 0` leaves the members available, but the call met only throttles: the
    // client gets 429 (as from Azure), not 503 "no backend".
    let first = simulator("zero-a").await;
    let second = simulator("zero-b").await;
    for sim in [&first, &second] {
        sim.set_fault(Fault::Throttle {
            hint: RetryHint::RetryAfterMs(0),
            times: None,
        });
    }
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    azure_error(response, 429).await;
    assert_eq!((first.hits(), second.hits()), (1, 1));

    // One member asks for no wait, the other for a minute: whichever is tried first, the client
    // is told the shortest (the first member is free at once), not the minute.
    second.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(60),
        times: None,
    });
    for _ in 0..6 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 429);
        let retry_after_ms: u64 = response.headers()["retry-after-ms"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(retry_after_ms <= 1_000, "{retry_after_ms} ms");
    }
}

#[tokio::test]
async fn all_throttled_is_429_with_the_shortest_wait_and_all_down_is_503() {
    let first = simulator("first").await;
    let second = simulator("second").await;
    first.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(40),
        times: None,
    });
    second.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterMs(7_500),
        times: None,
    });
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after = header_number(&response, "retry-after");
    let retry_after_ms = header_number(&response, "retry-after-ms");
    assert!((7..=8).contains(&retry_after), "retry-after {retry_after}");
    assert!(
        (6_000..=7_500).contains(&retry_after_ms),
        "retry-after-ms {retry_after_ms}"
    );
    azure_error(response, 429).await;
    // The next call does not even try: both are set aside.
    let again = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 429);
    assert_eq!((first.hits(), second.hits()), (1, 1));

    let down_a = simulator("down-a").await;
    let down_b = simulator("down-b").await;
    down_a.set_fault(Fault::ServerError {
        status: 503,
        times: None,
    });
    down_b.set_fault(Fault::ServerError {
        status: 500,
        times: None,
    });
    let gw = two_member_gateway(&down_a.url(), &down_b.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(response, 503).await;
    assert_eq!((down_a.hits(), down_b.hits()), (1, 1));
}

/// Throttled and failing members together: 429, with the wait until the first member of either
/// kind is back (the failing one's 10 s, not the throttled one's 60 s).
#[tokio::test]
async fn a_pool_of_throttled_and_failing_members_waits_for_the_first_back() {
    let throttled = simulator("throttled").await;
    let failing = simulator("failing").await;
    throttled.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(60),
        times: None,
    });
    failing.set_fault(Fault::ServerError {
        status: 503,
        times: None,
    });
    let gw = two_member_gateway(&throttled.url(), &failing.url()).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    let retry_after = header_number(&response, "retry-after");
    assert!((9..=10).contains(&retry_after), "retry-after {retry_after}");
    let message = azure_error(response, 429).await;
    assert!(
        message.contains(&format!("Try again in {retry_after} seconds")),
        "the message says the header's wait: {message}"
    );
}

/// A load balancer's `503 Retry-After: 0` in front of a dead member is no hint: the member is
/// set aside for the default wait instead of taking the first attempt of every call.
#[tokio::test]
async fn a_failing_member_that_asks_for_no_wait_is_still_set_aside() {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let dead = serve_stub(axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "0")],
                "no healthy upstream",
            )
        }
    }))
    .await;
    let healthy = simulator("healthy").await;
    let gw = two_member_gateway(&dead, &healthy.url()).await;
    for _ in 0..3 {
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(
        (hits.load(Ordering::SeqCst), healthy.hits()),
        (1, 3),
        "the dead member is tried once, then left alone"
    );
}

/// A push that moves a member to another endpoint (the operator fixed a wrong one) does not
/// keep the old endpoint's set-aside; a push that leaves it where it was does.
#[tokio::test]
async fn a_member_pushed_with_another_endpoint_is_not_kept_aside() {
    let wrong = serve_stub(axum::Router::new().fallback(|| async {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [("retry-after", "3600")],
            "maintenance",
        )
    }))
    .await;
    let pools = |url: &str| json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("east", url, 1)]}]);
    let gw = TestGateway::start(snapshot(1, pools(&wrong))).await;
    let call = || async {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(call().await, 503);
    // The same member pushed again, unchanged: still set aside.
    assert_eq!(
        gw.push_config(&snapshot(2, pools(&wrong))).await.status(),
        200
    );
    assert_eq!(call().await, 503);
    let fixed = simulator("fixed").await;
    assert_eq!(
        gw.push_config(&snapshot(3, pools(&fixed.url())))
            .await
            .status(),
        200
    );
    assert_eq!(call().await, 200);
    assert_eq!(fixed.hits(), 1);
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_first_byte_is_not_retried() {
    let (first, second, gw) = first_breaks_its_streams(Duration::from_millis(5), 2).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "headers were already sent");
    let body = response.bytes().await;
    assert!(
        body.is_err(),
        "the client must see a broken stream, not a short complete one"
    );
    assert_eq!(
        (first.hits(), second.hits()),
        (1, 0),
        "no retry once bytes reached the client"
    );
    let records = gw.records(1).await;
    assert_eq!(
        records[0].last_error_reason.as_deref(),
        Some("backend_stream_failed")
    );

    // A member whose answer broke is set aside like a failing one: the next call, a stream
    // again, goes to the second member, whole.
    a_whole_stream(&gw).await;
    assert_eq!((first.hits(), second.hits()), (1, 1));
    assert!(
        gw.metrics()
            .await
            .contains(r#"gatehouse_backend_available{pool="p",backend="first"} 0"#),
        "the broken member is shown set aside"
    );
}

#[tokio::test]
async fn a_stream_that_breaks_after_its_client_left_sets_its_member_aside_too() {
    let (first, second, gw) = first_breaks_its_streams(Duration::from_millis(50), 4).await;
    let mut response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.chunk().await.unwrap().is_some(), "a first chunk");
    // The client hangs up; the gateway reads on for the record, and the member breaks.
    drop(response);
    let records = gw.records(1).await;
    assert!(records[0].client_aborted);
    assert_eq!(
        records[0].last_error_reason.as_deref(),
        Some("backend_stream_failed")
    );
    let next = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 200);
    assert_eq!(
        (first.hits(), second.hits()),
        (1, 1),
        "the next call avoids it"
    );
}

#[tokio::test]
async fn multipart_bodies_are_replayed_byte_for_byte_on_the_next_member() {
    let first = simulator("first").await;
    let second = simulator("second").await;
    first.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(5),
        times: None,
    });
    let gw = two_member_gateway(&first.url(), &second.url()).await;
    let audio: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(audio)
                .file_name("talk.wav")
                .mime_str("audio/wav")
                .unwrap(),
        )
        .text("language", "en");
    let response = gw
        .post("/openai/deployments/gpt-4o/audio/transcriptions?api-version=2024-10-21")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let on_first = &first.requests()[0];
    let on_second = &second.requests()[0];
    assert_eq!(on_first.body, on_second.body);
    assert_eq!(
        on_first.header("content-type"),
        on_second.header("content-type")
    );
}

#[tokio::test]
async fn weights_split_traffic_inside_a_priority_group() {
    let heavy = simulator("heavy").await;
    let light = simulator("light").await;
    let mut heavy_member = member("heavy", &heavy.url(), 1);
    heavy_member["weight"] = json!(3);
    let gw = pool_gateway(json!([heavy_member, member("light", &light.url(), 1)])).await;
    // Members are drawn at random: with 1,000 calls the bounds below are ≥ 5 standard deviations
    // from the 750 expected (200 calls missed them about once in 60 runs), and equal weights
    // (1:1) are far outside them.
    for _ in 0..1000 {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
    }
    let (h, l) = (heavy.hits() as f64, light.hits() as f64);
    assert_eq!(h + l, 1000.0);
    assert!(h / l > 2.0 && h / l < 4.5, "3:1 weights gave {h}:{l}");
}

/// A backend that accepts connections and reads what it is sent but never answers; counts the
/// connections that sent it something.
async fn silent_backend() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&requests);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = Arc::clone(&counted);
            tokio::spawn(async move {
                let mut buffer = [0_u8; 4096];
                let mut seen = false;
                while let Ok(n) = socket.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    if !seen {
                        seen = true;
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (url, requests)
}

/// A pool member that waits at most `response_timeout_ms` for its answer.
fn impatient_member(id: &str, url: &str, priority: u32, response_timeout_ms: u64) -> Value {
    let mut member = member(id, url, priority);
    member["response_timeout_ms"] = json!(response_timeout_ms);
    member
}

/// Uploads a small file through `gw`; its status and body.
async fn upload_file(gw: &TestGateway) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(&b"{\"custom_id\": \"1\"}\n"[..])
                .file_name("input.jsonl")
                .mime_str("application/jsonl")
                .unwrap(),
        );
    let response = gw
        .raw(
            reqwest::Method::POST,
            "/openai/files?api-version=2024-10-21",
        )
        .header("api-key", KEY)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// A call that creates an object (here a file) is not sent to a second member after the first
/// timed out: the first may have created it, and a second would create it twice. It goes on when
/// the first cannot have received it (the connection was refused).
#[tokio::test]
async fn a_call_creating_an_object_is_not_sent_again_after_a_member_timed_out() {
    let (silent, silent_requests) = silent_backend().await;
    let second = simulator("second").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [
            impatient_member("silent", &silent, 1, 300),
            impatient_member("second", &second.url(), 2, 300),
        ]}]),
    ))
    .await;
    let (status, body) = upload_file(&gw).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "504");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("did not answer in time")
            && message.contains("check whether the object exists before you retry"),
        "{message}"
    );
    assert_eq!(
        (silent_requests.load(Ordering::SeqCst), second.hits()),
        (1, 0),
        "the second member never saw the upload"
    );
    let records = gw.records(1).await;
    assert_eq!(records[0].response_code, 504);
    assert_eq!(records[0].attempts.len(), 1);
    assert_eq!(
        records[0].attempts[0].error.as_deref(),
        Some("response_timeout")
    );
    // A chat completion in the same situation goes on to the next member (the silent one is set
    // aside by now, so a fresh gateway shows it).
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let third = simulator("third").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [
            member("closed", &closed, 1),
            member("third", &third.url(), 2),
        ]}]),
    ))
    .await;
    let (status, body) = upload_file(&gw).await;
    assert_eq!(status, 200, "a refused connection fails over: {body}");
    assert_eq!(third.hits(), 1);
}

/// A 500, 502 or 504 to a call that creates an object may come after the object was made: the
/// member's answer goes to the client instead of the call to a second member (which could make
/// a second object). A 503 (the member did not take the call) goes on as for any call.
#[tokio::test]
async fn a_call_creating_an_object_is_not_sent_again_after_a_gateway_timeout() {
    for (status, goes_on) in [(504, false), (500, false), (503, true)] {
        let first = simulator("first").await;
        let second = simulator("second").await;
        first.set_fault(Fault::ServerError {
            status,
            times: None,
        });
        let gw = TestGateway::start(snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [
                member("first", &first.url(), 1),
                member("second", &second.url(), 2),
            ]}]),
        ))
        .await;
        let (answered, body) = upload_file(&gw).await;
        assert_eq!(
            (first.hits(), second.hits()),
            (1, u64::from(goes_on)),
            "{status}: {body}"
        );
        assert_eq!(answered, if goes_on { 200 } else { status }, "{body}");
        let records = gw.records(1).await;
        assert_eq!(records[0].attempts.len(), 1 + usize::from(goes_on));
        // A chat completion is retried after any of them.
        let chat_answer = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(chat_answer.status(), 200, "{status}");
    }
}

/// A member that accepts the TCP connection and never answers the TLS ClientHello has not
/// received the call: past its connect timeout (which covers the handshake) the attempt is a
/// connect failure, and even a call that creates an object goes on to the next member.
#[tokio::test]
async fn a_member_that_stalls_the_tls_handshake_fails_over_as_a_connect_failure() {
    let (silent, hellos) = silent_backend().await;
    let stalling = silent.replace("http://", "https://");
    let second = simulator("second").await;
    let mut first = member("stalling", &stalling, 1);
    first["connect_timeout_ms"] = json!(200);
    // Long enough to tell the two timeouts apart, short enough that a gateway that waits for
    // it fails the test instead of hanging it.
    first["response_timeout_ms"] = json!(10_000);
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [
            first,
            member("second", &second.url(), 2),
        ]}]),
    ))
    .await;
    let (status, body) = upload_file(&gw).await;
    assert_eq!(
        status, 200,
        "the upload goes on to the second member: {body}"
    );
    assert_eq!(
        (hellos.load(Ordering::SeqCst), second.hits()),
        (1, 1),
        "the stalling member got a ClientHello and nothing else"
    );
    let records = gw.records(1).await;
    let attempts = &records[0].attempts;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].backend_id, "stalling");
    assert_eq!(attempts[0].status, None);
    assert_eq!(attempts[0].error.as_deref(), Some("connect_failed"));
    assert_eq!(attempts[1].status, Some(200));
    assert!(
        gw.metrics()
            .await
            .contains(r#"backend="stalling",outcome="connect_failed""#),
        "the connect failure is counted"
    );
}

#[tokio::test]
async fn a_member_that_does_not_answer_in_time_is_set_aside_and_the_next_one_answers() {
    let (silent, silent_requests) = silent_backend().await;
    let second = simulator("second").await;
    let gw = pool_gateway(json!([
        impatient_member("silent", &silent, 1, 300),
        impatient_member("second", &second.url(), 2, 300),
    ]))
    .await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the second member answers");
    assert_eq!(
        (silent_requests.load(Ordering::SeqCst), second.hits()),
        (1, 1)
    );
    let records = gw.records(1).await;
    let attempts = &records[0].attempts;
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].backend_id, "silent");
    assert_eq!(attempts[0].status, None);
    assert_eq!(attempts[0].error.as_deref(), Some("response_timeout"));
    assert!(
        attempts[0].elapsed_ms >= 300,
        "waited the timeout: {attempts:?}"
    );
    assert_eq!(attempts[1].status, Some(200));
    assert!(
        gw.metrics()
            .await
            .contains(r#"backend="silent",outcome="response_timeout""#),
        "the timeout is counted"
    );

    // The silent member is set aside: the next call goes straight to the second.
    let again = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(
        (silent_requests.load(Ordering::SeqCst), second.hits()),
        (1, 2)
    );
}

#[tokio::test]
async fn a_pool_whose_only_member_does_not_answer_in_time_gets_503() {
    let (silent, silent_requests) = silent_backend().await;
    let gw = pool_gateway(json!([impatient_member("silent", &silent, 1, 200)])).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    azure_error(response, 503).await;
    assert_eq!(silent_requests.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stream_that_falls_silent_after_it_began_is_cut_after_the_idle_timeout() {
    let stalling = simulator("stalling").await;
    stalling.set_fault(Fault::StallStreamAfter { chunks: 2 });
    let mut patient = member("stalling", &stalling.url(), 1);
    patient["response_idle_timeout_ms"] = json!(300);
    let second = simulator("second").await;
    let gw = pool_gateway(json!([patient, member("second", &second.url(), 2)])).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "headers were already sent");
    // Bounded, so that a gateway that waits for ever fails the test instead of hanging it.
    let body = tokio::time::timeout(Duration::from_secs(10), response.bytes())
        .await
        .expect("the gateway cut the silent stream");
    assert!(
        body.is_err(),
        "the client must see a broken stream, not a short complete one"
    );
    assert_eq!(
        (stalling.hits(), second.hits()),
        (1, 0),
        "no retry once bytes reached the client"
    );
    let records = gw.records(1).await;
    assert_eq!(
        records[0].last_error_reason.as_deref(),
        Some("response_idle_timeout")
    );
    let message = records[0].last_error_message.as_deref().unwrap_or_default();
    assert!(message.contains("300 ms"), "{message}");
    // What the member sent before it fell silent is on record, reassembled.
    let captured: Value =
        serde_json::from_str(records[0].backend_response_body.as_deref().unwrap()).unwrap();
    assert_eq!(captured["object"], "chat.completion", "{captured}");
    assert!(
        gw.metrics()
            .await
            .contains(r#"gatehouse_backend_answers_cut_total{backend="stalling",reason="response_idle_timeout"} 1"#),
        "the cut is counted"
    );

    // A member that hung mid-answer is set aside: the next call goes to the second member at
    // once instead of waiting on the hung one.
    a_whole_stream(&gw).await;
    assert_eq!((stalling.hits(), second.hits()), (1, 1));
}

#[tokio::test]
async fn a_stream_that_has_begun_is_not_cut_by_the_response_timeout() {
    // Five chunks 100 ms apart: the stream lasts longer than the 200 ms response timeout, and
    // longer than the 400 ms idle timeout, whose count starts again with every chunk.
    let slow = simulator_with(SimulatorConfig {
        id: "slow".into(),
        chunk_delay: Duration::from_millis(100),
        stream_chunks: 5,
        ..SimulatorConfig::default()
    })
    .await;
    let mut slow_member = impatient_member("slow", &slow.url(), 1, 200);
    slow_member["response_idle_timeout_ms"] = json!(400);
    let gw = pool_gateway(json!([slow_member])).await;
    a_whole_stream(&gw).await;
    assert_eq!(slow.hits(), 1);
}

/// `gatehouse_overhead_seconds` is the gateway's own time before the answer's head goes out: a
/// call that waited 300 ms for the rest of its request body and 300 ms for a member that never
/// answered, then streamed its answer from the next member a chunk every 100 ms, counts none of
/// those waits there, while its duration counts all of them.
#[tokio::test]
async fn the_overhead_metric_leaves_out_the_waits_for_the_client_and_the_backends() {
    use futures::StreamExt as _;

    let (silent, silent_requests) = silent_backend().await;
    let streaming = simulator_with(SimulatorConfig {
        id: "streaming".to_owned(),
        chunk_delay: Duration::from_millis(100),
        ..SimulatorConfig::default()
    })
    .await;
    let gw = pool_gateway(json!([
        impatient_member("silent", &silent, 1, 300),
        member("streaming", &streaming.url(), 2),
    ]))
    .await;
    let request = serde_json::to_vec(&chat(None, true)).unwrap();
    let (head, tail) = request.split_at(10);
    let pieces = [
        (Duration::ZERO, bytes::Bytes::copy_from_slice(head)),
        (
            Duration::from_millis(300),
            bytes::Bytes::copy_from_slice(tail),
        ),
    ];
    let slow_body = futures::stream::iter(pieces).then(|(pause, piece)| async move {
        tokio::time::sleep(pause).await;
        Ok::<_, std::io::Error>(piece)
    });
    let response = gw
        .post(&chat_path("gpt-4o"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(slow_body))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("data: [DONE]"), "{text}");
    let records = gw.records(1).await;
    assert_eq!(records[0].attempts.len(), 2, "{:?}", records[0].attempts);
    assert_eq!(silent_requests.load(Ordering::SeqCst), 1);

    let metrics = gw.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no `{name}` in:\n{metrics}"))
    };
    assert_eq!(value("gatehouse_overhead_seconds_count"), 1.0);
    let duration =
        value(r#"gatehouse_request_duration_seconds_sum{operation="chatcompletions_create"}"#);
    let overhead = value("gatehouse_overhead_seconds_sum");
    assert!(duration >= 0.9, "the call took its waits: {duration} s");
    assert!(
        overhead < 0.3,
        "the overhead counts a wait: {overhead} s of {duration} s"
    );
}

/// A member that creates a file and then breaks off its answer, or answers with more than the
/// gateway reads whole to learn the file's id: the client is told the object may exist (502),
/// not that no backend was available (503, which SDKs retry, creating the object twice).
#[tokio::test]
async fn a_created_objects_answer_that_cannot_be_read_whole_says_the_object_may_exist() {
    for (answer, reason, message) in [
        (
            CreatedAnswer::Broken,
            "backend_stream_failed",
            "broke the connection",
        ),
        (
            CreatedAnswer::TooLarge,
            "answer_too_large",
            "larger than the gateway reads whole",
        ),
    ] {
        let (url, hits) = creating_backend(answer).await;
        let gw = TestGateway::start(snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true,
                    "members": [member("creating", &url, 1)]}]),
        ))
        .await;
        let (status, body) = upload_file(&gw).await;
        assert_eq!(status, 502, "{answer:?}: {body}");
        let text = body["error"]["message"].as_str().unwrap();
        assert!(
            text.contains(message) && text.contains("check whether"),
            "{answer:?}: {text}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 1, "sent once");
        let record = gw.records(1).await.remove(0);
        assert_eq!(record.response_code, 502);
        assert_eq!(record.last_error_reason.as_deref(), Some(reason));
    }
}

/// How [`creating_backend`] answers.
#[derive(Debug, Clone, Copy)]
enum CreatedAnswer {
    /// The head and the start of the file object, then the connection breaks.
    Broken,
    /// A file object of 9 MiB.
    TooLarge,
}

/// A backend that creates a file on every call and answers as `answer` says; counts its calls.
async fn creating_backend(answer: CreatedAnswer) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            use futures::StreamExt as _;
            counted.fetch_add(1, Ordering::SeqCst);
            let start = bytes::Bytes::from_static(br#"{"id":"file-created","object":"file","#);
            let rest: Result<bytes::Bytes, std::io::Error> = match answer {
                CreatedAnswer::Broken => Err(std::io::Error::other("the member broke off")),
                CreatedAnswer::TooLarge => Ok(bytes::Bytes::from(format!(
                    r#""filename":"{}"}}"#,
                    "x".repeat(9 * 1024 * 1024)
                ))),
            };
            // The rest a moment later, so that the head and the start have gone out.
            let chunks = futures::stream::iter([
                (Duration::ZERO, Ok(start)),
                (Duration::from_millis(100), rest),
            ])
            .then(|(pause, chunk)| async move {
                tokio::time::sleep(pause).await;
                chunk
            });
            axum::response::Response::builder()
                .header("content-type", "application/json")
                .body(axum::body::Body::from_stream(chunks))
                .unwrap()
        }
    });
    (serve_stub(app).await, hits)
}

/// A member that refuses the gateway: `status` with an Azure-shaped body naming `code`, for every
/// call; counts its hits.
async fn refusing_member(status: u16, code: &'static str) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                [("content-type", "application/json")],
                json!({"error": {"code": code, "message": format!("refused by {code}")}})
                    .to_string(),
            )
        }
    });
    (serve_stub(app).await, hits)
}

/// A member's 401 or 403 is about the gateway's credential, not the caller's key: the next member
/// answers, the refusing member is not set aside (it may refuse one operation only), and the
/// attempt is on record and in the metrics.
#[tokio::test]
async fn a_member_that_refuses_the_gateway_passes_the_call_on() {
    for (status, code) in [
        (401, "PermissionDenied"),
        (403, "AuthenticationTypeDisabled"),
    ] {
        let (refusing, refused_hits) = refusing_member(status, code).await;
        let second = simulator("second").await;
        let gw = two_member_gateway(&refusing, &second.url()).await;
        for call in 1..=2 {
            let response = gw
                .post(&chat_path("gpt-4o"))
                .json(&chat(None, false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{status}: the next member answers");
            // Not set aside: the first member is asked again by the next call.
            assert_eq!(refused_hits.load(Ordering::SeqCst), call, "{status}");
            assert_eq!(second.hits(), u64::try_from(call).unwrap(), "{status}");
        }
        let records = gw.records(2).await;
        assert_eq!(
            attempts_of(&records[0]),
            [
                ("first", Some(status), Some("refused_gateway")),
                ("second", Some(200), None)
            ],
            "{status}"
        );
        assert_eq!(records[0].response_code, 200);
        let metrics = gw.metrics().await;
        assert!(
            metrics.contains(
                r#"gatehouse_backend_attempts_total{backend="first",outcome="refused_gateway"} 2"#
            ),
            "{metrics}"
        );
    }
}

/// When every member refuses the gateway, the last refusal is the answer, as it came; a pool
/// with a throttled member answers its wait instead.
#[tokio::test]
async fn a_refusal_is_the_answer_only_when_no_member_is_left() {
    let (first, first_hits) = refusing_member(401, "401").await;
    let (second, second_hits) = refusing_member(403, "Forbidden").await;
    let gw = two_member_gateway(&first, &second).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403, "the last member's refusal");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "Forbidden", "{body}");
    assert_eq!(
        (
            first_hits.load(Ordering::SeqCst),
            second_hits.load(Ordering::SeqCst)
        ),
        (1, 1)
    );
    let records = gw.records(1).await;
    assert_eq!(records[0].response_code, 403);
    assert_eq!(records[0].backend_response_code, Some(403));
    assert_eq!(records[0].attempts.len(), 2);

    // The refusal, then a member that cannot be reached: the refusal is the answer, and the
    // record names the member that gave it.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let (refusing, _) = refusing_member(401, "401").await;
    let gw = two_member_gateway(&refusing, &closed).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let records = gw.records(1).await;
    assert_eq!(records[0].backend_id.as_deref(), Some("first"));
    assert!(
        records[0]
            .backend_url
            .as_deref()
            .is_some_and(|url| url.starts_with(&refusing)),
        "{:?}",
        records[0].backend_url
    );
    assert_eq!(records[0].attempts.len(), 2);

    // A member throttled for a minute, the other refusing: the client is told to wait.
    let throttled = simulator("throttled").await;
    throttled.set_fault(Fault::Throttle {
        hint: RetryHint::RetryAfterSeconds(60),
        times: None,
    });
    let (refusing, _) = refusing_member(401, "401").await;
    let gw = two_member_gateway(&throttled.url(), &refusing).await;
    let response = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(header_number(&response, "retry-after") > 50);
}

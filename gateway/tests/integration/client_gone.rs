//! Clients that leave before the answer's head: the call goes on without them and is recorded.
//! The backend has the prompt and bills the answer; an audit trail without the call would lie.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;

use crate::harness::*;

/// A backend that thinks for `think` before it answers a chat completion whole (with usage), as a
/// model does before a non-streamed answer; counts its calls. The answer is Azure's
/// `chat.completion` shape (`../shared/fixtures/azure/`).
async fn thinking_backend(think: Duration) -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&calls);
    let app = axum::Router::new().fallback(move || {
        let counted = Arc::clone(&counted);
        async move {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(think).await;
            axum::Json(json!({
                "id": "chatcmpl-late",
                "object": "chat.completion",
                "created": 1_733_000_000,
                "model": "gpt-4o-2024-08-06",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "An answer no one read."}}],
                "usage": {"prompt_tokens": 21, "completion_tokens": 6, "total_tokens": 27}
            }))
        }
    });
    (serve_stub(app).await, calls)
}

#[tokio::test]
async fn a_client_that_leaves_while_the_backend_thinks_still_has_its_call_recorded() {
    left_while_the_backend_thinks(http::Version::HTTP_11).await;
}

/// On HTTP/2 the client resets its stream; the connection may stay.
#[tokio::test]
async fn an_http2_client_that_resets_its_stream_while_the_backend_thinks_still_has_its_call_recorded()
 {
    left_while_the_backend_thinks(http::Version::HTTP_2).await;
}

async fn left_while_the_backend_thinks(version: http::Version) {
    let (backend, calls) = thinking_backend(Duration::from_millis(600)).await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("thinking", &backend, 1)]}]),
    ))
    .await;
    let gave_up = gw
        .post_over(version, &chat_path("gpt-4o"))
        .json(&chat(None, false))
        .timeout(Duration::from_millis(200))
        .send()
        .await;
    assert!(
        gave_up.as_ref().is_err_and(reqwest::Error::is_timeout),
        "the client gave up before the answer: {gave_up:?}"
    );
    let record = gw.records(1).await.remove(0);
    assert!(record.client_aborted, "{record:?}");
    assert_eq!(record.response_code, 200, "the backend's answer");
    assert_eq!(record.response_size, 0, "nothing reached the client");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let usage = record.usage.expect("the usage of the answer no one read");
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (21, 6));
    assert!(!usage.is_estimate);
    assert!(
        record
            .response_messages
            .as_deref()
            .is_some_and(|text| text.contains("An answer no one read.")),
        "{:?}",
        record.response_messages
    );
    assert!(record.total_time >= 600, "{}", record.total_time);
}

/// A call whose client leaves while it waits for room in the audit queue, before any backend
/// has it, is recorded with 499 and sent to no backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_before_its_call_reaches_a_backend_is_recorded_and_not_sent_on() {
    let sim = simulator("not-sent").await;
    let gated = Gated::shut();
    let gw = TestGateway::start_gated(&sim.url(), &gated, 1).await;
    let call = || {
        gw.post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
    };
    // The first record holds the writer at the gate, the second fills the queue.
    assert_eq!(call().await.unwrap().status(), 200);
    gated.wait_for_a_write().await;
    assert_eq!(call().await.unwrap().status(), 200);
    let gave_up = gw
        .post(&chat_path("gpt-4o"))
        .json(&chat(None, false))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err_and(|error| error.is_timeout()));
    assert!(
        gw.metrics()
            .await
            .contains("gatehouse_audit_room_waits_total 1")
    );

    gated.open.send_replace(true);
    let records = gw.records(3).await;
    let left = records
        .iter()
        .find(|record| record.client_aborted)
        .expect("the call whose client left is on record");
    assert_eq!(left.response_code, 499);
    assert_eq!(
        left.last_error_reason.as_deref(),
        Some("client_closed_request")
    );
    assert!(left.attempts.is_empty(), "{:?}", left.attempts);
    assert_eq!(sim.hits(), 2, "no backend had the third call");
}

/// A backend that streams one chat chunk (Azure's `chat.completion.chunk`,
/// `../shared/fixtures/azure/chat-stream-no-usage.sse`), then, after 300 ms, breaks the
/// connection (`breaks`) or falls silent for 30 s.
async fn stalling_stream_backend(breaks: bool) -> String {
    use futures::StreamExt as _;
    let app = axum::Router::new().fallback(move || async move {
        let first = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hel\"},\"finish_reason\":null}]}\n\n";
        let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(first) }).chain(
            futures::stream::once(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                if breaks {
                    Err(std::io::Error::other("the backend broke off"))
                } else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    Ok("data: [DONE]\n\n")
                }
            }),
        );
        (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(stream),
        )
    });
    serve_stub(app).await
}

/// After the client left a stream, the rest is read for the record as the member would be read
/// with the client there: one that breaks off or stays silent past its idle limit is set aside
/// and counted in `gatehouse_backend_answers_cut_total`, as it is while a client reads.
#[tokio::test]
async fn a_member_that_breaks_or_stalls_after_the_client_left_is_set_aside_and_counted() {
    use futures::StreamExt as _;
    for (breaks, reason) in [
        (true, "backend_stream_failed"),
        (false, "response_idle_timeout"),
    ] {
        let url = stalling_stream_backend(breaks).await;
        let mut stalling = member("a", &url, 1);
        stalling["response_idle_timeout_ms"] = json!(1000);
        let gw = TestGateway::start(snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "members": [stalling]}]),
        ))
        .await;
        let response = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, true))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        stream.next().await.unwrap().unwrap();
        drop(stream);
        let record = gw.records(1).await.remove(0);
        assert!(record.client_aborted, "{record:?}");
        assert_eq!(record.last_error_reason.as_deref(), Some(reason));
        let metrics = gw.metrics().await;
        assert!(
            metrics.contains(&format!(
                "gatehouse_backend_answers_cut_total{{backend=\"a\",reason=\"{reason}\"}} 1"
            )),
            "{metrics}"
        );
        // Set aside: the next call finds no member to take it.
        let next = gw
            .post(&chat_path("gpt-4o"))
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(next.status(), 503, "{reason}");
    }
}

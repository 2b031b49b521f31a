//! Files and other stateful objects stay on the member that created them, across restarts and
//! across replicas that share the object map in Redis.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::harness::*;

fn pool(a: &str, b: &str) -> serde_json::Value {
    json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [member("a", a, 1), member("b", b, 1)]}])
}

/// Uploads a batch input file through the gateway at `url` and returns its id.
async fn upload(url: &str, content: &'static [u8]) -> String {
    upload_batch_file(url, content).await
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `method path` through the gateway at `url`, with the client key: the status and body.
async fn call(url: &str, method: reqwest::Method, path: &str) -> (u16, bytes::Bytes) {
    let response = client()
        .request(method, format!("{url}{path}"))
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.bytes().await.unwrap())
}

/// Reads an SSE answer into `text` up to the end of its first event; returns that event's text
/// and its data parsed.
async fn first_event(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
) -> (String, Value) {
    use futures::StreamExt as _;
    while !text.contains("\n\n") {
        let chunk = stream.next().await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let first = text.split("\n\n").next().unwrap().to_owned();
    let data = first
        .lines()
        .find_map(|line| line.strip_prefix("data: "))
        .unwrap();
    let data = serde_json::from_str(data).unwrap();
    (first, data)
}

/// Reads the rest of an SSE answer into `text`.
async fn read_to_end(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
) {
    use futures::StreamExt as _;
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
}

/// `GET path` through the gateway at `url` finds the object (while its stream still runs).
async fn found_mid_stream(url: &str, path: &str) {
    let (status, body) = call(url, reqwest::Method::GET, path).await;
    assert_eq!(
        status,
        200,
        "{path} read mid-stream: {}",
        String::from_utf8_lossy(&body)
    );
}

#[tokio::test]
async fn object_calls_follow_the_member_that_created_the_object_even_after_a_restart() {
    let a = simulator("sticky-a").await;
    let b = simulator("sticky-b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let content: &'static [u8] =
        b"{\"custom_id\":\"1\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{}}\n";
    let mut ids = Vec::new();
    // At least 8 objects, and until both members hold some: each upload picks a member at random
    // (weights 1:1), so 8 alone land on one member once in 128 runs; 64 uploads on one member
    // would mean the pool does not spread them.
    while ids.len() < 8 || a.hits() == 0 || b.hits() == 0 {
        assert!(
            ids.len() < 64,
            "64 uploads, all on one member ({} / {})",
            a.hits(),
            b.hits()
        );
        let id = upload(&gw.url, content).await;
        for _ in 0..3 {
            let got = gw
                .get(&format!("/openai/files/{id}?api-version=2024-10-21"))
                .send()
                .await
                .unwrap();
            assert_eq!(got.status(), 200, "file {id} must be found on its member");
            let body = gw
                .get(&format!(
                    "/openai/files/{id}/content?api-version=2024-10-21"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(body.bytes().await.unwrap().as_ref(), content);
        }
        // A batch that refers to the file goes where the file is.
        let batch = gw
            .post("/openai/batches?api-version=2024-10-21")
            .json(&json!({"input_file_id": id, "endpoint": "/chat/completions", "completion_window": "24h"}))
            .send()
            .await
            .unwrap();
        assert_eq!(batch.status(), 200, "batch for {id}");
        ids.push(id);
    }

    // Restart on the same state directory: the map is still there.
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;
    let gw = TestGateway::start_in(snapshot(1, pool(&a.url(), &b.url())), state_dir).await;
    for id in &ids {
        let got = gw
            .get(&format!("/openai/files/{id}?api-version=2024-10-21"))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), 200, "after restart, file {id}");
    }
    // Deleting forgets the object; a second delete is answered by whichever member is chosen.
    let deleted = gw
        .raw(
            reqwest::Method::DELETE,
            &format!("/openai/files/{}?api-version=2024-10-21", ids[0]),
        )
        .header("api-key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(gw.gateway.affinity.member_of(&ids[0]), None);
}

#[tokio::test]
async fn replicas_sharing_redis_send_object_calls_to_the_member_that_created_the_object() {
    let a = simulator("shared-a").await;
    let b = simulator("shared-b").await;
    let snapshot = snapshot(1, pool(&a.url(), &b.url()));
    let prefix = format!("test:affinity:{}:", uuid::Uuid::new_v4());
    let shared = json!({"affinity": {"redis_url": REDIS, "key_prefix": prefix}});
    let one = GatewayProcess::start_with("affinity-1", &snapshot, shared.clone()).await;
    let two = GatewayProcess::start_with("affinity-2", &snapshot, shared.clone()).await;
    let content: &'static [u8] =
        b"{\"custom_id\":\"1\",\"method\":\"POST\",\"url\":\"/chat/completions\",\"body\":{}}\n";

    // Files uploaded through replica one, until both members hold some (see the test above);
    // each then read, and used by a batch, through replica two, which did not create it.
    let mut ids = Vec::new();
    while ids.len() < 8 || a.hits() == 0 || b.hits() == 0 {
        assert!(ids.len() < 64, "64 uploads, all on one member");
        let id = upload(&one.url, content).await;
        let (status, _) = call(
            &two.url,
            reqwest::Method::GET,
            &format!("/openai/files/{id}?api-version=2024-10-21"),
        )
        .await;
        assert_eq!(
            status, 200,
            "file {id}, created through replica one, read through two"
        );
        let (status, body) = call(
            &two.url,
            reqwest::Method::GET,
            &format!("/openai/files/{id}/content?api-version=2024-10-21"),
        )
        .await;
        assert_eq!(status, 200, "content of {id} through replica two");
        assert_eq!(body.as_ref(), content);
        let batch = client()
            .post(format!("{}/openai/batches?api-version=2024-10-21", two.url))
            .header("api-key", KEY)
            .json(&json!({"input_file_id": id, "endpoint": "/chat/completions", "completion_window": "24h"}))
            .send()
            .await
            .unwrap();
        assert_eq!(batch.status(), 200, "batch for {id} through replica two");
        ids.push(id);
    }
    // One key per file and per batch, each naming a configured member.
    let keys = redis_keys(&prefix).await;
    assert_eq!(keys.len(), 2 * ids.len(), "{keys:?}");
    for id in &ids {
        assert!(
            keys.contains(&format!("{prefix}gatehouse:affinity:{id}")),
            "{id}"
        );
    }

    // A file deleted through replica two is gone from the shared map: a third replica started
    // afterwards does not know it, and still finds the others.
    let (status, _) = call(
        &two.url,
        reqwest::Method::DELETE,
        &format!("/openai/files/{}?api-version=2024-10-21", ids[0]),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        !redis_keys(&prefix)
            .await
            .contains(&format!("{prefix}gatehouse:affinity:{}", ids[0]))
    );
    let three = GatewayProcess::start_with("affinity-3", &snapshot, shared).await;
    for id in &ids[1..] {
        let (status, _) = call(
            &three.url,
            reqwest::Method::GET,
            &format!("/openai/files/{id}?api-version=2024-10-21"),
        )
        .await;
        assert_eq!(status, 200, "file {id} through replica three");
    }
    for replica in [one, two, three] {
        assert!(
            !replica.log().contains("shared object map"),
            "{}",
            replica.log()
        );
        replica.stop().await;
    }
    delete_keys(&prefix).await;
}

#[tokio::test]
async fn a_gateway_whose_shared_map_is_down_keeps_its_own_and_never_logs_the_url() {
    let a = simulator("unshared-a").await;
    let b = simulator("unshared-b").await;
    let snapshot = snapshot(1, pool(&a.url(), &b.url()));
    // Nothing listens on port 1; the URL's password must not reach the log or an answer.
    let password = "affinity-redis-password-7c1f";
    let gw = GatewayProcess::start_with(
        "affinity-down",
        &snapshot,
        json!({"affinity": {"redis_url": format!("redis://:{password}@127.0.0.1:1"), "store_timeout_ms": 200}}),
    )
    .await;
    let content: &'static [u8] = b"{}\n";
    let id = upload(&gw.url, content).await;
    for _ in 0..4 {
        let (status, body) = call(
            &gw.url,
            reqwest::Method::GET,
            &format!("/openai/files/{id}/content?api-version=2024-10-21"),
        )
        .await;
        assert_eq!(status, 200, "the gateway's own map still pins {id}");
        assert_eq!(body.as_ref(), content);
    }
    // A file this gateway does not know: looked up in the shared map, which fails; the call is
    // still routed (here to a member that does not hold it).
    let (status, body) = call(
        &gw.url,
        reqwest::Method::GET,
        "/openai/files/file-unknown?api-version=2024-10-21",
    )
    .await;
    assert_eq!(status, 404, "{}", String::from_utf8_lossy(&body));
    let (_, metrics) = call(&gw.url, reqwest::Method::GET, "/metrics").await;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    let errors: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix("gatehouse_affinity_store_errors_total "))
        .expect("the counter is exposed")
        .parse()
        .unwrap();
    // The upload's write and the unknown file's look-up.
    assert_eq!(errors, 2.0, "{metrics}");
    let log = gw.log();
    assert!(log.contains("shared object map"), "{log}");
    assert!(!log.contains(password), "{log}");
    assert!(!metrics.contains(password));
    gw.stop().await;
}

/// A member that runs batches at once: its batches name output and error files it made itself.
/// Answers `GET …/files/{id}/content` only for its own files (404 for any other), counting them.
async fn batch_running_backend(
    name: &'static str,
) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::http::{Method, StatusCode, Uri};
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&served);
    let app = axum::Router::new().fallback(move |method: Method, uri: Uri| {
        let counted = Arc::clone(&counted);
        async move {
            let path = uri.path().trim_start_matches("/openai");
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            let (status, body) = match (method, segments.as_slice()) {
                (Method::POST, ["batches"]) => (
                    StatusCode::OK,
                    json!({"id": format!("batch_{name}"), "object": "batch", "status": "validating",
                           "output_file_id": null, "error_file_id": null}),
                ),
                (Method::GET, ["batches", id]) => (
                    StatusCode::OK,
                    json!({"id": id, "object": "batch", "status": "completed",
                           "output_file_id": format!("file-out-{name}"),
                           "error_file_id": format!("file-err-{name}")}),
                ),
                (Method::GET, ["files", id, "content"]) if id.ends_with(name) => {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    (StatusCode::OK, json!({"output of": name}))
                }
                _ => (
                    StatusCode::NOT_FOUND,
                    json!({"error": {"code": "404", "message": "not here"}}),
                ),
            };
            (status, axum::Json(body))
        }
    });
    (serve_stub(app).await, served)
}

/// The files a backend makes itself, a batch's output and error files, stay on the member that
/// ran the batch: the gateway learns them from the batch's answer, as it learns the objects a
/// client creates from theirs.
#[tokio::test]
async fn a_batchs_output_files_follow_the_member_that_ran_it() {
    let (a, a_served) = batch_running_backend("a").await;
    let (b, b_served) = batch_running_backend("b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let created: Value = gw
        .post("/openai/batches?api-version=2024-10-21")
        .json(
            &json!({"input_file_id": "file-in", "endpoint": "/chat/completions",
                      "completion_window": "24h"}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let batch = created["id"].as_str().unwrap().to_owned();
    let (status, body) = call(
        &gw.url,
        reqwest::Method::GET,
        &format!("/openai/batches/{batch}?api-version=2024-10-21"),
    )
    .await;
    assert_eq!(status, 200);
    let batch: Value = serde_json::from_slice(&body).unwrap();
    for key in ["output_file_id", "error_file_id"] {
        let file = batch[key].as_str().unwrap();
        for _ in 0..12 {
            let (status, body) = call(
                &gw.url,
                reqwest::Method::GET,
                &format!("/openai/files/{file}/content?api-version=2024-10-21"),
            )
            .await;
            assert_eq!(status, 200, "{file}: {}", String::from_utf8_lossy(&body));
        }
    }
    let served = (
        a_served.load(std::sync::atomic::Ordering::SeqCst),
        b_served.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(served == (24, 0) || served == (0, 24), "{served:?}");
}

/// A streamed Responses call names its response at the start (`response.created`): a call about
/// it while the stream still runs (a fetch, a cancel, the next turn) goes to the member that
/// holds it, whichever of the two created it.
#[tokio::test]
async fn a_streamed_response_is_pinned_as_soon_as_its_stream_names_it() {
    let paced = |id: &str| gatehouse_simulator::SimulatorConfig {
        id: id.to_owned(),
        chunk_delay: std::time::Duration::from_millis(150),
        ..gatehouse_simulator::SimulatorConfig::default()
    };
    let a = simulator_with(paced("early-a")).await;
    let b = simulator_with(paced("early-b")).await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let mut rounds = 0;
    while rounds < 6 || a.hits() == 0 || b.hits() == 0 {
        assert!(rounds < 40, "40 streams, all on one member");
        rounds += 1;
        let response = gw
            .post("/openai/v1/responses")
            .json(&json!({"model": "gpt-4o", "input": "Say hello", "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        let (_, created) = first_event(&mut stream, &mut text).await;
        assert_eq!(created["type"], "response.created");
        let id = created["response"]["id"].as_str().unwrap().to_owned();
        // The stream runs on (its deltas come 150 ms apart) while the response is fetched.
        found_mid_stream(&gw.url, &format!("/openai/v1/responses/{id}")).await;
        read_to_end(&mut stream, &mut text).await;
        assert!(text.contains("response.completed"), "{text}");
    }
}

/// A stored response is pinned until it expires with its member's copy (30 days); one made with
/// `"store": false` is kept nowhere, so it is not pinned at all, streamed or not: a gateway
/// serving the Responses API does not remember every call it saw.
#[tokio::test]
async fn responses_not_stored_are_not_pinned_and_stored_ones_expire() {
    let a = simulator("store-a").await;
    let b = simulator("store-b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let create = |store: Option<bool>, stream: bool| {
        let mut body = json!({"model": "gpt-4o", "input": "Say hello", "stream": stream});
        if let Some(store) = store {
            body["store"] = json!(store);
        }
        let request = gw.post("/openai/v1/responses").json(&body);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let text = response.text().await.unwrap();
            let id_start = text.find("\"id\":\"resp").unwrap() + 6;
            let id_end = id_start + text[id_start..].find('"').unwrap();
            text[id_start..id_end].to_owned()
        }
    };
    for stream in [false, true] {
        let kept = create(None, stream).await;
        assert!(gw.gateway.affinity.member_of(&kept).is_some(), "{kept}");
        let not_kept = create(Some(false), stream).await;
        assert_eq!(gw.gateway.affinity.member_of(&not_kept), None, "{not_kept}");
    }
    // The journal is written on a task after a stream: waited for.
    let path = gw.gateway.affinity.path().to_owned();
    let mut journal = String::new();
    for _ in 0..100 {
        journal = std::fs::read_to_string(&path).unwrap();
        if journal.lines().count() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let kept: Vec<serde_json::Value> = journal
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(kept.len(), 2, "{journal}");
    let in_30_days = time::OffsetDateTime::now_utc().unix_timestamp() + 30 * 24 * 3600;
    for pin in kept {
        let until = pin["until"].as_i64().unwrap();
        assert!((in_30_days - 120..=in_30_days).contains(&until), "{pin}");
    }
}

/// A call authorized for one deployment never runs on the member of another pool because it
/// refers to an object that member holds (its rename would run that pool's model instead).
#[tokio::test]
async fn an_object_of_another_pool_does_not_carry_a_call_to_its_member() {
    let mini = simulator("pools-mini").await;
    let o1 = simulator("pools-o1").await;
    let mut renamed = member("o1", &o1.url(), 1);
    renamed["deployment"] = json!("o1-prod");
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "mini", "deployments": ["gpt-4o-mini"], "members": [member("mini", &mini.url(), 1)]},
            {"id": "o1", "deployments": ["o1"], "members": [renamed]},
        ]),
    ))
    .await;
    let created: Value = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "o1", "input": "Say hello"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap();
    assert_eq!(o1.hits(), 1);

    let next = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "gpt-4o-mini", "input": "And again", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    let message = azure_error(next, 400).await;
    assert!(message.contains("`gpt-4o-mini`"), "{message}");
    assert_eq!((o1.hits(), mini.hits()), (1, 0), "no backend saw it");

    // Its own deployment continues it.
    let same = gw
        .post("/openai/v1/responses")
        .json(&json!({"model": "o1", "input": "And again", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 200);
    assert_eq!(o1.hits(), 2);
}

/// A member for the Assistants stream test: `POST /openai/threads/runs` streams the
/// `thread.created` event of a thread named after the member, then the run's events 300 ms
/// apart; `GET /openai/threads/{id}` finds only its own threads (404 otherwise), as Azure's
/// resources do. Event names and shapes: the OpenAI SDK's Assistants stream decoder dispatches on
/// `event: thread.*` (`azure-specs.md` §1.6, citing `openai-python: src/openai/_streaming.py`).
async fn assistants_member(
    name: &'static str,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use axum::body::{Body, Bytes};
    use axum::extract::Path;
    use axum::routing::{get, post};
    use futures::StreamExt as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let created = Arc::new(AtomicUsize::new(0));
    let get_hits = hits.clone();
    let app = axum::Router::new()
        .route(
            "/openai/threads/runs",
            post(move || {
                let n = created.fetch_add(1, Ordering::SeqCst);
                hits.fetch_add(1, Ordering::SeqCst);
                let thread = format!("thread_{name}_{n}");
                let events = vec![
                    format!(
                        "event: thread.created\ndata: {{\"id\":\"{thread}\",\"object\":\"thread\",\"created_at\":1700000000,\"metadata\":{{}}}}\n\n"
                    ),
                    format!(
                        "event: thread.run.created\ndata: {{\"id\":\"run_{name}_{n}\",\"object\":\"thread.run\",\"thread_id\":\"{thread}\",\"assistant_id\":\"asst_1\",\"status\":\"queued\"}}\n\n"
                    ),
                    format!(
                        "event: thread.run.completed\ndata: {{\"id\":\"run_{name}_{n}\",\"object\":\"thread.run\",\"thread_id\":\"{thread}\",\"assistant_id\":\"asst_1\",\"status\":\"completed\"}}\n\n"
                    ),
                    "event: done\ndata: [DONE]\n\n".to_owned(),
                ];
                let paced = futures::stream::iter(events.into_iter().enumerate()).then(
                    |(i, event)| async move {
                        if i > 0 {
                            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                        }
                        Ok::<_, std::convert::Infallible>(Bytes::from(event))
                    },
                );
                async move {
                    axum::response::Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(paced))
                        .unwrap()
                }
            }),
        )
        .route(
            "/openai/threads/{thread_id}",
            get(move |Path(thread): Path<String>| async move {
                get_hits.fetch_add(1, Ordering::SeqCst);
                if thread.starts_with(&format!("thread_{name}_")) {
                    (
                        http::StatusCode::OK,
                        axum::Json(json!({"id": thread, "object": "thread", "created_at": 1700000000})),
                    )
                } else {
                    (
                        http::StatusCode::NOT_FOUND,
                        axum::Json(json!({"error": {"code": "NotFound", "message": "No thread found"}})),
                    )
                }
            }),
        );
    serve_stub(app).await
}

/// The thread a streamed create-thread-and-run makes is pinned to its member as soon as the
/// stream's `thread.created` event passes, so a client that reads the thread while the run still
/// streams (as the SDKs' event handlers do) reaches the member that holds it.
#[tokio::test]
async fn a_thread_created_by_a_streamed_run_is_pinned_as_soon_as_its_stream_names_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits_a = Arc::new(AtomicUsize::new(0));
    let hits_b = Arc::new(AtomicUsize::new(0));
    let a = assistants_member("a", hits_a.clone()).await;
    let b = assistants_member("b", hits_b.clone()).await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let mut rounds = 0;
    let mut threads = Vec::new();
    while rounds < 6
        || !threads.iter().any(|t: &String| t.starts_with("thread_a_"))
        || !threads.iter().any(|t: &String| t.starts_with("thread_b_"))
    {
        assert!(rounds < 40, "40 runs, all on one member: {threads:?}");
        rounds += 1;
        let response = gw
            .post("/openai/threads/runs?api-version=2024-05-01-preview")
            .json(&json!({"assistant_id": "asst_1", "stream": true}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut text = String::new();
        let (first, thread) = first_event(&mut stream, &mut text).await;
        assert!(first.starts_with("event: thread.created"), "{first}");
        let id = thread["id"].as_str().unwrap().to_owned();
        // The run's events come 300 ms apart: the thread is read while its stream runs on.
        found_mid_stream(
            &gw.url,
            &format!("/openai/threads/{id}?api-version=2024-05-01-preview"),
        )
        .await;
        read_to_end(&mut stream, &mut text).await;
        assert!(text.contains("thread.run.completed"), "{text}");
        threads.push(id);
    }
    assert_eq!(
        hits_a.load(Ordering::SeqCst) + hits_b.load(Ordering::SeqCst),
        2 * rounds,
        "one run and one read a round, none retried on the other member"
    );
}

/// Objects named below the top level of a body pin the call too: an assistant whose
/// `tool_resources` name a vector store, and a thread whose messages attach a file, are created
/// on the member that holds them.
#[tokio::test]
async fn objects_named_deep_in_a_body_pin_the_call_to_their_member() {
    let a = simulator("deep-a").await;
    let b = simulator("deep-b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let store = gw
        .post("/openai/vector_stores?api-version=2024-05-01-preview")
        .json(&json!({"name": "manuals"}))
        .send()
        .await
        .unwrap();
    assert_eq!(store.status(), 200);
    let store: Value = store.json().await.unwrap();
    let store_id = store["id"].as_str().unwrap().to_owned();
    let holder = if a.hits() == 1 { &a } else { &b };
    let other = if a.hits() == 1 { &b } else { &a };
    for _ in 0..8 {
        let assistant = gw
            .post("/openai/assistants?api-version=2024-05-01-preview")
            .json(&json!({
                "model": "gpt-4o",
                "tools": [{"type": "file_search"}],
                "tool_resources": {"file_search": {"vector_store_ids": [store_id]}},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(assistant.status(), 200);
    }
    assert_eq!((holder.hits(), other.hits()), (9, 0));

    // Files until one lands on the member that does not hold the store (1:1 weights).
    let mut uploads = 0;
    let file_id = loop {
        uploads += 1;
        assert!(uploads <= 64, "64 uploads, none on the other member");
        let id = upload(&gw.url, b"{\"a\":1}\n").await;
        if other.hits() == 1 {
            break id;
        }
    };
    let holder_hits = holder.hits();
    for _ in 0..4 {
        let thread = gw
            .post("/openai/threads?api-version=2024-05-01-preview")
            .json(
                &json!({"messages": [{"role": "user", "content": "Read this.",
                "attachments": [{"file_id": file_id, "tools": [{"type": "file_search"}]}]}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(thread.status(), 200);
    }
    assert_eq!((other.hits(), holder.hits()), (5, holder_hits));
}

/// A Responses answer too large to read whole (images of the image-generation tool, base64 in
/// its output) is relayed as it streams, not refused, and the response is pinned by the `id` it
/// opens with — unless the request said `"store": false`. The stub answers as OpenAI's Responses
/// API does ("Create a model response": the `response` object, `id` first).
#[tokio::test]
async fn a_response_too_large_to_read_whole_is_relayed_and_pinned() {
    const IMAGE_BYTES: usize = 9 * 1024 * 1024;
    let app = axum::Router::new().route(
        "/openai/v1/responses",
        axum::routing::post(|body: axum::Json<Value>| async move {
            let id = if body["store"] == json!(false) {
                "resp_big_unstored"
            } else {
                "resp_big"
            };
            // In the order OpenAI writes a response: `model` before `output`, the echoed `tools`
            // (the image tool names its own model) and `usage` after.
            let answer = format!(
                r#"{{"id":"{id}","object":"response","status":"completed","model":"gpt-4o","output":[{{"type":"image_generation_call","status":"completed","result":"{}"}}],"tools":[{{"type":"image_generation","model":"gpt-image-1"}}],"usage":{{"input_tokens":12,"output_tokens":1500,"total_tokens":1512}}}}"#,
                "A".repeat(IMAGE_BYTES)
            );
            ([("content-type", "application/json")], answer)
        }),
    );
    let url = serve_stub(app).await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true,
                "members": [member("a", &url, 1)]}]),
    ))
    .await;
    for (store, id, pinned) in [
        (None, "resp_big", true),
        (Some(false), "resp_big_unstored", false),
    ] {
        let mut body = json!({"model": "gpt-4o", "input": "Draw a cat",
                              "tools": [{"type": "image_generation"}]});
        if let Some(store) = store {
            body["store"] = json!(store);
        }
        let response = gw
            .post("/openai/v1/responses")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["id"], id);
        assert_eq!(
            answer["output"][0]["result"].as_str().unwrap().len(),
            IMAGE_BYTES
        );
        assert_eq!(gw.gateway.affinity.member_of(id).is_some(), pinned, "{id}");
    }
    let records = gw.records(2).await;
    for record in &records {
        assert_eq!(record.response_code, 200);
        assert_eq!(record.last_error_reason, None);
        assert_eq!(record.usage.unwrap().total_tokens, 1512);
        assert_eq!(record.model_name.as_deref(), Some("gpt-4o"));
    }
}

/// A chat message's file part (`{"type": "file", "file": {"file_id": …}}`, OpenAI's "file
/// content part" of Create chat completion) names an uploaded file deep in `messages`: the call
/// goes to the member that holds the file, whichever member the weights would pick.
#[tokio::test]
async fn a_chat_message_naming_a_file_goes_to_the_member_that_holds_it() {
    let a = simulator("chat-file-a").await;
    let b = simulator("chat-file-b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let file_id = upload(&gw.url, b"{\"a\":1}\n").await;
    let (holder, other) = if a.hits() == 1 { (&a, &b) } else { (&b, &a) };
    for _ in 0..8 {
        let answer = gw
            .post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
            .json(&json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "Summarise the file."},
                {"type": "file", "file": {"file_id": file_id}},
            ]}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert_eq!((holder.hits(), other.hits()), (9, 0));

    // A chat call that only mentions the words is spread as usual.
    for _ in 0..16 {
        let answer = gw
            .post("/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21")
            .json(&json!({"messages": [{"role": "user", "content": "what is a \"file_id\"?"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
    }
    assert!(
        other.hits() > 0,
        "the weights spread calls that name no file"
    );
}

/// A resource pool whose member (`files`) holds the objects, and a pool of its own for
/// `o3-mini` (`models`), behind one gateway; a file uploaded through it, on `files`.
async fn objects_apart_from_o3(
    name: &str,
) -> (
    gatehouse_simulator::RunningSimulator,
    gatehouse_simulator::RunningSimulator,
    TestGateway,
    String,
) {
    let files = simulator(&format!("{name}-resources")).await;
    let models = simulator(&format!("{name}-models")).await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([
            {"id": "resources", "deployments": ["gpt-4o"], "serves_resources": true,
             "members": [member("files", &files.url(), 1)]},
            {"id": "reasoning", "deployments": ["o3-mini"], "members": [member("o3", &models.url(), 1)]},
        ]),
    ))
    .await;
    let file_id = upload(&gw.url, b"{\"a\":1}\n").await;
    assert_eq!(files.hits(), 1);
    (files, models, gw, file_id)
}

/// A file held by a member of the resource pool does not carry a chat call away from its
/// deployment's pool (one on the same Azure resource can read the file): the call goes to the
/// deployment's pool, not refused.
#[tokio::test]
async fn a_file_of_another_pool_leaves_a_chat_call_to_its_deployments_pool() {
    let (files, models, gw, file_id) = objects_apart_from_o3("chat-file").await;
    let answer = gw
        .post("/openai/deployments/o3-mini/chat/completions?api-version=2024-10-21")
        .json(&json!({"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": file_id}},
        ]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!((files.hits(), models.hits()), (1, 1));
}

/// The same for a Responses call: its `input_file` part and its `file_search` tool's vector
/// store are hints, as a chat message's file part is; the call goes to its model's pool.
#[tokio::test]
async fn a_file_of_another_pool_leaves_a_responses_call_to_its_models_pool() {
    let (files, models, gw, file_id) = objects_apart_from_o3("responses-file").await;
    let store = gw
        .post("/openai/vector_stores?api-version=2024-05-01-preview")
        .json(&json!({"name": "manuals", "file_ids": [file_id]}))
        .send()
        .await
        .unwrap();
    assert_eq!(store.status(), 200);
    let store_id = store.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(files.hits(), 2, "the store is made where its file is");
    for body in [
        json!({"model": "o3-mini", "input": [{"role": "user", "content": [
            {"type": "input_file", "file_id": file_id},
            {"type": "input_text", "text": "Summarise it."},
        ]}]}),
        json!({"model": "o3-mini", "input": "What do the manuals say?",
               "tools": [{"type": "file_search", "vector_store_ids": [store_id]}]}),
    ] {
        let answer = gw
            .post("/openai/v1/responses")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    }
    assert_eq!((files.hits(), models.hits()), (2, 2));
}

/// The id of the first chat completion chunk in an SSE answer, read from `stream` into `text`
/// as far as needed (Azure's first event names no completion: its `id` is empty).
async fn first_completion_id(
    stream: &mut (impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    text: &mut String,
) -> String {
    use futures::StreamExt as _;
    const MARK: &str = "\"id\":\"chatcmpl";
    loop {
        if let Some(at) = text.find(MARK) {
            let start = at + "\"id\":\"".len();
            if let Some(len) = text[start..].find('"') {
                return text[start..start + len].to_owned();
            }
        }
        let chunk = stream.next().await.unwrap().unwrap();
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// A chat completion made with `"store": true` is kept by the member that made it: reading it
/// (on the v1 and the classic resource routes), its messages, a change of its metadata and its
/// deletion go there, streamed or not; a streamed one is found while its stream still runs.
/// One made without `store` is pinned nowhere.
#[tokio::test]
async fn a_stored_chat_completion_is_read_where_it_was_made() {
    let paced = |id: &str| gatehouse_simulator::SimulatorConfig {
        id: id.to_owned(),
        chunk_delay: std::time::Duration::from_millis(150),
        ..gatehouse_simulator::SimulatorConfig::default()
    };
    let a = simulator_with(paced("stored-a")).await;
    let b = simulator_with(paced("stored-b")).await;
    let gw = TestGateway::start(snapshot(1, pool(&a.url(), &b.url()))).await;
    let mut rounds = 0;
    while rounds < 6 || a.hits() == 0 || b.hits() == 0 {
        assert!(rounds < 40, "40 completions, all on one member");
        rounds += 1;
        let stream = rounds % 2 == 0;
        let response = gw
            .post("/openai/v1/chat/completions")
            .json(&json!({
                "model": "gpt-4o",
                "messages": [{"role": "user", "content": "Say hello"}],
                "store": true,
                "metadata": {"team": "red"},
                "stream": stream,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let id = if stream {
            let mut chunks = response.bytes_stream();
            let mut text = String::new();
            let id = first_completion_id(&mut chunks, &mut text).await;
            // The answer's pieces come 150 ms apart: the completion is read while they do.
            found_mid_stream(&gw.url, &format!("/openai/v1/chat/completions/{id}")).await;
            read_to_end(&mut chunks, &mut text).await;
            assert!(text.contains("[DONE]"), "{text}");
            id
        } else {
            let answer: Value = response.json().await.unwrap();
            answer["id"].as_str().unwrap().to_owned()
        };
        let hits_before = a.hits() + b.hits();
        let (status, body) = call(
            &gw.url,
            reqwest::Method::GET,
            &format!("/openai/chat/completions/{id}?api-version=2025-04-01-preview"),
        )
        .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let kept: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(kept["id"], id.as_str());
        assert_eq!(kept["metadata"]["team"], "red");
        let (status, body) = call(
            &gw.url,
            reqwest::Method::GET,
            &format!("/v1/chat/completions/{id}/messages"),
        )
        .await;
        assert_eq!(status, 200);
        assert!(
            String::from_utf8_lossy(&body).contains("Say hello"),
            "{}",
            String::from_utf8_lossy(&body)
        );
        let updated = gw
            .post(&format!("/openai/v1/chat/completions/{id}"))
            .json(&json!({"metadata": {"team": "blue"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(updated.status(), 200);
        let updated: Value = updated.json().await.unwrap();
        assert_eq!(updated["metadata"]["team"], "blue");
        let (status, _) = call(
            &gw.url,
            reqwest::Method::DELETE,
            &format!("/openai/v1/chat/completions/{id}"),
        )
        .await;
        assert_eq!(status, 200);
        // Four calls, each answered by the member that holds the completion, none retried.
        assert_eq!(a.hits() + b.hits(), hits_before + 4);
        assert_eq!(
            gw.gateway.affinity.member_of(&id),
            None,
            "deleted: forgotten"
        );
    }

    // Not stored: not pinned.
    let response = gw
        .post("/openai/v1/chat/completions")
        .json(&chat(Some("gpt-4o"), false))
        .send()
        .await
        .unwrap();
    let answer: Value = response.json().await.unwrap();
    let id = answer["id"].as_str().unwrap();
    assert_eq!(gw.gateway.affinity.member_of(id), None, "{id}");
}

/// A member that takes uploads in parts, as OpenAI's and Azure's Uploads API does: an upload it
/// made (`upload_{name}_…`) takes parts and completes into a file (`file_{name}_…`) that only it
/// can read; another member's upload or file is 404 here. Shapes: OpenAI's API reference,
/// `POST /uploads`, `POST /uploads/{id}/parts`, `POST /uploads/{id}/complete`.
async fn uploads_member(name: &'static str, hits: Arc<std::sync::atomic::AtomicUsize>) -> String {
    use axum::extract::Path;
    use axum::response::IntoResponse as _;
    use axum::routing::{get, post};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let not_found = || {
        (
            http::StatusCode::NOT_FOUND,
            axum::Json(json!({"error": {"code": "NotFound", "message": "No such object"}})),
        )
    };
    let counter = Arc::new(AtomicUsize::new(0));
    let (create_hits, part_hits, complete_hits, file_hits) =
        (hits.clone(), hits.clone(), hits.clone(), hits);
    let app = axum::Router::new()
        .route(
            "/openai/uploads",
            post(move || {
                create_hits.fetch_add(1, Ordering::SeqCst);
                let n = counter.fetch_add(1, Ordering::SeqCst);
                async move {
                    axum::Json(json!({
                        "id": format!("upload_{name}_{n}"), "object": "upload",
                        "status": "pending", "bytes": 6, "purpose": "assistants",
                        "filename": "notes.txt", "created_at": 1700000000, "expires_at": 1700003600,
                    }))
                }
            }),
        )
        .route(
            "/openai/uploads/{upload_id}/parts",
            post(move |Path(upload): Path<String>, body: axum::body::Bytes| {
                part_hits.fetch_add(1, Ordering::SeqCst);
                async move {
                    let has_data = String::from_utf8_lossy(&body).contains("name=\"data\"");
                    if !upload.starts_with(&format!("upload_{name}_")) || !has_data {
                        return not_found().into_response();
                    }
                    axum::Json(json!({"id": format!("part_{upload}"), "object": "upload.part", "upload_id": upload, "created_at": 1700000001}))
                        .into_response()
                }
            }),
        )
        .route(
            "/openai/uploads/{upload_id}/complete",
            post(move |Path(upload): Path<String>| {
                complete_hits.fetch_add(1, Ordering::SeqCst);
                async move {
                    let Some(n) = upload.strip_prefix(&format!("upload_{name}_")) else {
                        return not_found().into_response();
                    };
                    axum::Json(json!({
                        "id": upload, "object": "upload", "status": "completed", "bytes": 6,
                        "file": {"id": format!("file_{name}_{n}"), "object": "file", "bytes": 6, "purpose": "assistants"},
                    }))
                    .into_response()
                }
            }),
        )
        .route(
            "/openai/files/{file_id}",
            get(move |Path(file): Path<String>| {
                file_hits.fetch_add(1, Ordering::SeqCst);
                async move {
                    if file.starts_with(&format!("file_{name}_")) {
                        axum::Json(json!({"id": file, "object": "file"})).into_response()
                    } else {
                        not_found().into_response()
                    }
                }
            }),
        );
    serve_stub(app).await
}

/// An upload in parts goes to the member that began it, part after part, and the file it becomes
/// is read there too.
#[tokio::test]
async fn an_upload_in_parts_and_its_file_stay_on_the_member_that_began_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits_a = Arc::new(AtomicUsize::new(0));
    let hits_b = Arc::new(AtomicUsize::new(0));
    let a = uploads_member("a", hits_a.clone()).await;
    let b = uploads_member("b", hits_b.clone()).await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let version = "api-version=2025-04-01-preview";
    let mut files = Vec::new();
    let mut rounds = 0;
    while rounds < 6
        || !files.iter().any(|f: &String| f.starts_with("file_a_"))
        || !files.iter().any(|f: &String| f.starts_with("file_b_"))
    {
        assert!(rounds < 40, "40 uploads, all on one member: {files:?}");
        rounds += 1;
        let begun = gw
            .post(&format!("/openai/uploads?{version}"))
            .json(&json!({"purpose": "assistants", "filename": "notes.txt", "bytes": 6, "mime_type": "text/plain"}))
            .send()
            .await
            .unwrap();
        assert_eq!(begun.status(), 200);
        let upload: Value = begun.json().await.unwrap();
        let upload = upload["id"].as_str().unwrap().to_owned();
        for part in ["abc", "def"] {
            let form = reqwest::multipart::Form::new().part(
                "data",
                reqwest::multipart::Part::bytes(part.as_bytes().to_vec()).file_name("blob"),
            );
            let added = gw
                .raw(
                    reqwest::Method::POST,
                    &format!("/openai/uploads/{upload}/parts?{version}"),
                )
                .header("api-key", KEY)
                .multipart(form)
                .send()
                .await
                .unwrap();
            assert_eq!(added.status(), 200, "part of {upload}");
        }
        let completed = gw
            .post(&format!("/openai/uploads/{upload}/complete?{version}"))
            .json(&json!({"part_ids": [format!("part_{upload}")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(completed.status(), 200, "complete {upload}");
        let completed: Value = completed.json().await.unwrap();
        let file = completed["file"]["id"].as_str().unwrap().to_owned();
        let (status, _) = call(
            &gw.url,
            reqwest::Method::GET,
            &format!("/openai/files/{file}?{version}"),
        )
        .await;
        assert_eq!(status, 200, "file {file} of {upload}");
        files.push(file);
    }
    assert_eq!(
        hits_a.load(Ordering::SeqCst) + hits_b.load(Ordering::SeqCst),
        5 * rounds,
        "five calls a round, each answered by the member that holds its object, none retried"
    );
}

/// A member double that keeps Responses API conversations as OpenAI's Conversations API and
/// Azure's v1 REST reference ("Conversations") describe them: `POST …/conversations` makes
/// `conv_{name}_{n}`; the conversation, its update, its items and its deletion answer 200 only on
/// the member that made it, 404 elsewhere; and `POST …/responses` naming a `conversation` (its id
/// or `{"id": …}`) answers only where that conversation lives. Every call is counted in `hits`.
async fn conversations_member(
    name: &'static str,
    hits: Arc<std::sync::atomic::AtomicUsize>,
) -> String {
    use axum::response::IntoResponse as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let made = Arc::new(AtomicUsize::new(0));
    let ours = move |id: &str| id.starts_with(&format!("conv_{name}_"));
    let app = axum::Router::new().fallback(
        move |method: http::Method, uri: http::Uri, body: axum::body::Bytes| {
            hits.fetch_add(1, Ordering::SeqCst);
            let made = Arc::clone(&made);
            async move {
                let not_found = || {
                    (
                        http::StatusCode::NOT_FOUND,
                        axum::Json(json!({"error": {"code": "not_found", "message": "Conversation not found"}})),
                    )
                        .into_response()
                };
                let path = uri.path().trim_start_matches("/openai").trim_start_matches("/v1");
                let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
                match (method.as_str(), segments.as_slice()) {
                    ("POST", ["conversations"]) => {
                        let n = made.fetch_add(1, Ordering::SeqCst);
                        axum::Json(json!({"id": format!("conv_{name}_{n}"), "object": "conversation", "created_at": 1_741_900_000, "metadata": {}}))
                            .into_response()
                    }
                    (_, ["conversations", id, ..]) if !ours(id) => not_found(),
                    ("DELETE", ["conversations", id]) => {
                        axum::Json(json!({"id": id, "object": "conversation.deleted", "deleted": true})).into_response()
                    }
                    (_, ["conversations", id]) => {
                        axum::Json(json!({"id": id, "object": "conversation", "created_at": 1_741_900_000, "metadata": {}})).into_response()
                    }
                    (_, ["conversations", _, "items", ..]) => {
                        axum::Json(json!({"object": "list", "data": [], "has_more": false})).into_response()
                    }
                    ("POST", ["responses"]) => {
                        let request: Value = serde_json::from_slice(&body).unwrap_or_default();
                        let conversation = request["conversation"]
                            .as_str()
                            .or_else(|| request["conversation"]["id"].as_str());
                        if conversation.is_some_and(|id| !ours(id)) {
                            return not_found();
                        }
                        axum::Json(json!({
                            "id": format!("resp_{name}_{}", made.fetch_add(1, Ordering::SeqCst)),
                            "object": "response", "status": "completed", "model": "gpt-4o",
                            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Noted."}]}],
                            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
                        }))
                        .into_response()
                    }
                    _ => not_found(),
                }
            }
        },
    );
    serve_stub(app).await
}

/// Calls about an object, each expected to answer 200 from the member that holds it.
type ObjectCalls = Vec<(reqwest::Method, String, Option<Value>)>;

/// Makes objects through `gw` (`create(round)`: the path and body of round `round`'s create) until
/// at least four were made and both members of the pool hold one (the member doubles name their
/// objects `{family}_{member}_{n}`: `conv_a_0`); after each, makes the calls `about(round, id)`
/// (its deletion last), each answered 200 by the member that made it. Then checks that each call
/// reached one member once (none retried elsewhere), and that a deleted object pins nothing: a
/// call about it (`gone(id)`) reaches, among others, a member that never made it (404).
async fn objects_stay_on_their_member(
    gw: &TestGateway,
    hits: [&std::sync::atomic::AtomicUsize; 2],
    family: &str,
    create: impl Fn(usize) -> (String, Value),
    about: impl Fn(usize, &str) -> ObjectCalls,
    gone: impl Fn(&str) -> String,
) {
    use std::sync::atomic::Ordering;
    let mut made: Vec<String> = Vec::new();
    let mut calls = 0;
    let on = |member: &str| format!("{family}_{member}_");
    let mut round = 0;
    while round < 4
        || !made.iter().any(|id| id.starts_with(&on("a")))
        || !made.iter().any(|id| id.starts_with(&on("b")))
    {
        assert!(round < 40, "40 objects, all on one member: {made:?}");
        let (path, body) = create(round);
        let created = gw.post(&path).json(&body).send().await.unwrap();
        assert_eq!(created.status(), 200, "{path}");
        let created: Value = created.json().await.unwrap();
        let id = created["id"].as_str().unwrap().to_owned();
        calls += 1;
        for (method, path, body) in about(round, &id) {
            let mut request = gw.raw(method.clone(), &path).header("api-key", KEY);
            if let Some(body) = body {
                request = request.json(&body);
            }
            let answered = request.send().await.unwrap();
            assert_eq!(answered.status(), 200, "{method} {path}");
            calls += 1;
        }
        made.push(id);
        round += 1;
    }
    assert_eq!(
        hits[0].load(Ordering::SeqCst) + hits[1].load(Ordering::SeqCst),
        calls,
        "each call answered by the member that holds its object, none retried"
    );
    let mut statuses = std::collections::BTreeSet::new();
    for _ in 0..16 {
        let (status, _) = call(&gw.url, reqwest::Method::GET, &gone(made.last().unwrap())).await;
        statuses.insert(status);
    }
    assert!(statuses.contains(&404), "{statuses:?}");
}

/// A conversation, its items and the responses that name it (by id or as `{"id": …}`) go to the
/// member that made it, in the Azure v1 and OpenAI styles; once deleted it is no longer pinned.
#[tokio::test]
async fn a_conversation_and_the_responses_that_name_it_stay_on_its_member() {
    use reqwest::Method;
    use std::sync::atomic::AtomicUsize;
    let hits = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let a = conversations_member("a", hits[0].clone()).await;
    let b = conversations_member("b", hits[1].clone()).await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let style = |round: usize| {
        if round.is_multiple_of(2) {
            "/openai/v1"
        } else {
            "/v1"
        }
    };
    objects_stay_on_their_member(
        &gw,
        [&hits[0], &hits[1]],
        "conv",
        |round| {
            let path = format!("{}/conversations", style(round));
            (path, json!({"metadata": {"topic": "travel"}}))
        },
        |round, id| {
            let at = |rest: &str| format!("{}/conversations/{id}{rest}", style(round));
            let responses = format!("{}/responses", style(round));
            vec![
                (Method::GET, at(""), None),
                (Method::POST, at(""), Some(json!({"metadata": {"topic": "work"}}))),
                (
                    Method::POST,
                    at("/items"),
                    Some(json!({"items": [{"type": "message", "role": "user", "content": "Hello"}]})),
                ),
                (Method::GET, at("/items"), None),
                (Method::GET, at("/items/msg_1"), None),
                (Method::DELETE, at("/items/msg_1"), None),
                (
                    Method::POST,
                    responses.clone(),
                    Some(json!({"model": "gpt-4o", "input": "Where to?", "conversation": id})),
                ),
                (
                    Method::POST,
                    responses,
                    Some(json!({"model": "gpt-4o", "input": "And then?", "conversation": {"id": id}})),
                ),
                (Method::DELETE, at(""), None),
            ]
        },
        |id| format!("/openai/v1/conversations/{id}"),
    )
    .await;
}

/// A member double of the evals API (OpenAI's Evals API; Azure OpenAI's evaluation API has its
/// paths): `POST …/evals` makes `eval_{name}_{n}`, and every call under an eval (its runs and
/// their output items) answers 200 only on the member that made the eval, 404 elsewhere. Every
/// call is counted in `hits`.
async fn evals_member(name: &'static str, hits: Arc<std::sync::atomic::AtomicUsize>) -> String {
    use axum::response::IntoResponse as _;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let made = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move |method: http::Method, uri: http::Uri| {
        hits.fetch_add(1, Ordering::SeqCst);
        let made = Arc::clone(&made);
        async move {
            let path = uri
                .path()
                .trim_start_matches("/openai")
                .trim_start_matches("/v1");
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            match (method.as_str(), segments.as_slice()) {
                ("POST", ["evals"]) => {
                    let n = made.fetch_add(1, Ordering::SeqCst);
                    axum::Json(
                        json!({"id": format!("eval_{name}_{n}"), "object": "eval", "name": "tone"}),
                    )
                    .into_response()
                }
                (_, ["evals", id, ..]) if id.starts_with(&format!("eval_{name}_")) => {
                    axum::Json(json!({"id": id, "object": "eval"})).into_response()
                }
                _ => (
                    http::StatusCode::NOT_FOUND,
                    axum::Json(
                        json!({"error": {"code": "not_found", "message": "Eval not found"}}),
                    ),
                )
                    .into_response(),
            }
        }
    });
    serve_stub(app).await
}

/// An eval, its runs and their output items go to the member that made the eval; once the eval
/// is deleted it is no longer pinned.
#[tokio::test]
async fn an_eval_and_its_runs_stay_on_the_member_that_made_it() {
    use reqwest::Method;
    use std::sync::atomic::AtomicUsize;
    let hits = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let a = evals_member("a", hits[0].clone()).await;
    let b = evals_member("b", hits[1].clone()).await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let version = "api-version=2025-04-01-preview";
    objects_stay_on_their_member(
        &gw,
        [&hits[0], &hits[1]],
        "eval",
        |_| {
            let eval = json!({"name": "tone", "data_source_config": {"type": "custom", "item_schema": {"type": "object"}}, "testing_criteria": []});
            (format!("/openai/evals?{version}"), eval)
        },
        |_, id| {
            let at = |rest: &str| format!("/openai/evals/{id}{rest}?{version}");
            let run = "/runs/evalrun_1";
            vec![
                (Method::GET, at(""), None),
                (Method::POST, at(""), Some(json!({"name": "tone of voice"}))),
                (
                    Method::POST,
                    at("/runs"),
                    Some(json!({"name": "first", "data_source": {"type": "jsonl", "source": {"type": "file_content", "content": []}}})),
                ),
                (Method::GET, at("/runs"), None),
                (Method::GET, at(run), None),
                (Method::GET, at(&format!("{run}/output_items")), None),
                (Method::GET, at(&format!("{run}/output_items/outputitem_1")), None),
                (Method::POST, at(run), Some(json!({}))),
                (Method::DELETE, at(run), None),
                (Method::DELETE, at(""), None),
            ]
        },
        |id| format!("/openai/evals/{id}?{version}"),
    )
    .await;
}

/// A member double for the code interpreter's containers (OpenAI's Containers API and the
/// Responses API's `code_interpreter` tool, whose `container` is a container's id or
/// `{"type": "auto"}` for a new one): it knows only the containers it made, answers a response
/// in an unknown container with 404, and names the container a response ran in in its
/// `code_interpreter_call` output item, as OpenAI's response object does. Counts its calls.
async fn container_member(name: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
    use axum::response::IntoResponse as _;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let known: Arc<Mutex<Vec<String>>> = Arc::default();
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&hits);
    let app = axum::Router::new().fallback(
        move |method: http::Method, uri: http::Uri, body: axum::body::Bytes| {
            let (known, hits) = (Arc::clone(&known), Arc::clone(&counted));
            async move {
                hits.fetch_add(1, Ordering::SeqCst);
                let path = uri.path().trim_start_matches("/openai/v1");
                let not_found = || {
                    (
                        http::StatusCode::NOT_FOUND,
                        axum::Json(json!({"error": {"code": "not_found", "message": "No such container."}})),
                    )
                        .into_response()
                };
                let make = |known: &mut Vec<String>| {
                    let id = format!("cntr_{name}_{}", known.len());
                    known.push(id.clone());
                    id
                };
                match (method.as_str(), path) {
                    ("POST", "/containers") => {
                        let id = make(&mut known.lock().unwrap());
                        axum::Json(json!({"id": id, "object": "container", "status": "running"}))
                            .into_response()
                    }
                    ("POST", "/responses") => {
                        let request: Value = serde_json::from_slice(&body).unwrap();
                        let container = &request["tools"][0]["container"];
                        let id = match container.as_str() {
                            Some(id) if known.lock().unwrap().iter().any(|k| k == id) => id.to_owned(),
                            Some(_) => return not_found(),
                            None => make(&mut known.lock().unwrap()),
                        };
                        axum::Json(json!({"id": format!("resp_{name}_{}", hits.load(Ordering::SeqCst)), "object": "response", "status": "completed", "model": "gpt-4o",
                            "output": [{"type": "code_interpreter_call", "id": "ci_1", "status": "completed", "code": "print(1)", "container_id": id, "outputs": []}],
                            "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}}))
                        .into_response()
                    }
                    ("GET", file) if file.starts_with("/containers/") && file.ends_with("/content") => {
                        let id = file.split('/').nth(2).unwrap_or_default();
                        if known.lock().unwrap().iter().any(|k| k == id) {
                            "1\n".into_response()
                        } else {
                            not_found()
                        }
                    }
                    _ => not_found(),
                }
            }
        },
    );
    (serve_stub(app).await, hits)
}

/// A code interpreter's container lives on the member that made it: a Responses call that names
/// it goes there, and a container a response made (`{"type": "auto"}`) is pinned to that
/// response's member, so that its files are read there.
#[tokio::test]
async fn a_code_interpreters_container_stays_with_its_member() {
    use std::sync::atomic::Ordering;
    let (a, a_hits) = container_member("a").await;
    let (b, b_hits) = container_member("b").await;
    let gw = TestGateway::start(snapshot(1, pool(&a, &b))).await;
    let created = gw
        .post("/openai/v1/containers")
        .json(&json!({"name": "sandbox"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let container = created.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..8 {
        let answer = gw
            .post("/openai/v1/responses")
            .json(&json!({"model": "gpt-4o", "input": "Plot it",
                          "tools": [{"type": "code_interpreter", "container": container}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
    }
    let holder_hits = if container.starts_with("cntr_a") {
        &a_hits
    } else {
        &b_hits
    };
    assert_eq!(holder_hits.load(Ordering::SeqCst), 9);

    // New containers, made by responses until one is on each member.
    let mut made = Vec::new();
    while !(made.iter().any(|id: &String| id.starts_with("cntr_a"))
        && made.iter().any(|id: &String| id.starts_with("cntr_b")))
    {
        assert!(made.len() < 64, "64 responses, all on one member");
        let answer: Value = gw
            .post("/openai/v1/responses")
            .json(&json!({"model": "gpt-4o", "input": "Plot it",
                          "tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        made.push(
            answer["output"][0]["container_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    for id in &made {
        for _ in 0..4 {
            let content = gw
                .get(&format!("/openai/v1/containers/{id}/files/cfile_1/content"))
                .send()
                .await
                .unwrap();
            assert_eq!(content.status(), 200, "{id}");
        }
    }
}

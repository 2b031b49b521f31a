//! Lists of a resource pool of several members: each member holds the objects made on it, and a
//! list through the gateway holds them all, in order, page after page — also when the page's
//! cursor comes to a gateway that did not answer that page.

use std::sync::atomic::{AtomicI64, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::response::IntoResponse as _;
use serde_json::{Value, json};

use crate::harness::*;

const BATCHES: &str = "/openai/batches?api-version=2024-10-21";

/// A batch member double on 127.0.0.1 that keeps the batches made on it (`batch_{name}_{n}`,
/// `created_at` from the clock both members share, one second a batch) and lists them as
/// OpenAI's and Azure OpenAI's batch API does (OpenAI's API reference, "List batch"; Azure
/// OpenAI's REST reference, Batch - List): newest first, `limit` (default 20), `after` (the
/// batches after that one; 404 when it holds no such batch), and `object`, `data`, `first_id`,
/// `last_id`, `has_more`. `GET /openai/batches/{id}` answers one of its own. A list while `fail`
/// holds a status is answered with that status (a 429 with `retry-after-ms: 4000`). `made` is
/// what it holds: a test may take a batch out, as a backend does with one that expired.
struct BatchMember {
    url: String,
    lists: Arc<AtomicUsize>,
    fail: Arc<AtomicU16>,
    made: Arc<Mutex<Vec<Value>>>,
}

async fn batch_member(name: &'static str, clock: Arc<AtomicI64>) -> BatchMember {
    let made: Arc<Mutex<Vec<Value>>> = Arc::default();
    let lists = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicU16::new(0));
    let (counted, failing, held) = (Arc::clone(&lists), Arc::clone(&fail), Arc::clone(&made));
    let app = axum::Router::new().fallback(
        move |method: http::Method, uri: http::Uri| {
            let (made, clock, lists, fail) = (
                Arc::clone(&held),
                Arc::clone(&clock),
                Arc::clone(&counted),
                Arc::clone(&failing),
            );
            async move {
                let path = uri.path().trim_start_matches("/openai");
                let query: Vec<(String, String)> =
                    url::form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                        .into_owned()
                        .collect();
                let param = |key: &str| {
                    query
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.clone())
                };
                match (method.as_str(), path) {
                    ("POST", "/batches") => {
                        let mut made = made.lock().unwrap();
                        let batch = json!({
                            "id": format!("batch_{name}_{}", made.len()),
                            "object": "batch",
                            "endpoint": "/chat/completions",
                            "status": "validating",
                            "output_file_id": format!("file-out-{name}-{}", made.len()),
                            "created_at": clock.fetch_add(1, Ordering::SeqCst),
                        });
                        made.push(batch.clone());
                        axum::Json(batch).into_response()
                    }
                    ("GET", "/batches") => {
                        lists.fetch_add(1, Ordering::SeqCst);
                        match fail.load(Ordering::SeqCst) {
                            0 => {}
                            429 => {
                                return (
                                    http::StatusCode::TOO_MANY_REQUESTS,
                                    [("retry-after-ms", "4000")],
                                    axum::Json(json!({"error": {"code": "429", "message": "Rate limit is exceeded."}})),
                                )
                                    .into_response();
                            }
                            status => {
                                return (
                                    http::StatusCode::from_u16(status).unwrap(),
                                    axum::Json(json!({"error": {"code": "invalid_request_error", "message": "Invalid value for 'limit'."}})),
                                )
                                    .into_response();
                            }
                        }
                        let limit: usize = param("limit").map_or(20, |l| l.parse().unwrap());
                        let newest_first: Vec<Value> =
                            made.lock().unwrap().iter().rev().cloned().collect();
                        let start = match param("after") {
                            Some(after) => {
                                match newest_first.iter().position(|b| b["id"] == after.as_str()) {
                                    Some(position) => position + 1,
                                    None => {
                                        return (
                                            http::StatusCode::NOT_FOUND,
                                            axum::Json(json!({"error": {"code": "not_found", "message": format!("No batch found with id '{after}'.")}})),
                                        )
                                            .into_response();
                                    }
                                }
                            }
                            None => 0,
                        };
                        let page: Vec<Value> =
                            newest_first.iter().skip(start).take(limit).cloned().collect();
                        axum::Json(json!({
                            "object": "list",
                            "first_id": page.first().map(|b| b["id"].clone()),
                            "last_id": page.last().map(|b| b["id"].clone()),
                            "has_more": start + page.len() < newest_first.len(),
                            "data": page,
                        }))
                        .into_response()
                    }
                    // The output files this member made: only it holds them.
                    ("GET", file)
                        if file.starts_with(&format!("/files/file-out-{name}-"))
                            && file.ends_with("/content") =>
                    {
                        "{\"id\": \"batch_req_1\"}\n".into_response()
                    }
                    ("GET", one) => {
                        let id = one.trim_start_matches("/batches/");
                        match made.lock().unwrap().iter().find(|b| b["id"] == id) {
                            Some(batch) => axum::Json(batch.clone()).into_response(),
                            None => http::StatusCode::NOT_FOUND.into_response(),
                        }
                    }
                    _ => http::StatusCode::NOT_FOUND.into_response(),
                }
            }
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    BatchMember {
        url,
        lists,
        fail,
        made,
    }
}

/// Two batch members sharing a clock, and a snapshot whose resource pool holds both.
async fn two_members() -> (
    BatchMember,
    BatchMember,
    gatehouse_schema::config::ConfigSnapshot,
) {
    let clock = Arc::new(AtomicI64::new(1_741_900_000));
    let a = batch_member("a", Arc::clone(&clock)).await;
    let b = batch_member("b", clock).await;
    let config = snapshot(
        1,
        json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true,
                "members": [member("a", &a.url, 1), member("b", &b.url, 1)]}]),
    );
    (a, b, config)
}

/// Makes batches through `gw` until there are at least `count` and both members hold some;
/// returns their ids, newest first.
async fn make_batches(gw: &TestGateway, count: usize) -> Vec<String> {
    let mut made = Vec::new();
    while made.len() < count
        || !made.iter().any(|id: &String| id.starts_with("batch_a_"))
        || !made.iter().any(|id: &String| id.starts_with("batch_b_"))
    {
        assert!(made.len() < 64, "64 batches, all on one member");
        made.push(make_batch(gw).await);
    }
    made.reverse();
    made
}

/// `GET` of a list page through `gw`: its status and body.
async fn list_page(gw: &TestGateway, query: &str) -> (u16, Value) {
    let answer = gw.get(&format!("{BATCHES}{query}")).send().await.unwrap();
    (answer.status().as_u16(), answer.json().await.unwrap())
}

/// The ids of a list page.
fn ids(page: &Value) -> Vec<String> {
    page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Pages through the list with `limit`, from `after` when given, as the SDKs do (`after` = the
/// page's last id while `has_more`): every id, in order.
async fn every_page(gw: &TestGateway, limit: usize, after: Option<String>) -> Vec<String> {
    let mut listed = Vec::new();
    let mut after = after;
    for _ in 0..100 {
        let query = match &after {
            Some(after) => format!("&limit={limit}&after={after}"),
            None => format!("&limit={limit}"),
        };
        let (status, page) = list_page(gw, &query).await;
        assert_eq!(status, 200, "{page}");
        let page_ids = ids(&page);
        assert!(page_ids.len() <= limit);
        assert_eq!(page["first_id"], json!(page_ids.first()));
        assert_eq!(page["last_id"], json!(page_ids.last()));
        listed.extend(page_ids);
        if page["has_more"] != true {
            return listed;
        }
        after = page["last_id"].as_str().map(str::to_owned);
    }
    panic!("100 pages and still more: {listed:?}");
}

/// A list of a pool of two members holds the batches of both, newest first, whole or page by
/// page; its record names the reads of both members.
#[tokio::test]
async fn a_list_holds_the_objects_of_every_member_of_the_pool() {
    let (a, b, config) = two_members().await;
    let gw = TestGateway::start(config).await;
    let made = make_batches(&gw, 7).await;

    let (status, whole) = list_page(&gw, "").await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(ids(&whole), made);
    assert_eq!(whole["has_more"], false);
    assert_eq!(whole["object"], "list");
    for limit in [1, 2, 3, 50] {
        assert_eq!(every_page(&gw, limit, None).await, made, "limit {limit}");
    }
    assert!(a.lists.load(Ordering::SeqCst) > 0 && b.lists.load(Ordering::SeqCst) > 0);

    let records = gw.records(made.len() + 1).await;
    let list = records
        .iter()
        .find(|record| record.operation_id == Some(gatehouse_schema::OperationId::BatchList))
        .unwrap();
    assert_eq!(list.response_code, 200);
    let asked: Vec<&str> = list
        .attempts
        .iter()
        .map(|attempt| attempt.backend_id.as_str())
        .collect();
    assert_eq!(asked, ["a", "b"]);
}

/// The output files of the batches a merged list names live on the member that ran each batch:
/// a list seen before any batch is fetched by id pins each file to its own member, not to the
/// member the merged page is relayed as coming from.
#[tokio::test]
async fn a_listed_batchs_output_file_is_read_from_the_member_that_made_it() {
    let (_a, _b, config) = two_members().await;
    let gw = TestGateway::start(config).await;
    let made = make_batches(&gw, 4).await;
    let (status, whole) = list_page(&gw, "").await;
    assert_eq!(status, 200, "{whole}");
    for batch in whole["data"].as_array().unwrap() {
        let file = batch["output_file_id"].as_str().unwrap();
        for _ in 0..6 {
            let content = gw
                .get(&format!(
                    "/openai/files/{file}/content?api-version=2024-10-21"
                ))
                .send()
                .await
                .unwrap();
            assert_eq!(content.status(), 200, "{file} of {}", batch["id"]);
        }
    }
    assert_eq!(whole["data"].as_array().unwrap().len(), made.len());
}

/// The next page's cursor placed again on a gateway that did not answer the page: the gateway
/// restarted (its object map kept, its cursors gone) goes on exactly where the page ended.
#[tokio::test]
async fn a_page_cursor_is_followed_after_a_restart() {
    let (_a, _b, config) = two_members().await;
    let gw = TestGateway::start(config.clone()).await;
    let made = make_batches(&gw, 9).await;
    let (status, first) = list_page(&gw, "&limit=4").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), made[..4]);
    let after = first["last_id"].as_str().unwrap().to_owned();
    let state_dir = Arc::clone(&gw.state_dir);
    gw.stop().await;

    let gw = TestGateway::start_in(config, state_dir).await;
    let rest = every_page(&gw, 2, Some(after)).await;
    assert_eq!(rest, made[4..]);
    // A cursor that names no object the gateway knows is refused, not guessed.
    let (status, refused) = list_page(&gw, "&after=batch_z_0").await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["param"], "after");
}

/// A member that cannot be read fails the whole list (503, with its wait when it gave one), and
/// a member's refusal is the answer.
#[tokio::test]
async fn a_list_is_answered_whole_or_not_at_all() {
    let (a, b, config) = two_members().await;
    let gw = TestGateway::start(config).await;
    make_batches(&gw, 2).await;

    b.fail.store(429, Ordering::SeqCst);
    let answer = gw.get(BATCHES).send().await.unwrap();
    assert_eq!(answer.status(), 503);
    assert!(answer.headers().contains_key("retry-after"));
    let body: Value = answer.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("several backends"),
        "{body}"
    );
    // Set aside for its wait: not asked again meanwhile, and the list still refused.
    let asked = b.lists.load(Ordering::SeqCst);
    assert_eq!(gw.get(BATCHES).send().await.unwrap().status(), 503);
    assert_eq!(b.lists.load(Ordering::SeqCst), asked);

    a.fail.store(400, Ordering::SeqCst);
    let (c, _d, config) = two_members().await;
    let mut value = serde_json::to_value(config).unwrap();
    value["pools"][0]["members"] = json!([member("a", &a.url, 1), member("c", &c.url, 1)]);
    value["version"] = json!(2);
    assert_eq!(gw.push_config(&value).await.status(), 200);
    let (status, refused) = list_page(&gw, "&limit=5").await;
    assert_eq!(status, 400, "{refused}");
    assert_eq!(refused["error"]["message"], "Invalid value for 'limit'.");
}

/// A batch made while a client pages through the list is newer than every page: it does not
/// turn up in the middle of the pages (a single member's list would not show it either), and a
/// member whose standing object is gone since the last page is placed again, so that no batch is
/// listed twice or skipped.
#[tokio::test]
async fn pages_stay_in_order_while_objects_come_and_go() {
    let (a, b, config) = two_members().await;
    let gw = TestGateway::start(config).await;
    let made = make_batches(&gw, 8).await;
    let (status, first) = list_page(&gw, "&limit=3").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(ids(&first), made[..3]);
    // Made now: newer than everything listed.
    let newer = make_batch(&gw).await;
    // The standing object of one member (its last batch on the page) is gone.
    let gone = ids(&first)[2].clone();
    let holder = if gone.starts_with("batch_a_") { &a } else { &b };
    holder
        .made
        .lock()
        .unwrap()
        .retain(|batch| batch["id"] != gone.as_str());
    let rest = every_page(&gw, 2, first["last_id"].as_str().map(str::to_owned)).await;
    assert_eq!(rest, made[3..], "made since: {newer}");
}

/// Makes one batch through `gw`; returns its id.
async fn make_batch(gw: &TestGateway) -> String {
    let created = gw
        .post(BATCHES)
        .json(&json!({"input_file_id": "file-1", "endpoint": "/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.unwrap();
    created["id"].as_str().unwrap().to_owned()
}

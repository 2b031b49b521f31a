//! Files and other stateful objects stay on the member that created them, across restarts.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::harness::*;

fn pool(a: &str, b: &str) -> serde_json::Value {
    json!([{"id": "p", "deployments": ["gpt-4o"], "serves_resources": true, "members": [member("a", a, 1), member("b", b, 1)]}])
}

async fn upload(gw: &TestGateway, content: &'static [u8]) -> String {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(content)
                .file_name("input.jsonl")
                .mime_str("application/jsonl")
                .unwrap(),
        );
    let response = gw
        .post("/openai/files?api-version=2024-10-21")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let file: Value = response.json().await.unwrap();
    file["id"].as_str().unwrap().to_owned()
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
        let id = upload(&gw, content).await;
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

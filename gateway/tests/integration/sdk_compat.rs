//! The official OpenAI Python SDK, in `AzureOpenAI` and `OpenAI` modes, against the gateway in
//! front of a pool of two simulator members (`tests/sdk/test_openai_sdk.py`).
//!
//! `scripts/test.sh` creates the Python environment and sets `GATEHOUSE_TEST_PYTHON`.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_through_the_gateway() {
    let python = std::env::var("GATEHOUSE_TEST_PYTHON").expect(
        "GATEHOUSE_TEST_PYTHON is not set: run scripts/test.sh, which installs the OpenAI SDK into .venv and sets it",
    );
    let east = simulator("sdk-east").await;
    let west = simulator("sdk-west").await;
    let gw = TestGateway::start(snapshot(
        1,
        json!([{
            "id": "pool",
            "deployments": ["gpt-4o", "text-embedding-3-small", "whisper", "gpt-4o-realtime"],
            "serves_resources": true,
            "members": [member("east", &east.url(), 1), member("west", &west.url(), 1)],
        }]),
    ))
    .await;
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk/test_openai_sdk.py");
    let output = tokio::process::Command::new(python)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .arg(&tests)
        .env("GATEHOUSE_URL", &gw.url)
        .env("GATEHOUSE_KEY", KEY)
        .env("GATEHOUSE_CHAT_DEPLOYMENT", "gpt-4o")
        .env("GATEHOUSE_EMBEDDING_DEPLOYMENT", "text-embedding-3-small")
        .env("GATEHOUSE_AUDIO_DEPLOYMENT", "whisper")
        .env("GATEHOUSE_REALTIME_DEPLOYMENT", "gpt-4o-realtime")
        .env("GATEHOUSE_EXPECT_AUTH", "1")
        .env("GATEHOUSE_STICKY_ROUNDS", "6")
        .stdin(Stdio::null())
        .output()
        .await
        .expect("python runs");
    let report = format!(
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "the SDK tests failed:\n{report}");
    assert!(
        !report.contains(" skipped"),
        "no SDK case may be skipped here:\n{report}"
    );
    assert!(
        east.hits() > 0 && west.hits() > 0,
        "both members served calls"
    );
}

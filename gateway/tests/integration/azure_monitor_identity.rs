//! The Azure Monitor audit sink signed in with the gateway's own identity
//! (`server.entra_credential`, here a managed identity) instead of an app registration's client
//! secret: the real gateway process, its real token client against the IMDS double, and the
//! sink's real uploads against a Logs Ingestion double.
//!
//! The Logs Ingestion double speaks the documented wire format (Logs Ingestion API,
//! <https://learn.microsoft.com/azure/azure-monitor/logs/logs-ingestion-api-overview>):
//! `POST /dataCollectionRules/{dcr}/streams/{stream}?api-version=2023-01-01` with
//! `Authorization: Bearer`, a JSON array (gzip when `Content-Encoding: gzip`), answered 204; 401
//! for a token the Entra double did not issue for Azure Monitor.

use std::io::Read as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde_json::{Value, json};

use crate::azure_identity_double::{EntraDouble, MI_CLIENT_ID, Proof};
use crate::harness::*;

/// What the Logs Ingestion double received, and whose tokens it takes.
struct Ingested {
    /// Tokens are accepted when this double issued them for Azure Monitor.
    entra: EntraDouble,
    /// (stream, row) of every row stored.
    rows: Mutex<Vec<(String, Value)>>,
}

/// Azure Monitor's resource as IMDS takes it: the scope without `/.default`.
const MONITOR_RESOURCE: &str = "https://monitor.azure.com";

async fn ingest(
    State(ingested): State<Arc<Ingested>>,
    Path((dcr, stream)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let for_monitor = ingested
        .entra
        .issued()
        .iter()
        .any(|(issued, resource)| issued == token && resource.starts_with(MONITOR_RESOURCE));
    if dcr != DCR || !for_monitor {
        return StatusCode::UNAUTHORIZED;
    }
    let json = if headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes() == b"gzip")
    {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut text)
            .unwrap();
        text
    } else {
        body.to_vec()
    };
    let Ok(Value::Array(rows)) = serde_json::from_slice::<Value>(&json) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut stored = ingested.rows.lock().unwrap();
    stored.extend(rows.into_iter().map(|row| (stream.clone(), row)));
    StatusCode::NO_CONTENT
}

/// The data collection rule's immutable id.
const DCR: &str = "dcr-00000000000000000000000000000000";

/// A gateway whose `audit.azure_monitor` names no credential signs in with its own managed
/// identity: its rows reach Logs Ingestion with a token IMDS issued for Azure Monitor, and no
/// client secret is needed anywhere.
#[tokio::test]
async fn the_azure_monitor_sink_signs_in_with_the_gateways_managed_identity() {
    // No app registration is known to the token endpoint: only the managed identity can sign in.
    let entra = EntraDouble::start(Proof::Secret("no-app-registration".to_owned()), 3600).await;
    let ingested = Arc::new(Ingested {
        entra: entra.clone(),
        rows: Mutex::default(),
    });
    let app = Router::new()
        .route("/dataCollectionRules/{dcr}/streams/{stream}", post(ingest))
        .with_state(Arc::clone(&ingested));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let monitor = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sim = simulator("monitor-identity").await;

    let gateway = GatewayProcess::start_with(
        "monitor-identity",
        &snapshot(
            1,
            json!([{"id": "p", "deployments": ["gpt-4o"], "members": [member("a", &sim.url(), 1)]}]),
        ),
        json!({
            "entra_credential": {
                "type": "managed_identity",
                "client_id": MI_CLIENT_ID,
                "endpoint": entra.imds_url(),
            },
            "audit": {"azure_monitor": {
                "endpoint": monitor,
                "dcr_immutable_id": DCR,
            }},
        }),
    )
    .await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let call = || async {
        let answer = client
            .post(format!("{}{}", gateway.url, chat_path("gpt-4o")))
            .header("api-key", KEY)
            .json(&chat(None, false))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        answer
            .headers()
            .get("x-gatehouse-correlation-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    };

    let arrived = |id: String| {
        let ingested = Arc::clone(&ingested);
        async move {
            for _ in 0..200 {
                let rows = ingested.rows.lock().unwrap().clone();
                if rows.iter().any(|(stream, row)| {
                    stream == "Custom-ApiManagementGatewayLogs_CL" && row["CorrelationId"] == id
                }) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            false
        }
    };
    for _ in 0..2 {
        let id = call().await;
        assert!(arrived(id).await, "the call's row arrived");
    }
    let tokens: Vec<String> = entra
        .issued()
        .into_iter()
        .filter(|(_, resource)| resource.starts_with(MONITOR_RESOURCE))
        .map(|(token, _)| token)
        .collect();
    assert_eq!(tokens.len(), 1, "one token, reused: {:?}", entra.issued());
    let log = gateway.terminate().await;
    assert!(!log.contains(&tokens[0]), "a token in the log:\n{log}");
}

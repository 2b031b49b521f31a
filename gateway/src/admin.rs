//! The admin endpoints (admin token required, as `Authorization: Bearer` or as a signature made
//! with it: [`gatehouse_schema::admin_signature`]): `PUT /_gatehouse/config` takes a whole
//! versioned snapshot; `GET /_gatehouse/backends` tells each pool member's state as this gateway
//! sees it.
//!
//! The snapshot is validated whole (422 naming the exact field, the running config untouched),
//! must be newer than the running one (409 otherwise), is written to the state directory as
//! last-known-good, and only then swapped in atomically.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::admin_signature;
use gatehouse_schema::backends::{BackendStates, MemberAvailability, MemberState};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::app::Gateway;
use crate::error::GatewayError;
use crate::pool::SetAsideReason;

/// Path of the config endpoint.
pub const CONFIG_PATH: &str = "/_gatehouse/config";
/// File name of the last-known-good snapshot in the state directory.
const LAST_KNOWN_GOOD: &str = "last-known-good.json";

/// How an admin request proved that its sender holds the admin token.
#[derive(Debug)]
enum Proof {
    /// `Authorization: Bearer` with the token itself (an operator's own client).
    Bearer,
    /// Signed with the token (the portal, [`admin_signature`]): the body must have this digest.
    Signed { content_sha256: String },
}

impl Proof {
    /// Checks a body read after a signature was: it must be the body that was signed.
    fn check_body(&self, body: &[u8]) -> Result<(), GatewayError> {
        match self {
            Proof::Signed { content_sha256 }
                if *content_sha256 != admin_signature::content_sha256(body) =>
            {
                Err(GatewayError::AdminSignatureRefused {
                    reason: format!(
                        "the body is not the one signed (its SHA-256 differs from {})",
                        admin_signature::CONTENT_SHA256_HEADER
                    ),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Checks the admin token of a request, before its body is read: as a bearer token, or as a
/// signature over the method, the path, the time and the body's claimed digest.
fn authorize(gateway: &Gateway, parts: &Parts) -> Result<Proof, GatewayError> {
    let Some(expected) = &gateway.admin_token else {
        return Err(GatewayError::AdminUnauthorized);
    };
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if let Some(signed) = admin_signature::Signed::parse(authorization) {
        let refused = |reason: String| GatewayError::AdminSignatureRefused { reason };
        let signed = signed
            .map_err(|_| refused("the signed Authorization header is malformed".to_owned()))?;
        let content_sha256 = parts
            .headers
            .get(admin_signature::CONTENT_SHA256_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                refused(format!(
                    "a signed request carries {}",
                    admin_signature::CONTENT_SHA256_HEADER
                ))
            })?
            .to_owned();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        return match signed.verify(
            expected.expose(),
            parts.method.as_str(),
            parts.uri.path(),
            &content_sha256,
            now,
        ) {
            Ok(()) => Ok(Proof::Signed { content_sha256 }),
            Err(admin_signature::Refusal::Skewed(skew)) => Err(refused(format!(
                "the signature's time is {} s {} the gateway's clock (at most {} s either way: check both clocks)",
                skew.unsigned_abs(),
                if skew < 0 { "behind" } else { "ahead of" },
                admin_signature::MAX_CLOCK_SKEW_SECONDS
            ))),
            Err(_) => Err(refused(
                "the signature does not match this gateway's admin token and this request"
                    .to_owned(),
            )),
        };
    }
    if gateway.admin_signed_only {
        return Err(GatewayError::AdminSignatureRefused {
            reason: "this gateway takes only admin requests signed with its admin token (server.admin_signed_only), not the token itself".to_owned(),
        });
    }
    let presented = authorization.strip_prefix("Bearer ").unwrap_or("");
    let matches: bool = presented
        .as_bytes()
        .ct_eq(expected.expose().as_bytes())
        .into();
    if matches {
        Ok(Proof::Bearer)
    } else {
        Err(GatewayError::AdminUnauthorized)
    }
}

/// Checks the admin token of a body-less request: a signature must be over an empty body.
fn authorize_read(gateway: &Gateway, request: Request) -> Result<(), GatewayError> {
    let (parts, _body) = request.into_parts();
    authorize(gateway, &parts)?.check_body(b"")
}

/// `GET /_gatehouse/config`: the running snapshot (it holds key hashes and secret references only).
pub async fn get_config(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    if let Err(error) = authorize_read(&gateway, request) {
        return error.into_response();
    }
    axum::Json(&gateway.runtime().snapshot).into_response()
}

/// `GET /_gatehouse/backends`: every pool member of the running snapshot, available or set aside
/// (throttled or failing) and until when.
pub async fn get_backends(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    if let Err(error) = authorize_read(&gateway, request) {
        return error.into_response();
    }
    let runtime = gateway.runtime();
    let now = std::time::Instant::now();
    let wall = time::OffsetDateTime::now_utc();
    let members = runtime
        .pools
        .iter()
        .flat_map(|pool| {
            pool.members.iter().map(|member| {
                let (state, set_aside_until) = match member.health.set_aside_state(now) {
                    None => (MemberAvailability::Available, None),
                    Some((reason, wait)) => (
                        match reason {
                            SetAsideReason::Throttled => MemberAvailability::Throttled,
                            SetAsideReason::Failing => MemberAvailability::Failing,
                        },
                        Some(wall + wait),
                    ),
                };
                MemberState {
                    pool: pool.id.clone(),
                    member: member.config.id.clone(),
                    state,
                    set_aside_until,
                }
            })
        })
        .collect();
    axum::Json(BackendStates {
        gateway: gateway.id.clone(),
        version: runtime.snapshot.version,
        members,
    })
    .into_response()
}

/// The largest snapshot `PUT /_gatehouse/config` takes: room for tens of thousands of
/// subscriptions (≈ 300 bytes each), where axum's default of 2 MiB held about 7,000.
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// `PUT /_gatehouse/config`: replace the running snapshot with a newer, valid one.
///
/// The admin token is checked before the body is read, and the body is read as a call's is: at
/// most [`MAX_SNAPSHOT_BYTES`], with no pause longer than the request body timeout, so that a
/// client without the token can hold neither memory nor the connection with it.
pub async fn put_config(State(gateway): State<Arc<Gateway>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let proof = match authorize(&gateway, &parts) {
        Ok(proof) => proof,
        Err(error) => {
            crate::app::linger(body).await;
            return error.into_response();
        }
    };
    let body = match crate::app::read_body(
        &parts,
        body,
        MAX_SNAPSHOT_BYTES as u64,
        gateway.client_timeouts.request_body,
    )
    .await
    {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    if let Err(error) = proof.check_body(&body) {
        return error.into_response();
    }
    // Applied on a task of its own: should the client leave while the snapshot is built or
    // saved, the request's future is dropped, and an apply dropped there would leave the
    // last-known-good file newer than the running snapshot, or the secrets it read half taken
    // up. On its task it runs to its end, whole or not at all, holding the write lock until then.
    let applying = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { apply(&gateway, &parts.headers, &body).await })
    };
    match applying.await {
        Ok(Ok(version)) => (
            StatusCode::OK,
            axum::Json(json!({"version": version, "status": "applied"})),
        )
            .into_response(),
        Ok(Err(error)) => error.into_response(),
        Err(error) => {
            tracing::error!(%error, "applying a configuration failed");
            GatewayError::Internal.into_response()
        }
    }
}

/// Applies a snapshot pushed by a caller already authorized.
async fn apply(gateway: &Gateway, headers: &HeaderMap, body: &[u8]) -> Result<u64, GatewayError> {
    let is_yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"));
    let snapshot =
        parse_snapshot(body, is_yaml).map_err(|message| GatewayError::InvalidConfig { message })?;
    // One write at a time, so that version checks and the file agree.
    let _guard = gateway.config_writes.lock().await;
    let current = gateway.runtime();
    let running = current.snapshot.version;
    if snapshot.version <= running {
        return Err(GatewayError::StaleConfig {
            offered: snapshot.version,
            running,
            same_content: snapshot == current.snapshot,
        });
    }
    drop(current);
    let version = snapshot.version;
    let (runtime, checkpoint) =
        gateway
            .prepare(snapshot.clone())
            .await
            .map_err(|errors| GatewayError::InvalidConfig {
                message: errors.to_string(),
            })?;
    if let Err(error) = save_last_known_good(&gateway.state_dir, &snapshot).await {
        tracing::error!(%error, "could not persist the configuration; keeping the running one");
        gateway.abandon(checkpoint);
        return Err(GatewayError::Internal);
    }
    gateway.install(runtime);
    tracing::info!(version, "configuration applied");
    Ok(version)
}

fn parse_snapshot(body: &[u8], is_yaml: bool) -> Result<ConfigSnapshot, String> {
    let result = if is_yaml {
        let text = std::str::from_utf8(body).map_err(|_| "the body is not UTF-8".to_owned())?;
        serde_path_to_error::deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
    } else {
        let mut deserializer = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut deserializer)
            .map_err(|e| (e.path().to_string(), e.into_inner().to_string()))
            .and_then(|snapshot| {
                // Whatever follows the snapshot (a second one, stray text) is refused, not
                // ignored: the body is one snapshot.
                deserializer
                    .end()
                    .map(|()| snapshot)
                    .map_err(|e| (".".to_owned(), e.to_string()))
            })
    };
    result.map_err(|(path, message)| format!("{path}: {message}"))
}

/// The last-known-good snapshot of a previous run, as read at start.
#[derive(Debug)]
pub enum LastKnownGood {
    /// None was saved.
    None,
    /// The saved snapshot.
    Saved(Box<ConfigSnapshot>),
    /// A file is there but holds no snapshot this gateway reads (a gateway of an older version
    /// started on a newer one's file, an edit by hand): its `version`, when even that can be
    /// read. The file is left in place.
    Unreadable(Option<u64>),
}

/// Reads the last-known-good snapshot of a previous run, if any. One that cannot be read is
/// logged as an error (it may be newer than the file the gateway starts on, with keys revoked
/// since that file was written).
pub async fn load_last_known_good(state_dir: &Path) -> anyhow::Result<LastKnownGood> {
    let path = state_dir.join(LAST_KNOWN_GOOD);
    match tokio::fs::read(&path).await {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(snapshot) => Ok(LastKnownGood::Saved(Box::new(snapshot))),
            Err(error) => {
                let version = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|saved| saved.get("version").and_then(serde_json::Value::as_u64));
                tracing::error!(
                    path = %path.display(),
                    version,
                    %error,
                    "the last-known-good configuration cannot be read; starting on the \
                     configuration file's snapshot (the last-known-good file is kept)"
                );
                Ok(LastKnownGood::Unreadable(version))
            }
        },
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(LastKnownGood::None),
        Err(error) => Err(anyhow::Error::new(error).context(format!(
            "cannot read the last-known-good configuration {}",
            path.display()
        ))),
    }
}

async fn save_last_known_good(state_dir: &Path, snapshot: &ConfigSnapshot) -> std::io::Result<()> {
    tokio::fs::create_dir_all(state_dir).await?;
    let path = state_dir.join(LAST_KNOWN_GOOD);
    let bytes = serde_json::to_vec_pretty(snapshot).map_err(std::io::Error::other)?;
    // Synced, renamed and the directory synced: a power loss right after the push cannot bring
    // back the snapshot before it.
    tokio::task::spawn_blocking(move || gatehouse_audit::write_atomic(&path, &bytes))
        .await
        .map_err(std::io::Error::other)?
}

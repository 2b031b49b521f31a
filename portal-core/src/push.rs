//! Publishing: every change becomes a new versioned snapshot, pushed to every registered
//! gateway's `PUT /_gatehouse/config`. A gateway that could not take it (down, refusing) keeps
//! its old version, the failure is recorded, and [`Publisher::spawn_catch_up`] pushes the
//! current version again until it does. A change that was saved but not published (its publish
//! failed) is published by the next catch-up or *Push now*: they publish a new version whenever
//! the configuration tables no longer make the newest stored one. A gateway that came back on an
//! older version than it was pushed (restarted with an empty state directory) is noticed by the
//! version it says it runs ([`note_running`]) and pushed the current version again.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_schema::admin_signature;
use gatehouse_schema::config::SecretRef;
use reqwest::StatusCode;
use serde::Serialize;
use tokio::sync::Mutex;
use url::Url;

use gatehouse_schema::ConfigSnapshot;

use crate::db::{ConfigDb, GatewayRow, SnapshotVersionRow};
use crate::error::PortalError;
use crate::health::gateway_backends;
use crate::secret::AdminTokenRefs;
use crate::snapshot;

/// The gateway's config endpoint, as path segments under its base URL.
const CONFIG_PATH_SEGMENTS: [&str; 2] = ["_gatehouse", "config"];

/// How often a publish builds again when other portal replicas took its version number.
const MAX_PUBLISH_ATTEMPTS: u32 = 8;

/// Longest part of a gateway's error answer kept in the database.
const MAX_ERROR_CHARS: usize = 300;

/// Who the catch-up task publishes a saved but unpublished change as.
const CATCH_UP_ACTOR: &str = "portal (unpublished changes)";

/// How the reason of a push that did not reach the gateway starts.
const UNREACHABLE: &str = "unreachable: ";

/// What happened when one gateway was offered one version.
#[derive(Debug, Clone, PartialEq)]
pub struct PushOutcome {
    /// The gateway's id.
    pub gateway: String,
    /// `Ok` when it runs the version now; the reason otherwise.
    pub result: Result<u64, String>,
    /// The version it ran before it was offered this one, as far as the portal knows.
    pub running_before: Option<u64>,
}

/// A gateway that did not take a published version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotTaken {
    /// The gateway's id.
    pub gateway: String,
    /// Why: the gateway's refusal (its answer, cut to 300 characters) or why it was not reached.
    /// Gateways' answers name secret references, never secret values.
    pub reason: String,
    /// The version it keeps running, as far as the portal knows.
    pub running: Option<u64>,
}

impl NotTaken {
    /// Whether the gateway was not reached (rather than refusing the version).
    pub fn unreachable(&self) -> bool {
        self.reason.starts_with(UNREACHABLE)
    }
}

/// What a change published: its version, and the gateways that did not take it (each is
/// offered the current version again by [`Publisher::spawn_catch_up`]); or, when the change was
/// saved but its publish failed, why (the catch-up publishes it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Published {
    /// The version the change was published as; 0 when it was not published.
    pub version: u64,
    /// The gateways that did not take it, and why.
    pub not_taken: Vec<NotTaken>,
    /// Why the change, saved, was not published (a message for the page): it reaches the
    /// gateways with the next *Push now* or catch-up.
    pub not_published: Option<String>,
}

/// When [`Publisher::publish_when`] stores a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PublishWhen {
    /// Always (a change was just saved).
    Always,
    /// Only when the tables make another snapshot than the newest stored one.
    Changed,
}

/// Builds, stores and pushes snapshots. One publish at a time, so versions are consecutive.
#[derive(Debug)]
pub struct Publisher {
    db: ConfigDb,
    http: reqwest::Client,
    admin_token_refs: AdminTokenRefs,
    writing: Mutex<()>,
}

impl Publisher {
    /// A publisher on `db`, pushing with a client that times out after `timeout`.
    pub fn new(db: ConfigDb, timeout: Duration) -> Result<Publisher, PortalError> {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|error| PortalError::Corrupt(format!("HTTP client: {error}")))?;
        Ok(Publisher {
            db,
            http,
            admin_token_refs: AdminTokenRefs::default(),
            writing: Mutex::new(()),
        })
    }

    /// This publisher, reading gateway admin tokens only from the references `refs` allows
    /// (without it: [`AdminTokenRefs::default`]).
    pub fn with_admin_token_refs(mut self, refs: AdminTokenRefs) -> Publisher {
        self.admin_token_refs = refs;
        self
    }

    /// The references gateway admin tokens may be read from.
    pub fn admin_token_refs(&self) -> &AdminTokenRefs {
        &self.admin_token_refs
    }

    /// Builds the next version from the database, stores it and pushes it to every gateway.
    ///
    /// Portal replicas on one database may publish at the same moment: each builds the version
    /// after the newest stored one, and the one that finds its number taken builds again from
    /// the database as it is then, which holds both changes (each was committed before its
    /// publish began). So every committed change reaches a stored version.
    pub async fn publish(&self, actor: &str) -> Result<(u64, Vec<PushOutcome>), PortalError> {
        let (version, outcomes) = self.publish_when(actor, PublishWhen::Always).await?;
        Ok((version.unwrap_or_default(), outcomes))
    }

    /// Publishes a new version when the configuration tables changed since the newest stored one
    /// was built (a change was saved but its publish failed), or when none is stored and a
    /// gateway is registered; else pushes the newest stored version to the gateways that lag.
    /// *Push now* and the catch-up task call it, so that a saved change always reaches the
    /// gateways. A failed publish is returned after the stored version was pushed.
    pub async fn catch_up(&self, actor: &str) -> Result<Vec<PushOutcome>, PortalError> {
        match self.publish_when(actor, PublishWhen::Changed).await {
            Ok((_, outcomes)) => Ok(outcomes),
            Err(error) => {
                if let Err(push) = self.push_current().await {
                    tracing::warn!(error = %push, "push of the current version failed");
                }
                Err(error)
            }
        }
    }

    /// Builds the next version, stores it and pushes it (with `Changed`, only when it differs
    /// from the newest stored one; else the stored one is pushed); the version stored, if any.
    async fn publish_when(
        &self,
        actor: &str,
        when: PublishWhen,
    ) -> Result<(Option<u64>, Vec<PushOutcome>), PortalError> {
        let version = {
            let _writing = self.writing.lock().await;
            let mut attempts = 0;
            loop {
                let latest = self.db.latest_snapshot().await?;
                let version = latest
                    .as_ref()
                    .map_or(0, |row| u64::try_from(row.version).unwrap_or(0))
                    + 1;
                let built = snapshot::build(&self.db, version).await?;
                if when == PublishWhen::Changed
                    && !self.unpublished(latest.as_ref(), &built).await?
                {
                    break None;
                }
                // Every change the portal makes is checked before it is stored; this catches
                // what was written around it (by hand, or by an older portal), so that no
                // version a gateway would refuse is stored and pushed.
                snapshot::refuse(
                    "the configuration database makes a configuration gateways refuse, so nothing was published",
                    &gatehouse_schema::validate::problems(&built),
                )?;
                let text = serde_json::to_string(&built)
                    .map_err(|error| PortalError::Corrupt(format!("snapshot: {error}")))?;
                let stored = self
                    .db
                    .insert_snapshot(i64::try_from(version).unwrap_or(i64::MAX), &text, actor)
                    .await?;
                if stored {
                    break Some(version);
                }
                attempts += 1;
                if attempts == MAX_PUBLISH_ATTEMPTS {
                    return Err(PortalError::invalid(
                        "version",
                        format!(
                            "the next version number was taken {MAX_PUBLISH_ATTEMPTS} times by other portal replicas publishing at once"
                        ),
                    ));
                }
                tracing::info!(
                    version,
                    "version taken by another portal replica; building again"
                );
            }
        };
        if let Some(version) = version {
            tracing::info!(version, actor, "configuration published");
        }
        Ok((version, self.push_current().await?))
    }

    /// Whether `built` (the next version) holds what `latest` (the newest stored version) does
    /// not: a change was saved and not published. With no version stored, whether there is a
    /// gateway to publish to.
    async fn unpublished(
        &self,
        latest: Option<&SnapshotVersionRow>,
        built: &ConfigSnapshot,
    ) -> Result<bool, PortalError> {
        let Some(latest) = latest else {
            return Ok(!self.db.gateways().await?.is_empty());
        };
        let mut built = serde_json::to_value(built)
            .map_err(|error| PortalError::Corrupt(format!("snapshot: {error}")))?;
        built["version"] = serde_json::json!(latest.version);
        // A stored version this portal cannot read is replaced by one it built.
        let stored: Option<serde_json::Value> = serde_json::from_str(&latest.snapshot).ok();
        Ok(stored.as_ref() != Some(&built))
    }

    /// Publishes the change `actor` made, which is saved ([`Publisher::publish`]), and reports,
    /// for the form it was made in, its version and the gateways that did not take it; or, when
    /// the publish failed, why, so that the form still shows what the change returned (a new
    /// key). The change is published by the next [`Publisher::catch_up`].
    pub async fn publish_change(&self, actor: &str) -> Published {
        let (version, outcomes) = match self.publish(actor).await {
            Ok(published) => published,
            Err(error) => {
                tracing::warn!(%error, actor, "a saved change was not published");
                return Published {
                    not_published: Some(format!(
                        "Saved, but not published: {}. It reaches the gateways with the next push (Push now on the Gateways page, or the portal's retry).",
                        error.public_message()
                    )),
                    ..Published::default()
                };
            }
        };
        let not_taken = outcomes
            .into_iter()
            .filter_map(|outcome| match outcome.result {
                Ok(_) => None,
                Err(reason) => Some(NotTaken {
                    gateway: outcome.gateway,
                    reason,
                    running: outcome.running_before,
                }),
            })
            .collect();
        Published {
            version,
            not_taken,
            not_published: None,
        }
    }

    /// Pushes the newest stored version to every gateway that does not run it yet: those the
    /// portal has not pushed it to, and those it has that say they run an older one (asked with
    /// `GET /_gatehouse/backends`: they restarted without it).
    pub async fn push_current(&self) -> Result<Vec<PushOutcome>, PortalError> {
        let Some(latest) = self.db.latest_snapshot().await? else {
            return Ok(Vec::new());
        };
        let mut outcomes = Vec::new();
        for mut gateway in self.db.gateways().await? {
            if gateway.pushed_version.is_some_and(|v| v >= latest.version) {
                // Pushed already: current, unless it came back on an older version.
                match self.restarted_behind(&gateway).await? {
                    Some(running) => gateway.pushed_version = Some(running),
                    None => continue,
                }
            }
            let version = u64::try_from(latest.version).unwrap_or(0);
            let result = self.push_to(&gateway, &latest.snapshot, version).await;
            match &result {
                Ok(()) => {
                    self.db
                        .record_push(&gateway.id, Some(latest.version), None)
                        .await?
                }
                Err(error) => {
                    tracing::warn!(gateway = %gateway.id, version, %error, "push failed; will retry");
                    self.db.record_push(&gateway.id, None, Some(error)).await?
                }
            }
            outcomes.push(PushOutcome {
                gateway: gateway.id,
                result: result.map(|()| version),
                running_before: gateway.pushed_version.and_then(|v| u64::try_from(v).ok()),
            });
        }
        Ok(outcomes)
    }

    /// The version `gateway`, recorded as pushed a version, says it runs when that is older
    /// (it restarted without it), which is then recorded ([`note_running`]); `None` when it runs
    /// the version recorded or a newer one, or could not be asked (a push would not reach it).
    async fn restarted_behind(&self, gateway: &GatewayRow) -> Result<Option<i64>, PortalError> {
        match gateway_backends(&self.http, &self.admin_token_refs, gateway).await {
            Ok(states) => note_running(&self.db, gateway, states.version).await,
            Err(why) => {
                tracing::debug!(gateway = %gateway.id, %why, "could not ask which version the gateway runs");
                Ok(None)
            }
        }
    }

    /// The HTTP client the publisher talks to gateways with.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Offers `snapshot_json`, which is version `version`, to `gateway`.
    async fn push_to(
        &self,
        gateway: &GatewayRow,
        snapshot_json: &str,
        version: u64,
    ) -> Result<(), String> {
        let (url, token) =
            admin_endpoint(gateway, &CONFIG_PATH_SEGMENTS, &self.admin_token_refs).await?;
        let request = signed(
            self.http.put(url),
            &token,
            &reqwest::Method::PUT,
            &CONFIG_PATH_SEGMENTS,
            snapshot_json.as_bytes(),
        );
        let response = request
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(snapshot_json.to_owned())
            .send()
            .await
            .map_err(|error| format!("{UNREACHABLE}{}", without_url(&error)))?;
        let status = response.status();
        if status == StatusCode::OK {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        // Refused as not newer than what it runs, and it runs this very version: the push was
        // applied before (its answer was lost, or the gateway was registered again) — unless
        // the gateway says it runs other content under that number (its configuration file's
        // own snapshot, started at `version: 1`), which the portal's version never reached.
        if status == StatusCode::CONFLICT
            && let Ok(refusal) = serde_json::from_str::<serde_json::Value>(&body)
            && refusal.get("runningVersion").and_then(|v| v.as_u64()) == Some(version)
        {
            if refusal.get("sameContent").and_then(|v| v.as_bool()) == Some(false) {
                return Err(format!(
                    "the gateway runs another configuration under version {version} (its \
                     configuration file's snapshot, or another portal's): start it on a file \
                     snapshot with `version: 0`, or publish a new version"
                ));
            }
            return Ok(());
        }
        let body: String = body.chars().take(MAX_ERROR_CHARS).collect();
        Err(format!("refused with {status}: {body}"))
    }

    /// Every `every`, publishes what was saved and not published, and pushes the current
    /// version to the gateways that lag ([`Publisher::catch_up`]).
    pub fn spawn_catch_up(self: Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = self.catch_up(CATCH_UP_ACTOR).await {
                    tracing::warn!(%error, "catch-up push failed");
                }
            }
        })
    }
}

/// Signs a request to a gateway's admin endpoint with its admin token, so that the token itself
/// never leaves the portal ([`gatehouse_schema::admin_signature`]): `segments` name the endpoint's
/// path on the gateway, `body` what is sent.
pub fn signed(
    request: reqwest::RequestBuilder,
    token: &str,
    method: &reqwest::Method,
    segments: &[&str],
    body: &[u8],
) -> reqwest::RequestBuilder {
    let path: String = segments
        .iter()
        .map(|segment| format!("/{segment}"))
        .collect();
    let content_sha256 = admin_signature::content_sha256(body);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    request
        .header(
            reqwest::header::AUTHORIZATION,
            admin_signature::authorization(token, method.as_str(), &path, now, &content_sha256),
        )
        .header(admin_signature::CONTENT_SHA256_HEADER, content_sha256)
}

/// The URL of one of a gateway's admin endpoints (path segments under its base URL) and its
/// admin token, read from the token's secret reference if `refs` allows it, and the URL's
/// transport too ([`AdminTokenRefs::check_gateway_url`]).
pub async fn admin_endpoint(
    gateway: &GatewayRow,
    segments: &[&str],
    refs: &AdminTokenRefs,
) -> Result<(Url, String), String> {
    let reference = SecretRef::try_from(gateway.admin_token_ref.clone())
        .map_err(|_| "the admin token reference is not a secret reference".to_owned())?;
    let mut url = Url::parse(&gateway.url).map_err(|error| format!("gateway URL: {error}"))?;
    // Also for a row written before the policy: nothing is signed for a URL it refuses.
    refs.check_gateway_url(&url)?;
    let token = refs.resolve(&reference).await?;
    url.path_segments_mut()
        .map_err(|()| "gateway URL cannot have a path".to_owned())?
        .pop_if_empty()
        .extend(segments);
    Ok((url, token))
}

/// Notes that `gateway` says it runs version `running` (its `GET /_gatehouse/backends`). When
/// that is older than the version recorded as pushed to it, the gateway came back without it (an
/// empty state directory, a last-known-good it could not load): the record is lowered to it, so
/// that the Gateways page shows the lag and the next push (the catch-up, *Push now*) sends it the
/// current version. Returns the version recorded now when it was lowered.
pub async fn note_running(
    db: &ConfigDb,
    gateway: &GatewayRow,
    running: u64,
) -> Result<Option<i64>, PortalError> {
    let running = i64::try_from(running).unwrap_or(i64::MAX);
    if gateway
        .pushed_version
        .is_none_or(|pushed| pushed <= running)
        || !db
            .record_running_version(&gateway.id, &gateway.url, running)
            .await?
    {
        return Ok(None);
    }
    tracing::warn!(
        gateway = %gateway.id,
        running,
        pushed = gateway.pushed_version,
        "the gateway runs an older version than it was pushed (it restarted without it); it is pushed the current one again"
    );
    Ok(Some(running))
}

/// A reqwest error without the URL it names (the page shows the URL beside it already).
pub fn without_url(error: &reqwest::Error) -> String {
    // The URL is shown beside the error already; reqwest's message repeats it.
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "the gateway");
    }
    text
}

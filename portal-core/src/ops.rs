//! Everything the portal's pages can do. Each operation takes the signed-in user and checks the
//! role first; every change writes the activity log (in the same transaction) and publishes a new
//! snapshot to the gateways.

use std::sync::Arc;

use gatehouse_schema::config::SecretRef;
use gatehouse_schema::keys::{generate_key, hash_key};
use gatehouse_schema::portal::Role;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, Time};

use crate::db::{ActivityRow, ConfigDb, GatewayRow, NewActivity, SubscriptionRow};
use crate::error::{Edited, PortalError};
use crate::push::{Published, Publisher, PushOutcome};
use crate::user::{SessionLifetime, SessionUser, require};

/// How often a subscription change is read and written again when another change got there
/// first.
const CHANGE_ATTEMPTS: usize = 5;

/// How the portal runs, as the pages need to know it.
#[derive(Debug, Clone, Default)]
pub struct PortalSettings {
    /// Whether the development sign-in is on (the pages show a banner).
    pub dev_sign_in: bool,
    /// How long a signed-in session lasts: unused, and at most.
    pub sessions: SessionLifetime,
    /// How long the previous key stays valid after a rotation; `None`: until *Retire previous
    /// key*.
    pub rotation_overlap: Option<time::Duration>,
}

/// The portal's state: database, publisher and settings.
#[derive(Debug, Clone)]
pub struct Portal {
    /// The config database.
    pub db: ConfigDb,
    /// Publishes snapshots to the gateways.
    pub publisher: Arc<Publisher>,
    /// How the portal runs.
    pub settings: PortalSettings,
}

/// What a new subscription needs.
#[derive(Debug, Clone, Default)]
pub struct NewSubscription {
    /// Stable id (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// Human-readable name.
    pub display_name: String,
    /// Team or group the keys are for.
    pub product: String,
    /// Expiry date `YYYY-MM-DD` (end of that day, UTC), or empty.
    pub expires_on: String,
}

/// A key just generated: shown once, never stored.
#[derive(Clone, PartialEq, Serialize)]
pub struct IssuedKey {
    /// The subscription.
    pub subscription: String,
    /// The key itself.
    pub key: String,
    /// What the change was published as, with the gateways that did not take it; or why it was
    /// saved and not published (the key works once the catch-up publishes it).
    pub published: Published,
}

impl std::fmt::Debug for IssuedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedKey")
            .field("subscription", &self.subscription)
            .field("key", &"*****")
            .finish()
    }
}

/// Counts for the overview page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    /// Subscriptions, active ones.
    pub subscriptions: usize,
    /// Access rules.
    pub access_rules: usize,
    /// Backend pools.
    pub pools: usize,
    /// Registered gateways.
    pub gateways: usize,
    /// Gateways not running the newest version.
    pub lagging_gateways: usize,
    /// The newest published version.
    pub current_version: Option<i64>,
}

/// An id: 1–64 of letters, digits, `.`, `_`, `-`.
pub(crate) fn valid_id(field: &'static str, id: &str) -> Result<(), PortalError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(PortalError::invalid(
            field,
            "use 1 to 64 letters, digits, dots, underscores or hyphens",
        ))
    }
}

/// Refuses a form's free text with a control character in it (a NUL, which PostgreSQL's text
/// columns refuse, a line break or an escape that would garble a page, the activity log or a
/// pushed snapshot): a clear 422 naming `field`, not a database error.
pub(crate) fn plain_text(field: &'static str, text: &str) -> Result<(), PortalError> {
    if text.chars().any(char::is_control) {
        return Err(PortalError::invalid(
            field,
            "text without control characters (line breaks, tabs, NUL)",
        ));
    }
    Ok(())
}

/// A gateway's id and base URL as given to the Gateways page or the portal's `--gateway`
/// option, checked: the id as every id, the URL an `http://` or `https://` URL with a host and
/// without credentials (`https://user:password@…`, refused as a pool member's endpoint with
/// them is; the message does not repeat them). Returns the id trimmed and the URL parsed (as it
/// is stored).
pub fn checked_gateway(id: &str, url: &str) -> Result<(String, url::Url), PortalError> {
    let id = id.trim();
    valid_id("id", id)?;
    let parsed = url::Url::parse(url.trim())
        .map_err(|_| PortalError::invalid("url", "an http:// or https:// URL"))?;
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.has_host() {
        return Err(PortalError::invalid("url", "an http:// or https:// URL"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(PortalError::invalid(
            "url",
            "no credentials in the URL: give the gateway's admin token as a secret reference",
        ));
    }
    Ok((id.to_owned(), parsed))
}

fn expiry(text: &str) -> Result<Option<OffsetDateTime>, PortalError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = Date::parse(text, format)
        .map_err(|_| PortalError::invalid("expires_on", "a date as YYYY-MM-DD"))?;
    let at = date.with_time(Time::MAX).assume_utc();
    if at <= OffsetDateTime::now_utc() {
        return Err(PortalError::invalid("expires_on", "a date in the future"));
    }
    Ok(Some(at))
}

pub(crate) fn json_of<T: Serialize>(value: &T) -> Option<String> {
    serde_json::to_string(value).ok()
}

/// A subscription as the activity log keeps it: its key hashes shortened to a fingerprint
/// (`sha256:` and 8 hex digits), which shows a rotation without handing the hash to every
/// Auditor who reads the log.
fn subscription_activity(row: &SubscriptionRow) -> Option<String> {
    let fingerprint = |hash: &str| format!("{}…", hash.get(.."sha256:".len() + 8).unwrap_or(hash));
    let mut value = serde_json::to_value(row).ok()?;
    for field in ["primary_key_hash", "secondary_key_hash"] {
        if let Some(hash) = value.get(field).and_then(serde_json::Value::as_str) {
            value[field] = serde_json::Value::String(fingerprint(hash));
        }
    }
    json_of(&value)
}

/// A row's version (its `updated_at`) as an edit form carries it: RFC 3339 with every digit, so
/// that it reads back as the same instant, in the offset it was read in.
pub fn version_text(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// The version a form sent back, as [`version_text`] wrote it; `None` when it carries none.
pub(crate) fn read_version(text: &str) -> Result<Option<OffsetDateTime>, PortalError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    OffsetDateTime::parse(text, &Rfc3339)
        .map(Some)
        .map_err(|_| {
            PortalError::invalid(
                "version",
                "the form carries a version this portal did not write: reload the page and apply your change again",
            )
        })
}

/// The version a form that changes or deletes an existing item must carry.
pub(crate) fn required_version(text: &str) -> Result<OffsetDateTime, PortalError> {
    read_version(text)?.ok_or_else(|| {
        PortalError::invalid(
            "version",
            "the form carries no version of what it changes (opened before an upgrade of the portal?): reload the page and apply your change again",
        )
    })
}

/// Refuses a change made from a form opened on version `read_at` of an item whose version is now
/// `current` (`None`: gone). Checked before the write, so that the refusal costs nothing; the
/// write checks again in its transaction.
pub(crate) fn check_version(
    what: Edited,
    current: Option<OffsetDateTime>,
    read_at: OffsetDateTime,
) -> Result<(), PortalError> {
    if current == Some(read_at) {
        Ok(())
    } else {
        Err(PortalError::Conflict {
            what,
            changed_at: current,
        })
    }
}

impl Portal {
    /// Counts for the overview: any signed-in role.
    pub async fn overview(&self, user: Option<&SessionUser>) -> Result<Overview, PortalError> {
        require(user, &Role::ALL)?;
        let gateways = self.db.gateways().await?;
        let current_version = self.db.latest_snapshot().await?.map(|row| row.version);
        Ok(Overview {
            subscriptions: self.db.subscriptions().await?.len(),
            access_rules: self.db.access_rules().await?.len(),
            pools: self.db.pools().await?.len(),
            lagging_gateways: gateways
                .iter()
                .filter(|g| current_version.is_some_and(|v| g.pushed_version.unwrap_or(0) < v))
                .count(),
            gateways: gateways.len(),
            current_version,
        })
    }

    /// Every subscription (key hashes only): Admin.
    pub async fn subscriptions(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<SubscriptionRow>, PortalError> {
        require(user, &[Role::Admin])?;
        self.db.subscriptions().await
    }

    /// Creates a subscription with a new primary key, returned once: Admin.
    pub async fn create_subscription(
        &self,
        user: Option<&SessionUser>,
        input: NewSubscription,
    ) -> Result<IssuedKey, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let id = input.id.trim().to_owned();
        valid_id("id", &id)?;
        let display_name = input.display_name.trim().to_owned();
        if display_name.is_empty() || display_name.chars().count() > 200 {
            return Err(PortalError::invalid(
                "display_name",
                "a name of 1 to 200 characters",
            ));
        }
        plain_text("display_name", &display_name)?;
        let product = Some(input.product.trim().to_owned()).filter(|p| !p.is_empty());
        if product.as_ref().is_some_and(|p| p.chars().count() > 200) {
            return Err(PortalError::invalid("product", "at most 200 characters"));
        }
        plain_text("product", product.as_deref().unwrap_or_default())?;
        let expires_at = expiry(&input.expires_on)?;
        let key = generate_key();
        let now = OffsetDateTime::now_utc();
        let row = SubscriptionRow {
            id: id.clone(),
            display_name,
            product,
            primary_key_hash: hash_key(&key).to_string(),
            secondary_key_hash: None,
            secondary_expires_at: None,
            state: "active".to_owned(),
            expires_at,
            created_at: now,
            created_by: user.actor(),
            updated_at: now,
        };
        self.db
            .insert_subscription(
                &row,
                NewActivity {
                    actor: &user.actor(),
                    action: "subscription.create",
                    target: &id,
                    before: None,
                    after: subscription_activity(&row),
                },
            )
            .await?;
        // Saved: the key is returned even when the publish failed (it says so beside it).
        let published = self.publisher.publish_change(&user.actor()).await;
        Ok(IssuedKey {
            subscription: id,
            key,
            published,
        })
    }

    /// Changes subscription `id` with `change`. With `seen` (the version the page showed), only
    /// that version: a key rotated or retired by someone else since then is not changed again
    /// in its place (a "Retire previous key" meant for the key the page showed would retire the
    /// one a second rotation made previous).
    async fn change_subscription(
        &self,
        user: &SessionUser,
        id: &str,
        seen: Option<OffsetDateTime>,
        action: &str,
        change: impl Fn(&mut SubscriptionRow) -> Result<(), PortalError>,
    ) -> Result<Published, PortalError> {
        // Read, change, write if nothing changed it in between; else again, from what is there.
        for _ in 0..CHANGE_ATTEMPTS {
            let before = self
                .db
                .subscription(id)
                .await?
                .ok_or_else(|| PortalError::NotFound(format!("subscription {id}")))?;
            if seen.is_some_and(|seen| seen != before.updated_at) {
                return Err(PortalError::Conflict {
                    what: Edited::Subscription,
                    changed_at: Some(before.updated_at),
                });
            }
            let mut after = before.clone();
            change(&mut after)?;
            after.updated_at = OffsetDateTime::now_utc();
            let written = self
                .db
                .update_subscription(
                    &after,
                    before.updated_at,
                    NewActivity {
                        actor: &user.actor(),
                        action,
                        target: id,
                        before: subscription_activity(&before),
                        after: subscription_activity(&after),
                    },
                )
                .await?;
            if written {
                return Ok(self.publisher.publish_change(&user.actor()).await);
            }
        }
        Err(PortalError::invalid(
            "id",
            "the subscription kept changing while this change was made; try again",
        ))
    }

    /// Rotates a subscription's key with overlap: a new primary key is issued (returned once) and
    /// the old primary stays valid as the secondary until [`Portal::retire_secondary_key`]: Admin.
    /// `seen`: the subscription's version as the page showed it ([`version_text`]); empty for
    /// the subscription as it is.
    pub async fn rotate_subscription_key(
        &self,
        user: Option<&SessionUser>,
        id: &str,
        seen: &str,
    ) -> Result<IssuedKey, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let seen = read_version(seen)?;
        let key = generate_key();
        let hash = hash_key(&key).to_string();
        let overlap_end = self
            .settings
            .rotation_overlap
            .map(|overlap| OffsetDateTime::now_utc() + overlap);
        let published = self
            .change_subscription(user, id, seen, "subscription.rotate", |row| {
                if row.state == "revoked" {
                    return Err(PortalError::invalid("id", "the subscription is revoked"));
                }
                row.secondary_key_hash =
                    Some(std::mem::replace(&mut row.primary_key_hash, hash.clone()));
                row.secondary_expires_at = overlap_end;
                Ok(())
            })
            .await?;
        Ok(IssuedKey {
            subscription: id.to_owned(),
            key,
            published,
        })
    }

    /// Ends a rotation's overlap: the secondary (previous) key stops working: Admin. Returns
    /// what was published.
    /// `seen` as for [`Portal::rotate_subscription_key`].
    pub async fn retire_secondary_key(
        &self,
        user: Option<&SessionUser>,
        id: &str,
        seen: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let seen = read_version(seen)?;
        self.change_subscription(user, id, seen, "subscription.retire_secondary", |row| {
            row.secondary_key_hash = None;
            row.secondary_expires_at = None;
            Ok(())
        })
        .await
    }

    /// Retires every previous key whose rotation overlap has ended, each with an activity entry
    /// by the portal itself, and publishes when any was: the periodic task calls it. Returns how
    /// many were retired.
    pub async fn retire_ended_overlaps(&self) -> Result<usize, PortalError> {
        const ACTOR: &str = "portal (rotation overlap ended)";
        let now = OffsetDateTime::now_utc();
        let mut retired = 0;
        for before in self.db.subscriptions().await? {
            let ended = before.secondary_key_hash.is_some()
                && before.secondary_expires_at.is_some_and(|end| end <= now);
            if !ended {
                continue;
            }
            let mut after = before.clone();
            after.secondary_key_hash = None;
            after.secondary_expires_at = None;
            after.updated_at = now;
            // Changed since it was read (revoked, rotated again): the next run looks again.
            if self
                .db
                .update_subscription(
                    &after,
                    before.updated_at,
                    NewActivity {
                        actor: ACTOR,
                        action: "subscription.retire_secondary",
                        target: &after.id,
                        before: subscription_activity(&before),
                        after: subscription_activity(&after),
                    },
                )
                .await?
            {
                retired += 1;
            }
        }
        if retired > 0 {
            // Saved already: when this publish fails, the catch-up publishes them.
            self.publisher.publish(ACTOR).await?;
        }
        Ok(retired)
    }

    /// Revokes a subscription: its keys are refused from the next snapshot on: Admin. Returns
    /// what was published.
    pub async fn revoke_subscription(
        &self,
        user: Option<&SessionUser>,
        id: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        self.change_subscription(user, id, None, "subscription.revoke", |row| {
            row.state = "revoked".to_owned();
            Ok(())
        })
        .await
    }

    /// The registered gateways: Admin.
    pub async fn gateways(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<(Option<i64>, Vec<GatewayRow>), PortalError> {
        require(user, &[Role::Admin])?;
        let current = self.db.latest_snapshot().await?.map(|row| row.version);
        Ok((current, self.db.gateways().await?))
    }

    /// Registers a gateway (its admin token as a secret reference) and pushes to it: Admin.
    pub async fn register_gateway(
        &self,
        user: Option<&SessionUser>,
        id: &str,
        url: &str,
        admin_token_ref: &str,
    ) -> Result<Vec<PushOutcome>, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let (id, parsed) = checked_gateway(id, url)?;
        let id = id.as_str();
        let reference = SecretRef::try_from(admin_token_ref.trim().to_owned())
            .map_err(|error| PortalError::invalid("admin_token_ref", error))?;
        let refs = self.publisher.admin_token_refs();
        refs.check_gateway_url(&parsed)
            .map_err(|why| PortalError::invalid("url", why))?;
        if !refs.allows(&reference) {
            return Err(PortalError::invalid(
                "admin_token_ref",
                refs.refusal(&reference),
            ));
        }
        // A gateway registered again (another URL, another token reference): the log keeps
        // what it replaced.
        let before = self
            .db
            .gateways()
            .await?
            .into_iter()
            .find(|gateway| gateway.id == id)
            .and_then(|gateway| {
                json_of(&serde_json::json!({"url": gateway.url, "admin_token_ref": gateway.admin_token_ref}))
            });
        self.db
            .upsert_gateway(
                id,
                parsed.as_str(),
                reference.as_str(),
                NewActivity {
                    actor: &user.actor(),
                    action: "gateway.register",
                    target: id,
                    before,
                    after: json_of(&serde_json::json!({"url": parsed.as_str(), "admin_token_ref": reference.as_str()})),
                },
            )
            .await?;
        // The first version when there is none; a saved change not published yet.
        self.publisher.catch_up(&user.actor()).await
    }

    /// Publishes what was saved and not published (a change whose publish failed), and pushes
    /// the current version to every gateway that lags, now: Admin.
    pub async fn push_now(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<PushOutcome>, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let actor = user.actor();
        let outcomes = self.publisher.catch_up(&actor).await?;
        // Who pushed, and what each gateway made of it, on the record as every admin action is.
        let results: serde_json::Map<String, serde_json::Value> = outcomes
            .iter()
            .map(|outcome| {
                let result = match &outcome.result {
                    Ok(version) => serde_json::json!({"runs": version}),
                    Err(reason) => serde_json::json!({"not_taken": reason}),
                };
                (outcome.gateway.clone(), result)
            })
            .collect();
        self.db
            .log_activity(NewActivity {
                actor: &actor,
                action: "gateways.push",
                target: "gateways",
                before: None,
                after: json_of(&results),
            })
            .await?;
        Ok(outcomes)
    }

    /// Puts a sign-in on the activity log (`session.sign_in`): who, with which roles and led
    /// groups, and whether through the development sign-in. The caller refuses the sign-in when
    /// this fails: nobody works in the portal unrecorded.
    pub async fn record_sign_in(&self, user: &SessionUser) -> Result<(), PortalError> {
        self.db
            .log_activity(NewActivity {
                actor: &user.actor(),
                action: "session.sign_in",
                target: &user.subject,
                before: None,
                after: json_of(&serde_json::json!({
                    "roles": user.roles,
                    "led_groups": user.led_groups,
                    "dev": user.dev,
                })),
            })
            .await
    }

    /// Puts a sign-out on the activity log (`session.sign_out`).
    pub async fn record_sign_out(&self, user: &SessionUser) -> Result<(), PortalError> {
        self.db
            .log_activity(NewActivity {
                actor: &user.actor(),
                action: "session.sign_out",
                target: &user.subject,
                before: None,
                after: None,
            })
            .await
    }

    /// The newest entries of the activity log. An Admin reads all of it, the record of who
    /// searched and opened which calls and who signed in and out included; an Auditor reads the
    /// configuration changes, not what other auditors looked at.
    pub async fn activity(
        &self,
        user: Option<&SessionUser>,
        limit: i64,
    ) -> Result<Vec<ActivityRow>, PortalError> {
        let user = require(user, &[Role::Admin, Role::Auditor])?;
        let limit = limit.clamp(1, 1000);
        if user.has(Role::Admin) {
            self.db.activity(limit).await
        } else {
            self.db.configuration_changes(limit).await
        }
    }
}

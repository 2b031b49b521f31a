//! The gateway settings no other page manages: trusted proxies, the identity policy (Entra ID
//! tenants and audiences, what a caller must present), capture, the request size limit and limits
//! of the operator's own. They are the `snapshot.base` setting, a snapshot-shaped JSON object
//! every published snapshot starts from ([`crate::snapshot::build`]).
//!
//! Checked before anything is stored: JSON, one object, none of the parts the portal's own pages
//! own, the shape of a snapshot (every name and type, unknown names refused, with the path of the
//! first wrong field), then the snapshot they would publish with the portal's tables, by the same
//! checks a gateway makes ([`gatehouse_schema::validate`]: a tenant that is not a GUID, a limit
//! that limits nothing, …). What a gateway can still refuse at the push (a secret it cannot
//! read) shows as that push's error on the Gateways page, and the gateway keeps its version.

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::portal::Role;
use serde::Serialize;
use serde_json::{Map, Value};
use time::OffsetDateTime;

use crate::db::{NewActivity, next_version};
use crate::error::{Edited, PortalError};
use crate::ops::{Portal, read_version};
use crate::push::Published;
use crate::snapshot::{self, BASE_SETTING, RULE_LIMIT_PREFIX};
use crate::user::{SessionUser, require};

/// The form field the errors name.
const FIELD: &str = "settings";

/// The parts of a snapshot the portal builds from its own tables, and the page that owns each.
const OWNED: [(&str, &str); 3] = [
    ("subscriptions", "Subscriptions"),
    ("access_rules", "Access rules"),
    ("pools", "Backend pools"),
];

/// The gateway settings as their form shows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GatewaySettings {
    /// The settings as stored, pretty-printed (`{}` when none are set).
    pub text: String,
    /// Their version (when they were last saved), `None` while none are set: the form carries
    /// it back to [`Portal::save_gateway_settings`].
    pub version: Option<OffsetDateTime>,
}

/// Checks `text` as gateway settings and returns the object to store (without `version`: the
/// portal numbers the versions it publishes).
pub fn parse(text: &str) -> Result<Map<String, Value>, PortalError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|error| PortalError::invalid(FIELD, format!("not JSON: {error}")))?;
    let Value::Object(mut base) = value else {
        return Err(PortalError::invalid(
            FIELD,
            "must be one JSON object, as {\"trusted_proxies\": [\"10.0.1.0/24\"]}",
        ));
    };
    base.remove("version");
    if let Some((key, page)) = OWNED.iter().find(|(key, _)| base.contains_key(*key)) {
        return Err(PortalError::invalid(
            FIELD,
            format!("`{key}` is managed on the {page} page; remove it here"),
        ));
    }
    let mut probe = base.clone();
    probe.insert("version".to_owned(), Value::from(0));
    let snapshot: ConfigSnapshot =
        serde_path_to_error::deserialize(Value::Object(probe)).map_err(|error| {
            PortalError::invalid(FIELD, format!("{}: {}", error.path(), error.inner()))
        })?;
    if let Some((i, limit)) = snapshot
        .limits
        .iter()
        .enumerate()
        .find(|(_, limit)| limit.id.starts_with(RULE_LIMIT_PREFIX))
    {
        return Err(PortalError::invalid(
            FIELD,
            format!(
                "limits[{i}].id: `{}`: ids starting with `{RULE_LIMIT_PREFIX}` are the limits of access rules; choose another",
                limit.id
            ),
        ));
    }
    Ok(base)
}

impl Portal {
    /// The gateway settings as stored, pretty-printed (`{}` when none are set), and their
    /// version: Admin.
    pub async fn gateway_settings(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<GatewaySettings, PortalError> {
        require(user, &[Role::Admin])?;
        let Some((text, version)) = self.db.setting_with_version(BASE_SETTING).await? else {
            return Ok(GatewaySettings {
                text: "{}".to_owned(),
                version: None,
            });
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?;
        let text = serde_json::to_string_pretty(&value)
            .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?;
        Ok(GatewaySettings {
            text,
            version: Some(version),
        })
    }

    /// Checks and stores new gateway settings (with their activity entry, in one transaction)
    /// and publishes a snapshot built on them: Admin. Returns what was published: the version,
    /// and the gateways that did not take it.
    ///
    /// They are saved from the version their form was opened on (`version`, as
    /// [`crate::ops::version_text`] writes it; empty when none were set): settings saved by
    /// someone else since are not overwritten, the save is refused ([`PortalError::Conflict`])
    /// with nothing written, logged or published.
    pub async fn save_gateway_settings(
        &self,
        user: Option<&SessionUser>,
        text: &str,
        version: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = read_version(version)?;
        let base = parse(text)?;
        let stored = serde_json::to_string(&base)
            .map_err(|error| PortalError::Corrupt(format!("{BASE_SETTING}: {error}")))?;
        let conflict = |changed_at| PortalError::Conflict {
            what: Edited::GatewaySettings,
            changed_at,
        };
        // Refused before anything else when they changed since the form read them; the write
        // checks again, in its transaction.
        let current = self
            .db
            .setting_with_version(BASE_SETTING)
            .await?
            .map(|(_, at)| at);
        if current != read_at {
            return Err(conflict(current));
        }
        // The snapshot the new settings make with the portal's tables, checked here so that the
        // refusal names the settings' field (the write checks again, under its lock).
        let mut trial = self.db.config_tables().await?;
        let before = trial.base.replace(stored.clone());
        let problems = snapshot::problems(&trial)?;
        if !problems.is_empty() {
            return Err(PortalError::invalid(FIELD, problems.join("; ")));
        }
        let written = self
            .db
            .save_setting(
                BASE_SETTING,
                &stored,
                next_version(read_at),
                read_at,
                NewActivity {
                    actor: &user.actor(),
                    action: "settings.update",
                    target: BASE_SETTING,
                    before,
                    after: Some(stored.clone()),
                },
            )
            .await?;
        if !written {
            // Saved (or removed) by someone else between the check and the write.
            let current = self
                .db
                .setting_with_version(BASE_SETTING)
                .await?
                .map(|(_, at)| at);
            return Err(conflict(current));
        }
        Ok(self.publisher.publish_change(&user.actor()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> String {
        match parse(text) {
            Err(PortalError::Invalid { field, message }) => {
                assert_eq!(field, FIELD);
                message
            }
            other => panic!("{text} was not refused: {other:?}"),
        }
    }

    #[test]
    fn settings_are_a_snapshot_without_the_parts_the_portal_owns() {
        let base = parse(
            r#"{"version": 7, "trusted_proxies": ["10.0.1.0/24"],
                "identity": {"require": "key_or_token",
                             "entra": {"tenants": ["72f988bf-86f1-41af-91ab-2d7cd011db47"],
                                       "audiences": ["api://gatehouse"]}}}"#,
        )
        .unwrap();
        assert!(!base.contains_key("version"), "the portal numbers versions");
        assert_eq!(base["trusted_proxies"][0], "10.0.1.0/24");
        assert_eq!(parse("{}").unwrap().len(), 0);

        assert!(refused("{\"trusted_proxies\": [").starts_with("not JSON: "));
        assert!(refused("[1, 2]").starts_with("must be one JSON object"));
        assert_eq!(
            refused(r#"{"pools": []}"#),
            "`pools` is managed on the Backend pools page; remove it here"
        );
        assert!(refused(r#"{"subscriptions": []}"#).contains("Subscriptions page"));
        assert!(refused(r#"{"access_rules": []}"#).contains("Access rules page"));
    }

    #[test]
    fn a_wrong_field_is_named_by_its_path() {
        let message = refused(r#"{"trusted_proxies": ["10.0.1.0/24", "not an address"]}"#);
        assert!(message.starts_with("trusted_proxies[1]: "), "{message}");
        let message =
            refused(r#"{"identity": {"require": "key_or_token", "entra": {"tenant": []}}}"#);
        assert!(
            message.starts_with(
                "identity.entra.tenant: unknown field `tenant`, expected one of `tenants`"
            ),
            "{message}"
        );
        let message = refused(r#"{"trusted_proxy": []}"#);
        assert!(
            message.contains("unknown field `trusted_proxy`"),
            "{message}"
        );
    }

    #[test]
    fn a_limit_may_not_take_the_id_of_an_access_rules_limit() {
        let message = refused(
            r#"{"limits": [{"id": "rule:r1", "subject": {"kind": "each_user"}, "requests_per_minute": 10}]}"#,
        );
        assert!(message.starts_with("limits[0].id: `rule:r1`"), "{message}");
    }
}

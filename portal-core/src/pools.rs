//! Backend pools and their members: create, change, delete, each checked here on the server. A
//! member's credential is stored as a secret reference, never as the secret.

use gatehouse_schema::config::{BackendCredential, SecretRef};
use gatehouse_schema::portal::Role;
use serde::Serialize;

use time::OffsetDateTime;

use crate::db::{MemberRow, NewActivity, PoolRow, next_version};
use crate::error::{Edited, PortalError};
use crate::ops::{Portal, check_version, json_of, read_version, required_version, valid_id};
use crate::push::Published;
use crate::rules::is_deployment_pattern;
use crate::user::{SessionUser, require};

/// A pool as a form sends it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolInput {
    /// Stable id.
    pub id: String,
    /// Deployment names clients use, separated by commas, spaces or new lines; `*` = any name no
    /// other pool serves.
    pub deployments: String,
    /// Whether the pool serves calls that name no deployment (files, batches, …).
    pub serves_resources: bool,
    /// The version of the pool the form was opened on ([`crate::ops::version_text`] of its
    /// `updated_at`); empty for a new pool.
    pub version: String,
}

/// A pool member as a form sends it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MemberInput {
    /// The pool it belongs to.
    pub pool_id: String,
    /// Stable id, unique across pools.
    pub id: String,
    /// `azure_openai` or `openai`.
    pub kind: String,
    /// Base URL of the backend.
    pub endpoint: String,
    /// Deployment (or model) name on this member, or empty for the client's.
    pub deployment: String,
    /// `api-version` for an Azure member, or empty.
    pub api_version: String,
    /// Lower is tried first (0–1000).
    pub priority: String,
    /// Share inside its priority group (1–1000).
    pub weight: String,
    /// Secret reference of the member's API key (`env:NAME`, `file:PATH`, Key Vault URL), or
    /// empty for none.
    pub api_key_ref: String,
    /// The version of the member the form was opened on ([`crate::ops::version_text`] of its
    /// `updated_at`); empty to add a new member.
    pub version: String,
}

/// A pool with its members, as the pools page lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolWithMembers {
    /// The pool.
    pub pool: PoolRow,
    /// Its members by priority.
    pub members: Vec<MemberRow>,
}

fn deployments_of(text: &str) -> Vec<String> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

fn is_deployment_name(text: &str) -> bool {
    !text.contains('*') && is_deployment_pattern(text)
}

fn number(
    field: &'static str,
    text: &str,
    min: i64,
    max: i64,
    default: i64,
) -> Result<i64, PortalError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(default);
    }
    match text.parse::<i64>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(PortalError::invalid(
            field,
            format!("a whole number from {min} to {max}"),
        )),
    }
}

fn validate_pool(input: &PoolInput) -> Result<PoolRow, PortalError> {
    let id = input.id.trim().to_owned();
    valid_id("id", &id)?;
    let deployments = deployments_of(&input.deployments);
    if let Some(bad) = deployments
        .iter()
        .find(|d| d.as_str() != "*" && !is_deployment_name(d))
    {
        return Err(PortalError::invalid(
            "deployments",
            format!("`{bad}` is not a deployment name (letters, digits, . _ - :) or *"),
        ));
    }
    if deployments.is_empty() && !input.serves_resources {
        return Err(PortalError::invalid(
            "deployments",
            "name at least one deployment, or serve calls without a deployment",
        ));
    }
    if deployments.len() > 100 {
        return Err(PortalError::invalid("deployments", "at most 100 entries"));
    }
    // A gateway refuses a snapshot whose pool names a deployment twice, and with it every later
    // one: refused here, before it is published.
    if let Some(twice) = deployments.iter().enumerate().find_map(|(i, d)| {
        deployments[..i]
            .iter()
            .any(|earlier| earlier.eq_ignore_ascii_case(d))
            .then_some(d)
    }) {
        return Err(PortalError::invalid(
            "deployments",
            format!("`{twice}` is listed twice"),
        ));
    }
    Ok(PoolRow {
        id,
        deployments: serde_json::to_string(&deployments).unwrap_or_else(|_| "[]".to_owned()),
        serves_resources: input.serves_resources,
        // Set as it is written.
        updated_at: OffsetDateTime::UNIX_EPOCH,
    })
}

fn validate_member(input: &MemberInput) -> Result<MemberRow, PortalError> {
    let id = input.id.trim().to_owned();
    valid_id("id", &id)?;
    let kind = input.kind.trim();
    if !matches!(kind, "azure_openai" | "openai") {
        return Err(PortalError::invalid(
            "kind",
            "Azure OpenAI or OpenAI-compatible",
        ));
    }
    let endpoint = url::Url::parse(input.endpoint.trim())
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https") && url.has_host())
        .ok_or_else(|| {
            PortalError::invalid("endpoint", "an http:// or https:// URL of the backend")
        })?;
    if !endpoint.username().is_empty() || endpoint.password().is_some() {
        return Err(PortalError::invalid(
            "endpoint",
            "no credentials in the URL: give the key as a secret reference",
        ));
    }
    if endpoint.query().is_some() || endpoint.fragment().is_some() {
        return Err(PortalError::invalid(
            "endpoint",
            "no query string or fragment in the URL",
        ));
    }
    let deployment = Some(input.deployment.trim().to_owned()).filter(|d| !d.is_empty());
    if deployment
        .as_deref()
        .is_some_and(|d| !is_deployment_name(d))
    {
        return Err(PortalError::invalid(
            "deployment",
            "a deployment name (letters, digits, . _ - :), or empty for the client's",
        ));
    }
    let api_version = Some(input.api_version.trim().to_owned()).filter(|v| !v.is_empty());
    if api_version
        .as_deref()
        .is_some_and(|v| v.len() > 40 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
    {
        return Err(PortalError::invalid(
            "api_version",
            "an api-version such as 2024-10-21, or empty",
        ));
    }
    let priority = number("priority", &input.priority, 0, 1000, 1)?;
    let weight = number("weight", &input.weight, 1, 1000, 1)?;
    let reference = input.api_key_ref.trim();
    let credential = if reference.is_empty() {
        BackendCredential::None
    } else {
        // The message never repeats the input: it may be a key pasted by mistake.
        let secret = SecretRef::try_from(reference.to_owned()).map_err(|_| {
            PortalError::invalid(
                "api_key_ref",
                "a secret reference: env:NAME, file:/path or a Key Vault secret URL, never the key itself",
            )
        })?;
        BackendCredential::ApiKey { secret }
    };
    let credential = serde_json::to_string(&credential)
        .map_err(|error| PortalError::Corrupt(format!("credential: {error}")))?;
    Ok(MemberRow {
        pool_id: input.pool_id.trim().to_owned(),
        id,
        kind: kind.to_owned(),
        endpoint: endpoint.to_string(),
        deployment,
        api_version,
        priority,
        weight,
        credential,
        // Set as it is written.
        updated_at: OffsetDateTime::UNIX_EPOCH,
    })
}

impl Portal {
    /// Every pool with its members: Admin.
    pub async fn pools(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<PoolWithMembers>, PortalError> {
        require(user, &[Role::Admin])?;
        let members = self.db.members().await?;
        Ok(self
            .db
            .pools()
            .await?
            .into_iter()
            .map(|pool| PoolWithMembers {
                members: members
                    .iter()
                    .filter(|m| m.pool_id == pool.id)
                    .cloned()
                    .collect(),
                pool,
            })
            .collect())
    }

    /// Creates (`existing = false`) or changes (`existing = true`) a pool, then publishes: Admin.
    /// A deployment may be served by one pool only, and calls without a deployment by one pool.
    /// Returns the pool's new version, for the form to carry to its next save, and what was
    /// published.
    ///
    /// A change is made from the version of the pool its form was opened on (`input.version`)
    /// and written only while the pool still has it (its members' changes do not count), else
    /// refused ([`PortalError::Conflict`]) with nothing written, logged or published. A new pool
    /// is written only if no pool has its id.
    pub async fn save_pool(
        &self,
        user: Option<&SessionUser>,
        input: PoolInput,
        existing: bool,
    ) -> Result<(OffsetDateTime, Published), PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = if existing {
            Some(required_version(&input.version)?)
        } else {
            None
        };
        let mut row = validate_pool(&input)?;
        let pools = self.db.pools().await?;
        let before = pools.iter().find(|p| p.id == row.id).cloned();
        let exists = || PortalError::invalid("id", "a pool with this id exists");
        match read_at {
            None if before.is_some() => return Err(exists()),
            None => {}
            Some(read_at) => check_version(
                Edited::Pool,
                before.as_ref().map(|pool| pool.updated_at),
                read_at,
            )?,
        }
        let mine = deployments_of(&input.deployments);
        for other in pools.iter().filter(|p| p.id != row.id) {
            let theirs: Vec<String> = serde_json::from_str(&other.deployments).unwrap_or_default();
            // Names ignore ASCII case, as the gateway routes them.
            if let Some(shared) = mine
                .iter()
                .find(|d| theirs.iter().any(|t| t.eq_ignore_ascii_case(d)))
            {
                return Err(PortalError::invalid(
                    "deployments",
                    format!("`{shared}` is already served by pool {}", other.id),
                ));
            }
            if row.serves_resources && other.serves_resources {
                return Err(PortalError::invalid(
                    "serves_resources",
                    format!(
                        "pool {} already serves calls without a deployment",
                        other.id
                    ),
                ));
            }
        }
        row.updated_at = next_version(read_at);
        let actor = user.actor();
        let activity = NewActivity {
            actor: &actor,
            action: if existing {
                "pool.update"
            } else {
                "pool.create"
            },
            target: &row.id,
            before: before.as_ref().and_then(json_of),
            after: json_of(&row),
        };
        let written = match read_at {
            None => self.db.insert_pool(&row, activity).await?,
            Some(read_at) => self.db.update_pool(&row, read_at, activity).await?,
        };
        if !written {
            // Created, changed or deleted by someone else between the check and the write.
            return Err(match read_at {
                None => exists(),
                Some(_) => PortalError::Conflict {
                    what: Edited::Pool,
                    changed_at: self.db.pool(&row.id).await?.map(|pool| pool.updated_at),
                },
            });
        }
        let published = self.publisher.publish_change(&actor).await;
        Ok((row.updated_at, published))
    }

    /// Deletes a pool and its members, then publishes: Admin. Only the version of the pool the
    /// page showed (`version`) is deleted: one changed since is refused
    /// ([`PortalError::Conflict`]) and stays. Returns what was published.
    pub async fn delete_pool(
        &self,
        user: Option<&SessionUser>,
        id: &str,
        version: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = required_version(version)?;
        let not_found = || PortalError::NotFound(format!("pool {id}"));
        let pools = self.pools(Some(user)).await?;
        let before = pools
            .iter()
            .find(|p| p.pool.id == id)
            .ok_or_else(not_found)?;
        check_version(Edited::Pool, Some(before.pool.updated_at), read_at)?;
        let deleted = self
            .db
            .delete_pool(
                id,
                read_at,
                NewActivity {
                    actor: &user.actor(),
                    action: "pool.delete",
                    target: id,
                    before: json_of(before),
                    after: None,
                },
            )
            .await?;
        if !deleted {
            return Err(match self.db.pool(id).await? {
                Some(now) => PortalError::Conflict {
                    what: Edited::Pool,
                    changed_at: Some(now.updated_at),
                },
                None => not_found(),
            });
        }
        Ok(self.publisher.publish_change(&user.actor()).await)
    }

    /// Adds a member to a pool (`input.version` empty) or changes one (same pool and id), then
    /// publishes: Admin. Returns the member's new version, for the form to carry to its next
    /// save, and what was published.
    ///
    /// A change is made from the version of the member its form was opened on (`input.version`)
    /// and written only while the member still has it, else refused ([`PortalError::Conflict`])
    /// with nothing written, logged or published. A new member is written only if its pool has
    /// no member with its id.
    pub async fn save_member(
        &self,
        user: Option<&SessionUser>,
        input: MemberInput,
    ) -> Result<(OffsetDateTime, Published), PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = read_version(&input.version)?;
        let mut row = validate_member(&input)?;
        if self.db.pool(&row.pool_id).await?.is_none() {
            return Err(PortalError::NotFound(format!("pool {}", row.pool_id)));
        }
        let members = self.db.members().await?;
        if let Some(other) = members
            .iter()
            .find(|m| m.id == row.id && m.pool_id != row.pool_id)
        {
            return Err(PortalError::invalid(
                "id",
                format!(
                    "member ids are unique across pools; pool {} has this one",
                    other.pool_id
                ),
            ));
        }
        let before = members
            .iter()
            .find(|m| m.id == row.id && m.pool_id == row.pool_id)
            .cloned();
        let exists = || {
            PortalError::invalid(
                "id",
                "the pool has a member with this id: edit that member instead",
            )
        };
        match read_at {
            None if before.is_some() => return Err(exists()),
            None => {}
            Some(read_at) => check_version(
                Edited::Member,
                before.as_ref().map(|member| member.updated_at),
                read_at,
            )?,
        }
        row.updated_at = next_version(read_at);
        let actor = user.actor();
        let target = format!("{}/{}", row.pool_id, row.id);
        let activity = NewActivity {
            actor: &actor,
            action: if read_at.is_some() {
                "member.update"
            } else {
                "member.create"
            },
            target: &target,
            before: before.as_ref().and_then(json_of),
            after: json_of(&row),
        };
        let written = match read_at {
            None => self.db.insert_member(&row, activity).await?,
            Some(read_at) => self.db.update_member(&row, read_at, activity).await?,
        };
        if !written {
            // Created, changed or deleted by someone else between the check and the write.
            return Err(match read_at {
                None => exists(),
                Some(_) => PortalError::Conflict {
                    what: Edited::Member,
                    changed_at: self
                        .db
                        .member(&row.pool_id, &row.id)
                        .await?
                        .map(|member| member.updated_at),
                },
            });
        }
        let published = self.publisher.publish_change(&actor).await;
        Ok((row.updated_at, published))
    }

    /// Removes a member from its pool, then publishes: Admin. A pool left without members is
    /// not sent to the gateways until it has one again. Only the version the page showed
    /// (`version`) is removed: one changed since is refused ([`PortalError::Conflict`]) and
    /// stays. Returns what was published.
    pub async fn delete_member(
        &self,
        user: Option<&SessionUser>,
        pool_id: &str,
        id: &str,
        version: &str,
    ) -> Result<Published, PortalError> {
        let user = require(user, &[Role::Admin])?;
        let read_at = required_version(version)?;
        let not_found = || PortalError::NotFound(format!("member {id} of pool {pool_id}"));
        let before = self.db.member(pool_id, id).await?.ok_or_else(not_found)?;
        check_version(Edited::Member, Some(before.updated_at), read_at)?;
        let deleted = self
            .db
            .delete_member(
                pool_id,
                id,
                read_at,
                NewActivity {
                    actor: &user.actor(),
                    action: "member.delete",
                    target: &format!("{pool_id}/{id}"),
                    before: json_of(&before),
                    after: None,
                },
            )
            .await?;
        if !deleted {
            return Err(match self.db.member(pool_id, id).await? {
                Some(now) => PortalError::Conflict {
                    what: Edited::Member,
                    changed_at: Some(now.updated_at),
                },
                None => not_found(),
            });
        }
        Ok(self.publisher.publish_change(&user.actor()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member() -> MemberInput {
        MemberInput {
            pool_id: "main".into(),
            id: "east".into(),
            kind: "azure_openai".into(),
            endpoint: "https://east.openai.example".into(),
            api_key_ref: "env:EAST_KEY".into(),
            ..MemberInput::default()
        }
    }

    fn field(result: Result<MemberRow, PortalError>) -> &'static str {
        match result {
            Err(PortalError::Invalid { field, .. }) => field,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_member_keeps_only_a_secret_reference() {
        let row = validate_member(&member()).unwrap();
        assert_eq!(
            row.credential,
            r#"{"type":"api_key","secret":"env:EAST_KEY"}"#
        );
        assert_eq!((row.priority, row.weight), (1, 1));
    }

    #[test]
    fn a_pasted_key_is_refused_without_being_repeated() {
        let mut input = member();
        input.api_key_ref = "sk-live-0123456789abcdef".into();
        let error = validate_member(&input).unwrap_err();
        assert!(matches!(
            error,
            PortalError::Invalid {
                field: "api_key_ref",
                ..
            }
        ));
        assert!(!error.to_string().contains("0123456789abcdef"), "{error}");
    }

    #[test]
    fn bad_member_fields_are_named() {
        let mut input = member();
        input.endpoint = "ftp://x".into();
        assert_eq!(field(validate_member(&input)), "endpoint");
        let mut input = member();
        input.endpoint = "https://user:pw@x.example".into();
        assert_eq!(field(validate_member(&input)), "endpoint");
        let mut input = member();
        input.weight = "0".into();
        assert_eq!(field(validate_member(&input)), "weight");
        let mut input = member();
        input.priority = "high".into();
        assert_eq!(field(validate_member(&input)), "priority");
        let mut input = member();
        input.kind = "bedrock".into();
        assert_eq!(field(validate_member(&input)), "kind");
        let mut input = member();
        input.deployment = "gpt*".into();
        assert_eq!(field(validate_member(&input)), "deployment");
    }

    #[test]
    fn a_pool_needs_something_to_serve() {
        let empty = validate_pool(&PoolInput {
            id: "p".into(),
            ..PoolInput::default()
        });
        assert!(matches!(
            empty,
            Err(PortalError::Invalid {
                field: "deployments",
                ..
            })
        ));
        let row = validate_pool(&PoolInput {
            id: "p".into(),
            deployments: "gpt-4o, *".into(),
            ..PoolInput::default()
        })
        .unwrap();
        assert_eq!(row.deployments, r#"["gpt-4o","*"]"#);
    }

    #[test]
    fn a_deployment_listed_twice_is_refused() {
        for listed in ["gpt-4o gpt-4o", "gpt-4o, o3, GPT-4o"] {
            let twice = validate_pool(&PoolInput {
                id: "p".into(),
                deployments: listed.into(),
                ..PoolInput::default()
            });
            assert!(
                matches!(&twice, Err(PortalError::Invalid { field: "deployments", message }) if message.contains("listed twice")),
                "{listed}: {twice:?}"
            );
        }
    }
}

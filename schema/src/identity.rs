//! Who may call, and what they may call: Entra ID token policy and access rules.
//!
//! Both travel in the [`ConfigSnapshot`](crate::ConfigSnapshot), so the portal can change them and
//! push them to every gateway at once.

use serde::{Deserialize, Serialize};
use url::Url;

/// How callers prove who they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityPolicy {
    /// Which credentials a call must present.
    #[serde(default)]
    pub require: CredentialRequirement,
    /// Entra ID access tokens accepted in `Authorization: Bearer`; absent = tokens are not accepted.
    #[serde(default)]
    pub entra: Option<EntraTokenPolicy>,
}

/// Which credentials a call must present (API Management's "subscription required" and
/// `validate-jwt` combined).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialRequirement {
    /// A subscription key or an Entra token (when `entra` is configured), or both.
    #[default]
    KeyOrToken,
    /// A subscription key; tokens are ignored for identification.
    Key,
    /// An Entra token; a key alone is refused.
    Token,
    /// Both a subscription key and an Entra token.
    KeyAndToken,
}

/// Validation of Entra ID (v1 and v2) access tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntraTokenPolicy {
    /// Tenant ids (GUIDs) whose tokens are accepted; one for a single-tenant set-up, several for a
    /// multi-tenant one. A token's `tid` must be one of them and must match its issuer.
    pub tenants: Vec<String>,
    /// Accepted `aud` values (the API's client id and/or App ID URI); any one must match.
    pub audiences: Vec<String>,
    /// Where metadata and keys are fetched and the v2 issuer lives.
    #[serde(default = "default_authority_host")]
    pub authority_host: Url,
    /// Host of the v1 token issuer (`{host}/{tid}/`).
    #[serde(default = "default_v1_issuer_host")]
    pub v1_issuer_host: Url,
    /// Allowed clock difference for `exp` and `nbf`, in seconds.
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
    /// How often signing keys are re-read even when nothing asks for it, in seconds.
    #[serde(default = "default_keys_refresh")]
    pub keys_refresh_seconds: u64,
    /// Shortest interval between two key fetches caused by an unknown `kid`, in seconds.
    #[serde(default = "default_unknown_kid_interval")]
    pub unknown_kid_refetch_seconds: u64,
    /// Whether app-only tokens (client credentials; `idtyp` = `app`) are accepted.
    #[serde(default = "default_true")]
    pub accept_app_tokens: bool,
    /// Resolution of the groups overage through Microsoft Graph.
    #[serde(default)]
    pub graph: GraphPolicy,
}

/// Microsoft Graph, for users in more groups than a token can carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphPolicy {
    /// Base URL of Microsoft Graph.
    #[serde(default = "default_graph_endpoint")]
    pub endpoint: Url,
    /// How long a user's resolved groups are kept, in seconds.
    #[serde(default = "default_graph_cache")]
    pub cache_seconds: u64,
}

impl Default for GraphPolicy {
    fn default() -> Self {
        GraphPolicy {
            endpoint: default_graph_endpoint(),
            cache_seconds: default_graph_cache(),
        }
    }
}

#[expect(clippy::expect_used, reason = "called only with literal, valid URLs")]
fn parse_url(text: &str) -> Url {
    Url::parse(text).expect("a literal URL parses")
}

fn default_authority_host() -> Url {
    parse_url("https://login.microsoftonline.com")
}

fn default_v1_issuer_host() -> Url {
    parse_url("https://sts.windows.net")
}

fn default_graph_endpoint() -> Url {
    parse_url("https://graph.microsoft.com")
}

fn default_clock_skew() -> u64 {
    60
}

fn default_keys_refresh() -> u64 {
    24 * 3600
}

fn default_unknown_kid_interval() -> u64 {
    300
}

fn default_graph_cache() -> u64 {
    600
}

fn default_true() -> bool {
    true
}

/// One grant: who may call which deployments and operations. Everything no rule grants is denied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    /// Stable id, named in the audit trail of changes.
    pub id: String,
    /// Who the rule grants to.
    pub grantee: Grantee,
    /// Deployment (model) names: exact, or patterns with `*` (`gpt-4o*`, `*`).
    #[serde(default)]
    pub deployments: Vec<String>,
    /// Operation ids (`chatcompletions_create`, …) or patterns with `*`; empty = every operation.
    #[serde(default)]
    pub operations: Vec<String>,
    /// Whether the rule also grants calls that name no deployment (files, batches, assistants, …).
    #[serde(default)]
    pub resources: bool,
}

/// Who an [`AccessRule`] grants to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Grantee {
    /// Members of an Entra group (its object id), directly or through the groups overage.
    Group {
        /// The group's object id.
        id: String,
        /// Its display name, for people reading the rule.
        #[serde(default)]
        display_name: String,
    },
    /// Holders of a subscription key.
    Subscription {
        /// The subscription id.
        id: String,
    },
    /// One Entra user or service principal (its object id).
    User {
        /// The object id.
        id: String,
    },
    /// Tokens carrying an app role (the `roles` claim).
    AppRole {
        /// The role's value.
        value: String,
    },
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters. ASCII case is
/// ignored, as Azure ignores it in deployment names.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let pattern = pattern.as_bytes();
    let name = name.as_bytes();
    let (mut p, mut n) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, n));
            p += 1;
        } else if p < pattern.len() && pattern[p].eq_ignore_ascii_case(&name[n]) {
            p += 1;
            n += 1;
        } else if let Some((star, at)) = backtrack {
            p = star + 1;
            n = at + 1;
            backtrack = Some((star, at + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_like_shell_patterns() {
        assert!(glob_matches("*", "gpt-4o"));
        assert!(glob_matches("gpt-4o*", "gpt-4o-mini"));
        assert!(glob_matches("GPT-4O", "gpt-4o"));
        assert!(glob_matches("*-mini", "gpt-4o-mini"));
        assert!(glob_matches("g*4*i", "gpt-4o-mini"));
        assert!(!glob_matches("gpt-4o", "gpt-4o-mini"));
        assert!(!glob_matches("gpt-4o*", "o1"));
        assert!(!glob_matches("", "x"));
        assert!(glob_matches("", ""));
    }

    #[test]
    fn policies_parse_with_defaults() {
        let policy: IdentityPolicy = serde_json::from_value(serde_json::json!({
            "require": "key_and_token",
            "entra": {"tenants": ["t"], "audiences": ["api://gatehouse"]}
        }))
        .unwrap();
        let entra = policy.entra.unwrap();
        assert_eq!(policy.require, CredentialRequirement::KeyAndToken);
        assert_eq!(
            entra.authority_host.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(entra.clock_skew_seconds, 60);
        let rule: AccessRule = serde_json::from_value(serde_json::json!({
            "id": "r", "grantee": {"kind": "group", "id": "g"}, "deployments": ["gpt-4o"]
        }))
        .unwrap();
        assert!(matches!(rule.grantee, Grantee::Group { .. }));
    }
}

//! The checks a gateway makes of a whole [`ConfigSnapshot`] before it runs it, beyond what its
//! types say: unique ids, references that resolve, numbers above zero, names a URL path can
//! carry, tenants given as GUIDs. Here, not in the gateway, so that the portal can refuse what a
//! gateway would refuse before it publishes it.

use std::collections::{HashMap, HashSet};

use crate::ConfigSnapshot;
use crate::identity::{CredentialRequirement, Grantee};
use crate::limits::{LimitRule, LimitSubjectRule};

/// Every problem of `snapshot`, each as `field.path: what is wrong`; empty when it may run.
pub fn problems(snapshot: &ConfigSnapshot) -> Vec<String> {
    let mut errors = Vec::new();
    validate(snapshot, &mut errors);
    errors
}

/// The token scopes a member's Entra credential may ask for: Azure OpenAI's (Cognitive Services,
/// `azure-specs.md` §1.3; Azure AI Foundry's; the US Government and China clouds'). The token is
/// the gateway identity's and goes to the member's endpoint, which the snapshot chooses: any
/// other scope would hand that endpoint a token for the identity's other resources (Key Vault,
/// Microsoft Graph, Azure Resource Manager).
pub const MEMBER_TOKEN_SCOPES: [&str; 4] = [
    "https://cognitiveservices.azure.com/.default",
    "https://ai.azure.com/.default",
    "https://cognitiveservices.azure.us/.default",
    "https://cognitiveservices.azure.cn/.default",
];

/// The largest clock skew allowed when validating tokens (`identity.entra.clock_skew_seconds`).
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 3600;

/// The identity policy and the access rules.
fn validate_identity(
    snapshot: &ConfigSnapshot,
    subscription_ids: &HashSet<&String>,
    errors: &mut Vec<String>,
) {
    let identity = &snapshot.identity;
    match &identity.entra {
        None => {
            if matches!(
                identity.require,
                CredentialRequirement::Token | CredentialRequirement::KeyAndToken
            ) {
                errors.push(
                    "identity.require: tokens are required but `identity.entra` is not configured"
                        .to_owned(),
                );
            }
        }
        Some(entra) => {
            if entra.tenants.is_empty() {
                errors.push("identity.entra.tenants: name at least one tenant id".to_owned());
            }
            for (t, tenant) in entra.tenants.iter().enumerate() {
                // A token's `tid` is always the tenant's GUID: a domain name here would match
                // no token at all.
                match uuid::Uuid::try_parse(tenant) {
                    Err(_) => errors.push(format!(
                        "identity.entra.tenants[{t}]: a tenant id is the directory's GUID \
                         (`tid` in its tokens), not a domain name"
                    )),
                    // Tokens spell it one way only, and it is compared as written.
                    Ok(id) if id.hyphenated().to_string() != *tenant => errors.push(format!(
                        "identity.entra.tenants[{t}]: write the GUID as tokens carry it: \
                         `{}`",
                        id.hyphenated()
                    )),
                    Ok(_) => {}
                }
            }
            if entra.audiences.is_empty() {
                errors.push(
                    "identity.entra.audiences: name at least one accepted audience".to_owned(),
                );
            }
            if entra.clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
                errors.push(format!(
                    "identity.entra.clock_skew_seconds: at most {MAX_CLOCK_SKEW_SECONDS} (tokens live about an hour)"
                ));
            }
            if entra.unknown_kid_refetch_seconds == 0 {
                errors.push("identity.entra.unknown_kid_refetch_seconds: must be at least 1 (it protects the identity provider)".to_owned());
            }
            // Keys Entra rolls in are learnt when a token names one: waiting longer than this
            // would refuse every token signed with a new key for as long.
            if entra.unknown_kid_refetch_seconds > MAX_UNKNOWN_KID_REFETCH_SECONDS {
                errors.push(format!("identity.entra.unknown_kid_refetch_seconds: at most {MAX_UNKNOWN_KID_REFETCH_SECONDS} (tokens signed with a key Entra rolled in are refused until it is fetched)"));
            }
            if entra.keys_refresh_seconds == 0 {
                errors.push("identity.entra.keys_refresh_seconds: must be at least 1".to_owned());
            }
            if entra.graph.cache_seconds == 0 {
                errors.push("identity.entra.graph.cache_seconds: must be at least 1 (without it every call of a user in many groups asks Microsoft Graph)".to_owned());
            }
            // Signing keys are fetched there: over plain HTTP anyone on the way could hand the
            // gateway keys of their own and sign tokens for any user and group.
            if !is_https_base(&entra.authority_host) {
                errors.push(format!(
                    "identity.entra.authority_host: `{}` must be an https:// URL (plain http:// only on loopback, for local doubles) without credentials, query or fragment",
                    without_credentials(&entra.authority_host)
                ));
            }
            // The gateway sends its own Graph token there: a snapshot must not be able to send it
            // to a host of the pusher's choice.
            if !is_graph_endpoint(&entra.graph.endpoint) {
                errors.push(format!(
                    "identity.entra.graph.endpoint: `{}` is not Microsoft Graph; use https:// and one of {} (plain http:// and other hosts only on loopback, for local doubles), without credentials",
                    without_credentials(&entra.graph.endpoint),
                    GRAPH_HOSTS.join(", ")
                ));
            }
        }
    }
    let Some(rules) = &snapshot.access_rules else {
        return;
    };
    let mut rule_ids = HashSet::new();
    for (r, rule) in rules.iter().enumerate() {
        if rule.id.trim().is_empty() {
            errors.push(format!("access_rules[{r}].id: must not be empty"));
        }
        if !rule_ids.insert(&rule.id) {
            errors.push(format!(
                "access_rules[{r}].id: duplicate rule id `{}`",
                rule.id
            ));
        }
        for (d, pattern) in rule.deployments.iter().enumerate() {
            if !is_deployment_pattern(pattern) {
                errors.push(format!(
                    "access_rules[{r}].deployments[{d}]: `{pattern}` is not a deployment name or `*` pattern"
                ));
            }
        }
        for (o, pattern) in rule.operations.iter().enumerate() {
            let valid = !pattern.is_empty()
                && pattern.len() <= 64
                && pattern
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'*'));
            if !valid {
                errors.push(format!(
                    "access_rules[{r}].operations[{o}]: `{pattern}` is not an operation id (`chatcompletions_create`) or `*` pattern"
                ));
            }
        }
        if rule.deployments.is_empty() && !rule.resources {
            errors.push(format!(
                "access_rules[{r}].deployments: the rule grants nothing; name deployments or set `resources: true`"
            ));
        }
        match &rule.grantee {
            Grantee::Subscription { id } if !subscription_ids.contains(id) => {
                errors.push(format!(
                    "access_rules[{r}].grantee.id: no subscription `{id}` in this snapshot"
                ));
            }
            Grantee::Group { id, .. } | Grantee::User { id } if id.trim().is_empty() => {
                errors.push(format!("access_rules[{r}].grantee.id: must not be empty"));
            }
            Grantee::AppRole { value } if value.trim().is_empty() => {
                errors.push(format!(
                    "access_rules[{r}].grantee.value: must not be empty"
                ));
            }
            _ => {}
        }
    }
}

/// Microsoft Graph's hosts: the global service and the national clouds (US Government L4 and
/// L5, China).
const GRAPH_HOSTS: [&str; 4] = [
    "graph.microsoft.com",
    "graph.microsoft.us",
    "dod-graph.microsoft.us",
    "microsoftgraph.chinacloudapi.cn",
];

/// The longest `identity.entra.unknown_kid_refetch_seconds`.
pub const MAX_UNKNOWN_KID_REFETCH_SECONDS: u64 = 3600;

/// Whether `url` is an HTTPS base URL (plain HTTP on a loopback address, a local double) without
/// credentials, query or fragment.
fn is_https_base(url: &url::Url) -> bool {
    let scheme_ok = match url.scheme() {
        "https" => true,
        "http" => crate::config::is_loopback(url),
        _ => false,
    };
    scheme_ok
        && url.host().is_some()
        && url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
}

/// `url` for a message: without the user name and password it may carry.
fn without_credentials(url: &url::Url) -> url::Url {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown
}

/// Whether `pattern` is a deployment name, or a `*` pattern of one, that a URL path can carry
/// (not made of dots only, which a path would read as `.` or `..`).
fn is_deployment_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern.len() <= 64
        && !pattern.bytes().all(|b| b == b'.')
        && pattern
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'*'))
}

/// Whether `url` is Microsoft Graph over HTTPS, or a loopback address (a local double).
fn is_graph_endpoint(url: &url::Url) -> bool {
    let loopback = crate::config::is_loopback(url);
    let graph = url.host_str().is_some_and(|host| {
        GRAPH_HOSTS
            .iter()
            .any(|known| host.eq_ignore_ascii_case(known))
    });
    let scheme_ok = match url.scheme() {
        "https" => graph || loopback,
        "http" => loopback,
        _ => false,
    };
    scheme_ok && url.username().is_empty() && url.password().is_none()
}

/// The largest snapshot version: what the portal's database and the gateway's metrics (a
/// Prometheus gauge, exposed as a signed 64-bit number) hold.
pub const MAX_VERSION: u64 = i64::MAX.unsigned_abs();

fn validate(snapshot: &ConfigSnapshot, errors: &mut Vec<String>) {
    if snapshot.version > MAX_VERSION {
        errors.push(format!("version: at most {MAX_VERSION}"));
    }
    let mut subscription_ids = HashSet::new();
    let mut digests = HashSet::new();
    for (i, subscription) in snapshot.subscriptions.iter().enumerate() {
        if subscription.id.trim().is_empty() {
            errors.push(format!("subscriptions[{i}].id: must not be empty"));
        }
        if !subscription_ids.insert(&subscription.id) {
            errors.push(format!(
                "subscriptions[{i}].id: duplicate subscription id `{}`",
                subscription.id
            ));
        }
        if !digests.insert(&subscription.primary_key_hash) {
            errors.push(format!(
                "subscriptions[{i}].primary_key_hash: the same key is used by another subscription"
            ));
        }
        if let Some(secondary) = &subscription.secondary_key_hash
            && !digests.insert(secondary)
        {
            errors.push(format!("subscriptions[{i}].secondary_key_hash: the same key is used by another subscription"));
        }
        if subscription.secondary_expires_at.is_some() && subscription.secondary_key_hash.is_none()
        {
            errors.push(format!(
                "subscriptions[{i}].secondary_expires_at: there is no secondary key to end"
            ));
        }
    }

    if snapshot.max_request_body_bytes == 0 {
        errors.push("max_request_body_bytes: must be at least 1 (0 refuses every body)".to_owned());
    }
    validate_limits(&snapshot.limits, &subscription_ids, errors);
    validate_identity(snapshot, &subscription_ids, errors);

    let mut pool_ids = HashSet::new();
    let mut member_ids = HashSet::new();
    let mut deployments = HashMap::new();
    let mut resource_pools = 0;
    for (p, pool) in snapshot.pools.iter().enumerate() {
        check_label_id(&format!("pools[{p}].id"), &pool.id, errors);
        if !pool_ids.insert(&pool.id) {
            errors.push(format!("pools[{p}].id: duplicate pool id `{}`", pool.id));
        }
        if pool.members.is_empty() {
            errors.push(format!(
                "pools[{p}].members: a pool needs at least one member"
            ));
        }
        if pool.deployments.is_empty() && !pool.serves_resources {
            errors.push(format!(
                "pools[{p}].deployments: a pool must serve a deployment or resources"
            ));
        }
        if pool.serves_resources {
            resource_pools += 1;
            if resource_pools > 1 {
                errors.push(format!(
                    "pools[{p}].serves_resources: only one pool may serve resource calls"
                ));
            }
        }
        for (d, deployment) in pool.deployments.iter().enumerate() {
            // Names ignore ASCII case (as Azure's do): `gpt-4o` and `GPT-4o` are one deployment.
            if let Some(other) = deployments.insert(deployment.to_ascii_lowercase(), p) {
                errors.push(format!("pools[{p}].deployments[{d}]: `{deployment}` is already served by pools[{other}]"));
            }
            let valid = deployment == "*"
                || (is_deployment_pattern(deployment) && !deployment.contains('*'));
            if !valid {
                errors.push(format!(
                    "pools[{p}].deployments[{d}]: `{deployment}` is not a valid deployment name"
                ));
            }
        }
        for (m, member) in pool.members.iter().enumerate() {
            let path = format!("pools[{p}].members[{m}]");
            check_label_id(&format!("{path}.id"), &member.id, errors);
            if !member_ids.insert(&member.id) {
                errors.push(format!(
                    "{path}.id: duplicate member id `{}` (member ids are unique across pools)",
                    member.id
                ));
            }
            if !matches!(member.endpoint.scheme(), "http" | "https") {
                errors.push(format!("{path}.endpoint: must be an http or https URL"));
            }
            if !member.endpoint.username().is_empty() || member.endpoint.password().is_some() {
                errors.push(format!(
                    "{path}.endpoint: must not carry credentials; use `credential`"
                ));
            }
            if member.endpoint.query().is_some() {
                errors.push(format!("{path}.endpoint: must not carry a query string"));
            }
            if let Some((_, scope)) = member.credential.entra()
                && !MEMBER_TOKEN_SCOPES
                    .iter()
                    .any(|allowed| scope.eq_ignore_ascii_case(allowed))
            {
                errors.push(format!(
                    "{path}.credential.scope: must be the scope of Azure OpenAI ({}): the gateway's identity gets a token for it and sends it to the member, so a snapshot may not ask for one to Key Vault, Microsoft Graph or Azure Resource Manager",
                    MEMBER_TOKEN_SCOPES.join(", ")
                ));
            }
            if member.weight == 0 {
                errors.push(format!("{path}.weight: must be at least 1"));
            }
            if member.connect_timeout_ms == 0 {
                errors.push(format!("{path}.connect_timeout_ms: must be at least 1"));
            }
            if member.response_timeout_ms == 0 {
                errors.push(format!("{path}.response_timeout_ms: must be at least 1"));
            }
            if member.response_idle_timeout_ms == 0 {
                errors.push(format!(
                    "{path}.response_idle_timeout_ms: must be at least 1"
                ));
            }
            if let Some(deployment) = &member.deployment
                && (!is_deployment_pattern(deployment) || deployment.contains('*'))
            {
                errors.push(format!(
                    "{path}.deployment: `{deployment}` is not a valid deployment name"
                ));
            }
        }
    }
}

/// Limit rules: unique ids, at least one limit each, every number above zero, sane patterns.
fn validate_limits(
    rules: &[LimitRule],
    subscription_ids: &HashSet<&String>,
    errors: &mut Vec<String>,
) {
    let mut ids = HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("limits[{i}]");
        check_label_id(&format!("{path}.id"), &rule.id, errors);
        if !ids.insert(&rule.id) {
            errors.push(format!("{path}.id: duplicate limit id `{}`", rule.id));
        }
        match &rule.subject {
            LimitSubjectRule::Subscription { id }
            | LimitSubjectRule::User { id }
            | LimitSubjectRule::Group { id }
                if id.trim().is_empty() =>
            {
                errors.push(format!("{path}.subject.id: must not be empty"));
            }
            // Compared as written with a caller's subscription: a typo would limit nobody.
            LimitSubjectRule::Subscription { id } if !subscription_ids.contains(id) => {
                errors.push(format!(
                    "{path}.subject.id: no subscription `{id}` in this snapshot"
                ));
            }
            _ => {}
        }
        if rule.requests_per_minute.is_none()
            && rule.tokens_per_minute.is_none()
            && rule.token_quota.is_none()
        {
            errors.push(format!(
                "{path}: set at least one of requests_per_minute, tokens_per_minute and token_quota"
            ));
        }
        if rule.requests_per_minute == Some(0) {
            errors.push(format!("{path}.requests_per_minute: must be at least 1"));
        }
        if rule.tokens_per_minute == Some(0) {
            errors.push(format!("{path}.tokens_per_minute: must be at least 1"));
        }
        if rule.token_quota.is_some_and(|q| q.tokens == 0) {
            errors.push(format!("{path}.token_quota.tokens: must be at least 1"));
        }
        for (d, pattern) in rule.deployments.iter().enumerate() {
            if !is_deployment_pattern(pattern) {
                errors.push(format!(
                    "{path}.deployments[{d}]: `{pattern}` is not a deployment name or `*` pattern"
                ));
            }
        }
    }
}

/// The ids that name metric label values, log fields and Redis keys — pools, members, limits —
/// are 1 to 128 letters, digits, `.`, `:`, `_` or `-`, as the portal makes them (an access rule's
/// limits are `rule:{rule id}`): a quote, a backslash or a line break in a label value breaks
/// the whole Prometheus scrape.
fn check_label_id(path: &str, id: &str, errors: &mut Vec<String>) {
    if id.is_empty() {
        errors.push(format!("{path}: must not be empty"));
    } else if id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b':' | b'_' | b'-'))
    {
        errors.push(format!(
            "{path}: use 1 to 128 letters, digits, dots, colons, underscores or hyphens"
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_past_what_a_signed_64_bit_number_holds_is_refused() {
        let mut snapshot: ConfigSnapshot = serde_json::from_str(r#"{"version": 1}"#).unwrap();
        assert!(problems(&snapshot).is_empty());
        snapshot.version = MAX_VERSION;
        assert!(problems(&snapshot).is_empty());
        for version in [MAX_VERSION + 1, u64::MAX] {
            snapshot.version = version;
            assert_eq!(
                problems(&snapshot),
                [format!("version: at most {MAX_VERSION}")]
            );
        }
    }
}

//! A validated snapshot with everything derived from it, swapped as one.
//!
//! A request loads one [`Runtime`] and uses it to the end, so it never sees half of an old and
//! half of a new configuration. Building a runtime validates the whole snapshot and resolves every
//! secret; any problem rejects the snapshot with the exact field path. Key Vault secrets are
//! fetched before the (synchronous) build, by [`Runtime::prepare`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::config::{
    BackendCredential, BackendTls, EntraIdentity, PoolMember, SecretRef,
};
use gatehouse_schema::identity::{CredentialRequirement, Grantee};
use gatehouse_schema::limits::{LimitRule, LimitSubjectRule};

use crate::auth::KeyIndex;
use crate::entra_credential::CredentialRegistry;
use crate::pool::{HealthRegistry, Member, MemberCredential, Pool};
use crate::secret::SecretStore;
use crate::upstream::BackendClient;

/// Where a runtime's secrets and Entra credentials come from; shared across snapshots so that Key
/// Vault values and access tokens outlive a configuration push.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    /// Secret values by reference.
    pub secrets: SecretStore,
    /// Entra credentials by identity.
    pub credentials: Arc<CredentialRegistry>,
}

impl Resolver {
    /// Forgets secrets and credentials that `snapshot` does not use.
    pub fn retain_for(&self, snapshot: &ConfigSnapshot) {
        let references = secret_refs(snapshot);
        let keep: HashSet<&str> = references.iter().map(|(_, r)| r.as_str()).collect();
        self.secrets.retain(&keep);
        let identities: Vec<EntraIdentity> = members(snapshot)
            .filter_map(|member| member.credential.entra().map(|(identity, _)| identity))
            .collect();
        self.credentials
            .retain(|identity| identities.contains(identity));
    }
}

fn members(snapshot: &ConfigSnapshot) -> impl Iterator<Item = &PoolMember> {
    snapshot.pools.iter().flat_map(|pool| pool.members.iter())
}

/// Every secret reference of a snapshot, with its field path.
pub fn secret_refs(snapshot: &ConfigSnapshot) -> Vec<(String, &SecretRef)> {
    let mut references = Vec::new();
    for (p, pool) in snapshot.pools.iter().enumerate() {
        for (m, member) in pool.members.iter().enumerate() {
            for (field, reference) in member.credential.secret_refs() {
                references.push((
                    format!("pools[{p}].members[{m}].credential.{field}"),
                    reference,
                ));
            }
        }
    }
    references
}

/// A snapshot ready to serve.
#[derive(Debug)]
pub struct Runtime {
    /// The snapshot as given.
    pub snapshot: ConfigSnapshot,
    /// Subscriptions by key digest.
    pub keys: KeyIndex,
    /// Pools in snapshot order.
    pub pools: Vec<Arc<Pool>>,
    /// The token validator's policy generation this runtime was installed with: tokens that
    /// passed under another runtime's identity policy are judged again.
    pub policy_generation: u64,
    by_deployment: HashMap<String, usize>,
    wildcard: Option<usize>,
    resources: Option<usize>,
    members: HashMap<String, (usize, usize)>,
}

/// A list of problems, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ValidationErrors(pub Vec<String>);

impl Runtime {
    /// Validates `snapshot` whole and builds the runtime, reusing member health from `health`,
    /// with a resolver of its own: `env:` and `file:` secrets only (Key Vault references are
    /// refused, they need [`Runtime::prepare`]).
    pub fn build(
        snapshot: ConfigSnapshot,
        health: &HealthRegistry,
    ) -> Result<Runtime, ValidationErrors> {
        Self::build_with(snapshot, health, &Resolver::default())
    }

    /// Fetches the snapshot's Key Vault secrets that `resolver` does not hold yet, then builds
    /// the runtime with [`Runtime::build_with`].
    pub async fn prepare(
        snapshot: ConfigSnapshot,
        health: &HealthRegistry,
        resolver: &Resolver,
    ) -> Result<Runtime, ValidationErrors> {
        resolver
            .secrets
            .prefetch(
                secret_refs(&snapshot)
                    .into_iter()
                    .map(|(_, reference)| reference),
            )
            .await;
        Self::build_with(snapshot, health, resolver)
    }

    /// Validates `snapshot` whole and builds the runtime; secrets and credentials come from
    /// `resolver` (Key Vault values must have been fetched into it).
    pub fn build_with(
        snapshot: ConfigSnapshot,
        health: &HealthRegistry,
        resolver: &Resolver,
    ) -> Result<Runtime, ValidationErrors> {
        let mut errors = Vec::new();
        validate(&snapshot, &mut errors);
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }

        let mut clients: HashMap<(BackendTls, u64), BackendClient> = HashMap::new();
        let mut pools = Vec::new();
        let mut by_deployment = HashMap::new();
        let mut wildcard = None;
        let mut resources = None;
        let mut members_index = HashMap::new();
        for (p, pool) in snapshot.pools.iter().enumerate() {
            let mut members = Vec::new();
            for (m, member) in pool.members.iter().enumerate() {
                let path = format!("pools[{p}].members[{m}]");
                let credential = match &member.credential {
                    BackendCredential::None => None,
                    BackendCredential::ApiKey { secret } => {
                        match resolver.secrets.resolve(secret) {
                            Ok(value) => Some(MemberCredential::ApiKey(value)),
                            Err(error) => {
                                errors.push(format!("{path}.credential.secret: {error}"));
                                None
                            }
                        }
                    }
                    entra => match entra.entra() {
                        Some((identity, scope)) => match resolver
                            .credentials
                            .get_or_build(&identity, &resolver.secrets)
                        {
                            Ok(credential) => Some(MemberCredential::Entra {
                                credential,
                                scope: scope.to_owned(),
                            }),
                            Err(error) => {
                                errors.push(format!("{path}.credential.{error}"));
                                None
                            }
                        },
                        None => None,
                    },
                };
                let key = (member.tls.clone(), member.connect_timeout_ms);
                let client = match clients.get(&key) {
                    Some(client) => client.clone(),
                    None => match BackendClient::new(
                        &member.tls,
                        Duration::from_millis(member.connect_timeout_ms),
                    ) {
                        Ok(client) => {
                            clients.insert(key, client.clone());
                            client
                        }
                        Err(error) => {
                            errors.push(format!("{path}.tls: {error}"));
                            continue;
                        }
                    },
                };
                members_index.insert(member.id.clone(), (p, m));
                members.push(Arc::new(Member {
                    config: member.clone(),
                    client,
                    credential,
                    health: health.health_of(&member.id),
                }));
            }
            for deployment in &pool.deployments {
                if deployment == "*" {
                    wildcard = Some(p);
                } else {
                    by_deployment.insert(deployment.clone(), p);
                }
            }
            if pool.serves_resources {
                resources = Some(p);
            }
            pools.push(Arc::new(Pool {
                id: pool.id.clone(),
                members,
            }));
        }
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        Ok(Runtime {
            keys: KeyIndex::new(&snapshot.subscriptions),
            snapshot,
            pools,
            policy_generation: 0,
            by_deployment,
            wildcard,
            resources,
            members: members_index,
        })
    }

    /// The pool serving `deployment`, or the resource pool when the call names none.
    pub fn pool_for(&self, deployment: Option<&str>) -> Option<&Arc<Pool>> {
        let index = match deployment {
            Some(name) => self.by_deployment.get(name).copied().or(self.wildcard)?,
            None => self.resources?,
        };
        self.pools.get(index)
    }

    /// The metric label of a deployment: its name when a pool names it, `*` when only the wildcard
    /// pool serves it (so clients cannot grow the label space by inventing names), else `none`.
    pub fn deployment_label<'a>(&self, deployment: Option<&'a str>) -> &'a str {
        match deployment {
            Some(name) if self.by_deployment.contains_key(name) => name,
            Some(_) if self.wildcard.is_some() => "*",
            _ => "none",
        }
    }

    /// The pool and position of the member with `id`.
    pub fn member(&self, id: &str) -> Option<(&Arc<Pool>, usize)> {
        let (pool, member) = *self.members.get(id)?;
        Some((self.pools.get(pool)?, member))
    }
}

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
                if uuid::Uuid::try_parse(tenant).is_err() {
                    errors.push(format!(
                        "identity.entra.tenants[{t}]: a tenant id is the directory's GUID \
                         (`tid` in its tokens), not a domain name"
                    ));
                }
            }
            if entra.audiences.is_empty() {
                errors.push(
                    "identity.entra.audiences: name at least one accepted audience".to_owned(),
                );
            }
            if entra.unknown_kid_refetch_seconds == 0 {
                errors.push("identity.entra.unknown_kid_refetch_seconds: must be at least 1 (it protects the identity provider)".to_owned());
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

fn validate(snapshot: &ConfigSnapshot, errors: &mut Vec<String>) {
    validate_limits(&snapshot.limits, errors);
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
    }

    validate_identity(snapshot, &subscription_ids, errors);

    let mut pool_ids = HashSet::new();
    let mut member_ids = HashSet::new();
    let mut deployments = HashMap::new();
    let mut resource_pools = 0;
    for (p, pool) in snapshot.pools.iter().enumerate() {
        if pool.id.trim().is_empty() {
            errors.push(format!("pools[{p}].id: must not be empty"));
        }
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
            if let Some(other) = deployments.insert(deployment.clone(), p) {
                errors.push(format!("pools[{p}].deployments[{d}]: `{deployment}` is already served by pools[{other}]"));
            }
            let valid = deployment == "*"
                || (!deployment.is_empty()
                    && deployment.len() <= 64
                    && deployment.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
                    }));
            if !valid {
                errors.push(format!(
                    "pools[{p}].deployments[{d}]: `{deployment}` is not a valid deployment name"
                ));
            }
        }
        for (m, member) in pool.members.iter().enumerate() {
            let path = format!("pools[{p}].members[{m}]");
            if member.id.trim().is_empty() {
                errors.push(format!("{path}.id: must not be empty"));
            }
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
                && (scope.is_empty() || scope.len() > 512 || scope.contains(char::is_whitespace))
            {
                errors.push(format!(
                    "{path}.credential.scope: must be one scope, such as `https://cognitiveservices.azure.com/.default`"
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
                && (deployment.is_empty()
                    || !deployment.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':')
                    }))
            {
                errors.push(format!(
                    "{path}.deployment: `{deployment}` is not a valid deployment name"
                ));
            }
        }
    }
}

/// Limit rules: unique ids, at least one limit each, every number above zero, sane patterns.
fn validate_limits(rules: &[LimitRule], errors: &mut Vec<String>) {
    let mut ids = HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let path = format!("limits[{i}]");
        if rule.id.trim().is_empty() {
            errors.push(format!("{path}.id: must not be empty"));
        }
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
            let valid = !pattern.is_empty()
                && pattern.len() <= 64
                && pattern.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b':' | b'*')
                });
            if !valid {
                errors.push(format!(
                    "{path}.deployments[{d}]: `{pattern}` is not a deployment name or `*` pattern"
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(json: serde_json::Value) -> ConfigSnapshot {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let bad = snapshot(serde_json::json!({
            "version": 2,
            "pools": [
                {"id": "a", "deployments": ["gpt-4o"], "members": [
                    {"id": "m1", "endpoint": "ftp://x", "weight": 0, "response_timeout_ms": 0, "response_idle_timeout_ms": 0},
                    {"id": "m1", "endpoint": "https://user:pw@x", "credential": {"type": "api_key", "secret": "env:GATEHOUSE_SURELY_UNSET_VAR"}}
                ]},
                {"id": "a", "deployments": ["gpt-4o", "../etc"], "members": []}
            ]
        }));
        let errors = Runtime::build(bad, &HealthRegistry::default())
            .unwrap_err()
            .0;
        let expected = [
            "pools[0].members[0].endpoint: must be an http or https URL",
            "pools[0].members[0].weight: must be at least 1",
            "pools[0].members[0].response_timeout_ms: must be at least 1",
            "pools[0].members[0].response_idle_timeout_ms: must be at least 1",
            "pools[0].members[1].id: duplicate member id `m1`",
            "pools[0].members[1].endpoint: must not carry credentials",
            "pools[1].id: duplicate pool id `a`",
            "pools[1].members: a pool needs at least one member",
            "pools[1].deployments[0]: `gpt-4o` is already served by pools[0]",
            "pools[1].deployments[1]: `../etc` is not a valid deployment name",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(needle)),
                "missing `{needle}` in {errors:#?}"
            );
        }
    }

    #[test]
    fn limit_rules_are_validated_with_their_paths() {
        let bad = snapshot(serde_json::json!({
            "version": 2,
            "limits": [
                {"id": "a", "subject": {"kind": "each_subscription"}, "tokens_per_minute": 0},
                {"id": "a", "subject": {"kind": "group", "id": " "}},
                {"id": "", "subject": {"kind": "each_user"}, "token_quota": {"tokens": 0, "period": "daily"},
                 "requests_per_minute": 0, "deployments": ["gpt-4o*", "bad name"]},
                {"id": "ok", "subject": {"kind": "subscription", "id": "s"}, "requests_per_minute": 5}
            ]
        }));
        let errors = Runtime::build(bad, &HealthRegistry::default())
            .unwrap_err()
            .0;
        let expected = [
            "limits[0].tokens_per_minute: must be at least 1",
            "limits[1].id: duplicate limit id `a`",
            "limits[1].subject.id: must not be empty",
            "limits[1]: set at least one of",
            "limits[2].id: must not be empty",
            "limits[2].requests_per_minute: must be at least 1",
            "limits[2].token_quota.tokens: must be at least 1",
            "limits[2].deployments[1]: `bad name` is not",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(needle)),
                "missing `{needle}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    #[test]
    fn unresolvable_secrets_reject_the_snapshot() {
        let bad = snapshot(serde_json::json!({
            "version": 2,
            "pools": [{"id": "a", "deployments": ["d"], "members": [
                {"id": "m", "endpoint": "https://x", "credential": {"type": "api_key", "secret": "env:GATEHOUSE_SURELY_UNSET_VAR"}}
            ]}]
        }));
        let errors = Runtime::build(bad, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            [
                "pools[0].members[0].credential.secret: environment variable `GATEHOUSE_SURELY_UNSET_VAR` is not set"
            ]
        );
    }

    #[test]
    fn identity_and_access_rule_problems_are_named() {
        let bad = snapshot(serde_json::json!({
            "version": 2,
            "subscriptions": [{"id": "team-a", "primary_key_hash": format!("sha256:{}", "ab".repeat(32))}],
            "identity": {"require": "key_and_token", "entra": {"tenants": [], "audiences": ["a"], "unknown_kid_refetch_seconds": 0}},
            "access_rules": [
                {"id": "r", "grantee": {"kind": "subscription", "id": "team-b"}, "deployments": ["d"]},
                {"id": "r", "grantee": {"kind": "group", "id": ""}, "deployments": ["d"]},
                {"id": "s", "grantee": {"kind": "app_role", "value": "x"}}
            ],
            "pools": [{"id": "a", "deployments": ["d"], "members": [{"id": "m", "endpoint": "https://x"}]}]
        }));
        let errors = Runtime::build(bad, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            [
                "identity.entra.tenants: name at least one tenant id",
                "identity.entra.unknown_kid_refetch_seconds: must be at least 1 (it protects the identity provider)",
                "access_rules[0].grantee.id: no subscription `team-b` in this snapshot",
                "access_rules[1].id: duplicate rule id `r`",
                "access_rules[1].grantee.id: must not be empty",
                "access_rules[2].deployments: the rule grants nothing; name deployments or set `resources: true`",
            ]
        );
        let tokens_without_entra = snapshot(serde_json::json!({
            "version": 2,
            "identity": {"require": "token"},
        }));
        let errors = Runtime::build(tokens_without_entra, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            ["identity.require: tokens are required but `identity.entra` is not configured"]
        );
        let domain_tenant = snapshot(serde_json::json!({
            "version": 2,
            "identity": {"require": "token", "entra": {
                "tenants": ["11111111-1111-1111-1111-111111111111", "contoso.onmicrosoft.com"],
                "audiences": ["api://gatehouse"]}},
        }));
        let errors = Runtime::build(domain_tenant, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            [
                "identity.entra.tenants[1]: a tenant id is the directory's GUID (`tid` in its tokens), not a domain name"
            ]
        );
    }
}

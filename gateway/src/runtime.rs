//! A validated snapshot with everything derived from it, swapped as one.
//!
//! A request loads one [`Runtime`] and uses it to the end, so it never sees half of an old and
//! half of a new configuration. Building a runtime validates the whole snapshot and resolves every
//! secret; any problem rejects the snapshot with the exact field path. Key Vault secrets are
//! fetched before the (synchronous) build, by [`Runtime::prepare`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use gatehouse_schema::ConfigSnapshot;
use gatehouse_schema::config::{BackendCredential, EntraIdentity, PoolMember, SecretRef};

use crate::auth::KeyIndex;
use crate::entra_credential::CredentialRegistry;
use crate::pool::{HealthRegistry, Member, MemberCredential, Pool};
use crate::secret::SecretStore;
use crate::secret_policy::SecretRefPolicy;
use crate::upstream::{ClientCache, ClientKey};

/// Where a runtime's secrets and Entra credentials come from; shared across snapshots so that Key
/// Vault values and access tokens outlive a configuration push.
#[derive(Debug, Clone, Default)]
pub struct Resolver {
    /// Secret values by reference.
    pub secrets: SecretStore,
    /// Entra credentials by identity.
    pub credentials: Arc<CredentialRegistry>,
    /// Which references a snapshot may name; one it may not is refused before it is read.
    pub policy: Arc<SecretRefPolicy>,
    /// Backend clients, kept while their settings stay (see [`ClientCache`]).
    pub clients: Arc<ClientCache>,
}

impl Resolver {
    /// Forgets secrets, credentials and backend clients that `runtime` does not use.
    pub fn retain_for(&self, runtime: &Runtime) {
        self.clients.retain(&runtime.client_keys);
        let snapshot = &runtime.snapshot;
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

/// Refuses a snapshot that names a secret reference the policy keeps from snapshots (one of the
/// gateway's own secrets, see [`SecretRefPolicy`]), or one of the gateway's own files as a
/// member's TLS file, naming each with its field path.
fn refuse_reserved_refs(
    snapshot: &ConfigSnapshot,
    resolver: &Resolver,
) -> Result<(), ValidationErrors> {
    let mut refused: Vec<String> = secret_refs(snapshot)
        .into_iter()
        .filter_map(|(path, reference)| {
            resolver
                .policy
                .refusal(reference)
                .map(|why| format!("{path}: {why}"))
        })
        .collect();
    // A member's TLS files go to its endpoint too (a client identity is presented to it).
    for (p, pool) in snapshot.pools.iter().enumerate() {
        for (m, member) in pool.members.iter().enumerate() {
            for (field, file) in [
                ("ca_file", &member.tls.ca_file),
                ("client_identity_file", &member.tls.client_identity_file),
            ] {
                if let Some(why) = file
                    .as_deref()
                    .and_then(|file| resolver.policy.tls_file_refusal(file))
                {
                    refused.push(format!("pools[{p}].members[{m}].tls.{field}: {why}"));
                }
            }
        }
    }
    if refused.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors(refused))
    }
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
    /// Pool index and configured name by deployment name in ASCII lower case: deployment names
    /// ignore case, as Azure's do and as access rules and limits compare them.
    by_deployment: HashMap<String, (usize, String)>,
    wildcard: Option<usize>,
    resources: Option<usize>,
    members: HashMap<String, (usize, usize)>,
    /// The backend clients' keys, kept by [`Resolver::retain_for`].
    client_keys: Vec<ClientKey>,
}

/// A list of problems, each with its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct ValidationErrors(pub Vec<String>);

impl Runtime {
    /// A copy of this runtime in which the members whose TLS files (CA, client identity) read
    /// otherwise now than when their clients were built have clients built from the files as
    /// they read now, or `None` when no member got one. Nothing else is read again (secrets,
    /// credentials): a renewed certificate is taken whatever else a new snapshot would refuse.
    /// A member whose files do not build keeps its client, and the problem is returned with its
    /// field path. Reads the files: call it off the async workers.
    pub fn with_renewed_clients(&self, clients: &ClientCache) -> (Option<Runtime>, Vec<String>) {
        let changed: Vec<&ClientKey> = self
            .client_keys
            .iter()
            .filter(|key| key.files_changed())
            .collect();
        if changed.is_empty() {
            return (None, Vec::new());
        }
        let mut problems = Vec::new();
        let mut renewed_any = false;
        // The keys of the clients the copy uses: the unchanged ones, and for each changed one the
        // new key, or the old one for a member whose files do not build.
        let mut client_keys: Vec<ClientKey> = self
            .client_keys
            .iter()
            .filter(|key| !changed.contains(key))
            .cloned()
            .collect();
        let mut keep = |key: ClientKey| {
            if !client_keys.contains(&key) {
                client_keys.push(key);
            }
        };
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(p, pool)| {
                let members = pool
                    .members
                    .iter()
                    .enumerate()
                    .map(|(m, member)| {
                        let Some(old) = changed.iter().find(|key| {
                            key.tls() == &member.config.tls
                                && key.connect_timeout_ms() == member.config.connect_timeout_ms
                        }) else {
                            return Arc::clone(member);
                        };
                        match clients
                            .get_or_build(&member.config.tls, member.config.connect_timeout_ms)
                        {
                            Ok((key, client)) => {
                                // A member set aside while its handshakes were refused with the
                                // old files is tried again at once.
                                member.health.forgive_failure();
                                renewed_any = true;
                                keep(key);
                                Arc::new(Member {
                                    config: member.config.clone(),
                                    client,
                                    credential: member.credential.clone(),
                                    health: Arc::clone(&member.health),
                                })
                            }
                            Err(error) => {
                                problems.push(format!("pools[{p}].members[{m}].tls: {error}"));
                                keep((*old).clone());
                                Arc::clone(member)
                            }
                        }
                    })
                    .collect();
                Arc::new(Pool {
                    id: pool.id.clone(),
                    members,
                })
            })
            .collect();
        if !renewed_any {
            return (None, problems);
        }
        (
            Some(Runtime {
                snapshot: self.snapshot.clone(),
                keys: self.keys.clone(),
                pools,
                policy_generation: self.policy_generation,
                by_deployment: self.by_deployment.clone(),
                wildcard: self.wildcard,
                resources: self.resources,
                members: self.members.clone(),
                client_keys,
            }),
            problems,
        )
    }

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
        refuse_reserved_refs(&snapshot, resolver)?;
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
        let mut errors = gatehouse_schema::validate::problems(&snapshot);
        if !errors.is_empty() {
            return Err(ValidationErrors(errors));
        }
        refuse_reserved_refs(&snapshot, resolver)?;

        let mut client_keys = Vec::new();
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
                let client = match resolver
                    .clients
                    .get_or_build(&member.tls, member.connect_timeout_ms)
                {
                    Ok((key, client)) => {
                        client_keys.push(key);
                        client
                    }
                    Err(error) => {
                        errors.push(format!("{path}.tls: {error}"));
                        continue;
                    }
                };
                members_index.insert(member.id.clone(), (p, m));
                members.push(Arc::new(Member {
                    config: member.clone(),
                    client,
                    credential,
                    health: health.health_of(member),
                }));
            }
            for deployment in &pool.deployments {
                if deployment == "*" {
                    wildcard = Some(p);
                } else {
                    by_deployment.insert(deployment.to_ascii_lowercase(), (p, deployment.clone()));
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
            client_keys,
        })
    }

    /// The pool serving `deployment`, or the resource pool when the call names none.
    pub fn pool_for(&self, deployment: Option<&str>) -> Option<&Arc<Pool>> {
        let index = match deployment {
            Some(name) => self
                .named_pool(name)
                .map(|(index, _)| *index)
                .or(self.wildcard)?,
            None => self.resources?,
        };
        self.pools.get(index)
    }

    /// The pool index and configured name of a deployment a pool names, whatever its case.
    fn named_pool(&self, name: &str) -> Option<&(usize, String)> {
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            self.by_deployment.get(&name.to_ascii_lowercase())
        } else {
            self.by_deployment.get(name)
        }
    }

    /// The metric label of a deployment: its name when a pool names it, `*` when only the wildcard
    /// pool serves it (so clients cannot grow the label space by inventing names), else `none`.
    /// A name a pool serves is labelled as the configuration spells it.
    pub fn deployment_label<'a>(&'a self, deployment: Option<&str>) -> &'a str {
        match deployment {
            Some(name) => match self.named_pool(name) {
                Some((_, configured)) => configured,
                None if self.wildcard.is_some() => "*",
                None => "none",
            },
            None => "none",
        }
    }

    /// The pool and position of the member with `id`.
    pub fn member(&self, id: &str) -> Option<(&Arc<Pool>, usize)> {
        let (pool, member) = *self.members.get(id)?;
        Some((self.pools.get(pool)?, member))
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
                {"id": "a", "deployments": ["GPT-4o", "../etc"], "members": []},
                {"id": "eu west", "deployments": ["o3"], "members": [
                    {"id": "corp\\aoai-1", "endpoint": "https://x"}
                ]}
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
            "pools[1].deployments[0]: `GPT-4o` is already served by pools[0]",
            "pools[1].deployments[1]: `../etc` is not a valid deployment name",
            "pools[2].id: use 1 to 128 letters, digits, dots, colons, underscores or hyphens",
            "pools[2].members[0].id: use 1 to 128 letters",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(needle)),
                "missing `{needle}` in {errors:#?}"
            );
        }
    }

    #[test]
    fn deployment_names_find_their_pool_whatever_their_case() {
        let runtime = Runtime::build(
            snapshot(serde_json::json!({
                "version": 1,
                "pools": [
                    {"id": "eu", "deployments": ["GPT-4o"], "members": [{"id": "m", "endpoint": "http://127.0.0.1:9"}]},
                    {"id": "any", "deployments": ["*"], "members": [{"id": "w", "endpoint": "http://127.0.0.1:9"}]}
                ]
            })),
            &HealthRegistry::default(),
        )
        .unwrap();
        for name in ["GPT-4o", "gpt-4o", "GPT-4O"] {
            assert_eq!(runtime.pool_for(Some(name)).unwrap().id, "eu", "{name}");
            assert_eq!(runtime.deployment_label(Some(name)), "GPT-4o", "{name}");
        }
        assert_eq!(runtime.pool_for(Some("gpt-4o-mini")).unwrap().id, "any");
        assert_eq!(runtime.deployment_label(Some("gpt-4o-mini")), "*");
    }

    #[test]
    fn the_graph_endpoint_is_microsoft_graph_or_a_local_double() {
        let with_graph = |endpoint: &str| {
            snapshot(serde_json::json!({
                "version": 2,
                "identity": {"require": "token", "entra": {
                    "tenants": ["11111111-1111-1111-1111-111111111111"],
                    "audiences": ["api://gatehouse"],
                    "graph": {"endpoint": endpoint}}},
            }))
        };
        for allowed in [
            "https://graph.microsoft.com",
            "https://graph.microsoft.us/",
            "https://microsoftgraph.chinacloudapi.cn",
            "http://127.0.0.1:9000",
            "https://localhost:8443",
        ] {
            assert!(
                Runtime::build(with_graph(allowed), &HealthRegistry::default()).is_ok(),
                "{allowed}"
            );
        }
        for refused in [
            "https://graph.example.com",
            "https://graph.microsoft.com.example.net",
            "http://graph.microsoft.com",
            "https://user:pw@graph.microsoft.com",
        ] {
            let errors = Runtime::build(with_graph(refused), &HealthRegistry::default())
                .unwrap_err()
                .0;
            assert!(
                errors[0].starts_with("identity.entra.graph.endpoint: "),
                "{refused}: {errors:?}"
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
                {"id": "ok", "subject": {"kind": "subscription", "id": "s"}, "requests_per_minute": 5},
                // A quote or a line break in an id would break the metrics' label values.
                {"id": "per \"team\"\n", "subject": {"kind": "each_subscription"}, "requests_per_minute": 5},
                // A subscription the snapshot does not have: the limit would limit nobody.
                {"id": "typo", "subject": {"kind": "subscription", "id": "S"}, "requests_per_minute": 5}
            ],
            "subscriptions": [{"id": "s", "display_name": "S", "product": "p",
                "primary_key_hash": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]
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
            "limits[5].subject.id: no subscription `S`",
            "limits[4].id: use 1 to 128 letters, digits, dots, colons, underscores or hyphens",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(needle)),
                "missing `{needle}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
    }

    /// What would run but never work, or fetch token signing keys over plain HTTP, is refused
    /// with its path; a URL's credentials never reach the message.
    #[test]
    fn identity_urls_patterns_and_numbers_that_cannot_work_are_refused() {
        let bad = snapshot(serde_json::json!({
            "version": 2,
            "max_request_body_bytes": 0,
            "identity": {"require": "token", "entra": {
                "tenants": ["11111111-1111-1111-1111-111111111111"],
                "audiences": ["api://gatehouse"],
                "authority_host": "http://login.microsoftonline.com",
                "unknown_kid_refetch_seconds": 86400,
                "graph": {"endpoint": "https://svc:S3cret@graph.microsoft.com", "cache_seconds": 0}}},
            "access_rules": [
                {"id": "r", "grantee": {"kind": "group", "id": "g"}, "deployments": ["", "gpt-4o "],
                 "operations": ["Chat Completions"]}
            ],
            "pools": [{"id": "p", "deployments": ["..", "gpt-4o"], "members": [
                {"id": "m", "endpoint": "https://x", "deployment": ".."}]}]
        }));
        let errors = Runtime::build(bad, &HealthRegistry::default())
            .unwrap_err()
            .0;
        let expected = [
            "max_request_body_bytes: must be at least 1",
            "identity.entra.authority_host: `http://login.microsoftonline.com/` must be an https://",
            "identity.entra.unknown_kid_refetch_seconds: at most 3600",
            "identity.entra.graph.cache_seconds: must be at least 1",
            "identity.entra.graph.endpoint: `https://graph.microsoft.com/` is not Microsoft Graph",
            "access_rules[0].deployments[0]: `` is not",
            "access_rules[0].deployments[1]: `gpt-4o ` is not",
            "access_rules[0].operations[0]: `Chat Completions` is not",
            "pools[0].deployments[0]: `..` is not",
            "pools[0].members[0].deployment: `..` is not",
        ];
        for needle in expected {
            assert!(
                errors.iter().any(|e| e.starts_with(needle)),
                "missing `{needle}` in {errors:#?}"
            );
        }
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        assert!(errors.iter().all(|e| !e.contains("S3cret")), "{errors:#?}");
        for host in ["https://login.microsoftonline.us", "http://127.0.0.1:9000"] {
            let good = snapshot(serde_json::json!({
                "version": 2,
                "identity": {"require": "token", "entra": {
                    "tenants": ["11111111-1111-1111-1111-111111111111"],
                    "audiences": ["api://gatehouse"], "authority_host": host}},
            }));
            assert!(
                Runtime::build(good, &HealthRegistry::default()).is_ok(),
                "{host}"
            );
        }
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

    /// A member's Entra token goes to the member's endpoint, which the snapshot chooses: a
    /// scope other than Azure OpenAI's would hand it a token for the gateway identity's Key
    /// Vault, Graph or Resource Manager access. And a clock skew beyond an hour is refused (a
    /// value past the Unix epoch's seconds made every token fail to validate).
    #[test]
    fn member_token_scopes_and_clock_skew_are_bounded() {
        let with = |scope: &str| {
            snapshot(serde_json::json!({
                "version": 2,
                "pools": [{"id": "a", "deployments": ["d"], "members": [{"id": "m", "endpoint": "https://evil.example",
                    "credential": {"type": "managed_identity", "scope": scope}}]}]
            }))
        };
        for scope in [
            "https://vault.azure.net/.default",
            "https://graph.microsoft.com/.default",
            "https://management.azure.com/.default",
            "https://cognitiveservices.azure.com/other",
        ] {
            let errors = Runtime::build(with(scope), &HealthRegistry::default())
                .unwrap_err()
                .0;
            assert!(
                errors.len() == 1
                    && errors[0].starts_with(
                        "pools[0].members[0].credential.scope: must be the scope of Azure OpenAI"
                    ),
                "{scope}: {errors:?}"
            );
        }
        for scope in [
            "https://cognitiveservices.azure.com/.default",
            "https://ai.azure.com/.default",
        ] {
            assert!(
                Runtime::build(with(scope), &HealthRegistry::default()).is_ok(),
                "{scope}"
            );
        }
        let skewed = snapshot(serde_json::json!({
            "version": 2,
            "identity": {"require": "token", "entra": {
                "tenants": ["11111111-1111-1111-1111-111111111111"], "audiences": ["api://gatehouse"],
                "clock_skew_seconds": 2_000_000_000u64}},
        }));
        let errors = Runtime::build(skewed, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            ["identity.entra.clock_skew_seconds: at most 3600 (tokens live about an hour)"]
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
                "tenants": ["11111111-1111-1111-1111-111111111111", "contoso.onmicrosoft.com",
                            "{11111111-1111-1111-1111-1111111111AA}", "11111111111111111111111111111111"],
                "audiences": ["api://gatehouse"]}},
        }));
        let errors = Runtime::build(domain_tenant, &HealthRegistry::default())
            .unwrap_err()
            .0;
        assert_eq!(
            errors,
            [
                "identity.entra.tenants[1]: a tenant id is the directory's GUID (`tid` in its tokens), not a domain name",
                "identity.entra.tenants[2]: write the GUID as tokens carry it: `11111111-1111-1111-1111-1111111111aa`",
                "identity.entra.tenants[3]: write the GUID as tokens carry it: `11111111-1111-1111-1111-111111111111`",
            ]
        );
    }
}

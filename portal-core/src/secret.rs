//! Reading the secrets that secret references point to (gateway admin tokens, the OIDC client
//! secret). The portal stores only references; the value is read when it is needed.

use gatehouse_schema::config::{SecretRef, SecretSource};

/// Reads the secret a reference points to: `env:NAME` or `file:PATH` (trailing newline removed).
/// Key Vault references are resolved by the gateway only; the portal refuses them.
pub async fn resolve(reference: &SecretRef) -> Result<String, String> {
    match reference.source() {
        SecretSource::Env(name) => {
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))
        }
        SecretSource::File(path) => tokio::fs::read_to_string(path)
            .await
            .map(|text| text.trim_end_matches(['\r', '\n']).to_owned())
            .map_err(|error| format!("cannot read {path}: {error}")),
        SecretSource::KeyVault(_) => {
            Err("the portal reads env: and file: references only".to_owned())
        }
    }
}

/// The secret references the portal reads as gateway admin tokens.
///
/// The portal sends a gateway's admin token to the URL registered with it. Without a limit, an
/// Admin of the portal could register a gateway at a URL of their own with the reference of any
/// secret the portal's process can read (`env:` its OIDC client secret, `file:` a key on its
/// host) and receive that secret as a bearer token. So the portal reads only references under
/// the operator's prefixes (`--gateway-token-refs`), and the exact references the operator gave
/// with `--gateway` at start; this holds where a reference is registered and again where it is
/// read, so that a row written before the policy (or by hand) is not read either.
///
/// The same policy says where the requests a token signs may go: a snapshot carries the
/// subscriptions' key hashes and a signed request can be replayed unchanged for minutes, so the
/// portal talks to a gateway over plain `http://` only on a loopback host (`localhost`,
/// `127.0.0.0/8`, `::1`), unless the operator allows it everywhere
/// (`--allow-plain-http-gateways`, for a private network that is trusted as it is).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTokenRefs {
    prefixes: Vec<SecretRef>,
    exact: Vec<SecretRef>,
    plain_http_anywhere: bool,
}

/// The default prefixes: environment variables named `GATEHOUSE_GATEWAY_TOKEN…`, and files
/// under `/run/secrets/gatehouse/` (where container platforms mount secrets).
pub const DEFAULT_ADMIN_TOKEN_PREFIXES: &str =
    "env:GATEHOUSE_GATEWAY_TOKEN,file:/run/secrets/gatehouse/";

impl Default for AdminTokenRefs {
    fn default() -> Self {
        AdminTokenRefs::parse(DEFAULT_ADMIN_TOKEN_PREFIXES).unwrap_or(AdminTokenRefs {
            prefixes: Vec::new(),
            exact: Vec::new(),
            plain_http_anywhere: false,
        })
    }
}

impl AdminTokenRefs {
    /// Prefixes separated by commas: `env:NAME_PREFIX` (variables whose name starts so) or
    /// `file:/DIR/` (files under that directory, an absolute path). Key Vault references are
    /// not read by the portal, so none is accepted; an empty text allows no prefix at all.
    pub fn parse(text: &str) -> Result<AdminTokenRefs, String> {
        let mut prefixes = Vec::new();
        for item in text
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
        {
            let reference = SecretRef::try_from(item.to_owned())
                .map_err(|error| format!("`{item}`: {error}"))?;
            match reference.source() {
                SecretSource::Env(name) if !name.is_empty() => {}
                SecretSource::File(path) if path.starts_with('/') && !has_parent_dir(path) => {
                    if !path.ends_with('/') {
                        return Err(format!(
                            "`{item}`: a file prefix is a directory and ends with `/`"
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "`{item}`: a prefix is env:NAME_PREFIX or file:/absolute/directory/"
                    ));
                }
            }
            prefixes.push(reference);
        }
        Ok(AdminTokenRefs {
            prefixes,
            exact: Vec::new(),
            plain_http_anywhere: false,
        })
    }

    /// This policy, letting the portal reach gateways over plain `http://` on any host when
    /// `allowed` (else on loopback hosts only).
    pub fn with_plain_http_anywhere(mut self, allowed: bool) -> Self {
        self.plain_http_anywhere = allowed;
        self
    }

    /// Whether the portal may send a gateway's requests to `url`: `https://` always, `http://`
    /// on a loopback host, or anywhere when the operator allowed it. The refusal does not repeat
    /// the URL.
    pub fn check_gateway_url(&self, url: &url::Url) -> Result<(), String> {
        if url.scheme() != "http" || self.plain_http_anywhere {
            return Ok(());
        }
        let loopback = match url.host() {
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            None => false,
        };
        if loopback {
            Ok(())
        } else {
            Err(
                "a gateway on another host is reached over https:// only: the configuration \
                 and the signed requests would cross the network in clear (start the portal \
                 with --allow-plain-http-gateways for a network you trust as it is)"
                    .to_owned(),
            )
        }
    }

    /// These references allowed as they are (the operator's own, from `--gateway`).
    pub fn with_exact(mut self, references: impl IntoIterator<Item = SecretRef>) -> Self {
        self.exact.extend(references);
        self
    }

    /// Whether the portal may read `reference` as a gateway admin token.
    pub fn allows(&self, reference: &SecretRef) -> bool {
        if self.exact.iter().any(|exact| exact == reference) {
            return true;
        }
        self.prefixes
            .iter()
            .any(|prefix| match (prefix.source(), reference.source()) {
                (SecretSource::Env(prefix), SecretSource::Env(name)) => name.starts_with(prefix),
                (SecretSource::File(directory), SecretSource::File(path)) => {
                    // Whole path components: `/run/secrets/gatehouse/` holds `…/gatehouse/a`,
                    // not `…/gatehouse-other`.
                    std::path::Path::new(path).starts_with(directory) && !has_parent_dir(path)
                }
                _ => false,
            })
    }

    /// The allowed prefixes, as given.
    pub fn prefixes(&self) -> Vec<&str> {
        self.prefixes.iter().map(SecretRef::as_str).collect()
    }

    /// Why `reference` is refused, for the form and the push error.
    pub fn refusal(&self, reference: &SecretRef) -> String {
        let prefixes = self.prefixes();
        format!(
            "the portal reads gateway admin tokens only from references starting with {} (its --gateway-token-refs); `{}` is not one",
            if prefixes.is_empty() {
                "nothing".to_owned()
            } else {
                prefixes.join(" or ")
            },
            reference.as_str()
        )
    }

    /// Reads the admin token `reference` points to, if this policy allows it.
    pub async fn resolve(&self, reference: &SecretRef) -> Result<String, String> {
        if !self.allows(reference) {
            return Err(self.refusal(reference));
        }
        resolve(reference).await
    }
}

/// Whether a path has a `..` component (which could climb out of an allowed directory).
fn has_parent_dir(path: &str) -> bool {
    std::path::Path::new(path)
        .components()
        .any(|component| matches!(component, std::path::Component::ParentDir))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(text: &str) -> SecretRef {
        SecretRef::try_from(text.to_owned()).unwrap()
    }

    #[test]
    fn plain_http_reaches_loopback_gateways_only_unless_allowed() {
        let refs = AdminTokenRefs::default();
        let url = |text: &str| url::Url::parse(text).unwrap();
        for ok in [
            "https://gw.example.com",
            "https://10.0.0.4:8443",
            "http://127.0.0.1:8080",
            "http://127.8.9.10",
            "http://localhost:8080",
            "http://LOCALHOST",
            "http://[::1]:8080",
        ] {
            assert_eq!(refs.check_gateway_url(&url(ok)), Ok(()), "{ok}");
        }
        for refused in [
            "http://gw.example.com",
            "http://10.0.0.4:8080",
            "http://[fd00::1]:8080",
            "http://localhost.example.com",
            "http://0.0.0.0:8080",
        ] {
            let why = refs.check_gateway_url(&url(refused)).unwrap_err();
            assert!(why.contains("https://"), "{why}");
            assert!(!why.contains(url(refused).host_str().unwrap()), "{why}");
        }
        let anywhere = refs.with_plain_http_anywhere(true);
        assert_eq!(
            anywhere.check_gateway_url(&url("http://gw.internal:8080")),
            Ok(())
        );
    }

    #[test]
    fn the_default_allows_the_gateway_token_variables_and_the_secrets_directory_only() {
        let refs = AdminTokenRefs::default();
        assert!(refs.allows(&reference("env:GATEHOUSE_GATEWAY_TOKEN")));
        assert!(refs.allows(&reference("env:GATEHOUSE_GATEWAY_TOKEN_WEST")));
        assert!(refs.allows(&reference("file:/run/secrets/gatehouse/west")));
        for refused in [
            "env:GATEHOUSE_PORTAL_OIDC_CLIENT_SECRET",
            "env:PATH",
            "file:/etc/passwd",
            "file:/run/secrets/gatehouse-other",
            "file:/run/secrets/gatehouse/../db-password",
            "file:/run/secrets/gatehouse/a/../../db-password",
        ] {
            assert!(!refs.allows(&reference(refused)), "{refused}");
        }
        let message = refs.refusal(&reference("env:PATH"));
        assert!(
            message.contains("env:GATEHOUSE_GATEWAY_TOKEN or file:/run/secrets/gatehouse/"),
            "{message}"
        );
    }

    #[test]
    fn the_operators_own_references_are_allowed_as_they_are() {
        let refs = AdminTokenRefs::parse("")
            .unwrap()
            .with_exact([reference("file:/srv/dev/admin-token")]);
        assert!(refs.allows(&reference("file:/srv/dev/admin-token")));
        assert!(!refs.allows(&reference("file:/srv/dev/admin-token2")));
        assert!(!refs.allows(&reference("file:/srv/dev/other")));
    }

    #[test]
    fn prefixes_are_checked_when_read() {
        for bad in [
            "file:relative/",
            "file:/no/trailing/slash",
            "file:/a/../b/",
            "env:",
            "vault:x",
        ] {
            assert!(AdminTokenRefs::parse(bad).is_err(), "{bad}");
        }
        let refs = AdminTokenRefs::parse(" env:TOKENS_ , file:/etc/gatehouse/ ").unwrap();
        assert!(refs.allows(&reference("env:TOKENS_A")));
        assert!(refs.allows(&reference("file:/etc/gatehouse/a")));
        assert!(!refs.allows(&reference("env:GATEHOUSE_GATEWAY_TOKEN")));
    }

    #[tokio::test]
    async fn a_refused_reference_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let inside = reference(&format!("file:{}", path.display()));
        let refs = AdminTokenRefs::parse(&format!("file:{}/", dir.path().display())).unwrap();
        assert_eq!(refs.resolve(&inside).await.unwrap(), "s3cret");
        let outside = AdminTokenRefs::default()
            .resolve(&inside)
            .await
            .unwrap_err();
        assert!(!outside.contains("s3cret"), "{outside}");
        assert!(outside.contains("is not one"), "{outside}");
    }
}

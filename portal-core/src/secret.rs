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

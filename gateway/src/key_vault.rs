//! Reading secrets from Azure Key Vault with the gateway's own Entra credential.
//!
//! Wire format, as documented in "Get Secret" (Key Vault REST API 7.4,
//! <https://learn.microsoft.com/rest/api/keyvault/secrets/get-secret/get-secret?view=rest-keyvault-secrets-7.4>):
//! `GET {vaultBaseUrl}/secrets/{secret-name}[/{secret-version}]?api-version=7.4` with
//! `Authorization: Bearer` (a token for `https://vault.azure.net/.default`); success
//! `{"value": "…", "id": "https://{vault}.vault.azure.net/secrets/{name}/{version}",
//! "attributes": {"enabled": true, …}}`; error `{"error": {"code": "…", "message": "…"}}`.
//! Without a version the latest one is returned, which is what makes rotation work.

use std::time::Duration;

use serde_json::Value;

use crate::entra_credential::{CredentialError, KEY_VAULT_SCOPE, TokenCredential};
use crate::secret::Secret;

/// The Key Vault data-plane API version used.
pub const KEY_VAULT_API_VERSION: &str = "7.4";
/// Largest secret answer read (Key Vault secrets are at most 25 KB).
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Why a Key Vault secret could not be read. Never holds the value or the token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyVaultError {
    /// No token for Key Vault.
    #[error("no access token for Key Vault: {0}")]
    Token(#[from] CredentialError),
    /// Key Vault could not be reached.
    #[error("Key Vault could not be reached: {0}")]
    Unreachable(String),
    /// Key Vault refused (401/403), or the secret does not exist (404), or another error.
    #[error("Key Vault answered HTTP {status}: {code}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// `error.code` of the answer (and `innererror.code` when present).
        code: String,
    },
    /// A 2xx answer without a usable value, or a disabled secret.
    #[error("Key Vault answered without a usable secret value: {0}")]
    Unusable(&'static str),
}

/// A Key Vault reader with one Entra credential. Cheap to clone.
#[derive(Clone, Debug)]
pub struct KeyVaultClient {
    credential: TokenCredential,
    http: reqwest::Client,
}

impl KeyVaultClient {
    /// A reader that authenticates as `credential`.
    pub fn new(credential: TokenCredential) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(10))
            // A redirect would carry the token elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        KeyVaultClient { credential, http }
    }

    /// The credential it authenticates with.
    pub fn credential(&self) -> &TokenCredential {
        &self.credential
    }

    /// The current value of the secret at `secret_url` (a Key Vault secret URL that
    /// [`gatehouse_schema::config::SecretRef`] accepted). A 401 drops the cached token and tries
    /// once more with a new one.
    pub async fn get_secret(&self, secret_url: &str) -> Result<Secret<String>, KeyVaultError> {
        let mut url = url::Url::parse(secret_url)
            .map_err(|_| KeyVaultError::Unusable("the reference is not a URL"))?;
        url.query_pairs_mut()
            .append_pair("api-version", KEY_VAULT_API_VERSION);
        let mut retried = false;
        loop {
            let token = self.credential.token(KEY_VAULT_SCOPE).await?;
            let response = self
                .http
                .get(url.clone())
                .bearer_auth(token.expose())
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(|error| {
                    KeyVaultError::Unreachable(if error.is_timeout() {
                        "timed out".to_owned()
                    } else if error.is_connect() {
                        "connection failed".to_owned()
                    } else {
                        "request failed".to_owned()
                    })
                })?;
            let status = response.status();
            let body = read_limited(response).await?;
            if status == reqwest::StatusCode::UNAUTHORIZED && !retried {
                self.credential.forget(KEY_VAULT_SCOPE);
                retried = true;
                continue;
            }
            if !status.is_success() {
                return Err(KeyVaultError::Refused {
                    status: status.as_u16(),
                    code: error_code(&body),
                });
            }
            // Parsed as a `Value` so that no parse error can quote the secret back.
            let answer: Value = serde_json::from_slice(&body)
                .map_err(|_| KeyVaultError::Unusable("the answer is not JSON"))?;
            if answer
                .pointer("/attributes/enabled")
                .and_then(Value::as_bool)
                == Some(false)
            {
                return Err(KeyVaultError::Unusable("the secret is disabled"));
            }
            let value = answer
                .get("value")
                .and_then(Value::as_str)
                .filter(|value| !value.is_empty())
                .ok_or(KeyVaultError::Unusable("no `value`"))?;
            return Ok(Secret::new(value.to_owned()));
        }
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Vec<u8>, KeyVaultError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|_| KeyVaultError::Unreachable("the answer could not be read".to_owned()))?
    {
        if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
            return Err(KeyVaultError::Unusable("the answer is too large"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `Forbidden (AccessDenied)` from a Key Vault error body: codes only, never free text.
fn error_code(body: &[u8]) -> String {
    let short = |value: Option<&Value>| {
        value
            .and_then(Value::as_str)
            .filter(|code| {
                code.len() <= 64 && code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
            .map(str::to_owned)
    };
    let Ok(answer) = serde_json::from_slice::<Value>(body) else {
        return "no error code in the answer".to_owned();
    };
    let code = short(answer.pointer("/error/code"));
    let inner = short(answer.pointer("/error/innererror/code"));
    match (code, inner) {
        (Some(code), Some(inner)) => format!("{code} ({inner})"),
        (Some(code), None) => code,
        _ => "no error code in the answer".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_only() {
        let body = br#"{"error":{"code":"Forbidden","message":"The user ... does not have secrets get permission","innererror":{"code":"AccessDenied"}}}"#;
        assert_eq!(error_code(body), "Forbidden (AccessDenied)");
        assert_eq!(
            error_code(br#"{"error":{"code":"SecretNotFound","message":"x"}}"#),
            "SecretNotFound"
        );
        assert_eq!(error_code(b"nope"), "no error code in the answer");
    }
}

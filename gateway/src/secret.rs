//! Secrets that cannot be printed by accident, and the resolution of secret references.

use std::fmt;

use gatehouse_schema::config::{SecretRef, SecretSource};

/// A secret value. `Debug` and `Display` print `*****`; read it only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    /// Wraps a secret value.
    pub fn new(value: T) -> Self {
        Secret(value)
    }

    /// The secret itself. Every call site is a place where the secret leaves its wrapper.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

impl<T> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("*****")
    }
}

/// Why a secret reference could not be resolved. Never contains the secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The environment variable is not set (or not Unicode).
    #[error("environment variable `{0}` is not set")]
    MissingEnv(String),
    /// The file could not be read.
    #[error("secret file `{path}` could not be read: {source}")]
    File {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The secret is empty.
    #[error("secret `{0}` is empty")]
    Empty(String),
}

/// Reads the secret a reference points to. A trailing newline of a file is not part of the secret.
pub fn resolve(reference: &SecretRef) -> Result<Secret<String>, SecretError> {
    let value = match reference.source() {
        SecretSource::Env(name) => {
            std::env::var(name).map_err(|_| SecretError::MissingEnv(name.to_owned()))?
        }
        SecretSource::File(path) => std::fs::read_to_string(path)
            .map_err(|source| SecretError::File {
                path: path.to_owned(),
                source,
            })?
            .trim_end_matches(['\r', '\n'])
            .to_owned(),
    };
    if value.is_empty() {
        return Err(SecretError::Empty(reference.as_str().to_owned()));
    }
    Ok(Secret::new(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("sk-very-secret".to_owned());
        assert_eq!(format!("{secret:?} {secret}"), "***** *****");
        assert_eq!(secret.expose(), "sk-very-secret");
    }

    #[test]
    fn file_secret_drops_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "abc123\n").unwrap();
        let reference = SecretRef::try_from(format!("file:{}", path.display())).unwrap();
        assert_eq!(resolve(&reference).unwrap().expose(), "abc123");
        let missing = SecretRef::try_from("env:GATEHOUSE_TEST_SURELY_UNSET".to_owned()).unwrap();
        assert!(matches!(resolve(&missing), Err(SecretError::MissingEnv(_))));
    }
}

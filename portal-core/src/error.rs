//! The one error type of the portal's operations, and what a user may be told about it.

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    /// Nobody is signed in.
    #[error("sign in first")]
    NotSignedIn,
    /// The signed-in user lacks the role.
    #[error("your role does not allow this")]
    Forbidden,
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A field's value is not acceptable; `field` names it for the form.
    #[error("{field}: {message}")]
    Invalid {
        /// The form field.
        field: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// The database failed.
    #[error("config database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("config database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("config database holds an unreadable value: {0}")]
    Corrupt(String),
}

impl PortalError {
    /// A message safe to show in a page: internals are logged, never shown.
    pub fn public_message(&self) -> String {
        match self {
            PortalError::Database(_) | PortalError::Migrate(_) | PortalError::Corrupt(_) => {
                tracing::error!(error = %self, "portal operation failed");
                "internal error; the details are in the portal's log".to_owned()
            }
            other => other.to_string(),
        }
    }

    /// An invalid-field error.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        PortalError::Invalid {
            field,
            message: message.into(),
        }
    }

    /// Whether a database error is a unique-constraint violation.
    pub fn is_unique_violation(error: &sqlx::Error) -> bool {
        matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
    }
}

//! The one error type of the portal's operations, and what a user may be told about it.

use time::OffsetDateTime;

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
    /// Someone else changed (or deleted) what a form edits since the form was opened: nothing was
    /// written. `changed_at` is its version now (`None`: it is gone).
    #[error("{}", .what.refusal(.changed_at.as_ref()))]
    Conflict {
        /// What the form edits.
        what: Edited,
        /// When it was last changed, if it still exists.
        changed_at: Option<OffsetDateTime>,
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

/// What an edit form edits, as a [`PortalError::Conflict`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edited {
    /// An access rule.
    AccessRule,
    /// A backend pool (its deployments).
    Pool,
    /// A pool member.
    Member,
    /// The gateway settings.
    GatewaySettings,
    /// The configuration as a whole (a roll-back, from the newest version its page showed).
    Configuration,
    /// A subscription's keys (a rotation, or the end of its overlap).
    Subscription,
}

impl Edited {
    /// The refusal of a change made from a form opened on an older version of it.
    fn refusal(self, changed_at: Option<&OffsetDateTime>) -> String {
        let (this, was, it) = match self {
            Edited::AccessRule => ("This access rule", "was", "it"),
            Edited::Pool => ("This pool", "was", "it"),
            Edited::Member => ("This pool member", "was", "it"),
            Edited::GatewaySettings => ("The gateway settings", "were", "them"),
            Edited::Configuration => ("The configuration", "was", "it"),
            Edited::Subscription => ("This subscription's key", "was", "it"),
        };
        match changed_at {
            Some(at) => format!(
                "{this} {was} changed by someone else since you opened {it} (at {}): reload {it} and apply your change again.",
                moment(*at)
            ),
            None => format!(
                "{this} {was} deleted by someone else since you opened {it}: reload the page."
            ),
        }
    }
}

/// An instant as a person reads it: to the second, in UTC.
fn moment(at: OffsetDateTime) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    at.to_offset(time::UtcOffset::UTC)
        .format(format)
        .unwrap_or_else(|_| at.to_string())
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

//! The signed-in user, as kept in the session, and the role checks every operation makes.

use gatehouse_schema::keys::hash_key;
use gatehouse_schema::portal::Role;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use tower_sessions::Session;
use tower_sessions::session::Id;

use crate::db::ConfigDb;
use crate::error::PortalError;

/// The session key under which the signed-in user is kept.
pub const SESSION_USER_KEY: &str = "gatehouse.user";

/// The session key under which the time the session was last saved to move its expiry is kept;
/// while it is absent, the last save was the sign-in (`signed_in_at`).
const SESSION_SAVED_AT_KEY: &str = "gatehouse.saved_at";

/// How long a signed-in session lasts.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionLifetime {
    /// A session unused this long ends: the expiry the session store keeps and the cookie's
    /// Max-Age, both set again whenever the session is saved.
    pub idle: Duration,
    /// A session this old ends, however active: counted from sign-in.
    pub absolute: Duration,
}

impl SessionLifetime {
    /// How long a session in use goes unsaved: a minute, or a quarter of the idle timeout when
    /// that is shorter. Saved this often rather than on every request (a write to the store each
    /// time), a session ends between `idle` minus this and `idle` after its last use.
    fn save_every(&self) -> Duration {
        (self.idle / 4_u32).min(Duration::MINUTE)
    }
}

/// Who is signed in: taken from a validated ID token (or the dev sign-in) at sign-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionUser {
    /// The issuer's subject (`oid` for Entra ID, else `sub`).
    pub subject: String,
    /// A name to show and to write in the activity log.
    pub name: String,
    /// The user's portal roles.
    pub roles: Vec<Role>,
    /// For a team lead: the group ids they lead.
    #[serde(default)]
    pub led_groups: Vec<String>,
    /// When the user signed in; the absolute session timeout counts from here.
    #[serde(with = "time::serde::rfc3339")]
    pub signed_in_at: OffsetDateTime,
    /// Whether this session came from the development sign-in.
    #[serde(default)]
    pub dev: bool,
}

impl SessionUser {
    /// Whether the user holds `role` (Admin holds every role).
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&Role::Admin) || self.roles.contains(&role)
    }

    /// The activity-log name of the user: their name and subject.
    pub fn actor(&self) -> String {
        if self.dev {
            format!("{} (dev sign-in)", self.name)
        } else {
            format!("{} <{}>", self.name, self.subject)
        }
    }
}

/// Succeeds when someone is signed in and holds one of `roles`.
pub fn require<'a>(
    user: Option<&'a SessionUser>,
    roles: &[Role],
) -> Result<&'a SessionUser, PortalError> {
    let user = user.ok_or(PortalError::NotSignedIn)?;
    if roles.iter().any(|role| user.has(*role)) {
        Ok(user)
    } else {
        Err(PortalError::Forbidden)
    }
}

fn session_failed(error: tower_sessions::session::Error) -> PortalError {
    PortalError::Corrupt(format!("session: {error}"))
}

/// How the signed-out list names a session: the SHA-256 of its id, so that the list holds nothing
/// a cookie could be made from.
fn signed_out_key(id: Id) -> String {
    hash_key(&id.to_string()).to_string()
}

/// The signed-in user of a session. A session older than `lifetime.absolute` is ended here, and
/// so is one signed out ([`sign_out`]; see there why it can be back); one in use is saved again
/// now and then, so that its idle timeout counts from its last use.
///
/// A session ended for its age needs no entry in the signed-out list: should a request in flight
/// bring it back, it comes back with the same `signed_in_at` and is ended again here.
pub async fn current_user(
    session: &Session,
    db: &ConfigDb,
    lifetime: SessionLifetime,
) -> Result<Option<SessionUser>, PortalError> {
    let user: Option<SessionUser> = session
        .get(SESSION_USER_KEY)
        .await
        .map_err(session_failed)?;
    let Some(user) = user else {
        return Ok(None);
    };
    let now = OffsetDateTime::now_utc();
    let signed_out = match session.id() {
        Some(id) => db.is_signed_out(&signed_out_key(id)).await?,
        None => false,
    };
    if signed_out || now - user.signed_in_at > lifetime.absolute {
        session.flush().await.map_err(session_failed)?;
        return Ok(None);
    }
    // tower-sessions saves a session, and so moves its expiry in the store and the cookie's
    // Max-Age, only when the request changed it: without a change now and then, a session in
    // use would end `idle` after sign-in.
    let saved_at: Option<OffsetDateTime> = session
        .get(SESSION_SAVED_AT_KEY)
        .await
        .map_err(session_failed)?;
    if now - saved_at.unwrap_or(user.signed_in_at) >= lifetime.save_every() {
        session
            .insert(SESSION_SAVED_AT_KEY, now)
            .await
            .map_err(session_failed)?;
    }
    Ok(Some(user))
}

/// Lists the session, if someone is signed in to it, as signed out, so that [`current_user`]
/// never trusts it again; the session itself is left as it is (see [`sign_out`]; a sign-in
/// calls this before it gives the session a new id).
///
/// Deleting the session is not enough: a request still in flight that loaded it before (a CSV
/// export, a dashboard query) and changed it (as `current_user` does now and then) saves it when
/// it ends, and the session store's save is an upsert, so the deleted session would be back,
/// user included, and its cookie good again. The entry lasts until the session's absolute
/// lifetime has passed, after which `current_user` refuses the session for its age.
pub async fn revoke(
    session: &Session,
    db: &ConfigDb,
    lifetime: SessionLifetime,
) -> Result<(), PortalError> {
    let user: Option<SessionUser> = session
        .get(SESSION_USER_KEY)
        .await
        .map_err(session_failed)?;
    let (Some(user), Some(id)) = (user, session.id()) else {
        return Ok(());
    };
    let ends_at = user.signed_in_at + lifetime.absolute;
    if ends_at < OffsetDateTime::now_utc() {
        // Refused for its age already.
        return Ok(());
    }
    // A second more, so that the entry outlasts the end however the seconds are cut.
    db.record_signed_out(&signed_out_key(id), ends_at.unix_timestamp() + 1)
        .await
}

/// Signs out: lists the session as signed out ([`revoke`]) and deletes it. It is deleted even
/// when it could not be listed (the error is returned after).
pub async fn sign_out(
    session: &Session,
    db: &ConfigDb,
    lifetime: SessionLifetime,
) -> Result<(), PortalError> {
    let revoked = revoke(session, db, lifetime).await;
    session.flush().await.map_err(session_failed)?;
    revoked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(roles: &[Role]) -> SessionUser {
        SessionUser {
            subject: "s".into(),
            name: "n".into(),
            roles: roles.to_vec(),
            led_groups: vec![],
            signed_in_at: OffsetDateTime::now_utc(),
            dev: false,
        }
    }

    #[test]
    fn admin_holds_every_role_and_others_only_their_own() {
        let admin = user(&[Role::Admin]);
        let auditor = user(&[Role::Auditor]);
        assert!(require(Some(&admin), &[Role::Auditor]).is_ok());
        assert!(require(Some(&auditor), &[Role::Auditor]).is_ok());
        assert!(matches!(
            require(Some(&auditor), &[Role::Admin]),
            Err(PortalError::Forbidden)
        ));
        assert!(matches!(
            require(None, &[Role::Viewer]),
            Err(PortalError::NotSignedIn)
        ));
    }
}

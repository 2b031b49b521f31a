//! Live health of the pool members as each registered gateway sees it: the portal asks every
//! gateway's `GET /_gatehouse/backends` (signed with its admin token) when the pools page is
//! shown, and the alerter does every minute (`insights::alerts`, rule `backend_set_aside`). The answer names
//! the version the gateway runs: one older than it was pushed is recorded
//! ([`crate::push::note_running`]), so that it shows as lagging and is pushed again.

use std::time::Duration;

use gatehouse_schema::backends::{BACKENDS_PATH, BackendStates};
use gatehouse_schema::portal::Role;

use crate::db::GatewayRow;
use crate::error::PortalError;
use crate::ops::Portal;
use crate::push::{admin_endpoint, note_running, without_url};
use crate::secret::AdminTokenRefs;
use crate::user::{SessionUser, require};

/// How long one gateway may take to answer before it counts as unreachable.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// One gateway's view of the members, or why it could not be had.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayBackends {
    /// The gateway's id in the portal.
    pub gateway: String,
    /// What it reported, or the reason it reported nothing.
    pub result: Result<BackendStates, String>,
}

/// Asks one gateway for its members' states with `http`, its admin token read as `refs` allows;
/// the error says why it could not (it names neither the admin token nor the URL).
pub async fn gateway_backends(
    http: &reqwest::Client,
    refs: &AdminTokenRefs,
    gateway: &GatewayRow,
) -> Result<BackendStates, String> {
    let segments: Vec<&str> = BACKENDS_PATH.split('/').filter(|s| !s.is_empty()).collect();
    let (url, token) = admin_endpoint(gateway, &segments, refs).await?;
    let request = crate::push::signed(http.get(url), &token, &reqwest::Method::GET, &segments, b"");
    let response = request
        .timeout(HEALTH_TIMEOUT)
        .send()
        .await
        .map_err(|error| format!("unreachable: {}", without_url(&error)))?;
    if !response.status().is_success() {
        return Err(format!("answered {}", response.status()));
    }
    response
        .json::<BackendStates>()
        .await
        .map_err(|error| format!("unreadable answer: {}", without_url(&error)))
}

impl Portal {
    /// Asks every registered gateway for its members' states: Admin.
    pub async fn backend_health(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<GatewayBackends>, PortalError> {
        require(user, &[Role::Admin])?;
        let mut reports = Vec::new();
        for gateway in self.db.gateways().await? {
            let result = gateway_backends(
                self.publisher.http(),
                self.publisher.admin_token_refs(),
                &gateway,
            )
            .await;
            // The version it runs: one older than it was pushed shows as its lag.
            if let Ok(states) = &result
                && let Err(error) = note_running(&self.db, &gateway, states.version).await
            {
                tracing::warn!(gateway = %gateway.id, %error, "could not record the version the gateway runs");
            }
            reports.push(GatewayBackends {
                gateway: gateway.id,
                result,
            });
        }
        Ok(reports)
    }
}

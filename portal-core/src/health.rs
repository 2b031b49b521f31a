//! Live health of the pool members as each registered gateway sees it: the portal asks every
//! gateway's `GET /_gatehouse/backends` (with its admin token) when the pools page is shown.

use std::time::Duration;

use gatehouse_schema::backends::{BACKENDS_PATH, BackendStates};
use gatehouse_schema::portal::Role;

use crate::error::PortalError;
use crate::ops::Portal;
use crate::push::{admin_endpoint, without_url};
use crate::user::{SessionUser, require};

/// How long one gateway may take to answer before the page shows it as unreachable.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// One gateway's view of the members, or why it could not be had.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayBackends {
    /// The gateway's id in the portal.
    pub gateway: String,
    /// What it reported, or the reason it reported nothing.
    pub result: Result<BackendStates, String>,
}

impl Portal {
    /// Asks every registered gateway for its members' states: Admin.
    pub async fn backend_health(
        &self,
        user: Option<&SessionUser>,
    ) -> Result<Vec<GatewayBackends>, PortalError> {
        require(user, &[Role::Admin])?;
        let segments: Vec<&str> = BACKENDS_PATH.split('/').filter(|s| !s.is_empty()).collect();
        let mut reports = Vec::new();
        for gateway in self.db.gateways().await? {
            let result = async {
                let (url, token) = admin_endpoint(&gateway, &segments).await?;
                let response = self
                    .publisher
                    .http()
                    .get(url)
                    .bearer_auth(token)
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
            .await;
            reports.push(GatewayBackends {
                gateway: gateway.id,
                result,
            });
        }
        Ok(reports)
    }
}

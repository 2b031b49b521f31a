//! The gateway's claim of its `gateway_id` in the audit store.
//!
//! A chain of audit records is `{gateway_id}/{day}`: two gateways running with one id extend the
//! same chains from two ends, and `verify-audit` then reports them as forked, a false alarm of
//! tampering. So a gateway whose audit store is the SQL store claims its id there when it starts
//! (`GatehouseGatewayClaims`), renews the claim while it runs, and gives it up when it stops:
//!
//! - a second gateway started with an id that a running gateway holds **refuses to start**, with
//!   a message that names the holder's host;
//! - a gateway that finds its id held by one that stopped without giving it up (killed, its
//!   machine lost) waits until the claim lapses and takes it, unless the holder renews meanwhile;
//! - the same gateway restarted (the same `state_dir`, which keeps the instance id) holds its own
//!   claim again at once;
//! - a clash found while running (the store unreachable for longer than the lapse, and another
//!   gateway with the id started meanwhile) is logged as an error and shown by the metric
//!   `gatehouse_gateway_id_conflict`; calls go on being served.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use gatehouse_audit::sql::{ClaimOutcome, GatewayClaim, SqlStore};
use prometheus_client::metrics::gauge::Gauge;
use time::OffsetDateTime;

use crate::warning_throttle::WarningThrottle;

/// The file in the state directory that holds this gateway's instance id.
pub const INSTANCE_ID_FILE: &str = "instance-id";

/// How long giving the id up at shutdown may take.
const RELEASE_LIMIT: Duration = Duration::from_secs(5);

/// How often a failing renewal or a clash is logged, at most.
const WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// This gateway's claim of its id in the audit store.
#[derive(Debug)]
pub struct GatewayIdClaim {
    store: SqlStore,
    gateway_id: String,
    instance_id: String,
    host: String,
    lapse: Duration,
    /// The latest time a renewal was sent with (Unix milliseconds): what [`Self::release`]
    /// gives up.
    renewed_until_ms: std::sync::atomic::AtomicI64,
}

impl GatewayIdClaim {
    /// Claims `gateway_id` for this gateway (its instance id kept in `state_dir`) before it
    /// serves. A claim of another gateway that is not renewed within `lapse` is waited out and
    /// taken; a claim that is renewed meanwhile belongs to a running gateway, and then this one
    /// must not start: the error says so and names it.
    pub async fn take(
        store: SqlStore,
        gateway_id: &str,
        state_dir: &Path,
        lapse: Duration,
    ) -> anyhow::Result<GatewayIdClaim> {
        let claim = GatewayIdClaim {
            store,
            gateway_id: gateway_id.to_owned(),
            instance_id: instance_id(state_dir)?,
            host: gethostname::gethostname().to_string_lossy().into_owned(),
            lapse,
            renewed_until_ms: std::sync::atomic::AtomicI64::new(0),
        };
        let started = Instant::now();
        let poll = (lapse / 10).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut first_seen: Option<GatewayClaim> = None;
        loop {
            match claim.renew().await.with_context(|| {
                format!("claiming server.gateway_id {gateway_id:?} in the audit store")
            })? {
                ClaimOutcome::Held => {
                    if first_seen.is_some() {
                        tracing::info!(
                            gateway_id,
                            "the earlier claim of this gateway_id lapsed; it is this gateway's now"
                        );
                    }
                    return Ok(claim);
                }
                ClaimOutcome::HeldByAnother(holder) => {
                    match &first_seen {
                        None => tracing::warn!(
                            gateway_id,
                            holder_host = %holder.host,
                            renewed_ms_ago = holder.renewed_ms_before(OffsetDateTime::now_utc()),
                            lapse_ms = u64::try_from(lapse.as_millis()).unwrap_or(u64::MAX),
                            "another gateway holds this gateway_id in the audit store; waiting for its claim to lapse (a gateway that stopped without giving it up) or to be renewed (a running gateway)"
                        ),
                        Some(first) if *first != holder => {
                            anyhow::bail!(
                                "server.gateway_id {gateway_id:?} belongs to a running gateway on host {:?} (it renewed its claim {} ms ago): two gateways with one gateway_id write the same audit chains, which verify-audit then reports as forked. Give each gateway its own server.gateway_id (the default is the machine's host name)",
                                holder.host,
                                holder.renewed_ms_before(OffsetDateTime::now_utc())
                            );
                        }
                        Some(_) => {}
                    }
                    if started.elapsed() > lapse * 3 {
                        anyhow::bail!(
                            "server.gateway_id {gateway_id:?} is claimed by a gateway on host {:?} whose claim has not lapsed within {} ms although it was not renewed: is that host's clock ahead of this one's?",
                            holder.host,
                            started.elapsed().as_millis()
                        );
                    }
                    first_seen.get_or_insert(holder);
                    tokio::time::sleep(poll).await;
                }
            }
        }
    }

    /// Renews the claim every third of the lapse until the task is aborted, from right after
    /// [`GatewayIdClaim::take`]: the gateway's start (a Key Vault that does not answer may take
    /// a minute) must not let the claim lapse. `conflict`, once set (the gateway's metric, made
    /// with the gateway), is set to 1 while another gateway holds the id, 0 while this one does.
    pub fn keep(
        self: &Arc<Self>,
        conflict: Arc<std::sync::OnceLock<Gauge>>,
    ) -> tokio::task::JoinHandle<()> {
        let claim = Arc::clone(self);
        let conflict = move |value| {
            if let Some(gauge) = conflict.get() {
                gauge.set(value);
            }
        };
        tokio::spawn(async move {
            let warnings = WarningThrottle::new(WARNING_INTERVAL);
            let mut ticker = tokio::time::interval(claim.lapse / 3);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                match claim.renew().await {
                    Ok(ClaimOutcome::Held) => {
                        conflict(0);
                    }
                    Ok(ClaimOutcome::HeldByAnother(holder)) => {
                        conflict(1);
                        if warnings.should_warn() {
                            tracing::error!(
                                gateway_id = %claim.gateway_id,
                                holder_host = %holder.host,
                                "another gateway now holds this gateway_id (it started while this one could not renew its claim): both write the same audit chains, which verify-audit will report as forked; give each gateway its own server.gateway_id"
                            );
                        }
                    }
                    Err(error) => {
                        if warnings.should_warn() {
                            tracing::warn!(
                                %error,
                                gateway_id = %claim.gateway_id,
                                "could not renew this gateway's claim of its gateway_id in the audit store; retrying"
                            );
                        }
                    }
                }
            }
        })
    }

    /// Gives the id up (a gateway stopping), so that another gateway may take it at once. A
    /// store that does not answer within [`RELEASE_LIMIT`] does not keep the gateway from
    /// stopping: the claim is left to lapse. Only the claim as this gateway last renewed it is
    /// given up, so a release the store runs late cannot take the claim from this gateway
    /// restarted meanwhile (the same instance, renewing later).
    pub async fn release(&self) {
        let renewed_until = OffsetDateTime::from_unix_timestamp_nanos(
            i128::from(
                self.renewed_until_ms
                    .load(std::sync::atomic::Ordering::SeqCst),
            ) * 1_000_000,
        )
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let released = tokio::time::timeout(
            RELEASE_LIMIT,
            self.store
                .release_gateway_id(&self.gateway_id, &self.instance_id, renewed_until),
        )
        .await;
        let error = match released {
            Ok(Ok(())) => return,
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!(
                "the audit store did not answer within {} s",
                RELEASE_LIMIT.as_secs()
            ),
        };
        tracing::warn!(%error, gateway_id = %self.gateway_id, "could not give up the claim of this gateway_id; another gateway may take it once it lapses");
    }

    async fn renew(&self) -> Result<ClaimOutcome, gatehouse_audit::sql::StoreError> {
        let now = OffsetDateTime::now_utc();
        // Noted before it is sent: a renewal the store may have run is one the release covers.
        let now_ms = i64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        self.renewed_until_ms
            .fetch_max(now_ms, std::sync::atomic::Ordering::SeqCst);
        self.store
            .claim_gateway_id(
                &self.gateway_id,
                &self.instance_id,
                &self.host,
                now,
                self.lapse,
            )
            .await
    }
}

/// This gateway's instance id: read from `state_dir`, or made and written there on the first
/// start, so that a restarted gateway is recognised as the same one.
fn instance_id(state_dir: &Path) -> anyhow::Result<String> {
    let path = state_dir.join(INSTANCE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => return Ok(text.trim().to_owned()),
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => {
            return Err(error).with_context(|| format!("reading {}", path.display()));
        }
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let id = uuid::Uuid::new_v4().to_string();
    let temporary = state_dir.join(format!("{INSTANCE_ID_FILE}.tmp"));
    std::fs::write(&temporary, &id)
        .and_then(|()| std::fs::rename(&temporary, &path))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_instance_id_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let first = instance_id(&state).unwrap();
        assert_eq!(first.len(), 36);
        assert_eq!(instance_id(&state).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(instance_id(other.path()).unwrap(), first);
    }
}

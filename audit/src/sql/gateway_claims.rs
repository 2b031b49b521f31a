//! Claims of gateway ids: a gateway holds its `gateway_id` in the store while it runs, so that a
//! second gateway configured with the same id is stopped at its start instead of forking that
//! id's audit chains (`GatehouseGatewayClaims`, docs/audit.md "Each gateway needs its own
//! gateway_id").
//!
//! A claim names the gateway's *instance* (a random id the gateway keeps in its `state_dir`, so
//! that the same gateway restarted holds its claim again at once) and is renewed while the
//! gateway runs. Another instance takes a claim only when it has not been renewed for the lapse
//! the caller gives. Times are the gateways' own clocks, so the gateways sharing a store must keep
//! their clocks within a fraction of the lapse of each other (NTP does).

use std::time::Duration;

use time::OffsetDateTime;

use super::{Engine, SqlStore, StoreError};

/// Who holds a gateway id, as the store last heard from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayClaim {
    /// The instance holding the id (random, from its `state_dir`).
    pub instance_id: String,
    /// The host name the holder gave.
    pub host: String,
    /// When the holder last renewed its claim (Unix milliseconds of its clock).
    pub seen_at_ms: i64,
}

impl GatewayClaim {
    /// Milliseconds from the holder's last renewal to `now` (negative when the holder's clock is
    /// ahead of the one `now` was read from).
    pub fn renewed_ms_before(&self, now: OffsetDateTime) -> i64 {
        unix_ms(now).saturating_sub(self.seen_at_ms)
    }
}

/// What [`SqlStore::claim_gateway_id`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The id is this instance's: claimed now, renewed, or taken over from a lapsed claim.
    Held,
    /// Another instance renewed its claim of the id within the lapse.
    HeldByAnother(GatewayClaim),
}

/// Inserts a claim, or renews this instance's, or takes over one not renewed since `$5`; answers
/// a row only when the id is this instance's afterwards. A renewal never moves `SeenAtMs` back
/// (one the store runs late, or a clock stepped back), so that a release of the claim as it was
/// renewed earlier leaves a later renewal's.
const SQLITE_CLAIM: &str = "INSERT INTO GatehouseGatewayClaims (GatewayId, InstanceId, Host, ClaimedAtMs, SeenAtMs) VALUES (?1, ?2, ?3, ?4, ?4) \
     ON CONFLICT (GatewayId) DO UPDATE SET \
     ClaimedAtMs = CASE WHEN GatehouseGatewayClaims.InstanceId = excluded.InstanceId THEN GatehouseGatewayClaims.ClaimedAtMs ELSE excluded.ClaimedAtMs END, \
     SeenAtMs = CASE WHEN GatehouseGatewayClaims.InstanceId = excluded.InstanceId THEN MAX(GatehouseGatewayClaims.SeenAtMs, excluded.SeenAtMs) ELSE excluded.SeenAtMs END, \
     InstanceId = excluded.InstanceId, Host = excluded.Host \
     WHERE GatehouseGatewayClaims.InstanceId = excluded.InstanceId OR GatehouseGatewayClaims.SeenAtMs < ?5 \
     RETURNING GatewayId";
const POSTGRES_CLAIM: &str = r#"INSERT INTO "GatehouseGatewayClaims" AS c ("GatewayId", "InstanceId", "Host", "ClaimedAtMs", "SeenAtMs") VALUES ($1, $2, $3, $4, $4) ON CONFLICT ("GatewayId") DO UPDATE SET "ClaimedAtMs" = CASE WHEN c."InstanceId" = EXCLUDED."InstanceId" THEN c."ClaimedAtMs" ELSE EXCLUDED."ClaimedAtMs" END, "InstanceId" = EXCLUDED."InstanceId", "Host" = EXCLUDED."Host", "SeenAtMs" = CASE WHEN c."InstanceId" = EXCLUDED."InstanceId" THEN GREATEST(c."SeenAtMs", EXCLUDED."SeenAtMs") ELSE EXCLUDED."SeenAtMs" END WHERE c."InstanceId" = EXCLUDED."InstanceId" OR c."SeenAtMs" < $5 RETURNING "GatewayId""#;

const SQLITE_HOLDER: &str =
    "SELECT InstanceId, Host, SeenAtMs FROM GatehouseGatewayClaims WHERE GatewayId = ?1";
const POSTGRES_HOLDER: &str = r#"SELECT "InstanceId", "Host", "SeenAtMs" FROM "GatehouseGatewayClaims" WHERE "GatewayId" = $1"#;

const SQLITE_RELEASE: &str = "DELETE FROM GatehouseGatewayClaims WHERE GatewayId = ?1 AND InstanceId = ?2 AND SeenAtMs <= ?3";
const POSTGRES_RELEASE: &str = r#"DELETE FROM "GatehouseGatewayClaims" WHERE "GatewayId" = $1 AND "InstanceId" = $2 AND "SeenAtMs" <= $3"#;

/// Unix milliseconds of `time`.
fn unix_ms(time: OffsetDateTime) -> i64 {
    i64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

impl SqlStore {
    /// Claims `gateway_id` for `instance_id` (on `host`) at `now`: a new claim, a renewal of this
    /// instance's own, or the takeover of another instance's claim that was not renewed within
    /// `lapse`. Otherwise answers who holds it. One statement, so two gateways claiming at once
    /// cannot both succeed.
    pub async fn claim_gateway_id(
        &self,
        gateway_id: &str,
        instance_id: &str,
        host: &str,
        now: OffsetDateTime,
        lapse: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let now_ms = unix_ms(now);
        let lapsed_before =
            now_ms.saturating_sub(i64::try_from(lapse.as_millis()).unwrap_or(i64::MAX));
        // A claim released between the two statements leaves nothing to report: claim again.
        for _ in 0..3 {
            let claimed: Option<String> = match &self.engine {
                Engine::Sqlite { writer, .. } => {
                    sqlx::query_scalar(SQLITE_CLAIM)
                        .bind(gateway_id)
                        .bind(instance_id)
                        .bind(host)
                        .bind(now_ms)
                        .bind(lapsed_before)
                        .fetch_optional(writer)
                        .await?
                }
                Engine::Postgres { pool, .. } => {
                    sqlx::query_scalar(POSTGRES_CLAIM)
                        .bind(gateway_id)
                        .bind(instance_id)
                        .bind(host)
                        .bind(now_ms)
                        .bind(lapsed_before)
                        .fetch_optional(pool)
                        .await?
                }
            };
            if claimed.is_some() {
                return Ok(ClaimOutcome::Held);
            }
            if let Some(holder) = self.gateway_id_holder(gateway_id).await? {
                return Ok(ClaimOutcome::HeldByAnother(holder));
            }
        }
        Err(StoreError::Database(sqlx::Error::Protocol(format!(
            "the claim of gateway id {gateway_id:?} changed hands three times while it was claimed"
        ))))
    }

    /// Who holds `gateway_id`, if anyone.
    pub async fn gateway_id_holder(
        &self,
        gateway_id: &str,
    ) -> Result<Option<GatewayClaim>, StoreError> {
        let row: Option<(String, String, i64)> = match &self.engine {
            Engine::Sqlite { writer, .. } => {
                sqlx::query_as(SQLITE_HOLDER)
                    .bind(gateway_id)
                    .fetch_optional(writer)
                    .await?
            }
            Engine::Postgres { pool, .. } => {
                sqlx::query_as(POSTGRES_HOLDER)
                    .bind(gateway_id)
                    .fetch_optional(pool)
                    .await?
            }
        };
        Ok(row.map(|(instance_id, host, seen_at_ms)| GatewayClaim {
            instance_id,
            host,
            seen_at_ms,
        }))
    }

    /// Gives up `instance_id`'s claim of `gateway_id` (a gateway stopping), so that another
    /// gateway may take the id at once, if the claim was last renewed at or before
    /// `renewed_until` (the latest renewal the stopping gateway sent). Another instance's claim is
    /// left alone, and so is a later renewal of this instance's: the same gateway restarted while
    /// a slow store had not run this release yet keeps the claim it holds again.
    pub async fn release_gateway_id(
        &self,
        gateway_id: &str,
        instance_id: &str,
        renewed_until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        match &self.engine {
            Engine::Sqlite { writer, .. } => {
                sqlx::query(SQLITE_RELEASE)
                    .bind(gateway_id)
                    .bind(instance_id)
                    .bind(unix_ms(renewed_until))
                    .execute(writer)
                    .await?;
            }
            Engine::Postgres { pool, .. } => {
                sqlx::query(POSTGRES_RELEASE)
                    .bind(gateway_id)
                    .bind(instance_id)
                    .bind(unix_ms(renewed_until))
                    .execute(pool)
                    .await?;
            }
        }
        Ok(())
    }
}

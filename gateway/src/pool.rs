//! Backend pools: which member takes the next attempt, and which are set aside.
//!
//! Selection follows Azure's smart load balancing (`azure-specs.md` §2.6, §7): the lowest priority
//! number that has an available member wins, weighted-random inside that group. A member that
//! answers 429 or 5xx, or cannot be reached, is set aside until the time its response asks for;
//! one whose answer breaks or falls silent after it began, for the default wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use gatehouse_schema::config::PoolMember;
use rand::Rng;

use crate::entra_credential::TokenCredential;
use crate::secret::SecretValue;

/// A pool of members serving the same deployments.
#[derive(Debug)]
pub struct Pool {
    /// Pool id from the snapshot.
    pub id: String,
    /// Members in snapshot order.
    pub members: Vec<Arc<Member>>,
}

/// One backend member with what the gateway needs to call it.
#[derive(Debug)]
pub struct Member {
    /// The member's configuration.
    pub config: PoolMember,
    /// HTTP client with this member's TLS settings.
    pub client: crate::upstream::BackendClient,
    /// The credential sent to the member.
    pub credential: Option<MemberCredential>,
    /// Availability, shared across snapshots for the same member id.
    pub health: Arc<MemberHealth>,
}

/// How the gateway authenticates to a member.
#[derive(Debug, Clone)]
pub enum MemberCredential {
    /// A key, read per call (a Key Vault value may rotate): `api-key` for Azure members,
    /// `Authorization: Bearer` for OpenAI ones.
    ApiKey(SecretValue),
    /// An Entra ID access token for `scope`, sent as `Authorization: Bearer`.
    Entra {
        /// The identity, shared with every member and snapshot that uses it.
        credential: TokenCredential,
        /// The token scope.
        scope: String,
    },
}

/// Why a member is set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetAsideReason {
    /// It answered 429.
    Throttled,
    /// It answered 5xx or could not be reached.
    Failing,
}

/// Whether a member may take calls, lock-free.
///
/// One atomic holds both when the member is back and why it was set aside, so that a reader
/// never sees the time of one setting with the reason of another.
#[derive(Debug, Default)]
pub struct MemberHealth {
    /// Milliseconds since [`clock_origin`] until which the member is set aside, shifted left by
    /// [`REASON_BITS`], with the reason (0 = available, 1 = throttled, 2 = failing) below: later
    /// times compare larger whatever the reason. 0 = never set aside.
    state: AtomicU64,
}

/// Bits of [`MemberHealth::state`] that hold the reason.
const REASON_BITS: u32 = 2;

/// A fixed origin for the monotonic clock, so that instants fit in an atomic.
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn millis_since_origin(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(clock_origin()).as_millis()).unwrap_or(u64::MAX)
}

impl MemberHealth {
    /// Sets the member aside for `wait` from `now`. A throttle replaces whatever the member was
    /// set aside for (the latest answer of a member says best how long it needs); a failure
    /// does not cut short a longer throttle (a call already under way that then times out, or a
    /// 5xx without a hint, says nothing of when the member takes calls again), so that a pool
    /// whose members all throttle still answers 429 with their wait, not 503.
    pub fn set_aside(&self, reason: SetAsideReason, wait: Duration, now: Instant) {
        match reason {
            SetAsideReason::Throttled => self
                .state
                .store(Self::aside_state(reason, wait, now), Ordering::Release),
            SetAsideReason::Failing => self.set_aside_at_least(reason, wait, now),
        }
    }

    /// Sets the member aside for `wait` from `now`, unless it is already set aside for longer
    /// (a throttled member whose `Retry-After` runs past `wait` stays throttled).
    pub fn set_aside_at_least(&self, reason: SetAsideReason, wait: Duration, now: Instant) {
        self.state
            .fetch_max(Self::aside_state(reason, wait, now), Ordering::AcqRel);
    }

    fn aside_state(reason: SetAsideReason, wait: Duration, now: Instant) -> u64 {
        let wait_ms = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
        let until = millis_since_origin(now)
            .saturating_add(wait_ms)
            .clamp(1, u64::MAX >> REASON_BITS);
        let reason = match reason {
            SetAsideReason::Throttled => 1,
            SetAsideReason::Failing => 2,
        };
        until << REASON_BITS | reason
    }

    /// Makes the member available again if it is set aside as failing (not if throttled): what
    /// made it fail was changed (the files of its TLS settings).
    pub fn forgive_failure(&self) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (state & ((1 << REASON_BITS) - 1) == 2).then_some(0)
            });
    }

    /// `None` when available at `now`, else why and for how much longer.
    pub fn set_aside_state(&self, now: Instant) -> Option<(SetAsideReason, Duration)> {
        let state = self.state.load(Ordering::Acquire);
        let until = state >> REASON_BITS;
        let now_ms = millis_since_origin(now);
        if until == 0 || now_ms >= until {
            return None;
        }
        let reason = match state & ((1 << REASON_BITS) - 1) {
            1 => SetAsideReason::Throttled,
            _ => SetAsideReason::Failing,
        };
        Some((reason, Duration::from_millis(until - now_ms)))
    }
}

/// Member health by member id and where the member sends calls, kept across snapshot swaps so
/// that a config push does not forget that a member is throttled — unless the push moves the
/// member (another endpoint or deployment): the new target has never been seen failing, and an
/// operator who fixes a wrong endpoint must not wait out the old one's `Retry-After`. Records
/// are never dropped (a snapshot is built before it may be refused, and the running one keeps
/// its members' records); one is a few bytes per place a member was ever sent.
#[derive(Debug, Default)]
pub struct HealthRegistry {
    members: Mutex<HashMap<HealthKey, Arc<MemberHealth>>>,
}

/// What a member's health belongs to: its id, endpoint and deployment rename.
type HealthKey = (String, String, Option<String>);

impl HealthRegistry {
    /// The health record of `member`, created on first use; a member whose endpoint or
    /// deployment changed gets another one.
    pub fn health_of(&self, member: &PoolMember) -> Arc<MemberHealth> {
        let key = (
            member.id.clone(),
            member.endpoint.as_str().to_owned(),
            member.deployment.clone(),
        );
        let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(members.entry(key).or_default())
    }
}

/// The outcome of asking a pool for a member.
#[derive(Debug)]
pub enum Selection {
    /// Call this member.
    Member(Arc<Member>),
    /// Every member is set aside and at least one is throttled: wait this long.
    AllThrottled(Duration),
    /// Every member is set aside for failures.
    AllUnavailable,
}

impl Pool {
    /// Picks the member for the next attempt, skipping those in `tried`.
    pub fn select(&self, tried: &[usize], now: Instant) -> (Selection, Option<usize>) {
        let mut best_priority = u32::MAX;
        let mut candidates: Vec<usize> = Vec::new();
        for (index, member) in self.members.iter().enumerate() {
            if tried.contains(&index) || member.health.set_aside_state(now).is_some() {
                continue;
            }
            let priority = member.config.priority;
            if priority < best_priority {
                best_priority = priority;
                candidates.clear();
            }
            if priority == best_priority {
                candidates.push(index);
            }
        }
        if let Some(index) = pick_weighted(&self.members, &candidates) {
            return (
                Selection::Member(Arc::clone(&self.members[index])),
                Some(index),
            );
        }
        // 429 when any member is throttled, with the wait until the first member of any kind
        // is back: a failing member that returns in 10 s ends the wait of a 60 s throttle.
        let set_aside: Vec<(SetAsideReason, Duration)> = self
            .members
            .iter()
            .filter_map(|m| m.health.set_aside_state(now))
            .collect();
        let any_throttled = set_aside
            .iter()
            .any(|(reason, _)| *reason == SetAsideReason::Throttled);
        match set_aside.iter().map(|(_, wait)| *wait).min() {
            Some(wait) if any_throttled => (Selection::AllThrottled(wait), None),
            _ => (Selection::AllUnavailable, None),
        }
    }

    /// The index of the member with `id`.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.members.iter().position(|m| m.config.id == id)
    }
}

fn pick_weighted(members: &[Arc<Member>], candidates: &[usize]) -> Option<usize> {
    match candidates {
        [] => None,
        [only] => Some(*only),
        _ => {
            let total: u64 = candidates
                .iter()
                .map(|&i| u64::from(members[i].config.weight))
                .sum();
            if total == 0 {
                return candidates.first().copied();
            }
            let mut ticket = rand::rng().random_range(0..total);
            for &index in candidates {
                let weight = u64::from(members[index].config.weight);
                if ticket < weight {
                    return Some(index);
                }
                ticket -= weight;
            }
            candidates.last().copied()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, priority: u32, weight: u32) -> Arc<Member> {
        let config: PoolMember = serde_json::from_value(serde_json::json!({
            "id": id, "endpoint": "http://127.0.0.1:1", "priority": priority, "weight": weight
        }))
        .unwrap();
        Arc::new(Member {
            config,
            client: crate::upstream::BackendClient::new(
                &Default::default(),
                Duration::from_secs(1),
            )
            .unwrap(),
            credential: None,
            health: Arc::new(MemberHealth::default()),
        })
    }

    #[test]
    fn a_failure_does_not_cut_a_longer_throttle_short() {
        let pool = Pool {
            id: "p".into(),
            members: vec![member("a", 1, 1)],
        };
        let now = Instant::now();
        let health = &pool.members[0].health;
        health.set_aside(SetAsideReason::Throttled, Duration::from_secs(60), now);
        // A call already under way when the throttle came times out.
        health.set_aside(SetAsideReason::Failing, Duration::from_secs(10), now);
        match pool.select(&[], now).0 {
            Selection::AllThrottled(wait) => assert_eq!(wait, Duration::from_secs(60)),
            other => panic!("{other:?}"),
        }
        // A shorter throttle the member answers later replaces it; a longer failure outlasts it.
        health.set_aside(SetAsideReason::Throttled, Duration::from_secs(5), now);
        health.set_aside(SetAsideReason::Failing, Duration::from_secs(30), now);
        assert!(matches!(pool.select(&[], now).0, Selection::AllUnavailable));
    }

    fn chosen(pool: &Pool, now: Instant) -> String {
        match pool.select(&[], now).0 {
            Selection::Member(m) => m.config.id.clone(),
            other => panic!("no member: {other:?}"),
        }
    }

    #[test]
    fn lowest_priority_wins_and_weights_split_traffic() {
        let pool = Pool {
            id: "p".into(),
            members: vec![member("a", 1, 3), member("b", 1, 1), member("c", 2, 1)],
        };
        let now = Instant::now();
        let mut counts = HashMap::new();
        for _ in 0..4000 {
            *counts.entry(chosen(&pool, now)).or_insert(0) += 1;
        }
        assert_eq!(
            counts.get("c"),
            None,
            "priority 2 must not be used while priority 1 is available"
        );
        let a = f64::from(counts["a"]);
        let b = f64::from(counts["b"]);
        assert!((a / b - 3.0).abs() < 0.6, "weights 3:1 gave {a}:{b}");
    }

    #[test]
    fn set_aside_members_fall_through_then_return() {
        let pool = Pool {
            id: "p".into(),
            members: vec![member("a", 1, 1), member("b", 2, 1)],
        };
        let now = Instant::now();
        pool.members[0]
            .health
            .set_aside(SetAsideReason::Throttled, Duration::from_secs(5), now);
        assert_eq!(chosen(&pool, now), "b");
        pool.members[1]
            .health
            .set_aside(SetAsideReason::Throttled, Duration::from_secs(2), now);
        match pool.select(&[], now).0 {
            Selection::AllThrottled(wait) => assert_eq!(wait, Duration::from_secs(2)),
            other => panic!("{other:?}"),
        }
        assert_eq!(chosen(&pool, now + Duration::from_secs(6)), "a");
    }

    #[test]
    fn a_throttled_pool_waits_only_until_its_first_member_is_back() {
        let pool = Pool {
            id: "p".into(),
            members: vec![member("a", 1, 1), member("b", 1, 1)],
        };
        let now = Instant::now();
        pool.members[0]
            .health
            .set_aside(SetAsideReason::Throttled, Duration::from_secs(60), now);
        pool.members[1]
            .health
            .set_aside(SetAsideReason::Failing, Duration::from_secs(10), now);
        match pool.select(&[], now).0 {
            Selection::AllThrottled(wait) => assert_eq!(wait, Duration::from_secs(10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_member_moved_to_another_endpoint_or_deployment_starts_afresh() {
        let registry = HealthRegistry::default();
        let now = Instant::now();
        let config = member("a", 1, 1).config.clone();
        registry.health_of(&config).set_aside(
            SetAsideReason::Failing,
            Duration::from_secs(3600),
            now,
        );
        // The same member pushed again (another weight) keeps its state.
        let reweighted = PoolMember {
            weight: 5,
            ..config.clone()
        };
        assert!(
            registry
                .health_of(&reweighted)
                .set_aside_state(now)
                .is_some()
        );
        let moved = PoolMember {
            endpoint: "http://127.0.0.1:2".parse().unwrap(),
            ..config.clone()
        };
        assert_eq!(registry.health_of(&moved).set_aside_state(now), None);
        let renamed = PoolMember {
            deployment: Some("gpt-4o-2".into()),
            ..config.clone()
        };
        assert_eq!(registry.health_of(&renamed).set_aside_state(now), None);
        // A push that moved it and was then refused (its snapshot built, not installed) leaves
        // the running member's record as it was.
        assert!(
            registry.health_of(&config).set_aside_state(now).is_some(),
            "the running member keeps its record"
        );
    }

    #[test]
    fn all_failing_is_unavailable() {
        let pool = Pool {
            id: "p".into(),
            members: vec![member("a", 1, 1)],
        };
        let now = Instant::now();
        pool.members[0]
            .health
            .set_aside(SetAsideReason::Failing, Duration::from_secs(5), now);
        assert!(matches!(pool.select(&[], now).0, Selection::AllUnavailable));
    }

    #[test]
    fn a_shorter_set_aside_never_cuts_a_longer_one_short() {
        let health = MemberHealth::default();
        let now = Instant::now();
        health.set_aside(SetAsideReason::Throttled, Duration::from_secs(60), now);
        health.set_aside_at_least(SetAsideReason::Failing, Duration::from_secs(10), now);
        assert_eq!(
            health.set_aside_state(now),
            Some((SetAsideReason::Throttled, Duration::from_secs(60)))
        );
        // Past the throttle's end, a failure sets the member aside again, as failing.
        let later = now + Duration::from_secs(61);
        health.set_aside_at_least(SetAsideReason::Failing, Duration::from_secs(10), later);
        assert_eq!(
            health.set_aside_state(later),
            Some((SetAsideReason::Failing, Duration::from_secs(10)))
        );
        // A plain set_aside replaces: the latest answer says how long.
        health.set_aside(SetAsideReason::Throttled, Duration::from_secs(2), later);
        assert_eq!(
            health.set_aside_state(later),
            Some((SetAsideReason::Throttled, Duration::from_secs(2)))
        );
        assert_eq!(health.set_aside_state(later + Duration::from_secs(2)), None);
    }
}

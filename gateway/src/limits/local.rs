//! The in-process limit store: every counter in one map behind one mutex, so that checking and
//! charging all of a call's counters is one short critical section.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::{Adjustment, Bucket, BucketKind, StoreAnswer, bucket};

/// Every how many operations expired counters are swept out of the map.
const SWEEP_EVERY: u64 = 4_096;

/// Counters of this process.
#[derive(Debug, Default)]
pub(crate) struct LocalStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    slots: HashMap<String, Slot>,
    operations: u64,
}

/// One counter.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    /// A rate bucket: `used` tokens (or requests) at `at_us`; it drains at `per_minute`.
    Rate {
        used: f64,
        at_us: i64,
        per_minute: u64,
    },
    /// A quota: `used` tokens in the window that starts at `window_start` and ends at
    /// `window_end` (seconds).
    Quota {
        used: u64,
        window_start: i64,
        window_end: i64,
    },
}

impl Slot {
    /// Whether the counter holds nothing any more at `now_us` (it can be forgotten).
    fn expired(&self, now_us: i64) -> bool {
        match *self {
            Slot::Rate {
                used,
                at_us,
                per_minute,
            } => bucket::drained(used, now_us - at_us, per_minute) <= 0.0,
            Slot::Quota { window_end, .. } => now_us / 1_000_000 >= window_end,
        }
    }
}

impl LocalStore {
    /// Checks every bucket at `now_us` and charges them all, or none.
    pub(crate) fn admit(&self, buckets: &[Bucket], now_us: i64) -> StoreAnswer {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sweep_now_and_then(now_us);
        let now_s = now_us.div_euclid(1_000_000);
        // Phase 1: what each counter holds now, and whether the call fits.
        let mut current = Vec::with_capacity(buckets.len());
        let mut quota_refusal: Option<(usize, u64)> = None;
        let mut rate_refusal: Option<(usize, u64)> = None;
        for (index, b) in buckets.iter().enumerate() {
            match b.kind {
                BucketKind::Requests { per_minute } | BucketKind::Tokens { per_minute } => {
                    let used = state.rate_used(&b.key, per_minute, now_us);
                    let wait = bucket::wait_ms(used, b.cost, per_minute);
                    if wait > 0 && rate_refusal.is_none_or(|(_, longest)| wait > longest) {
                        rate_refusal = Some((index, wait));
                    }
                    current.push((used, 0, 0));
                }
                BucketKind::Quota { tokens, period } => {
                    let (start, end) = period.window(now_s);
                    let used = state.quota_used(&b.key, start);
                    if used.saturating_add(b.cost) > tokens {
                        let wait = u64::try_from((end * 1_000_000 - now_us).div_euclid(1_000))
                            .unwrap_or(0);
                        if quota_refusal.is_none_or(|(_, longest)| wait > longest) {
                            quota_refusal = Some((index, wait));
                        }
                    }
                    current.push((used as f64, start, end));
                }
            }
        }
        // A quota refusal names the refusal (403, the window's end) before a rate's (429); the
        // wait is the longest of every refusing bucket, so that a retry after it is not refused
        // again by another.
        if let Some((bucket, wait_ms)) = quota_refusal.or(rate_refusal) {
            let wait_ms = [quota_refusal, rate_refusal]
                .into_iter()
                .flatten()
                .map(|(_, wait)| wait)
                .fold(wait_ms, u64::max);
            return StoreAnswer::Refused { bucket, wait_ms };
        }
        // Phase 2: charge every counter.
        let mut levels = Vec::with_capacity(buckets.len());
        for (b, (used, start, end)) in buckets.iter().zip(current) {
            match b.kind {
                BucketKind::Requests { per_minute } | BucketKind::Tokens { per_minute } => {
                    let used = used + b.cost as f64;
                    state.slots.insert(
                        b.key.clone(),
                        Slot::Rate {
                            used,
                            at_us: now_us,
                            per_minute,
                        },
                    );
                    levels.push((remaining(per_minute as f64 - used), 0));
                }
                BucketKind::Quota { tokens, .. } => {
                    let used = (used as u64).saturating_add(b.cost);
                    state.slots.insert(
                        b.key.clone(),
                        Slot::Quota {
                            used,
                            window_start: start,
                            window_end: end,
                        },
                    );
                    levels.push((tokens.saturating_sub(used), start));
                }
            }
        }
        StoreAnswer::Admitted(levels)
    }

    /// Charges every bucket its cost at `now_us`, refusing none (work already done): a rate
    /// drains first, a quota is charged in its window of `now_us`, a new one if it has begun.
    pub(crate) fn charge(&self, buckets: &[Bucket], now_us: i64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.sweep_now_and_then(now_us);
        let now_s = now_us.div_euclid(1_000_000);
        for b in buckets {
            let slot = match b.kind {
                BucketKind::Requests { per_minute } | BucketKind::Tokens { per_minute } => {
                    Slot::Rate {
                        used: state.rate_used(&b.key, per_minute, now_us) + b.cost as f64,
                        at_us: now_us,
                        per_minute,
                    }
                }
                BucketKind::Quota { period, .. } => {
                    let (start, end) = period.window(now_s);
                    Slot::Quota {
                        used: state.quota_used(&b.key, start).saturating_add(b.cost),
                        window_start: start,
                        window_end: end,
                    }
                }
            };
            state.slots.insert(b.key.clone(), slot);
        }
    }

    /// Applies corrections at `now_us`: rates drain first, then take the delta (never below
    /// zero). A quota is corrected in the window that was charged while it lasts; once another
    /// window has begun, tokens the call used beyond its reservation are charged to the window
    /// of now (the work was done) and a refund is dropped (the new window never held it).
    pub(crate) fn adjust(&self, adjustments: &[Adjustment], now_us: i64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        for adjustment in adjustments {
            if let BucketKind::Quota { period, .. } = adjustment.kind {
                let now_s = now_us.div_euclid(1_000_000);
                let (start, end) = period.window(now_s);
                // The window charged at admission, if it is still the window of now (a slot is
                // moved to a new window only by the next charge).
                let in_charged_window = start == adjustment.window_start
                    && matches!(
                        state.slots.get(&adjustment.key),
                        Some(Slot::Quota { window_start, .. }) if *window_start == start
                    );
                let used = state.quota_used(&adjustment.key, start);
                let used = if in_charged_window {
                    used.saturating_add_signed(adjustment.delta)
                } else if adjustment.delta > 0 && start >= adjustment.window_start {
                    used.saturating_add(adjustment.delta.unsigned_abs())
                } else {
                    continue;
                };
                state.slots.insert(
                    adjustment.key.clone(),
                    Slot::Quota {
                        used,
                        window_start: start,
                        window_end: end,
                    },
                );
                continue;
            }
            let Some(slot) = state.slots.get_mut(&adjustment.key) else {
                // A drained rate bucket: nothing to correct, except a rate that the call
                // overran — the excess still counts.
                if let BucketKind::Tokens { per_minute } = adjustment.kind
                    && adjustment.delta > 0
                {
                    state.slots.insert(
                        adjustment.key.clone(),
                        Slot::Rate {
                            used: adjustment.delta as f64,
                            at_us: now_us,
                            per_minute,
                        },
                    );
                }
                continue;
            };
            match slot {
                Slot::Rate {
                    used,
                    at_us,
                    per_minute,
                } => {
                    let drained = bucket::drained(*used, now_us - *at_us, *per_minute);
                    *used = (drained + adjustment.delta as f64).max(0.0);
                    *at_us = now_us;
                }
                // A rate's key never holds a quota (the key names its kind).
                Slot::Quota { .. } => {}
            }
        }
    }

    /// How many counters the map holds (for tests of the sweep).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .slots
            .len()
    }
}

impl State {
    /// What the rate bucket `key` (draining at `per_minute`) holds at `now_us`.
    fn rate_used(&self, key: &str, per_minute: u64, now_us: i64) -> f64 {
        match self.slots.get(key) {
            Some(Slot::Rate { used, at_us, .. }) => {
                bucket::drained(*used, now_us - at_us, per_minute)
            }
            _ => 0.0,
        }
    }

    /// What the quota `key` holds in the window that starts at `start` (nothing when its count
    /// is of another window).
    fn quota_used(&self, key: &str, start: i64) -> u64 {
        match self.slots.get(key) {
            Some(Slot::Quota {
                used, window_start, ..
            }) if *window_start == start => *used,
            _ => 0,
        }
    }

    /// Forgets counters that hold nothing, every [`SWEEP_EVERY`] operations, so that counters of
    /// callers who went away do not pile up.
    fn sweep_now_and_then(&mut self, now_us: i64) {
        self.operations += 1;
        if self.operations.is_multiple_of(SWEEP_EVERY) {
            self.slots.retain(|_, slot| !slot.expired(now_us));
        }
    }
}

/// Whole units left, never negative.
fn remaining(left: f64) -> u64 {
    if left <= 0.0 { 0 } else { left.floor() as u64 }
}

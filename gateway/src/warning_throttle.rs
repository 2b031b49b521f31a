//! At most one warning per interval about a failing dependency (a Redis store, say), while every
//! failure is still counted in a metric: a store that is down fails every call, and one log line
//! per call would bury the rest of the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Says whether a failure should be logged now: the first one always, then at most one per
/// interval. Lock-free; shared by every call.
#[derive(Debug)]
pub(crate) struct WarningThrottle {
    interval: Duration,
    /// When this throttle was made: `last_ms` counts from it.
    since: Instant,
    /// Milliseconds after `since` plus one of the last warning; 0 before the first.
    last_ms: AtomicU64,
}

impl WarningThrottle {
    /// A throttle letting through one warning per `interval`.
    pub(crate) fn new(interval: Duration) -> WarningThrottle {
        WarningThrottle {
            interval,
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// True when a warning may be logged now; then the next one waits a whole interval. Of
    /// several calls at once, one is told yes.
    pub(crate) fn should_warn(&self) -> bool {
        let now_ms = u64::try_from(self.since.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1);
        let interval_ms = u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX);
        let last = self.last_ms.load(Ordering::Relaxed);
        (last == 0 || now_ms.saturating_sub(last) >= interval_ms)
            && self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_and_the_next_only_after_the_interval() {
        let throttle = WarningThrottle::new(Duration::from_millis(50));
        assert!(throttle.should_warn(), "the first failure is logged");
        assert!(!throttle.should_warn(), "the second, at once, is not");
        assert!(!throttle.should_warn());
        std::thread::sleep(Duration::from_millis(60));
        assert!(throttle.should_warn(), "a whole interval later, one is");
        assert!(!throttle.should_warn());
    }

    #[test]
    fn of_many_threads_at_once_one_logs() {
        let throttle = std::sync::Arc::new(WarningThrottle::new(Duration::from_secs(3600)));
        let told_yes: usize = (0..8)
            .map(|_| {
                let throttle = throttle.clone();
                std::thread::spawn(move || usize::from(throttle.should_warn()))
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|thread| thread.join().expect("no panic"))
            .sum();
        assert_eq!(told_yes, 1);
    }
}

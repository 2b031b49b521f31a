//! The longest pause allowed while waiting on the other side of a connection: a backend's answer
//! that has begun, or a client that takes the gateway's answer.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A limit on one pause. The count starts when a wait begins (the first [`IdleDeadline::expired`]
/// after [`IdleDeadline::progressed`]) and runs only while the owner waits, so time spent on other
/// work never counts against the peer. The timer is made on the first wait, so work that never
/// has to wait costs none.
#[derive(Debug)]
pub(crate) struct IdleDeadline {
    after: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer counts from the current wait (false once the peer made progress).
    armed: bool,
}

/// The longest limit kept: a setting past it (`u64::MAX` seconds meant as "never") would
/// overflow the clock when a timer is set again (`Instant + Duration` panics).
const LONGEST: Duration = Duration::from_secs(365 * 24 * 60 * 60);

impl IdleDeadline {
    /// A limit of `after` on each pause (at most a year).
    pub(crate) fn new(after: Duration) -> IdleDeadline {
        IdleDeadline {
            after: after.min(LONGEST),
            timer: None,
            armed: false,
        }
    }

    /// The longest pause allowed.
    pub(crate) fn after(&self) -> Duration {
        self.after
    }

    /// The peer made progress: the next wait starts a new count.
    pub(crate) fn progressed(&mut self) {
        self.armed = false;
    }

    /// Called when the owner has to wait: whether the current pause has lasted longer than
    /// allowed. When it has not, the task is registered to be woken when it will have.
    pub(crate) fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match (&mut self.timer, self.armed) {
            (Some(timer), true) => timer,
            (Some(timer), false) => {
                timer.as_mut().reset(Instant::now() + self.after);
                timer
            }
            (None, _) => self.timer.insert(Box::pin(tokio::time::sleep(self.after))),
        };
        self.armed = true;
        timer.as_mut().poll(cx).is_ready()
    }

    /// What a write (or flush) to the peer became: ready (progress, so the next wait starts a
    /// new count), still waiting, or `TimedOut` with `timed_out` as its message once the peer has
    /// taken nothing for longer than allowed.
    pub(crate) fn bound_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
        timed_out: &'static str,
    ) -> Poll<std::io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.progressed();
                Poll::Ready(result)
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                timed_out,
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls `expired` with a no-op waker.
    fn expired(deadline: &mut IdleDeadline) -> bool {
        deadline.expired(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_expires_only_when_it_lasts_longer_than_allowed_and_progress_starts_a_new_one()
    {
        let mut deadline = IdleDeadline::new(Duration::from_secs(10));
        assert!(!expired(&mut deadline), "the wait has just begun");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!expired(&mut deadline), "6 s of 10");
        deadline.progressed();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            !expired(&mut deadline),
            "progress started a new count when the next wait began"
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!expired(&mut deadline), "9 s of 10 since that wait began");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(expired(&mut deadline), "11 s without progress");
    }

    /// `send_timeout_seconds: 18446744073709551615` (meant as "never") sets the timer again
    /// after progress without overflowing the clock.
    #[tokio::test(start_paused = true)]
    async fn a_limit_past_the_clocks_range_is_a_year() {
        let mut deadline = IdleDeadline::new(Duration::from_secs(u64::MAX));
        assert!(!expired(&mut deadline));
        deadline.progressed();
        assert!(!expired(&mut deadline), "the timer set again");
        assert_eq!(deadline.after(), LONGEST);
    }
}

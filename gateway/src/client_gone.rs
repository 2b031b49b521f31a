//! A call goes on when its client leaves before the answer's head.
//!
//! hyper drops a request's future when its client closes the connection (HTTP/1) or resets the
//! stream (HTTP/2) before the response head is ready. The call's audit record lives in that
//! future, and a backend may already be generating the answer, and billing it. [`ToCompletion`]
//! moves such a future onto a task of its own instead, flags the call ([`ClientGone`]) and lets it
//! finish: a call that has not reached a backend yet is not sent to one (the proxy checks the
//! flag before every attempt and the record says `client_closed_request`); one that has is read
//! to its end, bounded, as for a client that hangs up in the middle of an answer. Either way its
//! record is finished and marked client-aborted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use crate::in_flight::InFlight;

/// Whether a call's client has gone away before its answer's head; shared by the call and the
/// future that serves it.
#[derive(Debug, Clone, Default)]
pub struct ClientGone(Arc<AtomicBool>);

impl ClientGone {
    /// The client has gone.
    pub fn is_gone(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn mark(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A call's future that, dropped before it is done, is finished on a task of its own.
pub struct ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    call: Option<Pin<Box<F>>>,
    gone: ClientGone,
    /// The call counted as under way, until it is done here or on its own task.
    in_flight: Option<InFlight>,
}

impl<F> ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    /// Wraps `call`, whose record watches `gone`; `in_flight` is held until the call is done.
    pub fn new(call: F, gone: ClientGone, in_flight: InFlight) -> Self {
        ToCompletion {
            call: Some(Box::pin(call)),
            gone,
            in_flight: Some(in_flight),
        }
    }
}

impl<F> Future for ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        // Polled again after it was done: a misuse that gets nothing more.
        let Some(call) = self.call.as_mut() else {
            return Poll::Pending;
        };
        let output = std::task::ready!(call.as_mut().poll(cx));
        self.call = None;
        self.in_flight = None;
        Poll::Ready(output)
    }
}

impl<F> Drop for ToCompletion<F>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        let Some(call) = self.call.take() else {
            return;
        };
        // Unwinding from a panic in the call's own poll: it cannot be resumed.
        if std::thread::panicking() {
            return;
        }
        self.gone.mark();
        // Outside a runtime (a runtime shutting down drops its tasks) there is nothing to run it on.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let in_flight = self.in_flight.take();
            // The answer has no one to go to: dropping it lets the relay drain the backend.
            runtime.spawn(async move {
                drop(call.await);
                drop(in_flight);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::in_flight::CallsInFlight;

    #[tokio::test]
    async fn a_call_dropped_before_it_is_done_is_finished_on_its_own_task() {
        let gone = ClientGone::default();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let (done, finished) = tokio::sync::oneshot::channel::<bool>();
        let seen = gone.clone();
        let calls = CallsInFlight::default();
        let call = ToCompletion::new(
            async move {
                let _ = released.await;
                let _ = done.send(seen.is_gone());
            },
            gone.clone(),
            calls.enter(),
        );
        // Polled once, then dropped as hyper drops a request whose client went away.
        let mut call = Box::pin(call);
        assert!(futures::poll!(call.as_mut()).is_pending());
        drop(call);
        assert!(gone.is_gone());
        release.send(()).unwrap();
        assert!(finished.await.unwrap(), "the call ran to its end, knowing");
    }

    #[tokio::test]
    async fn a_call_that_finished_is_not_flagged() {
        let gone = ClientGone::default();
        let calls = CallsInFlight::default();
        let output = ToCompletion::new(async { 7 }, gone.clone(), calls.enter()).await;
        assert_eq!(output, 7);
        assert!(!gone.is_gone());
    }
}

//! Answers to HTTP/2 clients, given up when the client leaves a stream's window closed.
//!
//! On HTTP/1.1 a client that takes nothing of its answer fills the connection's buffers, the
//! gateway's writes wait, and the send timeout of the connection (`ClientTimeouts::send`) closes
//! it. On HTTP/2 a client can read its connection (answering pings, taking other streams) and yet
//! never open one stream's flow-control window. hyper then stops polling that stream's body
//! until the window opens, so a deadline inside the body would never be looked at, and the call,
//! its backend connection and the backend's unread answer would be held for as long as the
//! client liked.
//!
//! So an HTTP/2 answer is relayed as before, on the connection's task, but from a slot that a
//! [`StallWatch`] looks into a few times per send timeout: an answer whose last chunk hyper took
//! longer ago than the send timeout, without asking for the next, is taken out of the slot and
//! dropped, which ends the call as a client hang-up does (the record completed from the backend,
//! bounded, and marked client-aborted); the stream then ends with an error rather than looking
//! complete. An answer waiting on its backend is not stalled: hyper polls it again when the
//! backend sends. HTTP/1.1 answers go to the client without a slot.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::Stream;
use tokio::time::Instant;

/// An answer that can tell when it has nothing more to relay.
pub trait Answer: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static {
    /// Whether the answer is over (its end relayed or its record finished): a finished answer
    /// that hyper does not poll for its end is left alone.
    fn is_over(&self) -> bool;

    /// The call's span, if the answer has one: the line that says the answer was given up is
    /// written in it, so that it carries the call's request id.
    fn span(&self) -> Option<&tracing::Span>;
}

/// Watches the HTTP/2 answers in flight and gives up those whose client took nothing for the
/// send timeout. One per gateway; cheap to clone.
#[derive(Debug, Clone)]
pub struct StallWatch {
    inner: Arc<Watched>,
}

#[derive(Debug)]
struct Watched {
    send_timeout: Duration,
    answers: Mutex<Vec<Weak<dyn Stalling>>>,
    /// Whether the task that looks into the slots runs.
    looking: AtomicBool,
}

/// A slot the watch can look into.
trait Stalling: Send + Sync {
    /// Gives the answer up if hyper took its last chunk at least `timeout` before `now` and has
    /// not asked for more; whether it did.
    fn give_up_if_stalled(&self, now: Instant, timeout: Duration) -> bool;
}

impl StallWatch {
    /// A watch giving answers `send_timeout`.
    pub fn new(send_timeout: Duration) -> StallWatch {
        StallWatch {
            inner: Arc::new(Watched {
                send_timeout,
                answers: Mutex::new(Vec::new()),
                looking: AtomicBool::new(false),
            }),
        }
    }

    /// `answer` as a body whose stalls this watch gives up. Needs a Tokio runtime (the watch's
    /// task starts with the first answer).
    pub fn body<A: Answer>(&self, answer: A) -> Body {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                answer: Some(Box::new(answer)),
                handed_at: None,
                given_up: false,
            }),
        });
        let weak: Weak<dyn Stalling> = Arc::downgrade(&slot) as Weak<dyn Stalling>;
        self.inner
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(weak);
        if !self.inner.looking.swap(true, Ordering::AcqRel) {
            tokio::spawn(look(Arc::downgrade(&self.inner)));
        }
        Body::from_stream(WatchedAnswer { slot })
    }
}

/// Looks into the slots a few times per send timeout until the watch is gone; drops the slots
/// of answers that ended.
async fn look(watched: Weak<Watched>) {
    let every = match watched.upgrade() {
        Some(w) => (w.send_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        None => return,
    };
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(watched) = watched.upgrade() else {
            return;
        };
        let now = Instant::now();
        // The slots are taken out of the list while they are looked into, so that calls
        // registering meanwhile do not wait.
        let answers = std::mem::take(
            &mut *watched
                .answers
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut kept = Vec::with_capacity(answers.len());
        for weak in answers {
            let Some(slot) = weak.upgrade() else { continue };
            if !slot.give_up_if_stalled(now, watched.send_timeout) {
                kept.push(weak);
            }
        }
        watched
            .answers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(kept);
    }
}

/// One answer and when hyper last took a chunk of it.
struct Slot<A> {
    state: Mutex<SlotState<A>>,
}

struct SlotState<A> {
    /// Boxed: the watch's weak pointer keeps the slot's own allocation until its next look, and
    /// that stays small.
    answer: Option<Box<A>>,
    /// When hyper took the last chunk, if it has not polled since.
    handed_at: Option<Instant>,
    given_up: bool,
}

impl<A: Answer> Stalling for Slot<A> {
    fn give_up_if_stalled(&self, now: Instant, timeout: Duration) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(answer) = state.answer.as_ref() else {
            return true;
        };
        if answer.is_over() {
            return true;
        }
        match state.handed_at {
            Some(at) if now.saturating_duration_since(at) >= timeout => {
                let answer = state.answer.take();
                state.given_up = true;
                drop(state);
                tracing::info!(
                    parent: answer.as_ref().and_then(|a| a.span()).and_then(tracing::Span::id),
                    send_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    "an HTTP/2 client took nothing of its answer within the send timeout (its stream's window stayed closed); the answer is given up"
                );
                // Outside the lock: dropping the answer ends the call (its record is completed).
                drop(answer);
                true
            }
            _ => false,
        }
    }
}

/// The body hyper polls.
struct WatchedAnswer<A> {
    slot: Arc<Slot<A>>,
}

impl<A: Answer> Stream for WatchedAnswer<A> {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut state = self
            .slot
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        state.handed_at = None;
        let Some(answer) = state.answer.as_mut() else {
            let given_up = std::mem::take(&mut state.given_up);
            return Poll::Ready(given_up.then(|| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client took nothing of its answer within the send timeout",
                ))
            }));
        };
        let polled = Pin::new(&mut **answer).poll_next(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            state.handed_at = Some(Instant::now());
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    /// Chunks from a channel; records when it is dropped.
    struct Fed {
        chunks: tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        over: bool,
        dropped: Arc<AtomicBool>,
    }

    impl Drop for Fed {
        fn drop(&mut self) {
            self.dropped.store(true, Ordering::Release);
        }
    }

    impl Stream for Fed {
        type Item = Result<Bytes, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let polled = self.chunks.poll_recv(cx);
            if let Poll::Ready(None) = polled {
                self.over = true;
            }
            polled.map(|chunk| chunk.map(Ok))
        }
    }

    impl Answer for Fed {
        fn is_over(&self) -> bool {
            self.over
        }

        fn span(&self) -> Option<&tracing::Span> {
            None
        }
    }

    fn fed() -> (
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        Fed,
        Arc<AtomicBool>,
    ) {
        let (sender, chunks) = tokio::sync::mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicBool::new(false));
        let answer = Fed {
            chunks,
            over: false,
            dropped: Arc::clone(&dropped),
        };
        (sender, answer, dropped)
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_taken_in_time_arrives_whole_however_slow_its_backend() {
        let watch = StallWatch::new(Duration::from_secs(1));
        let (sender, answer, dropped) = fed();
        let body = watch.body(answer);
        tokio::spawn(async move {
            for i in 0..4 {
                // The backend is slower than the send timeout: that is not the client's stall.
                tokio::time::sleep(Duration::from_secs(3)).await;
                sender.send(Bytes::from(format!("chunk {i};"))).unwrap();
            }
        });
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"chunk 0;chunk 1;chunk 2;chunk 3;");
        assert!(dropped.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_left_untaken_is_dropped_and_ends_with_an_error() {
        let watch = StallWatch::new(Duration::from_secs(1));
        let (sender, answer, dropped) = fed();
        for i in 0..3 {
            sender.send(Bytes::from(format!("chunk {i};"))).unwrap();
        }
        let mut body = watch.body(answer);
        // One chunk taken, then nothing asked for longer than the send timeout.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"chunk 0;");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!dropped.load(Ordering::Acquire), "within the send timeout");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(dropped.load(Ordering::Acquire), "given up after it");
        // The stream ends with an error, never a clean end.
        let last = body.frame().await.expect("a last frame");
        assert!(last.is_err(), "the answer ends with an error");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_over_is_never_given_up() {
        let watch = StallWatch::new(Duration::from_secs(1));
        let (sender, answer, _dropped) = fed();
        sender.send(Bytes::from_static(b"all")).unwrap();
        drop(sender);
        let mut body = watch.body(answer);
        assert_eq!(
            &body.frame().await.unwrap().unwrap().into_data().unwrap()[..],
            b"all"
        );
        // The end, then a pause longer than the send timeout: nothing is given up.
        assert!(body.frame().await.is_none());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(body.frame().await.is_none(), "no error after the end");
    }
}

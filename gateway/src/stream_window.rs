//! An answer to an HTTP/2 client, given up when the client leaves its stream's window closed.
//!
//! On HTTP/1.1 a client that takes nothing of its answer fills the connection's buffers, the
//! gateway's writes wait, and the send timeout of the connection (`ClientTimeouts::send`) closes
//! it. On HTTP/2 a client can read its connection (answering pings, taking other streams) and yet
//! never open one stream's flow-control window. hyper then stops polling that stream's body
//! until the window opens, so a deadline inside the body would never be looked at, and the call,
//! its backend connection and the backend's unread answer would be held for as long as the
//! client likes.
//!
//! So an HTTP/2 answer is read from the backend by a task of its own and handed to hyper through
//! a channel of one chunk. When hyper has taken nothing for the send timeout, the task drops the
//! answer, which ends the call as a client hang-up does (the record completed from the backend,
//! bounded, and marked client-aborted), and the stream ends with an error rather than looking
//! complete. HTTP/1.1 answers keep being relayed on the connection's own task.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use tokio::sync::mpsc;
use tracing::Instrument as _;

/// The answer `answer` as a body that hyper takes from a channel, while a task reads `answer`;
/// `answer` is dropped when hyper takes nothing for `send_timeout` (see the module's doc).
pub fn paced_by_stream_window<S>(answer: S, send_timeout: Duration) -> Body
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin + 'static,
{
    let (chunks, taken) = mpsc::channel(1);
    let given_up = Arc::new(AtomicBool::new(false));
    tokio::spawn(relay(answer, chunks, send_timeout, Arc::clone(&given_up)).in_current_span());
    Body::from_stream(WindowedAnswer { taken, given_up })
}

/// Reads `answer` into `chunks` until it ends, the client goes (the channel closes), or a chunk
/// waits longer than `send_timeout` to be taken.
async fn relay<S>(
    mut answer: S,
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
    send_timeout: Duration,
    given_up: Arc<AtomicBool>,
) where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    loop {
        let next = tokio::select! {
            next = answer.next() => next,
            // The stream was reset or the connection went: dropping the answer ends the call.
            () = chunks.closed() => return,
        };
        let Some(item) = next else { return };
        let failed = item.is_err();
        match tokio::time::timeout(send_timeout, chunks.send(item)).await {
            Ok(Ok(())) if !failed => {}
            Ok(_) => return,
            Err(_) => {
                given_up.store(true, Ordering::Release);
                tracing::info!(
                    send_timeout_ms = u64::try_from(send_timeout.as_millis()).unwrap_or(u64::MAX),
                    "the HTTP/2 client took nothing of its answer within the send timeout (its stream's window stayed closed); the answer is given up"
                );
                return;
            }
        }
    }
}

/// The body hyper polls: the chunks the task hands over, then the end, or an error when the
/// task gave the answer up (so that the client sees a reset stream, not a short answer).
struct WindowedAnswer {
    taken: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    given_up: Arc<AtomicBool>,
}

impl Stream for WindowedAnswer {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.taken.poll_recv(cx) {
            Poll::Ready(None) if self.given_up.swap(false, Ordering::AcqRel) => {
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client took nothing of its answer within the send timeout",
                ))))
            }
            polled => polled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn chunks(count: usize) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Unpin {
        futures::stream::iter((0..count).map(|i| Ok(Bytes::from(format!("chunk {i};")))))
    }

    #[tokio::test]
    async fn an_answer_taken_in_time_arrives_whole() {
        let body = paced_by_stream_window(chunks(5), Duration::from_secs(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"chunk 0;chunk 1;chunk 2;chunk 3;chunk 4;");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_left_untaken_is_dropped_and_ends_with_an_error() {
        let dropped = Arc::new(AtomicBool::new(false));
        struct Watched<S>(S, Arc<AtomicBool>);
        impl<S> Drop for Watched<S> {
            fn drop(&mut self) {
                self.1.store(true, Ordering::Release);
            }
        }
        impl<S: Stream + Unpin> Stream for Watched<S> {
            type Item = S::Item;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
                Pin::new(&mut self.0).poll_next(cx)
            }
        }
        let mut body = paced_by_stream_window(
            Watched(chunks(10), Arc::clone(&dropped)),
            Duration::from_secs(1),
        );
        // One chunk taken, then nothing for longer than the send timeout.
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"chunk 0;");
        tokio::time::sleep(Duration::from_millis(900)).await;
        assert!(!dropped.load(Ordering::Acquire), "within the send timeout");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(dropped.load(Ordering::Acquire), "given up after it");
        // What was already handed over arrives, then an error, never a clean end.
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.map(|f| f.into_data().unwrap()));
        }
        let last = frames.pop().expect("a last frame");
        assert!(last.is_err(), "the answer ends with an error");
        assert!(frames.iter().all(Result::is_ok));
        assert!(
            frames.len() <= 2,
            "at most the chunks in hand: {}",
            frames.len()
        );
    }

    #[tokio::test]
    async fn a_client_that_goes_drops_the_answer() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (sender, receiver) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        struct Endless(
            mpsc::Receiver<Result<Bytes, std::io::Error>>,
            Arc<AtomicBool>,
        );
        impl Drop for Endless {
            fn drop(&mut self) {
                self.1.store(true, Ordering::Release);
            }
        }
        impl Stream for Endless {
            type Item = Result<Bytes, std::io::Error>;
            fn poll_next(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<Option<Self::Item>> {
                self.0.poll_recv(cx)
            }
        }
        let body = paced_by_stream_window(
            Endless(receiver, Arc::clone(&dropped)),
            Duration::from_secs(60),
        );
        // The backend has sent nothing yet when the client goes.
        drop(body);
        tokio::time::timeout(Duration::from_secs(5), async {
            while !dropped.load(Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the answer is dropped once the client is gone");
        drop(sender);
    }
}

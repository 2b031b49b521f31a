//! Server-sent event answers, flushed one event per body frame, paced by the configured delay,
//! and broken or stalled on purpose when a [`crate::Fault::BreakStreamAfter`] or
//! [`crate::Fault::StallStreamAfter`] is in force.

use std::io;
use std::time::Duration;

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};
use serde_json::Value;

use crate::fault::StreamFault;
use crate::state::SimulatorState;

/// Pause between the last event sent and the simulated connection drop.
const FLUSH_BEFORE_BREAK: Duration = Duration::from_millis(10);

/// One event of a streamed answer.
pub(crate) struct SseEvent {
    /// The `event:` line (the Responses API names its events; chat streams are data-only).
    name: Option<&'static str>,
    data: Value,
    /// Whether the configured chunk delay passes before this event is sent.
    paced: bool,
}

impl SseEvent {
    /// A data-only event sent as soon as the one before it.
    pub(crate) fn data(data: Value) -> Self {
        Self {
            name: None,
            data,
            paced: false,
        }
    }

    /// A data-only event sent after the chunk delay (a content chunk).
    pub(crate) fn paced_data(data: Value) -> Self {
        Self {
            name: None,
            data,
            paced: true,
        }
    }

    /// A named event, paced or not.
    pub(crate) fn named(name: &'static str, data: Value, paced: bool) -> Self {
        Self {
            name: Some(name),
            data,
            paced,
        }
    }

    fn encode(&self) -> Bytes {
        let mut text = String::new();
        if let Some(name) = self.name {
            text.push_str("event: ");
            text.push_str(name);
            text.push('\n');
        }
        text.push_str("data: ");
        text.push_str(&self.data.to_string());
        text.push_str("\n\n");
        Bytes::from(text)
    }
}

/// How a stream ends when nothing breaks it.
#[derive(Clone, Copy)]
pub(crate) enum StreamEnd {
    /// With `data: [DONE]` (chat and completions).
    Done,
    /// After the last event (the Responses API).
    LastEvent,
}

/// A `text/event-stream` response sending `events` one frame at a time.
pub(crate) fn sse_response(
    state: &SimulatorState,
    events: Vec<SseEvent>,
    end: StreamEnd,
) -> Response {
    let delay = state.config().chunk_delay;
    let fault = state.fault_switch().stream_fault();
    let body: BoxStream<'static, Result<Bytes, io::Error>> = {
        let frames = stream::iter(events).then(move |event| paced(event, delay));
        match (fault, end) {
            (Some((StreamFault::Stall, sent)), _) => {
                tracing::info!(
                    simulator = %state.config().id,
                    after_events = sent,
                    "simulator stalling the stream on purpose"
                );
                frames.take(sent).chain(stream::pending()).boxed()
            }
            (Some((StreamFault::Break, sent)), _) => {
                tracing::info!(
                    simulator = %state.config().id,
                    after_events = sent,
                    "simulator breaking the stream on purpose"
                );
                frames
                    .take(sent)
                    .chain(stream::once(async {
                        // Let what was sent reach the socket first: hyper flushes when the body
                        // pauses, and drops unflushed bytes when it fails.
                        tokio::time::sleep(FLUSH_BEFORE_BREAK).await;
                        Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "simulated broken stream",
                        ))
                    }))
                    .boxed()
            }
            (None, StreamEnd::Done) => frames
                .chain(stream::once(async {
                    Ok(Bytes::from_static(b"data: [DONE]\n\n"))
                }))
                .boxed(),
            (None, StreamEnd::LastEvent) => frames.boxed(),
        }
    };
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

async fn paced(event: SseEvent, delay: Duration) -> Result<Bytes, io::Error> {
    if event.paced && !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    Ok(event.encode())
}

//! What the gateway reads from a member itself before it sends a call there, to know what the
//! call will run: the calls a batch's input file makes (`batch_input`), the model a run's
//! assistant runs (`assistant_model`). Such a read is a `GET` with the member's own credential,
//! within the member's response and idle timeouts; a member that cannot answer it is set aside
//! as a failed attempt would be, and a member that refuses it answers the client.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::BodyExt as _;

use crate::pool::Member;
use crate::retry_hint;
use crate::upstream::{SendError, UpstreamBody};

/// How a read from a member ended.
#[derive(Debug)]
pub(crate) enum MemberRead<T> {
    /// What was read.
    Read(T),
    /// The member could not be asked, throttled, failed or broke its answer off: it is set aside
    /// for `wait` and the call goes to another member, as after a failed attempt.
    Failed {
        /// The attempt's outcome as metrics and records name it.
        reason: &'static str,
        /// The member's status, when it answered.
        status: Option<StatusCode>,
        /// How long the member is set aside.
        wait: Duration,
    },
    /// The member refused to give it (it is not there, the credential may not read it): its
    /// answer goes to the client, and the call is not sent.
    Refused(Box<http::Response<UpstreamBody>>),
}

impl<T> MemberRead<T> {
    /// A read that failed with `reason` after the member answered `status`.
    pub(crate) fn cut(reason: &'static str, status: StatusCode) -> MemberRead<T> {
        MemberRead::Failed {
            reason,
            status: Some(status),
            wait: retry_hint::DEFAULT_SET_ASIDE,
        }
    }
}

impl<T> MemberRead<T> {
    /// What was read, else how the read ended, as a read of something else.
    pub(crate) fn into_read<U>(self) -> Result<T, MemberRead<U>> {
        match self {
            MemberRead::Read(read) => Ok(read),
            MemberRead::Failed {
                reason,
                status,
                wait,
            } => Err(MemberRead::Failed {
                reason,
                status,
                wait,
            }),
            MemberRead::Refused(response) => Err(MemberRead::Refused(response)),
        }
    }
}

/// Sends `GET uri` with `headers` (the member's credential) to `member`: its answer when it is a
/// success, within the member's response timeout.
pub(crate) async fn get(
    member: &Member,
    uri: Uri,
    headers: HeaderMap,
) -> MemberRead<http::Response<UpstreamBody>> {
    let timeout = Duration::from_millis(member.config.response_timeout_ms);
    let sending = member.client.send(Method::GET, uri, headers, Bytes::new());
    let response = match tokio::time::timeout(timeout, sending).await {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => return failed(&error),
        Err(_) => return failed(&SendError::timed_out(timeout)),
    };
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return MemberRead::Failed {
            reason: if status == StatusCode::TOO_MANY_REQUESTS {
                "throttled"
            } else {
                "server_error"
            },
            status: Some(status),
            wait: retry_hint::set_aside_for(status, response.headers(), SystemTime::now()),
        };
    }
    if !status.is_success() {
        return MemberRead::Refused(Box::new(response));
    }
    MemberRead::Read(response)
}

/// The whole body of `response`, a member's answer, with its status: at most `max` bytes (a
/// larger one ends as `too_large`), each piece within the member's idle timeout (an answer that
/// breaks off or pauses longer ends as `cut`).
pub(crate) async fn whole_body<T>(
    member: &Member,
    response: http::Response<UpstreamBody>,
    max: usize,
    too_large: &'static str,
    cut: &'static str,
) -> Result<(StatusCode, Vec<u8>), MemberRead<T>> {
    let status = response.status();
    let mut body = response.into_body();
    let mut read = Vec::new();
    loop {
        match next_chunk(member, &mut body).await {
            Ok(Some(data)) if read.len() + data.len() <= max => read.extend_from_slice(&data),
            Ok(Some(_)) => return Err(MemberRead::cut(too_large, status)),
            Ok(None) => return Ok((status, read)),
            Err(()) => return Err(MemberRead::cut(cut, status)),
        }
    }
}

/// The next piece of a member's answer, waiting at most the member's idle timeout: `None` at its
/// end, `Err` when it broke off or paused too long.
pub(crate) async fn next_chunk(
    member: &Member,
    body: &mut UpstreamBody,
) -> Result<Option<Bytes>, ()> {
    let idle = Duration::from_millis(member.config.response_idle_timeout_ms);
    loop {
        match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
            Ok(None) => return Ok(None),
            Ok(Some(Err(_))) | Err(_) => return Err(()),
        }
    }
}

fn failed<T>(error: &SendError) -> MemberRead<T> {
    MemberRead::Failed {
        reason: error.reason(),
        status: None,
        wait: retry_hint::DEFAULT_SET_ASIDE,
    }
}

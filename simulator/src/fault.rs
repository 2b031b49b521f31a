//! Faults a test switches on to see how a client (the gateway) copes with a failing backend.

use std::time::{Duration, SystemTime};

use axum::Json;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::ApiError;

/// What the simulator does wrong, on purpose, until told otherwise.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Fault {
    /// Answer normally.
    #[default]
    None,
    /// Answer 429 with Azure's body
    /// `{"error":{"code":"429","message":"Rate limit is exceeded. Try again in N seconds."}}` and the
    /// header named by `hint`, for the next `times` requests (`None` = until changed).
    Throttle {
        /// Which header says when to come back.
        hint: RetryHint,
        /// How many requests get the fault; `None` = every request until the fault is changed.
        times: Option<u32>,
    },
    /// Answer with an Azure-shaped server error, 500 or the given 5xx status.
    ServerError {
        /// HTTP status, 500 to 599 (anything else is answered as 500).
        status: u16,
        /// How many requests get the fault; `None` = every request until the fault is changed.
        times: Option<u32>,
    },
    /// Streamed answers send this many server-sent events, counting the first
    /// `prompt_filter_results` event, then drop the connection abruptly: no `[DONE]`, no clean
    /// end of the body. Non-streamed answers are unaffected. Lasts until changed.
    BreakStreamAfter {
        /// Events sent before the connection is dropped (0 = only the response head).
        chunks: usize,
    },
    /// Streamed answers send this many server-sent events, counting the first
    /// `prompt_filter_results` event, then fall silent with the connection open, as a backend
    /// that hangs mid-answer does. Non-streamed answers are unaffected. Lasts until changed.
    StallStreamAfter {
        /// Events sent before the silence (0 = only the response head).
        chunks: usize,
    },
}

/// What a stream fault does once its events are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamFault {
    /// Drop the connection.
    Break,
    /// Send nothing more, connection open.
    Stall,
}

/// The header a throttled answer carries to say when to retry. Each variant sends exactly one
/// header, so a test can check that a client reads that one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RetryHint {
    /// `retry-after-ms: <ms>`.
    RetryAfterMs(u64),
    /// `retry-after: <seconds>`.
    RetryAfterSeconds(u64),
    /// `retry-after: <HTTP date>`.
    RetryAfterHttpDate(SystemTime),
    /// `x-ratelimit-reset-requests: <duration>`, e.g. `"12s"`, `"6m0s"`, `"250ms"`.
    RateLimitResetRequests(String),
    /// `x-ratelimit-reset-tokens: <duration>`, e.g. `"12s"`, `"6m0s"`, `"250ms"`.
    RateLimitResetTokens(String),
    /// No hint header at all.
    None,
}

impl RetryHint {
    /// The header this hint is sent as, if any.
    fn header(&self) -> Option<(HeaderName, String)> {
        let pair = match self {
            Self::RetryAfterMs(ms) => ("retry-after-ms", ms.to_string()),
            Self::RetryAfterSeconds(s) => ("retry-after", s.to_string()),
            Self::RetryAfterHttpDate(at) => ("retry-after", httpdate::fmt_http_date(*at)),
            Self::RateLimitResetRequests(d) => ("x-ratelimit-reset-requests", d.clone()),
            Self::RateLimitResetTokens(d) => ("x-ratelimit-reset-tokens", d.clone()),
            Self::None => return None,
        };
        Some((HeaderName::from_static(pair.0), pair.1))
    }

    /// Whole seconds to wait, rounded up, for the body's "Try again in N seconds".
    fn wait_seconds(&self) -> u64 {
        let wait = match self {
            Self::RetryAfterMs(ms) => Duration::from_millis(*ms),
            Self::RetryAfterSeconds(s) => Duration::from_secs(*s),
            Self::RetryAfterHttpDate(at) => at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO),
            Self::RateLimitResetRequests(d) | Self::RateLimitResetTokens(d) => {
                parse_reset_duration(d).unwrap_or(Duration::ZERO)
            }
            Self::None => Duration::ZERO,
        };
        wait.as_millis()
            .div_ceil(1000)
            .max(1)
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

/// Parses OpenAI's reset durations: a sequence of `<number><unit>` with units `h`, `m`, `s`,
/// `ms` (`"6m0s"`, `"1.5s"`, `"250ms"`).
fn parse_reset_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0_f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let (unit_seconds, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else {
            return None;
        };
        total += number * unit_seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// The fault in force, with its remaining count.
#[derive(Debug, Default)]
pub(crate) struct FaultSwitch {
    current: Fault,
}

impl FaultSwitch {
    /// Replaces the fault in force.
    pub(crate) fn set(&mut self, fault: Fault) {
        self.current = fault;
    }

    /// The fault in force.
    pub(crate) fn current(&self) -> &Fault {
        &self.current
    }

    /// The error answer this request gets, if a throttle or server-error fault is in force;
    /// consumes one of its `times`.
    pub(crate) fn take_error_answer(&mut self) -> Option<Response> {
        let (answer, times) = match &mut self.current {
            Fault::Throttle { hint, times } => (throttled(hint), times),
            Fault::ServerError { status, times } => (server_error(*status), times),
            Fault::None | Fault::BreakStreamAfter { .. } | Fault::StallStreamAfter { .. } => {
                return None;
            }
        };
        match times {
            Some(0) => {
                self.current = Fault::None;
                return None;
            }
            Some(left) => {
                *left -= 1;
                if *left == 0 {
                    self.current = Fault::None;
                }
            }
            None => {}
        }
        Some(answer)
    }

    /// After how many events streamed answers break or stall, if they do.
    pub(crate) fn stream_fault(&self) -> Option<(StreamFault, usize)> {
        match self.current {
            Fault::BreakStreamAfter { chunks } => Some((StreamFault::Break, chunks)),
            Fault::StallStreamAfter { chunks } => Some((StreamFault::Stall, chunks)),
            _ => None,
        }
    }
}

fn throttled(hint: &RetryHint) -> Response {
    let body = json!({
        "error": {
            "code": "429",
            "message": format!(
                "Rate limit is exceeded. Try again in {} seconds.",
                hint.wait_seconds()
            ),
            "type": null,
            "param": null,
        }
    });
    let mut response = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
    if let Some((name, value)) = hint.header()
        && let Ok(value) = HeaderValue::from_str(&value)
    {
        response.headers_mut().insert(name, value);
    }
    response
}

fn server_error(status: u16) -> Response {
    let status = StatusCode::from_u16(status)
        .ok()
        .filter(StatusCode::is_server_error)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    ApiError::new(
        status,
        status.as_u16().to_string(),
        "The server had an error while processing your request (simulated fault).",
    )
    .into_response()
}

/// The JSON accepted by `POST /_simulator/fault`, e.g. `{"kind":"throttle","retry_after_ms":2000,"times":1}`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum FaultRequest {
    None,
    Throttle {
        retry_after_ms: Option<u64>,
        retry_after_seconds: Option<u64>,
        /// An HTTP date, e.g. `"Wed, 21 Oct 2026 07:28:00 GMT"`.
        retry_after_http_date: Option<String>,
        /// An HTTP date this many seconds from now.
        retry_after_date_in_seconds: Option<u64>,
        reset_requests: Option<String>,
        reset_tokens: Option<String>,
        times: Option<u32>,
    },
    ServerError {
        #[serde(default = "default_server_error")]
        status: u16,
        times: Option<u32>,
    },
    BreakStreamAfter {
        chunks: usize,
    },
    StallStreamAfter {
        chunks: usize,
    },
}

fn default_server_error() -> u16 {
    500
}

impl TryFrom<FaultRequest> for Fault {
    type Error = String;

    fn try_from(request: FaultRequest) -> Result<Self, Self::Error> {
        Ok(match request {
            FaultRequest::None => Fault::None,
            FaultRequest::ServerError { status, times } => {
                if !(500..=599).contains(&status) {
                    return Err(format!("status must be 500-599, got {status}"));
                }
                Fault::ServerError { status, times }
            }
            FaultRequest::BreakStreamAfter { chunks } => Fault::BreakStreamAfter { chunks },
            FaultRequest::StallStreamAfter { chunks } => Fault::StallStreamAfter { chunks },
            FaultRequest::Throttle {
                retry_after_ms,
                retry_after_seconds,
                retry_after_http_date,
                retry_after_date_in_seconds,
                reset_requests,
                reset_tokens,
                times,
            } => {
                let mut hints = Vec::new();
                hints.extend(retry_after_ms.map(RetryHint::RetryAfterMs));
                hints.extend(retry_after_seconds.map(RetryHint::RetryAfterSeconds));
                if let Some(date) = retry_after_http_date {
                    let at = httpdate::parse_http_date(&date)
                        .map_err(|e| format!("retry_after_http_date: {e}"))?;
                    hints.push(RetryHint::RetryAfterHttpDate(at));
                }
                hints.extend(retry_after_date_in_seconds.map(|s| {
                    RetryHint::RetryAfterHttpDate(SystemTime::now() + Duration::from_secs(s))
                }));
                for (field, reset) in [
                    ("reset_requests", &reset_requests),
                    ("reset_tokens", &reset_tokens),
                ] {
                    if let Some(value) = reset
                        && parse_reset_duration(value).is_none()
                    {
                        return Err(format!(
                            "{field}: '{value}' is not a duration like 12s, 6m0s or 250ms"
                        ));
                    }
                }
                hints.extend(reset_requests.map(RetryHint::RateLimitResetRequests));
                hints.extend(reset_tokens.map(RetryHint::RateLimitResetTokens));
                if hints.len() > 1 {
                    return Err("give at most one retry hint".to_owned());
                }
                let hint = hints.pop().unwrap_or(RetryHint::None);
                Fault::Throttle { hint, times }
            }
        })
    }
}

impl Fault {
    /// The fault in the JSON shape `POST /_simulator/fault` accepts.
    pub(crate) fn to_json(&self) -> Value {
        match self {
            Fault::None => json!({"kind": "none"}),
            Fault::ServerError { status, times } => {
                json!({"kind": "server_error", "status": status, "times": times})
            }
            Fault::BreakStreamAfter { chunks } => {
                json!({"kind": "break_stream_after", "chunks": chunks})
            }
            Fault::StallStreamAfter { chunks } => {
                json!({"kind": "stall_stream_after", "chunks": chunks})
            }
            Fault::Throttle { hint, times } => {
                let mut value = json!({"kind": "throttle", "times": times});
                let hint_field = match hint {
                    RetryHint::RetryAfterMs(ms) => Some(("retry_after_ms", json!(ms))),
                    RetryHint::RetryAfterSeconds(s) => Some(("retry_after_seconds", json!(s))),
                    RetryHint::RetryAfterHttpDate(at) => {
                        Some(("retry_after_http_date", json!(httpdate::fmt_http_date(*at))))
                    }
                    RetryHint::RateLimitResetRequests(d) => Some(("reset_requests", json!(d))),
                    RetryHint::RateLimitResetTokens(d) => Some(("reset_tokens", json!(d))),
                    RetryHint::None => None,
                };
                if let (Some((field, hint_value)), Some(object)) =
                    (hint_field, value.as_object_mut())
                {
                    object.insert(field.to_owned(), hint_value);
                }
                value
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_parse_like_openai_writes_them() {
        assert_eq!(parse_reset_duration("12s"), Some(Duration::from_secs(12)));
        assert_eq!(parse_reset_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(
            parse_reset_duration("250ms"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            parse_reset_duration("1h2m3s"),
            Some(Duration::from_secs(3723))
        );
        assert_eq!(parse_reset_duration("soon"), None);
        assert_eq!(parse_reset_duration(""), None);
    }

    #[test]
    fn counted_fault_ends_by_itself() {
        let mut switch = FaultSwitch::default();
        switch.set(Fault::ServerError {
            status: 503,
            times: Some(2),
        });
        assert_eq!(
            switch.take_error_answer().map(|r| r.status().as_u16()),
            Some(503)
        );
        assert_eq!(
            switch.take_error_answer().map(|r| r.status().as_u16()),
            Some(503)
        );
        assert!(switch.take_error_answer().is_none());
        assert_eq!(switch.current(), &Fault::None);
    }

    #[test]
    fn wait_seconds_round_up() {
        assert_eq!(RetryHint::RetryAfterMs(1500).wait_seconds(), 2);
        assert_eq!(
            RetryHint::RateLimitResetRequests("250ms".into()).wait_seconds(),
            1
        );
        assert_eq!(
            RetryHint::RateLimitResetTokens("6m0s".into()).wait_seconds(),
            360
        );
    }

    #[test]
    fn control_json_round_trips() {
        for text in [
            r#"{"kind":"throttle","retry_after_ms":2000,"times":1}"#,
            r#"{"kind":"throttle","reset_tokens":"6m0s","times":null}"#,
            r#"{"kind":"server_error","status":502,"times":3}"#,
            r#"{"kind":"break_stream_after","chunks":2}"#,
            r#"{"kind":"none"}"#,
        ] {
            let request: FaultRequest = serde_json::from_str(text).unwrap();
            let fault = Fault::try_from(request).unwrap();
            let again: FaultRequest = serde_json::from_value(fault.to_json()).unwrap();
            assert_eq!(Fault::try_from(again).unwrap(), fault, "{text}");
        }
    }

    #[test]
    fn two_hints_are_refused() {
        let request: FaultRequest = serde_json::from_str(
            r#"{"kind":"throttle","retry_after_ms":1,"retry_after_seconds":1}"#,
        )
        .unwrap();
        assert!(Fault::try_from(request).is_err());
    }
}

//! How long a backend asks us to leave it alone.
//!
//! Order of precedence, as Azure's smart load-balancing samples and the OpenAI SDK read them
//! (`azure-specs.md` §1.4, §7.4): `retry-after-ms`, `Retry-After` (seconds, possibly fractional,
//! or an HTTP date), then for a 429 only `x-ratelimit-reset-requests` and
//! `x-ratelimit-reset-tokens`, else a default.
//!
//! The `x-ratelimit-reset-*` headers say when a rate window refills, and OpenAI sends them on
//! every answer: on a 5xx they say nothing about when the member will work again, so a failing
//! member waits the default. On a 429 the reset of the limit that is used up comes first (the
//! tokens' when `x-ratelimit-remaining-tokens` is 0 and the requests' is not), and a reset of 0
//! from these headers is no hint (Azure's Responses API throttles with
//! `x-ratelimit-reset-tokens: 0` and no `Retry-After`, `azure-specs.md` §1.4): the member waits
//! the default rather than staying first in line. Only a 429's explicit `retry-after(-ms)` of 0
//! sets nothing aside (a 429's `Retry-After` date already past gives way to the reset headers,
//! and alone asks for no wait); on a 5xx a wait of 0 (or a date past) is no hint (a load balancer's
//! `503 Retry-After: 0` in front of a dead member says nothing of when it works again, and the
//! member would take the first attempt of every call).

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

/// Wait when a backend gives no hint.
pub const DEFAULT_SET_ASIDE: Duration = Duration::from_secs(10);
/// Longest wait a hint can impose; protects against absurd values.
const MAX_SET_ASIDE: Duration = Duration::from_secs(24 * 60 * 60);

/// The wait a failed response (`status`: a 429 or a 5xx) asks for, or [`DEFAULT_SET_ASIDE`].
pub fn set_aside_for(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Duration {
    hinted_wait(status, headers, now)
        .filter(|wait| status == StatusCode::TOO_MANY_REQUESTS || !wait.is_zero())
        .unwrap_or(DEFAULT_SET_ASIDE)
        .min(MAX_SET_ASIDE)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// A wait of `seconds`, at most [`MAX_SET_ASIDE`] (capped before the conversion, which panics on
/// values past `Duration`'s range: a backend could send `Retry-After: 1e30`); `None` when it is
/// not a finite number of seconds, zero or more.
fn seconds(seconds: f64) -> Option<Duration> {
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds.min(MAX_SET_ASIDE.as_secs_f64())))
}

fn hinted_wait(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(wait) = header(headers, "retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| seconds(ms / 1000.0))
    {
        return Some(wait);
    }
    // A date already past (the member's clock behind ours) says less than the reset headers.
    let mut date_past = false;
    if let Some(value) = header(headers, "retry-after") {
        if let Ok(number) = value.parse::<f64>() {
            if let Some(wait) = seconds(number) {
                return Some(wait);
            }
        } else if let Ok(date) = httpdate::parse_http_date(value) {
            match date.duration_since(now) {
                Ok(wait) if !wait.is_zero() => return Some(wait),
                _ => date_past = true,
            }
        }
    }
    if status != StatusCode::TOO_MANY_REQUESTS {
        return None;
    }
    let used_up = |name| header(headers, name).is_some_and(|v| v == "0");
    let resets =
        if used_up("x-ratelimit-remaining-tokens") && !used_up("x-ratelimit-remaining-requests") {
            ["x-ratelimit-reset-tokens", "x-ratelimit-reset-requests"]
        } else {
            ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]
        };
    resets
        .into_iter()
        .find_map(|name| {
            header(headers, name)
                .and_then(parse_reset_duration)
                .filter(|wait| !wait.is_zero())
        })
        .or(date_past.then_some(Duration::ZERO))
}

/// Parses OpenAI's reset durations (`250ms`, `12s`, `6m0s`, `1h2m3.5s`) or plain seconds.
fn parse_reset_duration(text: &str) -> Option<Duration> {
    if let Ok(number) = text.parse::<f64>() {
        return seconds(number);
    }
    let mut total = 0.0_f64;
    let mut rest = text;
    let mut parsed_any = false;
    while !rest.is_empty() {
        let number_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let value: f64 = rest[..number_end].parse().ok()?;
        rest = &rest[number_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
        parsed_any = true;
    }
    if !parsed_any {
        return None;
    }
    seconds(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    /// Numbers past `Duration`'s range are capped, not a panic (and the member is set aside).
    #[test]
    fn absurd_waits_are_capped_at_a_day() {
        let now = SystemTime::now();
        for pairs in [
            [("retry-after-ms", "1e30")],
            [("retry-after", "99999999999999999999")],
            [("x-ratelimit-reset-tokens", "99999999999999999999s")],
            [("x-ratelimit-reset-requests", "1e300")],
        ] {
            assert_eq!(
                set_aside_for(StatusCode::TOO_MANY_REQUESTS, &headers(&pairs), now),
                MAX_SET_ASIDE,
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn precedence_and_formats() {
        let now = SystemTime::now();
        let wait = |pairs: &[(&'static str, &str)]| {
            set_aside_for(StatusCode::TOO_MANY_REQUESTS, &headers(pairs), now)
        };
        assert_eq!(
            wait(&[("retry-after-ms", "1850"), ("retry-after", "2")]),
            Duration::from_millis(1850)
        );
        assert_eq!(wait(&[("retry-after", "7")]), Duration::from_secs(7));
        assert_eq!(wait(&[("retry-after", "0.5")]), Duration::from_millis(500));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        let from_date = wait(&[("retry-after", &date)]);
        assert!(
            from_date <= Duration::from_secs(30) && from_date >= Duration::from_secs(28),
            "{from_date:?}"
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset-requests", "12s")]),
            Duration::from_secs(12)
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset-tokens", "6m0s")]),
            Duration::from_secs(360)
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset-tokens", "250ms")]),
            Duration::from_millis(250)
        );
        assert_eq!(
            wait(&[("x-ratelimit-reset-requests", "1h2m3.5s")]),
            Duration::from_secs_f64(3723.5)
        );
        assert_eq!(wait(&[]), DEFAULT_SET_ASIDE);
        assert_eq!(wait(&[("retry-after", "soon")]), DEFAULT_SET_ASIDE);
        assert_eq!(wait(&[("retry-after", "99999999")]), MAX_SET_ASIDE);
    }

    /// A 429 whose rate headers say "0" (Azure's Responses API) is no hint: the member waits the
    /// default instead of staying first in line; an explicit `retry-after: 0` still means none.
    #[test]
    fn a_zero_rate_window_reset_is_no_hint() {
        let now = SystemTime::now();
        let throttled = |pairs: &[(&'static str, &str)]| {
            set_aside_for(StatusCode::TOO_MANY_REQUESTS, &headers(pairs), now)
        };
        assert_eq!(
            throttled(&[
                ("x-ratelimit-reset-tokens", "0"),
                ("x-ratelimit-remaining-tokens", "-1")
            ]),
            DEFAULT_SET_ASIDE
        );
        assert_eq!(
            throttled(&[
                ("x-ratelimit-reset-requests", "0s"),
                ("x-ratelimit-reset-tokens", "4s")
            ]),
            Duration::from_secs(4)
        );
        assert_eq!(throttled(&[("retry-after", "0")]), Duration::ZERO);
        assert_eq!(throttled(&[("retry-after-ms", "0")]), Duration::ZERO);
    }

    /// A 429's `Retry-After` date already past (the member's clock a little behind) gives way to
    /// the reset headers when they say more; alone it asks for no wait.
    #[test]
    fn a_past_retry_after_date_gives_way_to_the_reset_headers() {
        let now = SystemTime::now();
        let past = httpdate::fmt_http_date(now - Duration::from_secs(2));
        let throttled = |pairs: &[(&'static str, &str)]| {
            set_aside_for(StatusCode::TOO_MANY_REQUESTS, &headers(pairs), now)
        };
        assert_eq!(
            throttled(&[
                ("retry-after", past.as_str()),
                ("x-ratelimit-reset-requests", "30s")
            ]),
            Duration::from_secs(30)
        );
        assert_eq!(throttled(&[("retry-after", past.as_str())]), Duration::ZERO);
        let future = httpdate::fmt_http_date(now + Duration::from_secs(20));
        let wait = throttled(&[
            ("retry-after", future.as_str()),
            ("x-ratelimit-reset-requests", "30s"),
        ]);
        assert!(
            wait > Duration::from_secs(18) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
    }

    /// A 5xx that asks for no wait, or for one already past, waits the default: a failing
    /// member must not take the first attempt of every call.
    #[test]
    fn a_failing_member_asking_for_no_wait_waits_the_default() {
        let now = SystemTime::now();
        let failing = |pairs: &[(&'static str, &str)]| {
            set_aside_for(StatusCode::SERVICE_UNAVAILABLE, &headers(pairs), now)
        };
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        for pairs in [
            [("retry-after", "0")],
            [("retry-after-ms", "0")],
            [("retry-after", past.as_str())],
        ] {
            assert_eq!(failing(&pairs), DEFAULT_SET_ASIDE, "{pairs:?}");
        }
        assert_eq!(failing(&[("retry-after", "3")]), Duration::from_secs(3));
    }

    /// A 429 for tokens waits for the tokens' window, not the requests' one.
    #[test]
    fn the_used_up_limit_says_how_long_to_wait() {
        let now = SystemTime::now();
        let throttled = |pairs: &[(&'static str, &str)]| {
            set_aside_for(StatusCode::TOO_MANY_REQUESTS, &headers(pairs), now)
        };
        let tokens_used_up = [
            ("x-ratelimit-remaining-requests", "57"),
            ("x-ratelimit-remaining-tokens", "0"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-reset-tokens", "45s"),
        ];
        assert_eq!(throttled(&tokens_used_up), Duration::from_secs(45));
        let requests_used_up = [
            ("x-ratelimit-remaining-requests", "0"),
            ("x-ratelimit-remaining-tokens", "9000"),
            ("x-ratelimit-reset-requests", "2s"),
            ("x-ratelimit-reset-tokens", "45s"),
        ];
        assert_eq!(throttled(&requests_used_up), Duration::from_secs(2));
    }

    /// On a 5xx the rate windows say nothing about when the member works again.
    #[test]
    fn a_failing_member_is_not_set_aside_for_its_rate_window() {
        let now = SystemTime::now();
        let rate_headers = headers(&[
            ("x-ratelimit-reset-requests", "6m0s"),
            ("x-ratelimit-reset-tokens", "1h"),
        ]);
        for status in [
            StatusCode::INTERNAL_SERVER_ERROR,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert_eq!(
                set_aside_for(status, &rate_headers, now),
                DEFAULT_SET_ASIDE,
                "{status}"
            );
        }
        let asked = headers(&[("retry-after", "3"), ("x-ratelimit-reset-requests", "6m0s")]);
        assert_eq!(
            set_aside_for(StatusCode::SERVICE_UNAVAILABLE, &asked, now),
            Duration::from_secs(3)
        );
    }
}

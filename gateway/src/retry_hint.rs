//! How long a backend asks us to leave it alone.
//!
//! Order of precedence, as Azure's smart load-balancing samples and the OpenAI SDK read them
//! (`azure-specs.md` §1.4, §7.4): `retry-after-ms`, `Retry-After` (seconds, possibly fractional,
//! or an HTTP date), `x-ratelimit-reset-requests`, `x-ratelimit-reset-tokens`, else a default.

use std::time::{Duration, SystemTime};

use http::HeaderMap;

/// Wait when a backend gives no hint.
pub const DEFAULT_SET_ASIDE: Duration = Duration::from_secs(10);
/// Longest wait a hint can impose; protects against absurd values.
const MAX_SET_ASIDE: Duration = Duration::from_secs(24 * 60 * 60);

/// The wait a failed response asks for, or [`DEFAULT_SET_ASIDE`].
pub fn set_aside_for(headers: &HeaderMap, now: SystemTime) -> Duration {
    hinted_wait(headers, now)
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

fn hinted_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(wait) = header(headers, "retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .and_then(|ms| seconds(ms / 1000.0))
    {
        return Some(wait);
    }
    if let Some(value) = header(headers, "retry-after") {
        if let Ok(number) = value.parse::<f64>() {
            if let Some(wait) = seconds(number) {
                return Some(wait);
            }
        } else if let Ok(date) = httpdate::parse_http_date(value) {
            return Some(date.duration_since(now).unwrap_or(Duration::ZERO));
        }
    }
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        if let Some(wait) = header(headers, name).and_then(parse_reset_duration) {
            return Some(wait);
        }
    }
    None
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
                set_aside_for(&headers(&pairs), now),
                MAX_SET_ASIDE,
                "{pairs:?}"
            );
        }
    }

    #[test]
    fn precedence_and_formats() {
        let now = SystemTime::now();
        let wait = |pairs: &[(&'static str, &str)]| set_aside_for(&headers(pairs), now);
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
}

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

fn hinted_wait(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    if let Some(value) = header(headers, "retry-after") {
        if let Ok(seconds) = value.parse::<f64>() {
            if seconds.is_finite() && seconds >= 0.0 {
                return Some(Duration::from_secs_f64(seconds));
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
    if let Ok(seconds) = text.parse::<f64>() {
        return (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds));
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
    (parsed_any && total.is_finite()).then(|| Duration::from_secs_f64(total))
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

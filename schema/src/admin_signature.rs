//! Signed admin requests: how the portal proves it holds a gateway's admin token without sending
//! it.
//!
//! A gateway's admin endpoints (`PUT /_gatehouse/config`, `GET /_gatehouse/backends`, …) take the
//! admin token as `Authorization: Bearer` (an operator's own scripts), or a request signed with
//! it, which is what the portal sends: a portal Admin who registers a gateway at a URL of their own
//! with another gateway's token reference then receives signatures that expire in minutes and
//! cover one request each, never the token.
//!
//! The signature is HMAC-SHA256, keyed with the admin token, over
//!
//! ```text
//! gatehouse-admin-v1\n{METHOD}\n{path}\n{unix seconds}\n{hex SHA-256 of the body}
//! ```
//!
//! sent as `Authorization: Gatehouse-HMAC-SHA256 time={unix seconds}, signature={hex}` with the
//! body's digest in [`CONTENT_SHA256_HEADER`]. `path` is the gateway's own path of the endpoint
//! (`/_gatehouse/config`), whatever prefix a proxy in front of it strips. The gateway checks the
//! signature before it reads the body (over the digest the header claims), then the body against
//! that digest, and refuses a time more than [`MAX_CLOCK_SKEW_SECONDS`] from its own clock, so a
//! signed request can be replayed only as it was, for a few minutes: a snapshot the gateway
//! already runs or has refused as not newer, or a read of what the portal's Admins see anyway.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

/// The `Authorization` scheme of a signed admin request.
pub const SCHEME: &str = "Gatehouse-HMAC-SHA256";
/// The header carrying the hex SHA-256 of the request body (of nothing, for a body-less request).
pub const CONTENT_SHA256_HEADER: &str = "x-gatehouse-content-sha256";
/// How far a signature's time may be from the gateway's clock, either way.
pub const MAX_CLOCK_SKEW_SECONDS: i64 = 300;

const CONTEXT: &str = "gatehouse-admin-v1";

/// The hex SHA-256 of a request body.
pub fn content_sha256(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

fn mac(token: &str, method: &str, path: &str, time: i64, content_sha256: &str) -> Hmac<Sha256> {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for part in [CONTEXT, method, path, &time.to_string(), content_sha256] {
        mac.update(part.as_bytes());
        mac.update(b"\n");
    }
    mac
}

/// The `Authorization` value of a request signed with `token` at `time` (unix seconds).
pub fn authorization(
    token: &str,
    method: &str,
    path: &str,
    time: i64,
    content_sha256: &str,
) -> String {
    let signature = hex::encode(
        mac(token, method, path, time, content_sha256)
            .finalize()
            .into_bytes(),
    );
    format!("{SCHEME} time={time}, signature={signature}")
}

/// Why a signed request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The `Authorization` value is not this scheme's shape, or the digest header is missing.
    Malformed,
    /// The signature's time is this many seconds from the gateway's clock (negative: behind).
    Skewed(i64),
    /// The signature does not match: another token, method, path, time or digest.
    Mismatch,
}

/// The parts of a signed request's `Authorization` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    time: i64,
    signature: Vec<u8>,
}

impl Signed {
    /// Reads an `Authorization` value of this scheme; `None` when it is of another scheme.
    pub fn parse(authorization: &str) -> Option<Result<Signed, Refusal>> {
        let rest = authorization.strip_prefix(SCHEME)?.strip_prefix(' ')?;
        let mut time = None;
        let mut signature = None;
        for part in rest.split(',') {
            match part.trim().split_once('=') {
                Some(("time", value)) if time.is_none() => time = value.parse::<i64>().ok(),
                Some(("signature", value)) if signature.is_none() => {
                    signature = hex::decode(value).ok().filter(|bytes| bytes.len() == 32);
                }
                _ => return Some(Err(Refusal::Malformed)),
            }
        }
        Some(match (time, signature) {
            (Some(time), Some(signature)) => Ok(Signed { time, signature }),
            _ => Err(Refusal::Malformed),
        })
    }

    /// Checks the signature against `token` for this request, at `now` (unix seconds).
    pub fn verify(
        &self,
        token: &str,
        method: &str,
        path: &str,
        content_sha256: &str,
        now: i64,
    ) -> Result<(), Refusal> {
        let skew = self.time.saturating_sub(now);
        // `unsigned_abs`: a time of `i64::MIN` has no positive `abs`.
        if skew.unsigned_abs() > MAX_CLOCK_SKEW_SECONDS.unsigned_abs() {
            return Err(Refusal::Skewed(skew));
        }
        // `verify_slice` compares in constant time.
        mac(token, method, path, self.time, content_sha256)
            .verify_slice(&self.signature)
            .map_err(|_| Refusal::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "gateway-admin-token";
    const NOW: i64 = 1_796_000_000;

    #[test]
    fn a_time_at_the_ends_of_the_range_is_skewed_not_a_panic() {
        for time in [i64::MIN, i64::MAX] {
            let value = format!("{SCHEME} time={time}, signature={}", "0".repeat(64));
            let signed = Signed::parse(&value).unwrap().unwrap();
            let refused = signed.verify(TOKEN, "PUT", "/_gatehouse/config", "x", NOW);
            assert!(
                matches!(refused, Err(Refusal::Skewed(_))),
                "{time}: {refused:?}"
            );
        }
    }

    fn signed(method: &str, path: &str, time: i64, body: &[u8]) -> Signed {
        let value = authorization(TOKEN, method, path, time, &content_sha256(body));
        Signed::parse(&value).unwrap().unwrap()
    }

    #[test]
    fn a_signature_verifies_only_for_its_token_request_and_time() {
        let body = br#"{"version":2}"#;
        let digest = content_sha256(body);
        let put = signed("PUT", "/_gatehouse/config", NOW, body);
        assert_eq!(
            put.verify(TOKEN, "PUT", "/_gatehouse/config", &digest, NOW + 10),
            Ok(())
        );
        for (token, method, path, digest) in [
            (
                "another-token",
                "PUT",
                "/_gatehouse/config",
                digest.as_str(),
            ),
            (TOKEN, "GET", "/_gatehouse/config", digest.as_str()),
            (TOKEN, "PUT", "/_gatehouse/backends", digest.as_str()),
            (TOKEN, "PUT", "/_gatehouse/config", &content_sha256(b"{}")),
        ] {
            assert_eq!(
                put.verify(token, method, path, digest, NOW),
                Err(Refusal::Mismatch),
                "{token} {method} {path} {digest}"
            );
        }
        assert_eq!(
            put.verify(TOKEN, "PUT", "/_gatehouse/config", &digest, NOW + 301),
            Err(Refusal::Skewed(-301))
        );
        assert_eq!(
            put.verify(TOKEN, "PUT", "/_gatehouse/config", &digest, NOW - 400),
            Err(Refusal::Skewed(400))
        );
    }

    #[test]
    fn the_header_is_read_strictly() {
        assert_eq!(Signed::parse("Bearer abc"), None);
        for malformed in [
            "Gatehouse-HMAC-SHA256 time=1",
            "Gatehouse-HMAC-SHA256 signature=00",
            "Gatehouse-HMAC-SHA256 time=x, signature=00",
            "Gatehouse-HMAC-SHA256 time=1, signature=zz",
            "Gatehouse-HMAC-SHA256 time=1, signature=00, extra=1",
            "Gatehouse-HMAC-SHA256 time=1, time=2, signature=00",
        ] {
            assert_eq!(
                Signed::parse(malformed),
                Some(Err(Refusal::Malformed)),
                "{malformed}"
            );
        }
        let value = authorization(
            TOKEN,
            "GET",
            "/_gatehouse/backends",
            NOW,
            &content_sha256(b""),
        );
        assert!(value.starts_with("Gatehouse-HMAC-SHA256 time=1796000000, signature="));
        assert!(!value.contains(TOKEN));
    }
}

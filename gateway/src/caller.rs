//! Step 2: who is on the other end of the connection.
//!
//! The peer address is always known. `X-Forwarded-For` is believed only when the peer is a trusted
//! proxy, and then only as far back as the chain stays inside trusted proxies: the client address
//! is the right-most entry that is not itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The resolved caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    /// The client as far as trusted proxies vouch for it.
    pub client: IpAddr,
    /// The immediate TCP peer.
    pub peer: IpAddr,
}

/// Resolves the client address from the peer and `X-Forwarded-For`.
pub fn resolve(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Caller {
    let peer = canonical(peer.ip());
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer;
    if is_trusted(&peer) {
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else { break };
            client = ip;
            if !is_trusted(&ip) {
                break;
            }
        }
    }
    Caller { client, peer }
}

/// An IPv4-mapped IPv6 address is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`1.2.3.4:567`, `[::1]:8`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    hop.parse::<SocketAddr>().ok().map(|s| canonical(s.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert("x-forwarded-for", xff.parse().unwrap());
        map
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let stranger: SocketAddr = "203.0.113.9:5000".parse().unwrap();

        let via_proxy = resolve(proxy, &headers("198.51.100.7"), &trusted);
        assert_eq!(via_proxy.client.to_string(), "198.51.100.7");
        assert_eq!(via_proxy.peer.to_string(), "10.1.2.3");

        let spoofed = resolve(stranger, &headers("198.51.100.7"), &trusted);
        assert_eq!(spoofed.client.to_string(), "203.0.113.9");

        // The client forged the left-most entry; the proxy appended the real one.
        let forged = resolve(proxy, &headers("1.1.1.1, 198.51.100.7, 10.9.9.9"), &trusted);
        assert_eq!(forged.client.to_string(), "198.51.100.7");

        let garbage = resolve(proxy, &headers("not-an-ip"), &trusted);
        assert_eq!(garbage.client.to_string(), "10.1.2.3");
    }
}

//! Network address helpers: CIDR blocks (for `--trusted-proxies`) and the client address of a request, which
//! sign-in throttling and the anonymous registration limits count by.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use axum::http::HeaderMap;

/// The address a request comes from (SPEC §9): the TCP peer, or, when the peer is one of `trusted` proxies, the
/// nearest address of `X-Forwarded-For` that is not itself a trusted proxy.
///
/// `X-Forwarded-For` is read from the right: each proxy appends the address it received the request from, so the
/// right-most entries were written by proxies we trust, and everything left of the first untrusted entry was
/// written by the client and may be invented. That first untrusted entry (the left-most of the trusted chain's
/// view) is the client. An entry that is not an address stops the walk at the last trusted hop. IPv4-mapped IPv6
/// addresses count as their IPv4 form.
pub fn client_addr(peer: SocketAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|cidr| cidr.contains(ip));
    let mut client = peer.ip().to_canonical();
    if !is_trusted(client) {
        return client;
    }
    let forwarded: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .collect();
    for entry in forwarded.iter().rev() {
        let Some(ip) = parse_forwarded(entry) else { break };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, possibly with a port (`203.0.113.7:4711`, `[2001:db8::1]:4711`).
fn parse_forwarded(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry.parse::<SocketAddr>().ok().map(|addr| addr.ip().to_canonical())
}

/// Whether `addr` is the router's own `listener`: the same port, and the listener's address, or, for a listener on
/// every address (`0.0.0.0`, `::`), an address of this machine. An address is this machine's when a socket can be
/// bound to it.
pub fn is_listener(addr: SocketAddr, listener: SocketAddr) -> bool {
    if addr.port() != listener.port() {
        return false;
    }
    let (ip, own) = (addr.ip().to_canonical(), listener.ip().to_canonical());
    if ip == own {
        return true;
    }
    own.is_unspecified() && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The key an address is counted under by per-address limits: an IPv4 address as it is, an IPv6 address by its
/// /64 prefix, because one IPv6 host (or one customer of a provider) is routinely given a whole /64 and could
/// otherwise take a fresh address for every request.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// An address block such as `10.0.0.0/8` or `fd00::/8`; a bare address is a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// True when `ip` lies in the block. IPv4-mapped IPv6 addresses count as their IPv4 form.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("`{text}` is not an address block like 10.0.0.0/8"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runtime_at_the_routers_own_listener_is_recognised() {
        let addr = |text: &str| text.parse::<SocketAddr>().expect("socket address");
        assert!(is_listener(addr("127.0.0.1:8080"), addr("127.0.0.1:8080")));
        assert!(is_listener(addr("127.0.0.1:8080"), addr("0.0.0.0:8080")), "any address includes loopback");
        assert!(is_listener(addr("127.0.0.2:8080"), addr("0.0.0.0:8080")), "all of 127/8 is this machine");
        assert!(!is_listener(addr("127.0.0.2:8080"), addr("127.0.0.1:8080")), "a listener on one address only");
        assert!(is_listener(addr("[::ffff:127.0.0.1]:8080"), addr("0.0.0.0:8080")));
        assert!(!is_listener(addr("127.0.0.1:8000"), addr("0.0.0.0:8080")), "another port");
        assert!(!is_listener(addr("192.0.2.10:8080"), addr("0.0.0.0:8080")), "not an address of this machine");
        assert!(!is_listener(addr("192.0.2.10:8080"), addr("127.0.0.1:8080")));
    }

    fn cidr(text: &str) -> Cidr {
        text.parse().expect("cidr")
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    #[test]
    fn contains_by_prefix() {
        assert!(cidr("10.0.0.0/8").contains(ip("10.200.1.2")));
        assert!(!cidr("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
        assert!(!cidr("fd00::/8").contains(ip("fe80::1")));
        assert!(!cidr("10.0.0.0/8").contains(ip("fd00::1")));
    }

    #[test]
    fn ipv4_mapped_addresses_count_as_ipv4() {
        assert!(cidr("10.0.0.0/8").contains(ip("::ffff:10.1.2.3")));
        assert!(cidr("::ffff:10.0.0.1").contains(ip("10.0.0.1")));
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in values {
            headers.append("x-forwarded-for", value.parse().expect("header value"));
        }
        headers
    }

    fn peer(text: &str) -> SocketAddr {
        SocketAddr::new(ip(text), 4711)
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let headers = forwarded(&["198.51.100.1"]);
        assert_eq!(client_addr(peer("203.0.113.9"), &headers, &[]), ip("203.0.113.9"));
        assert_eq!(client_addr(peer("203.0.113.9"), &headers, &[cidr("10.0.0.0/8")]), ip("203.0.113.9"));
        assert_eq!(client_addr(peer("::ffff:203.0.113.9"), &HeaderMap::new(), &[]), ip("203.0.113.9"));
    }

    #[test]
    fn a_trusted_peer_names_the_nearest_untrusted_forwarded_address() {
        let trusted = [cidr("10.0.0.0/8")];
        // The client invented the first entry; the trusted proxy 10.0.0.2 received the request from 198.51.100.7.
        let headers = forwarded(&["192.0.2.66, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(client_addr(peer("10.0.0.1"), &headers, &trusted), ip("198.51.100.7"));
        let headers = forwarded(&["[2001:db8::1]:4711, 203.0.113.5:80"]);
        assert_eq!(client_addr(peer("10.0.0.1"), &headers, &trusted), ip("203.0.113.5"));
        let headers = forwarded(&["2001:db8::1"]);
        assert_eq!(client_addr(peer("10.0.0.1"), &headers, &trusted), ip("2001:db8::1"));
    }

    #[test]
    fn missing_or_garbled_forwarding_falls_back_to_the_last_trusted_hop() {
        let trusted = [cidr("10.0.0.0/8")];
        assert_eq!(client_addr(peer("10.0.0.1"), &HeaderMap::new(), &trusted), ip("10.0.0.1"));
        let headers = forwarded(&["198.51.100.7, not-an-address, 10.0.0.3"]);
        assert_eq!(client_addr(peer("10.0.0.1"), &headers, &trusted), ip("10.0.0.3"));
        // Only trusted proxies all the way: the left-most of them.
        let headers = forwarded(&["10.9.9.9, 10.0.0.3"]);
        assert_eq!(client_addr(peer("10.0.0.1"), &headers, &trusted), ip("10.9.9.9"));
    }

    #[test]
    fn ipv6_addresses_are_limited_by_their_slash_64() {
        assert_eq!(limit_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(limit_key(ip("2001:db8:1:2:bbbb::9")), limit_key(ip("2001:db8:1:2::5")));
        assert_ne!(limit_key(ip("2001:db8:1:3::1")), limit_key(ip("2001:db8:1:2::1")));
        assert_eq!(limit_key(ip("198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(limit_key(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
    }

    #[test]
    fn rejects_malformed_blocks() {
        for bad in ["", "10.0.0.0/33", "fd00::/129", "10.0.0/8", "host/8", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
    }
}

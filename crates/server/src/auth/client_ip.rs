//! The client's address, and its privacy-safe forms.
//!
//! The address comes from the socket, or from `X-Forwarded-For` only when the
//! socket's peer is a trusted proxy (then the right-most address not itself a
//! trusted proxy is the client). It is never stored: events and audit rows
//! keep the network prefix (IPv4 /24, IPv6 /48; IPv4-mapped IPv6 counts as
//! IPv4) and a keyed HMAC-SHA256 of the full address, for exact matching.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use ipnet::IpNet;
use sha2::Sha256;

/// The client address as seen through the configured proxies.
pub fn client_ip(peer: SocketAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let peer_ip = normalize(peer.ip());
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer_ip) {
        return peer_ip;
    }
    let Some(header) = forwarded_for else {
        return peer_ip;
    };
    let mut candidate = peer_ip;
    for hop in header.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                candidate = normalize(ip);
                if !is_trusted(&candidate) {
                    return candidate;
                }
            }
            Err(_) => return candidate,
        }
    }
    candidate
}

/// IPv4-mapped IPv6 (`::ffff:a.b.c.d`) becomes plain IPv4.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The anonymized prefix: `203.0.113.0/24` or `2001:db8:1::/48`.
pub fn prefix(ip: IpAddr) -> String {
    match normalize(ip) {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            format!("{}/24", Ipv4Addr::new(a, b, c, 0))
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{}/48", Ipv6Addr::new(s[0], s[1], s[2], 0, 0, 0, 0, 0))
        }
    }
}

/// What one client controls as one address: an IPv4 address, or the /64 of
/// an IPv6 one — a single subscriber's allocation, so an attacker there has
/// 2^64 addresses to rotate through and counting each apart would count none.
pub fn subscriber(ip: IpAddr) -> IpAddr {
    match normalize(ip) {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// Keyed HMAC-SHA256 of the client's [`subscriber`] address, hex: what the
/// firewall's `ip` scope, the handshake limiter and stored events key by.
pub fn hmac(key: &[u8], ip: IpAddr) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(subscriber(ip).to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn an_ipv6_subscriber_is_its_64_and_an_ipv4_one_its_address() {
        let key = b"k";
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            hmac(key, ip("2001:db8:1:2::1")),
            hmac(key, ip("2001:db8:1:2:ffff:ffff:ffff:ffff"))
        );
        assert_ne!(
            hmac(key, ip("2001:db8:1:2::1")),
            hmac(key, ip("2001:db8:1:3::1"))
        );
        assert_ne!(hmac(key, ip("198.51.100.1")), hmac(key, ip("198.51.100.2")));
        assert_eq!(
            hmac(key, ip("::ffff:198.51.100.1")),
            hmac(key, ip("198.51.100.1"))
        );
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let peer: SocketAddr = "10.0.0.5:4000".parse().expect("addr");
        let xff = Some("198.51.100.7, 10.0.0.9");
        assert_eq!(client_ip(peer, xff, &[]).to_string(), "10.0.0.5");
        assert_eq!(
            client_ip(peer, xff, &nets(&["10.0.0.0/8"])).to_string(),
            "198.51.100.7"
        );
        // A spoofed left-most entry is ignored: the right-most untrusted hop wins.
        let spoofed = Some("1.2.3.4, 198.51.100.7");
        assert_eq!(
            client_ip(peer, spoofed, &nets(&["10.0.0.0/8"])).to_string(),
            "198.51.100.7"
        );
        assert_eq!(
            client_ip(peer, Some("garbage"), &nets(&["10.0.0.0/8"])).to_string(),
            "10.0.0.5"
        );
    }

    #[test]
    fn prefixes_hide_the_host() {
        assert_eq!(
            prefix("203.0.113.77".parse().expect("ip")),
            "203.0.113.0/24"
        );
        assert_eq!(
            prefix("::ffff:203.0.113.77".parse().expect("ip")),
            "203.0.113.0/24"
        );
        assert_eq!(
            prefix("2001:db8:1:2:3::9".parse().expect("ip")),
            "2001:db8:1::/48"
        );
    }

    #[test]
    fn hmac_is_keyed_and_mapped_addresses_match() {
        let ip: IpAddr = "203.0.113.77".parse().expect("ip");
        let mapped: IpAddr = "::ffff:203.0.113.77".parse().expect("ip");
        assert_eq!(hmac(b"k1", ip), hmac(b"k1", mapped));
        assert_ne!(hmac(b"k1", ip), hmac(b"k2", ip));
        assert!(!hmac(b"k1", ip).contains("203"));
    }

    proptest! {
        #[test]
        fn prefix_never_contains_the_host_octet(a in 0u8..=255, b in 0u8..=255, c in 0u8..=255, d in 1u8..=255) {
            let p = prefix(IpAddr::V4(Ipv4Addr::new(a, b, c, d)));
            prop_assert_eq!(p, format!("{a}.{b}.{c}.0/24"));
        }
    }
}

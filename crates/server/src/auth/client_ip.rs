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

/// Keyed HMAC-SHA256 of the normalized address, hex.
pub fn hmac(key: &[u8], ip: IpAddr) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(normalize(ip).to_string().as_bytes());
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

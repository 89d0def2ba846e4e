//! The special-purpose address blocks an allow pattern may not reach unless
//! `allow_private`: the IANA IPv4 and IPv6 Special-Purpose Address Registries, one
//! row per block with its RFC.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One block of the IANA IPv4 or IPv6 Special-Purpose Address Registry (RFC 6890
/// and its successors), or of the address-space registries where those leave a
/// non-unicast range out (multicast, IPv6 site-local, IPv4-compatible).
#[derive(Debug, PartialEq, Eq)]
pub struct Block {
    prefix: IpAddr,
    len: u8,
    name: &'static str,
    rfc: &'static str,
    /// An IPv6 form with an IPv4 address at this byte offset: that IPv4 address
    /// decides, since a packet to the form reaches (or is translated to) it.
    carries_ipv4_at: Option<usize>,
}

impl Block {
    fn contains(&self, ip: IpAddr) -> bool {
        let (net, ip, width) = match (self.prefix, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => (net.to_bits().into(), ip.to_bits().into(), 32),
            (IpAddr::V6(net), IpAddr::V6(ip)) => (net.to_bits(), ip.to_bits(), 128),
            _ => return false,
        };
        // Equal in the first `len` bits; a shift by the full 128 (a /0) is `None`.
        (net ^ ip)
            .checked_shr(width - u32::from(self.len))
            .unwrap_or(0)
            == 0
    }

    /// Marks an IPv6 form whose embedded IPv4 address is judged instead.
    const fn carrying_ipv4_at(self, offset: usize) -> Block {
        Block {
            carries_ipv4_at: Some(offset),
            ..self
        }
    }
}

impl fmt::Display for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} ({}, {})",
            self.prefix, self.len, self.name, self.rfc
        )
    }
}

const fn v4(octets: [u8; 4], len: u8, name: &'static str, rfc: &'static str) -> Block {
    let [a, b, c, d] = octets;
    Block {
        prefix: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        len,
        name,
        rfc,
        carries_ipv4_at: None,
    }
}

const fn v6(s: [u16; 8], len: u8, name: &'static str, rfc: &'static str) -> Block {
    Block {
        prefix: IpAddr::V6(Ipv6Addr::new(
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        )),
        len,
        name,
        rfc,
        carries_ipv4_at: None,
    }
}

/// Every block of the IPv4 Special-Purpose Address Registry, plus multicast. A
/// few blocks the registry marks globally reachable (AS112, AMT; the PCP and TURN
/// anycast addresses inside 192.0.0.0/24) are refused with the rest: they serve
/// DNS sinks and relays, never an HTTP origin, and one rule ("nothing in the
/// registries") is easier to audit than a list of exceptions.
// One row per block, as the registry lists them.
#[rustfmt::skip]
const IPV4: &[Block] = &[
    v4([0, 0, 0, 0],         8,  "this network", "RFC 791"),
    v4([10, 0, 0, 0],        8,  "private-use", "RFC 1918"),
    v4([100, 64, 0, 0],      10, "shared address space", "RFC 6598"),
    v4([127, 0, 0, 0],       8,  "loopback", "RFC 1122"),
    v4([169, 254, 0, 0],     16, "link-local", "RFC 3927"),
    v4([172, 16, 0, 0],      12, "private-use", "RFC 1918"),
    v4([192, 0, 0, 0],       24, "IETF protocol assignments", "RFC 6890"),
    v4([192, 0, 2, 0],       24, "documentation, TEST-NET-1", "RFC 5737"),
    v4([192, 31, 196, 0],    24, "AS112-v4", "RFC 7535"),
    v4([192, 52, 193, 0],    24, "AMT", "RFC 7450"),
    v4([192, 88, 99, 0],     24, "deprecated 6to4 relay anycast", "RFC 7526"),
    v4([192, 168, 0, 0],     16, "private-use", "RFC 1918"),
    v4([192, 175, 48, 0],    24, "direct delegation AS112 service", "RFC 7534"),
    v4([198, 18, 0, 0],      15, "benchmarking", "RFC 2544"),
    v4([198, 51, 100, 0],    24, "documentation, TEST-NET-2", "RFC 5737"),
    v4([203, 0, 113, 0],     24, "documentation, TEST-NET-3", "RFC 5737"),
    v4([224, 0, 0, 0],       4,  "multicast", "RFC 5771"),
    v4([240, 0, 0, 0],       4,  "reserved", "RFC 1112"),
    v4([255, 255, 255, 255], 32, "limited broadcast", "RFC 919"),
];

/// Every block of the IPv6 Special-Purpose Address Registry, plus multicast,
/// the deprecated site-local and IPv4-compatible forms. The well-known NAT64
/// prefix is globally reachable and carries any IPv4 address, so (like IPv4-mapped
/// addresses and 6to4) it is judged by the address it carries. Teredo obscures
/// its client address, so it is refused with the rest of 2001::/23.
#[rustfmt::skip]
const IPV6: &[Block] = &[
    v6([0, 0, 0, 0, 0, 0, 0, 0],              128, "unspecified", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0, 0, 1],              128, "loopback", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0, 0, 0],              96,  "deprecated IPv4-compatible", "RFC 4291"),
    v6([0, 0, 0, 0, 0, 0xffff, 0, 0],         96,  "IPv4-mapped", "RFC 4291")
        .carrying_ipv4_at(12),
    v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0],      96,  "IPv4/IPv6 translation", "RFC 6052")
        .carrying_ipv4_at(12),
    v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0],      48,  "local-use IPv4/IPv6 translation", "RFC 8215"),
    v6([0x100, 0, 0, 0, 0, 0, 0, 0],          64,  "discard-only", "RFC 6666"),
    v6([0x100, 0, 0, 1, 0, 0, 0, 0],          64,  "dummy IPv6 prefix", "RFC 9780"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0],         23,  "IETF protocol assignments", "RFC 2928"),
    v6([0x2001, 0, 0, 0, 0, 0, 0, 0],         32,  "Teredo", "RFC 4380"),
    v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0],     32,  "documentation", "RFC 3849"),
    v6([0x2002, 0, 0, 0, 0, 0, 0, 0],         16,  "6to4", "RFC 3056")
        .carrying_ipv4_at(2),
    v6([0x2620, 0x4f, 0x8000, 0, 0, 0, 0, 0], 48,  "direct delegation AS112 service", "RFC 7534"),
    v6([0x3fff, 0, 0, 0, 0, 0, 0, 0],         20,  "documentation", "RFC 9637"),
    v6([0x5f00, 0, 0, 0, 0, 0, 0, 0],         16,  "segment routing (SRv6) SIDs", "RFC 9602"),
    v6([0xfc00, 0, 0, 0, 0, 0, 0, 0],         7,   "unique-local", "RFC 4193"),
    v6([0xfe80, 0, 0, 0, 0, 0, 0, 0],         10,  "link-local", "RFC 4291"),
    v6([0xfec0, 0, 0, 0, 0, 0, 0, 0],         10,  "deprecated site-local", "RFC 3879"),
    v6([0xff00, 0, 0, 0, 0, 0, 0, 0],         8,   "multicast", "RFC 4291"),
];

/// Why an address may not be dialled for an origin reached through an allow
/// pattern. Displays as, e.g., `10.0.0.1 is in 10.0.0.0/8 (private-use, RFC 1918)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub addr: IpAddr,
    /// The block that decided: for an IPv6 form carrying an IPv4 address, the
    /// IPv4 address's block.
    pub block: &'static Block,
    /// The IPv6 form and the IPv4 address it carries, when that address decided.
    pub via: Option<(&'static Block, Ipv4Addr)>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.via {
            None => write!(f, "{} is in {}", self.addr, self.block),
            Some((form, v4)) => write!(
                f,
                "{} is in {form} and carries {v4}, which is in {}",
                self.addr, self.block
            ),
        }
    }
}

/// The most specific block holding `ip`, so a message names 2001::/32 (Teredo)
/// rather than the 2001::/23 around it.
fn block_of(ip: IpAddr) -> Option<&'static Block> {
    let table = if ip.is_ipv4() { IPV4 } else { IPV6 };
    table
        .iter()
        .filter(|b| b.contains(ip))
        .max_by_key(|b| b.len)
}

/// Why an allow pattern may not reach `ip`, or `None` when it may. Refused are the
/// "private" addresses `allow_private` lets through, which here means any address
/// that is not plain globally reachable unicast, i.e. in any block of the IANA
/// special-purpose registries (RFC 1918 private use, loopback, link-local with the
/// cloud metadata service at 169.254.169.254, CGNAT shared space, unique-local,
/// documentation, benchmarking...), multicast, reserved or broadcast. IPv4-mapped,
/// NAT64 (64:ff9b::/96) and 6to4 addresses are judged by the IPv4 address they
/// carry, so `::ffff:10.0.0.1` is refused and `64:ff9b::808:808` is not.
pub fn refusal(ip: IpAddr) -> Option<Refusal> {
    let block = block_of(ip)?;
    let (IpAddr::V6(v6), Some(at)) = (ip, block.carries_ipv4_at) else {
        return Some(Refusal {
            addr: ip,
            block,
            via: None,
        });
    };
    let o = v6.octets();
    let carried = Ipv4Addr::new(o[at], o[at + 1], o[at + 2], o[at + 3]);
    block_of(IpAddr::V4(carried)).map(|inner| Refusal {
        addr: ip,
        block: inner,
        via: Some((block, carried)),
    })
}

/// The first of a name's resolved addresses that an allow pattern may not reach.
/// One such address refuses the whole origin: tether tries a name's addresses in
/// turn, so a private one anywhere in the answer could be dialled once the public
/// ones fail.
pub fn first_refused(addrs: impl IntoIterator<Item = IpAddr>) -> Option<Refusal> {
    addrs.into_iter().find_map(refusal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// The block `refusal` names for an address, as `prefix/len`; `None` when the
    /// address is allowed.
    fn refused_in(addr: &str) -> Option<String> {
        refusal(ip(addr)).map(|r| format!("{}/{}", r.block.prefix, r.block.len))
    }

    #[test]
    fn every_special_purpose_block_is_refused_from_its_first_to_its_last_address() {
        // Written out by hand from the registries rather than derived from the
        // tables, so a mistyped table row fails here.
        let blocks = [
            ("0.0.0.0", "0.255.255.255", "0.0.0.0/8"),
            ("10.0.0.0", "10.255.255.255", "10.0.0.0/8"),
            ("100.64.0.0", "100.127.255.255", "100.64.0.0/10"),
            ("127.0.0.0", "127.255.255.255", "127.0.0.0/8"),
            ("169.254.0.0", "169.254.255.255", "169.254.0.0/16"),
            ("172.16.0.0", "172.31.255.255", "172.16.0.0/12"),
            ("192.0.0.0", "192.0.0.255", "192.0.0.0/24"),
            ("192.0.2.0", "192.0.2.255", "192.0.2.0/24"),
            ("192.31.196.0", "192.31.196.255", "192.31.196.0/24"),
            ("192.52.193.0", "192.52.193.255", "192.52.193.0/24"),
            ("192.88.99.0", "192.88.99.255", "192.88.99.0/24"),
            ("192.168.0.0", "192.168.255.255", "192.168.0.0/16"),
            ("192.175.48.0", "192.175.48.255", "192.175.48.0/24"),
            ("198.18.0.0", "198.19.255.255", "198.18.0.0/15"),
            ("198.51.100.0", "198.51.100.255", "198.51.100.0/24"),
            ("203.0.113.0", "203.0.113.255", "203.0.113.0/24"),
            ("224.0.0.0", "239.255.255.255", "224.0.0.0/4"),
            ("240.0.0.0", "255.255.255.254", "240.0.0.0/4"),
            ("255.255.255.255", "255.255.255.255", "255.255.255.255/32"),
            ("::", "::", "::/128"),
            ("::1", "::1", "::1/128"),
            ("::2", "::ffff:ffff", "::/96"),
            (
                "64:ff9b:1::",
                "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
                "64:ff9b:1::/48",
            ),
            ("100::", "100::ffff:ffff:ffff:ffff", "100::/64"),
            (
                "100:0:0:1::",
                "100::1:ffff:ffff:ffff:ffff",
                "100:0:0:1::/64",
            ),
            (
                "2001::",
                "2001:0:ffff:ffff:ffff:ffff:ffff:ffff",
                "2001::/32",
            ),
            (
                "2001:1::",
                "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff",
                "2001::/23",
            ),
            (
                "2001:db8::",
                "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
                "2001:db8::/32",
            ),
            (
                "2620:4f:8000::",
                "2620:4f:8000:ffff:ffff:ffff:ffff:ffff",
                "2620:4f:8000::/48",
            ),
            (
                "3fff::",
                "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff",
                "3fff::/20",
            ),
            (
                "5f00::",
                "5f00:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "5f00::/16",
            ),
            (
                "fc00::",
                "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "fc00::/7",
            ),
            (
                "fe80::",
                "febf:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "fe80::/10",
            ),
            (
                "fec0::",
                "feff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "fec0::/10",
            ),
            (
                "ff00::",
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
                "ff00::/8",
            ),
        ];
        for (first, last, block) in blocks {
            for addr in [first, last] {
                assert_eq!(refused_in(addr).as_deref(), Some(block), "{addr}");
            }
        }
    }

    #[test]
    fn addresses_just_outside_a_block_stay_allowed() {
        for (outside, inside) in [
            ("172.15.255.255", "172.16.0.0"),
            ("172.32.0.0", "172.31.255.255"),
            ("9.255.255.255", "10.0.0.0"),
            ("11.0.0.0", "10.255.255.255"),
            ("100.63.255.255", "100.64.0.0"),
            ("100.128.0.0", "100.127.255.255"),
            ("169.253.255.255", "169.254.0.0"),
            ("169.255.0.0", "169.254.255.255"),
            ("192.167.255.255", "192.168.0.0"),
            ("192.169.0.0", "192.168.255.255"),
            ("198.17.255.255", "198.18.0.0"),
            ("198.20.0.0", "198.19.255.255"),
            ("223.255.255.255", "224.0.0.0"),
            ("2001:200::", "2001:1ff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ("2001:db9::", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"),
            ("3fff:1000::", "3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "fc00::"),
        ] {
            assert_eq!(refused_in(outside), None, "{outside}");
            assert!(refused_in(inside).is_some(), "{inside}");
        }
    }

    #[test]
    fn public_addresses_stay_allowed() {
        // Values only: nothing here is ever dialled.
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "9.9.9.9",
            "93.184.216.34",
            "2606:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001:81c::200e",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert_eq!(refusal(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn ipv6_forms_carrying_an_ipv4_address_are_judged_by_that_address() {
        for (addr, carried, block) in [
            ("::ffff:10.0.0.1", "10.0.0.1", "10.0.0.0/8"),
            ("::ffff:127.0.0.1", "127.0.0.1", "127.0.0.0/8"),
            ("::ffff:0.0.0.0", "0.0.0.0", "0.0.0.0/8"),
            ("64:ff9b::a00:1", "10.0.0.1", "10.0.0.0/8"),
            (
                "64:ff9b::169.254.169.254",
                "169.254.169.254",
                "169.254.0.0/16",
            ),
            ("2002:0a00:0001::", "10.0.0.1", "10.0.0.0/8"),
            ("2002:c0a8:101::1", "192.168.1.1", "192.168.0.0/16"),
            ("2002:7f00:1::", "127.0.0.1", "127.0.0.0/8"),
        ] {
            let refused = refusal(ip(addr)).unwrap_or_else(|| panic!("{addr} was allowed"));
            assert_eq!(refused.addr, ip(addr));
            assert_eq!(refused.via.map(|(_, v4)| IpAddr::V4(v4)), Some(ip(carried)));
            assert_eq!(refused_in(addr).as_deref(), Some(block), "{addr}");
        }
        // Forms that do not reach the address they appear to carry are refused as
        // what they are.
        assert_eq!(refused_in("::8.8.8.8").as_deref(), Some("::/96"));
        assert_eq!(
            refused_in("2001:0:4136:e378:8000:63bf:3fff:fdd2").as_deref(),
            Some("2001::/32"),
            "Teredo"
        );
        assert_eq!(
            refused_in("64:ff9b:1::808:808").as_deref(),
            Some("64:ff9b:1::/48"),
            "local-use NAT64"
        );
    }

    #[test]
    fn a_refusal_names_the_block_and_the_rfc_behind_it() {
        assert_eq!(
            refusal(ip("10.0.0.1")).unwrap().to_string(),
            "10.0.0.1 is in 10.0.0.0/8 (private-use, RFC 1918)"
        );
        assert_eq!(
            refusal(ip("fd00::1")).unwrap().to_string(),
            "fd00::1 is in fc00::/7 (unique-local, RFC 4193)"
        );
        assert_eq!(
            refusal(ip("64:ff9b::a00:1")).unwrap().to_string(),
            "64:ff9b::a00:1 is in 64:ff9b::/96 (IPv4/IPv6 translation, RFC 6052) \
             and carries 10.0.0.1, which is in 10.0.0.0/8 (private-use, RFC 1918)"
        );
    }

    #[test]
    fn one_refused_address_refuses_the_whole_answer() {
        let addrs = |list: &[&str]| list.iter().map(|s| ip(s)).collect::<Vec<_>>();
        let refused = first_refused(addrs(&["8.8.8.8", "2606:4700::1111", "10.1.2.3"]));
        assert_eq!(refused.map(|r| r.addr), Some(ip("10.1.2.3")));
        assert_eq!(first_refused(addrs(&["8.8.8.8", "2606:4700::1111"])), None);
        assert_eq!(first_refused(addrs(&[])), None);
    }

    #[test]
    fn the_block_tables_are_well_formed() {
        for block in IPV4.iter().chain(IPV6) {
            let width = if block.prefix.is_ipv4() { 32 } else { 128 };
            assert!(u32::from(block.len) <= width, "{block}");
            // No bit set past the prefix length: `10.0.0.0/4` would be a typo.
            let host_bits = width - u32::from(block.len);
            let host_mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |m| m - 1);
            let bits = match block.prefix {
                IpAddr::V4(a) => u128::from(a.to_bits()),
                IpAddr::V6(a) => a.to_bits(),
            };
            assert_eq!(bits & host_mask, 0, "{block} has host bits set");
            if let Some(at) = block.carries_ipv4_at {
                assert!(block.prefix.is_ipv6() && at + 4 <= 16, "{block}");
                assert!(
                    u32::from(block.len) <= 8 * at as u32,
                    "{block} overlaps its IPv4"
                );
            }
        }
    }
}

//! A set of IPv4 and IPv6 networks written in CIDR notation, for the `allow`, `deny` and
//! `proxy_trusted` keys (docs/protocol.md#admission-by-network). Pure: built once by
//! `config`, read by the accept loop.
//!
//! Lookups must stay cheap with tens of thousands of entries, since one runs on every
//! accept: the networks are turned into sorted, merged, disjoint address ranges per family,
//! and [`NetList::contains`] is one binary search (about 14 steps for 10,000 ranges). An
//! IPv4 client seen on a dual-stack listener as `::ffff:a.b.c.d` is looked up as the IPv4
//! address it is. The networks as written are kept for `check`'s output.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One network: an address whose bits past `prefix` are zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The first and last address of the network, as integers of its family's width.
    fn range(self) -> (u128, u128) {
        let (start, bits) = match self.addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        let host_bits = bits - self.prefix as u32;
        let span = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        (start, start + span)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/n`, `x:y::z/n`, or a bare address (a single host). Bits set past the prefix
    /// are refused rather than masked: `10.1.2.3/8` is more likely a typo than a network.
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4 or IPv6 address"))?;
        let width = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix_text {
            None => width,
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= width && !p.starts_with('+') => n,
                _ => return Err(format!("{text:?} has a prefix length that is not 0 to {width}")),
            },
        };
        let cidr = Cidr { addr, prefix };
        let bits = match addr {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        };
        let masked = Cidr {
            addr: from_bits(start_of(bits, width, prefix), addr.is_ipv4()),
            prefix,
        };
        if masked != cidr {
            return Err(format!("{text:?} has host bits set (the network is {masked})"));
        }
        Ok(cidr)
    }
}

fn start_of(value: u128, width: u8, prefix: u8) -> u128 {
    let host_bits = (width - prefix) as u32;
    if host_bits >= 128 {
        0
    } else {
        value >> host_bits << host_bits
    }
}

fn from_bits(value: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4((value as u32).into())
    } else {
        IpAddr::V6(value.into())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A set of networks (see the module docs). Empty matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetList {
    /// The networks as given, for display.
    cidrs: Vec<Cidr>,
    /// Disjoint, non-adjacent inclusive ranges, sorted: IPv4 ones in `u32` space.
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

impl NetList {
    /// Builds the set; the error names the first entry that is not a network.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<NetList, String> {
        let cidrs = items
            .into_iter()
            .map(|item| item.trim().parse::<Cidr>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetList::from_cidrs(cidrs))
    }

    pub fn from_cidrs(cidrs: Vec<Cidr>) -> NetList {
        let ranges = |v4: bool| {
            let mut r: Vec<(u128, u128)> = cidrs
                .iter()
                .filter(|c| c.addr.is_ipv4() == v4)
                .map(|c| c.range())
                .collect();
            r.sort_unstable();
            let mut merged: Vec<(u128, u128)> = Vec::with_capacity(r.len());
            for (start, end) in r {
                match merged.last_mut() {
                    Some(last) if start <= last.1.saturating_add(1) => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            merged
        };
        NetList {
            v4: ranges(true),
            v6: ranges(false),
            cidrs,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty()
    }

    /// Whether `ip` is in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let (ranges, value) = match ip.to_canonical() {
            IpAddr::V4(a) => (&self.v4, u32::from(a) as u128),
            IpAddr::V6(a) => (&self.v6, u128::from(a)),
        };
        // The last range starting at or before `value` is the only one that can hold it.
        let after = ranges.partition_point(|&(start, _)| start <= value);
        after > 0 && ranges[after - 1].1 >= value
    }

    /// The networks as written (normalised), for the effective configuration.
    pub fn to_strings(&self) -> Vec<String> {
        self.cidrs.iter().map(Cidr::to_string).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> NetList {
        NetList::parse(items.iter().copied()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_match_their_addresses_only() {
        let l = list(&["10.0.0.0/8", "192.168.1.7", "2001:db8::/32", "::1"]);
        for yes in [
            "10.0.0.0",
            "10.255.255.255",
            "192.168.1.7",
            "2001:db8:ffff::1",
            "::1",
            "::ffff:10.1.2.3",
        ] {
            assert!(l.contains(ip(yes)), "{yes}");
        }
        for no in [
            "9.255.255.255",
            "11.0.0.0",
            "192.168.1.8",
            "2001:db9::",
            "::2",
            "127.0.0.1",
        ] {
            assert!(!l.contains(ip(no)), "{no}");
        }
        assert!(!NetList::default().contains(ip("10.0.0.1")));
    }

    #[test]
    fn zero_prefixes_match_a_whole_family() {
        let l = list(&["0.0.0.0/0"]);
        assert!(l.contains(ip("255.255.255.255")) && l.contains(ip("0.0.0.0")));
        assert!(!l.contains(ip("::1")));
        let l = list(&["::/0"]);
        assert!(l.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) && !l.contains(ip("1.2.3.4")));
    }

    #[test]
    fn overlapping_and_adjacent_networks_merge() {
        let l = list(&["10.0.0.0/24", "10.0.1.0/24", "10.0.0.128/25", "10.0.3.0/24"]);
        assert_eq!(l.v4, vec![(0x0A00_0000, 0x0A00_01FF), (0x0A00_0300, 0x0A00_03FF)]);
        assert!(l.contains(ip("10.0.1.255")) && !l.contains(ip("10.0.2.0")) && l.contains(ip("10.0.3.9")));
    }

    #[test]
    fn a_large_list_matches_exactly_its_entries() {
        let items: Vec<String> = (0..10_000u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256 * 2, i % 256))
            .collect();
        let l = NetList::parse(items.iter().map(String::as_str)).unwrap();
        for i in (0..10_000u32).step_by(97) {
            assert!(l.contains(ip(&format!("10.{}.{}.9", i / 256 * 2, i % 256))));
            assert!(!l.contains(ip(&format!("10.{}.{}.9", i / 256 * 2 + 1, i % 256))));
        }
    }

    #[test]
    fn bad_networks_are_refused_with_a_reason() {
        for (bad, why) in [
            ("10.0.0.0/33", "prefix length"),
            ("10.0.0.1/8", "host bits set (the network is 10.0.0.0/8)"),
            ("10.0.0/8", "not an IPv4"),
            ("example.com", "not an IPv4"),
            ("::/129", "prefix length"),
            ("10.0.0.0/", "prefix length"),
            ("10.0.0.0/+8", "prefix length"),
            ("", "not an IPv4"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        assert_eq!(list(&[" 10.0.0.0/8", "::1"]).to_strings(), ["10.0.0.0/8", "::1/128"]);
    }
}

//! IP prefixes and a longest-prefix-match table (the SPD selector lookup of espip: inner
//! destination -> peer on egress, inner source -> peer on ingress).
//!
//! The table keeps one hash map per prefix length present, searched from the longest length
//! down: a lookup costs one hash probe per distinct length (at most 33 for IPv4, 129 for IPv6,
//! in practice a handful), whatever the number of prefixes.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An IPv4 or IPv6 prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// A prefix string that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an address or CIDR prefix (expected e.g. 10.4.2.5/32 or fd00::/64)")]
pub struct BadPrefix(pub String);

impl Prefix {
    /// A prefix of `len` bits of `addr`; host bits are cleared. `None` if `len` is too long.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return None;
        }
        Some(Prefix {
            addr: mask(addr, len),
            len,
        })
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn len(&self) -> u8 {
        self.len
    }

    /// True for a zero-length (default) prefix.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True if `ip` lies inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.len) == self.addr
    }
}

fn mask(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl FromStr for Prefix {
    type Err = BadPrefix;
    fn from_str(s: &str) -> Result<Self, BadPrefix> {
        let bad = || BadPrefix(s.to_string());
        let (a, l) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let len = match l {
            Some(l) => l.trim().parse::<u8>().map_err(|_| bad())?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Prefix::new(addr, len).ok_or_else(bad)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Longest-prefix-match table from prefixes to values.
#[derive(Debug, Clone)]
pub struct PrefixTable<V> {
    v4: Vec<(u8, HashMap<u32, V>)>,
    v6: Vec<(u8, HashMap<u128, V>)>,
}

impl<V> Default for PrefixTable<V> {
    fn default() -> Self {
        PrefixTable {
            v4: Vec::new(),
            v6: Vec::new(),
        }
    }
}

fn slot<K, V>(levels: &mut Vec<(u8, HashMap<K, V>)>, len: u8) -> &mut HashMap<K, V> {
    let i = match levels.iter().position(|(l, _)| *l <= len) {
        Some(i) if levels[i].0 == len => i,
        Some(i) => {
            levels.insert(i, (len, HashMap::new()));
            i
        }
        None => {
            levels.push((len, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[i].1
}

impl<V> PrefixTable<V> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Insert or replace; returns the old value.
    pub fn insert(&mut self, p: Prefix, v: V) -> Option<V> {
        match p.addr {
            IpAddr::V4(a) => slot(&mut self.v4, p.len).insert(u32::from(a), v),
            IpAddr::V6(a) => slot(&mut self.v6, p.len).insert(u128::from(a), v),
        }
    }

    /// Remove a prefix; returns its value.
    pub fn remove(&mut self, p: &Prefix) -> Option<V> {
        let out = match p.addr {
            IpAddr::V4(a) => self
                .v4
                .iter_mut()
                .find(|(l, _)| *l == p.len)
                .and_then(|(_, m)| m.remove(&u32::from(a))),
            IpAddr::V6(a) => self
                .v6
                .iter_mut()
                .find(|(l, _)| *l == p.len)
                .and_then(|(_, m)| m.remove(&u128::from(a))),
        };
        self.v4.retain(|(_, m)| !m.is_empty());
        self.v6.retain(|(_, m)| !m.is_empty());
        out
    }

    /// The value of the exact prefix.
    pub fn get(&self, p: &Prefix) -> Option<&V> {
        match p.addr {
            IpAddr::V4(a) => self
                .v4
                .iter()
                .find(|(l, _)| *l == p.len)
                .and_then(|(_, m)| m.get(&u32::from(a))),
            IpAddr::V6(a) => self
                .v6
                .iter()
                .find(|(l, _)| *l == p.len)
                .and_then(|(_, m)| m.get(&u128::from(a))),
        }
    }

    /// The value of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<&V> {
        match ip {
            IpAddr::V4(a) => {
                let a = u32::from(a);
                self.v4.iter().find_map(|(l, m)| {
                    let k = if *l == 0 {
                        0
                    } else {
                        a & (u32::MAX << (32 - l))
                    };
                    m.get(&k)
                })
            }
            IpAddr::V6(a) => {
                let a = u128::from(a);
                self.v6.iter().find_map(|(l, m)| {
                    let k = if *l == 0 {
                        0
                    } else {
                        a & (u128::MAX << (128 - l))
                    };
                    m.get(&k)
                })
            }
        }
    }

    /// Number of prefixes.
    pub fn len(&self) -> usize {
        self.v4.iter().map(|(_, m)| m.len()).sum::<usize>()
            + self.v6.iter().map(|(_, m)| m.len()).sum::<usize>()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(p("10.4.2.5").to_string(), "10.4.2.5/32");
        assert_eq!(p("10.4.2.77/24").to_string(), "10.4.2.0/24");
        assert_eq!(p("fd00::1/64").to_string(), "fd00::/64");
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("nonsense".parse::<Prefix>().is_err());
        assert!(p("10.0.0.0/8").contains(ip("10.9.9.9")));
        assert!(!p("10.0.0.0/8").contains(ip("::a00:1")));
    }

    #[test]
    fn longest_match_overlaps_and_removal() {
        let mut t = PrefixTable::new();
        t.insert(p("0.0.0.0/0"), "default");
        t.insert(p("10.0.0.0/8"), "ten");
        t.insert(p("10.4.2.0/24"), "lab");
        t.insert(p("10.4.2.5/32"), "b");
        t.insert(p("fd00::/8"), "ula");
        t.insert(p("fd00:1::/32"), "site");
        assert_eq!(t.lookup(ip("10.4.2.5")), Some(&"b"));
        assert_eq!(t.lookup(ip("10.4.2.6")), Some(&"lab"));
        assert_eq!(t.lookup(ip("10.5.0.1")), Some(&"ten"));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&"default"));
        assert_eq!(t.lookup(ip("fd00:1::9")), Some(&"site"));
        assert_eq!(t.lookup(ip("fd55::9")), Some(&"ula"));
        assert_eq!(t.lookup(ip("2001:db8::1")), None);
        assert_eq!(t.remove(&p("10.4.2.5/32")), Some("b"));
        assert_eq!(t.lookup(ip("10.4.2.5")), Some(&"lab"));
        assert_eq!(t.remove(&p("10.4.2.5/32")), None);
        assert_eq!(t.len(), 5);
    }

    #[test]
    fn thousands_of_peers() {
        let mut t = PrefixTable::new();
        for i in 0..5000u32 {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8));
            t.insert(Prefix::new(IpAddr::V4(a), 24).unwrap(), i);
        }
        for i in (0..5000u32).step_by(97) {
            let a = std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8) + 77);
            assert_eq!(t.lookup(IpAddr::V4(a)), Some(&i));
        }
    }
}

//! Traffic selectors: from prefixes, and the responder's narrowing (RFC 7296 section 2.9):
//! the intersection of what the initiator proposed with what this side's policy allows.

use super::msg::Ts;
use crate::prefix::Prefix;
use std::net::IpAddr;

fn to_u128(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(v: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(v.into())
    } else {
        IpAddr::V4((v as u32).into())
    }
}

/// The selector covering a prefix, any protocol and port.
pub fn from_prefix(p: &Prefix) -> Ts {
    let v6 = p.addr().is_ipv6();
    let bits = if v6 { 128 } else { 32 };
    let start = to_u128(p.addr());
    let host = if p.len() as u32 >= bits {
        0
    } else if bits - p.len() as u32 == 128 {
        u128::MAX
    } else {
        (1u128 << (bits - p.len() as u32)) - 1
    };
    Ts {
        ip_proto: 0,
        start_port: 0,
        end_port: 65535,
        start: p.addr(),
        end: from_u128(start | host, v6),
    }
}

/// The intersection of two selectors, if not empty.
pub fn intersect(a: &Ts, b: &Ts) -> Option<Ts> {
    if a.start.is_ipv6() != b.start.is_ipv6() {
        return None;
    }
    let ip_proto = match (a.ip_proto, b.ip_proto) {
        (0, p) | (p, 0) => p,
        (x, y) if x == y => x,
        _ => return None,
    };
    let start = to_u128(a.start).max(to_u128(b.start));
    let end = to_u128(a.end).min(to_u128(b.end));
    let sp = a.start_port.max(b.start_port);
    let ep = a.end_port.min(b.end_port);
    (start <= end && sp <= ep).then(|| Ts {
        ip_proto,
        start_port: sp,
        end_port: ep,
        start: from_u128(start, a.start.is_ipv6()),
        end: from_u128(end, a.start.is_ipv6()),
    })
}

/// Narrow `proposed` to `policy`: every non-empty pairwise intersection.
pub fn narrow(proposed: &[Ts], policy: &[Ts]) -> Vec<Ts> {
    let mut out = Vec::new();
    for p in proposed {
        for q in policy {
            if let Some(t) = intersect(p, q) {
                if !out.contains(&t) {
                    out.push(t);
                }
            }
        }
    }
    out
}

/// A selector as strongSwan prints it (`10.10.0.2/32`, or a range).
pub fn display(t: &Ts) -> String {
    let v6 = t.start.is_ipv6();
    let bits = if v6 { 128 } else { 32 };
    let (s, e) = (to_u128(t.start), to_u128(t.end));
    let span = e - s;
    let addr = if span == u128::MAX || (span.wrapping_add(1)).is_power_of_two() && s & span == 0 {
        let host = 128 - span.leading_zeros() as i32;
        let len = bits - host;
        format!("{}/{}", t.start, len.max(0))
    } else {
        format!("{}..{}", t.start, t.end)
    };
    if t.ip_proto == 0 && t.start_port == 0 && t.end_port == 65535 {
        addr
    } else {
        format!(
            "{addr}[proto {} ports {}-{}]",
            t.ip_proto, t.start_port, t.end_port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_becomes_a_range_and_narrows_like_strongswan() {
        let any = from_prefix(&"0.0.0.0/0".parse().unwrap());
        let host = from_prefix(&"10.10.0.2/32".parse().unwrap());
        let net = from_prefix(&"10.10.0.0/24".parse().unwrap());
        assert_eq!(display(&any), "0.0.0.0/0");
        assert_eq!(display(&net), "10.10.0.0/24");
        assert_eq!(narrow(&[any], &[host]), vec![host]);
        assert_eq!(narrow(&[net], &[host]), vec![host]);
        let other = from_prefix(&"10.20.0.0/16".parse().unwrap());
        assert!(narrow(&[other], &[net]).is_empty());
        let v6 = from_prefix(&"fd00::/64".parse().unwrap());
        assert_eq!(display(&v6), "fd00::/64");
        assert!(narrow(&[v6], &[net]).is_empty());
        let all6 = from_prefix(&"::/0".parse().unwrap());
        assert_eq!(display(&all6), "::/0");
    }
}

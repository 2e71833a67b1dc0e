//! The NAT helper of the same-LAN scenario: address rewriting between a `real` prefix and an
//! `alias` prefix of the same size ("conntrack-aware rewriting").
//!
//! - Egress (TUN -> wire): a destination inside an alias prefix is restored to its real address
//!   (the local DNAT rule moved it there only to route it into the TUN).
//! - Ingress (wire -> TUN): a source inside a real prefix is moved into the alias prefix, so the
//!   local conntrack matches it to its DNAT entry (and un-NATs it for the application).
//!
//! Every rewrite fixes checksums incrementally (RFC 1624 equation 3, Linux `csum_replace4`):
//! the IPv4 header checksum, the TCP/UDP checksum through the pseudo-header (a zero UDP
//! checksum stays zero), and for ICMP errors the quoted packet's address, its header checksum,
//! its quoted UDP/TCP checksum and the ICMP checksum over all of them. Only a first fragment
//! carries the L4 header; later fragments get their IP header fixed and nothing else.

use crate::prefix::Prefix;
use crate::wire::icmp;
use crate::wire::ip::{PROTO_ICMP, PROTO_UDP};
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::{tcp, udp, Field};
use std::net::{IpAddr, Ipv4Addr};

const PROTO_TCP: u8 = 6;

/// One real <-> alias mapping; a host keeps its host part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatMap {
    /// Where the peers really are.
    pub real: Prefix,
    /// Same-size prefix routed to the TUN.
    pub alias: Prefix,
}

impl NatMap {
    fn shift(a: Ipv4Addr, from: Prefix, to: Prefix) -> Option<Ipv4Addr> {
        let (IpAddr::V4(f), IpAddr::V4(t)) = (from.addr(), to.addr()) else {
            return None;
        };
        if !from.contains(IpAddr::V4(a)) {
            return None;
        }
        let host_mask = u32::MAX.checked_shr(u32::from(from.len())).unwrap_or(0);
        debug_assert_eq!(
            u32::from(f) & host_mask,
            0,
            "prefix addresses have no host bits"
        );
        Some(Ipv4Addr::from(u32::from(t) | (u32::from(a) & host_mask)))
    }

    /// The real address of an alias address.
    pub fn to_real(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        Self::shift(a, self.alias, self.real)
    }

    /// The alias address of a real address.
    pub fn to_alias(&self, a: Ipv4Addr) -> Option<Ipv4Addr> {
        Self::shift(a, self.real, self.alias)
    }
}

/// The set of mappings of one daemon.
#[derive(Debug, Clone, Default)]
pub struct NatTable {
    maps: Vec<NatMap>,
}

/// Which address of an IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Which {
    Src,
    Dst,
}

impl Which {
    /// The header field of this address.
    fn field(self) -> Field {
        match self {
            Which::Src => ipv4::field::SRC,
            Which::Dst => ipv4::field::DST,
        }
    }

    /// The address of `p` this names.
    fn get<T: AsRef<[u8]>>(self, p: &Ipv4Packet<T>) -> Ipv4Addr {
        match self {
            Which::Src => p.src(),
            Which::Dst => p.dst(),
        }
    }
    fn other(self) -> Which {
        match self {
            Which::Src => Which::Dst,
            Which::Dst => Which::Src,
        }
    }
}

/// RFC 1624 equation 3: the checksum `hc` after the 16-bit-aligned bytes `old` became `new`.
pub fn csum_adjust(hc: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u32::from(!hc);
    for (o, n) in old.chunks(2).zip(new.chunks(2)) {
        let o = u16::from_be_bytes([o[0], *o.get(1).unwrap_or(&0)]);
        let n = u16::from_be_bytes([n[0], *n.get(1).unwrap_or(&0)]);
        sum += u32::from(!o) + u32::from(n);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn read16(p: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([p[f.start], p[f.start + 1]])
}

/// Adjust the 16-bit checksum in field `f` of `p` for a change of `old` to `new`.
fn fix(p: &mut [u8], f: Field, old: &[u8], new: &[u8]) {
    let c = csum_adjust(read16(p, f.clone()), old, new);
    p[f].copy_from_slice(&c.to_be_bytes());
}

/// Field `f` of a transport header that starts at `at`.
fn at(at: usize, f: Field) -> Field {
    f.start + at..f.end + at
}

/// Bytes a rewrite changed, for the checksum of an enclosing message.
#[derive(Debug, Clone, Copy, Default)]
struct Change {
    len: usize,
    old: [u8; 4],
    new: [u8; 4],
}

/// Set address `which` of the IPv4 packet `p` (at least its header; for a quoted packet, as much
/// as was quoted) to `new`, fixing the header checksum and, when present, the TCP/UDP checksum.
/// Returns what changed: the address, the header checksum, the L4 checksum (len 0 if none).
fn set_addr(p: &mut [u8], which: Which, new: Ipv4Addr) -> Option<[Change; 3]> {
    let mut ip = Ipv4Packet::new_checked(&mut *p).ok()?;
    let (ihl, later_fragment, proto) = (ip.header_len(), ip.is_later_fragment(), ip.protocol());
    let old = which.get(&ip).octets();
    let newb = new.octets();
    let mut changes = [Change::default(); 3];
    let csum_old = ip.checksum().to_be_bytes();
    match which {
        Which::Src => ip.set_src(new),
        Which::Dst => ip.set_dst(new),
    }
    ip.set_checksum(csum_adjust(ip.checksum(), &old, &newb));
    let csum_new = ip.checksum().to_be_bytes();
    changes[0] = Change {
        len: 4,
        old,
        new: newb,
    };
    changes[1] = Change {
        len: 2,
        old: [csum_old[0], csum_old[1], 0, 0],
        new: [csum_new[0], csum_new[1], 0, 0],
    };
    if !later_fragment {
        let csum_at = match proto {
            PROTO_TCP => Some(at(ihl, tcp::field::CHECKSUM)),
            PROTO_UDP => Some(at(ihl, udp::field::CHECKSUM)),
            _ => None,
        };
        if let Some(c) = csum_at.filter(|c| c.end <= p.len()) {
            let before = read16(p, c.clone());
            // A zero UDP checksum means "none" (RFC 768) and stays zero.
            if !(proto == PROTO_UDP && before == 0) {
                let mut after = csum_adjust(before, &old, &newb);
                if proto == PROTO_UDP && after == 0 {
                    after = 0xffff;
                }
                p[c].copy_from_slice(&after.to_be_bytes());
                let (b, a) = (before.to_be_bytes(), after.to_be_bytes());
                changes[2] = Change {
                    len: 2,
                    old: [b[0], b[1], 0, 0],
                    new: [a[0], a[1], 0, 0],
                };
            }
        }
    }
    Some(changes)
}

/// Why a rewrite could not be done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatError;

impl NatTable {
    /// A table of mappings (validated by the configuration).
    pub fn new(maps: Vec<NatMap>) -> Self {
        NatTable { maps }
    }

    /// True when there is nothing to rewrite.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The mappings.
    pub fn maps(&self) -> &[NatMap] {
        &self.maps
    }

    /// The real address of `a` if it is an alias address.
    pub fn to_real(&self, a: IpAddr) -> Option<IpAddr> {
        let IpAddr::V4(a) = a else { return None };
        self.maps.iter().find_map(|m| m.to_real(a)).map(IpAddr::V4)
    }

    /// The alias address of `a` if it is a real address.
    pub fn to_alias(&self, a: IpAddr) -> Option<IpAddr> {
        let IpAddr::V4(a) = a else { return None };
        self.maps.iter().find_map(|m| m.to_alias(a)).map(IpAddr::V4)
    }

    /// Egress: restore an alias destination to its real address (and, in an ICMP error, the
    /// quoted packet's alias source). Returns whether anything changed.
    pub fn egress(&self, p: &mut [u8]) -> Result<bool, NatError> {
        self.translate(p, Which::Dst, |a| {
            self.maps.iter().find_map(|m| m.to_real(a))
        })
    }

    /// Ingress: move a real source into its alias prefix (and, in an ICMP error, the quoted
    /// packet's real destination). Returns whether anything changed.
    pub fn ingress(&self, p: &mut [u8]) -> Result<bool, NatError> {
        self.translate(p, Which::Src, |a| {
            self.maps.iter().find_map(|m| m.to_alias(a))
        })
    }

    fn translate(
        &self,
        p: &mut [u8],
        which: Which,
        map: impl Fn(Ipv4Addr) -> Option<Ipv4Addr>,
    ) -> Result<bool, NatError> {
        if self.maps.is_empty() || p.first().map(|b| b >> 4) != Some(4) {
            return Ok(false);
        }
        let ip = Ipv4Packet::new_checked(&*p).map_err(|_| NatError)?;
        let (ihl, later_fragment, proto) = (ip.header_len(), ip.is_later_fragment(), ip.protocol());
        let addr = which.get(&ip);
        let mut changed = false;
        if let Some(new) = map(addr) {
            set_addr(p, which, new).ok_or(NatError)?;
            changed = true;
        }
        // An ICMP error quotes a packet that went the other way: its other address is ours.
        if proto == PROTO_ICMP
            && !later_fragment
            && p.len() >= ihl + icmp::HEADER_LEN + ipv4::MIN_HEADER_LEN
            && icmp::is_icmpv4_error(p[ihl + icmp::field::TYPE])
        {
            let (head, quoted) = p.split_at_mut(ihl + icmp::HEADER_LEN);
            if quoted[0] >> 4 == 4 && quoted.len() >= ipv4::MIN_HEADER_LEN {
                // Read before the quoted header is checked: an unmapped address leaves even a
                // garbled quote alone; a mapped one in a garbled quote is an error.
                let qaddr: [u8; 4] = quoted[which.other().field()].try_into().expect("4 bytes");
                if let Some(new) = map(Ipv4Addr::from(qaddr)) {
                    // Every changed quoted byte is covered by the ICMP checksum (offset 2 of the
                    // ICMP header); the ICMP header is 8 bytes, so the changed fields stay
                    // 16-bit aligned relative to it.
                    for c in set_addr(quoted, which.other(), new).ok_or(NatError)? {
                        if c.len > 0 {
                            fix(
                                head,
                                at(ihl, icmp::field::CHECKSUM),
                                &c.old[..c.len],
                                &c.new[..c.len],
                            );
                        }
                    }
                    changed = true;
                }
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::ip::{checksum, fold, sum_words};
    use proptest::prelude::*;

    const A_REAL: [u8; 4] = [10, 0, 0, 161];
    const B_REAL: [u8; 4] = [10, 0, 0, 160];
    const B_ALIAS: [u8; 4] = [10, 0, 1, 160];
    const A_ALIAS: [u8; 4] = [10, 0, 1, 161];

    fn table() -> NatTable {
        NatTable::new(vec![NatMap {
            real: "10.0.0.0/24".parse().unwrap(),
            alias: "10.0.1.0/24".parse().unwrap(),
        }])
    }

    /// Build an IPv4 packet from scratch with every checksum computed over the whole data
    /// (the independent reference the incremental rewrite must equal byte for byte).
    fn packet(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8], frag: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1c46u16.to_be_bytes());
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    fn l4_with_checksum(
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        mut l4: Vec<u8>,
        udp_zero: bool,
    ) -> Vec<u8> {
        let at = match proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 2,
        };
        l4[at..at + 2].fill(0);
        if udp_zero {
            return l4;
        }
        let acc = if proto == PROTO_ICMP {
            0
        } else {
            let mut acc = sum_words(0, &src);
            acc = sum_words(acc, &dst);
            sum_words(acc, &[0, proto, (l4.len() >> 8) as u8, l4.len() as u8])
        };
        let mut c = fold(sum_words(acc, &l4));
        if proto == PROTO_UDP && c == 0 {
            c = 0xffff;
        }
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        l4
    }

    fn tcp(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut seg = vec![0u8; 32];
        seg[0..2].copy_from_slice(&43210u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        seg[12] = 0x50;
        seg[13] = 0x18;
        seg[20..].copy_from_slice(b"GET / HTTP/1");
        packet(
            src,
            dst,
            PROTO_TCP,
            &l4_with_checksum(src, dst, PROTO_TCP, seg, false),
            0x4000,
        )
    }

    fn udp(src: [u8; 4], dst: [u8; 4], zero: bool) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        d[0..2].copy_from_slice(&5353u16.to_be_bytes());
        d[2..4].copy_from_slice(&53u16.to_be_bytes());
        d[4..6].copy_from_slice(&21u16.to_be_bytes());
        d.extend_from_slice(b"hello, udp!!!");
        packet(
            src,
            dst,
            PROTO_UDP,
            &l4_with_checksum(src, dst, PROTO_UDP, d, zero),
            0,
        )
    }

    fn icmp_echo(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let m = vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
        packet(
            src,
            dst,
            PROTO_ICMP,
            &l4_with_checksum(src, dst, PROTO_ICMP, m, false),
            0,
        )
    }

    /// An ICMP error (type 3 code 3, port unreachable) from `src` to `dst` quoting `quoted`.
    fn icmp_error(src: [u8; 4], dst: [u8; 4], quoted: &[u8]) -> Vec<u8> {
        let mut m = vec![3, 3, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(quoted);
        packet(
            src,
            dst,
            PROTO_ICMP,
            &l4_with_checksum(src, dst, PROTO_ICMP, m, false),
            0,
        )
    }

    /// RFC 1624 section 4: HC 0xDD2F, a field changes 0x5555 -> 0x3285: equation 3 gives 0x0000
    /// (equation 2 would give the wrong -0, 0xFFFF).
    #[test]
    fn rfc1624_section4_example() {
        assert_eq!(csum_adjust(0xdd2f, &[0x55, 0x55], &[0x32, 0x85]), 0x0000);
    }

    #[test]
    fn maps_keep_the_host_part() {
        let m = table().maps()[0];
        assert_eq!(m.to_real(B_ALIAS.into()), Some(B_REAL.into()));
        assert_eq!(m.to_alias(A_REAL.into()), Some(A_ALIAS.into()));
        assert_eq!(m.to_alias(Ipv4Addr::new(10, 0, 2, 1)), None);
        let host = NatMap {
            real: "10.0.0.160/32".parse().unwrap(),
            alias: "10.0.1.7/32".parse().unwrap(),
        };
        assert_eq!(
            host.to_real(Ipv4Addr::new(10, 0, 1, 7)),
            Some(B_REAL.into())
        );
    }

    #[test]
    fn tcp_egress_and_ingress_are_byte_exact() {
        // A's kernel sent to B's alias (after DNAT); egress restores B's real address.
        let mut p = tcp(A_REAL, B_ALIAS);
        assert_eq!(table().egress(&mut p), Ok(true));
        assert_eq!(p, tcp(A_REAL, B_REAL));
        // B receives it and moves the source into the alias prefix.
        assert_eq!(table().ingress(&mut p), Ok(true));
        assert_eq!(p, tcp(A_ALIAS, B_REAL));
    }

    #[test]
    fn udp_with_and_without_checksum() {
        let mut p = udp(A_REAL, B_ALIAS, false);
        table().egress(&mut p).unwrap();
        assert_eq!(p, udp(A_REAL, B_REAL, false));
        let mut z = udp(A_REAL, B_ALIAS, true);
        table().egress(&mut z).unwrap();
        assert_eq!(z, udp(A_REAL, B_REAL, true));
        assert_eq!(&z[26..28], &[0, 0], "a zero UDP checksum stays zero");
    }

    #[test]
    fn icmp_echo_only_the_ip_header_changes() {
        let mut p = icmp_echo(A_REAL, B_ALIAS);
        table().egress(&mut p).unwrap();
        assert_eq!(p, icmp_echo(A_REAL, B_REAL));
    }

    #[test]
    fn icmp_errors_quoting_udp_and_tcp() {
        // A's kernel answers B's UDP (which reached it from B's alias) with port unreachable:
        // outer dst and quoted src are B's alias; egress restores both.
        let quoted = udp(B_ALIAS, A_REAL, false);
        let mut p = icmp_error(A_REAL, B_ALIAS, &quoted[..28]);
        assert_eq!(table().egress(&mut p), Ok(true));
        let want_q = udp(B_REAL, A_REAL, false);
        assert_eq!(p, icmp_error(A_REAL, B_REAL, &want_q[..28]));
        // The same error arriving at B: the outer source and quoted destination move to A's alias.
        assert_eq!(table().ingress(&mut p), Ok(true));
        let want_q = udp(B_REAL, A_ALIAS, false);
        assert_eq!(p, icmp_error(A_ALIAS, B_REAL, &want_q[..28]));
        // Quoting a whole TCP segment (checksum at quoted offset 36).
        let quoted = tcp(B_ALIAS, A_REAL);
        let mut p = icmp_error(A_REAL, B_ALIAS, &quoted);
        table().egress(&mut p).unwrap();
        assert_eq!(p, icmp_error(A_REAL, B_REAL, &tcp(B_REAL, A_REAL)));
        // Quoting only 8 bytes of TCP (the checksum is not quoted): header fields still right.
        let mut p = icmp_error(A_REAL, B_ALIAS, &quoted[..28]);
        table().egress(&mut p).unwrap();
        let mut want = tcp(B_REAL, A_REAL);
        want.truncate(28);
        // The reference quotes the first 28 bytes of a packet built with the new addresses; the
        // unquoted checksum does not matter.
        assert_eq!(p, icmp_error(A_REAL, B_REAL, &want));
        assert_eq!(checksum(&p[20..]), 0, "ICMP checksum valid");
    }

    #[test]
    fn fragments() {
        // First fragment (MF set, offset 0): the UDP checksum over the whole datagram is fixed.
        let mut first = udp(A_REAL, B_ALIAS, false);
        first[6] = 0x20;
        first[10..12].fill(0);
        let c = checksum(&first[..20]);
        first[10..12].copy_from_slice(&c.to_be_bytes());
        table().egress(&mut first).unwrap();
        assert_eq!(checksum(&first[..20]), 0);
        assert_eq!(&first[26..28], &udp(A_REAL, B_REAL, false)[26..28]);
        // A later fragment: bytes after the IP header are payload and must not be touched.
        let payload = vec![0x5au8; 40];
        let mut later = packet(A_REAL, B_ALIAS, PROTO_UDP, &payload, 0x0005);
        table().egress(&mut later).unwrap();
        assert_eq!(later, packet(A_REAL, B_REAL, PROTO_UDP, &payload, 0x0005));
    }

    #[test]
    fn untouched_and_malformed() {
        let mut p = tcp(A_REAL, [192, 0, 2, 1]);
        let before = p.clone();
        assert_eq!(table().egress(&mut p), Ok(false));
        assert_eq!(p, before);
        assert_eq!(table().egress(&mut [0x45, 0, 0]), Err(NatError));
        let mut v6 = vec![0x60u8; 40];
        assert_eq!(table().ingress(&mut v6), Ok(false));
    }

    proptest! {
        #[test]
        fn rewrite_then_reverse_gives_the_same_bytes(
            host in 1u8..255, kind in 0u8..4, body in proptest::collection::vec(any::<u8>(), 12..40),
        ) {
            let b_real = [10, 0, 0, host];
            let b_alias = [10, 0, 1, host];
            let p = match kind {
                0 => tcp(A_REAL, b_alias),
                1 => udp(A_REAL, b_alias, false),
                2 => icmp_error(A_REAL, b_alias, &udp(b_alias, A_REAL, false)),
                _ => packet(A_REAL, b_alias, 99, &body, 0),
            };
            // Egress then its inverse (the peer's ingress seen from the other side).
            let mut q = p.clone();
            table().egress(&mut q).unwrap();
            prop_assert_eq!(&q[16..20], &b_real[..]);
            let back = NatTable::new(vec![NatMap {
                real: "10.0.1.0/24".parse().unwrap(),
                alias: "10.0.0.0/24".parse().unwrap(),
            }]);
            back.egress(&mut q).unwrap();
            prop_assert_eq!(q, p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut a = bytes.clone();
            let _ = table().egress(&mut a);
            let mut b = bytes;
            if !b.is_empty() { b[0] = 0x45; }
            let _ = table().ingress(&mut b);
        }
    }
}

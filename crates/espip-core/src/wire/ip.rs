//! Inner IP packets: classification (through the IPv4 and IPv6 views), and the Internet
//! checksum (RFC 1071).

use super::Malformed;
use std::net::{IpAddr, Ipv6Addr};

/// IANA protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// IANA protocol number of IPv4-in-IPv4 (RFC 2003). Not 94, "IP-within-IP", a different
/// protocol that some libraries call IPIP.
pub const PROTO_IPIP: u8 = 4;
/// IANA protocol number of IPv6 encapsulation (RFC 2473 / RFC 4213), used for IPv6 in IPv4.
pub const PROTO_IPV6: u8 = 41;
/// IANA protocol number of UDP, the carrier of UDP-encapsulated ESP (RFC 3948).
pub const PROTO_UDP: u8 = 17;
/// IANA protocol number of ESP (RFC 4303).
pub const PROTO_ESP: u8 = 50;
/// The UDP port IKE and UDP-encapsulated ESP use (RFC 3948 section 2.1).
pub const IPSEC_NAT_T_PORT: u16 = 4500;

/// UDP port of IKE (RFC 7296 section 2).
pub const IKE_PORT: u16 = 500;
/// IANA next header number of ICMPv6.
pub const PROTO_ICMPV6: u8 = 58;

/// What the data path needs to know about an inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Length the IP header claims for the whole packet (IPv6: 40 + payload length).
    pub total_len: usize,
    /// IPv4: the DF flag. IPv6: always true (routers never fragment IPv6).
    pub dont_fragment: bool,
    /// IPv4: fragment offset is non-zero (not the first fragment). IPv6: false.
    pub later_fragment: bool,
    /// The upper-layer protocol (IPv4 protocol, IPv6 first next header).
    pub protocol: u8,
    /// Offset of the upper-layer header.
    pub l4_offset: usize,
}

impl InnerPacket {
    /// Classify `bytes` as an IPv4 or IPv6 packet; the header must be valid and the claimed
    /// length must fit in `bytes` (bytes beyond it, such as ESP TFC padding, are allowed).
    pub fn parse(bytes: &[u8]) -> Result<Self, Malformed> {
        match bytes.first().map(|b| b >> 4) {
            Some(4) => {
                let h = super::ipv4::Ipv4Packet::new_checked(bytes)?;
                let total_len = h.total_len();
                let ihl = h.header_len();
                if total_len < ihl || total_len > bytes.len() {
                    return Err(Malformed);
                }
                Ok(InnerPacket {
                    src: IpAddr::V4(h.src()),
                    dst: IpAddr::V4(h.dst()),
                    total_len,
                    dont_fragment: h.flags_offset() & super::ipv4::DF != 0,
                    later_fragment: h.is_later_fragment(),
                    protocol: h.protocol(),
                    l4_offset: ihl,
                })
            }
            Some(6) => {
                let h = super::ipv6::Ipv6Packet::new_checked(bytes)?;
                let total_len = super::ipv6::HEADER_LEN + h.payload_len();
                if total_len > bytes.len() {
                    return Err(Malformed);
                }
                Ok(InnerPacket {
                    src: IpAddr::V6(h.src()),
                    dst: IpAddr::V6(h.dst()),
                    total_len,
                    dont_fragment: true,
                    later_fragment: false,
                    protocol: h.next_header(),
                    l4_offset: super::ipv6::HEADER_LEN,
                })
            }
            _ => Err(Malformed),
        }
    }

    /// True for IPv4.
    pub fn is_ipv4(&self) -> bool {
        self.src.is_ipv4()
    }

    /// Whether `bytes` (the packet this view was parsed from) is a pure TCP acknowledgment
    /// (RFC 9293 section 3.1): ACK set, SYN, FIN and RST clear, and the header (its data
    /// offset) fills the packet: no payload. An IPv6 packet with extension headers, a later
    /// IPv4 fragment or a truncated TCP header is not one.
    pub fn is_pure_ack(&self, bytes: &[u8]) -> bool {
        const ACK: u8 = 0x10;
        const SYN_FIN_RST: u8 = 0x07;
        if self.protocol != 6 || self.later_fragment {
            return false;
        }
        let (Some(&offset), Some(&flags)) = (
            bytes.get(self.l4_offset + 12),
            bytes.get(self.l4_offset + 13),
        ) else {
            return false;
        };
        let header = usize::from(offset >> 4) * 4;
        flags & ACK != 0
            && flags & SYN_FIN_RST == 0
            && header >= 20
            && self.l4_offset + header == self.total_len
    }
}

pub use super::checksum::{checksum, fold, sum_words};

/// Sum of the IPv6 pseudo-header (RFC 8200 section 8.1) for an upper-layer checksum.
pub fn pseudo_sum_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, len: u32) -> u32 {
    let mut acc = sum_words(0, &src.octets());
    acc = sum_words(acc, &dst.octets());
    acc = sum_words(acc, &len.to_be_bytes());
    sum_words(acc, &[0, 0, 0, next_header])
}

pub use super::ipv4::emit_header as emit_ipv4_header;
pub use super::udp::emit_header as emit_udp_header;

/// A hash of the packet's flow that is the same in both directions (addresses and, for TCP and
/// UDP, ports combined with XOR): the RX thread writes every packet of a flow to one TUN queue
/// by it, and the kernel then sends that flow's packets to the same queue's TX thread.
/// Unparseable packets hash to 0.
pub fn flow_hash_symmetric(p: &[u8]) -> u32 {
    let words = |b: &[u8]| -> u32 {
        b.chunks_exact(4).fold(0, |h, w| {
            h ^ u32::from_be_bytes(w.try_into().expect("4 bytes"))
        })
    };
    let (addrs, proto, l4) = if let Ok(ip) = super::ipv4::Ipv4Packet::new_checked(p) {
        let f = super::ipv4::field::SRC.start..super::ipv4::field::DST.end;
        let l4 = (!ip.is_fragment()).then(|| ip.header_len());
        (
            words(&p[f.start..f.start + 4]) ^ words(&p[f.start + 4..f.end]),
            ip.protocol(),
            l4,
        )
    } else if let Ok(ip) = super::ipv6::Ipv6Packet::new_checked(p) {
        let (s, d) = (super::ipv6::field::SRC, super::ipv6::field::DST);
        (
            words(&p[s]) ^ words(&p[d]),
            ip.next_header(),
            Some(super::ipv6::HEADER_LEN),
        )
    } else {
        return 0;
    };
    let ports = match (proto, l4) {
        (6 | PROTO_UDP, Some(at)) => p.get(at..at + 4).map_or(0, |b| {
            u32::from(u16::from_be_bytes([b[0], b[1]]) ^ u16::from_be_bytes([b[2], b[3]]))
        }),
        _ => 0,
    };
    // Fibonacci hashing spreads the combined bits over the whole word.
    (addrs ^ (ports << 8) ^ u32::from(proto)).wrapping_mul(0x9E37_79B9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn the_flow_hash_is_the_same_both_ways_and_differs_between_flows() {
        let tcp = |src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16| {
            let mut v = vec![0u8; 40];
            emit_ipv4_header(&mut v, src.into(), dst.into(), 6, 40);
            v[20..22].copy_from_slice(&sp.to_be_bytes());
            v[22..24].copy_from_slice(&dp.to_be_bytes());
            v
        };
        let a = tcp([10, 4, 2, 99], [10, 4, 2, 5], 40000, 5201);
        let back = tcp([10, 4, 2, 5], [10, 4, 2, 99], 5201, 40000);
        let other = tcp([10, 4, 2, 99], [10, 4, 2, 5], 40001, 5201);
        assert_eq!(flow_hash_symmetric(&a), flow_hash_symmetric(&back));
        assert_ne!(flow_hash_symmetric(&a), flow_hash_symmetric(&other));
        assert_eq!(flow_hash_symmetric(&[0x45, 0]), 0);
    }

    #[test]
    fn a_pure_ack_is_one_and_anything_else_is_not() {
        // IPv4, TCP header of 32 bytes (timestamps), payload `extra` bytes.
        let v4 = |protocol: u8, extra: usize| {
            let len = 20 + 32 + extra;
            let mut v = vec![0u8; len];
            emit_ipv4_header(
                &mut v,
                [10, 0, 0, 1].into(),
                [10, 0, 0, 2].into(),
                protocol,
                len as u16,
            );
            v[20 + 12] = 8 << 4;
            v[20 + 13] = 0x10;
            v
        };
        let bare = |v: &[u8]| InnerPacket::parse(v).unwrap().is_pure_ack(v);
        assert!(bare(&v4(6, 0)), "a pure acknowledgment");
        // A SYN-ACK, FIN-ACK, RST-ACK, and a segment without ACK: not pure acknowledgments
        // (a handshake over the fastest path would give TCP a round trip its data never has).
        for flags in [0x12, 0x11, 0x14, 0x00] {
            let mut v = v4(6, 0);
            v[33] = flags;
            assert!(!bare(&v), "flags {flags:#x}");
        }
        assert!(!bare(&v4(6, 1)), "one byte of data");
        assert!(!bare(&v4(17, 0)), "UDP");
        // A data offset below 5 words is no TCP header; one beyond the packet neither.
        let mut short = v4(6, 0);
        short[32] = 4 << 4;
        assert!(!bare(&short));
        short[32] = 15 << 4;
        assert!(!bare(&short));
        // A later fragment of a TCP segment.
        let mut frag = v4(6, 0);
        frag[6] = 0;
        frag[7] = 8;
        assert!(!bare(&frag));
        // IPv6: TCP directly after the fixed header; with an extension header, not classified.
        let v6 = |next: u8| {
            let mut v = vec![0u8; 40 + 20];
            v[0] = 0x60;
            v[4..6].copy_from_slice(&20u16.to_be_bytes());
            v[6] = next;
            v[7] = 64;
            v[40 + 12] = 5 << 4;
            v[40 + 13] = 0x10;
            v
        };
        assert!(bare(&v6(6)));
        assert!(!bare(&v6(0)), "hop-by-hop options first");
    }

    /// RFC 1071 section 3 example: the sum of 00 01 f2 03 f4 f5 f6 f7 is ddf2 (checksum 220d).
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&data), !0xddf2);
    }

    /// The wide sum agrees with the word-by-word definition for every length and start
    /// (odd, unaligned, remainders of each size), accumulator values, and all-ones data.
    #[test]
    fn the_wide_sum_equals_the_word_by_word_sum() {
        fn words(mut acc: u64, data: &[u8]) -> u16 {
            let mut c = data.chunks_exact(2);
            for w in &mut c {
                acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
            }
            if let [last] = c.remainder() {
                acc += u64::from(*last) << 8;
            }
            while acc >> 16 != 0 {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            !(acc as u16)
        }
        let mut data = vec![0u8; 4200];
        let mut x: u32 = 12345;
        for b in data.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        for start in 0..5 {
            for len in (0..200).chain([1399, 1400, 1401, 4000]) {
                for acc in [0u32, 7, 0xfffe, 0x1_2345, 0xffff_0000] {
                    let d = &data[start..start + len];
                    assert_eq!(
                        fold(sum_words(acc, d)),
                        words(u64::from(acc), d),
                        "{start} {len} {acc}"
                    );
                }
            }
        }
        assert_eq!(checksum(&[0xff; 100]), words(0, &[0xff; 100]));
        assert_eq!(checksum(&[]), 0xffff);
    }

    #[test]
    fn parse_ipv4_and_ipv6() {
        let mut v4 = [0u8; 28];
        emit_ipv4_header(
            &mut v4,
            Ipv4Addr::new(10, 4, 2, 99),
            Ipv4Addr::new(10, 4, 2, 5),
            17,
            28,
        );
        let p = InnerPacket::parse(&v4).unwrap();
        assert_eq!(p.dst, IpAddr::V4(Ipv4Addr::new(10, 4, 2, 5)));
        assert_eq!((p.total_len, p.protocol, p.l4_offset), (28, 17, 20));
        assert_eq!(checksum(&v4[..20]), 0);
        assert!(
            InnerPacket::parse(&v4[..27]).is_err(),
            "claims more than it has"
        );

        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        v6[6] = 58;
        v6[39] = 1;
        v6[55 - 16] = 2;
        let p = InnerPacket::parse(&v6).unwrap();
        assert_eq!(p.total_len, 48);
        assert!(InnerPacket::parse(&[0x50; 40]).is_err());
        assert!(InnerPacket::parse(&[]).is_err());
    }
}

//! ICMP "fragmentation needed" (RFC 792, RFC 1191) and ICMPv6 "packet too big" (RFC 4443
//! section 3.2), built in place in front of the offending packet so that path MTU discovery
//! works through the tunnel.

use super::ip::{
    checksum, emit_ipv4_header, fold, pseudo_sum_v6, sum_words, InnerPacket, PROTO_ICMP,
    PROTO_ICMPV6,
};
use super::{ipv4, ipv6, Field, Malformed};
use crate::buf::PacketBuf;
use std::net::{Ipv4Addr, Ipv6Addr};

/// An ICMP error quotes at most this much so the whole message fits 576 bytes (RFC 1812 4.3.2.3).
const ICMPV4_MAX_MESSAGE: usize = 576;
/// An ICMPv6 error must not exceed the IPv6 minimum MTU (RFC 4443 section 2.4 (c)).
const ICMPV6_MAX_MESSAGE: usize = 1280;

/// Why no ICMP error is generated for a packet (RFC 1812 section 4.3.2.7, RFC 4443 2.4 (e)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoIcmp {
    /// The packet is itself an ICMP error, or a later fragment.
    Forbidden,
    /// The packet could not be parsed, or the buffer has no headroom.
    Malformed,
}

impl From<Malformed> for NoIcmp {
    fn from(_: Malformed) -> Self {
        NoIcmp::Malformed
    }
}

/// Byte ranges of the ICMP and ICMPv6 header (RFC 792, RFC 4443 section 2.1).
pub mod field {
    use super::Field;
    /// Type.
    pub const TYPE: usize = 0;
    /// Code.
    pub const CODE: usize = 1;
    /// Checksum.
    pub const CHECKSUM: Field = 2..4;
    /// Next-hop MTU of "fragmentation needed" (RFC 1191 section 4; the low half of the
    /// 32-bit MTU of ICMPv6 "packet too big").
    pub const NEXT_HOP_MTU: Field = 6..8;
}

/// Header length before the quoted packet (type, code, checksum, 4 bytes of the message).
pub const HEADER_LEN: usize = 8;

/// ICMP "destination unreachable" (RFC 792).
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
/// Its code "fragmentation needed and DF set" (RFC 792, RFC 1191).
pub const CODE_FRAG_NEEDED: u8 = 4;
/// ICMPv6 "packet too big" (RFC 4443 section 3.2).
pub const TYPE_V6_PACKET_TOO_BIG: u8 = 2;
/// The 32-bit MTU of ICMPv6 "packet too big".
const V6_MTU: Field = 4..8;

/// Write an ICMP or ICMPv6 header of `ty` and `code` (the rest zero) into `h`.
fn emit_header(h: &mut [u8], ty: u8, code: u8) {
    h[..HEADER_LEN].fill(0);
    h[field::TYPE] = ty;
    h[field::CODE] = code;
}

/// Store `c` as the checksum of the ICMP message `m`.
fn set_checksum(m: &mut [u8], c: u16) {
    m[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
}

/// Whether an ICMP type is an error message (which quotes a packet, RFC 1812 section 4.3.2.7).
pub fn is_icmpv4_error(ty: u8) -> bool {
    matches!(ty, 3 | 4 | 5 | 11 | 12)
}

/// Turn the IPv4 packet in `buf` into an ICMP "destination unreachable, fragmentation needed
/// and DF set" (type 3 code 4) from `src` to the packet's source, carrying `mtu`.
pub fn frag_needed_v4(buf: &mut PacketBuf, src: Ipv4Addr, mtu: u16) -> Result<(), NoIcmp> {
    let p = InnerPacket::parse(buf.as_slice())?;
    let std::net::IpAddr::V4(orig_src) = p.src else {
        return Err(NoIcmp::Malformed);
    };
    if p.later_fragment
        || (p.protocol == PROTO_ICMP
            && buf
                .as_slice()
                .get(p.l4_offset + field::TYPE)
                .is_some_and(|t| is_icmpv4_error(*t)))
        || orig_src.is_unspecified()
        || orig_src.is_multicast()
        || orig_src.is_broadcast()
    {
        return Err(NoIcmp::Forbidden);
    }
    let head = ipv4::MIN_HEADER_LEN + HEADER_LEN;
    buf.truncate(ICMPV4_MAX_MESSAGE - head);
    let total = (buf.len() + head) as u16;
    let h = buf.push_front(head).ok_or(NoIcmp::Malformed)?;
    let (ip, icmp) = h.split_at_mut(ipv4::MIN_HEADER_LEN);
    emit_ipv4_header(ip, src, orig_src, PROTO_ICMP, total);
    emit_header(icmp, TYPE_DEST_UNREACHABLE, CODE_FRAG_NEEDED);
    icmp[field::NEXT_HOP_MTU].copy_from_slice(&mtu.to_be_bytes());
    let c = checksum(&buf.as_slice()[ipv4::MIN_HEADER_LEN..]);
    set_checksum(&mut buf.as_mut_slice()[ipv4::MIN_HEADER_LEN..], c);
    Ok(())
}

/// Turn the IPv6 packet in `buf` into an ICMPv6 "packet too big" from `src` to the packet's
/// source, carrying `mtu`.
pub fn packet_too_big_v6(buf: &mut PacketBuf, src: Ipv6Addr, mtu: u32) -> Result<(), NoIcmp> {
    let p = InnerPacket::parse(buf.as_slice())?;
    let std::net::IpAddr::V6(orig_src) = p.src else {
        return Err(NoIcmp::Malformed);
    };
    // ICMPv6 types below 128 are errors (RFC 4443 section 2.1).
    if (p.protocol == PROTO_ICMPV6
        && buf
            .as_slice()
            .get(p.l4_offset + field::TYPE)
            .is_some_and(|t| *t < 128))
        || orig_src.is_unspecified()
        || orig_src.is_multicast()
    {
        return Err(NoIcmp::Forbidden);
    }
    buf.truncate(ICMPV6_MAX_MESSAGE - ipv6::HEADER_LEN - HEADER_LEN);
    let payload_len = (buf.len() + HEADER_LEN) as u16;
    let h = buf
        .push_front(ipv6::HEADER_LEN + HEADER_LEN)
        .ok_or(NoIcmp::Malformed)?;
    let (ip, icmp) = h.split_at_mut(ipv6::HEADER_LEN);
    ipv6::emit_header(ip, src, orig_src, PROTO_ICMPV6, payload_len);
    emit_header(icmp, TYPE_V6_PACKET_TOO_BIG, 0);
    icmp[V6_MTU].copy_from_slice(&mtu.to_be_bytes());
    let acc = pseudo_sum_v6(src, orig_src, PROTO_ICMPV6, u32::from(payload_len));
    let c = fold(sum_words(acc, &buf.as_slice()[ipv6::HEADER_LEN..]));
    set_checksum(&mut buf.as_mut_slice()[ipv6::HEADER_LEN..], c);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn big_v4(len: usize, df: bool) -> PacketBuf {
        let mut v = vec![0u8; len];
        emit_ipv4_header(
            &mut v,
            Ipv4Addr::new(10, 4, 2, 99),
            Ipv4Addr::new(10, 4, 2, 5),
            6,
            len as u16,
        );
        if df {
            v[6] = 0x40;
            v[10] = 0;
            v[11] = 0;
            let c = checksum(&v[..20]);
            v[10..12].copy_from_slice(&c.to_be_bytes());
        }
        PacketBuf::from_slice(&v)
    }

    #[test]
    fn frag_needed_quotes_and_checksums() {
        let mut b = big_v4(1500, true);
        frag_needed_v4(&mut b, Ipv4Addr::new(10, 4, 2, 1), 1400).unwrap();
        let s = b.as_slice();
        assert_eq!(s.len(), 576);
        assert_eq!(checksum(&s[..20]), 0, "IPv4 header checksum");
        assert_eq!(checksum(&s[20..]), 0, "ICMP checksum");
        assert_eq!(&s[16..20], &[10, 4, 2, 99], "back to the sender");
        assert_eq!((s[20], s[21]), (3, 4));
        assert_eq!(u16::from_be_bytes([s[26], s[27]]), 1400);
        assert_eq!(
            &s[28..32],
            &[0x45, 0, 0x05, 0xdc],
            "quotes the original header"
        );
    }

    #[test]
    fn no_error_about_an_error() {
        let mut v = vec![0u8; 60];
        emit_ipv4_header(
            &mut v,
            Ipv4Addr::new(10, 4, 2, 99),
            Ipv4Addr::new(10, 4, 2, 5),
            1,
            60,
        );
        v[20] = 3;
        let mut b = PacketBuf::from_slice(&v);
        assert_eq!(
            frag_needed_v4(&mut b, Ipv4Addr::new(10, 4, 2, 1), 1400),
            Err(NoIcmp::Forbidden)
        );
    }

    #[test]
    fn packet_too_big_v6_checksum() {
        let mut v = vec![0u8; 1400];
        v[0] = 0x60;
        v[4..6].copy_from_slice(&(1360u16).to_be_bytes());
        v[6] = 17;
        v[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        v[24..40].copy_from_slice(&"fd00::5".parse::<Ipv6Addr>().unwrap().octets());
        let mut b = PacketBuf::from_slice(&v);
        let me: Ipv6Addr = "fd00::1".parse().unwrap();
        packet_too_big_v6(&mut b, me, 1280).unwrap();
        let s = b.as_slice();
        assert_eq!(s.len(), 1280);
        let acc = pseudo_sum_v6(
            me,
            "fd00::2".parse().unwrap(),
            PROTO_ICMPV6,
            (s.len() - 40) as u32,
        );
        assert_eq!(fold(sum_words(acc, &s[40..])), 0);
        assert_eq!(u32::from_be_bytes(s[44..48].try_into().unwrap()), 1280);
    }
}

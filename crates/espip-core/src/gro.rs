//! Receive coalescing for TUN writes (GRO), in the pure core: consecutive TCP segments of one
//! flow, in order, become one large packet that the kernel's TCP stack takes in one go (the
//! reverse of [`crate::gso::segment_tcp`]; Linux's `tcp_gro_receive` rules, kept strict); and
//! consecutive UDP datagrams of one flow, of one size (the last may be shorter), become one
//! UDP GSO packet (`VIRTIO_NET_HDR_GSO_UDP_L4`, the reverse of [`crate::gso::segment_udp`];
//! Linux's `udp_gro_receive_segment` rules) that the kernel cuts back into the same datagrams
//! after one write, where each would have cost a write of its own.
//!
//! The caller lists the packets it is about to write; [`can_merge`] says whether a packet
//! continues the group before it, and [`merged_headers`] makes the group's headers and its
//! `virtio_net_hdr`. The payloads are not copied: the edge hands the kernel the new headers
//! followed by each segment's payload in one `writev`.

use crate::gso::{VnetHdr, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4};
use crate::wire::ip::{fold, sum_words};
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, TcpPacket};
use crate::wire::udp::{self, UdpPacket};
use std::ops::Range;

/// Largest merged packet (the IPv4 total length field; also the TUN's limit).
pub const MAX_MERGED: usize = 65535;
/// Longest IP + TCP header merged (IPv4 without options or IPv6 without extension headers,
/// TCP with up to 40 bytes of options).
pub const MAX_HEADERS: usize = ipv6::HEADER_LEN + 60;

/// Where the parts of a mergeable TCP segment or UDP datagram are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// IP header length (20 or 40).
    pub ip_len: usize,
    /// IP + TCP (UDP) header length.
    pub hdr_len: usize,
    /// Payload length.
    pub payload: usize,
    /// TCP sequence number (UDP: 0).
    pub seq: u32,
    /// PSH is set (the sender pushes: the group ends here; UDP: false).
    pub psh: bool,
    /// A UDP datagram, not a TCP segment.
    pub udp: bool,
}

/// `p` as a segment that may take part in coalescing: IPv4 without options and not a
/// fragment, or IPv6 without extension headers; TCP with only ACK (and PSH) set and a
/// payload, or UDP with a payload, a length that agrees and a checksum (a datagram sent
/// without one, IPv4's 0, would get one from the kernel's segmentation).
pub fn segment(p: &[u8]) -> Option<Segment> {
    let (ip_len, proto) = match p.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(p).ok()?;
            if ip.header_len() != ipv4::MIN_HEADER_LEN
                || ip.is_fragment()
                || ip.total_len() != p.len()
            {
                return None;
            }
            (ipv4::MIN_HEADER_LEN, ip.protocol())
        }
        6 => {
            let ip = Ipv6Packet::new_checked(p).ok()?;
            if ip.payload_len() + ipv6::HEADER_LEN != p.len() {
                return None;
            }
            (ipv6::HEADER_LEN, ip.next_header())
        }
        _ => return None,
    };
    match proto {
        PROTO_TCP => tcp_segment(p, ip_len),
        PROTO_UDP => udp_datagram(p, ip_len),
        _ => None,
    }
}

fn udp_datagram(p: &[u8], ip_len: usize) -> Option<Segment> {
    let u = UdpPacket::new_checked(&p[ip_len..]).ok()?;
    let len = usize::from(u16::from_be_bytes([
        p[ip_len + udp::field::LENGTH.start],
        p[ip_len + udp::field::LENGTH.start + 1],
    ]));
    let hdr_len = ip_len + udp::HEADER_LEN;
    if len != p.len() - ip_len || p.len() <= hdr_len || u.checksum() == 0 {
        return None;
    }
    Some(Segment {
        ip_len,
        hdr_len,
        payload: p.len() - hdr_len,
        seq: 0,
        psh: false,
        udp: true,
    })
}

fn tcp_segment(p: &[u8], ip_len: usize) -> Option<Segment> {
    let t = TcpPacket::new_checked(&p[ip_len..]).ok()?;
    let hdr_len = ip_len + t.header_len();
    if hdr_len > MAX_HEADERS || p.len() <= hdr_len {
        return None;
    }
    // Only ACK, optionally PSH: no SYN, FIN, RST, URG, ECE, CWR.
    if t.flags() & !tcp::PSH != tcp::ACK {
        return None;
    }
    Some(Segment {
        ip_len,
        hdr_len,
        payload: p.len() - hdr_len,
        seq: t.seq(),
        psh: t.flags() & tcp::PSH != 0,
        udp: false,
    })
}

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Whether the TCP or UDP checksum of `p` (a [`segment`]) is right. A merged packet goes to
/// the kernel with a partial checksum that it completes, not checks, so a packet that no
/// AEAD vouched for (IP-in-IP) is checked here first, as Linux's own GRO does; one that
/// fails is written alone and the kernel drops it and counts it.
pub fn checksum_ok(p: &[u8], s: &Segment) -> bool {
    let addr = if s.ip_len == ipv4::MIN_HEADER_LEN {
        sum_words(0, &p[12..20])
    } else {
        sum_words(0, &p[8..40])
    };
    let proto = if s.udp { PROTO_UDP } else { PROTO_TCP };
    let l4 = &p[s.ip_len..];
    fold(sum_words(addr + u32::from(proto) + l4.len() as u32, l4)) == 0
}

/// `r` moved by `by` bytes (a TCP field range at the TCP header's offset).
fn at(by: usize, r: Range<usize>) -> Range<usize> {
    r.start + by..r.end + by
}

/// Does `next` continue the group that starts with `first` and ends with `ls`, which
/// together hold `group_len` bytes? Same flow, same header bytes (but the fields that differ
/// per segment), the previous segments full-sized; TCP: in sequence and no PSH before the end.
pub fn can_merge(
    first: &[u8],
    fs: &Segment,
    ls: &Segment,
    group_len: usize,
    next: &[u8],
    ns: &Segment,
) -> bool {
    if ns.udp != fs.udp
        || ns.hdr_len != fs.hdr_len
        || ns.ip_len != fs.ip_len
        || ls.payload != fs.payload
        || ns.payload > fs.payload
        || group_len + ns.payload > MAX_MERGED
        || ls.psh
        || (!fs.udp && ns.seq != ls.seq.wrapping_add(ls.payload as u32))
    {
        return false;
    }
    let (ip, h) = (fs.ip_len, fs.hdr_len);
    let same = |a: Range<usize>| first[a.clone()] == next[a];
    let ip_same = if ip == ipv4::MIN_HEADER_LEN {
        use ipv4::field as f;
        // Version/IHL/TOS, flags (DF), TTL/protocol, addresses. Not: total length, ID,
        // header checksum.
        same(0..f::LENGTH.start)
            && same(f::FLG_OFF.start..f::CHECKSUM.start)
            && same(f::SRC.start..f::DST.end)
    } else {
        use ipv6::field as f;
        // Version/class/flow label, next header/hop limit, addresses. Not: payload length.
        same(f::VER_TC_FLOW) && same(f::NEXT_HEADER..f::DST.end)
    };
    if fs.udp {
        // Ports. Not: length, checksum.
        return ip_same && same(ip..ip + udp::field::LENGTH.start);
    }
    use tcp::field as t;
    // Ports; acknowledgement, data offset and window; urgent pointer and options. Not:
    // sequence number, flags (PSH), checksum.
    ip_same
        && same(at(ip, t::PORTS))
        && same(at(ip, t::ACK.start..t::FLAGS))
        && same(at(ip, t::WINDOW))
        && same(ip + t::URGENT.start..h)
}

/// The headers of a group of segments (datagrams) starting with `first`, holding `total`
/// bytes (headers included), `psh` if its last segment has PSH, written into `out`; and the
/// `virtio_net_hdr` that tells the kernel it is a GSO packet with a partial checksum.
pub fn merged_headers(
    first: &[u8],
    fs: &Segment,
    total: usize,
    psh: bool,
    out: &mut [u8; MAX_HEADERS],
) -> VnetHdr {
    let (ip, h) = (fs.ip_len, fs.hdr_len);
    out[..h].copy_from_slice(&first[..h]);
    let tcp_total = (total - ip) as u32;
    let v4 = ip == ipv4::MIN_HEADER_LEN;
    let addr_sum = if v4 {
        let mut p = Ipv4Packet::new_checked(&mut out[..h]).expect("checked by segment");
        p.set_total_len(total as u16);
        p.fill_checksum();
        p.addr_sum()
    } else {
        let mut p = Ipv6Packet::new_checked(&mut out[..h]).expect("checked by segment");
        p.set_payload_len((total - ipv6::HEADER_LEN) as u16);
        p.addr_sum()
    };
    if fs.udp {
        let mut u = UdpPacket::new_checked(&mut out[ip..h]).expect("checked by segment");
        u.set_len(tcp_total as u16);
        // As for TCP: the pseudo-header sum of the whole; the kernel's segmentation
        // adjusts it for each datagram's length.
        u.set_checksum(!fold(addr_sum + u32::from(PROTO_UDP) + tcp_total));
        return VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_UDP_L4,
            hdr_len: h as u16,
            gso_size: fs.payload as u16,
            csum_start: ip as u16,
            csum_offset: udp::field::CHECKSUM.start as u16,
        };
    }
    let mut t = TcpPacket::new_checked(&mut out[ip..h]).expect("checked by segment");
    if psh {
        t.set_flags(t.flags() | tcp::PSH);
    }
    // NEEDS_CSUM: the field holds the folded pseudo-header sum, not complemented.
    t.set_checksum(!fold(addr_sum + u32::from(PROTO_TCP) + tcp_total));
    VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: h as u16,
        gso_size: fs.payload as u16,
        csum_start: ip as u16,
        csum_offset: tcp::field::CHECKSUM.start as u16,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buf::{PacketBuf, MAX_PACKET};
    use crate::gso::segment_tcp;
    use crate::gso::tests::super_packet as big;

    /// Segment a large packet (as the sender's TSO would), then merge the segments back: the
    /// result is the original packet, with the checksum partial as the kernel expects.
    /// Merge every packet of `pk` into one group (each must be allowed to join): the
    /// packets' segments, the merged packet (the merged headers, then each payload) and its
    /// `virtio_net_hdr`.
    fn merge_all(pk: &[&[u8]]) -> (Vec<Segment>, Vec<u8>, VnetHdr) {
        let ss: Vec<Segment> = pk.iter().map(|p| segment(p).unwrap()).collect();
        let mut total = pk[0].len();
        for i in 1..pk.len() {
            assert!(can_merge(pk[0], &ss[0], &ss[i - 1], total, pk[i], &ss[i]));
            total += ss[i].payload;
        }
        let mut hdr = [0u8; MAX_HEADERS];
        let psh = ss[pk.len() - 1].psh;
        let v = merged_headers(pk[0], &ss[0], total, psh, &mut hdr);
        let mut merged = hdr[..ss[0].hdr_len].to_vec();
        for (p, s) in pk.iter().zip(&ss) {
            merged.extend_from_slice(&p[s.hdr_len..]);
        }
        assert_eq!(merged.len(), total);
        (ss, merged, v)
    }

    #[test]
    fn gro_undoes_gso() {
        for v4 in [true, false] {
            let orig = big(v4, 5000, tcp::ACK | tcp::PSH);
            let mut segs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let n = segment_tcp(&orig, 1400, &mut segs).unwrap();
            assert_eq!(n, 4);
            let pk: Vec<&[u8]> = segs[..n].iter().map(|b| b.as_slice()).collect();
            let (ss, mut merged, v) = merge_all(&pk);
            assert_eq!(merged.len(), orig.len());
            let h = ss[0].hdr_len;
            assert_eq!(v.gso_size, 1400);
            assert_eq!(v.hdr_len as usize, h);
            assert_eq!(v.gso_type, if v4 { GSO_TCPV4 } else { GSO_TCPV6 });
            // Completing the partial checksum gives a packet equal to the original with a
            // valid checksum.
            crate::gso::complete_checksum(&mut merged, v.csum_start.into(), 16).unwrap();
            let ip = ss[0].ip_len;
            let mut want = orig.clone();
            let sum = if v4 {
                sum_words(0, &want[12..20])
            } else {
                sum_words(0, &want[8..40])
            };
            want[ip + 16..ip + 18].fill(0);
            let c = fold(sum_words(sum + 6 + (want.len() - ip) as u32, &want[ip..]));
            want[ip + 16..ip + 18].copy_from_slice(&c.to_be_bytes());
            if v4 {
                // IDs differ per segment; the merged packet carries the first one.
                assert_eq!(crate::wire::ip::checksum(&merged[..20]), 0);
                merged[4..6].copy_from_slice(&want[4..6]);
                merged[10..12].copy_from_slice(&want[10..12]);
            }
            assert_eq!(merged, want);
        }
    }

    fn uso(v4: bool, len: usize) -> Vec<u8> {
        let ip = if v4 { 20 } else { 40 };
        let mut p = big(v4, 0, 0);
        p.truncate(ip);
        p.extend_from_slice(&[0x1f, 0x90, 0x00, 0x35, 0, 0, 0, 0]);
        p.extend((0..len as u32).map(|i| (i % 251) as u8));
        if v4 {
            p[9] = 17;
            let total = (p.len() as u16).to_be_bytes();
            p[2..4].copy_from_slice(&total);
        } else {
            p[6] = 17;
            let payload = ((p.len() - 40) as u16).to_be_bytes();
            p[4..6].copy_from_slice(&payload);
        }
        p
    }

    /// Cut a UDP GSO packet into datagrams (as the sender's USO would), merge them back: the
    /// same packet, with the checksum partial as the kernel expects.
    #[test]
    fn udp_gro_undoes_uso() {
        for v4 in [true, false] {
            let orig = uso(v4, 64 * 20 + 30);
            let mut segs: Vec<PacketBuf> = (0..32).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let n = crate::gso::segment_udp(&orig, 64, &mut segs).unwrap();
            assert_eq!(n, 21);
            let pk: Vec<&[u8]> = segs[..n].iter().map(|b| b.as_slice()).collect();
            let (ss, mut merged, v) = merge_all(&pk);
            assert!(ss.iter().all(|s| s.udp));
            assert_eq!(merged.len(), orig.len());
            let h = ss[0].hdr_len;
            assert_eq!(
                (v.gso_type, v.gso_size, v.hdr_len as usize),
                (GSO_UDP_L4, 64, h)
            );
            crate::gso::complete_checksum(&mut merged, v.csum_start.into(), 6).unwrap();
            let ip = ss[0].ip_len;
            // The merged packet's checksum is valid over the whole.
            let sum = if v4 {
                sum_words(0, &merged[12..20])
            } else {
                sum_words(0, &merged[8..40])
            };
            assert_eq!(
                fold(sum_words(
                    sum + 17 + (merged.len() - ip) as u32,
                    &merged[ip..]
                )),
                0
            );
            // And cutting it again gives the datagrams that were merged.
            let mut again: Vec<PacketBuf> = (0..32).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let m = crate::gso::segment_udp(&merged, 64, &mut again).unwrap();
            assert_eq!(m, n);
            for (a, b) in again[..m].iter().zip(&pk) {
                let (a, b) = (a.as_slice(), *b);
                if v4 {
                    // IDs: the kernel numbers them from the first.
                    assert_eq!(a[..4], b[..4]);
                    assert_eq!(a[6..10], b[6..10]);
                    assert_eq!(a[12..], b[12..]);
                } else {
                    assert_eq!(a, b);
                }
            }
        }
    }

    #[test]
    fn only_datagrams_of_one_flow_and_size_merge() {
        let orig = uso(true, 300);
        let mut segs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        assert_eq!(crate::gso::segment_udp(&orig, 100, &mut segs), Ok(3));
        let a = segs[0].as_slice().to_vec();
        let b = segs[1].as_slice().to_vec();
        let (sa, sb) = (segment(&a).unwrap(), segment(&b).unwrap());
        assert!(can_merge(&a, &sa, &sa, a.len(), &b, &sb));
        let mut other_port = b.clone();
        other_port[21] ^= 1;
        let so = segment(&other_port).unwrap();
        assert!(!can_merge(&a, &sa, &sa, a.len(), &other_port, &so));
        // The checksum check (for packets no AEAD vouched for): right as cut, wrong after a
        // payload bit flips.
        assert!(checksum_ok(&b, &sb));
        let mut flipped = b.clone();
        flipped[40] ^= 4;
        assert!(!checksum_ok(&flipped, &segment(&flipped).unwrap()));
        let mut other_ttl = b.clone();
        other_ttl[8] ^= 1;
        let st = segment(&other_ttl).unwrap();
        assert!(!can_merge(&a, &sa, &sa, a.len(), &other_ttl, &st));
        // A shorter datagram ends the group; a longer one never joins.
        let mut one: Vec<PacketBuf> = (0..1).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        assert_eq!(
            crate::gso::segment_udp(&uso(true, 50), 100, &mut one),
            Ok(1)
        );
        let short = one[0].as_slice().to_vec();
        let ssh = segment(&short).unwrap();
        assert!(can_merge(&a, &sa, &sa, a.len(), &short, &ssh));
        assert!(!can_merge(&a, &sa, &ssh, a.len() + 50, &b, &sb));
        assert!(!can_merge(&short, &ssh, &ssh, short.len(), &a, &sa));
        // No checksum (IPv4's 0), a length field that disagrees, no payload: not datagrams.
        let mut nosum = b.clone();
        nosum[26..28].fill(0);
        assert!(segment(&nosum).is_none());
        let mut badlen = b.clone();
        badlen[25] ^= 1;
        assert!(segment(&badlen).is_none());
        assert!(segment(&uso(true, 0)).is_none());
        // TCP and UDP never share a group.
        let t = big(true, 4200, tcp::ACK);
        let mut ts: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        segment_tcp(&t, 1400, &mut ts).unwrap();
        let t0 = ts[0].as_slice();
        let st0 = segment(t0).unwrap();
        assert!(!can_merge(&a, &sa, &sa, a.len(), t0, &st0));
        assert!(!can_merge(t0, &st0, &st0, t0.len(), &a, &sa));
    }

    #[test]
    fn only_in_order_segments_of_one_flow_merge() {
        let orig = big(true, 4200, tcp::ACK);
        let mut segs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        segment_tcp(&orig, 1400, &mut segs).unwrap();
        let a = segs[0].as_slice().to_vec();
        let b = segs[1].as_slice().to_vec();
        let c = segs[2].as_slice().to_vec();
        let (sa, sb, sc) = (
            segment(&a).unwrap(),
            segment(&b).unwrap(),
            segment(&c).unwrap(),
        );
        assert!(can_merge(&a, &sa, &sa, a.len(), &b, &sb));
        assert!(!can_merge(&a, &sa, &sa, a.len(), &c, &sc), "a gap");
        let mut other_port = b.clone();
        other_port[21] ^= 1;
        let so = segment(&other_port).unwrap();
        assert!(!can_merge(&a, &sa, &sa, a.len(), &other_port, &so));
        let mut other_ack = b.clone();
        other_ack[28] ^= 1;
        assert!(!can_merge(
            &a,
            &sa,
            &sa,
            a.len(),
            &other_ack,
            &segment(&other_ack).unwrap()
        ));
        // PSH ends a group; SYN/FIN/RST never join one; short segments end a group.
        let mut psh = a.clone();
        psh[33] |= tcp::PSH;
        let spsh = segment(&psh).unwrap();
        assert!(spsh.psh);
        assert!(!can_merge(&psh, &spsh, &spsh, a.len(), &b, &sb));
        let mut fin = b.clone();
        fin[33] |= 0x01;
        assert!(segment(&fin).is_none());
        let short = &b[..b.len() - 100];
        assert!(segment(short).is_none(), "total length disagrees");
        // Too big in all.
        assert!(!can_merge(&a, &sa, &sa, 65000, &b, &sb));
        // Non-TCP, options, fragments: not segments.
        let mut udp = a.clone();
        udp[9] = 17;
        assert!(segment(&udp).is_none());
        let mut frag = a.clone();
        frag[6] = 0x20;
        assert!(segment(&frag).is_none());
        for cut in 0..53 {
            assert!(segment(&a[..cut]).is_none());
        }
    }
}

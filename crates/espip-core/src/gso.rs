//! TUN offloads in the pure core: the `virtio_net_hdr` that prefixes every packet on a TUN
//! opened with `IFF_VNET_HDR`, TCP segmentation of the large packets the kernel hands over
//! when TSO is on (`TUNSETOFFLOAD`), and completion of checksums the kernel left partial.
//!
//! 1. The kernel's TCP stack, seeing a device that "does TSO", sends up to 64 KB per packet:
//!    one IP header, one TCP header, many MSS of payload, `gso_type` TCPV4/TCPV6, `gso_size`
//!    = MSS, the TCP checksum partial (pseudo-header only, `NEEDS_CSUM`).
//! 2. [`segment_tcp`] cuts it into MSS-sized segments with their own headers (IPv4 total
//!    length, ID and header checksum; IPv6 payload length; TCP sequence number, flags and full
//!    checksum), exactly what the kernel would have sent one by one.
//! 3. Each segment then goes through the data path like any packet.
//!
//! Layouts: `include/uapi/linux/virtio_net.h` (legacy header, 10 bytes, native byte order,
//! which is little-endian on the machines espip runs on).

use crate::buf::PacketBuf;
use crate::wire::ip::{fold, sum_words, PROTO_UDP};
use crate::wire::ipv4::Ipv4Packet;
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::tcp::{self, TcpPacket};
use crate::wire::udp::{self, UdpPacket};

/// Size of `struct virtio_net_hdr` (without `num_buffers`).
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: checksum from `csum_start`, stored at `+csum_offset`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`: the checksum is known good (the receiver may skip it).
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4`: UDP segmentation (USO), IPv4 or IPv6.
pub const GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` flag bit of `gso_type`.
pub const GSO_ECN: u8 = 0x80;

const PROTO_TCP: u8 = 6;

/// The `virtio_net_hdr` of one TUN packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`, possibly with `GSO_ECN`.
    pub gso_type: u8,
    /// Length of the headers (IP + transport) of a GSO packet.
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where checksumming starts (the transport header).
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Read the header at the front of `b`.
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Write the header into `b[..VNET_HDR_LEN]`.
    pub fn emit(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Why a TUN packet could not be segmented or completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GsoError {
    /// Headers inconsistent with the packet or the `virtio_net_hdr`.
    #[error("malformed offload packet")]
    Malformed,
    /// A GSO type or header layout espip does not segment (UDP, IPv6 extension headers).
    #[error("unsupported offload packet")]
    Unsupported,
    /// More segments than output buffers.
    #[error("too many segments for the batch")]
    TooManySegments,
}

/// What [`offload_in`] found a TUN packet to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offloaded {
    /// One packet (its partial checksum, if any, completed).
    Plain,
    /// A large TCP packet (TSO), cut into segments.
    Tso,
    /// A large UDP packet (USO), cut into datagrams.
    Uso,
}

/// Turn the TUN packet in `bufs[0]` (with its `virtio_net_hdr` in front) into plain packets at
/// the front of `bufs`: itself with a completed checksum, or its TSO/USO segments (which
/// replace it, in order). Returns how many and what the packet was.
pub fn offload_in(bufs: &mut [PacketBuf]) -> Result<(usize, Offloaded), GsoError> {
    let h = VnetHdr::parse(bufs[0].as_slice()).ok_or(GsoError::Malformed)?;
    let _ = bufs[0].pull_front(VNET_HDR_LEN);
    match h.gso_type & !GSO_ECN {
        GSO_NONE if h.flags & F_NEEDS_CSUM != 0 => complete_checksum(
            bufs[0].as_mut_slice(),
            usize::from(h.csum_start),
            usize::from(h.csum_offset),
        )
        .map(|()| (1, Offloaded::Plain)),
        GSO_NONE => Ok((1, Offloaded::Plain)),
        GSO_TCPV4 | GSO_TCPV6 => {
            let (src, rest) = bufs.split_at_mut(1);
            let k = segment_tcp(src[0].as_slice(), usize::from(h.gso_size), rest)?;
            bufs[..=k].rotate_left(1);
            Ok((k, Offloaded::Tso))
        }
        GSO_UDP_L4 => {
            let (src, rest) = bufs.split_at_mut(1);
            let k = segment_udp(src[0].as_slice(), usize::from(h.gso_size), rest)?;
            bufs[..=k].rotate_left(1);
            Ok((k, Offloaded::Uso))
        }
        _ => Err(GsoError::Unsupported),
    }
}

/// Complete a checksum the kernel left partial (`F_NEEDS_CSUM` on a packet without GSO): the
/// field holds the pseudo-header sum; the checksum covers everything from `start`.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> Result<(), GsoError> {
    let at = start.checked_add(offset).ok_or(GsoError::Malformed)?;
    if at + 2 > pkt.len() || start > pkt.len() {
        return Err(GsoError::Malformed);
    }
    let c = fold(sum_words(0, &pkt[start..]));
    pkt[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// The IP header of a GSO packet whose transport must be `proto`: its length and the sum of
/// its addresses (the pseudo-header's, RFC 9293 / RFC 8200 section 8.1, summed once).
fn ip_layout(pkt: &[u8], proto: u8) -> Result<(usize, u32), GsoError> {
    match pkt.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(pkt).map_err(|_| GsoError::Malformed)?;
            if ip.protocol() != proto {
                return Err(GsoError::Unsupported);
            }
            Ok((ip.header_len(), ip.addr_sum()))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(pkt).map_err(|_| GsoError::Malformed)?;
            if ip.next_header() != proto {
                return Err(GsoError::Unsupported);
            }
            Ok((ipv6::HEADER_LEN, ip.addr_sum()))
        }
        _ => Err(GsoError::Malformed),
    }
}

/// How many segments of `gso_size` payload bytes `payload` bytes make (at least one).
fn count(payload: usize, gso_size: usize) -> Result<usize, GsoError> {
    if gso_size == 0 {
        return Err(GsoError::Malformed);
    }
    Ok(payload.div_ceil(gso_size).max(1))
}

/// Segment `i` of a GSO packet into `b`: the headers (`hdr` bytes, the IP header `ip_len` of
/// them) and the segment's payload, with the IP header made right for it (IPv4 total length,
/// ID + `i`, header checksum; IPv6 payload length). The transport header is the caller's.
fn ip_segment<'a>(
    pkt: &[u8],
    ip_len: usize,
    hdr: usize,
    gso_size: usize,
    i: usize,
    b: &'a mut PacketBuf,
) -> Result<&'a mut [u8], GsoError> {
    let payload = pkt.len() - hdr;
    let start = hdr + i * gso_size;
    let len = gso_size.min(payload - (i * gso_size).min(payload));
    let total = hdr + len;
    b.reset();
    let area = b.read_area();
    if area.len() < total {
        return Err(GsoError::Malformed);
    }
    area[..hdr].copy_from_slice(&pkt[..hdr]);
    area[hdr..total].copy_from_slice(&pkt[start..start + len]);
    b.set_len(total);
    let s = b.as_mut_slice();
    if let Ok(mut ip) = Ipv4Packet::new_checked(&mut s[..ip_len]) {
        ip.set_total_len(total as u16);
        ip.set_ident(ip.ident().wrapping_add(i as u16));
        ip.fill_checksum();
    } else if let Ok(mut ip) = Ipv6Packet::new_checked(&mut s[..ip_len]) {
        ip.set_payload_len((total - ipv6::HEADER_LEN) as u16);
    }
    Ok(s)
}

/// Cut a TCP GSO packet (as read from the TUN, after its `virtio_net_hdr`) into segments of at
/// most `gso_size` payload bytes, one per buffer of `out` (each reset, headroom kept). Returns
/// the number of segments.
pub fn segment_tcp(pkt: &[u8], gso_size: usize, out: &mut [PacketBuf]) -> Result<usize, GsoError> {
    let (ip_len, _) = ip_layout(pkt, PROTO_TCP)?;
    let t0 = TcpPacket::new_checked(&pkt[ip_len..]).map_err(|_| GsoError::Malformed)?;
    if count(pkt.len() - (ip_len + t0.header_len()), gso_size)? > out.len() {
        return Err(GsoError::TooManySegments);
    }
    segment_tcp_from(pkt, gso_size, 0, out).map(|(n, _)| n)
}

/// [`segment_tcp`] from segment `first` on, as many as `out` holds: returns how many were
/// cut and how many the packet has in all (a packet of more segments than one batch of
/// buffers is cut in turns).
pub fn segment_tcp_from(
    pkt: &[u8],
    gso_size: usize,
    first: usize,
    out: &mut [PacketBuf],
) -> Result<(usize, usize), GsoError> {
    let (ip_len, addr_sum) = ip_layout(pkt, PROTO_TCP)?;
    let t0 = TcpPacket::new_checked(&pkt[ip_len..]).map_err(|_| GsoError::Malformed)?;
    let hdr = ip_len + t0.header_len();
    let n = count(pkt.len() - hdr, gso_size)?;
    let m = n.saturating_sub(first).min(out.len());
    let (seq0, flags0) = (t0.seq(), t0.flags());
    for (j, b) in out[..m].iter_mut().enumerate() {
        let i = first + j;
        let s = ip_segment(pkt, ip_len, hdr, gso_size, i, b)?;
        let seg_len = (s.len() - ip_len) as u32;
        let mut t = TcpPacket::new_checked(&mut s[ip_len..]).map_err(|_| GsoError::Malformed)?;
        t.set_seq(seq0.wrapping_add((i * gso_size) as u32));
        let mut flags = flags0;
        if i + 1 < n {
            flags &= !(tcp::FIN | tcp::PSH);
        }
        if i > 0 {
            flags &= !tcp::CWR;
        }
        t.set_flags(flags);
        t.set_checksum(0);
        let c = fold(sum_words(
            addr_sum + u32::from(PROTO_TCP) + seg_len,
            &s[ip_len..],
        ));
        TcpPacket::new_checked(&mut s[ip_len..])
            .map_err(|_| GsoError::Malformed)?
            .set_checksum(c);
    }
    Ok((m, n))
}

/// Cut a UDP GSO packet (USO: an application sent with `UDP_SEGMENT`) into datagrams of
/// `gso_size` payload bytes, each with its own IP header (IPv4 total length, ID, header
/// checksum; IPv6 payload length), UDP length and full UDP checksum. Returns the count.
pub fn segment_udp(pkt: &[u8], gso_size: usize, out: &mut [PacketBuf]) -> Result<usize, GsoError> {
    let (ip_len, _) = ip_layout(pkt, PROTO_UDP)?;
    let hdr = ip_len + udp::HEADER_LEN;
    if pkt.len() < hdr {
        return Err(GsoError::Malformed);
    }
    if count(pkt.len() - hdr, gso_size)? > out.len() {
        return Err(GsoError::TooManySegments);
    }
    segment_udp_from(pkt, gso_size, 0, out).map(|(n, _)| n)
}

/// [`segment_udp`] from datagram `first` on, as many as `out` holds: how many were cut, and
/// how many the packet has in all.
pub fn segment_udp_from(
    pkt: &[u8],
    gso_size: usize,
    first: usize,
    out: &mut [PacketBuf],
) -> Result<(usize, usize), GsoError> {
    let (ip_len, addr_sum) = ip_layout(pkt, PROTO_UDP)?;
    let hdr = ip_len + udp::HEADER_LEN;
    if pkt.len() < hdr {
        return Err(GsoError::Malformed);
    }
    let n = count(pkt.len() - hdr, gso_size)?;
    let m = n.saturating_sub(first).min(out.len());
    for (j, b) in out[..m].iter_mut().enumerate() {
        let s = ip_segment(pkt, ip_len, hdr, gso_size, first + j, b)?;
        let udp_len = (s.len() - ip_len) as u16;
        let mut u = UdpPacket::new_checked(&mut s[ip_len..]).map_err(|_| GsoError::Malformed)?;
        u.set_len(udp_len);
        u.set_checksum(0);
        let mut c = fold(sum_words(
            addr_sum + u32::from(PROTO_UDP) + u32::from(udp_len),
            &s[ip_len..],
        ));
        if c == 0 {
            // RFC 768: a computed zero is sent as all ones (zero means "no checksum").
            c = 0xffff;
        }
        UdpPacket::new_checked(&mut s[ip_len..])
            .map_err(|_| GsoError::Malformed)?
            .set_checksum(c);
    }
    Ok((m, n))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::buf::MAX_PACKET;
    use crate::wire::ip::checksum;

    /// A TCP "super packet" as the kernel hands it over with TSO: headers (TCP with a
    /// timestamp option, 32 bytes) + `payload` bytes; the sequence number wraps inside.
    pub(crate) fn super_packet(v4: bool, payload: usize, flags: u8) -> Vec<u8> {
        let ip = if v4 { 20 } else { 40 };
        let mut p = vec![0u8; ip + 32 + payload];
        if v4 {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&((ip + 32 + payload).min(65535) as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0xfff0u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 4, 2, 99]);
            p[16..20].copy_from_slice(&[10, 4, 2, 5]);
        } else {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((32 + payload) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8] = 0xfd;
            p[23] = 0x99;
            p[24] = 0xfd;
            p[39] = 0x05;
        }
        p[ip..ip + 2].copy_from_slice(&5001u16.to_be_bytes());
        p[ip + 2..ip + 4].copy_from_slice(&40000u16.to_be_bytes());
        p[ip + 4..ip + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
        p[ip + 12] = 8 << 4; // 32-byte header: timestamps
        p[ip + 13] = flags;
        p[ip + 20..ip + 32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        for (i, b) in p[ip + 32..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        p
    }

    /// `offload_in`: a TSO packet behind its `virtio_net_hdr` becomes its segments, in
    /// order, at the front of the buffers; a plain packet stays one; a header too short to
    /// be a `virtio_net_hdr` is malformed.
    #[test]
    fn offload_in_turns_a_tun_packet_into_plain_packets() {
        let pkt = super_packet(true, 3000, tcp::ACK);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1000,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        let mut with = vec![0u8; VNET_HDR_LEN];
        hdr.emit(&mut with);
        with.extend_from_slice(&pkt);
        bufs[0] = PacketBuf::from_slice(&with);
        assert_eq!(offload_in(&mut bufs), Ok((3, Offloaded::Tso)));
        for (i, b) in bufs[..3].iter().enumerate() {
            assert_eq!(b.len(), 20 + 32 + 1000, "segment {i}");
            assert!(tcp_checksum_ok(b.as_slice()), "segment {i}");
            let seq = u32::from_be_bytes(b.as_slice()[24..28].try_into().unwrap());
            assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1000 * i as u32));
        }
        let plain = VnetHdr {
            flags: 0,
            gso_type: GSO_NONE,
            hdr_len: 0,
            gso_size: 0,
            csum_start: 0,
            csum_offset: 0,
        };
        let mut with = vec![0u8; VNET_HDR_LEN];
        plain.emit(&mut with);
        with.extend_from_slice(&super_packet(true, 100, tcp::ACK));
        bufs[0] = PacketBuf::from_slice(&with);
        assert_eq!(offload_in(&mut bufs), Ok((1, Offloaded::Plain)));
        assert_eq!(bufs[0].len(), 20 + 32 + 100);
        bufs[0] = PacketBuf::from_slice(&[0u8; 4]);
        assert_eq!(offload_in(&mut bufs), Err(GsoError::Malformed));
    }

    fn tcp_checksum_ok(s: &[u8]) -> bool {
        let (ip, sum) = if s[0] >> 4 == 4 {
            (20, sum_words(0, &s[12..20]))
        } else {
            (40, sum_words(0, &s[8..40]))
        };
        fold(sum_words(sum + 6 + (s.len() - ip) as u32, &s[ip..])) == 0
    }

    #[test]
    fn tso_segments_are_what_the_kernel_would_have_sent() {
        for v4 in [true, false] {
            let mss = 1000;
            let p = super_packet(v4, 2500, 0x18 | 0x01 | 0x80); // ACK PSH FIN CWR
            let mut out: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let n = segment_tcp(&p, mss, &mut out).unwrap();
            assert_eq!(n, 3);
            let ip = if v4 { 20 } else { 40 };
            let mut joined = Vec::new();
            for (i, b) in out[..n].iter().enumerate() {
                let s = b.as_slice();
                let len = if i < 2 { 1000 } else { 500 };
                assert_eq!(s.len(), ip + 32 + len);
                if v4 {
                    assert_eq!(u16::from_be_bytes([s[2], s[3]]) as usize, s.len());
                    assert_eq!(
                        u16::from_be_bytes([s[4], s[5]]),
                        0xfff0u16.wrapping_add(i as u16)
                    );
                    assert_eq!(checksum(&s[..20]), 0, "IPv4 header checksum");
                } else {
                    assert_eq!(u16::from_be_bytes([s[4], s[5]]) as usize, s.len() - 40);
                }
                let seq = u32::from_be_bytes(s[ip + 4..ip + 8].try_into().unwrap());
                assert_eq!(
                    seq,
                    0xffff_fff0u32.wrapping_add((i * mss) as u32),
                    "seq wraps"
                );
                let f = s[ip + 13];
                assert_eq!(f & 0x10, 0x10, "ACK everywhere");
                assert_eq!(f & (tcp::FIN | tcp::PSH) != 0, i == 2, "FIN/PSH only last");
                assert_eq!(f & tcp::CWR != 0, i == 0, "CWR only first");
                assert_eq!(&s[ip + 20..ip + 32], &p[ip + 20..ip + 32], "options kept");
                assert!(tcp_checksum_ok(s), "TCP checksum of segment {i}");
                joined.extend_from_slice(&s[ip + 32..]);
            }
            assert_eq!(joined, &p[ip + 32..], "payload in order, nothing lost");
        }
    }

    #[test]
    fn a_packet_smaller_than_one_segment_is_one_segment_and_errors_are_errors() {
        let p = super_packet(true, 100, 0x18);
        let mut out: Vec<PacketBuf> = (0..2).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        assert_eq!(segment_tcp(&p, 1400, &mut out), Ok(1));
        assert!(tcp_checksum_ok(out[0].as_slice()));
        let big = super_packet(true, 5000, 0x18);
        assert_eq!(
            segment_tcp(&big, 1000, &mut out),
            Err(GsoError::TooManySegments)
        );
        let mut udp = p.clone();
        udp[9] = 17;
        assert_eq!(
            segment_tcp(&udp, 1000, &mut out),
            Err(GsoError::Unsupported)
        );
        for cut in 0..52 {
            assert!(segment_tcp(&p[..cut], 1000, &mut out).is_err(), "cut {cut}");
        }
        assert_eq!(segment_tcp(&p, 0, &mut out), Err(GsoError::Malformed));
    }

    /// A packet of more segments than the buffers at hand is cut in turns (the receive side
    /// of GRO-merged IP-in-IP packets): the same segments, byte for byte, as in one go.
    #[test]
    fn cutting_in_turns_gives_the_same_segments() {
        for v4 in [true, false] {
            let p = super_packet(v4, 7300, 0x18 | 0x01); // ACK PSH FIN: flags on the last only
            let mut all: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            assert_eq!(segment_tcp(&p, 1000, &mut all), Ok(8));
            let mut part: Vec<PacketBuf> = (0..3).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let mut first = 0;
            while first < 8 {
                let (k, total) = segment_tcp_from(&p, 1000, first, &mut part).unwrap();
                assert_eq!(total, 8);
                for j in 0..k {
                    assert_eq!(
                        part[j].as_slice(),
                        all[first + j].as_slice(),
                        "segment {}",
                        first + j
                    );
                }
                first += k;
            }
            assert_eq!(first, 8);
            let mut u = super_packet(v4, 0, 0);
            let ip = if v4 { 20 } else { 40 };
            u.truncate(ip);
            u[if v4 { 9 } else { 6 }] = 17;
            u.extend_from_slice(&[0x1f, 0x90, 0x00, 0x35, 0, 0, 0, 0]);
            u.extend((0..2500u32).map(|i| i as u8));
            let n = segment_udp(&u, 1000, &mut all).unwrap();
            let (k, total) = segment_udp_from(&u, 1000, 2, &mut part).unwrap();
            assert_eq!((n, k, total), (3, 1, 3));
            assert_eq!(part[0].as_slice(), all[2].as_slice());
        }
    }

    #[test]
    fn uso_datagrams_have_their_own_lengths_and_checksums() {
        for v4 in [true, false] {
            let ip = if v4 { 20 } else { 40 };
            let mut p = super_packet(v4, 0, 0);
            p.truncate(ip);
            p.extend_from_slice(&[0x1f, 0x90, 0x00, 0x35, 0, 0, 0, 0]);
            p.extend((0..3000u32).map(|i| (i % 253) as u8));
            if v4 {
                p[9] = 17;
            } else {
                p[6] = 17;
            }
            let mut out: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new(MAX_PACKET)).collect();
            let n = segment_udp(&p, 1200, &mut out).unwrap();
            assert_eq!(n, 3);
            let mut joined = Vec::new();
            for (i, b) in out[..n].iter().enumerate() {
                let s = b.as_slice();
                let len = if i < 2 { 1200 } else { 600 };
                assert_eq!(s.len(), ip + 8 + len);
                assert_eq!(
                    usize::from(u16::from_be_bytes([s[ip + 4], s[ip + 5]])),
                    8 + len
                );
                if v4 {
                    assert_eq!(checksum(&s[..20]), 0);
                }
                let sum = if v4 {
                    sum_words(0, &s[12..20])
                } else {
                    sum_words(0, &s[8..40])
                };
                assert_eq!(fold(sum_words(sum + 17 + (8 + len) as u32, &s[ip..])), 0);
                assert_eq!(&s[ip..ip + 4], &[0x1f, 0x90, 0x00, 0x35], "ports kept");
                joined.extend_from_slice(&s[ip + 8..]);
            }
            assert_eq!(joined, &p[ip + 8..]);
        }
    }

    /// Regression (found by the `offload` fuzz target): an IPv4 header of exactly 40 bytes
    /// (20 bytes of options) was taken for IPv6.
    #[test]
    fn uso_with_a_40_byte_ipv4_header_stays_ipv4() {
        let mut p = vec![0u8; 40 + 8 + 10];
        p[0] = 0x4a;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 4, 2, 99]);
        p[16..20].copy_from_slice(&[10, 4, 2, 5]);
        p[20..40].fill(1); // options: NOPs
        let mut out: Vec<PacketBuf> = (0..2).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        assert_eq!(segment_udp(&p, 1000, &mut out), Ok(1));
        let s = out[0].as_slice();
        assert_eq!(
            u16::from_be_bytes([s[2], s[3]]) as usize,
            s.len(),
            "IPv4 total length"
        );
        assert_eq!(
            checksum(&s[..40]),
            0,
            "IPv4 header checksum over the options"
        );
        let sum = sum_words(0, &s[12..20]);
        assert_eq!(fold(sum_words(sum + 17 + 18, &s[40..])), 0, "UDP checksum");
    }

    #[test]
    fn partial_checksums_are_completed() {
        // A UDP packet whose checksum field holds the pseudo-header sum, as the kernel leaves
        // it with NEEDS_CSUM.
        let mut p = vec![0u8; 28 + 11];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 4, 2, 99]);
        p[16..20].copy_from_slice(&[10, 4, 2, 5]);
        p[24..26].copy_from_slice(&19u16.to_be_bytes());
        p[28..].copy_from_slice(b"hello world");
        // The kernel stores the folded, uncomplemented pseudo-header sum.
        let pseudo = !fold(sum_words(0, &p[12..20]) + 17 + 19);
        p[26..28].copy_from_slice(&pseudo.to_be_bytes());
        complete_checksum(&mut p, 20, 6).unwrap();
        let full = fold(sum_words(sum_words(0, &p[12..20]) + 17 + 19, &p[20..]));
        assert_eq!(full, 0, "UDP checksum verifies");
        assert_eq!(complete_checksum(&mut p, 38, 6), Err(GsoError::Malformed));
    }

    #[test]
    fn vnet_header_round_trip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 52,
            gso_size: 1394,
            csum_start: 20,
            csum_offset: 16,
        };
        let mut b = [0u8; VNET_HDR_LEN];
        h.emit(&mut b);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}

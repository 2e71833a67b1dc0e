//! A reader for classic pcap files (what `tcpdump -w` writes), enough to check what crossed a
//! link: per-frame IPv4 source, destination, protocol, and a search for plaintext.

use espip_core::wire::ipv4::Ipv4Packet;
use espip_core::wire::ipv6::{Ipv6Packet, HEADER_LEN as IPV6_HEADER_LEN};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

/// LINKTYPE_ETHERNET.
const LINKTYPE_ETHERNET: u32 = 1;
/// LINKTYPE_RAW (IPv4/IPv6 without link header).
const LINKTYPE_RAW: u32 = 101;

/// One captured frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// Ethertype (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6), or 0x0800/0x86dd for raw captures.
    pub ethertype: u16,
    /// The IP packet (or ARP payload), as captured (may be truncated by the snap length).
    pub payload: Vec<u8>,
}

impl Frame {
    /// The IPv4 packet of an IPv4 frame, through the core's view.
    fn v4(&self) -> Option<Ipv4Packet<&[u8]>> {
        (self.ethertype == 0x0800)
            .then(|| Ipv4Packet::new_checked(&self.payload[..]).ok())
            .flatten()
    }

    /// The IPv6 packet of an IPv6 frame, through the core's view.
    fn v6(&self) -> Option<Ipv6Packet<&[u8]>> {
        (self.ethertype == 0x86dd)
            .then(|| Ipv6Packet::new_checked(&self.payload[..]).ok())
            .flatten()
    }

    /// (source, destination, protocol) of an IPv4 frame.
    pub fn ipv4(&self) -> Option<(Ipv4Addr, Ipv4Addr, u8)> {
        let p = self.v4()?;
        Some((p.src(), p.dst(), p.protocol()))
    }

    /// (source, destination, next header) of an IPv6 frame.
    pub fn ipv6(&self) -> Option<(Ipv6Addr, Ipv6Addr, u8)> {
        let p = self.v6()?;
        Some((p.src(), p.dst(), p.next_header()))
    }

    /// (source, destination, protocol, header length, total length) of an IPv4 or IPv6 frame
    /// (IPv6 without extension headers).
    pub fn ip(&self) -> Option<(IpAddr, IpAddr, u8, usize, usize)> {
        if let Some(p) = self.v4() {
            return Some((
                p.src().into(),
                p.dst().into(),
                p.protocol(),
                p.header_len(),
                p.total_len(),
            ));
        }
        let p = self.v6()?;
        Some((
            p.src().into(),
            p.dst().into(),
            p.next_header(),
            IPV6_HEADER_LEN,
            IPV6_HEADER_LEN + p.payload_len(),
        ))
    }
}

/// Read every frame of a pcap file.
pub fn read(path: &Path) -> io::Result<Vec<Frame>> {
    let data = std::fs::read(path)?;
    parse(&data).ok_or_else(|| io::Error::other(format!("{} is not a pcap file", path.display())))
}

/// Parse pcap bytes.
pub fn parse(data: &[u8]) -> Option<Vec<Frame>> {
    let magic = data.get(..4)?;
    let le = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => return None,
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = data.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let linktype = u32_at(20)?;
    let mut frames = Vec::new();
    let mut off = 24;
    while off + 16 <= data.len() {
        let incl = u32_at(off + 8)? as usize;
        let rec = data.get(off + 16..off + 16 + incl)?;
        off += 16 + incl;
        let frame = match linktype {
            LINKTYPE_ETHERNET if rec.len() >= 14 => Frame {
                ethertype: u16::from_be_bytes([rec[12], rec[13]]),
                payload: rec[14..].to_vec(),
            },
            LINKTYPE_RAW if !rec.is_empty() => Frame {
                ethertype: if rec[0] >> 4 == 6 { 0x86dd } else { 0x0800 },
                payload: rec.to_vec(),
            },
            _ => continue,
        };
        frames.push(frame);
    }
    Some(frames)
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

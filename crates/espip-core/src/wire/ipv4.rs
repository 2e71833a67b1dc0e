//! The IPv4 header (RFC 791 section 3.1), as a typed view.
//!
//! ```text
//! |Version|  IHL  |Type of Service|          Total Length         |
//! |         Identification        |Flags|      Fragment Offset    |
//! |  Time to Live |    Protocol   |         Header Checksum       |
//! |                       Source Address                          |
//! |                    Destination Address                        |
//! ```

use super::checksum::{fold, sum_words};
use super::{Field, Malformed};
use std::net::Ipv4Addr;

/// Byte ranges of the IPv4 header.
pub mod field {
    use super::Field;
    /// Version (high nibble) and IHL (low nibble).
    pub const VER_IHL: usize = 0;
    /// Total length.
    pub const LENGTH: Field = 2..4;
    /// Identification.
    pub const IDENT: Field = 4..6;
    /// Flags (DF 0x4000, MF 0x2000) and fragment offset.
    pub const FLG_OFF: Field = 6..8;
    /// Time to live.
    pub const TTL: usize = 8;
    /// Protocol.
    pub const PROTOCOL: usize = 9;
    /// Header checksum.
    pub const CHECKSUM: Field = 10..12;
    /// Source address.
    pub const SRC: Field = 12..16;
    /// Destination address.
    pub const DST: Field = 16..20;
}

/// Header length without options.
pub const MIN_HEADER_LEN: usize = 20;
/// Don't Fragment.
pub const DF: u16 = 0x4000;
/// More Fragments.
pub const MF: u16 = 0x2000;

/// Write a 20-byte IPv4 header without options into `h` (TTL 64, header checksum included).
pub fn emit_header(h: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, total: u16) {
    h[..MIN_HEADER_LEN].fill(0);
    h[field::VER_IHL] = 0x45;
    h[field::TTL] = 64;
    h[field::PROTOCOL] = protocol;
    let mut p = Ipv4Packet::new_checked(&mut h[..MIN_HEADER_LEN]).expect("a header of 20 bytes");
    p.set_total_len(total);
    p.set_src(src);
    p.set_dst(dst);
    p.fill_checksum();
}

/// A view of an IPv4 packet.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

fn be16(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([b[f.start], b[f.start + 1]])
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wrap untrusted bytes: version 4, a header length of at least 20 that fits. After this
    /// no header accessor panics (the total length may still disagree with the buffer; see
    /// [`Ipv4Packet::total_len`]).
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < MIN_HEADER_LEN || b[0] >> 4 != 4 {
            return Err(Malformed);
        }
        let ihl = usize::from(b[0] & 0x0f) * 4;
        if ihl < MIN_HEADER_LEN || ihl > b.len() {
            return Err(Malformed);
        }
        Ok(Ipv4Packet { buffer })
    }

    /// Header length in bytes (IHL x 4).
    pub fn header_len(&self) -> usize {
        usize::from(self.buffer.as_ref()[field::VER_IHL] & 0x0f) * 4
    }

    /// The total length field.
    pub fn total_len(&self) -> usize {
        usize::from(be16(self.buffer.as_ref(), field::LENGTH))
    }

    /// The identification field.
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Flags and fragment offset (the raw 16 bits).
    pub fn flags_offset(&self) -> u16 {
        be16(self.buffer.as_ref(), field::FLG_OFF)
    }

    /// Whether this is a fragment (MF set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        self.flags_offset() & 0x3fff != 0
    }

    /// Whether this is a later fragment (non-zero offset: no transport header).
    pub fn is_later_fragment(&self) -> bool {
        self.flags_offset() & 0x1fff != 0
    }

    /// The protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// The source address.
    pub fn src(&self) -> Ipv4Addr {
        let b: [u8; 4] = self.buffer.as_ref()[field::SRC].try_into().unwrap();
        Ipv4Addr::from(b)
    }

    /// The destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b: [u8; 4] = self.buffer.as_ref()[field::DST].try_into().unwrap();
        Ipv4Addr::from(b)
    }

    /// The header checksum field.
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The one's-complement sum of the addresses (the pseudo-header's address part).
    pub fn addr_sum(&self) -> u32 {
        sum_words(0, &self.buffer.as_ref()[field::SRC.start..field::DST.end])
    }

    /// The header bytes.
    pub fn header(&self) -> &[u8] {
        &self.buffer.as_ref()[..self.header_len()]
    }

    /// What follows the header, up to the end of the buffer.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Set the total length field.
    pub fn set_total_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    /// Set the identification field.
    pub fn set_ident(&mut self, id: u16) {
        self.buffer.as_mut()[field::IDENT].copy_from_slice(&id.to_be_bytes());
    }

    /// Set the time to live.
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, c: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }

    /// Set the source address.
    pub fn set_src(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    /// Set the destination address.
    pub fn set_dst(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }

    /// Compute and store the header checksum.
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let h = self.header_len();
        let c = fold(sum_words(0, &self.buffer.as_ref()[..h]));
        self.set_checksum(c);
    }

    /// What follows the header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let h = self.header_len();
        &mut self.buffer.as_mut()[h..]
    }
}

//! The IPv6 header (RFC 8200 section 3), as a typed view.
//!
//! ```text
//! |Version| Traffic Class |           Flow Label                  |
//! |         Payload Length        |  Next Header  |   Hop Limit   |
//! |                 Source Address (16 octets)                    |
//! |              Destination Address (16 octets)                  |
//! ```

use super::checksum::sum_words;
use super::{Field, Malformed};
use std::net::Ipv6Addr;

/// Byte ranges of the IPv6 header.
pub mod field {
    use super::Field;
    /// Version, traffic class, flow label.
    pub const VER_TC_FLOW: Field = 0..4;
    /// Payload length.
    pub const LENGTH: Field = 4..6;
    /// Next header.
    pub const NEXT_HEADER: usize = 6;
    /// Hop limit.
    pub const HOP_LIMIT: usize = 7;
    /// Source address.
    pub const SRC: Field = 8..24;
    /// Destination address.
    pub const DST: Field = 24..40;
}

/// The fixed header's length.
pub const HEADER_LEN: usize = 40;

/// Write an IPv6 header (no traffic class or flow label, hop limit 64) into `h`.
pub fn emit_header(h: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, payload_len: u16) {
    h[..HEADER_LEN].fill(0);
    h[0] = 0x60;
    h[field::NEXT_HEADER] = next_header;
    h[field::HOP_LIMIT] = 64;
    h[field::SRC].copy_from_slice(&src.octets());
    h[field::DST].copy_from_slice(&dst.octets());
    Ipv6Packet::new_checked(&mut h[..HEADER_LEN])
        .expect("a header of 40 bytes")
        .set_payload_len(payload_len);
}

/// A view of an IPv6 packet.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wrap untrusted bytes: version 6 and a whole fixed header.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let b = buffer.as_ref();
        if b.len() < HEADER_LEN || b[0] >> 4 != 6 {
            return Err(Malformed);
        }
        Ok(Ipv6Packet { buffer })
    }

    /// The payload length field.
    pub fn payload_len(&self) -> usize {
        let b = self.buffer.as_ref();
        usize::from(u16::from_be_bytes([
            b[field::LENGTH.start],
            b[field::LENGTH.start + 1],
        ]))
    }

    /// The next header.
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NEXT_HEADER]
    }

    /// The source address.
    pub fn src(&self) -> Ipv6Addr {
        let b: [u8; 16] = self.buffer.as_ref()[field::SRC].try_into().unwrap();
        Ipv6Addr::from(b)
    }

    /// The destination address.
    pub fn dst(&self) -> Ipv6Addr {
        let b: [u8; 16] = self.buffer.as_ref()[field::DST].try_into().unwrap();
        Ipv6Addr::from(b)
    }

    /// The one's-complement sum of the addresses (the pseudo-header's address part).
    pub fn addr_sum(&self) -> u32 {
        sum_words(0, &self.buffer.as_ref()[field::SRC.start..field::DST.end])
    }

    /// What follows the fixed header, up to the end of the buffer.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Set the payload length field.
    pub fn set_payload_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    /// Set the hop limit.
    pub fn set_hop_limit(&mut self, hops: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = hops;
    }

    /// What follows the fixed header, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

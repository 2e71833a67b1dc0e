//! The UDP header (RFC 768), as a typed view.

use super::{Field, Malformed};

/// Byte ranges of the UDP header.
pub mod field {
    use super::Field;
    /// Source port.
    pub const SRC_PORT: Field = 0..2;
    /// Destination port.
    pub const DST_PORT: Field = 2..4;
    /// Length (header and payload).
    pub const LENGTH: Field = 4..6;
    /// Checksum (0: none, IPv4 only).
    pub const CHECKSUM: Field = 6..8;
}

/// The header's length.
pub const HEADER_LEN: usize = 8;

/// Write a UDP header for `payload_len` bytes of payload into `h`. The checksum is left 0
/// ("not computed", allowed over IPv4; RFC 3948 section 3.1.1 sends ESP-in-UDP so).
pub fn emit_header(h: &mut [u8], src_port: u16, dst_port: u16, payload_len: usize) {
    h[..HEADER_LEN].fill(0);
    h[field::SRC_PORT].copy_from_slice(&src_port.to_be_bytes());
    h[field::DST_PORT].copy_from_slice(&dst_port.to_be_bytes());
    let len = (payload_len + HEADER_LEN).min(usize::from(u16::MAX)) as u16;
    UdpPacket::new_checked(&mut h[..HEADER_LEN])
        .expect("a header of 8 bytes")
        .set_len(len);
}

/// A view of a UDP datagram.
#[derive(Debug, Clone)]
pub struct UdpPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wrap untrusted bytes: a whole header.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        if buffer.as_ref().len() < HEADER_LEN {
            return Err(Malformed);
        }
        Ok(UdpPacket { buffer })
    }

    /// The checksum field.
    pub fn checksum(&self) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_be_bytes([b[field::CHECKSUM.start], b[field::CHECKSUM.start + 1]])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Set the length field.
    pub fn set_len(&mut self, len: u16) {
        self.buffer.as_mut()[field::LENGTH].copy_from_slice(&len.to_be_bytes());
    }

    /// Set the checksum field.
    pub fn set_checksum(&mut self, c: u16) {
        self.buffer.as_mut()[field::CHECKSUM].copy_from_slice(&c.to_be_bytes());
    }
}

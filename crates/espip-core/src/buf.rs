//! `PacketBuf`: one reusable packet buffer with headroom and tailroom.
//!
//! The TUN edge reads an inner packet at offset [`HEADROOM`], so the ESP header and IV (or an
//! ICMP error header) are written in front of it and the ESP trailer and ICV behind it without a
//! copy, as wireguard-go reads the TUN at an offset and Linux reserves `header_len`/`trailer_len`
//! per SA. Buffers are allocated once and reused from the edge's batch arrays.

/// Bytes reserved in front of a freshly read packet.
///
/// Tuning constant: the largest prefix the core writes is an IPv6 header plus an ICMPv6 header
/// (40 + 8 = 48) for "packet too big"; ESP needs 16 (SPI, sequence, IV). 64 keeps the payload
/// 16-byte aligned relative to the allocation.
pub const HEADROOM: usize = 64;

/// Bytes reserved behind the largest packet: ESP padding (at most 3 for 4-byte alignment), pad
/// length, next header and a 16-byte ICV is 21; 32 leaves slack.
pub const TAILROOM: usize = 32;

/// Largest inner packet a buffer holds (the IPv4/IPv6 maximum without jumbograms).
pub const MAX_PACKET: usize = 65535;

/// A packet in a buffer with room on both sides. The valid bytes are `data[start..end]`.
pub struct PacketBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl PacketBuf {
    /// A buffer that can hold `max_packet` bytes plus headroom and tailroom.
    pub fn new(max_packet: usize) -> Self {
        let cap = HEADROOM + max_packet + TAILROOM;
        PacketBuf {
            data: vec![0u8; cap].into_boxed_slice(),
            start: HEADROOM,
            end: HEADROOM,
        }
    }

    /// A buffer holding a copy of `bytes` at the usual headroom (tests and tools).
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = PacketBuf::new(bytes.len().max(1500));
        b.reset();
        b.read_area()[..bytes.len()].copy_from_slice(bytes);
        b.set_len(bytes.len());
        b
    }

    /// Empty the buffer, with the start at the standard headroom.
    pub fn reset(&mut self) {
        self.start = HEADROOM;
        self.end = HEADROOM;
    }

    /// Empty the buffer with the start at offset 0 (for reads that bring an outer header the
    /// edge strips, such as a raw IPv4 socket).
    pub fn reset_to_front(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// The area a read may fill: from the current start to the tailroom.
    pub fn read_area(&mut self) -> &mut [u8] {
        let limit = self.data.len() - TAILROOM;
        &mut self.data[self.start..limit]
    }

    /// Declare that a read put `len` bytes at the start.
    pub fn set_len(&mut self, len: usize) {
        let limit = self.data.len() - TAILROOM;
        self.end = (self.start + len).min(limit);
    }

    /// The packet bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// The packet bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.end]
    }

    /// Length of the packet.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when the packet is empty.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Free bytes in front of the packet.
    pub fn headroom(&self) -> usize {
        self.start
    }

    /// Free bytes behind the packet (including the reserved tailroom).
    pub fn tailroom(&self) -> usize {
        self.data.len() - self.end
    }

    /// Grow the packet by `n` bytes at the front and return them; `None` without headroom.
    pub fn push_front(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.start {
            return None;
        }
        self.start -= n;
        Some(&mut self.data[self.start..self.start + n])
    }

    /// Drop `n` bytes from the front; `None` if the packet is shorter.
    pub fn pull_front(&mut self, n: usize) -> Option<()> {
        if n > self.len() {
            return None;
        }
        self.start += n;
        Some(())
    }

    /// Grow the packet by `n` bytes at the back and return them; `None` without tailroom.
    pub fn push_back(&mut self, n: usize) -> Option<&mut [u8]> {
        if n > self.tailroom() {
            return None;
        }
        let old = self.end;
        self.end += n;
        Some(&mut self.data[old..self.end])
    }

    /// Shorten the packet to `len` bytes (no-op if already shorter).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len() {
            self.end = self.start + len;
        }
    }

    /// The packet and the whole buffer offsets, for in-place transforms that need the packet
    /// split into parts (ESP: header, body, trailer).
    pub fn range(&self) -> std::ops::Range<usize> {
        self.start..self.end
    }
}

impl std::fmt::Debug for PacketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PacketBuf")
            .field("start", &self.start)
            .field("len", &self.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_and_pull_keep_bytes_in_place() {
        let mut b = PacketBuf::from_slice(&[1, 2, 3]);
        assert_eq!(b.headroom(), HEADROOM);
        b.push_front(2).unwrap().copy_from_slice(&[9, 8]);
        b.push_back(1).unwrap()[0] = 7;
        assert_eq!(b.as_slice(), &[9, 8, 1, 2, 3, 7]);
        b.pull_front(2).unwrap();
        b.truncate(3);
        assert_eq!(b.as_slice(), &[1, 2, 3]);
        assert!(b.push_front(HEADROOM + 1).is_none());
        assert!(b.pull_front(4).is_none());
    }
}

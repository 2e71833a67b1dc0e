//! The ESP header (RFC 4303 section 2) and the AEAD framing of RFC 4106 / RFC 7634.
//!
//! ```text
//!  0                   1                   2                   3
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |               Security Parameters Index (SPI)                 |
//! |                      Sequence Number                          |
//! |              IV (8 octets, RFC 4106 section 3.1)              |
//! ~                    Payload Data (variable)                    ~
//! |               |     Padding (0-255 bytes)                     |
//! |                               |  Pad Length   | Next Header   |
//! ~        Integrity Check Value (16 octets, RFC 4106 section 6)  ~
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use super::{Field, Malformed};

/// Byte ranges of the ESP header.
pub mod field {
    use super::Field;
    /// Security Parameters Index (RFC 4303 section 2.1).
    pub const SPI: Field = 0..4;
    /// Low 32 bits of the sequence number (RFC 4303 section 2.2).
    pub const SEQ: Field = 4..8;
    /// Explicit IV of the AEAD transforms (RFC 4106 section 3.1, RFC 7634 section 2).
    pub const IV: Field = 8..16;
    /// First byte of the encrypted payload.
    pub const PAYLOAD: usize = 16;
}

/// ESP header length: SPI and sequence number (RFC 4303 section 2).
pub const HEADER_LEN: usize = 8;
/// Explicit IV length of AES-GCM (RFC 4106 section 3.1) and ChaCha20-Poly1305 (RFC 7634 section 2).
pub const IV_LEN: usize = 8;
/// ICV length: 16 octets (RFC 4106 section 6; RFC 7634 section 2).
pub const ICV_LEN: usize = 16;
/// Pad Length and Next Header (RFC 4303 sections 2.5 and 2.6).
pub const TRAILER_LEN: usize = 2;
/// The ciphertext (payload, padding, pad length, next header) ends on a 4-byte boundary
/// (RFC 4303 section 2.4).
pub const ALIGN: usize = 4;
/// Smallest well-formed AEAD ESP packet: header, IV, the 2-byte trailer padded to 4, ICV.
pub const MIN_LEN: usize = HEADER_LEN + IV_LEN + ALIGN + ICV_LEN;
/// Next Header value of a dummy packet, to be discarded (RFC 4303 section 2.6).
pub const NEXT_HEADER_DUMMY: u8 = 59;
/// Next Header of an IPv4 inner packet in tunnel mode (IANA protocol 4).
pub const NEXT_HEADER_IPV4: u8 = 4;
/// Next Header of an IPv6 inner packet in tunnel mode (IANA protocol 41).
pub const NEXT_HEADER_IPV6: u8 = 41;

/// Number of padding bytes that align `payload_len` plus the 2-byte trailer to [`ALIGN`].
pub fn pad_len(payload_len: usize) -> usize {
    (ALIGN - (payload_len + TRAILER_LEN) % ALIGN) % ALIGN
}

/// A view of an ESP packet (outer IP header already removed).
#[derive(Debug, Clone)]
pub struct EspPacket<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EspPacket<T> {
    /// Wrap without checking; accessors may panic on short input.
    pub fn new_unchecked(buffer: T) -> Self {
        EspPacket { buffer }
    }

    /// Wrap untrusted bytes: long enough for header, IV, a minimal aligned trailer and the ICV,
    /// and the ciphertext length a multiple of 4. After this no accessor panics.
    pub fn new_checked(buffer: T) -> Result<Self, Malformed> {
        let len = buffer.as_ref().len();
        if len < MIN_LEN || (len - field::PAYLOAD - ICV_LEN) % ALIGN != 0 {
            return Err(Malformed);
        }
        Ok(EspPacket { buffer })
    }

    /// The Security Parameters Index.
    pub fn spi(&self) -> u32 {
        u32::from_be_bytes(self.buffer.as_ref()[field::SPI].try_into().unwrap())
    }

    /// The low 32 bits of the sequence number as sent.
    pub fn seq(&self) -> u32 {
        u32::from_be_bytes(self.buffer.as_ref()[field::SEQ].try_into().unwrap())
    }

    /// The explicit 8-byte IV.
    pub fn iv(&self) -> [u8; IV_LEN] {
        self.buffer.as_ref()[field::IV].try_into().unwrap()
    }

    /// Ciphertext plus ICV (everything after the IV).
    pub fn sealed(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }

    /// The underlying bytes.
    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EspPacket<T> {
    /// Set the SPI.
    pub fn set_spi(&mut self, spi: u32) {
        self.buffer.as_mut()[field::SPI].copy_from_slice(&spi.to_be_bytes());
    }

    /// Set the low 32 bits of the sequence number.
    pub fn set_seq(&mut self, seq: u32) {
        self.buffer.as_mut()[field::SEQ].copy_from_slice(&seq.to_be_bytes());
    }

    /// Set the explicit IV.
    pub fn set_iv(&mut self, iv: [u8; IV_LEN]) {
        self.buffer.as_mut()[field::IV].copy_from_slice(&iv);
    }
}

/// The header fields of an ESP packet, parsed or to emit (smoltcp's `Repr`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EspRepr {
    /// Security Parameters Index.
    pub spi: u32,
    /// Low 32 bits of the sequence number.
    pub seq: u32,
    /// Explicit IV.
    pub iv: [u8; IV_LEN],
}

impl EspRepr {
    /// Read the header fields of a checked packet.
    pub fn parse<T: AsRef<[u8]>>(packet: &EspPacket<T>) -> Self {
        EspRepr {
            spi: packet.spi(),
            seq: packet.seq(),
            iv: packet.iv(),
        }
    }

    /// Bytes the header and IV take.
    pub const fn buffer_len(&self) -> usize {
        field::PAYLOAD
    }

    /// Write the header fields into the first [`EspRepr::buffer_len`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8]) {
        let mut p = EspPacket::new_unchecked(buf);
        p.set_spi(self.spi);
        p.set_seq(self.seq);
        p.set_iv(self.iv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn padding_aligns_payload_and_trailer() {
        for len in 0..64 {
            assert_eq!((len + pad_len(len) + TRAILER_LEN) % ALIGN, 0);
            assert!(pad_len(len) < ALIGN);
        }
        assert_eq!(pad_len(2), 0);
        assert_eq!(pad_len(1), 1);
        assert_eq!(pad_len(0), 2);
    }

    #[test]
    fn checked_rejects_short_and_misaligned() {
        assert_eq!(
            EspPacket::new_checked(&[0u8; MIN_LEN - 1][..]).unwrap_err(),
            Malformed
        );
        assert!(EspPacket::new_checked(&[0u8; MIN_LEN][..]).is_ok());
        assert!(EspPacket::new_checked(&[0u8; MIN_LEN + 1][..]).is_err());
        assert!(EspPacket::new_checked(&[0u8; MIN_LEN + 4][..]).is_ok());
    }

    #[test]
    fn emit_is_byte_exact() {
        let repr = EspRepr {
            spi: 0x0000_4321,
            seq: 0x8765_4321,
            iv: [0x49, 0x56, 0xed, 0x7e, 0x3b, 0x24, 0x4c, 0xfe],
        };
        let mut buf = [0u8; 16];
        repr.emit(&mut buf);
        assert_eq!(
            buf,
            [
                0x00, 0x00, 0x43, 0x21, 0x87, 0x65, 0x43, 0x21, 0x49, 0x56, 0xed, 0x7e, 0x3b, 0x24,
                0x4c, 0xfe
            ]
        );
    }

    proptest! {
        #[test]
        fn parse_emit_round_trip(spi: u32, seq: u32, iv: [u8; 8], extra in 0usize..16) {
            let repr = EspRepr { spi, seq, iv };
            let mut buf = vec![0u8; MIN_LEN + extra * ALIGN];
            repr.emit(&mut buf);
            let p = EspPacket::new_checked(&buf[..]).unwrap();
            prop_assert_eq!(EspRepr::parse(&p), repr);
        }

        #[test]
        fn checked_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(p) = EspPacket::new_checked(&bytes[..]) {
                let _ = (p.spi(), p.seq(), p.iv(), p.sealed().len());
            }
        }
    }
}

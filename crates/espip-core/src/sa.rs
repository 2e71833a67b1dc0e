//! Security associations (RFC 4301 section 4.1; Linux `struct xfrm_state`): one outbound SA
//! per peer that seals with the next sequence number, one inbound SA per peer that checks the
//! replay window and opens. AEAD only: AES-GCM with a 16-octet ICV (RFC 4106, Linux
//! `rfc4106(gcm(aes))`) and ChaCha20-Poly1305 (RFC 7634, Linux `rfc7539esp(chacha20,poly1305)`).
//!
//! Outbound ESP, in place in a [`PacketBuf`]:
//! 1. sequence number assignment (refused once the 32-bit space, or the 64-bit one with ESN, is
//!    used up: RFC 4303 section 3.3.3);
//! 2. trailer: padding 1, 2, 3, ... to 4-byte alignment, pad length, next header;
//! 3. header: SPI, low 32 bits of the sequence number, IV = the 64-bit sequence number
//!    (unique per key because sequence numbers never repeat under one key);
//! 4. seal with nonce = salt || IV and AAD = SPI || seq (SPI || seq_hi || seq with ESN,
//!    RFC 4106 section 5), append the ICV.

use crate::buf::PacketBuf;
use crate::replay::{ReplayError, ReplayWindow};
use crate::wire::esp::{self, EspPacket, EspRepr};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use std::sync::atomic::{AtomicU64, Ordering};
use zeroize::Zeroizing;

/// Salt length appended to the key in the `ip xfrm` layout (RFC 4106 section 8.1, RFC 7634 section 2).
pub const SALT_LEN: usize = 4;

/// An AEAD transform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cipher {
    /// AES-128-GCM, 16-octet ICV (RFC 4106).
    Aes128Gcm,
    /// AES-256-GCM, 16-octet ICV (RFC 4106).
    Aes256Gcm,
    /// ChaCha20-Poly1305 (RFC 7634).
    ChaCha20Poly1305,
}

impl Cipher {
    /// Every supported cipher.
    pub const ALL: [Cipher; 3] = [
        Cipher::Aes128Gcm,
        Cipher::Aes256Gcm,
        Cipher::ChaCha20Poly1305,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Cipher::Aes128Gcm => "aes-128-gcm",
            Cipher::Aes256Gcm => "aes-256-gcm",
            Cipher::ChaCha20Poly1305 => "chacha20-poly1305",
        }
    }

    /// Parse a configuration name.
    pub fn from_name(s: &str) -> Option<Cipher> {
        Cipher::ALL.into_iter().find(|c| c.name() == s)
    }

    /// Key length without the salt.
    pub fn key_len(self) -> usize {
        match self {
            Cipher::Aes128Gcm => 16,
            Cipher::Aes256Gcm | Cipher::ChaCha20Poly1305 => 32,
        }
    }

    fn ring_alg(self) -> &'static aead::Algorithm {
        match self {
            Cipher::Aes128Gcm => &aead::AES_128_GCM,
            Cipher::Aes256Gcm => &aead::AES_256_GCM,
            Cipher::ChaCha20Poly1305 => &aead::CHACHA20_POLY1305,
        }
    }
}

/// Why key material was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not hex.
    #[error("not a hex string (expected 0x followed by {expected} hex digits)")]
    NotHex {
        /// Hex digits expected.
        expected: usize,
    },
    /// Wrong length.
    #[error(
        "{got} bytes, but {cipher} needs {expected} (a {key}-byte key followed by a 4-byte salt)"
    )]
    Length {
        /// Bytes found.
        got: usize,
        /// Bytes needed.
        expected: usize,
        /// Key bytes without salt.
        key: usize,
        /// Cipher name.
        cipher: &'static str,
    },
}

/// Key material in the Linux `ip xfrm` layout: key bytes followed by a 4-byte salt. Zeroized on
/// drop; `Debug` never prints it.
#[derive(Clone)]
pub struct KeyMaterial {
    cipher: Cipher,
    bytes: Zeroizing<Vec<u8>>,
}

impl KeyMaterial {
    /// Key and salt from raw bytes.
    pub fn new(cipher: Cipher, bytes: &[u8]) -> Result<Self, KeyError> {
        let expected = cipher.key_len() + SALT_LEN;
        if bytes.len() != expected {
            return Err(KeyError::Length {
                got: bytes.len(),
                expected,
                key: cipher.key_len(),
                cipher: cipher.name(),
            });
        }
        Ok(KeyMaterial {
            cipher,
            bytes: Zeroizing::new(bytes.to_vec()),
        })
    }

    /// Parse `0x`-prefixed (or bare) hex, whitespace ignored.
    pub fn from_hex(cipher: Cipher, s: &str) -> Result<Self, KeyError> {
        let expected = 2 * (cipher.key_len() + SALT_LEN);
        let s = s.trim();
        let s = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        let digits: Zeroizing<Vec<u8>> =
            Zeroizing::new(s.bytes().filter(|b| !b.is_ascii_whitespace()).collect());
        if digits.len() % 2 != 0 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(KeyError::NotHex { expected });
        }
        let mut raw = Zeroizing::new(Vec::with_capacity(digits.len() / 2));
        for pair in digits.chunks_exact(2) {
            let hi = (pair[0] as char).to_digit(16).unwrap_or(0) as u8;
            let lo = (pair[1] as char).to_digit(16).unwrap_or(0) as u8;
            raw.push(hi << 4 | lo);
        }
        KeyMaterial::new(cipher, &raw)
    }

    /// The cipher this key is for.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// `0x` and lowercase hex of key || salt (the `ip xfrm` and Wireshark layout).
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(2 + 2 * self.bytes.len()));
        s.push_str("0x");
        for b in self.bytes.iter() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// First 8 bytes of SHA-256(key || salt), hex: identifies a key without revealing it.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.bytes);
        d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    fn split(&self) -> (&[u8], [u8; SALT_LEN]) {
        let k = self.cipher.key_len();
        let salt = self.bytes[k..].try_into().expect("length checked in new");
        (&self.bytes[..k], salt)
    }
}

impl std::fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyMaterial({}, <redacted>)", self.cipher.name())
    }
}

/// A keyed AEAD with its salt: nonce = salt || explicit IV.
pub struct Aead {
    key: LessSafeKey,
    salt: [u8; SALT_LEN],
}

impl Aead {
    /// Key an AEAD from key material.
    pub fn new(km: &KeyMaterial) -> Self {
        let (key, salt) = km.split();
        let unbound = UnboundKey::new(km.cipher.ring_alg(), key).expect("key length checked");
        Aead {
            key: LessSafeKey::new(unbound),
            salt,
        }
    }

    fn nonce(&self, iv: [u8; esp::IV_LEN]) -> Nonce {
        let mut n = [0u8; 12];
        n[..SALT_LEN].copy_from_slice(&self.salt);
        n[SALT_LEN..].copy_from_slice(&iv);
        Nonce::assume_unique_for_key(n)
    }

    /// Encrypt `in_out` in place and return the 16-byte ICV.
    pub fn seal(&self, iv: [u8; esp::IV_LEN], aad: &[u8], in_out: &mut [u8]) -> [u8; 16] {
        let tag = self
            .key
            .seal_in_place_separate_tag(self.nonce(iv), Aad::from(aad), in_out)
            .expect("ESP packets are far below the AEAD length limit");
        tag.as_ref().try_into().expect("16-byte tag")
    }

    /// Verify and decrypt `in_out` (ciphertext followed by the ICV) in place; returns the length
    /// of the plaintext.
    pub fn open(
        &self,
        iv: [u8; esp::IV_LEN],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<usize, BadIcv> {
        self.key
            .open_in_place(self.nonce(iv), Aad::from(aad), in_out)
            .map(|p| p.len())
            .map_err(|_| BadIcv)
    }
}

/// The ICV did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadIcv;

/// The AAD of an ESP packet: SPI || seq, or SPI || seq_hi || seq with ESN (RFC 4106 section 5).
fn aad(spi: u32, seq: u64, esn: bool, out: &mut [u8; 12]) -> usize {
    out[..4].copy_from_slice(&spi.to_be_bytes());
    if esn {
        out[4..8].copy_from_slice(&((seq >> 32) as u32).to_be_bytes());
        out[8..12].copy_from_slice(&(seq as u32).to_be_bytes());
        12
    } else {
        out[4..8].copy_from_slice(&(seq as u32).to_be_bytes());
        8
    }
}

/// Why an SA refused a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EspError {
    /// Too short, misaligned, or no room in the buffer.
    Malformed,
    /// Rejected by the replay window.
    Replay(ReplayError),
    /// The ICV did not verify.
    BadIcv,
    /// Padding bytes are not 1, 2, 3, ... (RFC 4303 section 2.4).
    BadPadding,
    /// The sequence number space is used up; the SA must be replaced (RFC 4303 section 3.3.3).
    SeqExhausted,
    /// The next sequence number is beyond the reservation the edge persisted; sending it could
    /// repeat a nonce after a crash, so the packet waits for a new reservation (dropped).
    SeqUnreserved,
}

/// An outbound SA (Linux: `xfrm_state` of direction out).
pub struct OutboundSa {
    spi: u32,
    aead: Aead,
    cipher: Cipher,
    esn: bool,
    fingerprint: String,
    /// Next sequence number to send (64-bit; only the low 32 bits travel). Taken with one
    /// atomic compare-and-swap per packet (wireguard-go's send nonce is one atomic add), so
    /// the TX thread, a hub's relay on the RX thread and `espip show` share the SA without a
    /// lock.
    next_seq: AtomicU64,
    /// Highest sequence number the edge has reserved on stable storage; published by the
    /// control side after the reservation is durable.
    limit: AtomicU64,
}

impl OutboundSa {
    /// An SA sending with `spi`, starting at sequence number 1.
    pub fn new(spi: u32, key: &KeyMaterial, esn: bool) -> Self {
        OutboundSa {
            spi,
            aead: Aead::new(key),
            cipher: key.cipher(),
            esn,
            fingerprint: key.fingerprint(),
            next_seq: AtomicU64::new(1),
            limit: AtomicU64::new(u64::MAX),
        }
    }

    /// The highest sequence number that may be sent (a reservation persisted by the edge so
    /// that a restart never repeats a sequence number, and so a nonce, under this key).
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Allow sending up to `limit` (after the reservation is on stable storage).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    /// A short fingerprint of the key (first 8 bytes of SHA-256 over key || salt, hex): state
    /// saved for one key is never applied to another.
    pub fn key_fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// Whether 64-bit extended sequence numbers are on.
    pub fn esn(&self) -> bool {
        self.esn
    }

    /// The next sequence number that will be sent.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// Continue from `seq` (for a restarted sender that persisted its high-water mark; tests).
    pub fn set_next_seq(&self, seq: u64) {
        self.next_seq.store(seq.max(1), Ordering::Relaxed);
    }

    /// Take the next sequence number: one compare-and-swap, never past the end of the space
    /// (2^32 - 1 without ESN) or the persisted reservation. A refused number is not consumed.
    fn take_seq(&self) -> Result<u64, EspError> {
        let end = if self.esn {
            u64::MAX
        } else {
            u64::from(u32::MAX)
        };
        let reserved = self.limit.load(Ordering::Acquire);
        let mut why = EspError::SeqExhausted;
        self.next_seq
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |seq| {
                if seq > end || seq == 0 {
                    why = EspError::SeqExhausted;
                    None
                } else if seq > reserved {
                    why = EspError::SeqUnreserved;
                    None
                } else {
                    Some(seq.wrapping_add(1))
                }
            })
            .map_err(|_| why)
    }

    /// Wrap the inner packet in `buf` in ESP, in place. `next_header` is 4 (IPv4) or 41 (IPv6).
    pub fn encapsulate(&self, buf: &mut PacketBuf, next_header: u8) -> Result<u64, EspError> {
        if buf.headroom() < esp::field::PAYLOAD
            || buf.tailroom() < esp::ALIGN - 1 + esp::TRAILER_LEN + esp::ICV_LEN
        {
            return Err(EspError::Malformed);
        }
        let seq = self.take_seq()?;
        let pad = esp::pad_len(buf.len());
        let trailer = buf
            .push_back(pad + esp::TRAILER_LEN)
            .ok_or(EspError::Malformed)?;
        for (i, b) in trailer[..pad].iter_mut().enumerate() {
            *b = (i + 1) as u8;
        }
        trailer[pad] = pad as u8;
        trailer[pad + 1] = next_header;
        let repr = EspRepr {
            spi: self.spi,
            seq: seq as u32,
            iv: seq.to_be_bytes(),
        };
        repr.emit(
            buf.push_front(repr.buffer_len())
                .ok_or(EspError::Malformed)?,
        );
        self.seal_in_place(buf, seq, repr.iv);
        Ok(seq)
    }

    fn seal_in_place(&self, buf: &mut PacketBuf, seq: u64, iv: [u8; esp::IV_LEN]) {
        let mut aad_buf = [0u8; 12];
        let n = aad(self.spi, seq, self.esn, &mut aad_buf);
        let tag = self.aead.seal(
            iv,
            &aad_buf[..n],
            &mut buf.as_mut_slice()[esp::field::PAYLOAD..],
        );
        if let Some(t) = buf.push_back(esp::ICV_LEN) {
            t.copy_from_slice(&tag);
        }
    }

    /// Seal an already framed plaintext (payload, padding, pad length, next header) with an
    /// explicit sequence number and IV, returning header || ciphertext || ICV. For test vectors
    /// and tools that must reproduce a given packet; the data path uses [`encapsulate`].
    ///
    /// [`encapsulate`]: OutboundSa::encapsulate
    pub fn seal_with(&self, seq: u64, iv: [u8; esp::IV_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut buf = PacketBuf::from_slice(plaintext);
        let repr = EspRepr {
            spi: self.spi,
            seq: seq as u32,
            iv,
        };
        repr.emit(buf.push_front(repr.buffer_len()).expect("headroom"));
        self.seal_in_place(&mut buf, seq, iv);
        buf.as_slice().to_vec()
    }
}

/// A packet an inbound SA opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    /// The full (ESN-inferred) sequence number.
    pub seq: u64,
    /// The Next Header of the trailer.
    pub next_header: u8,
}

/// An inbound SA (Linux: `xfrm_state` of direction in) with its replay window.
pub struct InboundSa {
    spi: u32,
    aead: Aead,
    cipher: Cipher,
    esn: bool,
    replay: ReplayWindow,
}

impl InboundSa {
    /// An SA accepting `spi` with a replay window of `window` packets (0 disables it).
    pub fn new(spi: u32, key: &KeyMaterial, esn: bool, window: u32) -> Self {
        InboundSa {
            spi,
            aead: Aead::new(key),
            cipher: key.cipher(),
            esn,
            replay: ReplayWindow::new(window),
        }
    }

    /// The SPI.
    pub fn spi(&self) -> u32 {
        self.spi
    }

    /// The cipher.
    pub fn cipher(&self) -> Cipher {
        self.cipher
    }

    /// The replay window state.
    pub fn replay(&self) -> &ReplayWindow {
        &self.replay
    }

    /// Verify, decrypt and strip the ESP packet in `buf` (outer IP header already removed),
    /// leaving the inner packet (plus any TFC padding) in `buf`.
    ///
    /// 1. parse the header; 2. infer the 64-bit sequence number; 3. replay check;
    /// 4. open (ICV); 5. advance the window; 6. check and strip the trailer.
    pub fn decapsulate(&mut self, buf: &mut PacketBuf) -> Result<Opened, EspError> {
        let repr = {
            let p = EspPacket::new_checked(buf.as_slice()).map_err(|_| EspError::Malformed)?;
            EspRepr::parse(&p)
        };
        let seq = self
            .replay
            .infer_esn(repr.seq, self.esn)
            .ok_or(EspError::Replay(ReplayError::TooOld))?;
        self.replay.check(seq).map_err(EspError::Replay)?;
        let mut aad_buf = [0u8; 12];
        let n = aad(self.spi, seq, self.esn, &mut aad_buf);
        let plain_len = self
            .aead
            .open(
                repr.iv,
                &aad_buf[..n],
                &mut buf.as_mut_slice()[esp::field::PAYLOAD..],
            )
            .map_err(|_| EspError::BadIcv)?;
        self.replay.advance(seq);
        buf.pull_front(esp::field::PAYLOAD)
            .ok_or(EspError::Malformed)?;
        buf.truncate(plain_len);
        let plain = buf.as_slice();
        let len = plain.len();
        let next_header = plain[len - 1];
        let pad = usize::from(plain[len - 2]);
        if pad + esp::TRAILER_LEN > len {
            return Err(EspError::BadPadding);
        }
        let pad_start = len - esp::TRAILER_LEN - pad;
        if plain[pad_start..len - esp::TRAILER_LEN]
            .iter()
            .enumerate()
            .any(|(i, b)| usize::from(*b) != i + 1)
        {
            return Err(EspError::BadPadding);
        }
        buf.truncate(pad_start);
        Ok(Opened { seq, next_header })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: Cipher) -> KeyMaterial {
        let bytes: Vec<u8> = (0..(c.key_len() + SALT_LEN) as u8).collect();
        KeyMaterial::new(c, &bytes).unwrap()
    }

    #[test]
    fn round_trip_every_cipher_and_length() {
        for c in Cipher::ALL {
            for esn in [false, true] {
                let tx = OutboundSa::new(0x1001, &key(c), esn);
                let mut rx = InboundSa::new(0x1001, &key(c), esn, 64);
                for len in [0usize, 1, 2, 3, 4, 5, 20, 1400] {
                    let inner: Vec<u8> = (0..len).map(|i| i as u8).collect();
                    let mut b = PacketBuf::from_slice(&inner);
                    let seq = tx.encapsulate(&mut b, 4).unwrap();
                    assert_eq!(b.len() % 4, 0);
                    assert_eq!(b.len(), 16 + len + esp::pad_len(len) + 2 + 16);
                    let opened = rx.decapsulate(&mut b).unwrap();
                    assert_eq!(
                        opened,
                        Opened {
                            seq,
                            next_header: 4
                        }
                    );
                    assert_eq!(b.as_slice(), &inner[..], "{c:?} esn={esn} len={len}");
                }
            }
        }
    }

    #[test]
    fn replay_and_tamper_are_refused_and_do_not_advance() {
        let c = Cipher::Aes128Gcm;
        let tx = OutboundSa::new(7, &key(c), false);
        let mut rx = InboundSa::new(7, &key(c), false, 32);
        let mut b = PacketBuf::from_slice(&[0x45; 40]);
        tx.encapsulate(&mut b, 4).unwrap();
        let wire = b.as_slice().to_vec();
        let mut tampered = wire.clone();
        tampered[20] ^= 1;
        let mut t = PacketBuf::from_slice(&tampered);
        assert_eq!(rx.decapsulate(&mut t), Err(EspError::BadIcv));
        assert_eq!(
            rx.replay().top(),
            0,
            "a forged packet must not move the window"
        );
        let mut ok = PacketBuf::from_slice(&wire);
        rx.decapsulate(&mut ok).unwrap();
        let mut again = PacketBuf::from_slice(&wire);
        assert_eq!(
            rx.decapsulate(&mut again),
            Err(EspError::Replay(ReplayError::Duplicate))
        );
    }

    #[test]
    fn sequence_exhaustion_without_esn() {
        let c = Cipher::Aes128Gcm;
        let tx = OutboundSa::new(7, &key(c), false);
        tx.set_next_seq(u64::from(u32::MAX));
        let mut b = PacketBuf::from_slice(&[0x45; 20]);
        assert_eq!(tx.encapsulate(&mut b, 4), Ok(u64::from(u32::MAX)));
        let mut b = PacketBuf::from_slice(&[0x45; 20]);
        assert_eq!(tx.encapsulate(&mut b, 4), Err(EspError::SeqExhausted));
        let esn = OutboundSa::new(7, &key(c), true);
        esn.set_next_seq(u64::from(u32::MAX));
        esn.encapsulate(&mut PacketBuf::from_slice(&[0x45; 20]), 4)
            .unwrap();
        assert_eq!(esn.next_seq(), 1 << 32, "ESN carries into seq_hi");
    }

    #[test]
    fn the_reservation_limit_stops_sending() {
        let c = Cipher::Aes128Gcm;
        let tx = OutboundSa::new(7, &key(c), false);
        tx.set_limit(2);
        for want in [
            Ok(1),
            Ok(2),
            Err(EspError::SeqUnreserved),
            Err(EspError::SeqUnreserved),
        ] {
            let mut b = PacketBuf::from_slice(&[0x45; 20]);
            assert_eq!(tx.encapsulate(&mut b, 4), want);
        }
        tx.set_limit(3);
        assert_eq!(
            tx.encapsulate(&mut PacketBuf::from_slice(&[0x45; 20]), 4),
            Ok(3),
            "no number skipped or reused"
        );
        assert_eq!(tx.key_fingerprint().len(), 16);
        assert_ne!(
            tx.key_fingerprint(),
            OutboundSa::new(7, &KeyMaterial::new(c, &[9; 20]).unwrap(), false).key_fingerprint()
        );
    }

    #[test]
    fn key_parsing_errors_are_specific() {
        assert!(matches!(
            KeyMaterial::from_hex(Cipher::Aes128Gcm, "0x1234"),
            Err(KeyError::Length {
                got: 2,
                expected: 20,
                ..
            })
        ));
        assert!(matches!(
            KeyMaterial::from_hex(Cipher::Aes128Gcm, "0xzz"),
            Err(KeyError::NotHex { expected: 40 })
        ));
        let k = KeyMaterial::new(Cipher::ChaCha20Poly1305, &[0x5a; 36]).unwrap();
        assert_eq!(k.to_hex().len(), 2 + 72);
        assert!(!format!("{k:?}").contains(&k.to_hex()[2..10]));
    }
}

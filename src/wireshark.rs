//! Wireshark's `esp_sa` UAT table (Preferences > Protocols > ESP > ESP SAs), so that a capture
//! of espip's traffic decrypts in Wireshark and tshark.
//!
//! Field order: protocol, source, destination, SPI, encryption, key, authentication, auth key.

use crate::sa::{Cipher, KeyMaterial};
use std::net::IpAddr;

/// Wireshark's name of the encryption algorithm, or `None` when the installed Wireshark
/// (tshark 4.0, Debian 12) has no ESP entry for it (ChaCha20-Poly1305).
pub fn encryption_name(c: Cipher) -> Option<&'static str> {
    match c {
        Cipher::Aes128Gcm | Cipher::Aes256Gcm => Some("AES-GCM with 16 octet ICV [RFC4106]"),
        Cipher::ChaCha20Poly1305 => None,
    }
}

/// One `esp_sa` line for the SA carrying packets from `src` to `dst` with `spi`.
pub fn esp_sa_line(src: IpAddr, dst: IpAddr, spi: u32, key: &KeyMaterial) -> Option<String> {
    let enc = encryption_name(key.cipher())?;
    let proto = if src.is_ipv4() { "IPv4" } else { "IPv6" };
    Some(format!(
        "\"{proto}\",\"{src}\",\"{dst}\",\"{spi:#010x}\",\"{enc}\",\"{}\",\"NULL\",\"\"",
        key.to_hex().as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_layout() {
        let k =
            KeyMaterial::from_hex(Cipher::Aes128Gcm, &format!("0x{}", "ab".repeat(20))).unwrap();
        let l = esp_sa_line(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            0x1001,
            &k,
        )
        .unwrap();
        assert_eq!(
            l,
            format!("\"IPv4\",\"192.0.2.1\",\"192.0.2.2\",\"0x00001001\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x{}\",\"NULL\",\"\"", "ab".repeat(20))
        );
        let c = KeyMaterial::new(Cipher::ChaCha20Poly1305, &[7; 36]).unwrap();
        assert!(esp_sa_line(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            1,
            &c
        )
        .is_none());
    }
}

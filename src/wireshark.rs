//! Wireshark's `esp_sa` UAT table (Preferences > Protocols > ESP > ESP SAs), so that a capture
//! of espip's traffic decrypts in Wireshark and tshark.
//!
//! Field order: protocol, source, destination, SPI, encryption, key, authentication, auth key.

use crate::sa::{Cipher, KeyMaterial};
use std::net::IpAddr;
use zeroize::Zeroizing;

/// Wireshark's name of the encryption algorithm, or `None` when the installed Wireshark
/// (tshark 4.0, Debian 12) has no ESP entry for it (ChaCha20-Poly1305).
pub fn encryption_name(c: Cipher) -> Option<&'static str> {
    match c {
        Cipher::Aes128Gcm | Cipher::Aes256Gcm => Some("AES-GCM with 16 octet ICV [RFC4106]"),
        Cipher::ChaCha20Poly1305 => None,
    }
}

/// One `esp_sa` line for the SA carrying packets from `src` to `dst` with `spi`.
pub fn esp_sa_line(
    src: IpAddr,
    dst: IpAddr,
    spi: u32,
    key: &KeyMaterial,
) -> Option<Zeroizing<String>> {
    let enc = encryption_name(key.cipher())?;
    let proto = if src.is_ipv4() { "IPv4" } else { "IPv6" };
    let hex = key.to_hex();
    let mut line = Zeroizing::new(String::with_capacity(160 + hex.len()));
    line.push_str(&format!(
        "\"{proto}\",\"{src}\",\"{dst}\",\"{spi:#010x}\",\"{enc}\",\""
    ));
    line.push_str(&hex);
    line.push_str("\",\"NULL\",\"\"");
    Some(line)
}

/// Wireshark's name of an IKEv2 encryption algorithm (`ikev2_decryption_table`), or `None`
/// when tshark 4.0 has none for it.
pub fn ikev2_encryption_name(c: Cipher) -> Option<&'static str> {
    match c {
        Cipher::Aes128Gcm => Some("AES-GCM-128 with 16 octet ICV [RFC5282]"),
        Cipher::Aes256Gcm => Some("AES-GCM-256 with 16 octet ICV [RFC5282]"),
        Cipher::ChaCha20Poly1305 => None,
    }
}

/// One `ikev2_decryption_table` line: SPIi, SPIr, SK_ei, SK_er (unquoted hex: the table's
/// byte fields), the encryption algorithm, no integrity keys (AEAD).
pub fn ikev2_line(
    spi_i: u64,
    spi_r: u64,
    sk_ei: &KeyMaterial,
    sk_er: &KeyMaterial,
) -> Option<Zeroizing<String>> {
    let enc = ikev2_encryption_name(sk_ei.cipher())?;
    let (ei, er) = (sk_ei.to_hex(), sk_er.to_hex());
    let mut line = Zeroizing::new(String::with_capacity(200));
    line.push_str(&format!("{spi_i:016x},{spi_r:016x},"));
    line.push_str(&ei[2..]);
    line.push(',');
    line.push_str(&er[2..]);
    line.push_str(&format!(",\"{enc}\",,,\"NONE [RFC4306]\""));
    Some(line)
}

/// Check that `line` is an `ikev2_decryption_table` line as [`ikev2_line`] writes it.
pub fn check_ikev2_line(line: &str) -> Result<(), &'static str> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() != 8 {
        return Err("not 8 fields");
    }
    let hex =
        |s: &str, n: &[usize]| n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(f[0], &[16]) || !hex(f[1], &[16]) || !hex(f[2], &[40, 72]) || !hex(f[3], &[40, 72]) {
        return Err("SPIs or keys are not hex of the right length");
    }
    let known = [Cipher::Aes128Gcm, Cipher::Aes256Gcm]
        .iter()
        .filter_map(|c| ikev2_encryption_name(*c))
        .any(|n| f[4] == format!("\"{n}\""));
    if !known || !f[5].is_empty() || !f[6].is_empty() || f[7] != "\"NONE [RFC4306]\"" {
        return Err("unknown algorithm fields");
    }
    Ok(())
}

/// Check that `line` is an `esp_sa` line as [`esp_sa_line`] writes it, and nothing else: the
/// client prints and stores lines a daemon sent, so a line from anywhere else (a rogue
/// socket) must not carry shell syntax, control characters or extra fields.
pub fn check_line(line: &str) -> Result<(), &'static str> {
    let fields: Vec<&str> = line.split(',').collect();
    if fields.len() != 8 {
        return Err("not 8 fields");
    }
    let mut v = Vec::with_capacity(8);
    for f in &fields {
        let inner = f
            .strip_prefix('"')
            .and_then(|f| f.strip_suffix('"'))
            .ok_or("a field is not quoted")?;
        if inner.contains('"') {
            return Err("a quote inside a field");
        }
        v.push(inner);
    }
    let hex = |s: &str, max: usize| {
        s.strip_prefix("0x").is_some_and(|h| {
            !h.is_empty() && h.len() <= max && h.bytes().all(|b| b.is_ascii_hexdigit())
        })
    };
    let (proto, src, dst) = (v[0], v[1].parse::<IpAddr>(), v[2].parse::<IpAddr>());
    let addrs_ok = matches!(
        (proto, &src, &dst),
        ("IPv4", Ok(IpAddr::V4(_)), Ok(IpAddr::V4(_)))
            | ("IPv6", Ok(IpAddr::V6(_)), Ok(IpAddr::V6(_)))
    );
    if !addrs_ok {
        return Err("protocol or addresses");
    }
    if !hex(v[3], 8) {
        return Err("SPI");
    }
    if ![Cipher::Aes128Gcm, Cipher::Aes256Gcm]
        .iter()
        .any(|c| encryption_name(*c) == Some(v[4]))
    {
        return Err("encryption");
    }
    if !hex(v[5], 2 * (32 + crate::sa::SALT_LEN)) || v[6] != "NULL" || !v[7].is_empty() {
        return Err("key or authentication");
    }
    Ok(())
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
        check_line(&l).unwrap();
        assert_eq!(
            l.as_str(),
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

    #[test]
    fn lines_from_elsewhere_are_refused() {
        let good = format!("\"IPv4\",\"192.0.2.1\",\"192.0.2.2\",\"0x00001001\",\"AES-GCM with 16 octet ICV [RFC4106]\",\"0x{}\",\"NULL\",\"\"", "ab".repeat(20));
        check_line(&good).unwrap();
        for bad in [
            good.replace("192.0.2.1", "192.0.2.1'; id; '"),
            good.replace("NULL", "NULL\x1b[2J"),
            good.replace("0x00001001", "$(id)"),
            format!("{good},\"x\""),
            good.replace("IPv4", "IPv6"),
            good.replace("\"0xabab", "\"0xabab'"),
        ] {
            assert!(check_line(&bad).is_err(), "{bad}");
        }
    }
}

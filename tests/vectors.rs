//! ESP AEAD test vectors (tests/vectors/esp_aead.txt): draft-mcgrew-gcm-test-01 for AES-GCM,
//! and a scapy-made ChaCha20-Poly1305 packet with RFC 7634 appendix A's parameters.
//!
//! For each vector: the ICV verifies under the stated AAD; sealing the plaintext with espip's
//! own SA (which builds the AAD and nonce itself) reproduces the packet byte for byte; the
//! trailer is well formed; and where the window allows, the inbound SA opens the whole packet.

use espip::buf::PacketBuf;
use espip::sa::{Aead, Cipher, InboundSa, KeyMaterial, OutboundSa};
use espip::wire::esp;
use std::collections::HashMap;

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex: {s}");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap_or_else(|_| panic!("hex: {s}")))
        .collect()
}

fn vectors() -> Vec<HashMap<String, String>> {
    let text = include_str!("vectors/esp_aead.txt");
    let mut out = Vec::new();
    let mut cur = HashMap::new();
    for line in text.lines().chain(std::iter::once("")) {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if line.is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let (k, v) = line.split_once('=').expect("key = value");
        cur.insert(k.trim().to_string(), v.trim().to_string());
    }
    out
}

#[test]
fn all_vectors() {
    let vs = vectors();
    assert_eq!(vs.len(), 7, "every vector parsed");
    for v in vs {
        let name = &v["name"];
        let cipher = Cipher::from_name(&v["cipher"]).unwrap();
        let key = KeyMaterial::new(cipher, &unhex(&v["key"])).unwrap();
        let spi = u32::from_str_radix(&v["spi"], 16).unwrap();
        let seq = u64::from_str_radix(&v["seq"], 16).unwrap();
        let esn = v["esn"] == "true";
        let iv: [u8; 8] = unhex(&v["iv"]).try_into().unwrap();
        let aad = unhex(&v["aad"]);

        // The packet on the wire and the framed plaintext (payload, padding, trailer).
        let (packet, plaintext) = if let Some(ct) = v.get("ciphertext") {
            let mut sealed = unhex(ct);
            sealed.extend(unhex(&v["tag"]));
            let mut packet = Vec::new();
            packet.extend(spi.to_be_bytes());
            packet.extend((seq as u32).to_be_bytes());
            packet.extend(iv);
            packet.extend(&sealed);
            let n = Aead::new(&key)
                .open(iv, &aad, &mut sealed)
                .unwrap_or_else(|_| panic!("{name}: ICV must verify under the stated AAD"));
            sealed.truncate(n);
            if let Some(p) = v.get("plaintext") {
                assert_eq!(sealed, unhex(p), "{name}: plaintext");
            }
            (packet, sealed)
        } else {
            let inner = unhex(&v["inner"]);
            let pad = esp::pad_len(inner.len());
            let mut framed = inner.clone();
            framed.extend((1..=pad as u8).collect::<Vec<_>>());
            framed.extend([pad as u8, esp::NEXT_HEADER_IPV4]);
            (unhex(&v["packet"]), framed)
        };

        // espip builds the same AAD and nonce from (spi, seq, esn): byte-exact packet.
        let out = OutboundSa::new(spi, &key, esn);
        assert_eq!(
            out.seal_with(seq, iv, &plaintext),
            packet,
            "{name}: sealed packet"
        );

        // The trailer follows RFC 4303 section 2.4's default padding.
        let len = plaintext.len();
        let pad = usize::from(plaintext[len - 2]);
        assert!(pad + 2 <= len, "{name}: pad length");
        for (i, b) in plaintext[len - 2 - pad..len - 2].iter().enumerate() {
            assert_eq!(usize::from(*b), i + 1, "{name}: padding byte {i}");
        }

        // A fresh inbound SA can place sequence numbers of the first 2^32 only.
        if seq >> 32 == 0 {
            let mut rx = InboundSa::new(spi, &key, esn, 64);
            let mut buf = PacketBuf::from_slice(&packet);
            let opened = rx
                .decapsulate(&mut buf)
                .unwrap_or_else(|e| panic!("{name}: inbound SA refused the packet: {e:?}"));
            assert_eq!(opened.seq, seq);
            assert_eq!(
                opened.next_header,
                plaintext[len - 1],
                "{name}: next header"
            );
            assert_eq!(
                buf.as_slice(),
                &plaintext[..len - 2 - pad],
                "{name}: inner packet"
            );
        }
    }
}

#[test]
fn a_flipped_bit_anywhere_fails_the_icv() {
    let v = vectors()
        .into_iter()
        .find(|v| v.contains_key("packet"))
        .unwrap();
    let key = KeyMaterial::new(Cipher::ChaCha20Poly1305, &unhex(&v["key"])).unwrap();
    let packet = unhex(&v["packet"]);
    // Byte 4..8 is the sequence number (authenticated via the AAD), 8.. the IV and ciphertext.
    for i in 4..packet.len() {
        let mut p = packet.clone();
        p[i] ^= 0x01;
        let mut rx = InboundSa::new(0x0102_0304, &key, false, 0);
        let r = rx.decapsulate(&mut PacketBuf::from_slice(&p));
        assert!(r.is_err(), "byte {i} flipped but accepted");
    }
}

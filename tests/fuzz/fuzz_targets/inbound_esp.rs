//! The wire -> TUN ESP path: replay window, ICV, trailer, next header, inner parse, policy.
//! Records are either raw ESP bytes (anything an attacker can send) or plaintexts sealed with
//! the peer's real key (so the fuzzer also reaches everything after the ICV check), at a
//! sequence number the record chooses (to move the replay window around). Records go as bare
//! protocol 50 or as ESP in UDP (to the protocol-50 peer's SA or the UDP peer's), from the
//! peer's address or another one.
#![no_main]

#[path = "common.rs"]
mod common;

use common::*;
use espip::buf::PacketBuf;
use espip::datapath::Verdict;
use espip::sa::OutboundSa;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let esn = data.first().is_some_and(|b| b & 0x80 != 0);
    let (_, mut inb) = build(esn);
    let mut twin = OutboundSa::new(SPI_IN, &key(&KEY_IN), esn);
    twin.set_limit(u64::MAX);
    let mut twin_udp = OutboundSa::new(SPI_IN_UDP, &key(&KEY_IN), esn);
    twin_udp.set_limit(u64::MAX);
    let udp_peer: std::net::IpAddr = UDP_PEER.parse().unwrap();
    let esp_peer = ESP_PEER.parse().unwrap();
    for (i, (tag, bytes)) in records(data.get(1..).unwrap_or_default())
        .into_iter()
        .enumerate()
    {
        let mut buf = if tag & 1 == 0 {
            PacketBuf::from_slice(bytes)
        } else {
            // [seq u32][next header u8][plaintext...]
            if bytes.len() < 5 {
                continue;
            }
            let seq = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as u64;
            let t = if tag & 8 == 0 {
                &mut twin
            } else {
                &mut twin_udp
            };
            t.set_next_seq(seq.max(1));
            let mut p = PacketBuf::from_slice(&bytes[5..]);
            if t.encapsulate(&mut p, bytes[4]).is_err() {
                continue;
            }
            p
        };
        // Bare ESP or ESP in UDP; mostly from the matching peer's address, sometimes not.
        let proto = if tag & 4 == 0 { 50 } else { 17 };
        let src = match (tag & 2 == 0, proto) {
            (true, 50) => esp_peer,
            (true, _) => udp_peer,
            (false, _) => IPIP_PEER.parse().unwrap(),
        };
        let now = i as u64 * 1_000_000;
        let v = inb.process(&mut buf, src, proto, now);
        // The multipath peer's reorder stage: whatever it releases must be one of its packets.
        inb.release(now, 64, |d| {
            let s = inner_src(d).expect("released packets parse");
            assert!(
                matches!(s, std::net::IpAddr::V4(a) if a.octets()[..2] == [10, 6]),
                "released a packet from {s}"
            );
        });
        if v == Verdict::ToTun {
            // Policy: only the peer's allowed_ips get through, and only as a parsable packet.
            let s = inner_src(buf.as_slice()).expect("delivered packets parse");
            if proto == 50 {
                assert!(
                    (matches!(s, std::net::IpAddr::V4(a) if a.octets()[..3] == [10, 4, 2]))
                        || (matches!(s, std::net::IpAddr::V6(a) if a.segments()[..4] == [0xfd00, 0, 0, 0])),
                    "delivered a packet from {s}"
                );
                assert_eq!(
                    src, esp_peer,
                    "delivered a packet from the wrong outer source"
                );
            } else {
                assert!(
                    matches!(s, std::net::IpAddr::V4(a) if a.octets()[..2] == [10, 6]),
                    "delivered a packet from {s} in UDP"
                );
                assert_eq!(src, udp_peer, "delivered UDP from the wrong outer source");
            }
        }
    }
});

//! The TUN -> wire path: inner parse, routing, MTU / ICMP errors, ESP encapsulation. Whatever
//! leaves as ESP must decrypt, with the peer's key, to exactly the packet read from the TUN.
#![no_main]

#[path = "common.rs"]
mod common;

use common::*;
use espip::buf::PacketBuf;
use espip::datapath::{Verdict, Wire};
use espip::sa::InboundSa;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (out, _) = build(false);
    let mut peer = InboundSa::new(SPI_OUT, &key(&KEY_OUT), false, 64);
    let mut peer_udp = InboundSa::new(0x2001, &key(&KEY_OUT), false, 64);
    for (_, bytes) in records(data) {
        let mut buf = PacketBuf::from_slice(bytes);
        match out.process(&mut buf, 0) {
            Verdict::Send(Wire::Esp { .. }) => {
                let opened = peer.decapsulate(&mut buf).expect("our ESP decrypts");
                assert!(opened.next_header == 4 || opened.next_header == 41);
                assert!(
                    bytes.starts_with(buf.as_slice()),
                    "plaintext differs from the TUN packet"
                );
            }
            Verdict::Send(Wire::EspInUdp { dst, .. }) => {
                // ESP in UDP: the UDP peer's own SA, to its port, on one of its two paths.
                assert_eq!(dst.port(), 4500);
                assert!(
                    [UDP_PEER, UDP_PEER_PATH2].contains(&dst.ip().to_string().as_str()),
                    "ESP in UDP to {dst}, none of the peer's paths"
                );
                let opened = peer_udp
                    .decapsulate(&mut buf)
                    .expect("our ESP in UDP decrypts");
                assert!(opened.next_header == 4 || opened.next_header == 41);
                assert!(bytes.starts_with(buf.as_slice()), "plaintext differs");
            }
            Verdict::Send(w @ Wire::IpIp { .. }) => {
                assert!(w.protocol() == 4 || w.protocol() == 41);
                // Unchanged, cut to the inner packet's own length (bytes after it are dropped).
                assert!(bytes.starts_with(buf.as_slice()), "ipip changed the packet");
            }
            Verdict::ToTun => {
                // An ICMP error about the packet, from the tunnel's own address.
                assert!(inner_src(buf.as_slice()).is_some());
            }
            _ => {}
        }
    }
});

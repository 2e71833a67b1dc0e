//! The wire -> TUN IP-in-IP path (protocols 4 and 41) and the ESP/ipip dispatch.
#![no_main]

#[path = "common.rs"]
mod common;

use common::*;
use espip::buf::PacketBuf;
use espip::datapath::Verdict;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (_, mut inb) = build(false);
    for (tag, bytes) in records(data) {
        let proto = [4u8, 41, 50, 0][(tag & 3) as usize];
        let src = if tag & 4 == 0 { IPIP_PEER } else { ESP_PEER }
            .parse()
            .unwrap();
        let mut buf = PacketBuf::from_slice(bytes);
        if inb.process(&mut buf, src, proto, 0) == Verdict::ToTun {
            let s = inner_src(buf.as_slice()).expect("delivered packets parse");
            assert!(
                matches!(s, std::net::IpAddr::V4(a) if a.octets()[..2] == [10, 5]),
                "delivered a packet from {s} over ipip"
            );
        }
    }
});

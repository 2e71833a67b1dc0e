//! The same-LAN rewriting: any packet, both directions. A rewritten IPv4 header whose checksum
//! was valid must still be valid (RFC 1624 incremental update).
#![no_main]

use espip::nat::{NatMap, NatTable};
use libfuzzer_sys::fuzz_target;

fn header_ok(p: &[u8]) -> bool {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return false;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    ihl >= 20 && p.len() >= ihl && espip::wire::ip::checksum(&p[..ihl]) == 0
}

fuzz_target!(|data: &[u8]| {
    let table = NatTable::new(vec![NatMap {
        real: "10.0.0.0/24".parse().unwrap(),
        alias: "10.0.1.0/24".parse().unwrap(),
    }]);
    let Some((&dir, pkt)) = data.split_first() else {
        return;
    };
    let mut p = pkt.to_vec();
    let valid_before = header_ok(&p);
    let r = if dir & 1 == 0 {
        table.egress(&mut p)
    } else {
        table.ingress(&mut p)
    };
    if let Ok(true) = r {
        if valid_before {
            assert!(header_ok(&p), "a valid header checksum became invalid");
        }
        assert_eq!(p.len(), pkt.len());
    }
});

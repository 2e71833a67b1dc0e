//! TUN offloads: TSO and USO segmentation of whatever the TUN might hand over, and GRO of
//! the segments (TCP) and datagrams (UDP). Every segment must carry a valid checksum; merging
//! them back must give the original payload, in order.
#![no_main]

use espip::buf::{PacketBuf, MAX_PACKET};
use espip::gro;
use espip::gso::{segment_tcp, segment_tcp_from, segment_udp};
use espip::wire::ip::{fold, sum_words};
use libfuzzer_sys::fuzz_target;

fn tcp_ok(s: &[u8], ip: usize) -> bool {
    let sum = if s[0] >> 4 == 4 {
        sum_words(0, &s[12..20])
    } else {
        sum_words(0, &s[8..40])
    };
    fold(sum_words(sum + 6 + (s.len() - ip) as u32, &s[ip..])) == 0
}

/// Merge `segs` from the first as far as GRO accepts, in order; the merged packet must hold
/// the original's payload (`pkt` after the headers), in order.
fn merge_back(segs: &[&[u8]], pkt: &[u8], udp: bool) {
    let Some(fs) = gro::segment(segs[0]) else {
        return;
    };
    assert_eq!(fs.udp, udp);
    let (mut ls, mut total, mut k) = (fs, segs[0].len(), 1);
    while k < segs.len() {
        let Some(ns) = gro::segment(segs[k]) else {
            break;
        };
        if !gro::can_merge(segs[0], &fs, &ls, total, segs[k], &ns) {
            break;
        }
        total += ns.payload;
        ls = ns;
        k += 1;
    }
    let mut hdr = [0u8; gro::MAX_HEADERS];
    let v = gro::merged_headers(segs[0], &fs, total, false, &mut hdr);
    assert_eq!(usize::from(v.hdr_len), fs.hdr_len);
    let mut merged = hdr[..fs.hdr_len].to_vec();
    for s in &segs[..k] {
        merged.extend_from_slice(&s[fs.hdr_len..]);
    }
    assert_eq!(merged.len(), total);
    let h = fs.hdr_len;
    assert_eq!(&merged[h..], &pkt[h..h + (total - h)], "payload order");
}

fuzz_target!(|data: &[u8]| {
    let Some((size, pkt)) = data.split_first_chunk::<2>() else {
        return;
    };
    let gso_size = usize::from(u16::from_le_bytes(*size) % 4096);
    let mut out: Vec<PacketBuf> = (0..16).map(|_| PacketBuf::new(MAX_PACKET)).collect();
    // USO: every datagram carries a valid UDP checksum and its own length.
    if let Ok(n) = segment_udp(pkt, gso_size, &mut out) {
        for b in &out[..n] {
            let s = b.as_slice();
            let (ip, sum) = if s[0] >> 4 == 4 {
                (usize::from(s[0] & 0x0f) * 4, sum_words(0, &s[12..20]))
            } else {
                (40, sum_words(0, &s[8..40]))
            };
            assert_eq!(
                usize::from(u16::from_be_bytes([s[ip + 4], s[ip + 5]])),
                s.len() - ip
            );
            assert_eq!(
                fold(sum_words(sum + 17 + (s.len() - ip) as u32, &s[ip..])),
                0
            );
        }
        // UDP GRO takes them back (IPv4 options are never merged: a 20-byte header only).
        if n > 0 && (pkt[0] >> 4 == 6 || pkt[0] & 0x0f == 5) {
            let segs: Vec<&[u8]> = out[..n].iter().map(|b| b.as_slice()).collect();
            merge_back(&segs, pkt, true);
        }
    }
    let Ok(n) = segment_tcp(pkt, gso_size, &mut out) else {
        return;
    };
    let ip = if pkt[0] >> 4 == 4 {
        usize::from(pkt[0] & 0x0f) * 4
    } else {
        40
    };
    for b in &out[..n] {
        assert!(tcp_ok(b.as_slice(), ip), "segment with a bad TCP checksum");
    }
    // Cut in turns of 3 (a GRO-merged IP-in-IP packet of more pieces than the buffers at
    // hand): the same segments.
    let mut part: Vec<PacketBuf> = (0..3).map(|_| PacketBuf::new(MAX_PACKET)).collect();
    let mut first = 0;
    while first < n {
        let (k, total) = segment_tcp_from(pkt, gso_size, first, &mut part).expect("cut in turns");
        assert_eq!(total, n);
        for j in 0..k {
            assert_eq!(part[j].as_slice(), out[first + j].as_slice());
        }
        first += k;
    }
    // Merge back what GRO accepts, in order.
    let segs: Vec<&[u8]> = out[..n].iter().map(|b| b.as_slice()).collect();
    merge_back(&segs, pkt, false);
});

//! Two data paths talking to each other in memory, with time passed in: every verdict and
//! drop counter of the core, without a kernel.

use espip::buf::{PacketBuf, MAX_PACKET};
use espip::datapath::{
    self, DropReason, EncapSpec, Inbound, Lifetime, Outbound, PeerSpec, Stats, TunnelSpec, Verdict,
    Wire,
};
use espip::sa::{Cipher, KeyMaterial};
use espip::wire::ip::{checksum, emit_ipv4_header, PROTO_ESP, PROTO_UDP};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

const A: &str = "192.0.2.1";
const B: &str = "192.0.2.2";

struct Host {
    out: Outbound,
    inb: Inbound,
    stats: Arc<Stats>,
}

fn key(c: Cipher, fill: u8) -> KeyMaterial {
    KeyMaterial::new(c, &vec![fill; c.key_len() + 4]).unwrap()
}

fn esp_pair(c: Cipher, esn: bool, window: u32) -> (Host, Host) {
    esp_pair_with(c, esn, window, Lifetime::default())
}

fn esp_pair_with(c: Cipher, esn: bool, window: u32, lifetime: Lifetime) -> (Host, Host) {
    esp_pair_over(c, esn, window, lifetime, None)
}

/// A pair whose ESP travels in UDP to `udp_port` (RFC 3948) when it is `Some`.
fn esp_pair_over(
    c: Cipher,
    esn: bool,
    window: u32,
    lifetime: Lifetime,
    udp_port: Option<u16>,
) -> (Host, Host) {
    let ab = key(c, 0x11);
    let ba = key(c, 0x22);
    let spec = |name: &str,
                endpoint: &str,
                allowed: &str,
                out: &KeyMaterial,
                inn: &KeyMaterial,
                so,
                si| PeerSpec {
        name: name.into(),
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec![allowed.parse().unwrap(), "fd00::5/128".parse().unwrap()]
            .into_iter()
            .filter(|p: &espip::prefix::Prefix| name == "b" || !p.addr().is_ipv6())
            .collect(),
        encap: EncapSpec::Esp {
            cipher: c,
            spi_out: so,
            key_out: out.clone(),
            spi_in: si,
            key_in: inn.clone(),
            replay_window: window,
            esn,
            lifetime,
            udp_port,
        },
        route: true,
        multipath: None,
        negotiated: None,
    };
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let (out, inb, stats) = datapath::build(
        &[spec("b", B, "10.4.2.5/32", &ab, &ba, 0x1001, 0x1002)],
        t,
        Default::default(),
    )
    .unwrap();
    let a = Host { out, inb, stats };
    let (out, inb, stats) = datapath::build(
        &[spec("a", A, "10.4.2.99/32", &ba, &ab, 0x1002, 0x1001)],
        t,
        Default::default(),
    )
    .unwrap();
    (a, Host { out, inb, stats })
}

fn ipv4(src: [u8; 4], dst: [u8; 4], len: usize, df: bool) -> Vec<u8> {
    let mut v = vec![0xabu8; len];
    emit_ipv4_header(&mut v, src.into(), dst.into(), 17, len as u16);
    if df {
        v[6] = 0x40;
        v[10..12].fill(0);
        let c = checksum(&v[..20]);
        v[10..12].copy_from_slice(&c.to_be_bytes());
    }
    v
}

fn ipv6(src: &str, dst: &str, payload: usize) -> Vec<u8> {
    let mut v = vec![0u8; 40 + payload];
    v[0] = 0x60;
    v[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    v[6] = 17;
    v[7] = 64;
    v[8..24].copy_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    v[24..40].copy_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    v
}

/// Send `inner` from `from` to `to`; returns the wire bytes and `to`'s verdict.
fn send(
    from: &mut Host,
    to: &mut Host,
    from_addr: &str,
    inner: &[u8],
    now: u64,
) -> (Vec<u8>, Verdict, Vec<u8>) {
    let mut b = PacketBuf::new(MAX_PACKET);
    b.reset();
    b.read_area()[..inner.len()].copy_from_slice(inner);
    b.set_len(inner.len());
    let v = from.out.process(&mut b, now);
    let Verdict::Send(w) = v else {
        panic!("outbound verdict {v:?}");
    };
    let protocol = w.protocol();
    let wire = b.as_slice().to_vec();
    let mut r = PacketBuf::from_slice(&wire);
    let v = to
        .inb
        .process(&mut r, from_addr.parse().unwrap(), protocol, now);
    (wire, v, r.as_slice().to_vec())
}

#[test]
fn both_directions_every_cipher_v4_and_v6() {
    for c in Cipher::ALL {
        for esn in [false, true] {
            let (mut a, mut b) = esp_pair(c, esn, 1024);
            for len in [20, 21, 100, 1400] {
                let p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], len, true);
                let (wire, v, got) = send(&mut a, &mut b, A, &p, 1);
                assert_eq!(v, Verdict::ToTun, "{c:?} {len}");
                assert_eq!(got, p);
                assert!(
                    !wire.windows(8).any(|w| w == &p[12..20]),
                    "addresses encrypted"
                );
                let q = ipv4([10, 4, 2, 5], [10, 4, 2, 99], len, false);
                let (_, v, got) = send(&mut b, &mut a, B, &q, 2);
                assert_eq!((v, got), (Verdict::ToTun, q));
            }
            let v6 = ipv6("fd00::99", "fd00::5", 64);
            // fd00::5 is routed to b on A; B accepts fd00::99? Not allowed: only 10.4.2.99.
            let (_, v, _) = send(&mut a, &mut b, A, &v6, 3);
            assert_eq!(v, Verdict::Drop(DropReason::NotAllowed));
            assert_eq!(b.stats.drops(DropReason::NotAllowed), 1);
        }
    }
}

#[test]
fn replay_reorder_tamper_spi_source() {
    let (a, mut b) = esp_pair(Cipher::Aes128Gcm, false, 64);
    let p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 60, false);
    let mut wires = Vec::new();
    for _ in 0..100 {
        let mut buf = PacketBuf::from_slice(&p);
        assert!(matches!(
            a.out.process(&mut buf, 0),
            Verdict::Send(Wire::Esp { .. })
        ));
        wires.push(buf.as_slice().to_vec());
    }
    let src: IpAddr = A.parse().unwrap();
    // Every verdict is tallied here; the counters must agree exactly at the end.
    let mut tally = std::collections::HashMap::<DropReason, u64>::new();
    let mut deliver_from = |b: &mut Host, w: &[u8], from: IpAddr| {
        let v = b
            .inb
            .process(&mut PacketBuf::from_slice(w), from, PROTO_ESP, 0);
        if let Verdict::Drop(r) = v {
            *tally.entry(r).or_default() += 1;
        }
        v
    };
    let mut deliver = |b: &mut Host, w: &[u8]| deliver_from(b, w, src);
    // Reordered inside the window: all accepted once.
    for i in [5usize, 1, 3, 2, 4, 0, 60, 40, 59] {
        assert_eq!(deliver(&mut b, &wires[i]), Verdict::ToTun, "seq {}", i + 1);
    }
    // Replayed.
    assert_eq!(
        deliver(&mut b, &wires[3]),
        Verdict::Drop(DropReason::Replay)
    );
    // Beyond the window: once seq 100 arrived, seq 11 is more than 64 behind.
    assert_eq!(deliver(&mut b, &wires[99]), Verdict::ToTun);
    assert_eq!(
        deliver(&mut b, &wires[10]),
        Verdict::Drop(DropReason::Replay)
    );
    // Tampered ciphertext, ICV, sequence number.
    for at in [20usize, wires[50].len() - 1, 6] {
        let mut w = wires[50].clone();
        w[at] ^= 0x80;
        assert_eq!(
            deliver(&mut b, &w),
            Verdict::Drop(DropReason::BadIcv),
            "byte {at}"
        );
    }
    // The untampered one still goes through: a forgery never moves the window.
    assert_eq!(deliver(&mut b, &wires[50]), Verdict::ToTun);
    // Unknown SPI.
    let mut w = wires[70].clone();
    w[3] ^= 0xff;
    assert_eq!(deliver(&mut b, &w), Verdict::Drop(DropReason::UnknownSpi));
    // Truncated at every length: always dropped, never delivered.
    for n in 0..wires[70].len() {
        assert!(
            matches!(deliver(&mut b, &wires[70][..n]), Verdict::Drop(_)),
            "truncated to {n}"
        );
    }
    assert_eq!(deliver(&mut b, &wires[70]), Verdict::ToTun);
    // Right SPI, wrong outer source.
    let v = deliver_from(&mut b, &wires[71], "192.0.2.66".parse().unwrap());
    assert_eq!(v, Verdict::Drop(DropReason::WrongSource));
    for r in DropReason::ALL {
        assert_eq!(
            b.stats.drops(r),
            tally.get(&r).copied().unwrap_or(0),
            "counter {}",
            r.name()
        );
    }
    assert_eq!(tally[&DropReason::Replay], 2);
    assert_eq!(tally[&DropReason::UnknownSpi], 1);
    assert_eq!(tally[&DropReason::WrongSource], 1);
    assert!(tally[&DropReason::Malformed] > 0 && tally[&DropReason::BadIcv] >= 3);
    let rx = b
        .out
        .peer_stats(0)
        .rx_packets
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(rx, 12, "9 reordered + seq 100 + seq 51 + seq 71");
}

#[test]
fn too_big_with_df_becomes_icmp_into_the_tun() {
    let (a, _) = esp_pair(Cipher::Aes128Gcm, false, 64);
    let mut b = PacketBuf::from_slice(&ipv4([10, 4, 2, 99], [10, 4, 2, 5], 1500, true));
    assert_eq!(a.out.process(&mut b, 0), Verdict::ToTun);
    let icmp = b.as_slice();
    assert_eq!((icmp[9], icmp[20], icmp[21]), (1, 3, 4), "ICMP frag needed");
    assert_eq!(u16::from_be_bytes([icmp[26], icmp[27]]), 1400);
    assert_eq!(
        &icmp[12..20],
        &[10, 4, 2, 5, 10, 4, 2, 99],
        "from the unreachable destination (never a local address) to the sender"
    );
    assert_eq!(a.stats.drops(DropReason::TooBig), 1);
    // Without DF: dropped, counted, no ICMP.
    let mut b = PacketBuf::from_slice(&ipv4([10, 4, 2, 99], [10, 4, 2, 5], 1500, false));
    assert_eq!(a.out.process(&mut b, 0), Verdict::Drop(DropReason::TooBig));
    assert_eq!(a.stats.drops(DropReason::TooBig), 2);
    // IPv6: packet too big.
    let mut b = PacketBuf::from_slice(&ipv6("fd00::99", "fd00::5", 1460));
    assert_eq!(a.out.process(&mut b, 0), Verdict::ToTun);
    assert_eq!(b.as_slice()[40], 2, "ICMPv6 packet too big");
}

#[test]
fn no_route_dummy_and_exhaustion() {
    let (a, mut b) = esp_pair(Cipher::ChaCha20Poly1305, false, 64);
    let mut p = PacketBuf::from_slice(&ipv4([10, 4, 2, 99], [10, 9, 9, 9], 60, false));
    assert_eq!(a.out.process(&mut p, 0), Verdict::Drop(DropReason::NoRoute));
    // A dummy packet (next header 59) is authenticated and discarded.
    let sa = espip::sa::OutboundSa::new(0x1001, &key(Cipher::ChaCha20Poly1305, 0x11), false);
    let mut d = PacketBuf::from_slice(&[0u8; 16]);
    sa.encapsulate(&mut d, 59).unwrap();
    let v = b.inb.process(&mut d, A.parse().unwrap(), PROTO_ESP, 0);
    assert_eq!(v, Verdict::Drop(DropReason::Dummy));
    // Sequence exhaustion: the SA stops sending.
    a.out.set_next_seq(0, u64::from(u32::MAX));
    let q = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 60, false);
    assert!(matches!(
        a.out.process(&mut PacketBuf::from_slice(&q), 0),
        Verdict::Send(_)
    ));
    assert_eq!(
        a.out.process(&mut PacketBuf::from_slice(&q), 0),
        Verdict::Drop(DropReason::SeqExhausted)
    );
    assert_eq!(a.stats.drops(DropReason::SeqExhausted), 1);
}

#[test]
fn ipip_both_ways_and_unknown_peer() {
    let spec = |endpoint: &str, allowed: &str| PeerSpec {
        name: "p".into(),
        endpoint: Some(endpoint.parse().unwrap()),
        allowed_ips: vec![allowed.parse().unwrap()],
        encap: EncapSpec::IpIp,
        route: true,
        multipath: None,
        negotiated: None,
    };
    let t = TunnelSpec {
        relay: false,
        mtu: 1480,
    };
    let (out, inb, stats) =
        datapath::build(&[spec(B, "10.4.2.5/32")], t, Default::default()).unwrap();
    let mut a = Host { out, inb, stats };
    let (out, inb, stats) =
        datapath::build(&[spec(A, "10.4.2.99/32")], t, Default::default()).unwrap();
    let mut b = Host { out, inb, stats };
    let p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 1480, true);
    let (wire, v, got) = send(&mut a, &mut b, A, &p, 0);
    assert_eq!(
        wire, p,
        "ipip sends the inner packet unchanged (the kernel adds the outer header)"
    );
    assert_eq!((v, got), (Verdict::ToTun, p.clone()));
    let v = b.inb.process(
        &mut PacketBuf::from_slice(&p),
        "192.0.2.9".parse().unwrap(),
        4,
        0,
    );
    assert_eq!(v, Verdict::Drop(DropReason::UnknownPeer));
    // Protocol 4 carrying an IPv6 packet is refused.
    let v = b.inb.process(
        &mut PacketBuf::from_slice(&ipv6("fd00::1", "fd00::2", 8)),
        A.parse().unwrap(),
        4,
        0,
    );
    assert_eq!(v, Verdict::Drop(DropReason::BadNextHeader));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..200),
        proto in prop_oneof![Just(50u8), Just(17u8), Just(4u8), Just(41u8), any::<u8>()],
        spi_known in any::<bool>(),
    ) {
        let (a, mut b) = esp_pair(Cipher::Aes128Gcm, true, 64);
        let mut bytes = bytes;
        if spi_known && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(&0x1001u32.to_be_bytes());
        }
        let v = b.inb.process(&mut PacketBuf::from_slice(&bytes), A.parse().unwrap(), proto, 0);
        prop_assert!(matches!(v, Verdict::Drop(_)));
        let _ = a.out.process(&mut PacketBuf::from_slice(&bytes), 0);
    }
}

#[test]
fn a_hub_relays_between_peers_only_when_forwarding() {
    let k = |b| key(Cipher::Aes128Gcm, b);
    let peer = |n: u8| PeerSpec {
        name: format!("c{n}"),
        endpoint: Some(IpAddr::V4(Ipv4Addr::new(172, 16, 0, n))),
        allowed_ips: vec![format!("192.168.0.{n}/32").parse().unwrap()],
        encap: EncapSpec::Esp {
            cipher: Cipher::Aes128Gcm,
            spi_out: 0x5000 + u32::from(n),
            key_out: k(n),
            spi_in: 0x6000 + u32::from(n),
            key_in: k(n + 100),
            replay_window: 64,
            esn: false,
            lifetime: Default::default(),
            udp_port: None,
        },
        route: true,
        multipath: None,
        negotiated: None,
    };
    for relay in [true, false] {
        let t = TunnelSpec { relay, mtu: 1400 };
        let (out, mut inb, stats) =
            datapath::build(&[peer(11), peer(12)], t, Default::default()).unwrap();
        // c11 -> c12, sealed with c11's key towards the hub.
        let c11 = espip::sa::OutboundSa::new(0x6000 + 11, &k(111), false);
        let inner = ipv4([192, 168, 0, 11], [192, 168, 0, 12], 60, false);
        let mut b = PacketBuf::from_slice(&inner);
        c11.encapsulate(&mut b, 4).unwrap();
        let v = inb.process(&mut b, "172.16.0.11".parse().unwrap(), PROTO_ESP, 0);
        if !relay {
            assert_eq!(v, Verdict::ToTun);
            continue;
        }
        assert_eq!(v, Verdict::Relay);
        assert_eq!(b.as_slice(), &inner[..]);
        let v = out.process(&mut b, 0);
        assert_eq!(
            v,
            Verdict::Send(Wire::Esp {
                dst: "172.16.0.12".parse().unwrap(),
                via: espip::datapath::Via::ROUTED,
            })
        );
        assert_eq!(stats.relayed.load(std::sync::atomic::Ordering::Relaxed), 1);
        // To the hub's own address (no peer's prefix): delivered locally.
        let mut c11b = PacketBuf::from_slice(&ipv4([192, 168, 0, 11], [192, 168, 0, 1], 60, false));
        c11.encapsulate(&mut c11b, 4).unwrap();
        assert_eq!(
            inb.process(&mut c11b, "172.16.0.11".parse().unwrap(), PROTO_ESP, 0),
            Verdict::ToTun
        );
    }
}

#[test]
fn lifetimes_stop_the_sas_in_both_directions() {
    let c = Cipher::Aes128Gcm;
    let p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, true);
    let expired = |h: &Host| h.stats.drops(DropReason::LifetimeExpired);
    let sec = 1_000_000_000;

    // Packets: three go, the fourth is refused by the sender; a receiver whose SA is used up
    // refuses before decrypting (even a packet it has not seen).
    let lt = Lifetime {
        packets: Some(3),
        ..Default::default()
    };
    let (mut a, mut b) = esp_pair_with(c, false, 64, lt);
    for _ in 0..3 {
        assert_eq!(send(&mut a, &mut b, A, &p, 0).1, Verdict::ToTun);
    }
    let mut buf = PacketBuf::from_slice(&p);
    assert_eq!(
        a.out.process(&mut buf, 0),
        Verdict::Drop(DropReason::LifetimeExpired)
    );
    assert_eq!(expired(&a), 1);
    let (mut fresh, _) = esp_pair(c, false, 64);
    fresh.out.set_next_seq(0, 10);
    let (_, v, _) = send(&mut fresh, &mut b, A, &p, 0);
    assert_eq!(v, Verdict::Drop(DropReason::LifetimeExpired));
    assert_eq!(expired(&b), 1);

    // Bytes: 100-byte packets under a 250-byte limit: two go.
    let lt = Lifetime {
        bytes: Some(250),
        ..Default::default()
    };
    let (mut a, mut b) = esp_pair_with(c, false, 64, lt);
    for _ in 0..2 {
        assert_eq!(send(&mut a, &mut b, A, &p, 0).1, Verdict::ToTun);
    }
    let mut buf = PacketBuf::from_slice(&p);
    assert_eq!(
        a.out.process(&mut buf, 0),
        Verdict::Drop(DropReason::LifetimeExpired)
    );

    // Seconds, on the data path's clock.
    let lt = Lifetime {
        seconds: Some(2),
        ..Default::default()
    };
    let (mut a, mut b) = esp_pair_with(c, false, 64, lt);
    assert_eq!(send(&mut a, &mut b, A, &p, 2 * sec - 1).1, Verdict::ToTun);
    let mut buf = PacketBuf::from_slice(&p);
    assert_eq!(
        a.out.process(&mut buf, 2 * sec),
        Verdict::Drop(DropReason::LifetimeExpired)
    );
}

/// ESP in UDP (RFC 3948): the same ESP packet, sent to the peer's port; the receiver takes it
/// only as UDP from that peer, and discards NAT-keepalives and non-ESP (IKE) datagrams with
/// their own counters.
#[test]
fn esp_in_udp_round_trip_keepalive_and_non_esp_marker() {
    for c in Cipher::ALL {
        let (a, mut b) = esp_pair_over(c, true, 64, Lifetime::default(), Some(4600));
        let p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 300, true);
        let mut buf = PacketBuf::from_slice(&p);
        let v = a.out.process(&mut buf, 0);
        assert_eq!(
            v,
            Verdict::Send(Wire::EspInUdp {
                dst: std::net::SocketAddr::new(B.parse().unwrap(), 4600),
                via: espip::datapath::Via::ROUTED,
            })
        );
        // The UDP payload is the ESP packet itself: SPI first (never 0), then sequence 1.
        let wire = buf.as_slice().to_vec();
        assert_eq!(&wire[..8], &[0, 0, 0x10, 0x01, 0, 0, 0, 1]);
        let from: IpAddr = A.parse().unwrap();
        let mut r = PacketBuf::from_slice(&wire);
        assert_eq!(b.inb.process(&mut r, from, PROTO_UDP, 0), Verdict::ToTun);
        assert_eq!(r.as_slice(), &p[..]);
        // The same SA's packet as bare protocol 50: not how this peer sends.
        let mut buf = PacketBuf::from_slice(&p);
        a.out.process(&mut buf, 0);
        let mut r = PacketBuf::from_slice(buf.as_slice());
        assert_eq!(
            b.inb.process(&mut r, from, PROTO_ESP, 0),
            Verdict::Drop(DropReason::WrongSource)
        );
        let mut r = PacketBuf::from_slice(&[0xff]);
        assert_eq!(
            b.inb.process(&mut r, from, PROTO_UDP, 0),
            Verdict::Drop(DropReason::NatKeepalive)
        );
        // An IKE message behind the non-ESP marker.
        let mut ike = vec![0u8; 4];
        ike.extend_from_slice(&[0x11; 28]);
        let mut r = PacketBuf::from_slice(&ike);
        assert_eq!(
            b.inb.process(&mut r, from, PROTO_UDP, 0),
            Verdict::Drop(DropReason::NonEsp)
        );
        // Three bytes are neither a keepalive nor a marker nor ESP.
        let mut r = PacketBuf::from_slice(&[1, 2, 3]);
        assert_eq!(
            b.inb.process(&mut r, from, PROTO_UDP, 0),
            Verdict::Drop(DropReason::Malformed)
        );
        for (reason, n) in [
            (DropReason::WrongSource, 1),
            (DropReason::NatKeepalive, 1),
            (DropReason::NonEsp, 1),
            (DropReason::Malformed, 1),
        ] {
            assert_eq!(b.stats.drops(reason), n, "{c:?} {reason:?}");
        }
        // A protocol-50 peer does not take UDP.
        let (a, mut b) = esp_pair(c, false, 64);
        let mut buf = PacketBuf::from_slice(&p);
        a.out.process(&mut buf, 0);
        let mut r = PacketBuf::from_slice(buf.as_slice());
        assert_eq!(
            b.inb.process(&mut r, from, PROTO_UDP, 0),
            Verdict::Drop(DropReason::WrongSource)
        );
    }
}

#[test]
fn esp_in_udp_costs_eight_bytes_of_mtu() {
    let esp = |udp_port| EncapSpec::Esp {
        cipher: Cipher::Aes128Gcm,
        spi_out: 1,
        key_out: key(Cipher::Aes128Gcm, 1),
        spi_in: 2,
        key_in: key(Cipher::Aes128Gcm, 2),
        replay_window: 64,
        esn: false,
        lifetime: Lifetime::default(),
        udp_port,
    };
    // 1500 - 20 - 8 (SPI, seq) - 8 (IV) - 16 (ICV) = 1448, 4-aligned, minus the 2-byte trailer.
    assert_eq!(datapath::inner_mtu(1500, &esp(None), false), 1446);
    // An IPv6 outer header is 20 bytes longer.
    assert_eq!(datapath::inner_mtu(1500, &esp(None), true), 1426);
    assert_eq!(datapath::inner_mtu(1500, &esp(Some(4500)), true), 1418);
    assert_eq!(datapath::inner_mtu(1500, &EncapSpec::IpIp, true), 1460);
    // 8 bytes of UDP: 1440 - 2.
    assert_eq!(datapath::inner_mtu(1500, &esp(Some(4500)), false), 1438);
    assert_eq!(datapath::inner_mtu(1500, &EncapSpec::IpIp, false), 1480);
}

/// NAT traversal: after an authenticated datagram from another source port, the peer's packets
/// go to that port; an unauthenticated one (bad ICV) moves nothing.
#[test]
fn esp_in_udp_follows_the_peer_port_of_authenticated_datagrams_only() {
    let (mut a, b) = esp_pair_over(
        Cipher::Aes128Gcm,
        false,
        64,
        Lifetime::default(),
        Some(4500),
    );
    let to_a = ipv4([10, 4, 2, 5], [10, 4, 2, 99], 100, true);
    let to_b = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, true);
    let from_b = |port| std::net::SocketAddr::new(B.parse().unwrap(), port);
    let port_of = |v: Verdict| match v {
        Verdict::Send(Wire::EspInUdp { dst, .. }) => dst.port(),
        v => panic!("{v:?}"),
    };
    assert_eq!(
        port_of(a.out.process(&mut PacketBuf::from_slice(&to_b), 0)),
        4500
    );
    // B's packet arrives from port 31000 (a NAT mapped B's 4500 there).
    let mut w = PacketBuf::from_slice(&to_a);
    b.out.process(&mut w, 0);
    let sealed = w.as_slice().to_vec();
    let mut r = PacketBuf::from_slice(&sealed);
    assert_eq!(a.inb.process_udp(&mut r, from_b(31000), 0), Verdict::ToTun);
    assert_eq!(
        port_of(a.out.process(&mut PacketBuf::from_slice(&to_b), 0)),
        31000
    );
    // A forged datagram from port 666: its ICV fails, the port stays.
    let mut forged = sealed.clone();
    forged[8] ^= 1;
    forged[4..8].copy_from_slice(&[0, 0, 0, 9]);
    let mut r = PacketBuf::from_slice(&forged);
    assert_eq!(
        a.inb.process_udp(&mut r, from_b(666), 0),
        Verdict::Drop(DropReason::BadIcv)
    );
    // A replay of the genuine datagram from port 777: refused before it can move the port.
    let mut r = PacketBuf::from_slice(&sealed);
    assert_eq!(
        a.inb.process_udp(&mut r, from_b(777), 0),
        Verdict::Drop(DropReason::Replay)
    );
    assert_eq!(
        port_of(a.out.process(&mut PacketBuf::from_slice(&to_b), 0)),
        31000
    );
}

/// A reload: the next generation built from the old one keeps an unchanged SA (its sequence
/// numbers continue, its replay window is taken over, so an old packet stays a replay), makes
/// a new SA for new keys, and drops a removed peer's routes.
#[test]
fn a_reload_keeps_unchanged_sas_and_replaces_changed_ones() {
    let (mut a, mut b) = esp_pair(Cipher::Aes128Gcm, true, 64);
    let pkt = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, false);
    let mut sent = Vec::new();
    for t in 0..3 {
        let (wire, v, _) = send(&mut a, &mut b, A, &pkt, t);
        assert_eq!(v, Verdict::ToTun);
        sent.push(wire);
    }
    // B reloads with its peer unchanged plus a second peer.
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let spec_a = |key_in: KeyMaterial, spi_in| PeerSpec {
        name: "a".into(),
        endpoint: Some(A.parse().unwrap()),
        allowed_ips: vec!["10.4.2.99/32".parse().unwrap()],
        encap: EncapSpec::Esp {
            cipher: Cipher::Aes128Gcm,
            spi_out: 0x1002,
            key_out: key(Cipher::Aes128Gcm, 0x22),
            spi_in,
            key_in,
            replay_window: 64,
            esn: true,
            lifetime: Lifetime::default(),
            udp_port: None,
        },
        route: true,
        multipath: None,
        negotiated: None,
    };
    let c = PeerSpec {
        name: "c".into(),
        endpoint: Some("192.0.2.3".parse().unwrap()),
        allowed_ips: vec!["10.4.2.3/32".parse().unwrap()],
        encap: EncapSpec::IpIp,
        route: true,
        multipath: None,
        negotiated: None,
    };
    let next_seq_before = b.out.sa_state()[0].unwrap().1;
    let (out, mut inb) = datapath::rebuild(
        &[spec_a(key(Cipher::Aes128Gcm, 0x11), 0x1001), c.clone()],
        t,
        Default::default(),
        &b.out,
    )
    .unwrap();
    assert!(out.sa_continues(0, &b.out), "unchanged SA is shared");
    assert_eq!(out.sa_state()[0].unwrap().1, next_seq_before);
    // Before adoption the new inbound SA knows nothing; after, the old window is its.
    inb.adopt(&mut b.inb);
    let old_stats = b.stats.clone();
    b.out = out;
    b.inb = inb;
    assert!(
        Arc::ptr_eq(b.out.stats(), &old_stats),
        "global counters outlive the reload"
    );
    assert_eq!(
        b.out
            .peer_stats(0)
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    let mut r = PacketBuf::from_slice(&sent[1]);
    assert_eq!(
        b.inb.process(&mut r, A.parse().unwrap(), PROTO_ESP, 10),
        Verdict::Drop(DropReason::Replay),
        "a packet received before the reload is still a replay after it"
    );
    let (_, v, _) = send(&mut a, &mut b, A, &pkt, 11);
    assert_eq!(v, Verdict::ToTun, "traffic continues across the reload");

    // New inbound keys (and SPI) for peer a: a new SA, the old SPI is unknown from now on.
    let (out, mut inb) = datapath::rebuild(
        &[spec_a(key(Cipher::Aes128Gcm, 0x33), 0x2001)],
        t,
        Default::default(),
        &b.out,
    )
    .unwrap();
    assert!(
        out.sa_continues(0, &b.out),
        "outbound keys unchanged: same SA"
    );
    inb.adopt(&mut b.inb);
    b.out = out;
    b.inb = inb;
    let (_, v, _) = send(&mut a, &mut b, A, &pkt, 12);
    assert_eq!(v, Verdict::Drop(DropReason::UnknownSpi));
    // Peer c is gone: its prefix has no route.
    let mut q = PacketBuf::from_slice(&ipv4([10, 4, 2, 5], [10, 4, 2, 3], 60, false));
    assert_eq!(
        b.out.process(&mut q, 13),
        Verdict::Drop(DropReason::NoRoute)
    );
    // Changed outbound keys make a new SA that does not continue.
    let mut changed = spec_a(key(Cipher::Aes128Gcm, 0x33), 0x2001);
    if let EncapSpec::Esp { key_out, .. } = &mut changed.encap {
        *key_out = key(Cipher::Aes128Gcm, 0x44);
    }
    let (out, _) = datapath::rebuild(&[changed], t, Default::default(), &b.out).unwrap();
    assert!(!out.sa_continues(0, &b.out));
    assert_eq!(
        out.sa_state()[0].unwrap().1,
        1,
        "a new SA starts at 1 (the edge reserves)"
    );
}

/// A peer without a configured endpoint (issue 29): nothing goes to it (`no_endpoint`) until
/// a packet of its authenticates; then its address (and UDP port) is where packets go, and
/// it moves with every later authenticated packet from elsewhere (roaming). A forged packet
/// and a replayed genuine one from a new address move nothing.
#[test]
fn a_learned_endpoint_follows_authenticated_packets_only() {
    for udp in [None, Some(4500)] {
        let c = Cipher::Aes128Gcm;
        let (ab, ba) = (key(c, 0x11), key(c, 0x22));
        let spec = |name: &str,
                    endpoint: Option<&str>,
                    allowed: &str,
                    out: &KeyMaterial,
                    inn: &KeyMaterial,
                    so,
                    si| PeerSpec {
            name: name.into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec![allowed.parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: c,
                spi_out: so,
                key_out: out.clone(),
                spi_in: si,
                key_in: inn.clone(),
                replay_window: 64,
                esn: false,
                lifetime: Lifetime::default(),
                udp_port: udp,
            },
            route: true,
            multipath: None,
            negotiated: None,
        };
        let t = TunnelSpec {
            relay: false,
            mtu: 1400,
        };
        // A, the server, knows no address of B; B knows A's.
        let (a_out, mut a_in, a_stats) = datapath::build(
            &[spec("b", None, "10.4.2.5/32", &ab, &ba, 0x1001, 0x1002)],
            t,
            Default::default(),
        )
        .unwrap();
        let (b_out, _, _) = datapath::build(
            &[spec("a", Some(A), "10.4.2.99/32", &ba, &ab, 0x1002, 0x1001)],
            t,
            Default::default(),
        )
        .unwrap();
        let to_a = ipv4([10, 4, 2, 5], [10, 4, 2, 99], 100, true);
        let to_b = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, true);
        let dst_of = |v: Verdict| match v {
            Verdict::Send(Wire::EspInUdp { dst, .. }) => dst,
            Verdict::Send(Wire::Esp { dst, .. }) => std::net::SocketAddr::new(dst, 0),
            v => panic!("{v:?}"),
        };
        assert_eq!(
            a_out.process(&mut PacketBuf::from_slice(&to_b), 0),
            Verdict::Drop(DropReason::NoEndpoint)
        );
        assert_eq!(a_stats.drops(DropReason::NoEndpoint), 1);
        let sealed = || {
            let mut w = PacketBuf::from_slice(&to_a);
            b_out.process(&mut w, 0);
            w.as_slice().to_vec()
        };
        let mut arrive = |wire: &[u8], from: &str, port: u16| {
            let mut r = PacketBuf::from_slice(wire);
            let from = std::net::SocketAddr::new(from.parse().unwrap(), port);
            match udp {
                Some(_) => a_in.process_udp(&mut r, from, 7),
                None => a_in.process(&mut r, from.ip(), PROTO_ESP, 7),
            }
        };
        let port = |p: u16| if udp.is_some() { p } else { 0 };
        let first = sealed();
        assert_eq!(arrive(&first, "198.51.100.7", 31000), Verdict::ToTun);
        let here = dst_of(a_out.process(&mut PacketBuf::from_slice(&to_b), 8));
        assert_eq!(here.to_string(), format!("198.51.100.7:{}", port(31000)));
        // Forged (ICV fails) and replayed (window refuses) from a new address: no move.
        let mut forged = sealed();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert_eq!(
            arrive(&forged, "203.0.113.9", 666),
            Verdict::Drop(DropReason::BadIcv)
        );
        assert_eq!(
            arrive(&first, "203.0.113.9", 777),
            Verdict::Drop(DropReason::Replay)
        );
        assert_eq!(
            dst_of(a_out.process(&mut PacketBuf::from_slice(&to_b), 9)),
            here
        );
        // B roams: its next packet comes from elsewhere, and so do A's answers.
        assert_eq!(arrive(&sealed(), "203.0.113.9", 40000), Verdict::ToTun);
        assert_eq!(
            dst_of(a_out.process(&mut PacketBuf::from_slice(&to_b), 10)).to_string(),
            format!("203.0.113.9:{}", port(40000))
        );
        let learned = &a_out.peer_stats(0).learned;
        assert_eq!(learned.moves.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}

/// A peer with `max_paths = 2` and no address configured (issue 29): each new (address,
/// port) whose packet authenticates becomes one of its paths; a forged or replayed packet
/// from a new address takes no path; a third address while both paths are live is dropped
/// as `path_limit`, and the paths stay where they were.
#[test]
fn learned_paths_are_taken_by_authenticated_packets_only() {
    let c = Cipher::Aes128Gcm;
    let (ab, ba) = (key(c, 0x11), key(c, 0x22));
    let spec =
        |endpoint: Option<&str>, out: &KeyMaterial, inn: &KeyMaterial, so, si, mp| PeerSpec {
            name: "peer".into(),
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            allowed_ips: vec![if mp { "10.4.2.5/32" } else { "10.4.2.99/32" }
                .parse()
                .unwrap()],
            encap: EncapSpec::Esp {
                cipher: c,
                spi_out: so,
                key_out: out.clone(),
                spi_in: si,
                key_in: inn.clone(),
                replay_window: 64,
                esn: false,
                lifetime: Lifetime::default(),
                udp_port: Some(4500),
            },
            route: true,
            multipath: mp.then(|| espip::multipath::PeerPaths {
                spec: Default::default(),
                paths: (0..2).map(espip::multipath::PathSpec::learned).collect(),
            }),
            negotiated: None,
        };
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let (a_out, mut a_in, a_stats) = datapath::build(
        &[spec(None, &ab, &ba, 0x1001, 0x1002, true)],
        t,
        Default::default(),
    )
    .unwrap();
    let (b_out, _, _) = datapath::build(
        &[spec(Some(A), &ba, &ab, 0x1002, 0x1001, false)],
        t,
        Default::default(),
    )
    .unwrap();
    let to_a = ipv4([10, 4, 2, 5], [10, 4, 2, 99], 100, true);
    let to_b = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, true);
    assert_eq!(
        a_out.process(&mut PacketBuf::from_slice(&to_b), 0),
        Verdict::Drop(DropReason::NoEndpoint)
    );
    let sealed = || {
        let mut w = PacketBuf::from_slice(&to_a);
        b_out.process(&mut w, 0);
        w.as_slice().to_vec()
    };
    let mut arrive = |wire: &[u8], from: &str, now: u64| {
        let mut r = PacketBuf::from_slice(wire);
        a_in.process_udp(&mut r, from.parse().unwrap(), now)
    };
    let mp = a_out.multipath(0).unwrap();
    let path = |i: usize| mp.endpoint_of(i).map(|(ip, port)| format!("{ip}:{port}"));
    let first = sealed();
    assert_eq!(arrive(&first, "198.51.100.7:31000", 7), Verdict::ToTun);
    assert_eq!(path(0).as_deref(), Some("198.51.100.7:31000"));
    match a_out.process(&mut PacketBuf::from_slice(&to_b), 8) {
        Verdict::Send(Wire::EspInUdp { dst, .. }) => {
            assert_eq!(dst.to_string(), "198.51.100.7:31000")
        }
        v => panic!("{v:?}"),
    }
    // Forged and replayed from a new address: no path.
    let mut forged = sealed();
    let n = forged.len();
    forged[n - 1] ^= 1;
    assert_eq!(
        arrive(&forged, "203.0.113.9:666", 9),
        Verdict::Drop(DropReason::BadIcv)
    );
    assert_eq!(
        arrive(&first, "203.0.113.9:777", 9),
        Verdict::Drop(DropReason::Replay)
    );
    assert_eq!(path(1), None);
    // Genuine from the LTE NAT: path 2 (held by the reorder stage for the forged packet's
    // sequence number, which never came).
    assert!(matches!(
        arrive(&sealed(), "203.0.113.9:1024", 10),
        Verdict::ToTun | Verdict::Held
    ));
    assert_eq!(path(1).as_deref(), Some("203.0.113.9:1024"));
    // Both heard just now: a third address is one too many.
    assert_eq!(
        arrive(&sealed(), "192.0.2.50:4500", 11),
        Verdict::Drop(DropReason::PathLimit)
    );
    assert_eq!(a_stats.drops(DropReason::PathLimit), 1);
    assert_eq!(path(0).as_deref(), Some("198.51.100.7:31000"));
    assert_eq!(path(1).as_deref(), Some("203.0.113.9:1024"));
    // Each path's packets still land on it.
    assert!(matches!(
        arrive(&sealed(), "198.51.100.7:31000", 12),
        Verdict::ToTun | Verdict::Held
    ));
    assert_eq!(
        mp.stats[0]
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

/// An IKEv2 rekey republishes a multipath peer's data path with a new SA pair (its counters
/// start a new `PeerStats`): what the reorder stage holds at that moment goes on to the new
/// generation and comes out once its gap fills; none of it is lost with the old one.
#[test]
fn a_rekey_keeps_what_the_reorder_stage_holds() {
    let c = Cipher::Aes128Gcm;
    let (ab, ba, ab2, ba2) = (key(c, 0x11), key(c, 0x22), key(c, 0x33), key(c, 0x44));
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    // B's peer A: two paths (A's two addresses), SAs from "IKEv2".
    let b_spec =
        |spi_out: u32, key_out: &KeyMaterial, spi_in: u32, key_in: &KeyMaterial, older| PeerSpec {
            name: "a".into(),
            endpoint: Some(A.parse().unwrap()),
            allowed_ips: vec!["10.4.2.99/32".parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: c,
                spi_out,
                key_out: key_out.clone(),
                spi_in,
                key_in: key_in.clone(),
                replay_window: 1024,
                esn: true,
                lifetime: Lifetime::default(),
                udp_port: None,
            },
            route: true,
            multipath: Some(espip::multipath::PeerPaths {
                spec: Default::default(),
                paths: vec![
                    espip::multipath::PathSpec::routed("p1", A.parse().unwrap(), 0),
                    espip::multipath::PathSpec::routed("p2", "198.51.100.1".parse().unwrap(), 0),
                ],
            }),
            negotiated: Some(older),
        };
    let (b_out, mut b_in, _) = datapath::build(
        &[b_spec(0x2002, &ba, 0x2001, &ab, Vec::new())],
        t,
        Default::default(),
    )
    .unwrap();
    // A, the sender, on the old SA (one path is enough to number the packets).
    let (a_out, _, _) = datapath::build(
        &[PeerSpec {
            name: "b".into(),
            endpoint: Some(B.parse().unwrap()),
            allowed_ips: vec!["10.4.2.5/32".parse().unwrap()],
            encap: EncapSpec::Esp {
                cipher: c,
                spi_out: 0x2001,
                key_out: ab.clone(),
                spi_in: 0x2002,
                key_in: ba.clone(),
                replay_window: 1024,
                esn: true,
                lifetime: Lifetime::default(),
                udp_port: None,
            },
            route: true,
            multipath: None,
            negotiated: Some(Vec::new()),
        }],
        t,
        Default::default(),
    )
    .unwrap();
    let wire: Vec<Vec<u8>> = (0..3u8)
        .map(|i| {
            let mut p = ipv4([10, 4, 2, 99], [10, 4, 2, 5], 100, false);
            p[40] = i;
            let mut w = PacketBuf::from_slice(&p);
            assert!(matches!(a_out.process(&mut w, 0), Verdict::Send(_)));
            w.as_slice().to_vec()
        })
        .collect();
    let arrive = |inb: &mut Inbound, n: usize, from: &str, now: u64| {
        let mut r = PacketBuf::from_slice(&wire[n]);
        inb.process(&mut r, from.parse().unwrap(), PROTO_ESP, now)
    };
    // 1 by path 1, 3 by path 1 (held: 2 is on path 2, slower).
    assert_eq!(arrive(&mut b_in, 0, A, 1), Verdict::ToTun);
    assert_eq!(arrive(&mut b_in, 2, A, 2), Verdict::Held);
    // The rekey: a new SA pair, the old inbound SA still accepted.
    let (_, mut b_in2) = datapath::rebuild(
        &[b_spec(
            0x3002,
            &ba2,
            0x3001,
            &ab2,
            vec![(0x2001, ab.clone(), true)],
        )],
        t,
        Default::default(),
        &b_out,
    )
    .unwrap();
    b_in2.adopt(&mut b_in);
    drop(b_in);
    // 2 arrives by path 2: delivered, and 3 after it.
    assert_eq!(arrive(&mut b_in2, 1, "198.51.100.1", 3), Verdict::ToTun);
    let mut released = Vec::new();
    b_in2.release(3, 16, |p| released.push(p[40]));
    assert_eq!(released, vec![2], "packet 3 (payload byte 2) comes out");
}

//! The design card's packet crates as independent oracles (issue 31 item 6): every header the
//! core writes (TSO/USO segments, GRO-merged headers, ICMP errors it generates, the same-LAN
//! NAT's rewrites, IPv4 and IPv6) is parsed by `etherparse` and by `pnet_packet`, and both
//! must agree with each other and with what espip meant: lengths, checksums (IP and
//! transport, with the pseudo-header), sequence numbers, payload bytes. The inputs are built
//! by etherparse's `PacketBuilder`, not by espip. The core keeps its own views on the hot path
//! (docs/architecture.md says why); these crates are test dependencies only.

use espip::buf::{PacketBuf, MAX_PACKET};
use espip::datapath::{self, EncapSpec, Lifetime, PeerSpec, TunnelSpec, Verdict};
use espip::gso;
use espip::nat::{NatMap, NatTable};
use espip::sa::{Cipher, KeyMaterial};
use etherparse::{
    IpHeaders, Ipv4Extensions, Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice,
};
use pnet_packet::Packet;
use std::net::Ipv6Addr;

const V4_SRC: [u8; 4] = [10, 4, 2, 99];
const V4_DST: [u8; 4] = [10, 4, 2, 5];
const V6_SRC: &str = "fd00::99";
const V6_DST: &str = "fd00::5";

/// What both oracles agree a packet is.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    /// IP protocol / next header.
    protocol: u8,
    /// Transport payload (TCP/UDP) or ICMP message body after its 8-byte header.
    payload: Vec<u8>,
    /// TCP sequence number (0 for others).
    seq: u32,
    /// TCP flags (0 for others).
    flags: u8,
    /// ICMP type and code.
    icmp: Option<(u8, u8)>,
}

fn addr6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

/// Parse `pkt` (an IP packet) with etherparse: every length and checksum must hold.
fn etherparse_view(pkt: &[u8]) -> Seen {
    let sp = SlicedPacket::from_ip(pkt).unwrap_or_else(|e| panic!("etherparse: {e:?}"));
    enum Addrs {
        V4([u8; 4], [u8; 4]),
        V6([u8; 16], [u8; 16]),
    }
    let addrs = match sp.net.as_ref().expect("an IP header") {
        NetSlice::Ipv4(s) => {
            let h = s.header().to_header();
            assert_eq!(usize::from(h.total_len), pkt.len(), "IPv4 total length");
            assert_eq!(
                h.calc_header_checksum(),
                h.header_checksum,
                "IPv4 header checksum"
            );
            Addrs::V4(h.source, h.destination)
        }
        NetSlice::Ipv6(s) => {
            let h = s.header().to_header();
            assert_eq!(
                usize::from(h.payload_length) + 40,
                pkt.len(),
                "IPv6 payload length"
            );
            Addrs::V6(h.source, h.destination)
        }
        NetSlice::Arp(_) => panic!("ARP"),
    };
    match sp.transport.expect("a transport header") {
        TransportSlice::Tcp(t) => {
            let want = match addrs {
                Addrs::V4(s, d) => t.calc_checksum_ipv4(s, d),
                Addrs::V6(s, d) => t.calc_checksum_ipv6(s, d),
            }
            .unwrap();
            assert_eq!(want, t.checksum(), "TCP checksum (etherparse)");
            let h = t.to_header();
            let flags = u8::from(h.fin)
                | u8::from(h.syn) << 1
                | u8::from(h.rst) << 2
                | u8::from(h.psh) << 3
                | u8::from(h.ack) << 4
                | u8::from(h.urg) << 5
                | u8::from(h.ece) << 6
                | u8::from(h.cwr) << 7;
            Seen {
                protocol: 6,
                payload: t.payload().to_vec(),
                seq: t.sequence_number(),
                flags,
                icmp: None,
            }
        }
        TransportSlice::Udp(u) => {
            assert_eq!(usize::from(u.length()), u.slice().len(), "UDP length");
            let h = u.to_header();
            let want = match addrs {
                Addrs::V4(s, d) => h.calc_checksum_ipv4_raw(s, d, u.payload()),
                Addrs::V6(s, d) => h.calc_checksum_ipv6_raw(s, d, u.payload()),
            }
            .unwrap();
            assert_eq!(want, u.checksum(), "UDP checksum (etherparse)");
            Seen {
                protocol: 17,
                payload: u.payload().to_vec(),
                seq: 0,
                flags: 0,
                icmp: None,
            }
        }
        TransportSlice::Icmpv4(i) => {
            let h = i.header();
            let body = &i.slice()[8..];
            let again = etherparse::Icmpv4Header::with_checksum(h.icmp_type.clone(), body);
            assert_eq!(again.checksum, i.checksum(), "ICMPv4 checksum (etherparse)");
            Seen {
                protocol: 1,
                payload: body.to_vec(),
                seq: 0,
                flags: 0,
                icmp: Some((i.type_u8(), i.code_u8())),
            }
        }
        TransportSlice::Icmpv6(i) => {
            let Addrs::V6(s, d) = addrs else {
                panic!("ICMPv6 over IPv4")
            };
            assert!(i.is_checksum_valid(s, d), "ICMPv6 checksum (etherparse)");
            Seen {
                protocol: 58,
                payload: i.slice()[8..].to_vec(),
                seq: 0,
                flags: 0,
                icmp: Some((i.type_u8(), i.code_u8())),
            }
        }
    }
}

/// Parse `pkt` with pnet_packet, checking the same.
fn pnet_view(pkt: &[u8]) -> Seen {
    use pnet_packet::{icmp, icmpv6, ipv4, ipv6, tcp, udp};
    let (protocol, body, src, dst): (u8, &[u8], std::net::IpAddr, std::net::IpAddr) =
        match pkt[0] >> 4 {
            4 => {
                let p = ipv4::Ipv4Packet::new(pkt).expect("pnet: IPv4");
                assert_eq!(usize::from(p.get_total_length()), pkt.len());
                assert_eq!(ipv4::checksum(&p), p.get_checksum(), "IPv4 checksum (pnet)");
                let h = usize::from(p.get_header_length()) * 4;
                (
                    p.get_next_level_protocol().0,
                    &pkt[h..],
                    p.get_source().into(),
                    p.get_destination().into(),
                )
            }
            6 => {
                let p = ipv6::Ipv6Packet::new(pkt).expect("pnet: IPv6");
                assert_eq!(usize::from(p.get_payload_length()) + 40, pkt.len());
                (
                    p.get_next_header().0,
                    &pkt[40..],
                    p.get_source().into(),
                    p.get_destination().into(),
                )
            }
            v => panic!("IP version {v}"),
        };
    match (protocol, src, dst) {
        (6, s, d) => {
            let t = tcp::TcpPacket::new(body).expect("pnet: TCP");
            let want = match (s, d) {
                (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                    tcp::ipv4_checksum(&t, &s, &d)
                }
                (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                    tcp::ipv6_checksum(&t, &s, &d)
                }
                _ => unreachable!(),
            };
            assert_eq!(want, t.get_checksum(), "TCP checksum (pnet)");
            Seen {
                protocol,
                payload: t.payload().to_vec(),
                seq: t.get_sequence(),
                flags: t.get_flags(),
                icmp: None,
            }
        }
        (17, s, d) => {
            let u = udp::UdpPacket::new(body).expect("pnet: UDP");
            assert_eq!(usize::from(u.get_length()), body.len());
            let want = match (s, d) {
                (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                    udp::ipv4_checksum(&u, &s, &d)
                }
                (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                    udp::ipv6_checksum(&u, &s, &d)
                }
                _ => unreachable!(),
            };
            assert_eq!(want, u.get_checksum(), "UDP checksum (pnet)");
            Seen {
                protocol,
                payload: u.payload().to_vec(),
                seq: 0,
                flags: 0,
                icmp: None,
            }
        }
        (1, _, _) => {
            let i = icmp::IcmpPacket::new(body).expect("pnet: ICMP");
            assert_eq!(
                icmp::checksum(&i),
                i.get_checksum(),
                "ICMPv4 checksum (pnet)"
            );
            Seen {
                protocol,
                payload: body[8..].to_vec(),
                seq: 0,
                flags: 0,
                icmp: Some((i.get_icmp_type().0, i.get_icmp_code().0)),
            }
        }
        (58, std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let i = icmpv6::Icmpv6Packet::new(body).expect("pnet: ICMPv6");
            assert_eq!(
                icmpv6::checksum(&i, &s, &d),
                i.get_checksum(),
                "ICMPv6 checksum (pnet)"
            );
            Seen {
                protocol,
                payload: body[8..].to_vec(),
                seq: 0,
                flags: 0,
                icmp: Some((i.get_icmpv6_type().0, i.get_icmpv6_code().0)),
            }
        }
        (p, _, _) => panic!("protocol {p}"),
    }
}

/// Both oracles parse `pkt`, every check holds in both, and they agree.
fn both(pkt: &[u8]) -> Seen {
    let e = etherparse_view(pkt);
    let p = pnet_view(pkt);
    assert_eq!(e, p, "etherparse and pnet_packet disagree");
    e
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + 3) as u8).collect()
}

fn ipv4_df(builder_payload_len: usize, protocol: etherparse::IpNumber) -> IpHeaders {
    let mut h = Ipv4Header::new(builder_payload_len as u16, 64, protocol, V4_SRC, V4_DST).unwrap();
    h.dont_fragment = true;
    IpHeaders::Ipv4(h, Ipv4Extensions::default())
}

/// A TSO packet (one TCP segment larger than the MSS), IPv4 and IPv6, as the TUN hands it:
/// every segment espip cuts parses and checks in both oracles, the sequence numbers follow
/// each other, FIN and PSH stay on the last one only, and the payloads put together are the
/// original.
#[test]
fn tso_segments_check_in_both_oracles() {
    for v6 in [false, true] {
        let data = payload(5000);
        let b = if v6 {
            PacketBuilder::ipv6(addr6(V6_SRC), addr6(V6_DST), 64)
        } else {
            PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
        };
        let mut pkt = Vec::new();
        b.tcp(40000, 5201, 1_000_000, 64000)
            .ack(77)
            .psh()
            .fin()
            .write(&mut pkt, &data)
            .unwrap();
        let mut out: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        let n = gso::segment_tcp(&pkt, 1400, &mut out).unwrap();
        assert_eq!(n, 4);
        let mut joined = Vec::new();
        for (i, s) in out[..n].iter().enumerate() {
            let seen = both(s.as_slice());
            assert_eq!(
                seen.seq,
                1_000_000 + (i * 1400) as u32,
                "v6 {v6} segment {i}"
            );
            let last = i + 1 == n;
            assert_eq!(seen.flags & 0x01 != 0, last, "FIN only on the last");
            assert_eq!(seen.flags & 0x08 != 0, last, "PSH only on the last");
            joined.extend_from_slice(&seen.payload);
        }
        assert_eq!(joined, data, "v6 {v6}");
    }
}

/// A USO packet (UDP_SEGMENT): each datagram has its own length and checksum in both
/// oracles' eyes, and the payloads put together are the original.
#[test]
fn uso_datagrams_check_in_both_oracles() {
    for v6 in [false, true] {
        let data = payload(3000);
        let b = if v6 {
            PacketBuilder::ipv6(addr6(V6_SRC), addr6(V6_DST), 64)
        } else {
            PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
        };
        let mut pkt = Vec::new();
        b.udp(5000, 5001).write(&mut pkt, &data).unwrap();
        let mut out: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new(MAX_PACKET)).collect();
        let n = gso::segment_udp(&pkt, 1200, &mut out).unwrap();
        assert_eq!(n, 3);
        let joined: Vec<u8> = out[..n]
            .iter()
            .flat_map(|s| both(s.as_slice()).payload)
            .collect();
        assert_eq!(joined, data, "v6 {v6}");
    }
}

/// Segments coalesced by espip's GRO (written to the TUN as one packet with a
/// `virtio_net_hdr`): the merged IP header's length and checksum hold in both oracles, the
/// merged TCP header keeps the first segment's sequence number, and the payload is the
/// segments' in order.
#[test]
fn gro_merged_headers_check_in_both_oracles() {
    use espip::gro;
    for v6 in [false, true] {
        let mss = 1000;
        let data = payload(3 * mss);
        let segs: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                let b = if v6 {
                    PacketBuilder::ipv6(addr6(V6_SRC), addr6(V6_DST), 64)
                } else {
                    PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
                };
                let mut p = Vec::new();
                b.tcp(40000, 5201, 500 + (i * mss) as u32, 64000)
                    .ack(9)
                    .write(&mut p, &data[i * mss..(i + 1) * mss])
                    .unwrap();
                p
            })
            .collect();
        let first = gro::segment(&segs[0]).expect("a segment GRO takes");
        let total = segs[0].len() + 2 * mss;
        let mut hdrs = [0u8; gro::MAX_HEADERS];
        let vnet = gro::merged_headers(&segs[0], &first, total, false, &mut hdrs);
        let mut merged = hdrs[..first.hdr_len].to_vec();
        merged.extend_from_slice(&data);
        // The TCP checksum of a merged packet is left partial for the kernel
        // (`VIRTIO_NET_HDR_F_NEEDS_CSUM`); complete it as the kernel would, then check.
        assert_eq!(usize::from(vnet.hdr_len), first.hdr_len);
        gso::complete_checksum(
            &mut merged,
            usize::from(vnet.csum_start),
            usize::from(vnet.csum_offset),
        )
        .unwrap();
        let seen = both(&merged);
        assert_eq!(seen.seq, 500, "v6 {v6}");
        assert_eq!(seen.payload, data, "v6 {v6}");
    }
}

fn pair_outbound(mtu: u16) -> datapath::Outbound {
    let c = Cipher::Aes128Gcm;
    let key = KeyMaterial::new(c, &[0x11; 20]).unwrap();
    let peer = PeerSpec {
        name: "b".into(),
        endpoint: Some("192.0.2.2".parse().unwrap()),
        allowed_ips: vec![
            "10.4.2.5/32".parse().unwrap(),
            "fd00::5/128".parse().unwrap(),
        ],
        encap: EncapSpec::Esp {
            cipher: c,
            spi_out: 0x1001,
            key_out: key.clone(),
            spi_in: 0x1002,
            key_in: key,
            replay_window: 64,
            esn: false,
            lifetime: Lifetime::default(),
            udp_port: None,
        },
        route: true,
        multipath: None,
        negotiated: None,
    };
    datapath::build(
        &[peer],
        TunnelSpec { relay: false, mtu },
        Default::default(),
    )
    .unwrap()
    .0
}

/// A packet above the tunnel MTU: the ICMP error espip writes back into the TUN (IPv4
/// "fragmentation needed" with the MTU, IPv6 "packet too big") parses and checks in both
/// oracles, is addressed to the sender, and quotes the start of the packet.
#[test]
fn icmp_errors_espip_generates_check_in_both_oracles() {
    let out = pair_outbound(1400);
    for v6 in [false, true] {
        let data = payload(1600);
        let mut pkt = Vec::new();
        if v6 {
            PacketBuilder::ipv6(addr6(V6_SRC), addr6(V6_DST), 64)
                .udp(5000, 5001)
                .write(&mut pkt, &data)
                .unwrap();
        } else {
            PacketBuilder::ip(ipv4_df(8 + data.len(), etherparse::IpNumber::UDP))
                .udp(5000, 5001)
                .write(&mut pkt, &data)
                .unwrap();
        }
        let mut b = PacketBuf::from_slice(&pkt);
        assert_eq!(out.process(&mut b, 0), Verdict::ToTun, "v6 {v6}");
        let icmp = b.as_slice().to_vec();
        let seen = both(&icmp);
        if v6 {
            assert_eq!(seen.icmp, Some((2, 0)), "packet too big");
            assert_eq!(&icmp[24..40], &addr6(V6_SRC), "to the sender");
            assert_eq!(u32::from_be_bytes(icmp[44..48].try_into().unwrap()), 1400);
        } else {
            assert_eq!(seen.icmp, Some((3, 4)), "fragmentation needed");
            assert_eq!(&icmp[16..20], &V4_SRC, "to the sender");
            assert_eq!(u16::from_be_bytes(icmp[26..28].try_into().unwrap()), 1400);
        }
        assert_eq!(&seen.payload[..40], &pkt[..40], "quotes the packet's start");
    }
}

/// The same-LAN helper's rewrites (egress: alias destination back to the real one; ingress:
/// real source into the alias prefix) keep every checksum right in both oracles, for TCP,
/// UDP and ICMP echo.
#[test]
fn nat_rewrites_check_in_both_oracles() {
    let nat = NatTable::new(vec![NatMap {
        real: "192.168.1.0/24".parse().unwrap(),
        alias: "10.99.1.0/24".parse().unwrap(),
    }]);
    let data = payload(333);
    let build = |src: [u8; 4], dst: [u8; 4], kind: u8| {
        let b = PacketBuilder::ipv4(src, dst, 64);
        let mut p = Vec::new();
        match kind {
            0 => b.tcp(40000, 22, 7, 1000).write(&mut p, &data).unwrap(),
            1 => b.udp(40000, 53).write(&mut p, &data).unwrap(),
            _ => b.icmpv4_echo_request(7, 1).write(&mut p, &data).unwrap(),
        }
        p
    };
    for kind in 0..3u8 {
        // Egress: the local stack sent to the alias 10.99.1.7; espip restores 192.168.1.7.
        let mut p = build([192, 168, 1, 2], [10, 99, 1, 7], kind);
        assert!(nat.egress(&mut p).unwrap(), "kind {kind}");
        assert_eq!(&p[16..20], &[192, 168, 1, 7]);
        assert_eq!(both(&p).payload, data);
        // Ingress: the peer's real source 192.168.1.7 becomes the alias 10.99.1.7.
        let mut p = build([192, 168, 1, 7], [192, 168, 1, 2], kind);
        assert!(nat.ingress(&mut p).unwrap(), "kind {kind}");
        assert_eq!(&p[12..16], &[10, 99, 1, 7]);
        assert_eq!(both(&p).payload, data);
    }
}

/// The oracles bite: one flipped payload byte, or a wrong IPv4 header checksum, fails them.
#[test]
fn a_damaged_packet_fails_the_oracles() {
    let mut pkt = Vec::new();
    PacketBuilder::ipv4(V4_SRC, V4_DST, 64)
        .tcp(1, 2, 3, 4)
        .write(&mut pkt, &payload(100))
        .unwrap();
    both(&pkt);
    for at in [pkt.len() - 1, 10] {
        let mut bad = pkt.clone();
        bad[at] ^= 0x40;
        let e = std::panic::catch_unwind(|| etherparse_view(&bad));
        let p = std::panic::catch_unwind(|| pnet_view(&bad));
        assert!(e.is_err() && p.is_err(), "byte {at}");
    }
}

/// The Ethernet and outer IP headers the `AF_PACKET` fast path writes in front of an ESP (or
/// IP-in-IP) packet: both oracles read the frame's MAC addresses, EtherType, IP lengths,
/// header checksum, protocol, TTL / hop limit and addresses as espip meant them.
#[test]
fn af_packet_frame_headers_check_in_both_oracles() {
    use espip::sys::packet::{frame_header, NextHop, MAX_HDR};
    use pnet_packet::ethernet::EthernetPacket;
    for (src, dst, proto) in [
        ("192.0.2.1", "192.0.2.2", 50u8),
        ("192.0.2.1", "198.51.100.9", 4),
        ("2001:db8::1", "2001:db8::2", 50),
        ("2001:db8::1", "2001:db8::3", 41),
    ] {
        let hop = NextHop {
            dst: dst.parse().unwrap(),
            ifindex: 2,
            src: src.parse().unwrap(),
            src_mac: [2, 0, 0, 0, 0, 0xa],
            dst_mac: [2, 0, 0, 0, 0, 0xb],
            mtu: 1500,
        };
        let body = payload(777);
        let mut h = [0u8; MAX_HDR];
        let n = frame_header(&mut h, &hop, proto, body.len(), 4242, 61, 62);
        let mut frame = h[..n].to_vec();
        frame.extend_from_slice(&body);
        // etherparse
        let sp = SlicedPacket::from_ethernet(&frame).unwrap();
        let eth = match sp.link {
            Some(etherparse::LinkSlice::Ethernet2(e)) => e,
            l => panic!("{l:?}"),
        };
        assert_eq!(eth.source(), hop.src_mac);
        assert_eq!(eth.destination(), hop.dst_mac);
        let (e_proto, e_payload) = match sp.net.unwrap() {
            NetSlice::Ipv4(s) => {
                let h = s.header().to_header();
                assert_eq!(h.calc_header_checksum(), h.header_checksum);
                assert_eq!(usize::from(h.total_len), frame.len() - 14);
                assert_eq!((h.time_to_live, h.identification), (61, 4242));
                assert!(!h.dont_fragment);
                assert_eq!(std::net::IpAddr::from(h.source), hop.src);
                assert_eq!(std::net::IpAddr::from(h.destination), hop.dst);
                (h.protocol.0, s.payload().payload.to_vec())
            }
            NetSlice::Ipv6(s) => {
                let h = s.header().to_header();
                assert_eq!(usize::from(h.payload_length), frame.len() - 54);
                assert_eq!(h.hop_limit, 62);
                assert_eq!(std::net::IpAddr::from(h.source), hop.src);
                assert_eq!(std::net::IpAddr::from(h.destination), hop.dst);
                (h.next_header.0, s.payload().payload.to_vec())
            }
            NetSlice::Arp(_) => panic!("ARP"),
        };
        // pnet
        let e = EthernetPacket::new(&frame).unwrap();
        assert_eq!(e.get_source().octets(), hop.src_mac);
        let (p_proto, p_payload) = if hop.dst.is_ipv4() {
            let p = pnet_packet::ipv4::Ipv4Packet::new(e.payload()).unwrap();
            assert_eq!(pnet_packet::ipv4::checksum(&p), p.get_checksum());
            assert_eq!(usize::from(p.get_total_length()), frame.len() - 14);
            (p.get_next_level_protocol().0, p.payload().to_vec())
        } else {
            let p = pnet_packet::ipv6::Ipv6Packet::new(e.payload()).unwrap();
            assert_eq!(usize::from(p.get_payload_length()), frame.len() - 54);
            (p.get_next_header().0, p.payload().to_vec())
        };
        assert_eq!((e_proto, &e_payload), (proto, &body), "{dst}");
        assert_eq!((p_proto, &p_payload), (proto, &body), "{dst}");
    }
}

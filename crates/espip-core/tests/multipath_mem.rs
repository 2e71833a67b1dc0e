//! Two multipath data paths talking to each other in memory (no kernel): packets spread over
//! two paths arrive out of order and leave the reorder stage in order; probes and echoes are
//! authenticated ESP dummy packets that measure each path; a forged or replayed probe changes
//! no path state; `redundant` copies are dropped as duplicates, not counted as replays.

use espip_core::buf::PacketBuf;
use espip_core::datapath::{
    self, DropReason, EncapSpec, Inbound, Lifetime, Outbound, PeerSpec, TunnelSpec, Verdict, Wire,
};
use espip_core::multipath::{MultipathSpec, PathSpec, PathState, PeerPaths, Scheduler};
use espip_core::nat::NatTable;
use espip_core::sa::{Cipher, KeyMaterial};
use espip_core::wire::ip::emit_ipv4_header;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

const MS: u64 = 1_000_000;

/// A's address on link 1 and 2, and B's.
const A1: [u8; 4] = [10, 1, 0, 1];
const A2: [u8; 4] = [10, 2, 0, 1];
const B1: [u8; 4] = [10, 1, 0, 2];
const B2: [u8; 4] = [10, 2, 0, 2];

fn spec(
    name: &str,
    eps: [[u8; 4]; 2],
    allowed: &str,
    out: u8,
    inn: u8,
    s: Scheduler,
    udp: bool,
) -> PeerSpec {
    let c = Cipher::Aes128Gcm;
    let key = |fill| KeyMaterial::new(c, &vec![fill; c.key_len() + 4]).unwrap();
    let port = if udp { 4500 } else { 0 };
    PeerSpec {
        name: name.into(),
        endpoint: Some(IpAddr::from(eps[0])),
        allowed_ips: vec![allowed.parse().unwrap()],
        encap: EncapSpec::Esp {
            cipher: c,
            spi_out: 0x1000 + u32::from(out),
            key_out: key(out),
            spi_in: 0x1000 + u32::from(inn),
            key_in: key(inn),
            replay_window: 4096,
            esn: true,
            lifetime: Lifetime::default(),
            udp_port: udp.then_some(4500),
        },
        route: true,
        multipath: Some(PeerPaths {
            spec: MultipathSpec {
                scheduler: s,
                repair: true,
                // No capacity trains: these tests count each round's probes and lose paths
                // whole; the trains are measured in the namespace lab
                // (`espip lab multipath`), where a link has a rate to measure.
                adapt: false,
                ..MultipathSpec::default()
            },
            paths: eps
                .iter()
                .enumerate()
                .map(|(i, e)| PathSpec::routed(&format!("l{}", i + 1), IpAddr::from(*e), port))
                .collect(),
        }),
        negotiated: None,
    }
}

struct Pair {
    out_a: Outbound,
    in_a: Inbound,
    out_b: Outbound,
    in_b: Inbound,
}

fn pair(s: Scheduler, udp: bool) -> Pair {
    let t = TunnelSpec {
        relay: false,
        mtu: 1400,
    };
    let (out_a, in_a, _) = datapath::build(
        &[spec("b", [B1, B2], "10.9.0.2/32", 1, 2, s, udp)],
        t,
        NatTable::default(),
    )
    .unwrap();
    let (out_b, in_b, _) = datapath::build(
        &[spec("a", [A1, A2], "10.9.0.1/32", 2, 1, s, udp)],
        t,
        NatTable::default(),
    )
    .unwrap();
    Pair {
        out_a,
        in_a,
        out_b,
        in_b,
    }
}

/// An inner IPv4/UDP packet from A's inner address to B's whose byte 28 carries `n`.
fn inner(n: u8) -> PacketBuf {
    let len = 200;
    let mut pkt = vec![0u8; len];
    emit_ipv4_header(
        &mut pkt,
        [10, 9, 0, 1].into(),
        [10, 9, 0, 2].into(),
        17,
        len as u16,
    );
    pkt[28] = n;
    PacketBuf::from_slice(&pkt)
}

/// The outer source B sees for a packet A sent to `dst` (A's address on that link).
fn from_a(dst: IpAddr) -> IpAddr {
    if dst == IpAddr::from(B1) {
        IpAddr::from(A1)
    } else {
        IpAddr::from(A2)
    }
}

fn receive(inb: &mut Inbound, buf: &mut PacketBuf, w: Wire, src: IpAddr, now: u64) -> Verdict {
    match w {
        Wire::EspInUdp { .. } => inb.process_udp(buf, SocketAddr::new(src, 4500), now),
        w => inb.process(buf, src, w.protocol(), now),
    }
}

#[test]
fn spread_packets_leave_the_reorder_stage_in_order() {
    for udp in [false, true] {
        let mut p = pair(Scheduler::Spread, udp);
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        for n in 0..100u8 {
            let mut b = inner(n);
            let Verdict::Send(w) = p.out_a.process(&mut b, MS) else {
                panic!("not sent");
            };
            // Link 2 is slower: its packets arrive after all of link 1's.
            if w.dst_ip() == IpAddr::from(B1) {
                fast.push((b, w));
            } else {
                slow.push((b, w));
            }
        }
        assert_eq!(
            (fast.len(), slow.len()),
            (50, 50),
            "equal weights alternate"
        );
        let mut got = Vec::new();
        let now = 2 * MS;
        for (b, w) in fast.iter_mut().chain(slow.iter_mut()) {
            match receive(&mut p.in_b, b, *w, from_a(w.dst_ip()), now) {
                Verdict::ToTun => got.push(b.as_slice()[28]),
                Verdict::Held => {}
                v => panic!("{v:?}"),
            }
            p.in_b.release(now, 64, |d| got.push(d[28]));
        }
        assert_eq!(got, (0..100).collect::<Vec<u8>>(), "udp {udp}");
        let m = p.out_b.multipath(0).unwrap();
        assert_eq!(m.reorder.held.load(Relaxed), 49);
        assert_eq!(m.reorder.gaps_skipped.load(Relaxed), 0);
        assert_eq!(m.stats[0].rx_packets.load(Relaxed), 50);
        assert_eq!(m.stats[1].rx_packets.load(Relaxed), 50);
    }
}

/// Four packets alternate over the two paths (0 and 2 on link 1, 1 and 3 on link 2); 1 is
/// lost. Each path delivers in order, so once both have delivered past 1 it is known lost and
/// not waited for; while link 2 has delivered nothing after it, it is waited for, at most the
/// hold time.
#[test]
fn a_lost_packet_is_waited_for_only_as_long_as_it_may_come() {
    for link2_delivers in [false, true] {
        let mut p = pair(Scheduler::Spread, false);
        let mut sent: Vec<(PacketBuf, Wire)> = (0..4u8)
            .map(|n| {
                let mut b = inner(n);
                let Verdict::Send(w) = p.out_a.process(&mut b, MS) else {
                    panic!("not sent");
                };
                (b, w)
            })
            .collect();
        let mut got = Vec::new();
        for (i, (b, w)) in sent.iter_mut().enumerate() {
            if i == 1 || (i == 3 && !link2_delivers) {
                continue;
            }
            if receive(&mut p.in_b, b, *w, from_a(w.dst_ip()), MS) == Verdict::ToTun {
                got.push(b.as_slice()[28]);
            }
        }
        assert_eq!(got, vec![0]);
        if link2_delivers {
            p.in_b.release(MS, 64, |d| got.push(d[28]));
            assert_eq!(
                got,
                vec![0, 2, 3],
                "both paths are past 1: lost, not waited for"
            );
            assert_eq!(p.in_b.next_release(), None);
            continue;
        }
        let deadline = p.in_b.next_release().expect("packets held");
        // Nothing measured: the hold bound (reorder_ms, 100 ms).
        assert_eq!(deadline, MS + 100 * MS);
        p.in_b.release(deadline - 1, 64, |d| got.push(d[28]));
        assert_eq!(got, vec![0]);
        p.in_b.release(deadline, 64, |d| got.push(d[28]));
        assert_eq!(got, vec![0, 2]);
        assert_eq!(p.in_b.next_release(), None);
    }
}

/// Run one probe tick of A: each probe through B (which answers) and the echo back.
/// Returns how many echoes A consumed.
fn probe_round(p: &mut Pair, now: u64, lose_path2: bool) -> usize {
    let (_, probes) = p.out_a.tick(now);
    let mut consumed = 0;
    for (mut b, w) in probes {
        if lose_path2 && w.dst_ip() == IpAddr::from(B2) {
            continue;
        }
        let v = receive(&mut p.in_b, &mut b, w, from_a(w.dst_ip()), now + MS);
        let Verdict::Echo { peer, to, via } = v else {
            panic!("probe: {v:?}");
        };
        assert_eq!(
            to.ip(),
            from_a(w.dst_ip()),
            "the echo goes back where it came from"
        );
        let Verdict::Send(back) = p.out_b.echo(usize::from(peer), &mut b, to, via, now + MS) else {
            panic!("echo not sent");
        };
        // The echo arrives at A from B's address on that link.
        let src = if back.dst_ip() == IpAddr::from(A1) {
            IpAddr::from(B1)
        } else {
            IpAddr::from(B2)
        };
        if receive(&mut p.in_a, &mut b, back, src, now + 20 * MS) == Verdict::Consumed {
            consumed += 1;
        }
    }
    consumed
}

#[test]
fn probes_measure_each_path_and_a_silent_path_goes_down() {
    let mut p = pair(Scheduler::Spread, true);
    let mut now = MS;
    for _ in 0..5 {
        assert_eq!(probe_round(&mut p, now, false), 2);
        now += 100 * MS;
    }
    let m = p.out_a.multipath(0).unwrap().clone();
    for s in &m.stats {
        assert_eq!(s.state(), PathState::Up);
        assert_eq!(
            s.srtt_ns.load(Relaxed),
            20 * MS,
            "probe at now, echo back at now + 20 ms"
        );
        assert_eq!(s.echoes.load(Relaxed), 5);
    }
    for _ in 0..5 {
        probe_round(&mut p, now, true);
        now += 100 * MS;
    }
    assert_eq!(m.stats[0].state(), PathState::Up);
    assert_eq!(m.stats[1].state(), PathState::Down);
    // Everything goes on link 1 now.
    for n in 0..10 {
        let mut b = inner(n);
        assert!(matches!(
            p.out_a.process(&mut b, now),
            Verdict::Send(w) if w.dst_ip() == IpAddr::from(B1)
        ));
    }
}

#[test]
fn a_forged_or_replayed_probe_changes_no_path_state() {
    let mut p = pair(Scheduler::Spread, false);
    let (_, probes) = p.out_a.tick(MS);
    let (mut probe, w) = probes.into_iter().next().unwrap();
    let copy = probe.as_slice().to_vec();
    // A forged probe (one ciphertext bit flipped) is no probe: no echo.
    let mut forged = PacketBuf::from_slice(&copy);
    let l = forged.len();
    forged.as_mut_slice()[l - 20] ^= 1;
    assert_eq!(
        receive(&mut p.in_b, &mut forged, w, from_a(w.dst_ip()), MS),
        Verdict::Drop(DropReason::BadIcv)
    );
    // The real one is answered.
    let v = receive(&mut p.in_b, &mut probe, w, from_a(w.dst_ip()), MS);
    let Verdict::Echo { peer, to, via } = v else {
        panic!("{v:?}")
    };
    // Replayed: refused by the replay window, no second echo.
    let mut again = PacketBuf::from_slice(&copy);
    assert!(matches!(
        receive(&mut p.in_b, &mut again, w, from_a(w.dst_ip()), MS),
        Verdict::Drop(DropReason::Duplicate | DropReason::Replay)
    ));
    // The echo, forged and replayed, at A.
    let Verdict::Send(back) = p.out_b.echo(usize::from(peer), &mut probe, to, via, MS) else {
        panic!()
    };
    let echo = probe.as_slice().to_vec();
    let mut forged = PacketBuf::from_slice(&echo);
    let l = forged.len();
    forged.as_mut_slice()[l - 1] ^= 1;
    let b1 = IpAddr::from(B1);
    assert_eq!(
        receive(&mut p.in_a, &mut forged, back, b1, 5 * MS),
        Verdict::Drop(DropReason::BadIcv)
    );
    let m = p.out_a.multipath(0).unwrap().clone();
    assert_eq!(m.stats[0].echoes.load(Relaxed), 0);
    assert_eq!(
        receive(
            &mut p.in_a,
            &mut PacketBuf::from_slice(&echo),
            back,
            b1,
            5 * MS
        ),
        Verdict::Consumed
    );
    assert_eq!(m.stats[0].echoes.load(Relaxed), 1);
    let rtt = m.stats[0].srtt_ns.load(Relaxed);
    assert!(matches!(
        receive(
            &mut p.in_a,
            &mut PacketBuf::from_slice(&echo),
            back,
            b1,
            9 * MS
        ),
        Verdict::Drop(_)
    ));
    assert_eq!(m.stats[0].echoes.load(Relaxed), 1);
    assert_eq!(m.stats[0].srtt_ns.load(Relaxed), rtt);
    // From an address that is none of the peer's paths: refused before anything else.
    assert_eq!(
        receive(
            &mut p.in_a,
            &mut PacketBuf::from_slice(&echo),
            back,
            IpAddr::from([192, 0, 2, 66]),
            5 * MS
        ),
        Verdict::Drop(DropReason::WrongSource)
    );
}

#[test]
fn redundant_copies_are_duplicates_not_replays() {
    let mut p = pair(Scheduler::Redundant, true);
    let mut got = 0;
    for n in 0..20u8 {
        let mut b = inner(n);
        let v = p.out_a.process(&mut b, MS);
        let Verdict::SendEvery {
            peer,
            mask,
            inner_v6,
        } = v
        else {
            panic!("{v:?}");
        };
        assert_eq!(mask, 0b11);
        for path in 0..2 {
            let w = p.out_a.path_wire(usize::from(peer), path, inner_v6);
            let mut copy = PacketBuf::from_slice(b.as_slice());
            match receive(&mut p.in_b, &mut copy, w, from_a(w.dst_ip()), MS) {
                Verdict::ToTun => {
                    assert_eq!(path, 0, "the first copy wins");
                    got += 1;
                }
                Verdict::Drop(DropReason::Duplicate) => assert_eq!(path, 1),
                v => panic!("{v:?}"),
            }
        }
    }
    assert_eq!(got, 20);
    let stats = p.out_b.stats();
    assert_eq!(stats.drops(DropReason::Duplicate), 20);
    assert_eq!(stats.drops(DropReason::Replay), 0);
}

#[test]
fn probes_lost_on_a_dead_path_are_not_waited_for() {
    // carrier: path 1's probe (which lists path 2's) arrives; otherwise both probes are lost.
    for carrier in [true, false] {
        let mut p = pair(Scheduler::Spread, false);
        assert_eq!(probe_round(&mut p, MS, false), 2);
        // The next round: paths are up, path 1's probe carries the other's sequence number.
        let (_, probes) = p.out_a.tick(200 * MS);
        assert_eq!(
            probes.last().map(|(_, w)| w.dst_ip()),
            Some(IpAddr::from(B1))
        );
        for (mut b, w) in probes {
            if w.dst_ip() == IpAddr::from(B1) && carrier {
                let v = receive(&mut p.in_b, &mut b, w, from_a(w.dst_ip()), 201 * MS);
                assert!(matches!(v, Verdict::Echo { .. }), "{v:?}");
            }
        }
        let mut b = inner(7);
        let Verdict::Send(w) = p.out_a.process(&mut b, 202 * MS) else {
            panic!()
        };
        let v = receive(&mut p.in_b, &mut b, w, from_a(w.dst_ip()), 202 * MS);
        if carrier {
            assert_eq!(v, Verdict::ToTun, "the lost probe is not waited for");
            assert_eq!(p.in_b.next_release(), None);
        } else {
            assert_eq!(v, Verdict::Held, "two unknown gaps: the data waits");
            assert_eq!(
                p.in_b.next_release(),
                Some(302 * MS),
                "B measured no RTT: the bound"
            );
        }
    }
}

/// One probe round of B's: each of its probes answered by A, the echo back at B, so that B
/// knows its paths' RTTs.
fn b_probe_round(p: &mut Pair, now: u64) {
    let (_, probes) = p.out_b.tick(now);
    for (mut b, w) in probes {
        let src = if w.dst_ip() == IpAddr::from(A1) {
            IpAddr::from(B1)
        } else {
            IpAddr::from(B2)
        };
        let Verdict::Echo { peer, to, via } = receive(&mut p.in_a, &mut b, w, src, now + MS) else {
            panic!("probe not answered");
        };
        let Verdict::Send(back) = p.out_a.echo(usize::from(peer), &mut b, to, via, now + MS) else {
            panic!("echo not sent");
        };
        assert_eq!(
            receive(
                &mut p.in_b,
                &mut b,
                back,
                from_a(back.dst_ip()),
                now + 20 * MS
            ),
            Verdict::Consumed
        );
    }
}

/// A packet lost on a path is asked for by B (a request in an ESP dummy packet), sent again
/// by A from its copy on the fastest path other than the one that lost it, and delivered
/// when it comes (B does not hold the packets behind it for the repair).
#[test]
fn a_lost_packet_is_asked_for_and_sent_again() {
    for udp in [false, true] {
        let mut p = pair(Scheduler::Spread, udp);
        let mut now = MS;
        for _ in 0..3 {
            probe_round(&mut p, now, false);
            b_probe_round(&mut p, now);
            now += 100 * MS;
        }
        let mut got = Vec::new();
        for round in 0..2u8 {
            // Four packets alternate over the links; the second (on link 2) is lost.
            let mut sent: Vec<(PacketBuf, Wire)> = (0..4u8)
                .map(|n| {
                    let mut b = inner(4 * round + n);
                    let Verdict::Send(w) = p.out_a.process(&mut b, now) else {
                        panic!("not sent");
                    };
                    (b, w)
                })
                .collect();
            for (i, (b, w)) in sent.iter_mut().enumerate() {
                if i == 1 {
                    continue;
                }
                if receive(&mut p.in_b, b, *w, from_a(w.dst_ip()), now) == Verdict::ToTun {
                    got.push(b.as_slice()[28]);
                }
            }
            p.in_b.release(now, 64, |d| got.push(d[28]));
            let asks = p.in_b.take_asks();
            assert_eq!(asks.len(), 1, "udp {udp} round {round}: {asks:?}");
            let (peer, spi, seqs) = &asks[0];
            assert_eq!(seqs.len(), 1);
            let requests = p.out_b.nack(*peer, *spi, seqs, now);
            assert_eq!(requests.len(), 1);
            let mut repairs = Vec::new();
            for (mut b, w) in requests {
                // The request goes on B's fastest path (both are equal: the first).
                assert_eq!(w.dst_ip(), IpAddr::from(A1));
                let v = receive(&mut p.in_a, &mut b, w, IpAddr::from(B1), now + MS);
                let Verdict::Repair { peer } = v else {
                    panic!("request: {v:?}");
                };
                repairs.extend(p.out_a.repair(usize::from(peer), b.as_slice()));
            }
            assert_eq!(repairs.len(), 1);
            let (mut b, w) = repairs.pop().unwrap();
            assert_eq!(w.dst_ip(), IpAddr::from(B1), "on the fastest path");
            let v = receive(&mut p.in_b, &mut b, w, IpAddr::from(A1), now + 2 * MS);
            if v == Verdict::ToTun {
                got.push(b.as_slice()[28]);
            }
            p.in_b.release(now + 2 * MS, 64, |d| got.push(d[28]));
            // Not waited for: the two behind it went first, the repair came after them.
            let base = 4 * round;
            assert_eq!(
                got[usize::from(base)..],
                [base, base + 2, base + 3, base + 1]
            );
            now += 10 * MS;
        }
        let m = p.out_b.multipath(0).unwrap();
        assert_eq!(m.reorder.asked.load(Relaxed), 2);
        assert_eq!(m.reorder.repaired.load(Relaxed), 2);
        assert_eq!(m.reorder.gaps_skipped.load(Relaxed), 2);
        let a = p.out_a.multipath(0).unwrap();
        assert_eq!(a.stats[0].repaired.load(Relaxed), 2);
    }
}

/// A pure TCP acknowledgment (`fast_acks`, on by default) is delivered when it arrives, ahead
/// of a gap the data behind it waits for, and its place in the order is not waited for later.
#[test]
fn a_pure_ack_is_not_held_behind_a_gap() {
    let mut p = pair(Scheduler::Spread, true);
    let ack = |n: u8| {
        let len = 40;
        let mut pkt = vec![0u8; len];
        emit_ipv4_header(
            &mut pkt,
            [10, 9, 0, 1].into(),
            [10, 9, 0, 2].into(),
            6,
            len as u16,
        );
        pkt[28] = n;
        pkt[32] = 5 << 4;
        pkt[33] = 0x10;
        PacketBuf::from_slice(&pkt)
    };
    // No RTT measured yet: the schedule alternates (0 and 2 on link 1, 1 and 3 on link 2).
    let mut sent = Vec::new();
    for n in 0..4u8 {
        let mut b = if n == 2 { ack(n) } else { inner(n) };
        let Verdict::Send(w) = p.out_a.process(&mut b, MS) else {
            panic!("not sent");
        };
        sent.push((b, w));
    }
    let (link1, link2): (Vec<_>, Vec<_>) = sent
        .into_iter()
        .partition(|(_, w)| w.dst_ip() == IpAddr::from(B1));
    let mut got = Vec::new();
    let now = 2 * MS;
    // Link 1 first: 0 in order, then the acknowledgment 2 ahead of the gap at 1.
    for (mut b, w) in link1.into_iter().chain(link2) {
        match receive(&mut p.in_b, &mut b, w, from_a(w.dst_ip()), now) {
            Verdict::ToTun => got.push(b.as_slice()[28]),
            Verdict::Held => {}
            v => panic!("{v:?}"),
        }
        p.in_b.release(now, 64, |d| got.push(d[28]));
    }
    assert_eq!(got, vec![0, 2, 1, 3]);
    let m = p.out_b.multipath(0).unwrap();
    assert_eq!(m.reorder.held.load(Relaxed), 0, "nothing waited");
    assert_eq!(m.reorder.gaps_skipped.load(Relaxed), 0);
}

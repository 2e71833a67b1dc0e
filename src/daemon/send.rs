//! Sending a batch's verdicts: raw sockets and the ESP-in-UDP socket, and the hub's relay.

use super::edges::{Edges, BATCH, TX_BUFS};
use crate::buf::PacketBuf;
use crate::datapath::{Verdict, Via, Wire};
use crate::sys::capture::{Recorder, Tap};
use crate::telemetry::Generation;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

/// Wrap the packets of a batch that are for another peer (hub relaying) and send them.
pub(super) fn relay_batch(
    g: &Generation,
    bufs: &mut [PacketBuf],
    relay: &[bool],
    e: &Edges,
    rec: &mut Recorder,
    now: u64,
) {
    // `None`: not relayed (delivered or dropped before).
    let mut verdicts: [Option<Verdict>; BATCH] = [None; BATCH];
    for (i, b) in bufs.iter_mut().enumerate() {
        if relay[i] {
            verdicts[i] = Some(g.outbound.process(b, now));
        }
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        if verdicts[i] == Some(Verdict::ToTun) {
            rec.record(Tap::Inner, b.as_slice());
            if e.tun.write_packet(b, 0).is_err() {
                e.edge.tun_write_errors.fetch_add(1, Relaxed);
            }
        }
    }
    send_verdicts(bufs, &verdicts[..bufs.len()], e, g, rec);
}

/// Send every `Send` verdict of a batch: one `sendmmsg` per raw socket, and the ESP-in-UDP
/// datagrams through the UDP socket (trains of one size as single GSO messages).
pub(super) fn send_verdicts(
    bufs: &[PacketBuf],
    verdicts: &[Option<Verdict>],
    e: &Edges,
    g: &Generation,
    rec: &mut Recorder,
) -> Option<io::Error> {
    // Every (packet, wire) to send: one per `Send`, one per path of a `SendEvery` (a
    // multipath peer's `redundant` copies).
    let wires = || {
        bufs.iter().zip(verdicts).flat_map(move |(b, v)| {
            let (one, every) = match *v {
                Some(Verdict::Send(w)) => (Some(w), None),
                Some(Verdict::SendEvery {
                    peer,
                    mask,
                    inner_v6,
                }) => (None, Some((usize::from(peer), mask, inner_v6))),
                _ => (None, None),
            };
            let copies = every.into_iter().flat_map(move |(peer, mask, v6)| {
                (0..32)
                    .filter(move |i| mask & (1 << i) != 0)
                    .map(move |i| g.outbound.path_wire(peer, i, v6))
            });
            one.into_iter().chain(copies).map(move |w| (b, w))
        })
    };
    if rec.wants(Tap::Outer) {
        for (b, w) in wires() {
            let dst = w.dst_ip();
            let src = |d: &IpAddr| w.via().src.unwrap_or_else(|| g.source_for(d));
            match w {
                Wire::EspInUdp { dst, .. } => {
                    let port = e
                        .udp
                        .iter()
                        .find(|u| u.is_v6() == dst.is_ipv6())
                        .map_or(0, |u| u.port());
                    let from = SocketAddr::new(src(&dst.ip()), port);
                    rec.record_udp(from, dst, b.as_slice());
                }
                w => rec.record_outer(src(&dst), dst, w.protocol(), b.as_slice()),
            }
        }
    }
    let mut last_err = None;
    // The AF_PACKET fast path: a destination with a resolved next hop whose outer packet fits
    // the interface goes through the AF_PACKET socket; the rest through the raw socket.
    let hops = e.hops.load();
    for s in e.sockets {
        let (proto, v6) = (s.protocol(), s.is_v6());
        // A raw socket carries one protocol (50, 4 or 41; never 17) over one IP version.
        let pending = || {
            wires().filter_map(move |(b, w)| {
                let dst = w.dst_ip();
                (w.protocol() == proto && dst.is_ipv6() == v6).then(|| (b.as_slice(), dst, w.via()))
            })
        };
        let want = pending().count();
        if want == 0 {
            continue;
        }
        let mut fast_sent = 0;
        if !e.packet.is_empty() && !hops.0.is_empty() {
            for p in e.packet {
                // (A packet whose source or interface differs from the routed next hop's
                // leaves by the raw socket: the next hops are resolved per destination, not
                // per way out.)
                let mine = pending().filter_map(|(pkt, dst, via)| {
                    hops.get(dst)
                        .filter(|h| leaves_as(via, h) && p.takes(h, pkt.len()))
                        .map(|h| (h, proto, pkt))
                });
                let n = mine.clone().count();
                if n == 0 {
                    continue;
                }
                fast_sent += n;
                count_sent(e, n, p.send_batch(mine), &mut last_err);
            }
        }
        let fast = |pkt: &[u8], dst, via: Via| {
            hops.get(dst).is_some_and(|h| {
                leaves_as(via, h) && e.packet.iter().any(|p| p.takes(h, pkt.len()))
            })
        };
        s.send_batch(
            pending().filter(|&(pkt, dst, via)| !fast(pkt, dst, via)),
            |dst, via, err| {
                refused(e, g, dst, via, 1);
                last_err = Some(io::Error::new(err.kind(), format!("to {dst}: {err}")));
            },
        );
        e.edge.af_packet_sends.fetch_add(fast_sent as u64, Relaxed);
    }
    for u in e.udp {
        let none = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0);
        let mut items = [(&[][..], none, Via::ROUTED); TX_BUFS];
        let mut want = 0;
        let mut flush = |items: &[(&[u8], SocketAddr, Via)]| {
            let sent = u.send_datagrams(items, |dst, via, n, err| {
                refused(e, g, dst.ip(), via, n as u64);
                last_err = Some(io::Error::new(err.kind(), format!("to {dst}: {err}")));
            });
            e.edge.udp_gso_sends.fetch_add(sent.trains as u64, Relaxed);
        };
        for (b, w) in wires() {
            if let Wire::EspInUdp { dst, via } = w {
                if dst.is_ipv6() == u.is_v6() {
                    items[want] = (b.as_slice(), dst, via);
                    want += 1;
                    // Copies to several paths can outnumber the batch.
                    if want == items.len() {
                        flush(&items[..want]);
                        want = 0;
                    }
                }
            }
        }
        if want > 0 {
            flush(&items[..want]);
        }
    }
    last_err
}

/// Count what a socket refused of the `want` packets it was given (`result`: how many it
/// took, or the error when it took none).
fn count_sent(e: &Edges, want: usize, result: io::Result<usize>, last_err: &mut Option<io::Error>) {
    match result {
        Ok(sent) => {
            e.edge
                .send_errors
                .fetch_add((want - sent.min(want)) as u64, Relaxed);
        }
        Err(err) => {
            e.edge.send_errors.fetch_add(want as u64, Relaxed);
            *last_err = Some(err);
        }
    }
}

/// Count `n` packets to `dst` (by `via`) the kernel refused: in the edge's total and, for a
/// multipath peer, against the path with that endpoint and way out.
fn refused(e: &Edges, g: &Generation, dst: IpAddr, via: Via, n: u64) {
    e.edge.send_errors.fetch_add(n, Relaxed);
    g.outbound.count_refused(dst, via, n);
}

/// Whether a packet sent by `via` leaves as the routed next hop `h` would send it (same
/// source, same interface), so the AF_PACKET fast path may frame it.
fn leaves_as(via: Via, h: &espip_sys::packet::NextHop) -> bool {
    via.src.map_or(true, |s| s == h.src) && (via.ifindex == 0 || via.ifindex == h.ifindex)
}

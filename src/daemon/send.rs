//! Sending a batch's verdicts: raw sockets and the ESP-in-UDP socket, and the hub's relay.

use super::tx::TX_BUFS;
use super::workers::Edges;
use super::BATCH;
use crate::buf::PacketBuf;
use crate::datapath::{DropReason, Outbound, Verdict};
use crate::sys::capture::{Recorder, Tap};
use crate::wire::ip::PROTO_UDP;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::sync::atomic::Ordering::Relaxed;

/// Wrap the packets of a batch that are for another peer (hub relaying) and send them.
pub(super) fn relay_batch(
    out: &Outbound,
    bufs: &mut [PacketBuf],
    relay: &[bool],
    e: &Edges,
    rec: &mut Recorder,
    now: u64,
) {
    let mut verdicts = [Verdict::Drop(DropReason::Dummy); BATCH];
    for (i, b) in bufs.iter_mut().enumerate() {
        if relay[i] {
            verdicts[i] = out.process(b, now);
        }
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        if verdicts[i] == Verdict::ToTun {
            rec.record(Tap::Inner, b.as_slice());
            if e.tun.write_packet(b, 0).is_err() {
                e.edge.tun_write_errors.fetch_add(1, Relaxed);
            }
        }
    }
    send_verdicts(bufs, &verdicts[..bufs.len()], e, rec);
}

/// Send every `Send` verdict of a batch: one `sendmmsg` per raw socket, and the ESP-in-UDP
/// datagrams through the UDP socket (trains of one size as single GSO messages).
pub(super) fn send_verdicts(
    bufs: &[PacketBuf],
    verdicts: &[Verdict],
    e: &Edges,
    rec: &mut Recorder,
) -> Option<io::Error> {
    let source = |dst: &Ipv4Addr| {
        e.sent_from
            .iter()
            .find(|(ep, _)| ep == dst)
            .map_or(Ipv4Addr::UNSPECIFIED, |(_, s)| *s)
    };
    if rec.wants(Tap::Outer) {
        for (b, v) in bufs.iter().zip(verdicts) {
            match v {
                Verdict::Send {
                    endpoint: IpAddr::V4(dst),
                    protocol: PROTO_UDP,
                    port,
                } => {
                    let from = SocketAddrV4::new(source(dst), e.udp.map_or(0, |u| u.port()));
                    rec.record_udp(from, SocketAddrV4::new(*dst, *port), b.as_slice());
                }
                Verdict::Send {
                    endpoint: IpAddr::V4(dst),
                    protocol,
                    ..
                } => rec.record_sent(source(dst), *dst, *protocol, b.as_slice()),
                _ => {}
            }
        }
    }
    let mut last_err = None;
    for s in e.sockets {
        let proto = s.protocol();
        let is_ours = |v: &Verdict| matches!(v, Verdict::Send { protocol, endpoint: IpAddr::V4(_), .. } if *protocol == proto);
        let want = verdicts.iter().filter(|v| is_ours(v)).count();
        if want == 0 {
            continue;
        }
        let pending = bufs.iter().zip(verdicts).filter_map(|(b, v)| match v {
            Verdict::Send {
                endpoint: IpAddr::V4(dst),
                protocol,
                ..
            } if *protocol == proto => Some((b.as_slice(), *dst)),
            _ => None,
        });
        match s.send_batch(pending) {
            Ok(sent) => {
                e.edge
                    .send_errors
                    .fetch_add((want - sent.min(want)) as u64, Relaxed);
            }
            Err(err) => {
                e.edge.send_errors.fetch_add(want as u64, Relaxed);
                last_err = Some(err);
            }
        }
    }
    if let Some(u) = e.udp {
        let mut items = [(&[][..], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); TX_BUFS];
        let mut want = 0;
        for (b, v) in bufs.iter().zip(verdicts) {
            if let Verdict::Send {
                endpoint: IpAddr::V4(dst),
                protocol: PROTO_UDP,
                port,
            } = v
            {
                items[want] = (b.as_slice(), SocketAddrV4::new(*dst, *port));
                want += 1;
            }
        }
        if want > 0 {
            let sent = u.send_datagrams(&items[..want]);
            e.edge
                .send_errors
                .fetch_add((want - sent.datagrams.min(want)) as u64, Relaxed);
            e.edge.udp_gso_sends.fetch_add(sent.trains as u64, Relaxed);
            if sent.error.is_some() {
                last_err = sent.error;
            }
        }
    }
    last_err
}

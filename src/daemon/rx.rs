//! The RX thread: the peers towards the TUN.
//!
//! 1. wait for the raw sockets, the UDP socket (or the stop eventfd);
//! 2. `recvmmsg` a batch; strip the outer IPv4 header (raw) or split UDP GRO trains (UDP);
//! 3. `Inbound::process` each packet: SA lookup, replay check, decryption, replay advance,
//!    inner checks, NAT;
//! 4. write what is for this host to the TUN, consecutive TCP segments of a flow coalesced
//!    into one GSO write (`gro`); on a hub, relay what is for another peer.
//!
//! One RX thread runs per daemon.

use super::edges::{debug_panic_requested, wait, Edges, BATCH, XSK_SLOTS};
use super::send::{relay_batch, send_verdicts};
use crate::buf::{PacketBuf, MAX_PACKET};
use crate::datapath::{Inbound, Landing, Verdict};
use crate::gso::GsoError;
use crate::sys::capture::{Recorder, Tap};
use crate::sys::grorx::{GroSocket, LocalCheck, Merged};
use crate::sys::raw::{strip_ipv4, strip_ipv6, Outer, RawSocket};
use crate::sys::tun::Tun;
use crate::sys::udp::UdpEncapSocket;
use crate::sys::xsk::{XdpRx, Xsk};
use crate::telemetry::{EdgeStats, Generation, RateLimit};
use crate::wire::ip::PROTO_UDP;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tracing::{debug, warn};

/// Messages per `recvmmsg` on the ESP-in-UDP socket; each may carry a coalesced train of up
/// to 64 KB, split into [`BATCH`]-sized batches for the core.
pub(super) const UDP_MSGS: usize = 8;

/// Descriptors polled: the stop eventfd, the raw sockets (50; 4 and 41; over IPv4 and IPv6:
/// at most six), a UDP socket per family, the merged IP-in-IP socket per family, and the
/// `AF_XDP` sockets.
const POLL_SLOTS: usize = 11 + XSK_SLOTS;

/// An Ethernet header (the XDP program passes VLAN-tagged frames to the stack).
const ETHERNET_HEADER: usize = 14;

/// Pieces of merged IP-in-IP packets held before they go to the core (64 KB of 536-byte TCP
/// segments is 123; Linux's UDP GRO stops at 64 datagrams; a packet of more is cut in turns).
const MAX_SEGMENTS: usize = 128;

/// The outer source and protocol of a received packet (`None`: its outer header was bad).
pub(super) type Origin = Option<(IpAddr, u8)>;

/// The RX thread's buffers, allocated once.
struct RxBufs {
    /// A batch for the core.
    bufs: Vec<PacketBuf>,
    /// Outer source and protocol of each packet of the batch.
    origin: [Origin; BATCH],
    /// The sender of each packet from an IPv6 raw socket (from the message's address).
    from: [Option<IpAddr>; BATCH],
    /// Where each packet landed (destination, interface), as far as known.
    landing: [Landing; BATCH],
    /// The UDP source port of each packet of a batch from the ESP-in-UDP socket.
    ports: [u16; BATCH],
    /// Messages of one `recvmmsg` on the UDP socket (each may be a GRO train).
    wire: Vec<PacketBuf>,
    /// Their source and segment size.
    meta: [crate::sys::udp::Received; UDP_MSGS],
    /// A merged IP-in-IP packet and the packets it is cut back into (only with a
    /// [`GroSocket`]).
    merged: Option<(PacketBuf, Vec<PacketBuf>)>,
    /// Whether an outer destination is this host's (the merged packets' socket sees all).
    local: LocalCheck,
}

impl RxBufs {
    fn new(udp: bool, merged: bool) -> RxBufs {
        RxBufs {
            bufs: (0..BATCH).map(|_| PacketBuf::new(MAX_PACKET)).collect(),
            origin: [None; BATCH],
            from: [None; BATCH],
            landing: [Landing::UNKNOWN; BATCH],
            ports: [0; BATCH],
            wire: if udp {
                (0..UDP_MSGS).map(|_| PacketBuf::new(MAX_PACKET)).collect()
            } else {
                Vec::new()
            },
            meta: [crate::sys::udp::Received {
                landing: Landing::UNKNOWN,
                from: SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
                segment: 0,
                truncated: false,
            }; UDP_MSGS],
            merged: merged.then(|| {
                let segs = (0..MAX_SEGMENTS).map(|_| PacketBuf::new(MAX_PACKET));
                (PacketBuf::new(MAX_PACKET), segs.collect())
            }),
            local: LocalCheck::default(),
        }
    }
}

pub(super) fn rx_loop(
    mut inb: Inbound,
    mut xdp: Vec<XdpRx>,
    e: &Edges,
    rec: &mut Recorder,
    clock: Instant,
) {
    let mut b = RxBufs::new(
        !e.udp.is_empty(),
        e.sockets.iter().any(|s| s.merged().is_some()),
    );
    let mut rx = RxState {
        inb: &mut inb,
        gen: e.current.load_full(),
        e,
        warn_write: RateLimit::default(),
    };
    let panic_hook = debug_panic_requested("rx");
    let mut xdp_stats_at = 0u64;
    loop {
        // The stop eventfd, up to three raw sockets and a UDP socket per address family, on
        // the stack (no allocation per wake-up); unused slots repeat the eventfd and are not
        // polled.
        let pollin = |fd| PollFd::new(fd, PollFlags::POLLIN);
        let mut fds: [PollFd; POLL_SLOTS] = std::array::from_fn(|_| pollin(e.stop.as_fd()));
        let mut count = 1;
        for fd in e
            .sockets
            .iter()
            .map(|s| s.as_fd())
            .chain(e.udp.iter().map(|u| u.as_fd()))
            .chain(
                e.sockets
                    .iter()
                    .filter_map(|s| s.merged())
                    .map(|g| g.as_fd()),
            )
            .take(POLL_SLOTS - 1)
        {
            fds[count] = pollin(fd);
            count += 1;
        }
        // The AF_XDP sockets last (`setup::open_xdp` keeps them within XSK_SLOTS).
        let first_xsk = count;
        for k in xdp.iter().flat_map(|x| &x.xsks).take(POLL_SLOTS - count) {
            fds[count] = pollin(k.as_fd());
            count += 1;
        }
        let fds = &mut fds[..count];
        // Held packets (a multipath peer's reorder stage) are released at their deadline even
        // when nothing arrives.
        let timeout = match rx.inb.next_release() {
            None => PollTimeout::NONE,
            Some(at) => {
                let left = at.saturating_sub(clock.elapsed().as_nanos() as u64);
                PollTimeout::from(left.div_ceil(1_000_000).min(1000) as u16)
            }
        };
        if !wait(fds, timeout, "the sockets") {
            return;
        }
        if panic_hook {
            panic!("ESPIP_DEBUG_PANIC=rx (the supervision test's hook)");
        }
        rx.follow_handoff();
        rx.gen = e.current.load_full();
        let mut ready = [false; POLL_SLOTS];
        for (r, f) in ready.iter_mut().zip(&fds[1..]) {
            *r = f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
        }
        let now = clock.elapsed().as_nanos() as u64;
        let xsks = xdp.iter_mut().flat_map(|x| &mut x.xsks);
        for (k, _) in xsks.zip(&ready[first_xsk - 1..]).filter(|(_, r)| **r) {
            drain_xsk(k, &mut b, &mut rx, rec, now);
        }
        // What the kernel could not hand the AF_XDP sockets, once a second.
        if !xdp.is_empty() && now.saturating_sub(xdp_stats_at) >= 1_000_000_000 {
            xdp_stats_at = now;
            let dropped = xdp.iter().flat_map(|x| &x.xsks).map(Xsk::dropped).sum();
            e.edge.xdp_dropped.store(dropped, Relaxed);
        }
        for (s, _) in e.sockets.iter().zip(ready).filter(|(_, r)| *r) {
            drain_raw(s, &mut b, &mut rx, rec, now);
        }
        for (u, _) in e
            .udp
            .iter()
            .zip(&ready[e.sockets.len()..])
            .filter(|(_, r)| **r)
        {
            drain_udp(u, &mut b, &mut rx, rec, now);
        }
        let merged = e.sockets.iter().filter_map(|s| s.merged());
        for (g, _) in merged
            .zip(&ready[e.sockets.len() + e.udp.len()..])
            .filter(|(_, r)| **r)
        {
            drain_merged(g, &mut b, &mut rx, rec, now);
        }
        let now = clock.elapsed().as_nanos() as u64;
        rec.begin_batch();
        rx.release(&mut b.bufs, rec, now);
        rec.flush();
    }
}

/// Take the frames of an `AF_XDP` socket (`sys::xsk`) until none is left, a batch at a time:
/// each loses its Ethernet header, then its outer IPv4 header (checked as the kernel's IP input
/// would have: version, lengths, header checksum) or IPv6 header (the XDP program passed only
/// packets with no extension header), and goes to the core like a raw socket's packet.
fn drain_xsk(k: &mut Xsk, b: &mut RxBufs, rx: &mut RxState, rec: &mut Recorder, now: u64) {
    loop {
        let bufs = &mut b.bufs;
        let n = k.recv(BATCH, |i, frame| {
            let buf = &mut bufs[i];
            buf.reset();
            let ip = frame.get(ETHERNET_HEADER..).unwrap_or(&[]);
            let area = buf.read_area();
            let len = ip.len().min(area.len());
            area[..len].copy_from_slice(&ip[..len]);
            buf.set_len(len);
        });
        if n == 0 {
            break;
        }
        rec.begin_batch();
        let pkts = b.bufs[..n].iter_mut().zip(b.origin.iter_mut());
        for ((buf, o), at) in pkts.zip(b.landing.iter_mut()) {
            rec.record(Tap::Outer, buf.as_slice());
            let p = buf.as_slice();
            *o = match p.first().map(|v| v >> 4) {
                Some(4) => strip_ipv4(buf, true),
                Some(6) => strip_ipv6(buf),
                _ => None,
            }
            .map(|h| {
                *at = Landing {
                    dst: Some(h.dst),
                    ifindex: 0,
                };
                (h.src, h.protocol)
            });
            if o.is_none() {
                rx.e.edge.bad_outer.fetch_add(1, Relaxed);
            }
        }
        rx.e.edge.xdp_receives.fetch_add(n as u64, Relaxed);
        rx.batch(
            &mut b.bufs[..n],
            &b.origin[..n],
            &[],
            &b.landing[..n],
            rec,
            now,
        );
        rec.flush();
        if n < BATCH {
            break;
        }
    }
}

/// Receive from a raw socket until it is empty, a batch at a time.
fn drain_raw(s: &RawSocket, b: &mut RxBufs, rx: &mut RxState, rec: &mut Recorder, now: u64) {
    loop {
        let n = match s.recv_batch(&mut b.bufs, &mut b.from, &mut b.landing) {
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                debug!("recvmmsg: {err}");
                break;
            }
        };
        rec.begin_batch();
        let pkts = b.bufs[..n].iter_mut().zip(b.origin.iter_mut());
        for ((buf, o), (from, at)) in pkts.zip(b.from.iter().zip(b.landing.iter_mut())) {
            *o = if s.is_v6() {
                // The kernel removed the IPv6 header; the tap shows it rebuilt.
                from.map(|src| {
                    let dst = at.dst.unwrap_or_else(|| rx.gen.source_for(&src));
                    rec.record_outer(src, dst, s.protocol(), buf.as_slice());
                    (src, s.protocol())
                })
            } else {
                rec.record(Tap::Outer, buf.as_slice());
                strip_ipv4(buf, false).map(|h| {
                    *at = Landing {
                        dst: Some(h.dst),
                        ifindex: 0,
                    };
                    (h.src, h.protocol)
                })
            };
            if o.is_none() {
                rx.e.edge.bad_outer.fetch_add(1, Relaxed);
            }
        }
        rx.batch(
            &mut b.bufs[..n],
            &b.origin[..n],
            &[],
            &b.landing[..n],
            rec,
            now,
        );
        rec.flush();
        if n < b.bufs.len() {
            break;
        }
    }
}

/// Receive the IP-in-IP packets that the kernel's GRO merged (`sys::grorx`) until none is
/// left: each is checked like a raw socket's packet (outer header, destination on this host),
/// cut back into the packets it was made of with the segment size the kernel reports (TCP:
/// the sequence numbers and checksums of each; UDP: the original datagrams), and those go to
/// the core like any batch (and are coalesced again for the TUN write).
fn drain_merged(g: &GroSocket, b: &mut RxBufs, rx: &mut RxState, rec: &mut Recorder, now: u64) {
    let Some((pkt, segs)) = b.merged.as_mut() else {
        return;
    };
    let edge = rx.e.edge;
    // The pieces of several merged packets, with their outer source, go to the core together
    // (a batch at a time), so that the TUN writes coalesce across them.
    let mut origin: [Origin; MAX_SEGMENTS] = [None; MAX_SEGMENTS];
    let mut n = 0;
    rec.begin_batch();
    for _ in 0..BATCH {
        let m = match g.recv(pkt) {
            Ok(Some(m)) => m,
            Ok(None) => continue,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                debug!("recvfrom (merged IP-in-IP): {err}");
                break;
            }
        };
        rec.record(Tap::Outer, pkt.as_slice());
        let outer = if g.is_v6() {
            strip_ipv6(pkt)
        } else {
            strip_ipv4(pkt, false)
        };
        let Some(Outer {
            src,
            dst,
            protocol: proto,
        }) = outer
        else {
            edge.bad_outer.fetch_add(1, Relaxed);
            continue;
        };
        if !matches!(proto, 4 | 41) || !b.local.is_local(dst, now) {
            edge.bad_outer.fetch_add(1, Relaxed);
            continue;
        }
        // A packet of more pieces than the buffers left is cut in turns.
        let mut first = 0;
        loop {
            if n == MAX_SEGMENTS {
                flush_pieces(&mut segs[..n], &origin[..n], rx, rec, now);
                n = 0;
            }
            match cut_back(&m, pkt, first, &mut segs[n..]) {
                Ok((k, total)) => {
                    origin[n..n + k].fill(Some((src, proto)));
                    n += k;
                    first += k;
                    if first >= total {
                        edge.ipip_gro_receives.fetch_add(1, Relaxed);
                        break;
                    }
                }
                Err(_) => {
                    edge.offload_errors.fetch_add(1, Relaxed);
                    break;
                }
            }
        }
    }
    flush_pieces(&mut segs[..n], &origin[..n], rx, rec, now);
    rec.flush();
}

/// Cut a merged packet back into `out`, from piece `first` on, with the segment size its
/// `virtio_net_hdr` gives: (pieces cut, pieces in all).
fn cut_back(
    m: &Merged,
    pkt: &PacketBuf,
    first: usize,
    out: &mut [PacketBuf],
) -> Result<(usize, usize), GsoError> {
    use crate::gso::{
        segment_tcp_from, segment_udp_from, GSO_ECN, GSO_TCPV4, GSO_TCPV6, GSO_UDP_L4,
    };
    let size = usize::from(m.vnet.gso_size);
    match m.vnet.gso_type & !GSO_ECN {
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp_from(pkt.as_slice(), size, first, out),
        GSO_UDP_L4 => segment_udp_from(pkt.as_slice(), size, first, out),
        _ => Err(GsoError::Unsupported),
    }
}

/// Run cut-back pieces through the core, [`BATCH`] at a time.
fn flush_pieces(
    segs: &mut [PacketBuf],
    origin: &[Origin],
    rx: &mut RxState,
    rec: &mut Recorder,
    now: u64,
) {
    for (chunk, o) in segs.chunks_mut(BATCH).zip(origin.chunks(BATCH)) {
        rx.batch(chunk, o, &[], &[], rec, now);
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Receive from the ESP-in-UDP socket until it is empty; each GRO train is split into its
/// datagrams, which go to the core in batches.
fn drain_udp(u: &UdpEncapSocket, b: &mut RxBufs, rx: &mut RxState, rec: &mut Recorder, now: u64) {
    let e = rx.e;
    loop {
        let m = match u.recv_batch(&mut b.wire, &mut b.meta) {
            Ok(m) => m,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                debug!("recvmmsg (UDP): {err}");
                break;
            }
        };
        rec.begin_batch();
        let mut n = 0;
        for (w, r) in b.wire[..m].iter().zip(&b.meta[..m]) {
            if r.truncated {
                e.edge.bad_outer.fetch_add(1, Relaxed);
                continue;
            }
            if r.segment < w.len() {
                e.edge.udp_gro_receives.fetch_add(1, Relaxed);
            }
            let here_ip = r
                .landing
                .dst
                .unwrap_or_else(|| rx.gen.source_for(&r.from.ip()));
            let here = SocketAddr::new(here_ip, u.port());
            // A coalesced train: each datagram becomes its own packet for the core (an empty
            // datagram too: the core counts it malformed).
            let whole = w.as_slice();
            let datagrams = whole.chunks(r.segment.max(1));
            for d in datagrams.chain(whole.is_empty().then_some(whole)) {
                rec.record_udp(r.from, here, d);
                // IKE behind the non-ESP marker (RFC 3948 section 2.2): to the IKE edge when a
                // peer is keyed by IKEv2 and the sender is one (the source filter runs before
                // the queue, so strangers cannot fill it; a full queue drops it: IKE
                // retransmits); otherwise the core counts it as `non_esp`.
                if let (Some(tx), [0, 0, 0, 0, msg @ ..]) = (e.natt, d) {
                    if !rx.gen.cfg.is_ike_endpoint(canonical_ip(r.from.ip())) && !movable(e, msg) {
                        e.edge.ike_foreign.fetch_add(1, Relaxed);
                    } else if tx.try_send((msg.to_vec(), r.from, r.landing.dst)).is_err() {
                        e.edge.ike_queue_full.fetch_add(1, Relaxed);
                    }
                    continue;
                }
                let buf = &mut b.bufs[n];
                buf.reset();
                buf.read_area()[..d.len()].copy_from_slice(d);
                buf.set_len(d.len());
                b.origin[n] = Some((r.from.ip(), PROTO_UDP));
                b.ports[n] = r.from.port();
                b.landing[n] = r.landing;
                n += 1;
                if n == BATCH {
                    let (o, p, l) = (&b.origin[..n], &b.ports[..n], &b.landing[..n]);
                    rx.batch(&mut b.bufs[..n], o, p, l, rec, now);
                    n = 0;
                }
            }
        }
        if n > 0 {
            let (o, p, l) = (&b.origin[..n], &b.ports[..n], &b.landing[..n]);
            rx.batch(&mut b.bufs[..n], o, p, l, rec, now);
        }
        rec.flush();
        if m < b.wire.len() {
            break;
        }
    }
}

/// Write the packets `bufs[i]` for `i` in `deliver` to the TUN, in order; `plain[i]`: the
/// packet came without an AEAD (IP-in-IP), so it joins a coalesced write only with a right
/// checksum (`gro::checksum_ok`; empty: every packet was authenticated). With TUN offloads,
/// consecutive TCP segments of one flow go as one large packet (GRO, `crate::gro`), and so do
/// consecutive UDP datagrams of one flow and size when the kernel took USO: the new headers
/// and each segment's payload in one `writev`, no copy.
pub(super) fn write_coalesced(
    queues: &[Tun],
    bufs: &mut [PacketBuf],
    deliver: &[usize],
    plain: &[bool],
    edge: &EdgeStats,
) -> io::Result<()> {
    use crate::gro;
    let plain_at = |i: usize| plain.get(i).copied().unwrap_or(false);
    let mut last_err = Ok(());
    let mut fail = |r: io::Result<()>| {
        if let Err(e) = r {
            edge.tun_write_errors.fetch_add(1, Relaxed);
            last_err = Err(e);
        }
    };
    // With several TUN queues, a flow's packets always go to the same one (the kernel then
    // sends the flow's packets the other way to that queue's TX thread).
    let tun = |b: &PacketBuf| match queues.len() {
        1 => &queues[0],
        n => {
            let h = crate::wire::ip::flow_hash_symmetric(b.as_slice());
            &queues[((u64::from(h) * n as u64) >> 32) as usize]
        }
    };
    if !queues[0].vnet() {
        for &i in deliver {
            let t = tun(&bufs[i]);
            fail(t.write_packet(&mut bufs[i], 0));
        }
        return last_err;
    }
    let uso = queues[0].uso();
    let mut k = 0;
    while k < deliver.len() {
        let first = deliver[k];
        let mut end = k + 1;
        let mut group = None;
        let start = gro::segment(bufs[first].as_slice()).filter(|s| {
            (uso || !s.udp) && (!plain_at(first) || gro::checksum_ok(bufs[first].as_slice(), s))
        });
        if let Some(fs) = start {
            let (mut ls, mut total) = (fs, bufs[first].len());
            while let Some(&nx) = deliver.get(end) {
                let Some(ns) = gro::segment(bufs[nx].as_slice()) else {
                    break;
                };
                if plain_at(nx) && !gro::checksum_ok(bufs[nx].as_slice(), &ns) {
                    break;
                }
                if !gro::can_merge(
                    bufs[first].as_slice(),
                    &fs,
                    &ls,
                    total,
                    bufs[nx].as_slice(),
                    &ns,
                ) {
                    break;
                }
                total += ns.payload;
                ls = ns;
                end += 1;
            }
            group = Some((fs, ls, total));
        }
        match group {
            Some((fs, ls, total)) if end - k > 1 => {
                let mut hdr = [0u8; gro::MAX_HEADERS];
                let v = gro::merged_headers(bufs[first].as_slice(), &fs, total, ls.psh, &mut hdr);
                let mut vh = [0u8; crate::gso::VNET_HDR_LEN];
                v.emit(&mut vh);
                let mut parts: [io::IoSlice<'_>; BATCH + 2] = [io::IoSlice::new(&[]); BATCH + 2];
                parts[0] = io::IoSlice::new(&vh);
                parts[1] = io::IoSlice::new(&hdr[..fs.hdr_len]);
                for (slot, &i) in parts[2..].iter_mut().zip(&deliver[k..end]) {
                    *slot = io::IoSlice::new(&bufs[i].as_slice()[fs.hdr_len..]);
                }
                fail(tun(&bufs[first]).send_vectored(&parts[..2 + end - k]));
                edge.gro_packets.fetch_add(1, Relaxed);
            }
            _ => {
                let t = tun(&bufs[first]);
                fail(t.write_packet(&mut bufs[first], 0))
            }
        }
        k = end;
    }
    last_err
}

/// What the RX thread keeps between batches.
pub(super) struct RxState<'a, 'e> {
    inb: &'a mut Inbound,
    /// The generation of this wake-up (relaying, tap sources).
    gen: std::sync::Arc<Generation>,
    e: &'a Edges<'e>,
    warn_write: RateLimit,
}

impl RxState<'_, '_> {
    /// A reload or an IKEv2 rekey: the new inbound half takes over the continuing SAs' replay
    /// windows (and the reorder stages) before it sees a packet; the generation (relay, tap
    /// sources) is refreshed. Checked before every batch: under sustained load the sockets
    /// never run dry, and an SA the peer already uses must not wait for a quiet moment.
    fn follow_handoff(&mut self) {
        if let Some(mut next) = self.e.handoff.take() {
            next.adopt(self.inb);
            *self.inb = next;
            self.gen = self.e.current.load_full();
        }
    }

    /// Run a batch of received packets (outer headers removed) through the core and deliver
    /// them: to the TUN (coalesced where possible) or, on a hub, on to another peer. `ports`:
    /// the UDP source ports of a batch from the ESP-in-UDP socket (empty for raw sockets);
    /// `landing`: where each packet landed (empty: not known).
    fn batch(
        &mut self,
        bufs: &mut [PacketBuf],
        origin: &[Origin],
        ports: &[u16],
        landing: &[Landing],
        rec: &mut Recorder,
        now: u64,
    ) {
        self.follow_handoff();
        let e = self.e;
        let mut relay = [false; BATCH];
        let mut any_relay = false;
        let mut deliver = [0usize; BATCH];
        let mut plain = [false; BATCH];
        let mut dn = 0;
        for (i, (b, o)) in bufs.iter_mut().zip(origin).enumerate() {
            let Some((src, proto)) = *o else {
                continue;
            };
            let at = landing.get(i).copied().unwrap_or(Landing::UNKNOWN);
            let v = match ports.get(i) {
                Some(&port) => self
                    .inb
                    .process_udp_at(b, SocketAddr::new(src, port), at, now),
                None => self.inb.process_at(b, src, proto, at, now),
            };
            match v {
                Verdict::ToTun => {
                    rec.record(Tap::Inner, b.as_slice());
                    // IP-in-IP (raw protocol 4 / 41): no AEAD vouched for it.
                    plain[i] = ports.get(i).is_none() && matches!(proto, 4 | 41);
                    deliver[dn] = i;
                    dn += 1;
                }
                Verdict::Relay => {
                    relay[i] = true;
                    any_relay = true;
                }
                Verdict::Echo { peer, to, via } => {
                    // A multipath probe: the echo goes back at once, on the path it came by.
                    let v = self.gen.outbound.echo(usize::from(peer), b, to, via, now);
                    if matches!(v, Verdict::Send(_)) {
                        send_verdicts(std::slice::from_ref(&*b), &[Some(v)], e, &self.gen, rec);
                    }
                }
                Verdict::Repair { peer } => {
                    // The peer asks for lost packets: the kept copies go at once.
                    let out = self.gen.outbound.repair(usize::from(peer), b.as_slice());
                    self.send_control(out, rec);
                }
                _ => {}
            }
        }
        if let Err(err) = write_coalesced(e.queues, bufs, &deliver[..dn], &plain, e.edge) {
            if self.warn_write.ready() {
                warn!("writing to the TUN failed: {err}");
            }
        }
        if any_relay {
            relay_batch(&self.gen, bufs, &relay[..bufs.len()], e, rec, now);
        }
        self.release(bufs, rec, now);
    }

    /// Send control packets the core made (requests for lost packets, their repairs).
    fn send_control(&self, out: Vec<(PacketBuf, crate::datapath::Wire)>, rec: &mut Recorder) {
        for (b, w) in out {
            let v = [Some(Verdict::Send(w))];
            send_verdicts(std::slice::from_ref(&b), &v, self.e, &self.gen, rec);
        }
    }

    /// [`RxState::release_held`], then ask the peers for the packets the reorder stages found
    /// lost.
    fn release(&mut self, bufs: &mut [PacketBuf], rec: &mut Recorder, now: u64) {
        self.release_held(bufs, rec, now);
        for (peer, spi, seqs) in self.inb.take_asks() {
            let out = self.gen.outbound.nack(peer, spi, &seqs, now);
            self.send_control(out, rec);
        }
    }

    /// Write the packets of the reorder stages whose turn has come to the TUN, in order,
    /// `bufs.len()` at a time (coalesced like any batch).
    fn release_held(&mut self, bufs: &mut [PacketBuf], rec: &mut Recorder, now: u64) {
        const ALL: [usize; BATCH] = {
            let mut a = [0; BATCH];
            let mut i = 0;
            while i < BATCH {
                a[i] = i;
                i += 1;
            }
            a
        };
        let room = bufs.len().min(BATCH);
        loop {
            let mut k = 0;
            let n = self.inb.release(now, room, |pkt| {
                let b = &mut bufs[k];
                b.reset();
                b.read_area()[..pkt.len()].copy_from_slice(pkt);
                b.set_len(pkt.len());
                k += 1;
            });
            if n == 0 {
                return;
            }
            for b in &bufs[..n] {
                rec.record(Tap::Inner, b.as_slice());
            }
            // Only ESP peers have reorder stages: every packet here was authenticated.
            if let Err(err) = write_coalesced(self.e.queues, bufs, &ALL[..n], &[], self.e.edge) {
                if self.warn_write.ready() {
                    warn!("writing to the TUN failed: {err}");
                }
            }
            if n < room {
                return;
            }
        }
    }
}

/// Whether an IKE message names (by its SPIs) an IKE SA that may move (MOBIKE), so its
/// source need not be a peer's endpoint.
fn movable(e: &Edges, msg: &[u8]) -> bool {
    let (Some(i), Some(r)) = (msg.get(..8), msg.get(8..16)) else {
        return false;
    };
    let spis = (
        u64::from_be_bytes(i.try_into().expect("8 bytes")),
        u64::from_be_bytes(r.try_into().expect("8 bytes")),
    );
    spis.1 != 0 && e.edge.ike_movable.load().contains(&spis)
}

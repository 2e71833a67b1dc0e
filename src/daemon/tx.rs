//! The TX thread: the TUN towards the peers.
//!
//! 1. wait for the TUN (or the stop eventfd);
//! 2. drain up to [`BATCH`] packets, segmenting TSO/USO packets (`gso`) as they come;
//! 3. `Outbound::process` each one with the current generation, loaded once per batch (no
//!    lock: the sequence number is one atomic compare-and-swap; a reload swaps the
//!    generation between batches): route, NAT, sequence number, encryption, or an ICMP "too
//!    big" back to the TUN;
//! 4. send the batch: one `sendmmsg` per raw socket, UDP GSO trains for ESP in UDP.
//!
//! No disk I/O and no lock: the control side extends the persisted sequence reservations
//! ahead of need and publishes each new limit atomically (`seq.rs`).
//!
//! One TX thread runs per TUN queue (`interface.tx_threads`, one by default).

use super::edges::{wait, Edges, BATCH, TX_BUFS};
use super::send::send_verdicts;
use crate::buf::{PacketBuf, MAX_PACKET};
use crate::datapath::{DropReason, Verdict};
use crate::sys::capture::{Recorder, Tap};
use crate::telemetry::{EdgeStats, RateLimit};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tracing::warn;

pub(super) fn tx_loop(e: &Edges, rec: &mut Recorder, clock: Instant) {
    // Room for a full batch plus the segments of one more TSO packet (64 KB at an MSS of 536).
    let mut bufs: Vec<PacketBuf> = (0..TX_BUFS).map(|_| PacketBuf::new(MAX_PACKET)).collect();
    // `None`: not (yet) processed in this batch.
    let mut verdicts: [Option<Verdict>; TX_BUFS] = [None; TX_BUFS];
    let mut warn_read = RateLimit::default();
    let mut warn_send = RateLimit::default();
    let mut warn_exhausted = RateLimit::default();
    let panic_hook = super::edges::debug_panic_requested("tx");
    loop {
        let mut fds = [
            PollFd::new(e.stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(e.tun.as_fd(), PollFlags::POLLIN),
        ];
        if !wait(&mut fds, PollTimeout::NONE, "the TUN") {
            return;
        }
        let now = clock.elapsed().as_nanos() as u64;
        if panic_hook {
            panic!("ESPIP_DEBUG_PANIC=tx (the supervision test's hook)");
        }
        rec.begin_batch();
        let mut n = 0;
        while n < BATCH {
            bufs[n].reset();
            match e.tun.recv(bufs[n].read_area()) {
                Ok(len) => {
                    bufs[n].set_len(len);
                    let got = if e.tun.vnet() {
                        offload_in(&mut bufs[n..], e.edge)
                    } else {
                        1
                    };
                    for b in &bufs[n..n + got] {
                        rec.record(Tap::Inner, b.as_slice());
                    }
                    n += got;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    e.edge.tun_read_errors.fetch_add(1, Relaxed);
                    if warn_read.ready() {
                        warn!("reading the TUN failed: {err}");
                    }
                    break;
                }
            }
        }
        // One generation for the whole batch (a reload swaps it between two batches).
        let g = e.current.load();
        for i in 0..n {
            let v = g.outbound.process(&mut bufs[i], now);
            verdicts[i] = Some(v);
            match v {
                Verdict::ToTun => {
                    rec.record(Tap::Inner, bufs[i].as_slice());
                    if e.tun.write_packet(&mut bufs[i], 0).is_err() {
                        e.edge.tun_write_errors.fetch_add(1, Relaxed);
                    }
                }
                Verdict::Drop(DropReason::SeqUnreserved) if warn_exhausted.ready() => warn!(
                    "an outbound SA reached the end of its persisted sequence reservation; \
                     packets are dropped until the state directory can be written"
                ),
                Verdict::Drop(DropReason::SeqExhausted) if warn_exhausted.ready() => warn!(
                    "an outbound SA has used every sequence number (2^32 without esn) and stopped sending; \
                     install new keys and SPIs (or enable esn) and restart"
                ),
                _ => {}
            }
        }
        if let Some(err) = send_verdicts(&bufs[..n], &verdicts[..n], e, &g, rec) {
            if warn_send.ready() {
                warn!("sending packets failed: {err}");
            }
        }
        rec.flush();
    }
}

/// Turn the TUN packet in `bufs[0]` (with its `virtio_net_hdr`) into plain packets at the
/// front of `bufs`: itself with a completed checksum, or its TSO segments. Returns how many.
pub(super) fn offload_in(bufs: &mut [PacketBuf], edge: &EdgeStats) -> usize {
    use crate::gso::{self, VnetHdr};
    let Some(h) = VnetHdr::parse(bufs[0].as_slice()) else {
        edge.offload_errors.fetch_add(1, Relaxed);
        return 0;
    };
    let _ = bufs[0].pull_front(gso::VNET_HDR_LEN);
    let result = match h.gso_type & !gso::GSO_ECN {
        gso::GSO_NONE if h.flags & gso::F_NEEDS_CSUM != 0 => gso::complete_checksum(
            bufs[0].as_mut_slice(),
            usize::from(h.csum_start),
            usize::from(h.csum_offset),
        )
        .map(|()| 1),
        gso::GSO_NONE => Ok(1),
        gso::GSO_TCPV4 | gso::GSO_TCPV6 => {
            let (src, rest) = bufs.split_at_mut(1);
            let r = gso::segment_tcp(src[0].as_slice(), usize::from(h.gso_size), rest);
            if let Ok(k) = r {
                // The segments replace the large packet.
                bufs[..=k].rotate_left(1);
                edge.tso_packets.fetch_add(1, Relaxed);
            }
            r
        }
        gso::GSO_UDP_L4 => {
            let (src, rest) = bufs.split_at_mut(1);
            let r = gso::segment_udp(src[0].as_slice(), usize::from(h.gso_size), rest);
            if let Ok(k) = r {
                bufs[..=k].rotate_left(1);
                edge.uso_packets.fetch_add(1, Relaxed);
            }
            r
        }
        _ => Err(gso::GsoError::Unsupported),
    };
    match result {
        Ok(k) => k,
        Err(_) => {
            edge.offload_errors.fetch_add(1, Relaxed);
            0
        }
    }
}

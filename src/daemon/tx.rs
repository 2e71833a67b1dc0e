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

/// The core's [`crate::gso::offload_in`] on the TUN packet in `bufs[0]`, its outcome counted
/// (TSO, USO, or an offload error, which drops it). Returns how many packets are ready.
pub(super) fn offload_in(bufs: &mut [PacketBuf], edge: &EdgeStats) -> usize {
    use crate::gso::Offloaded;
    match crate::gso::offload_in(bufs) {
        Ok((k, kind)) => {
            match kind {
                Offloaded::Tso => edge.tso_packets.fetch_add(1, Relaxed),
                Offloaded::Uso => edge.uso_packets.fetch_add(1, Relaxed),
                Offloaded::Plain => 0,
            };
            k
        }
        Err(_) => {
            edge.offload_errors.fetch_add(1, Relaxed);
            0
        }
    }
}

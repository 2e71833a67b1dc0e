//! What the data-path threads share, in one place every edge module takes it from: the
//! kernel objects a thread works with ([`Edges`], lent out by [`EdgeHandles`]), the batch
//! sizes and poll slots, the wait on a thread's descriptors, and the channel message of IKE
//! on the ESP-in-UDP port. Nothing here imports another daemon module.

use crate::sys::packet::{NextHops, PacketSocket};
use crate::sys::raw::RawSocket;
use crate::sys::tun::Tun;
use crate::sys::udp::UdpEncapSocket;
use crate::telemetry::{Current, EdgeStats, InboundHandoff};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EventFd;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::warn;

/// Packets per batch. Tuning constant: 64 amortises a syscall over enough packets that its
/// cost disappears against AEAD, and keeps a batch in L2 cache (64 x 64 KiB buffers are
/// allocated once per thread, but only the touched bytes are resident).
pub const BATCH: usize = 64;

/// TX buffers: a batch plus the segments of one more TSO packet (65535 / 536-byte MSS = 123).
pub(super) const TX_BUFS: usize = BATCH + 128;

/// Wait until one of `fds` is readable or `timeout` passes. `fds[0]` is the stop eventfd.
/// Returns false when the thread must stop (stop requested, or poll failed, which is logged).
pub(super) fn wait(fds: &mut [PollFd], timeout: PollTimeout, what: &str) -> bool {
    loop {
        match poll(fds, timeout) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("poll on {what} failed: {e}; the thread stops");
                return false;
            }
        }
    }
    !fds[0]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN))
}

/// `AF_XDP` sockets polled at most (`interface.rx_path = "xdp"`).
pub(super) const XSK_SLOTS: usize = 2 * crate::sys::xsk::MAX_QUEUES as usize;

/// A datagram for IKE that came on the ESP-in-UDP port (marker removed).
/// An IKE message from the NAT-T port: the message, its source, and the local address it
/// landed on (if known).
pub(crate) type NattDatagram = (Vec<u8>, SocketAddr, Option<std::net::IpAddr>);

/// A debug-build hook for the supervision test: `ESPIP_DEBUG_PANIC=tx` (or `rx`) makes that
/// thread panic at its first packet. Compiled out of release builds.
pub(super) fn debug_panic_requested(thread: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("ESPIP_DEBUG_PANIC")
            .map(|v| v == thread)
            .unwrap_or(false)
}

/// What each data-path thread owns a share of; [`EdgeHandles::edges`] lends it out.
#[derive(Clone)]
pub(super) struct EdgeHandles {
    pub(super) tun: Arc<Vec<Tun>>,
    pub(super) sockets: Arc<Vec<RawSocket>>,
    pub(super) udp: Arc<Vec<UdpEncapSocket>>,
    pub(super) stop: Arc<EventFd>,
    pub(super) edge: Arc<EdgeStats>,
    pub(super) current: Arc<Current>,
    pub(super) handoff: Arc<InboundHandoff>,
    /// Where the RX thread hands IKE messages from the ESP-in-UDP port (ikev2 peers only).
    pub(super) natt: Option<tokio::sync::mpsc::Sender<NattDatagram>>,
    /// The next hops the `AF_PACKET` sockets may send to.
    pub(super) hops: Arc<arc_swap::ArcSwap<NextHops>>,
    /// The `AF_PACKET` sockets, one per egress interface (empty: raw sockets only).
    pub(super) packet: Arc<Vec<PacketSocket>>,
}

impl EdgeHandles {
    /// What TX thread `queue` (or the RX thread, queue 0) works with.
    pub(super) fn edges(&self, queue: usize) -> Edges<'_> {
        Edges {
            tun: &self.tun[queue],
            queues: &self.tun,
            sockets: &self.sockets,
            udp: &self.udp,
            stop: &self.stop,
            edge: &self.edge,
            current: &self.current,
            handoff: &self.handoff,
            natt: self.natt.as_ref(),
            hops: &self.hops,
            packet: &self.packet,
        }
    }
}

/// The kernel objects and shared counters a data-path thread works with.
pub(super) struct Edges<'a> {
    /// This thread's TUN queue (TX: the one it reads; ICMP errors go back on it).
    pub(super) tun: &'a Tun,
    /// Every queue of the TUN (the RX thread writes a flow to the queue its hash picks, so
    /// the kernel sends that flow's packets to the same TX thread).
    pub(super) queues: &'a [Tun],
    pub(super) sockets: &'a [RawSocket],
    pub(super) udp: &'a [UdpEncapSocket],
    pub(super) stop: &'a EventFd,
    pub(super) edge: &'a EdgeStats,
    /// The current generation (peers, SAs, configuration), loaded once per batch.
    pub(super) current: &'a Current,
    /// A new inbound half for the RX thread after a reload.
    pub(super) handoff: &'a InboundHandoff,
    /// IKE on the ESP-in-UDP port goes here (ikev2 peers only).
    pub(super) natt: Option<&'a tokio::sync::mpsc::Sender<NattDatagram>>,
    /// The next hops the `AF_PACKET` sockets may send to.
    pub(super) hops: &'a arc_swap::ArcSwap<NextHops>,
    /// The `AF_PACKET` sockets.
    pub(super) packet: &'a [PacketSocket],
}

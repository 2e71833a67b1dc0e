//! State shared by the data-path threads (which write it) and the control side (which reads
//! it for `espip show`, JSON and metrics): counters of the kernel edges, and the rule that
//! keeps warnings rare. Neither side imports the other; both import this.

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

/// Warnings of one kind are logged at most this often (quinn-udp's rule).
pub const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Errors at the kernel edges, counted (never logged per packet).
#[derive(Debug, Default)]
pub struct EdgeStats {
    /// The IKE SAs (SPIi, SPIr) whose messages may come from any address (MOBIKE: their
    /// initiator may announce a new one): the RX thread lets their IKE on the NAT-T port
    /// through from any source, and only theirs. Kept by the IKE edge.
    pub ike_movable: arc_swap::ArcSwap<Vec<(u64, u64)>>,
    /// Failed TUN reads.
    pub tun_read_errors: AtomicU64,
    /// Failed TUN writes.
    pub tun_write_errors: AtomicU64,
    /// Packets the raw socket refused to send.
    pub send_errors: AtomicU64,
    /// Datagrams from a raw socket with an invalid outer header.
    pub bad_outer: AtomicU64,
    /// IKE messages on the ESP-in-UDP port (behind the non-ESP marker) from an address that
    /// is no IKEv2 peer's: dropped before they reach the IKE edge's queue.
    pub ike_foreign: AtomicU64,
    /// IKE messages from a peer dropped because the IKE edge's queue was full (IKE
    /// retransmits).
    pub ike_queue_full: AtomicU64,
    /// TUN packets whose offload header or TSO layout espip could not handle (dropped).
    pub offload_errors: AtomicU64,
    /// Large TCP packets (TSO) read from the TUN and segmented.
    pub tso_packets: AtomicU64,
    /// Large UDP packets (USO) read from the TUN and segmented.
    pub uso_packets: AtomicU64,
    /// Coalesced (GRO) packets written to the TUN.
    pub gro_packets: AtomicU64,
    /// ESP-in-UDP messages sent with UDP segmentation offload (several datagrams each).
    pub udp_gso_sends: AtomicU64,
    /// ESP-in-UDP messages received coalesced by UDP GRO (several datagrams each).
    pub udp_gro_receives: AtomicU64,
    /// Outer packets of the raw-socket modes sent through an `AF_PACKET` socket
    /// (`interface.tx_path = "auto"`) rather than the raw socket.
    pub af_packet_sends: AtomicU64,
    /// IP-in-IP packets that the kernel's GRO had merged, received with their segment size
    /// and cut back into the original packets (`sys::grorx`).
    pub ipip_gro_receives: AtomicU64,
    /// Outer packets received through an `AF_XDP` socket (`interface.rx_path = "xdp"`).
    pub xdp_receives: AtomicU64,
    /// Frames the kernel could not hand the `AF_XDP` sockets (their rings full or out of
    /// frames), as the sockets' own statistics last said.
    pub xdp_dropped: AtomicU64,
}

/// Lets one warning of a kind through per [`WARN_INTERVAL`].
#[derive(Debug, Default)]
pub struct RateLimit(Option<Instant>);

impl RateLimit {
    /// True (and the interval restarts) if the last warning is older than the interval.
    pub fn ready(&mut self) -> bool {
        let now = Instant::now();
        match self.0 {
            Some(t) if now.duration_since(t) < WARN_INTERVAL => false,
            _ => {
                self.0 = Some(now);
                true
            }
        }
    }
}

/// One generation of the running configuration: what the data path sends with and what the
/// control side reports. A reload builds the next one and swaps it in whole ([`Current`]); a
/// data-path thread loads it once per batch, so a batch sees one generation from start to end
/// (readers never wait, the writer never waits for readers).
pub struct Generation {
    /// The configuration this generation was built from.
    pub cfg: std::sync::Arc<crate::config::Config>,
    /// The TUN -> wire half of the data path (continuing SAs are shared with the previous
    /// generation).
    pub outbound: crate::datapath::Outbound,
    /// The outer source address of each peer (configured or routed), in peer order.
    pub sources: Vec<std::net::IpAddr>,
    /// (endpoint, source) of every peer, for the outer tap's synthesised headers.
    pub sent_from: Vec<(std::net::IpAddr, std::net::IpAddr)>,
    /// 1 at start, one more per reload.
    pub number: u64,
}

impl Generation {
    /// The source address the outer tap shows for packets to (or from) `endpoint`.
    /// An address no peer has configured (a learned one): `interface.local` when it is of
    /// the same family, else the unspecified address.
    pub fn source_for(&self, endpoint: &std::net::IpAddr) -> std::net::IpAddr {
        let fallback = || {
            self.cfg
                .interface
                .local
                .filter(|l| l.is_ipv6() == endpoint.is_ipv6())
                .unwrap_or(match endpoint {
                    std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                })
        };
        self.sent_from
            .iter()
            .find(|(ep, _)| ep == endpoint)
            .map_or_else(fallback, |(_, s)| *s)
    }
}

/// The current generation, swapped atomically by a reload.
pub type Current = arc_swap::ArcSwap<Generation>;

/// Hands the RX thread the inbound half of a new generation. The thread owns its `Inbound`
/// (`&mut`: replay windows); at a reload the control side leaves the new one here, and the
/// thread takes it before its next batch and lets it adopt the continuing SAs' state. The
/// flag is one relaxed load per wake-up; the mutex is touched only at a reload.
#[derive(Default)]
pub struct InboundHandoff {
    pending: std::sync::atomic::AtomicBool,
    slot: std::sync::Mutex<Option<crate::datapath::Inbound>>,
}

impl InboundHandoff {
    /// Leave `inbound` for the RX thread (replacing one it has not taken yet).
    pub fn offer(&self, inbound: crate::datapath::Inbound) {
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(inbound);
        self.pending
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// The new inbound half, if one is waiting.
    pub fn take(&self) -> Option<crate::datapath::Inbound> {
        if !self.pending.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let mut slot = self.slot.lock().unwrap_or_else(|p| p.into_inner());
        self.pending
            .store(false, std::sync::atomic::Ordering::Release);
        slot.take()
    }
}

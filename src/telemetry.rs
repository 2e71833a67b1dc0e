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
    /// Failed TUN reads.
    pub tun_read_errors: AtomicU64,
    /// Failed TUN writes.
    pub tun_write_errors: AtomicU64,
    /// Packets the raw socket refused to send.
    pub send_errors: AtomicU64,
    /// Datagrams from a raw socket with an invalid outer header.
    pub bad_outer: AtomicU64,
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

//! Multipath: one peer reached over several paths (links) at once, with one SA pair.
//!
//! Seed 000's idea: carry the IP packets of a connection over several links and let the inner
//! TCP put them back in order; nothing new on the wire but the choice of link per packet. The
//! ESP sequence number is one order for the whole peer (one outbound SA), so the receiver can
//! reorder by it and a copy sent on two paths is the same packet twice.
//!
//! - **Paths** ([`PathSpec`]): an outer destination (and UDP port) each; the kernel's routing
//!   picks the link and source for each destination.
//! - **Liveness and RTT**: every `probe_interval` each path carries an authenticated probe, an
//!   ESP dummy packet (RFC 4303 section 2.6, next header 59: a plain RFC 4303 peer discards it)
//!   whose payload is [`Probe`]. The peer answers on the path the probe came from with an echo
//!   carrying the probe's timestamp and how many bytes it received on that path. A path is
//!   down after `dead_after` intervals without an echo and up again at the next one. A forged
//!   probe fails the ICV; a replayed one is refused by the replay window: neither reaches
//!   this module.
//! - **Scheduler** ([`Scheduler`]): `spread` sends each packet on one path, in proportion to
//!   what each path is measured to deliver ([`Controller`]); `failover` sends on the first live
//!   path in the configured order; `redundant` sends every packet on every live path.
//! - **Reordering** ([`Reorder`]): the receiver holds packets that arrive ahead of a gap for at
//!   most a bounded time, so paths of different delays do not look like loss to TCP.
//!
//! The data path reads the schedule with relaxed atomics (a 1024-slot table and a mask); the
//! control side rebuilds them at each probe tick from the paths' state.

mod controller;
mod learned;
mod probe;
mod reorder;
mod repair;
mod train;

use controller::layout;
pub use controller::Controller;
pub use probe::{Probe, ProbeKind};
pub use reorder::{Order, Reorder, ReorderStats};
pub use repair::{Nack, Sent, KEPT};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;
pub use train::FILL_LEN;

/// How a multipath peer's packets are spread over its live paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduler {
    /// Each packet on one path, in proportion to what each path delivers.
    Spread,
    /// Each packet on the path where it is expected to arrive first (each path modelled by
    /// its measured capacity and delay, as MPTCP's BLEST/ECF schedulers do): for links of
    /// unequal rate and delay.
    Earliest,
    /// One path at a time: the first live one in the configured order.
    Failover,
    /// Every packet on every live path; the receiver keeps the first copy.
    Redundant,
}

impl Scheduler {
    /// Every scheduler.
    pub const ALL: [Scheduler; 4] = [
        Scheduler::Spread,
        Scheduler::Earliest,
        Scheduler::Failover,
        Scheduler::Redundant,
    ];

    /// The configuration's word for it.
    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Spread => "spread",
            Scheduler::Earliest => "earliest",
            Scheduler::Failover => "failover",
            Scheduler::Redundant => "redundant",
        }
    }

    /// The scheduler named `s`.
    pub fn from_name(s: &str) -> Option<Scheduler> {
        Scheduler::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// One path of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSpec {
    /// Name for logs and status (unique within the peer).
    pub name: String,
    /// The peer's outer address on this path.
    pub endpoint: IpAddr,
    /// UDP destination port (ESP in UDP); 0 for IP protocols 50, 4 and 41.
    pub port: u16,
    /// Static weight: the starting share of `spread` before anything is measured.
    pub weight: u32,
    /// Source address of the path's packets (`local`; `None`: the routed source).
    pub local: Option<IpAddr>,
    /// Interface the path's packets leave by (`device`, or the interface holding `local`),
    /// for status.
    pub device: Option<String>,
    /// That interface's index, resolved by the daemon (0: routing decides).
    pub ifindex: u32,
    /// A path of a peer with `max_paths`: its endpoint is not configured but learned (the
    /// (address, port) of an authenticated packet no other path has; [`PathStats::learned`]),
    /// and `endpoint` is only a placeholder (the unspecified IPv4 address).
    pub learned: bool,
}

impl PathSpec {
    /// A path to `endpoint` (and UDP `port`), routed, with weight 1.
    pub fn routed(name: &str, endpoint: IpAddr, port: u16) -> PathSpec {
        PathSpec {
            name: name.to_string(),
            endpoint,
            port,
            weight: 1,
            local: None,
            device: None,
            ifindex: 0,
            learned: false,
        }
    }

    /// Path slot `i` of a peer with `max_paths`: named `path{i+1}`, its endpoint learned.
    pub fn learned(i: usize) -> PathSpec {
        PathSpec {
            learned: true,
            ..PathSpec::routed(&format!("path{}", i + 1), IpAddr::from([0, 0, 0, 0]), 0)
        }
    }

    /// How its packets leave.
    pub fn via(&self) -> crate::datapath::Via {
        crate::datapath::Via {
            src: self.local,
            ifindex: self.ifindex,
        }
    }

    /// How its packets leave, with `reply_from` (see [`PathStats::reply_from`]) standing in
    /// for a source that the path does not name.
    pub fn via_with(&self, reply_from: &crate::endpoint::ReplySource) -> crate::datapath::Via {
        if self.bound() {
            return self.via();
        }
        crate::datapath::Via {
            src: reply_from.get(),
            ifindex: 0,
        }
    }

    /// Whether it names its own source or interface.
    pub fn bound(&self) -> bool {
        self.local.is_some() || self.ifindex != 0
    }

    /// Whether a packet from `src` that landed at `at` may have come by this path.
    fn fits(&self, src: IpAddr, at: crate::datapath::Landing) -> bool {
        !self.learned
            && self.endpoint == src
            && self
                .local
                .zip(at.dst)
                .map_or(true, |(mine, dst)| mine == dst)
            && (self.ifindex == 0 || at.ifindex == 0 || self.ifindex == at.ifindex)
    }
}

/// A multipath peer's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultipathSpec {
    /// The scheduler.
    pub scheduler: Scheduler,
    /// Time between two probes on each path, in milliseconds.
    pub probe_interval_ms: u32,
    /// A path is down after this many probe intervals without an echo.
    pub dead_after: u32,
    /// Longest time a packet waits in the reorder stage for the gap ahead of it, in
    /// milliseconds (0: no reordering). The wait actually used follows the paths' measured
    /// delay difference, up to this bound.
    pub reorder_ms: u32,
    /// Most packets held by the reorder stage.
    pub reorder_packets: u32,
    /// Most bytes held by the reorder stage.
    pub reorder_bytes: u32,
    /// `spread` follows each path's measured delivery; false: the static weights only.
    pub adapt: bool,
    /// `spread`: a faster path's packets are delivered as late as the slowest live path's
    /// (see [`Multipath::skew_ns`]); false: each as soon as it is in order.
    pub equal_delay: bool,
    /// A learned path (see [`PathSpec::learned`]) silent this many seconds is forgotten: its
    /// slot takes the next new (address, port).
    pub path_idle_s: u32,
    /// Lost packets are asked for again and sent again on the fastest path (ESP peers with
    /// a reorder stage; see [`Nack`]). Off by default: on, the IKEv2 multipath labs saw
    /// repaired packets' originals arrive after all (replay drops); see docs/multipath.md.
    pub repair: bool,
    /// A path that comes up unmeasured gets a capacity train ([`train`]: 128 KB to 1 MB of
    /// filler dummies, at most five per path-up) so that its first transfer starts from its
    /// rate; false: none (a metered link's bytes are saved, and the first transfer's windows
    /// measure it).
    pub capacity_trains: bool,
    /// `spread`, `earliest`: a pure TCP acknowledgment (no payload; not a SYN, FIN or RST)
    /// goes on the path of the shortest delay, outside the schedule, and the receiver delivers
    /// it at once, not held to the slowest path's delay: the connection's round trip is the
    /// slowest path one way and the fastest the other, not the slowest both ways. A handshake
    /// keeps the data's delay (a SYN over the fastest path gave cubic a minimum RTT its data
    /// never had, and its slow start ended at a few dozen segments). Both peers should agree
    /// (the receiver's setting decides the hold).
    pub fast_acks: bool,
}

impl Default for MultipathSpec {
    fn default() -> Self {
        MultipathSpec {
            scheduler: Scheduler::Spread,
            probe_interval_ms: 100,
            dead_after: 3,
            reorder_ms: 100,
            reorder_packets: 4096,
            reorder_bytes: 8 << 20,
            adapt: true,
            equal_delay: true,
            path_idle_s: 60,
            repair: false,
            capacity_trains: true,
            fast_acks: true,
        }
    }
}

/// A peer's paths and multipath settings, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPaths {
    /// Settings.
    pub spec: MultipathSpec,
    /// The paths, in order (failover tries them in this order).
    pub paths: Vec<PathSpec>,
}

/// Slots of the spread schedule: shares are in 1024ths. With 64 a share moved in steps of 1.6%
/// of the sum, a tenth of the share of a 15 Mbit/s path next to 60 and 30: that path's share
/// was 0.156 where 0.14 was right, and it saturated at 0.9 of the sum.
pub const SLOTS: usize = 1024;

/// Fewest slots of a live path (a 64th): enough traffic to stay measured.
pub const MIN_SLOTS: usize = SLOTS / 64;

/// Most paths per peer (the redundant mask is a `u32`, slots hold a `u8`).
pub const MAX_PATHS: usize = 8;

/// A path's liveness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathState {
    /// No echo yet, still within the first detection time: used.
    Unknown = 0,
    /// Echoes arrive.
    Up = 1,
    /// No echo for `dead_after` probe intervals: not used until an echo arrives.
    Down = 2,
    /// No echo and nothing else from the path for more than a probe interval and a half,
    /// while another path answers: not scheduled (a cut link loses what `spread` or `failover` send it until it is found
    /// down, and that loss is what stalls a TCP stream), but not down yet: `redundant` still
    /// copies to it, the log says nothing; the reorder stage no longer waits for it
    /// ([`Multipath::order_mask`]). The next echo makes it up again.
    Quiet = 3,
}

impl PathState {
    /// The status word.
    pub fn name(self) -> &'static str {
        match self {
            PathState::Unknown => "unknown",
            PathState::Up => "up",
            PathState::Down => "down",
            PathState::Quiet => "quiet",
        }
    }

    fn from_u8(v: u8) -> PathState {
        match v {
            1 => PathState::Up,
            2 => PathState::Down,
            3 => PathState::Quiet,
            _ => PathState::Unknown,
        }
    }

    fn usable(self) -> bool {
        self != PathState::Down
    }

    /// Given packets of its own by `spread`, `earliest` and `failover`.
    fn scheduled(self) -> bool {
        matches!(self, PathState::Unknown | PathState::Up)
    }
}

/// One path's counters and measurements, shared by the data path (writes traffic counters,
/// reads nothing) and the control side (probes, liveness, status). Survives a reload when the
/// peer and path keep their names.
#[derive(Debug, Default)]
pub struct PathStats {
    state: AtomicU8,
    /// Smoothed RTT of the probes, nanoseconds (0: none measured).
    pub srtt_ns: AtomicU64,
    /// Smallest probe RTT seen, nanoseconds (0: none measured).
    pub min_rtt_ns: AtomicU64,
    /// The newest probe RTT, nanoseconds (0: none measured).
    pub last_rtt_ns: AtomicU64,
    /// The RTT's smoothed mean deviation (RFC 6298's RTTVAR), nanoseconds.
    pub rttvar_ns: AtomicU64,
    /// The smallest probe RTT since the controller's last window, nanoseconds (0: none).
    window_rtt_ns: AtomicU64,
    /// Time of the last echo (the caller's clock, nanoseconds; 0: never).
    pub last_echo: AtomicU64,
    /// Time the last authenticated packet of any kind (data, probe, echo) came from the
    /// path's endpoint (0: never).
    pub heard: AtomicU64,
    /// Probes sent on the path.
    pub probes_sent: AtomicU64,
    /// Echoes received for them.
    pub echoes: AtomicU64,
    /// Times the path went quiet (see [`PathState::Quiet`]).
    pub quiet_count: AtomicU64,
    /// Packets sent again on the path because the peer asked for them ([`Nack`]).
    pub repaired: AtomicU64,
    /// Packets sent on the path (copies of `redundant` included; probes not).
    pub tx_packets: AtomicU64,
    /// Inner bytes sent on the path.
    pub tx_bytes: AtomicU64,
    /// Outer packets for the path that the kernel refused to send (no route, wrong source,
    /// unreachable): counted in `tx_packets` too, but never left the host.
    pub send_refused: AtomicU64,
    /// Authenticated packets received from the path's endpoint.
    pub rx_packets: AtomicU64,
    /// Their inner bytes.
    pub rx_bytes: AtomicU64,
    /// Inner bytes the peer said (in its last echo) it received on this path.
    pub peer_rx_bytes: AtomicU64,
    /// The share of `spread` in schedule slots (of [`SLOTS`]).
    pub share: AtomicU32,
    /// What the controller estimates the path delivers, bytes per second (0: unknown).
    pub capacity: AtomicU64,
    /// ESP in UDP: the source port of the last authenticated datagram from the path's endpoint.
    pub udp_port_seen: AtomicU32,
    /// A learned path: the (address, port) it was learned from (port 0 for protocol 50),
    /// written only by the RX thread ([`Multipath::adopt`]); `changed_at` is when.
    pub learned: crate::endpoint::EndpointCell,
    /// A learned path forgotten after `path_idle_s` (its slot free; logged once, shown in
    /// status as `forgotten`).
    pub forgotten: std::sync::atomic::AtomicBool,
    /// A path without `local` or `device`: the address of ours its last authenticated packet
    /// was sent to, which its packets leave from (port 0), so that a peer which reaches one
    /// of several addresses of this host hears the answer from that address (WireGuard's
    /// sticky source). Empty: the routed source.
    pub reply_from: crate::endpoint::ReplySource,
    /// The newest echo's (probe send time, bytes we had sent on the path when we sent the
    /// probe, bytes the peer had received on it when it answered). The path is first in, first
    /// out, so everything sent before the probe arrived before the echo unless it was lost:
    /// two marks give the loss between them exactly.
    mark: Mutex<EchoMark>,
    /// The capacity train of a path that came up unmeasured ([`train`]).
    train: Mutex<train::Train>,
    /// A train's measurement, bytes per second, for the controller to take (0: none).
    pub(crate) seed: AtomicU64,
}

/// See [`PathStats`]'s `mark`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct EchoMark {
    sent: u64,
    /// When the echo came back (our clock): the peer took in what `rx_bytes` counts between
    /// two probes' arrivals, which are as far apart as their echoes (the way back carries no
    /// queue to speak of), not as their sending when a queue grows or drains between them.
    echoed: u64,
    tx_bytes: u64,
    rx_bytes: u64,
}

impl PathStats {
    /// The path's liveness.
    pub fn state(&self) -> PathState {
        PathState::from_u8(self.state.load(Relaxed))
    }

    fn set_state(&self, s: PathState) {
        self.state.store(s as u8, Relaxed);
    }

    /// Count an echo that came back at `now` for a probe sent at `sent`, when `tx_bytes` had
    /// been sent on the path; the peer had received `peer_rx_bytes` on it.
    fn echo(&self, sent: u64, now: u64, tx_bytes: u64, peer_rx_bytes: u64) {
        let rtt = now.saturating_sub(sent).max(1);
        let srtt = self.srtt_ns.load(Relaxed);
        // RFC 6298's smoothing (alpha = 1/8, beta = 1/4; RTTVAR from the SRTT before this
        // sample, and R/2 at the first).
        let var = self.rttvar_ns.load(Relaxed);
        let (next, next_var) = if srtt == 0 {
            (rtt, rtt / 2)
        } else {
            ((srtt * 7 + rtt) / 8, (var * 3 + srtt.abs_diff(rtt)) / 4)
        };
        self.srtt_ns.store(next, Relaxed);
        self.rttvar_ns.store(next_var, Relaxed);
        self.last_rtt_ns.store(rtt, Relaxed);
        let _ = self
            .window_rtt_ns
            .fetch_update(Relaxed, Relaxed, |w| (w == 0 || rtt < w).then_some(rtt));
        let min = self.min_rtt_ns.load(Relaxed);
        if min == 0 || rtt < min {
            self.min_rtt_ns.store(rtt, Relaxed);
        }
        self.last_echo.store(now, Relaxed);
        self.echoes.fetch_add(1, Relaxed);
        self.peer_rx_bytes.fetch_max(peer_rx_bytes, Relaxed);
        let mut m = self.mark.lock().unwrap_or_else(|p| p.into_inner());
        if sent > m.sent {
            *m = EchoMark {
                sent,
                echoed: now,
                tx_bytes,
                rx_bytes: peer_rx_bytes,
            };
        }
    }

    /// The smallest probe RTT since the last call (0: no echo since), starting a new window.
    fn take_window_rtt(&self) -> u64 {
        self.window_rtt_ns.swap(0, Relaxed)
    }

    fn mark(&self) -> EchoMark {
        *self.mark.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A liveness change, for the log (reported once per change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathEvent {
    /// Path index within the peer.
    pub path: usize,
    /// The new state.
    pub state: PathState,
}

/// The part of a multipath peer shared by both halves of the data path and the control side.
#[derive(Debug)]
pub struct Multipath {
    /// Settings.
    pub spec: MultipathSpec,
    /// The paths, in configured order.
    pub paths: Vec<PathSpec>,
    /// Their counters, in the same order.
    pub stats: Vec<std::sync::Arc<PathStats>>,
    /// The spread/failover schedule: slot i's path is byte i % 8 of word i / 8.
    table: [AtomicU64; SLOTS / 8],
    /// The paths `redundant` sends on (bit i: path i).
    mask: AtomicU32,
    /// Packets scheduled (picks the slot).
    next: AtomicU64,
    /// Probes sent (their identifiers).
    probe_id: AtomicU64,
    /// The first tick's time (0: none yet): detection counts from there until a first echo.
    started: AtomicU64,
    /// The paths are learned ([`PathSpec::learned`]).
    learns: bool,
    /// When the next tick is due.
    due: AtomicU64,
    control: Mutex<Controller>,
    /// `earliest`'s arrival model.
    arrival: Mutex<Arrival>,
    /// The sender's last ESP packets, for repair.
    sent: Mutex<Sent>,
    /// The receiver's reorder stage counters.
    pub reorder: ReorderStats,
}

/// `earliest`'s per-packet choice once every live path has a measured capacity and delay: the
/// path where the packet is expected to arrive first, as MPTCP's BLEST and ECF schedulers
/// choose. Each path is modelled as a queue that drains at its estimated capacity behind its
/// base one-way delay (half its smallest probe RTT); a packet's expected arrival on a path is
/// that delay plus the time to drain what the model holds for the path, the packet included.
///
/// So a slower or longer path gets a packet only when the faster one's queue would make the
/// packet arrive later than it would over the slow one: packets arrive nearly in sequence
/// order (little for the receiver to reorder, nothing that looks like loss to TCP), and one
/// TCP stream never gets less than its best path alone would carry, which a fixed share of
/// a slow, long path cannot promise.
#[derive(Debug, Default, Clone)]
struct Arrival {
    /// Bytes the model holds for each path at `at`.
    backlog: Vec<f64>,
    /// When the backlogs were last drained (the caller's clock, nanoseconds).
    at: u64,
}

impl Arrival {
    /// The path for a packet of `len` bytes at `now`, and count it into that path's backlog;
    /// `None` while a live path has no measured RTT (the slot table decides then).
    ///
    /// Before the capacities are measured (a path's estimate comes from a window in which it
    /// carried traffic), the model has no rates. Following `spread`'s table then (static
    /// weights, equal by default) put half of a new flow's slow start on a 25 Mbit/s path next
    /// to a 100 Mbit/s one, and the early losses held that flow down for the rest of its life.
    /// Instead: while no live path is measured, every packet goes to the path whose newest
    /// delay is the shortest (the fast path fills first, as plain TCP over it would, and its
    /// queue shows in its RTT); a live path still unmeasured next to measured ones is modelled
    /// at a sixteenth of their sum, enough to be measured, after which its estimate grows
    /// window by window while it shows no queue.
    fn choose(
        &mut self,
        stats: &[std::sync::Arc<PathStats>],
        probe_interval: u64,
        now: u64,
        len: usize,
    ) -> Option<usize> {
        if self.backlog.len() != stats.len() {
            self.backlog = vec![0.0; stats.len()];
        }
        let dt = now.saturating_sub(self.at) as f64 / 1e9;
        self.at = self.at.max(now);
        let live = || stats.iter().filter(|p| p.state().scheduled());
        if live().any(|p| p.min_rtt_ns.load(Relaxed) == 0) {
            return None;
        }
        let measured: f64 = live().map(|p| p.capacity.load(Relaxed) as f64).sum();
        let mut best: Option<(usize, f64)> = None;
        for (i, p) in stats.iter().enumerate() {
            if !p.state().scheduled() {
                self.backlog[i] = 0.0;
                continue;
            }
            let min_rtt = p.min_rtt_ns.load(Relaxed);
            let rate = match p.capacity.load(Relaxed) as f64 {
                r if r > 0.0 => r,
                _ if measured > 0.0 => measured / 16.0,
                // Nothing measured yet: no backlog term, the delays alone decide.
                _ => f64::INFINITY,
            };
            self.backlog[i] = if rate.is_finite() {
                (self.backlog[i] - rate * dt).max(0.0)
            } else {
                0.0
            };
            // The model's arrival, but never earlier than the path's newest measured delay: a
            // queue the model does not know of (a capacity estimated too high) shows there
            // within a probe interval.
            // A path silent for longer than a probe interval and a half (its echoes stopped:
            // cut, or a queue far beyond the model) counts that silence as delay, so traffic
            // leaves it before it is found down.
            let silence = now
                .saturating_sub(p.last_echo.load(Relaxed))
                .saturating_sub(probe_interval + probe_interval / 2);
            let newest = p.last_rtt_ns.load(Relaxed) as f64 / 2e9 + silence as f64 / 1e9;
            let arrival =
                (min_rtt as f64 / 2e9 + (self.backlog[i] + len as f64) / rate).max(newest);
            if best.map_or(true, |(_, t)| arrival < t) {
                best = Some((i, arrival));
            }
        }
        let (i, _) = best?;
        self.backlog[i] += len as f64;
        Some(i)
    }
}

/// Where the schedule sends one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// On this path.
    One(usize),
    /// On each path of the mask (bit i: path i).
    Every(u32),
}

impl Multipath {
    /// A peer's multipath state; `prev` (the previous generation's, if the peer existed) gives
    /// the counters of paths whose names continue.
    pub fn new(spec: MultipathSpec, paths: Vec<PathSpec>, prev: Option<&Multipath>) -> Multipath {
        let stats = paths
            .iter()
            .map(|p| {
                prev.and_then(|m| {
                    m.paths
                        .iter()
                        .position(|q| q.name == p.name && q.endpoint == p.endpoint)
                        .map(|j| m.stats[j].clone())
                })
                .unwrap_or_default()
            })
            .collect();
        let learns = paths.iter().any(|p| p.learned);
        let m = Multipath {
            spec,
            paths,
            stats,
            table: std::array::from_fn(|_| AtomicU64::new(0)),
            mask: AtomicU32::new(0),
            next: AtomicU64::new(0),
            probe_id: AtomicU64::new(0),
            started: AtomicU64::new(0),
            learns,
            due: AtomicU64::new(0),
            control: Mutex::new(Controller::default()),
            arrival: Mutex::default(),
            sent: Mutex::default(),
            reorder: ReorderStats::default(),
        };
        if let Some(prev) = prev {
            m.continue_from(prev);
        }
        // A learned path nobody is behind yet is down (not scheduled) from the start.
        for (p, s) in m.paths.iter().zip(&m.stats) {
            if p.learned && s.learned.get().is_none() {
                s.set_state(PathState::Down);
            }
        }
        m.publish();
        m
    }

    /// A new generation of the same paths (an IKEv2 rekey, a reload that changed something
    /// else) goes on where `prev` was: the estimates, the schedule's position, the probe
    /// numbers and the counters. Paths that changed start over.
    fn continue_from(&self, prev: &Multipath) {
        let same = self.paths.len() == prev.paths.len()
            && self
                .paths
                .iter()
                .zip(&prev.paths)
                .all(|(a, b)| a.name == b.name && a.endpoint == b.endpoint);
        for (mine, theirs) in [
            (&self.reorder.held, &prev.reorder.held),
            (&self.reorder.gaps_skipped, &prev.reorder.gaps_skipped),
            (&self.reorder.late, &prev.reorder.late),
            (&self.reorder.overflow, &prev.reorder.overflow),
        ] {
            mine.store(theirs.load(Relaxed), Relaxed);
        }
        if !same {
            return;
        }
        let control = prev
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        *self.control.lock().unwrap_or_else(|p| p.into_inner()) = control;
        *self.arrival.lock().unwrap_or_else(|p| p.into_inner()) = prev
            .arrival
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (mine, theirs) in [
            (&self.next, &prev.next),
            (&self.probe_id, &prev.probe_id),
            (&self.started, &prev.started),
            (&self.due, &prev.due),
        ] {
            mine.store(theirs.load(Relaxed), Relaxed);
        }
    }

    /// The path(s) for the next packet.
    #[inline]
    pub fn pick(&self) -> Pick {
        match self.spec.scheduler {
            Scheduler::Redundant => Pick::Every(self.mask.load(Relaxed)),
            _ => {
                let n = self.next.fetch_add(1, Relaxed) as usize % SLOTS;
                let word = self.table[n / 8].load(Relaxed);
                Pick::One(usize::from((word >> ((n % 8) * 8)) as u8))
            }
        }
    }

    /// The path(s) for the next packet, of `len` inner bytes, at `now`: for `earliest` whose
    /// live paths are all measured, the earliest expected arrival (see [`Arrival`]);
    /// otherwise [`Multipath::pick`] (before the measurements, `earliest` follows the slot
    /// table as `spread` does).
    pub fn pick_at(&self, now: u64, len: usize) -> Pick {
        if self.spec.scheduler == Scheduler::Earliest && self.spec.adapt {
            let mut a = self.arrival.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = a.choose(
                &self.stats,
                u64::from(self.spec.probe_interval_ms) * 1_000_000,
                now,
                len,
            ) {
                return Pick::One(i);
            }
        }
        self.pick()
    }

    /// The path(s) for the next packet, of `len` inner bytes, at `now`, `bare` when it is a
    /// pure TCP acknowledgment ([`MultipathSpec::fast_acks`]): such a segment goes on the path
    /// of the shortest delay now ([`Multipath::fastest`]), anything else by [`Multipath::pick_at`].
    pub fn pick_packet(&self, now: u64, len: usize, bare: bool) -> Pick {
        if bare && self.fast_acks() {
            if let Some(i) = self.fastest(now) {
                return Pick::One(i);
            }
        }
        self.pick_at(now, len)
    }

    /// Whether pure acknowledgments skip the schedule and the hold (`fast_acks` of a
    /// `spread` or `earliest` peer).
    pub fn fast_acks(&self) -> bool {
        self.spec.fast_acks
            && matches!(self.spec.scheduler, Scheduler::Spread | Scheduler::Earliest)
    }

    /// The scheduled path whose smoothed RTT plus its silence is the shortest at `now`;
    /// `None` while no scheduled path has a measured RTT. Silence: the time beyond half a
    /// probe interval since anything came from the path, or beyond a probe interval and a
    /// half since its last echo, whichever is longer. A peer sending data keeps every path
    /// heard all the time, so a cut moves the acknowledgments off it within tens of
    /// milliseconds, long before it is found quiet (measured: with the echoes alone, the
    /// connection whose acknowledgments took the cut path stalled 0.4 s).
    pub fn fastest(&self, now: u64) -> Option<usize> {
        let interval = u64::from(self.spec.probe_interval_ms) * 1_000_000;
        self.stats
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.state().scheduled()
                    && p.srtt_ns.load(Relaxed) > 0
                    && (!self.learns || p.learned.get().is_some())
            })
            .min_by_key(|(_, p)| {
                let unanswered = now
                    .saturating_sub(p.last_echo.load(Relaxed))
                    .saturating_sub(interval + interval / 2);
                let unheard = now
                    .saturating_sub(p.heard.load(Relaxed))
                    .saturating_sub(interval / 2);
                p.srtt_ns
                    .load(Relaxed)
                    .saturating_add(unanswered.max(unheard))
            })
            .map(|(i, _)| i)
    }

    /// The index of the path a packet from `src` that landed at `at` came by: a path that
    /// names its source or interface and matches them first (several paths may share the
    /// peer's address and differ in those only), else the first path from `src`.
    /// A learned path matches the packet's address and UDP `port` (0 for protocol 50) exactly.
    pub fn path_from(&self, src: IpAddr, port: u16, at: crate::datapath::Landing) -> Option<usize> {
        if self.learns {
            let from = SocketAddr::new(src, port);
            return (0..self.paths.len()).find(|&i| self.stats[i].learned.get() == Some(from));
        }
        self.paths
            .iter()
            .position(|p| p.bound() && p.fits(src, at))
            .or_else(|| {
                self.paths
                    .iter()
                    .position(|p| !p.bound() && p.fits(src, at))
            })
            .or_else(|| self.paths.iter().position(|p| p.endpoint == src))
    }

    /// Where an IKE message (on the NAT-T port) for this peer goes, so that IKE lives as long
    /// as any path does: to `to` by a path to that address that is not down, else to the
    /// first path not down (its address, learned or configured, and its UDP port, else
    /// `to`'s), each with the way that path's packets leave. `None`: every path is down, or
    /// none has an address yet (send to `to`, routed).
    pub fn ike_route(&self, to: SocketAddr) -> Option<(SocketAddr, crate::datapath::Via)> {
        let addr = |i: usize| -> Option<SocketAddr> {
            let p = &self.paths[i];
            if p.learned {
                return self.stats[i].learned.get();
            }
            let port = if p.port != 0 { p.port } else { to.port() };
            Some(SocketAddr::new(p.endpoint, port))
        };
        let live = |i: &usize| self.stats[*i].state().usable();
        let mine = (0..self.paths.len())
            .filter(live)
            .find(|&i| addr(i).is_some_and(|a| a.ip() == to.ip()));
        if let Some(i) = mine {
            return Some((to, self.path_via(i)));
        }
        let i = (0..self.paths.len())
            .filter(live)
            .find(|&i| addr(i).is_some())?;
        Some((addr(i)?, self.path_via(i)))
    }

    /// How path `i`'s packets leave (its own source or interface, or the address the peer
    /// last reached us at).
    pub fn path_via(&self, i: usize) -> crate::datapath::Via {
        self.paths[i].via_with(&self.stats[i].reply_from)
    }

    fn refs(&self) -> Vec<&PathStats> {
        self.stats.iter().map(|s| &**s).collect()
    }

    /// Rebuild the schedule (table, mask, shares) from the paths' states and estimates.
    fn publish(&self) {
        let refs = self.refs();
        let weights: Vec<u32> = self.paths.iter().map(|p| p.weight).collect();
        let live: Vec<bool> = refs.iter().map(|p| p.state().scheduled()).collect();
        let shares = match self.spec.scheduler {
            Scheduler::Spread | Scheduler::Earliest => {
                let c = self.control.lock().unwrap_or_else(|p| p.into_inner());
                c.shares(&refs, &weights)
            }
            Scheduler::Failover | Scheduler::Redundant => live.iter().position(|l| *l).map(|i| {
                let mut s = vec![0; refs.len()];
                s[i] = SLOTS as u32;
                s
            }),
        }
        // No live path: keep sending on the first (or every) path rather than nowhere, so
        // that a path which comes back is used at once.
        .unwrap_or_else(|| {
            let mut s = vec![0; refs.len()];
            let first = (0..refs.len())
                .find(|&i| self.endpoint_of(i).is_some())
                .unwrap_or(0);
            s[first] = SLOTS as u32;
            s
        });
        let table = layout(&shares);
        for (w, chunk) in self.table.iter().zip(table.chunks(8)) {
            let mut v = 0u64;
            for (k, b) in chunk.iter().enumerate() {
                v |= u64::from(*b) << (k * 8);
            }
            w.store(v, Relaxed);
        }
        // `redundant` copies to every path not found down, quiet ones included.
        let usable: Vec<bool> = refs.iter().map(|p| p.state().usable()).collect();
        let mut mask = 0u32;
        for (i, l) in usable.iter().enumerate() {
            if *l {
                mask |= 1 << i;
            }
        }
        let known = (0..refs.len())
            .filter(|&i| self.endpoint_of(i).is_some())
            .fold(0u32, |m, i| m | 1 << i);
        self.mask
            .store(if mask == 0 { known } else { mask }, Relaxed);
        for (p, s) in refs.iter().zip(&shares) {
            p.share.store(*s, Relaxed);
        }
        if self.spec.scheduler == Scheduler::Redundant {
            for (p, l) in refs.iter().zip(&usable) {
                p.share.store(if *l { SLOTS as u32 } else { 0 }, Relaxed);
            }
        }
    }

    /// The control side's tick at `now` (call it at least every probe interval; it does
    /// nothing before the interval is over): update liveness and the schedule; returns the
    /// state changes and the probes to send (path index, payload).
    pub fn tick(&self, now: u64) -> (Vec<PathEvent>, Vec<(usize, Probe)>) {
        let interval = u64::from(self.spec.probe_interval_ms) * 1_000_000;
        if now < self.due.load(Relaxed) {
            // Between probes only the quiet rule runs, so a cut link stops getting traffic
            // within a fraction of an interval of the moment it is late.
            if self.quieten(now, interval) {
                self.publish();
            }
            return (Vec::new(), Vec::new());
        }
        // Due again one interval later (a late tick does not make the next one early).
        self.due.store(now + interval - interval / 10, Relaxed);
        let started = match self.started.load(Relaxed) {
            0 => {
                self.started.store(now.max(1), Relaxed);
                now
            }
            t => t,
        };
        let dead = interval * u64::from(self.spec.dead_after.max(1));
        let mut events = Vec::new();
        for (i, p) in self.stats.iter().enumerate() {
            let last = p.last_echo.load(Relaxed);
            // Before the first echo, the detection time counts from the start (for a learned
            // path, from when it was learned).
            let heard = if last == 0 { started } else { last }.max(self.learned_at(i));
            let alive = now.saturating_sub(heard) <= dead + interval / 2;
            if self.forgotten(i, now) {
                // Nobody behind it: not probed, not scheduled; the log hears of it once,
                // when a path that was there is forgotten (found down before or not).
                let was = p.forgotten.swap(true, Relaxed);
                if !was && p.learned.get().is_some() {
                    events.push(PathEvent {
                        path: i,
                        state: PathState::Down,
                    });
                }
                p.set_state(PathState::Down);
                continue;
            }
            p.forgotten.store(false, Relaxed);
            let next = match (p.state(), alive, last) {
                // Quiet stays quiet until an echo (`quieten` decides, below).
                (PathState::Quiet, true, _) => PathState::Quiet,
                (_, true, 0) => PathState::Unknown,
                (_, true, _) => PathState::Up,
                (_, false, _) => PathState::Down,
            };
            if next != p.state() {
                let was_quiet = p.state() == PathState::Quiet;
                p.set_state(next);
                if next == PathState::Down {
                    p.train.lock().unwrap_or_else(|e| e.into_inner()).reset();
                }
                // Quiet is not news for the log; down after quiet is.
                if next != PathState::Unknown && !(was_quiet && next == PathState::Up) {
                    events.push(PathEvent {
                        path: i,
                        state: next,
                    });
                }
            }
        }
        self.quieten(now, interval);
        if matches!(self.spec.scheduler, Scheduler::Spread | Scheduler::Earliest) && self.spec.adapt
        {
            let refs = self.refs();
            let max_rtt = refs
                .iter()
                .map(|p| p.srtt_ns.load(Relaxed))
                .max()
                .unwrap_or(0);
            // Two probes per path at least, and a round trip of the slowest path so that a
            // share changed at the last window shows in this one. (The echo marks count what
            // was in flight exactly, so a window need not be long for that.)
            let window = (2 * interval).max(max_rtt);
            let mut c = self.control.lock().unwrap_or_else(|p| p.into_inner());
            c.update(&refs, now, window);
            for (i, p) in refs.iter().enumerate() {
                p.capacity.store(c.capacity(i) as u64, Relaxed);
            }
        }
        self.publish();
        let probes = self
            .stats
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.forgotten(i, now))
            .map(|(i, p)| {
                p.probes_sent.fetch_add(1, Relaxed);
                (
                    i,
                    Probe {
                        tx_bytes: p.tx_bytes.load(Relaxed),
                        ..Probe::new(
                            ProbeKind::Probe,
                            i as u8,
                            self.probe_id.fetch_add(1, Relaxed),
                            now,
                            0,
                        )
                    },
                )
            })
            .collect();
        (events, probes)
    }

    /// The quiet rule at `now`: a path not down whose last echo (or the start, before the
    /// first) is more than a probe interval and a half old, and from which nothing else came
    /// in that time either, while another path's echoes are on time, becomes
    /// [`PathState::Quiet`]; a quiet path heard again within that time is up again. When
    /// every path is late it is the peer that is silent, not a path: none is quiet.
    ///
    /// Why both: a late echo alone is also what a queue building up on the way out looks
    /// like (measured: the lab's 40 ms link went quiet under a TCP stream's slow start, which
    /// took its traffic away and halved the stream); the peer's own probes and traffic on the
    /// way back still arrive then, and stop only when the link is gone. Returns whether a
    /// state changed.
    fn quieten(&self, now: u64, interval: u64) -> bool {
        let late_after = interval + interval / 2;
        let started = self.started.load(Relaxed);
        if started == 0 {
            return false;
        }
        let ago = |t: u64| now.saturating_sub(if t == 0 { started } else { t });
        let late: Vec<bool> = self
            .stats
            .iter()
            .map(|p| ago(p.last_echo.load(Relaxed)) > late_after)
            .collect();
        let silent: Vec<bool> = self
            .stats
            .iter()
            .zip(&late)
            .map(|(p, l)| *l && ago(p.heard.load(Relaxed)) > late_after)
            .collect();
        let heard = self
            .stats
            .iter()
            .zip(&late)
            .any(|(p, l)| !*l && p.state().scheduled());
        let mut changed = false;
        for ((p, l), s) in self.stats.iter().zip(&late).zip(&silent) {
            let next = match p.state() {
                PathState::Up | PathState::Unknown if *s && heard => PathState::Quiet,
                PathState::Quiet if !*l || !heard => match p.last_echo.load(Relaxed) {
                    0 => PathState::Unknown,
                    _ => PathState::Up,
                },
                same => same,
            };
            if next != p.state() {
                if next == PathState::Quiet {
                    p.quiet_count.fetch_add(1, Relaxed);
                }
                p.set_state(next);
                changed = true;
            }
        }
        changed
    }

    /// An authenticated echo arrived at `now`: credit the path it names.
    pub fn echoed(&self, probe: &Probe, now: u64) {
        if let Some(p) = self.stats.get(usize::from(probe.path)) {
            // A timestamp from the future is no echo of ours.
            if probe.sent <= now {
                p.echo(probe.sent, now, probe.tx_bytes, probe.rx_bytes);
                let mut t = p.train.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(train::Verdict::Rate(r)) =
                    t.echo(probe.id, now, probe.rx_bytes, probe.arrived)
                {
                    p.seed.store(r.max(1.0) as u64, Relaxed);
                }
            }
        }
    }

    /// Whether path `i` gets a capacity train before this round's probe `end` (sent at
    /// `now`): `spread` or `earliest` adapting, the path up and not measured, no train done or
    /// in flight ([`train`]). Returns the filler bytes (both halves together) and the
    /// identifiers of the train's probes P0, P1 (new) and P2 (`end`).
    pub fn train_plan(&self, i: usize, end: u64, now: u64) -> Option<(usize, [u64; 3])> {
        let adapts = matches!(self.spec.scheduler, Scheduler::Spread | Scheduler::Earliest)
            && self.spec.adapt
            && self.spec.capacity_trains;
        let p = self.stats.get(i)?;
        if !adapts || p.state() != PathState::Up || p.capacity.load(Relaxed) != 0 {
            return None;
        }
        let interval = u64::from(self.spec.probe_interval_ms) * 1_000_000;
        // The echoes come a round trip and the train's queue later.
        let late = 3 * interval + 2 * p.srtt_ns.load(Relaxed);
        let mut t = p.train.lock().unwrap_or_else(|e| e.into_inner());
        if !t.wanted(now, late) {
            return None;
        }
        let ids = [
            self.probe_id.fetch_add(1, Relaxed),
            self.probe_id.fetch_add(1, Relaxed),
            end,
        ];
        t.sent(ids, now);
        Some((t.bytes(), ids))
    }

    /// Keep the ESP packet `packet` sent with sequence number `seq` (of `inner_len` inner
    /// bytes) on path `path` (`None`: several) for repair, when repair is on.
    pub fn keep(&self, seq: u64, inner_len: usize, packet: &[u8], path: Option<usize>) {
        if self.spec.repair {
            let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
            s.keep(seq, inner_len, packet, path);
        }
    }

    /// Call `f` with the kept packet of SA `spi` numbered `seq` (low 48 bits), its inner
    /// length and the path it was sent on, if it is still kept and was not sent again
    /// before.
    pub fn kept<T>(
        &self,
        spi: u32,
        seq: u64,
        f: impl FnOnce(&[u8], usize, Option<usize>) -> T,
    ) -> Option<T> {
        let mut s = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        s.take(spi, seq).map(|(p, n, path)| f(p, n, path))
    }

    /// The path a request or a repair goes on: the scheduled path with the least smoothed
    /// RTT other than `not` (the one that lost the packet: after a cut it may not be found
    /// quiet yet) if there is one (`None`: no path is scheduled and measured).
    pub fn repair_path(&self, not: Option<usize>) -> Option<usize> {
        let ok = |i: &usize| {
            self.stats[*i].state().scheduled()
                && self.stats[*i].srtt_ns.load(Relaxed) > 0
                && (!self.learns || self.endpoint_of(*i).is_some())
        };
        let fastest = |skip: Option<usize>| {
            (0..self.stats.len())
                .filter(ok)
                .filter(|i| Some(*i) != skip)
                .min_by_key(|&i| self.stats[i].srtt_ns.load(Relaxed))
        };
        fastest(not).or_else(|| fastest(None))
    }

    /// The paths whose packets the reorder stage waits for (bit i: path i): neither down nor
    /// quiet. A quiet path has sent nothing this way for a probe interval and a half (the
    /// quiet rule's second witness is every authenticated packet from it), so a gap it would
    /// fill is lost: waiting out the hold for it added up to 100 ms to a cut's stall on a
    /// jittery path next to it.
    pub fn order_mask(&self) -> u32 {
        self.mask_where(PathState::scheduled)
    }

    /// The paths not found down (bit i: path i).
    pub fn live_mask(&self) -> u32 {
        self.mask_where(PathState::usable)
    }

    /// The paths whose state passes `keep` (bit i: path i).
    fn mask_where(&self, keep: fn(PathState) -> bool) -> u32 {
        self.stats
            .iter()
            .enumerate()
            .filter(|(_, p)| keep(p.state()))
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    /// How much later than it came a packet from `path` is delivered (`spread` only): half
    /// the difference between the largest and this path's minimum RTT among the live paths,
    /// so that every packet reaches the connection inside as late as the slowest path's, and
    /// TCP sees one delay (see [`Reorder::offer_after`]). Minimum RTTs: the paths' own
    /// delays, not their queues (queues differ from packet to packet; the reorder stage
    /// orders those). At most `reorder_ms`.
    pub fn skew_ns(&self, path: usize) -> u64 {
        if self.spec.scheduler != Scheduler::Spread || !self.spec.equal_delay {
            return 0;
        }
        let Some(mine) = self.stats.get(path).map(|p| p.min_rtt_ns.load(Relaxed)) else {
            return 0;
        };
        if mine == 0 {
            return 0;
        }
        let slowest = self
            .stats
            .iter()
            .filter(|p| p.state().usable())
            .map(|p| p.min_rtt_ns.load(Relaxed))
            .max()
            .unwrap_or(0);
        (slowest.saturating_sub(mine) / 2).min(u64::from(self.spec.reorder_ms) * 1_000_000)
    }

    /// How long the reorder stage holds a packet at most now: from the shortest delay a
    /// packet can have (the least minimum RTT of the live paths) to the longest one can
    /// have (the largest smoothed RTT plus four deviations, as RFC 6298 bounds a timeout),
    /// plus 10 ms, within `reorder_ms`. RTTs, not one-way delays: twice the one-way
    /// difference if the paths are symmetric, which leaves room for queueing on the way.
    ///
    /// The deviation matters when queues come and go: two 100 Mbit/s paths of 10 and 40 ms
    /// whose queues fill to tens of milliseconds have about the same smoothed RTT, yet one
    /// packet may wait 40 ms more than the next. A hold from the smoothed RTTs alone (10 ms
    /// there) gave up on 16 000 gaps in one transfer whose packets then came late; one TCP
    /// stream fell to 51 Mbit/s.
    pub fn hold_ns(&self) -> u64 {
        let bound = u64::from(self.spec.reorder_ms) * 1_000_000;
        let live = || {
            self.stats
                .iter()
                .filter(|p| p.state().usable() && p.srtt_ns.load(Relaxed) > 0)
        };
        let shortest = live().map(|p| p.min_rtt_ns.load(Relaxed)).min();
        let longest = live()
            .map(|p| p.srtt_ns.load(Relaxed) + 4 * p.rttvar_ns.load(Relaxed))
            .max();
        let (Some(shortest), Some(longest)) = (shortest, longest) else {
            return bound;
        };
        (longest.saturating_sub(shortest) + 10_000_000).min(bound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MS: u64 = 1_000_000;

    fn paths(n: usize) -> Vec<PathSpec> {
        (0..n)
            .map(|i| PathSpec::routed(&format!("l{i}"), IpAddr::from([10, i as u8, 0, 2]), 0))
            .collect()
    }

    fn mp(scheduler: Scheduler, n: usize) -> Multipath {
        Multipath::new(
            MultipathSpec {
                scheduler,
                ..MultipathSpec::default()
            },
            paths(n),
            None,
        )
    }

    fn counts(m: &Multipath, packets: usize) -> Vec<usize> {
        let mut c = vec![0; m.paths.len()];
        for _ in 0..packets {
            match m.pick() {
                Pick::One(i) => c[i] += 1,
                Pick::Every(mask) => {
                    for (i, x) in c.iter_mut().enumerate() {
                        if mask & (1 << i) != 0 {
                            *x += 1;
                        }
                    }
                }
            }
        }
        c
    }

    /// Answer every probe of a tick after `rtt`, as a peer that received `rx[i]` bytes.
    fn answer(m: &Multipath, probes: &[(usize, Probe)], at: u64, rx: &[u64]) {
        for (i, p) in probes {
            m.echoed(
                &Probe {
                    kind: ProbeKind::Echo,
                    rx_bytes: rx[*i],
                    ..*p
                },
                at,
            );
        }
    }

    #[test]
    fn probes_round_trip_and_anything_else_is_no_probe() {
        let p = Probe::new(ProbeKind::Echo, 2, 7, 123_456_789, 1 << 40);
        let mut b = [0u8; Probe::LEN];
        p.emit(&mut b);
        assert_eq!(Probe::parse(&b), Some(p));
        // With a skip list.
        let mut q = Probe::new(ProbeKind::Probe, 1, 8, 5, 0);
        q.skip[..2].copy_from_slice(&[41, 42]);
        q.skipped = 2;
        let mut long = [0u8; Probe::LEN + 16];
        q.emit(&mut long);
        assert_eq!(Probe::parse(&long), Some(q));
        assert_eq!(Probe::parse(&long[..Probe::LEN + 12]), None);
        // An echo with the arrival time; an echo of an older peer (none), and one with a
        // field more (ignored).
        let e = Probe {
            arrived: 77,
            ..Probe::new(ProbeKind::Echo, 1, 8, 5, 9)
        };
        let mut eb = [0u8; Probe::LEN + 16];
        e.emit(&mut eb);
        assert_eq!(e.len(), Probe::LEN + 8);
        assert_eq!(Probe::parse(&eb[..Probe::LEN + 8]), Some(e));
        assert_eq!(Probe::parse(&eb), Some(e));
        assert_eq!(Probe::parse(&eb[..Probe::LEN]).map(|p| p.arrived), Some(0));
        assert_eq!(Probe::parse(&[&long[..], &[0u8; 8 * 8]].concat()), None);
        assert_eq!(Probe::parse(&b[..31]), None);
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Probe::parse(&bad), None);
        bad = b;
        bad[4] = 3;
        assert_eq!(Probe::parse(&bad), None);
        assert_eq!(Probe::parse(&[0u8; 32]), None);
    }

    #[test]
    fn spread_starts_from_the_static_weights() {
        let mut ps = paths(2);
        ps[0].weight = 3;
        let m = Multipath::new(MultipathSpec::default(), ps, None);
        let c = counts(&m, 6400);
        assert_eq!(c, vec![4800, 1600]);
    }

    #[test]
    fn spread_interleaves_rather_than_bursts() {
        let m = mp(Scheduler::Spread, 2);
        let picks: Vec<Pick> = (0..8).map(|_| m.pick()).collect();
        assert_eq!(
            picks,
            [0, 1, 0, 1, 0, 1, 0, 1].map(Pick::One).to_vec(),
            "equal weights alternate"
        );
    }

    /// Shares follow what each path delivers: a 100 and a 25 (arbitrary units) path, each
    /// dropping what it is sent above its capacity, end near 80/20.
    #[test]
    fn spread_shares_follow_measured_capacity() {
        let m = mp(Scheduler::Spread, 2);
        let cap = [100_000_000.0f64 / 8.0, 25_000_000.0 / 8.0]; // bytes per second
        let offered = 150_000_000.0 / 8.0; // more than both together
        let tick = 100 * MS;
        let (mut tx, mut rx) = ([0u64; 2], [0u64; 2]);
        let mut now = MS;
        for _ in 0..200 {
            // One tick of traffic at the current shares, then the probes (which carry what was
            // sent) and their echoes (what arrived).
            for i in 0..2 {
                let share = f64::from(m.stats[i].share.load(Relaxed)) / SLOTS as f64;
                let sent = offered * share * 0.1;
                tx[i] += sent as u64;
                rx[i] += sent.min(cap[i] * 0.1) as u64;
                m.stats[i].tx_bytes.store(tx[i], Relaxed);
            }
            let (_, probes) = m.tick(now);
            answer(&m, &probes, now + 10 * MS, &rx);
            now += tick;
        }
        let s0 = m.stats[0].share.load(Relaxed);
        let s0 = f64::from(s0) / SLOTS as f64;
        assert!((0.76..=0.84).contains(&s0), "share of the 100 path: {s0}");
        let c = counts(&m, 6400);
        assert!(c[1] > 800 && c[1] < 1800, "{c:?}");
    }

    #[test]
    fn earliest_sends_each_packet_where_it_arrives_first() {
        let m = mp(Scheduler::Earliest, 2);
        // 100 Mbit/s at 10 ms RTT and 25 Mbit/s at 40 ms, both measured.
        for (i, (cap, rtt)) in [(100e6 / 8.0, 10 * MS), (25e6 / 8.0, 40 * MS)]
            .into_iter()
            .enumerate()
        {
            m.stats[i].set_state(PathState::Up);
            m.stats[i].capacity.store(cap as u64, Relaxed);
            m.stats[i].min_rtt_ns.store(rtt, Relaxed);
        }
        // Echoes come back on `echoing` paths (each packet's time stands for a fresh echo).
        let run_echoing = |mbit: f64, packets: usize, now: &mut u64, echoing: [bool; 2]| {
            let gap = (1250.0 * 8.0 / (mbit * 1e6) * 1e9) as u64;
            let mut c = [0usize; 2];
            for _ in 0..packets {
                for (i, e) in echoing.iter().enumerate() {
                    if *e {
                        m.stats[i].last_echo.store(*now, Relaxed);
                    }
                }
                match m.pick_at(*now, 1250) {
                    Pick::One(i) => c[i] += 1,
                    Pick::Every(_) => panic!("spread sends each packet once"),
                }
                *now += gap;
            }
            c
        };
        let run = |mbit, packets, now: &mut u64| run_echoing(mbit, packets, now, [true; 2]);
        let mut now = MS;
        // 50 Mbit/s: the fast path alone delivers every packet sooner; the slow one gets none.
        let c = run(50.0, 20_000, &mut now);
        assert_eq!(c[1], 0, "{c:?}");
        // 90 Mbit/s, under the fast path's capacity: still none.
        let c = run(90.0, 20_000, &mut now);
        assert_eq!(c[1], 0, "{c:?}");
        // The fast path falls silent (its echoes stop; not yet found down): within a probe
        // interval and a half, plus the 15 ms its delay advantage is worth (and a 5 ms chunk of
        // this loop), the packets leave it.
        let cut = now;
        let mut moved = None;
        for _ in 0..400 {
            let c = run_echoing(50.0, 25, &mut now, [false, true]);
            if c[0] == 0 && moved.is_none() {
                moved = Some(now - cut);
            }
        }
        let moved = moved.expect("traffic left the silent path");
        assert!(moved <= 185 * MS, "left after {} ms", moved / MS);
        m.stats[0].last_echo.store(now, Relaxed);
        // 200 Mbit/s, more than both: the slow path takes what arrives sooner over it, which
        // tends to its share of the capacity (a fifth).
        let c = run(200.0, 200_000, &mut now);
        let slow = c[1] as f64 / (c[0] + c[1]) as f64;
        assert!((0.17..0.21).contains(&slow), "{c:?}: {slow}");
        // A live path without a measured capacity next to a measured one: modelled at a
        // sixteenth of the measured sum (6.25 Mbit/s here), so at 200 Mbit/s it gets about
        // that much, enough to be measured: 0.78 of 13.28 MB/s, a seventeenth. (A fresh
        // model: the backlogs the overload above left would take seconds to drain.)
        m.stats[1].capacity.store(0, Relaxed);
        *m.arrival.lock().unwrap() = Arrival::default();
        let c = run(200.0, 200_000, &mut now);
        let slow = c[1] as f64 / (c[0] + c[1]) as f64;
        assert!((0.04..0.08).contains(&slow), "{c:?}: {slow}");
        // Nothing measured (a new peer): the path with the shortest newest delay takes every
        // packet, however many come; the slot table's equal weights are not used.
        m.stats[0].capacity.store(0, Relaxed);
        for (i, rtt) in [(0, 10 * MS), (1, 40 * MS)] {
            m.stats[i].last_rtt_ns.store(rtt, Relaxed);
        }
        let c = run(200.0, 20_000, &mut now);
        assert_eq!(c[1], 0, "{c:?}");
        // Until its queue shows: the fast path's newest RTT above the slow one's.
        m.stats[0].last_rtt_ns.store(60 * MS, Relaxed);
        let c = run(200.0, 20_000, &mut now);
        assert_eq!(c[0], 0, "{c:?}");
        // A live path with no RTT yet (no echo): the slot table decides.
        m.stats[1].min_rtt_ns.store(0, Relaxed);
        let c = run(50.0, 6400, &mut now);
        assert!(c[1] > 2000, "{c:?}");
    }

    /// Both paths answer every probe for a second, the control side ticking every `step`;
    /// returns the time after it.
    fn warm_up(m: &Multipath, step: u64) -> u64 {
        let mut now = MS;
        while now < 1000 * MS {
            let (_, probes) = m.tick(now);
            answer(m, &probes, now + MS, &[0, 0]);
            now += step;
        }
        now
    }

    #[test]
    fn a_dead_path_gets_nothing_within_the_detection_time_and_comes_back() {
        for s in Scheduler::ALL {
            let m = mp(s, 2);
            let interval = 100 * MS;
            let mut now = warm_up(&m, interval);
            assert_eq!(m.stats[1].state(), PathState::Up);
            // Path 1 goes silent at 1.0 s.
            let cut = now;
            let mut down_at = None;
            let mut events = Vec::new();
            while now < cut + 1000 * MS {
                let (ev, probes) = m.tick(now);
                events.extend(ev);
                answer(&m, &probes[..1], now + MS, &[0, 0]);
                if down_at.is_none() && m.stats[1].state() == PathState::Down {
                    down_at = Some(now);
                }
                now += interval;
            }
            let took = down_at.expect("path 1 declared down") - cut;
            // dead_after (3) x interval, plus at most half an interval of slack.
            assert!(took <= 400 * MS, "{s:?}: down after {} ms", took / MS);
            assert_eq!(
                events,
                vec![PathEvent {
                    path: 1,
                    state: PathState::Down
                }],
                "one event per change"
            );
            let c = counts(&m, 640);
            assert_eq!(c[1], 0, "{s:?}: the dead path gets nothing");
            assert!(c[0] >= 640, "{s:?}: {c:?}");
            // It answers again: up at the next tick, used again.
            let (_, probes) = m.tick(now);
            answer(&m, &probes, now + MS, &[0, 0]);
            let (ev, _) = m.tick(now + interval);
            assert_eq!(
                ev,
                vec![PathEvent {
                    path: 1,
                    state: PathState::Up
                }]
            );
            // Failover stays on path 0, which never failed.
            let again = counts(&m, 640)[1];
            assert_eq!(again > 0, s != Scheduler::Failover, "{s:?}: {again}");
        }
    }

    #[test]
    fn a_late_path_leaves_the_schedule_before_it_is_found_down() {
        for s in Scheduler::ALL {
            let m = mp(s, 2);
            // The probe thread ticks four times an interval.
            let step = 25 * MS;
            let mut now = warm_up(&m, step);
            assert_eq!(m.stats[1].state(), PathState::Up, "{s:?}");
            assert_eq!(m.stats[1].quiet_count.load(Relaxed), 0, "{s:?}: never late");
            // Path 1 falls silent; path 0 goes on answering.
            let cut = now;
            let mut quiet_at = None;
            let mut events = Vec::new();
            while now < cut + 200 * MS {
                let (ev, probes) = m.tick(now);
                events.extend(ev);
                let heard: Vec<_> = probes.into_iter().filter(|(i, _)| *i == 0).collect();
                answer(&m, &heard, now + MS, &[0, 0]);
                if quiet_at.is_none() && m.stats[1].state() == PathState::Quiet {
                    quiet_at = Some(now);
                }
                now += step;
            }
            let took = quiet_at.expect("path 1 quiet") - cut;
            // Its last echo was at most an interval before the cut; late after an interval
            // and a half; seen at the next quarter-interval tick.
            assert!(took <= 175 * MS, "{s:?}: quiet after {} ms", took / MS);
            assert!(events.is_empty(), "{s:?}: quiet is not logged: {events:?}");
            assert_eq!(m.stats[1].quiet_count.load(Relaxed), 1);
            // The reorder stage no longer waits for it; only `redundant` copies to it.
            assert_eq!((m.order_mask(), m.live_mask()), (0b01, 0b11), "{s:?}");
            let c = counts(&m, 640);
            match s {
                // A copy still goes to a path that is not down.
                Scheduler::Redundant => assert_eq!(c, vec![640, 640]),
                _ => assert_eq!(c, vec![640, 0], "{s:?}"),
            }
            // It answers again: up at once, used again, still no event.
            let (ev, probes) = m.tick(now);
            answer(&m, &probes, now + MS, &[0, 0]);
            let (ev2, _) = m.tick(now + step);
            assert!(ev.is_empty() && ev2.is_empty(), "{s:?}: {ev:?} {ev2:?}");
            assert_eq!(m.stats[1].state(), PathState::Up, "{s:?}");
            assert_eq!(m.order_mask(), 0b11, "{s:?}");
            assert_eq!(counts(&m, 640)[1] > 0, s != Scheduler::Failover, "{s:?}");
        }
        // Echoes late, but the path's way back still carries the peer's packets (a queue on
        // the way out, not a cut): not quiet.
        let m = mp(Scheduler::Spread, 2);
        let mut now = MS;
        while now < 1300 * MS {
            let (_, probes) = m.tick(now);
            let n = if now < 1000 * MS { 2 } else { 1 };
            let heard: Vec<_> = probes.into_iter().filter(|(i, _)| *i < n).collect();
            answer(&m, &heard, now + MS, &[0, 0]);
            m.stats[1].heard.store(now, Relaxed);
            now += 25 * MS;
        }
        // (Found down at 300-350 ms without echoes, as any path.)
        assert_eq!(m.stats[1].state(), PathState::Up);
        assert_eq!(m.stats[1].quiet_count.load(Relaxed), 0);
        // Every path late: the peer is silent, not a path; none is quiet.
        let m = mp(Scheduler::Spread, 2);
        let (_, probes) = m.tick(MS);
        answer(&m, &probes, 2 * MS, &[0, 0]);
        for k in 1..12 {
            m.tick(MS + k * 25 * MS);
        }
        assert_eq!(m.stats[0].state(), PathState::Up);
        assert_eq!(m.stats[1].state(), PathState::Up);
    }

    #[test]
    fn failover_uses_the_first_live_path_in_order() {
        let m = mp(Scheduler::Failover, 3);
        assert_eq!(counts(&m, 64), vec![64, 0, 0]);
        m.stats[0].set_state(PathState::Down);
        m.publish();
        assert_eq!(counts(&m, 64), vec![0, 64, 0]);
        m.stats[1].set_state(PathState::Down);
        m.publish();
        assert_eq!(counts(&m, 64), vec![0, 0, 64]);
        // Nothing live: the first path rather than nothing.
        m.stats[2].set_state(PathState::Down);
        m.publish();
        assert_eq!(counts(&m, 64), vec![64, 0, 0]);
    }

    #[test]
    fn redundant_copies_every_packet_to_every_live_path() {
        let m = mp(Scheduler::Redundant, 3);
        assert_eq!(m.pick(), Pick::Every(0b111));
        m.stats[1].set_state(PathState::Down);
        m.publish();
        assert_eq!(m.pick(), Pick::Every(0b101));
    }

    #[test]
    fn path_counters_survive_a_rebuild_when_name_and_endpoint_stay() {
        let a = mp(Scheduler::Spread, 2);
        a.stats[1].tx_bytes.store(42, Relaxed);
        let mut ps = paths(2);
        ps[0].endpoint = IpAddr::from([192, 0, 2, 9]);
        let b = Multipath::new(MultipathSpec::default(), ps, Some(&a));
        assert!(Arc::ptr_eq(&a.stats[1], &b.stats[1]));
        assert!(!Arc::ptr_eq(&a.stats[0], &b.stats[0]));
    }

    #[test]
    fn rtt_is_measured_from_the_echoed_timestamp() {
        let m = mp(Scheduler::Spread, 1);
        let (_, probes) = m.tick(10 * MS);
        answer(&m, &probes, 50 * MS, &[0]);
        assert_eq!(m.stats[0].srtt_ns.load(Relaxed), 40 * MS);
        assert_eq!(m.stats[0].min_rtt_ns.load(Relaxed), 40 * MS);
        // An echo claiming a send time in the future changes nothing.
        m.echoed(&Probe::new(ProbeKind::Echo, 0, 1, 500 * MS, 0), 60 * MS);
        assert_eq!(m.stats[0].echoes.load(Relaxed), 1);
        // An echo naming a path that does not exist changes nothing either.
        m.echoed(&Probe::new(ProbeKind::Echo, 9, 1, 1, 0), 60 * MS);
        assert_eq!(m.stats[0].echoes.load(Relaxed), 1);
    }

    fn collect(r: &mut Reorder, now: u64, s: &ReorderStats) -> Vec<u8> {
        let mut out = Vec::new();
        r.release(now, s, usize::MAX, |d| out.push(d[0]));
        out
    }

    #[test]
    fn reorder_delivers_in_order_and_fills_gaps() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        assert_eq!(r.offer(1, Some(&[1]), 0, 10, &s), Order::Now);
        assert_eq!(r.offer(3, Some(&[3]), 0, 10, &s), Order::Held);
        assert_eq!(r.offer(4, Some(&[4]), 0, 10, &s), Order::Held);
        assert!(collect(&mut r, 1, &s).is_empty(), "2 is missing");
        assert_eq!(r.offer(2, Some(&[2]), 1, 10, &s), Order::Now);
        assert!(r.ready(1));
        assert_eq!(collect(&mut r, 1, &s), vec![3, 4]);
        assert!(r.is_empty());
        assert_eq!(r.bytes(), 0);
        assert_eq!(s.gaps_skipped.load(Relaxed), 0);
    }

    /// An IKEv2 rekey in the middle of a multipath stream: the old SA's last packets are
    /// still on the slow path when the new SA's first ones (numbered from 1 again) arrive on
    /// the fast one. Every packet comes out, in the order it was sent, none counted lost.
    #[test]
    fn a_rekey_moves_the_order_to_the_new_sa_without_loss_or_reordering() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        r.set_live(0b11);
        let mut out = Vec::new();
        // (spi, the peer's newest SA when it arrives, seq, path, payload)
        let mut arrive = |r: &mut Reorder, spi, newest, seq: u64, path, id: u8, now: u64| {
            let k = r.key(spi, newest, seq);
            r.note(path, k, now, 1_000 * MS);
            if r.offer(k, Some(&[id]), now, 1_000 * MS, &s) == Order::Now {
                out.push(id);
            }
            r.release(now, &s, usize::MAX, |d| out.push(d[0]));
        };
        // The sender: old SA 0x100 numbers 1-10, then the new SA 0x200 numbers 1-6, odd
        // numbers on path 0 (fast), even on path 1 (slow).
        let mut now = 0;
        for seq in (1..=9).step_by(2) {
            now += MS;
            arrive(&mut r, 0x100, true, seq, 0, seq as u8, now);
        }
        for seq in (1..=5).step_by(2) {
            now += MS;
            // Installed as the primary inbound SA before the peer used it.
            arrive(&mut r, 0x200, true, seq, 0, 100 + seq as u8, now);
        }
        for seq in (2..=10).step_by(2) {
            now += MS;
            arrive(&mut r, 0x100, false, seq, 1, seq as u8, now);
        }
        for seq in (2..=6).step_by(2) {
            now += MS;
            arrive(&mut r, 0x200, true, seq, 1, 100 + seq as u8, now);
        }
        let want: Vec<u8> = (1..=10).chain(101..=106).collect();
        assert_eq!(out, want);
        assert!(r.is_empty());
        assert_eq!(s.gaps_skipped.load(Relaxed), 0);
        assert_eq!(s.late.load(Relaxed), 0);
    }

    #[test]
    fn a_packet_behind_ready_ones_waits_its_turn() {
        // 2 is held, 1 arrives (delivered now, 2 becomes ready), then 3 in the same batch:
        // 3 must not overtake 2.
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        r.offer(1, Some(&[0]), 0, 10, &s);
        r.offer(3, Some(&[3]), 0, 10, &s);
        assert_eq!(r.offer(2, Some(&[2]), 0, 10, &s), Order::Now);
        assert_eq!(r.offer(4, Some(&[4]), 0, 10, &s), Order::Held);
        assert_eq!(collect(&mut r, 0, &s), vec![3, 4]);
    }

    #[test]
    fn reorder_delay_is_bounded_and_late_packets_still_pass() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        r.offer(1, Some(&[1]), 0, 30 * MS, &s);
        r.offer(3, Some(&[3]), 5 * MS, 30 * MS, &s);
        r.offer(4, Some(&[4]), 6 * MS, 30 * MS, &s);
        assert_eq!(r.deadline(), Some(35 * MS));
        assert!(collect(&mut r, 34 * MS, &s).is_empty());
        assert_eq!(collect(&mut r, 35 * MS, &s), vec![3, 4]);
        assert_eq!(s.gaps_skipped.load(Relaxed), 1);
        // 2 arrives after it was given up on: delivered at once, counted late.
        assert_eq!(r.offer(2, Some(&[2]), 40 * MS, 30 * MS, &s), Order::Now);
        assert_eq!(s.late.load(Relaxed), 1);
    }

    #[test]
    fn reorder_memory_is_bounded() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(4, 1 << 20);
        r.offer(1, Some(&[1]), 0, 1000, &s);
        for seq in 3..=20u64 {
            let _ = r.offer(seq, Some(&[seq as u8]), 0, 1000, &s);
            assert!(r.len() <= 4, "{} held", r.len());
            let _ = collect(&mut r, 0, &s);
        }
        let mut r = Reorder::new(1000, 3000);
        r.offer(1, Some(&[1]), 0, 1000, &s);
        for seq in 3..=20u64 {
            let _ = r.offer(seq, Some(&[seq as u8; 1000]), 0, 1000, &s);
            assert!(r.bytes() <= 3000, "{} bytes", r.bytes());
            let _ = collect(&mut r, 0, &s);
        }
    }

    #[test]
    fn a_fast_paths_packets_wait_for_the_slowest_paths_delay_and_keep_their_order() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        r.set_live(0b11);
        // 1 and 2 on the fast path (45 ms of skew to wait), 3 on the slow one (none).
        assert_eq!(
            r.offer_after(1, Some(&[1]), 0, 100 * MS, 45 * MS, &s),
            Order::Held
        );
        assert_eq!(
            r.offer_after(2, Some(&[2]), MS, 100 * MS, 45 * MS, &s),
            Order::Held
        );
        assert!(!r.ready(44 * MS) && collect(&mut r, 44 * MS, &s).is_empty());
        assert_eq!(r.deadline(), Some(45 * MS));
        assert_eq!(
            r.offer_after(3, Some(&[3]), 44 * MS, 100 * MS, 0, &s),
            Order::Held
        );
        assert_eq!(collect(&mut r, 45 * MS, &s), vec![1]);
        assert_eq!(collect(&mut r, 46 * MS, &s), vec![2, 3]);
        // An in-order packet without wait goes at once; a probe's place never waits.
        assert_eq!(
            r.offer_after(4, Some(&[4]), 50 * MS, 100 * MS, 0, &s),
            Order::Now
        );
        assert_eq!(
            r.offer_after(5, None, 50 * MS, 100 * MS, 45 * MS, &s),
            Order::Now
        );
        assert_eq!(
            s.held.load(Relaxed),
            2,
            "2 and 3 came behind 1, not yet delivered"
        );
        assert_eq!(s.gaps_skipped.load(Relaxed), 0);
    }

    #[test]
    fn the_skew_is_half_the_minimum_rtt_difference_for_spread_only() {
        let m = mp(Scheduler::Spread, 3);
        for (i, ms) in [10u64, 100, 40].iter().enumerate() {
            m.stats[i].min_rtt_ns.store(ms * MS, Relaxed);
            m.stats[i].srtt_ns.store(ms * MS, Relaxed);
            m.stats[i].set_state(PathState::Up);
        }
        assert_eq!(m.skew_ns(0), 45 * MS);
        assert_eq!(m.skew_ns(1), 0);
        assert_eq!(m.skew_ns(2), 30 * MS);
        // A path down does not count as the slowest.
        m.stats[1].set_state(PathState::Down);
        assert_eq!(m.skew_ns(0), 15 * MS);
        let e = mp(Scheduler::Earliest, 2);
        e.stats[0].min_rtt_ns.store(10 * MS, Relaxed);
        e.stats[1].min_rtt_ns.store(100 * MS, Relaxed);
        assert_eq!(e.skew_ns(0), 0);
    }

    #[test]
    fn a_pure_ack_takes_the_fastest_path_until_it_falls_silent() {
        let m = mp(Scheduler::Spread, 3);
        let now = 1_000 * MS;
        for (i, ms) in [40u64, 10, 100].iter().enumerate() {
            m.stats[i].srtt_ns.store(ms * MS, Relaxed);
            m.stats[i].last_echo.store(now, Relaxed);
            m.stats[i].heard.store(now, Relaxed);
            m.stats[i].set_state(PathState::Up);
        }
        m.publish();
        assert_eq!(m.pick_packet(now, 60, true), Pick::One(1));
        // Nothing from path 1 for 50 ms plus more than its 30 ms lead (the others heard): a
        // cut, found before any probe is late.
        for i in [0, 2] {
            m.stats[i].heard.store(now + 81 * MS, Relaxed);
        }
        assert_eq!(m.pick_packet(now + 79 * MS, 60, true), Pick::One(1));
        assert_eq!(m.pick_packet(now + 81 * MS, 60, true), Pick::One(0));
        m.stats[1].heard.store(now + 81 * MS, Relaxed);
        // Data follows the schedule (all three paths), never this rule.
        let data: Vec<Pick> = (0..30).map(|_| m.pick_packet(now, 1400, false)).collect();
        assert!((0..3).all(|i| data.contains(&Pick::One(i))), "{data:?}");
        // Path 1 silent for 150 ms plus more than its 30 ms lead while the others answer:
        // path 0 is faster now.
        for i in [0, 2] {
            m.stats[i].last_echo.store(now + 181 * MS, Relaxed);
            m.stats[i].heard.store(now + 181 * MS, Relaxed);
        }
        assert_eq!(m.pick_packet(now + 181 * MS, 60, true), Pick::One(0));
        // Not scheduled (quiet, down): never picked.
        m.stats[0].set_state(PathState::Quiet);
        m.stats[1].set_state(PathState::Down);
        assert_eq!(m.pick_packet(now + 181 * MS, 60, true), Pick::One(2));
        // Off, or `redundant` (every packet on every path): the schedule decides.
        let mut spec = MultipathSpec {
            fast_acks: false,
            ..MultipathSpec::default()
        };
        let off = Multipath::new(spec, paths(2), None);
        spec.scheduler = Scheduler::Redundant;
        spec.fast_acks = true;
        let red = Multipath::new(spec, paths(2), None);
        for x in [&off, &red] {
            for (i, ms) in [40u64, 10].iter().enumerate() {
                x.stats[i].srtt_ns.store(ms * MS, Relaxed);
                x.stats[i].last_echo.store(now, Relaxed);
                x.stats[i].heard.store(now, Relaxed);
                x.stats[i].set_state(PathState::Up);
            }
            x.publish();
        }
        assert!(!off.fast_acks() && !red.fast_acks());
        let picks: Vec<Pick> = (0..4).map(|_| off.pick_packet(now, 60, true)).collect();
        assert!(picks.contains(&Pick::One(0)), "{picks:?}");
        assert_eq!(red.pick_packet(now, 60, true), Pick::Every(0b11));
    }

    #[test]
    fn a_gap_every_active_path_has_passed_is_a_loss_not_a_wait() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        let active = 50 * MS;
        r.set_live(0b11);
        // 1 on path 1; 2 (on path 1 too) is lost; 3 and 4 arrive on path 0.
        r.note(1, 1, 0, active);
        r.offer(1, Some(&[1]), 0, 30 * MS, &s);
        for seq in [3u64, 4] {
            r.note(0, seq, MS, active);
            assert_eq!(
                r.offer(seq, Some(&[seq as u8]), MS, 30 * MS, &s),
                Order::Held
            );
        }
        // Path 1 has delivered nothing newer than 2 yet: 2 may still come.
        assert!(collect(&mut r, 2 * MS, &s).is_empty());
        // Path 1's next packet, 5, proves 2 lost: 3 and 4 go at once, not after 30 ms.
        r.note(1, 5, 3 * MS, active);
        assert_eq!(r.offer(5, Some(&[5]), 3 * MS, 30 * MS, &s), Order::Held);
        assert!(r.ready(3 * MS));
        assert_eq!(collect(&mut r, 3 * MS, &s), vec![3, 4, 5]);
        assert_eq!(s.gaps_skipped.load(Relaxed), 1);
        // A path silent for longer than the active time holds nothing open.
        let mut r = Reorder::new(100, 1 << 20);
        r.set_live(0b11);
        r.note(1, 1, 0, active);
        r.note(0, 2, 0, active);
        r.offer(2, Some(&[2]), 0, 300 * MS, &s);
        r.note(0, 4, 100 * MS, active);
        r.offer(4, Some(&[4]), 100 * MS, 300 * MS, &s);
        assert_eq!(collect(&mut r, 100 * MS, &s), vec![4]);
    }

    #[test]
    fn a_repair_avoids_the_path_that_lost_the_packet() {
        let m = mp(Scheduler::Spread, 2);
        assert_eq!(m.repair_path(None), None, "nothing measured");
        warm_up(&m, 100 * MS);
        assert_eq!(m.repair_path(None), Some(0));
        assert_eq!(m.repair_path(Some(0)), Some(1));
        assert_eq!(m.repair_path(Some(1)), Some(0));
        // The only scheduled path is taken even if it lost the packet.
        m.stats[1].set_state(PathState::Quiet);
        assert_eq!(m.repair_path(Some(0)), Some(0));
    }

    #[test]
    fn a_lost_packet_is_asked_for_and_its_repair_delivered_when_it_comes() {
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        let active = 50 * MS;
        let spi = 0x0102_0304;
        let k = |r: &mut Reorder, seq: u64| r.key(spi, true, seq);
        r.set_live(0b11);
        r.set_repair(true);
        // Path 1 carries the odd numbers, path 0 the even ones; 3 is lost on path 1.
        let arrive = |r: &mut Reorder, seq: u64, at: u64| {
            let key = k(r, seq);
            r.note((seq % 2) as usize, key, at, active);
            r.offer(key, Some(&[seq as u8]), at, 30 * MS, &s)
        };
        for seq in [1, 2, 4, 5] {
            arrive(&mut r, seq, MS);
        }
        // Every path has passed 3: asked for, and not waited for.
        assert_eq!(collect(&mut r, MS, &s), vec![4, 5]);
        assert_eq!(r.take_asks(), vec![(spi, 3)]);
        assert!(r.take_asks().is_empty(), "asked once");
        assert_eq!(
            (s.asked.load(Relaxed), s.gaps_skipped.load(Relaxed)),
            (1, 1)
        );
        // Its repair comes (on the fast path, lower than its top): delivered at once.
        let key = k(&mut r, 3);
        r.note(0, key, 20 * MS, active);
        assert_eq!(r.offer(key, Some(&[3]), 20 * MS, 30 * MS, &s), Order::Now);
        assert_eq!(s.repaired.load(Relaxed), 1);
        // Five of 43 lost at once: a queue's drops; the first two are asked for, the rest not.
        let lost = [7, 9, 11, 13, 15];
        let mut expect = Vec::new();
        for seq in (6..=48).filter(|s| !lost.contains(s)) {
            if arrive(&mut r, seq, 500 * MS) == Order::Held {
                expect.push(seq as u8);
            }
        }
        assert_eq!(collect(&mut r, 500 * MS, &s), expect);
        assert_eq!(r.take_asks(), vec![(spi, 7), (spi, 9)]);
        assert_eq!(s.asked.load(Relaxed), 3);
        // One lost later (the loss periods over): asked for again.
        for seq in [49, 50, 52, 53] {
            arrive(&mut r, seq, 1000 * MS);
        }
        assert_eq!(collect(&mut r, 1000 * MS, &s), vec![52, 53]);
        assert_eq!(r.take_asks(), vec![(spi, 51)]);
        // Repair off: nothing asked.
        r.set_repair(false);
        for seq in [54, 56, 57] {
            arrive(&mut r, seq, 2000 * MS);
        }
        assert_eq!(collect(&mut r, 2000 * MS, &s), vec![56, 57]);
        assert!(r.take_asks().is_empty());
    }

    #[test]
    fn sequence_numbers_without_data_keep_their_place() {
        // A probe (seq 2) carries nothing to deliver; it must not leave a gap to wait for.
        let s = ReorderStats::default();
        let mut r = Reorder::new(100, 1 << 20);
        r.offer(1, Some(&[1]), 0, 10, &s);
        assert_eq!(r.offer(3, Some(&[3]), 0, 10, &s), Order::Held);
        assert_eq!(r.offer(2, None, 0, 10, &s), Order::Now);
        assert_eq!(collect(&mut r, 0, &s), vec![3]);
        assert_eq!(r.offer(5, None, 0, 10, &s), Order::Held);
        assert_eq!(r.offer(6, Some(&[6]), 0, 10, &s), Order::Held);
        assert_eq!(r.offer(4, Some(&[4]), 0, 10, &s), Order::Now);
        assert_eq!(collect(&mut r, 0, &s), vec![6]);
        assert_eq!(s.gaps_skipped.load(Relaxed), 0);
    }

    #[test]
    fn hold_time_follows_the_delay_difference() {
        let m = mp(Scheduler::Spread, 2);
        assert_eq!(m.hold_ns(), 100 * MS, "nothing measured: the bound");
        let set = |i: usize, min: u64, srtt: u64, var: u64| {
            m.stats[i].min_rtt_ns.store(min * MS, Relaxed);
            m.stats[i].srtt_ns.store(srtt * MS, Relaxed);
            m.stats[i].rttvar_ns.store(var * MS, Relaxed);
        };
        // Steady paths: the difference of their RTTs.
        set(0, 20, 20, 0);
        set(1, 80, 80, 0);
        assert_eq!(m.hold_ns(), 70 * MS);
        // Queues that come and go on both: equal smoothed RTTs, but a packet may still take
        // from the fast path's minimum to the slow end of either's spread.
        set(0, 10, 44, 5);
        set(1, 40, 44, 3);
        assert_eq!(m.hold_ns(), (44 + 20 - 10 + 10) * MS);
        set(1, 80, 400, 0);
        assert_eq!(m.hold_ns(), 100 * MS);
    }

    #[test]
    fn the_rtt_deviation_follows_rfc_6298() {
        let m = mp(Scheduler::Spread, 1);
        let p = &m.stats[0];
        p.echo(0, 40 * MS, 0, 0);
        assert_eq!(p.srtt_ns.load(Relaxed), 40 * MS);
        assert_eq!(p.rttvar_ns.load(Relaxed), 20 * MS);
        // RTTVAR = 3/4 * 20 + 1/4 * |40 - 80| = 25; SRTT = 7/8 * 40 + 1/8 * 80 = 45.
        p.echo(100 * MS, 180 * MS, 0, 0);
        assert_eq!(p.rttvar_ns.load(Relaxed), 25 * MS);
        assert_eq!(p.srtt_ns.load(Relaxed), 45 * MS);
    }
}

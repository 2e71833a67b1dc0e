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
//! The data path reads the schedule with relaxed atomics (a 64-slot table and a mask); the
//! control side rebuilds them at each probe tick from the paths' state.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::Mutex;

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

/// Slots of the spread schedule: shares are in 64ths.
pub const SLOTS: usize = 64;

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
    /// copies to it, the reorder stage still waits for it, the log says nothing. The next
    /// echo makes it up again.
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
    /// The share of `spread` in 64ths (the number of schedule slots).
    pub share: AtomicU32,
    /// What the controller estimates the path delivers, bytes per second (0: unknown).
    pub capacity: AtomicU64,
    /// ESP in UDP: the source port of the last authenticated datagram from the path's endpoint.
    pub udp_port_seen: AtomicU32,
    /// The newest echo's (probe send time, bytes we had sent on the path when we sent the
    /// probe, bytes the peer had received on it when it answered). The path is first in, first
    /// out, so everything sent before the probe arrived before the echo unless it was lost:
    /// two marks give the loss between them exactly.
    mark: Mutex<EchoMark>,
}

/// See [`PathStats`]'s `mark`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct EchoMark {
    sent: u64,
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
                tx_bytes,
                rx_bytes: peer_rx_bytes,
            };
        }
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

/// What the control side keeps per path between windows.
#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    /// The echo mark the last window ended at.
    mark: EchoMark,
    /// Estimated deliverable rate, bytes per second (0: nothing known yet).
    capacity: f64,
}

/// The `spread` controller: from each path's sent bytes and the bytes the peer reports it
/// received, estimate what the path delivers, and give each live path a share in proportion.
///
/// Each window (at least two probe intervals and four of the largest RTT) compares, between
/// the echo marks at its two ends, what was sent on the path before each probe with what the
/// peer had received when it answered it (exact on a first-in, first-out path: the difference
/// is what was lost):
/// - a path that lost more than [`Controller::LOSS`] of what it was sent, or whose probe RTT
///   rose above its minimum by half and by 20 ms (a queue building up), is saturated: its estimate becomes
///   what it delivered;
/// - a path that carried at least a tenth of its estimate without loss may carry more: its
///   estimate grows by [`Controller::GROWTH`] over the larger of the estimate and what it
///   delivered;
/// - an idle path keeps its estimate.
///
/// Shares follow the estimates; every live path keeps at least one slot in 64 so that it stays
/// measured.
#[derive(Debug, Default)]
pub struct Controller {
    samples: Vec<Sample>,
    window_start: u64,
}

impl Controller {
    /// Loss above which a path counts as saturated. The measurement is exact (echo marks on a
    /// first-in, first-out path), and a TCP flow keeps its loss well under 1% on any path it
    /// fills, so a small threshold is the right one.
    pub const LOSS: f64 = 0.03;
    /// Growth of an unsaturated path's estimate per window.
    pub const GROWTH: f64 = 1.25;

    /// Update the estimates at `now`, once `window_ns` has passed since the last update.
    pub fn update(&mut self, paths: &[&PathStats], now: u64, window_ns: u64) {
        if self.samples.len() != paths.len() {
            self.samples = paths
                .iter()
                .map(|p| Sample {
                    mark: p.mark(),
                    capacity: 0.0,
                })
                .collect();
            self.window_start = now;
        }
        if now.saturating_sub(self.window_start) < window_ns {
            return;
        }
        self.window_start = now;
        for (s, p) in self.samples.iter_mut().zip(paths) {
            let m = p.mark();
            if m.sent <= s.mark.sent {
                // No newer echo: nothing learnt about this path in the window.
                continue;
            }
            let dt = (m.sent - s.mark.sent) as f64 / 1e9;
            let sent = m.tx_bytes.saturating_sub(s.mark.tx_bytes) as f64;
            let delivered = m.rx_bytes.saturating_sub(s.mark.rx_bytes) as f64;
            s.mark = m;
            if p.state() == PathState::Down || sent <= 0.0 {
                continue;
            }
            let delivered_rate = delivered.min(sent) / dt;
            let srtt = p.srtt_ns.load(Relaxed);
            let min = p.min_rtt_ns.load(Relaxed);
            // A queue building up: the RTT above its minimum by half, and by 20 ms at least (both
            // ends' own batching adds a few milliseconds to every path alike, which must not
            // make the shortest path look congested).
            let queueing = min > 0 && srtt > min + (min / 2).max(20_000_000);
            let lossy = delivered < sent * (1.0 - Controller::LOSS);
            // Any queue at all (above the minimum by an eighth and 3 ms, more than the ends'
            // batching): the path is carrying what it can, so what it delivered is its
            // capacity; it may grow only while its RTT stays at the minimum.
            let full = min > 0 && srtt > min + (min / 8).max(3_000_000);
            if lossy || queueing {
                s.capacity = if s.capacity == 0.0 {
                    delivered_rate
                } else {
                    // Smoothed, so one bad window does not halve a path.
                    0.5 * s.capacity + 0.5 * delivered_rate
                };
            } else if full {
                // What it delivered, rising at once when that is more than the estimate (the
                // queue proves it could not take more, not that it took less), falling by a
                // tenth at most per window.
                s.capacity = delivered_rate.max(0.9 * s.capacity);
            } else {
                // Without loss or queue it may carry more than it delivered, but not without
                // bound (a growth on the estimate itself runs away on a path whose saturation
                // shows neither as loss nor as queue); and a path that was sent less than it
                // can carry (the scheduler preferred another, or the sender slowed down)
                // keeps its estimate: only loss or a queue lowers it.
                s.capacity = s.capacity.max(delivered_rate * Controller::GROWTH);
            }
        }
    }

    /// Each path's share in 64ths: live paths in proportion to their estimates (or to their
    /// static weights while any live path has none), at least one slot each; down paths none.
    /// `None` when no path is live.
    pub fn shares(&self, paths: &[&PathStats], weights: &[u32]) -> Option<Vec<u32>> {
        let live: Vec<bool> = paths.iter().map(|p| p.state().scheduled()).collect();
        if !live.contains(&true) {
            return None;
        }
        let caps: Vec<f64> = (0..paths.len())
            .map(|i| self.samples.get(i).map_or(0.0, |s| s.capacity))
            .collect();
        let measured = live.iter().zip(&caps).all(|(l, c)| !*l || *c > 0.0);
        let raw: Vec<f64> = (0..paths.len())
            .map(|i| match (live[i], measured) {
                (false, _) => 0.0,
                (true, true) => caps[i],
                (true, false) => f64::from(weights[i].max(1)),
            })
            .collect();
        Some(apportion(&raw))
    }

    /// The estimate of path `i`, bytes per second (0: none yet).
    pub fn capacity(&self, i: usize) -> f64 {
        self.samples.get(i).map_or(0.0, |s| s.capacity)
    }
}

/// Split [`SLOTS`] in proportion to `raw` (largest remainders), at least one slot for each
/// positive entry.
fn apportion(raw: &[f64]) -> Vec<u32> {
    let total: f64 = raw.iter().sum();
    let live = raw.iter().filter(|r| **r > 0.0).count();
    let mut out = vec![0u32; raw.len()];
    if live == 0 || total <= 0.0 {
        return out;
    }
    let free = (SLOTS - live) as f64;
    let mut rem: Vec<(f64, usize)> = Vec::new();
    let mut used = 0;
    for (i, r) in raw.iter().enumerate() {
        if *r > 0.0 {
            let exact = free * r / total;
            out[i] = 1 + exact.floor() as u32;
            used += out[i];
            rem.push((exact - exact.floor(), i));
        }
    }
    rem.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (_, i) in rem.iter().cycle().take(SLOTS.saturating_sub(used as usize)) {
        out[*i] += 1;
    }
    out
}

/// Lay out `shares` (summing to [`SLOTS`]) over the slots, each path's slots spread evenly
/// (smooth weighted round robin, as nginx does for upstreams).
fn layout(shares: &[u32]) -> [u8; SLOTS] {
    let mut table = [0u8; SLOTS];
    let mut current = vec![0i64; shares.len()];
    let total: i64 = shares.iter().map(|s| i64::from(*s)).sum();
    for slot in table.iter_mut() {
        let mut best = 0;
        for (i, s) in shares.iter().enumerate() {
            current[i] += i64::from(*s);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        *slot = best as u8;
    }
    table
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
    /// When the next tick is due.
    due: AtomicU64,
    control: Mutex<Controller>,
    /// `earliest`'s arrival model.
    arrival: Mutex<Arrival>,
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
#[derive(Debug, Default)]
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
        let m = Multipath {
            spec,
            paths,
            stats,
            table: Default::default(),
            mask: AtomicU32::new(0),
            next: AtomicU64::new(0),
            probe_id: AtomicU64::new(0),
            started: AtomicU64::new(0),
            due: AtomicU64::new(0),
            control: Mutex::new(Controller::default()),
            arrival: Mutex::default(),
            reorder: ReorderStats::default(),
        };
        m.publish();
        m
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

    /// The index of the path whose endpoint is `src` (the first, if several share it).
    pub fn path_from(&self, src: IpAddr) -> Option<usize> {
        self.paths.iter().position(|p| p.endpoint == src)
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
            s[0] = SLOTS as u32;
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
        self.mask.store(
            if mask == 0 {
                (1 << refs.len()) - 1
            } else {
                mask
            },
            Relaxed,
        );
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
            // Before the first echo, the detection time counts from the start.
            let heard = if last == 0 { started } else { last };
            let alive = now.saturating_sub(heard) <= dead + interval / 2;
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
            // Long enough that what is in flight (sent, not yet reported) is a small part.
            let window = (2 * interval).max(max_rtt * 4);
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
            }
        }
    }

    /// The paths not found down (bit i: path i).
    pub fn live_mask(&self) -> u32 {
        self.stats
            .iter()
            .enumerate()
            .filter(|(_, p)| p.state().usable())
            .fold(0, |m, (i, _)| m | 1 << i)
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

/// Whether an [`Probe`] asks or answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// Sent every probe interval on each path.
    Probe = 1,
    /// The answer, on the path the probe came from.
    Echo = 2,
}

/// The payload of a probe or echo inside an ESP dummy packet (next header 59):
///
/// ```text
///  0                   1                   2                   3
///  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
/// +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
/// |              magic "eMP1" (0x654d5031)                        |
/// +---------------+---------------+-------------------------------+
/// |  kind (1, 2)  | prober's path |          reserved (0)         |
/// +---------------+---------------+-------------------------------+
/// |                probe identifier (64 bits)                     |
/// +                                                               +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |          prober's send time, nanoseconds (64 bits)            |
/// +                                                               +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  inner bytes the prober had sent on the path (64 bits,        |
/// +            echoed unchanged)                                  +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  echo: inner bytes the answering side received on the path    |
/// +            the probe came by (probe: 0) (64 bits)             +
/// |                                                               |
/// +---------------------------------------------------------------+
/// |  probe: the sequence numbers of this round's probes on the    |
/// +  other paths, 64 bits each, at most 8 (the skip list)         +
/// ```
///
/// The prober's clock never leaves its own host in any other sense: the echo returns the
/// timestamp unchanged, so no clock synchronisation is assumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Probe or echo.
    pub kind: ProbeKind,
    /// The prober's path index.
    pub path: u8,
    /// Identifier.
    pub id: u64,
    /// The prober's send time.
    pub sent: u64,
    /// Bytes the prober had sent on the path when it sent the probe (echoed back unchanged).
    pub tx_bytes: u64,
    /// Echo: bytes received on the path.
    pub rx_bytes: u64,
    /// Probe: the sequence numbers of the probes sent on the other paths in the same round
    /// (the first `skipped` entries), so a receiver whose reorder stage misses them (a path is
    /// down) need not wait for them.
    pub skip: [u64; MAX_PATHS],
    /// Entries of `skip` in use.
    pub skipped: u8,
}

impl Probe {
    /// Bytes on the wire (inside ESP) without the skip list; each entry adds 8.
    pub const LEN: usize = 40;

    /// A probe or echo with no skip list.
    pub fn new(kind: ProbeKind, path: u8, id: u64, sent: u64, rx_bytes: u64) -> Probe {
        Probe {
            kind,
            path,
            id,
            sent,
            tx_bytes: 0,
            rx_bytes,
            skip: [0; MAX_PATHS],
            skipped: 0,
        }
    }

    /// Its length on the wire.
    pub fn len(&self) -> usize {
        Probe::LEN + 8 * usize::from(self.skipped)
    }

    /// Never: a probe has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The skip list in use.
    pub fn skipped(&self) -> &[u64] {
        &self.skip[..usize::from(self.skipped).min(MAX_PATHS)]
    }
    const MAGIC: [u8; 4] = *b"eMP1";

    /// Write the payload into `out` (at least [`Probe::len`] bytes).
    pub fn emit(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&Probe::MAGIC);
        out[4] = self.kind as u8;
        out[5] = self.path;
        out[6..8].copy_from_slice(&[0, 0]);
        out[8..16].copy_from_slice(&self.id.to_be_bytes());
        out[16..24].copy_from_slice(&self.sent.to_be_bytes());
        out[24..32].copy_from_slice(&self.tx_bytes.to_be_bytes());
        out[32..40].copy_from_slice(&self.rx_bytes.to_be_bytes());
        for (i, s) in self.skipped().iter().enumerate() {
            out[40 + 8 * i..48 + 8 * i].copy_from_slice(&s.to_be_bytes());
        }
    }

    /// Read a payload; `None` for anything else (another implementation's dummy packet, TFC
    /// padding).
    pub fn parse(b: &[u8]) -> Option<Probe> {
        let extra = b.len().checked_sub(Probe::LEN)?;
        if extra % 8 != 0 || extra / 8 > MAX_PATHS || b[0..4] != Probe::MAGIC || b[6..8] != [0, 0] {
            return None;
        }
        let kind = match b[4] {
            1 => ProbeKind::Probe,
            2 => ProbeKind::Echo,
            _ => return None,
        };
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let mut p = Probe::new(kind, b[5], u64_at(8), u64_at(16), u64_at(32));
        p.tx_bytes = u64_at(24);
        for i in 0..extra / 8 {
            p.skip[i] = u64_at(40 + 8 * i);
        }
        p.skipped = (extra / 8) as u8;
        Some(p)
    }
}

/// One packet waiting in the reorder stage (`None`: a sequence number that carried nothing to
/// deliver, a probe for example, kept so the gap it would leave is not waited for).
#[derive(Debug)]
struct Held {
    data: Option<Vec<u8>>,
    deadline: u64,
}

/// Counters of a reorder stage.
#[derive(Debug, Default)]
pub struct ReorderStats {
    /// Packets that waited for a gap ahead of them.
    pub held: AtomicU64,
    /// Gaps given up on (the hold time passed, or the stage was full): packets lost on a path.
    pub gaps_skipped: AtomicU64,
    /// Packets that arrived after their gap was given up on (delivered at once).
    pub late: AtomicU64,
    /// Packets delivered out of order because the stage was full.
    pub overflow: AtomicU64,
}

/// The receiver's reorder stage of one peer, keyed by the ESP sequence number: a packet that
/// arrives in order is delivered at once; one ahead of a gap waits until the gap fills or its
/// hold time passes; one behind (its gap already given up) is delivered at once. Memory is
/// bounded by packets and bytes; buffers are recycled.
#[derive(Debug)]
pub struct Reorder {
    /// The next sequence number to deliver (0: nothing seen yet).
    next: u64,
    held: BTreeMap<u64, Held>,
    bytes: usize,
    max_packets: usize,
    max_bytes: usize,
    free: Vec<Vec<u8>>,
    /// Per path: the highest sequence number received and when. Each path delivers in order
    /// (a link is a FIFO), so a gap below what every recently active path has delivered is a
    /// loss, not a packet still on its way: it is not waited for.
    tops: [(u64, u64); MAX_PATHS],
    /// How long a path counts as active after its last packet.
    active_ns: u64,
    /// The paths that may carry packets (bit i: path i; not found down by our own probes).
    live: u32,
}

/// What the reorder stage does with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// Deliver it now.
    Now,
    /// Copied into the stage; [`Reorder::release`] delivers it.
    Held,
}

impl Reorder {
    /// A stage holding at most `max_packets` packets and `max_bytes` bytes.
    pub fn new(max_packets: usize, max_bytes: usize) -> Reorder {
        Reorder {
            next: 0,
            held: BTreeMap::new(),
            bytes: 0,
            max_packets: max_packets.max(1),
            max_bytes,
            free: Vec::new(),
            tops: [(0, 0); MAX_PATHS],
            active_ns: 0,
            live: 0,
        }
    }

    /// Which paths may carry packets (bit i: path i): a live path that has delivered nothing
    /// yet holds every gap open; a path not live holds none.
    pub fn set_live(&mut self, mask: u32) {
        self.live = mask;
    }

    /// A packet with sequence number `seq` arrived on `path` at `now`; a path that delivered
    /// nothing for `active_ns` no longer holds gaps open.
    pub fn note(&mut self, path: usize, seq: u64, now: u64, active_ns: u64) {
        if let Some(t) = self.tops.get_mut(path) {
            if seq > t.0 {
                *t = (seq, now);
            } else {
                t.1 = now;
            }
        }
        self.active_ns = active_ns;
    }

    /// The lowest of the live paths' highest sequence numbers: everything below it that has
    /// not arrived was lost. A live path that has delivered nothing yet makes it 0 (its first
    /// packets may be on their way); one idle for longer than the active time does not count.
    fn floor(&self, now: u64) -> u64 {
        self.tops
            .iter()
            .enumerate()
            .filter(|(i, (s, at))| {
                self.live & (1 << i) != 0 && (*s == 0 || now.saturating_sub(*at) <= self.active_ns)
            })
            .map(|(_, (s, _))| *s)
            .min()
            .unwrap_or(0)
    }

    /// Packets held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The earliest time a held packet must be released (`None`: nothing held).
    pub fn deadline(&self) -> Option<u64> {
        self.held.values().map(|h| h.deadline).min()
    }

    /// Whether [`Reorder::release`] has something to deliver at `now`.
    pub fn ready(&self, now: u64) -> bool {
        self.held.first_key_value().is_some_and(|(s, h)| {
            *s == self.next || h.deadline <= now || self.floor(now) > self.next
        })
    }

    /// The peer says `seq` went on a path that may be down (a probe of another path): if it
    /// has not arrived, do not wait for it.
    pub fn forget(&mut self, seq: u64) {
        if self.next == 0 || seq < self.next {
            return;
        }
        if seq == self.next {
            self.next += 1;
            return;
        }
        self.held.entry(seq).or_insert(Held {
            data: None,
            deadline: 0,
        });
    }

    /// A packet with sequence number `seq` (authenticated, not a duplicate) and `data` to
    /// deliver (`None`: nothing to deliver, only its place in the order) arrived at `now`; it
    /// may wait until `now + hold`.
    pub fn offer(
        &mut self,
        seq: u64,
        data: Option<&[u8]>,
        now: u64,
        hold: u64,
        stats: &ReorderStats,
    ) -> Order {
        if self.next == 0 {
            self.next = seq;
        }
        if seq == self.next {
            self.next += 1;
            return Order::Now;
        }
        if seq < self.next {
            if data.is_some() {
                stats.late.fetch_add(1, Relaxed);
            }
            return Order::Now;
        }
        let len = data.map_or(0, <[u8]>::len);
        if self.held.len() >= self.max_packets || self.bytes + len > self.max_bytes {
            // Full: deliver this one out of order rather than lose it or grow; the held ones
            // keep their deadlines.
            stats.overflow.fetch_add(1, Relaxed);
            return Order::Now;
        }
        let data = data.map(|d| {
            let mut v = self.free.pop().unwrap_or_default();
            v.clear();
            v.extend_from_slice(d);
            v
        });
        self.bytes += len;
        if data.is_some() {
            stats.held.fetch_add(1, Relaxed);
        }
        self.held.insert(
            seq,
            Held {
                data,
                deadline: now.saturating_add(hold),
            },
        );
        Order::Held
    }

    /// Deliver, in order, up to `limit` held packets whose turn has come at `now`: the run
    /// that continues the order, and past a gap whose oldest waiting packet's hold time
    /// passed. `deliver` gets each packet's bytes. Returns how many were delivered.
    pub fn release(
        &mut self,
        now: u64,
        stats: &ReorderStats,
        limit: usize,
        mut deliver: impl FnMut(&[u8]),
    ) -> usize {
        let mut n = 0;
        let floor = self.floor(now);
        while let Some(mut e) = self.held.first_entry() {
            if n == limit {
                break;
            }
            let seq = *e.key();
            if seq != self.next {
                // Every active path has delivered past the gap: it is lost.
                if floor > self.next {
                    stats.gaps_skipped.fetch_add(1, Relaxed);
                    self.next = floor.min(seq);
                    continue;
                }
                if e.get().deadline > now {
                    break;
                }
                stats.gaps_skipped.fetch_add(1, Relaxed);
            }
            let h = e.get_mut();
            let data = h.data.take();
            e.remove();
            self.next = seq + 1;
            if let Some(d) = data {
                self.bytes -= d.len();
                deliver(&d);
                n += 1;
                if self.free.len() < 256 {
                    self.free.push(d);
                }
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MS: u64 = 1_000_000;

    fn paths(n: usize) -> Vec<PathSpec> {
        (0..n)
            .map(|i| PathSpec {
                name: format!("l{i}"),
                endpoint: IpAddr::from([10, i as u8, 0, 2]),
                port: 0,
                weight: 1,
            })
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
        assert!((48..=55).contains(&s0), "share of the 100 path: {s0}/64");
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

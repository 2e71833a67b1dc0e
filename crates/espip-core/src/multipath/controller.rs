//! Each path's share of the traffic: capacity samples, the controller that turns them into shares,
//! and the slot layout the schedulers read.

use super::*;

/// What the control side keeps per path between windows.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Sample {
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
#[derive(Debug, Default, Clone)]
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
pub(super) fn apportion(raw: &[f64]) -> Vec<u32> {
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
pub(super) fn layout(shares: &[u32]) -> [u8; SLOTS] {
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

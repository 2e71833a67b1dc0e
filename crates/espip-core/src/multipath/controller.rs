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
    /// Windows in a row this path was unsaturated next to a saturated one.
    under: u32,
    /// What the last window sent on it, bytes per second (0: that window measured nothing).
    sent: f64,
    /// When the path was last seen down (0: never): a window measures it only between the
    /// echoes of probes sent after that.
    down_at: u64,
}

/// What one window showed of one path.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// What the peer received on it, bytes per second.
    delivered: f64,
    /// What it was sent, bytes per second.
    sent: f64,
    /// It carried all it could: a queue through the whole window, or loss.
    saturated: bool,
    /// It lost more than [`Controller::LOSS`].
    lossy: bool,
}

/// The `spread` controller: from each path's sent bytes and the bytes the peer reports it
/// received, estimate what the path delivers, and give each live path a share in proportion.
///
/// One TCP stream spread over paths fills them until the first one is saturated: a path
/// whose share is too large for its capacity queues and drops while the others idle, and the
/// stream gets that path's capacity over its share, not the sum. So the controller balances
/// the paths' queues. Each window (at least two probe intervals and the largest RTT)
/// compares, between the echo marks at its two ends, what was sent on the path before each
/// probe with what the peer had received when it answered it (exact on a first-in, first-out
/// path: the difference is what was lost), and reads the smallest probe RTT of the window:
/// - a path that lost more than [`Controller::LOSS`] of what it was sent, or whose smallest
///   RTT of the window stayed above its minimum by a sixteenth and 2 ms (a queue through the
///   whole window: jitter and the ends' batching do not hold every probe up), is
///   **saturated**: what it delivered is its capacity, exactly;
/// - while another path is saturated, an unsaturated path carried less than it can: its
///   estimate becomes what it delivered times 1 + [`Controller::GAIN`] (more after two
///   windows in a row: `Controller::gain`): its share grows
///   against the saturated path's until it saturates too, within a few windows even when the
///   starting shares are 4:1 off; an estimate too high falls in the same step;
/// - while no path is saturated (the sender sends less than the paths carry), nothing is
///   learnt about the ratio: a known estimate only rises, to what the path delivered times
///   [`Controller::GROWTH`], and an unknown one stays unknown;
/// - an idle path keeps its estimate; a path that goes down loses it.
///
/// Shares follow the estimates (an unmeasured live path next to measured ones is taken at
/// their mean; with none measured, the static weights decide); every live path keeps at
/// least a 64th so that it stays measured.
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
    /// Fewest bytes sent on a path in a window that measures it (a dozen full-sized packets;
    /// a 64th of a 50 Mbit/s stream in 200 ms is 19.5 KB).
    pub const MIN_WINDOW_BYTES: f64 = 16_384.0;
    /// Growth of an estimate over what its path delivered while no path is saturated.
    pub const GROWTH: f64 = 1.25;
    /// How far above what it delivered an unsaturated path next to a saturated one is
    /// estimated. Measured (three links 60/10, 30/100, 15/40 ms, cubic, 3 runs each; and the
    /// simulation below): 0.1 found fresh paths in the lab in 1.2-1.4 s at 0.77-0.91 of the
    /// ceiling (simulation: found in 5.2 s, a halved or restored rate in 1.8 / 1.4 s, 99.9
    /// Mbit/s of 105 after); 0.25 in 1.0-2.2 s at 0.68-0.89 (simulation 2.8 s, 91.7 Mbit/s:
    /// the raised path takes a queue, the others' estimates fall, shares swing); a gain
    /// doubling from 0.05 to 0.5 per window in 1.0-1.8 s at 0.56-0.91 (simulation 3.0 s,
    /// 96.5). A gain doubling to 1 overshot for seconds. Kept: 0.1, growing after two windows
    /// in a row (`Controller::gain`; simulation 2.5 s, 100.3 Mbit/s).
    pub const GAIN: f64 = 0.1;
    /// Largest gain of a path unsaturated next to a saturated one for windows in a row.
    pub const GAIN_MAX: f64 = 0.4;
    /// Growth of the traffic sent over every path from one window to the next above which
    /// the window is a sender's ramp (slow start: doubling each round trip), whose bursts
    /// queue on every path for a moment: such a window lowers no estimate but by loss.
    pub const RAMP: f64 = 1.5;

    /// The gain of a path that has been unsaturated next to a saturated one for `under`
    /// windows in a row: [`Controller::GAIN`] for two windows (a path balanced against the
    /// others saturates in turn with them and never gets further), then doubling each window
    /// up to [`Controller::GAIN_MAX`]: a path whose rate rose, or that came back from a cut at
    /// a fraction of its rate, is found in a few windows instead of a tenth per window.
    fn gain(under: u32) -> f64 {
        let doublings = under.saturating_sub(2).min(8);
        (Controller::GAIN * f64::from(1u32 << doublings)).min(Controller::GAIN_MAX)
    }

    /// Update the estimates at `now`, once `window_ns` has passed since the last update.
    pub fn update(&mut self, paths: &[&PathStats], now: u64, window_ns: u64) {
        if self.samples.len() != paths.len() {
            self.samples = paths
                .iter()
                .map(|p| Sample {
                    mark: p.mark(),
                    ..Sample::default()
                })
                .collect();
            self.window_start = now;
            for p in paths {
                p.take_window_rtt();
            }
        }
        // A path that went down forgets what it was measured at: its last windows measured the
        // cut (it delivered nothing), not its rate, and what comes back may be another line.
        // Back up, it is unmeasured and taken at the measured paths' mean until its first
        // window measures it ([`Controller::shares`]; keeping the cut's near-zero estimate
        // left it a 64th that grew a tenth per window: 17 s to 60 Mbit/s in the lab).
        // Echoes of probes sent before it came back (a link that held its packets through the
        // cut delivers them late) span the cut: the bytes sent into it looked lost, and the
        // path was measured at a few hundred kbit/s with nothing sent since (lab, three links:
        // link 1 back from a cut at 0.15 Mbit/s, 2 s and more to its rate).
        for (s, p) in self.samples.iter_mut().zip(paths) {
            if p.state() == PathState::Down {
                *s = Sample {
                    down_at: now,
                    ..Sample::default()
                };
            }
        }
        // A capacity train measured a path that had no estimate: that is its estimate, and
        // the windows that span the train (its fillers sent at once) measure nothing.
        for (s, p) in self.samples.iter_mut().zip(paths) {
            let seed = p.seed.swap(0, Relaxed);
            if seed > 0 && s.capacity == 0.0 && p.state() != PathState::Down {
                s.capacity = seed as f64;
                s.down_at = now;
            }
        }
        if now.saturating_sub(self.window_start) < window_ns {
            return;
        }
        self.window_start = now;
        let seen: Vec<Option<Window>> = self
            .samples
            .iter_mut()
            .zip(paths)
            .map(|(s, p)| Controller::window(s, p))
            .collect();
        let any_saturated = seen.iter().flatten().any(|w| w.saturated);
        // A sender ramping up (slow start at the next transfer over a path back from a cut)
        // queues its bursts on every path and gives each a fraction of what it can carry: a
        // queue then is no path's limit, and what a path delivered is no measure of it. Such a
        // window raises known estimates and, next to known ones, measures an unknown one (taken
        // at their mean) only when its path lost; no estimate falls but by loss (measured: a path back from a cut was estimated at
        // what the slow-starting sender gave it and took 1.0 to over 3 s to reach 80% of its
        // rate).
        let ramp = Controller::ramp(&self.samples, &seen);
        let known = self.samples.iter().any(|s| s.capacity > 0.0);
        for (s, w) in self.samples.iter_mut().zip(&seen) {
            let before = s.capacity;
            s.sent = w.map_or(0.0, |w| w.sent);
            let Some(w) = w else { continue };
            Controller::learn(s, w, any_saturated);
            if ramp && !w.lossy && (before > s.capacity || (before == 0.0 && known)) {
                s.capacity = before;
            }
        }
    }

    /// Whether the window `seen` (against the last one, in `samples`) is a sender's ramp: the
    /// traffic over the paths measured in both windows grew by [`Controller::RAMP`] or more,
    /// or, where no path was measured in the last window (a transfer starting), any path
    /// carried a window's worth. Comparing the same paths keeps a path measured one window and
    /// not the next (no newer echo, too little sent) from looking like a ramp.
    fn ramp(samples: &[Sample], seen: &[Option<Window>]) -> bool {
        let (mut before, mut now, mut any) = (0.0, 0.0, false);
        for (s, w) in samples.iter().zip(seen) {
            let Some(w) = w else { continue };
            any = true;
            if s.sent > 0.0 {
                before += s.sent;
                now += w.sent;
            }
        }
        if before > 0.0 {
            now > Controller::RAMP * before
        } else {
            any
        }
    }

    /// Path sample `s` learns what window `w` showed of it (`any_saturated`: another path or
    /// this one was saturated in the window).
    fn learn(s: &mut Sample, w: &Window, any_saturated: bool) {
        {
            if w.saturated {
                s.capacity = w.delivered;
                s.under = 0;
            } else if any_saturated {
                s.capacity = w.delivered * (1.0 + Controller::gain(s.under));
                s.under = s.under.saturating_add(1);
            } else if s.capacity > 0.0 {
                s.under = 0;
                // Only a known estimate rises: a path that carried little while nothing was
                // saturated (idle, or before the first transfer) is not measured by that.
                s.capacity = s.capacity.max(w.delivered * Controller::GROWTH);
            }
        }
    }

    /// What the window that ends now showed of path `p` (`None`: nothing learnt: no newer echo,
    /// the path down, or under [`Controller::MIN_WINDOW_BYTES`] sent), moving `s`'s mark to
    /// the newest echo.
    fn window(s: &mut Sample, p: &PathStats) -> Option<Window> {
        let win_rtt = p.take_window_rtt();
        let m = p.mark();
        if m.sent <= s.mark.sent {
            // No newer echo: nothing learnt about this path in the window.
            return None;
        }
        let prev = std::mem::replace(&mut s.mark, m);
        if prev.echoed == 0 || prev.sent <= s.down_at {
            // The window started before any echo (no rate to compare with yet), or at a
            // probe sent before the path came back (see [`Controller::update`]).
            return None;
        }
        let dt = m.echoed.saturating_sub(prev.echoed).max(1) as f64 / 1e9;
        let sent = m.tx_bytes.saturating_sub(prev.tx_bytes) as f64;
        let delivered = m.rx_bytes.saturating_sub(prev.rx_bytes) as f64;
        // A window that carried a few packets only measures nothing: at rest, what is in
        // flight at its ends (or a lost ping) looks like loss, and the "saturated" window
        // made an idle path's estimate what it delivered, a few kbit/s, which left a path that
        // came back from a cut at a 64th of the traffic for seconds.
        if p.state() == PathState::Down || sent < Controller::MIN_WINDOW_BYTES {
            return None;
        }
        let min = p.min_rtt_ns.load(Relaxed);
        let queued = min > 0 && win_rtt > min + (min / 16).max(2_000_000);
        let lossy = delivered < sent * (1.0 - Controller::LOSS);
        Some(Window {
            delivered: delivered.min(sent) / dt,
            sent: sent / dt,
            saturated: queued || lossy,
            lossy,
        })
    }

    /// Each path's share in slots ([`SLOTS`]): live paths in proportion to their estimates (or
    /// to their static weights while any live path has none), at least [`MIN_SLOTS`] each;
    /// down paths none.
    /// `None` when no path is live.
    pub fn shares(&self, paths: &[&PathStats], weights: &[u32]) -> Option<Vec<u32>> {
        let live: Vec<bool> = paths.iter().map(|p| p.state().scheduled()).collect();
        if !live.contains(&true) {
            return None;
        }
        let caps: Vec<f64> = (0..paths.len())
            .map(|i| self.samples.get(i).map_or(0.0, |s| s.capacity))
            .collect();
        // Live paths measured so far: an unmeasured one next to them (back from a cut, or
        // added) is taken at their mean, a fair share to be measured at; with none measured,
        // the static weights decide.
        let known: Vec<f64> = (0..paths.len())
            .filter(|i| live[*i] && caps[*i] > 0.0)
            .map(|i| caps[i])
            .collect();
        let mean = known.iter().sum::<f64>() / known.len().max(1) as f64;
        let raw: Vec<f64> = (0..paths.len())
            .map(|i| match (live[i], known.is_empty()) {
                (false, _) => 0.0,
                (true, true) => f64::from(weights[i].max(1)),
                (true, false) if caps[i] > 0.0 => caps[i],
                (true, false) => mean,
            })
            .collect();
        Some(apportion(&raw))
    }

    /// The estimate of path `i`, bytes per second (0: none yet).
    pub fn capacity(&self, i: usize) -> f64 {
        self.samples.get(i).map_or(0.0, |s| s.capacity)
    }
}

/// Split [`SLOTS`] in proportion to `raw` (largest remainders), then raise each positive
/// entry below [`MIN_SLOTS`] to it, taking the slots from the largest.
pub(super) fn apportion(raw: &[f64]) -> Vec<u32> {
    let total: f64 = raw.iter().sum();
    let live = raw.iter().filter(|r| **r > 0.0).count();
    let mut out = vec![0u32; raw.len()];
    if live == 0 || total <= 0.0 {
        return out;
    }
    let mut rem: Vec<(f64, usize)> = Vec::new();
    let mut used = 0;
    for (i, r) in raw.iter().enumerate() {
        if *r > 0.0 {
            let exact = SLOTS as f64 * r / total;
            out[i] = exact.floor() as u32;
            used += out[i];
            rem.push((exact - exact.floor(), i));
        }
    }
    rem.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (_, i) in rem.iter().cycle().take(SLOTS.saturating_sub(used as usize)) {
        out[*i] += 1;
    }
    for i in 0..out.len() {
        while raw[i] > 0.0 && (out[i] as usize) < MIN_SLOTS {
            let largest = (0..out.len()).max_by_key(|&j| out[j]).unwrap_or(i);
            out[largest] -= 1;
            out[i] += 1;
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const MS: u64 = 1_000_000;

    /// A fluid model of paths (rate, base RTT, a tail-drop queue of 50 ms at the rate, as the
    /// lab's `tbf`) under one loss-based sender through `spread`: the sender's rate grows by
    /// a fixed step every 10 ms and falls by 30% at a drop (at most once per largest RTT).
    struct Sim {
        m: Multipath,
        /// Bytes per second.
        cap: Vec<f64>,
        rtt: Vec<u64>,
        queue: Vec<f64>,
        tx: Vec<f64>,
        rx: Vec<f64>,
        /// Probes in flight: (arrival at the peer, path, probe, bytes received then).
        flight: VecDeque<(u64, usize, Probe, Option<u64>)>,
        rate: f64,
        /// Before the first drop the rate doubles every 100 ms (slow start).
        slow_start: bool,
        /// Slow start queues its bursts on every path (the probes wait an eighth of the
        /// path's RTT and 3 ms more).
        bursts: bool,
        now: u64,
        last_cut: u64,
    }

    impl Sim {
        fn new(mbit: &[f64], rtt_ms: &[u64]) -> Sim {
            let n = mbit.len();
            let paths = (0..n)
                .map(|i| PathSpec::routed(&format!("l{i}"), IpAddr::from([10, i as u8, 0, 2]), 0))
                .collect();
            Sim {
                m: Multipath::new(MultipathSpec::default(), paths, None),
                cap: mbit.iter().map(|m| m * 1e6 / 8.0).collect(),
                rtt: rtt_ms.iter().map(|r| r * MS).collect(),
                queue: vec![0.0; n],
                tx: vec![0.0; n],
                rx: vec![0.0; n],
                flight: VecDeque::new(),
                rate: 1e6 / 8.0,
                slow_start: true,
                bursts: false,
                now: MS,
                last_cut: 0,
            }
        }

        /// Run for `ms` milliseconds; returns the bytes delivered.
        fn run(&mut self, ms: u64) -> f64 {
            let step = 10 * MS;
            let max_rtt = *self.rtt.iter().max().unwrap_or(&0);
            let mut delivered = 0.0;
            for _ in 0..ms / 10 {
                let mut dropped = false;
                for i in 0..self.cap.len() {
                    let share = f64::from(self.m.stats[i].share.load(Relaxed)) / SLOTS as f64;
                    let sent = self.rate * share * 0.01;
                    self.tx[i] += sent;
                    self.m.stats[i].tx_bytes.store(self.tx[i] as u64, Relaxed);
                    self.queue[i] += sent;
                    let out = self.queue[i].min(self.cap[i] * 0.01);
                    self.queue[i] -= out;
                    self.rx[i] += out;
                    delivered += out;
                    let limit = self.cap[i] * 0.05;
                    if self.queue[i] > limit {
                        self.queue[i] = limit;
                        dropped = true;
                    }
                }
                if dropped && self.now >= self.last_cut + max_rtt {
                    self.rate *= 0.7;
                    self.last_cut = self.now;
                    self.slow_start = false;
                } else if self.slow_start {
                    self.rate *= 1.07;
                } else {
                    self.rate += 0.4e6 / 8.0;
                }
                // Probes reach the peer behind the queue at their sending; echoes come back
                // after the rest of the path's RTT.
                for f in self.flight.iter_mut() {
                    if f.3.is_none() && f.0 <= self.now {
                        f.3 = Some(self.rx[f.1] as u64);
                    }
                }
                while self.flight.front().is_some_and(|f| f.3.is_some()) {
                    let Some((at, i, p, Some(rx))) = self.flight.pop_front() else {
                        break;
                    };
                    let echo = Probe {
                        kind: ProbeKind::Echo,
                        rx_bytes: rx,
                        ..p
                    };
                    self.m.echoed(&echo, at + self.rtt[i] / 2);
                }
                let (_, probes) = self.m.tick(self.now);
                for (i, p) in probes {
                    let mut wait = (self.queue[i] / self.cap[i] * 1e9) as u64;
                    if self.slow_start && self.bursts {
                        // A slow-starting sender's bursts: a short queue on every path.
                        wait += self.rtt[i] / 8 + 3 * MS;
                    }
                    self.flight
                        .push_back((self.now + self.rtt[i] / 2 + wait, i, p, None));
                }
                self.flight.make_contiguous().sort_by_key(|f| f.0);
                self.now += step;
            }
            delivered
        }

        /// Each path's capacity estimate over its rate.
        fn found(&self) -> Vec<f64> {
            (0..self.cap.len())
                .map(|i| self.m.stats[i].capacity.load(Relaxed) as f64 / self.cap[i])
                .collect()
        }

        /// Run until every path's estimate is within 0.8..1.25 of its rate (found); the
        /// milliseconds that took, at most `limit_ms` (then it panics).
        fn run_until_found(&mut self, what: &str, limit_ms: u64) -> u64 {
            let ok = |f: &[f64]| f.iter().all(|r| (0.8..=1.25).contains(r));
            for t in (0..=limit_ms).step_by(100) {
                if ok(&self.found()) {
                    return t;
                }
                self.run(100);
            }
            panic!(
                "{what}: not found within {limit_ms} ms: estimates / rates {:?}",
                self.found()
            );
        }
    }

    /// Three unequal paths (4:1 in rate, 10:1 in RTT) from equal starting shares: every
    /// estimate found, and the sender near the sum after.
    ///
    /// The simulated sender is harsher than the lab's cubic (it cuts at every queue overflow,
    /// at most once per largest RTT, and its queues drain to nothing in between, which leaves
    /// windows with no path saturated): the lab found these links in 1.2-1.4 s (estimates at
    /// 80% of the rate), the simulation in 5.2 s (estimates within 0.8-1.25 of the rate).
    /// The bounds hold what the simulation shows now, with a little room: a change to the
    /// controller that slows it down or loses throughput here fails.
    #[test]
    fn unequal_paths_are_found_and_filled() {
        let mut sim = Sim::new(&[60.0, 30.0, 15.0], &[10, 100, 40]);
        let t = sim.run_until_found("fresh paths", 3500);
        eprintln!("found after {t} ms");
        let bytes = sim.run(4000);
        let mbit = bytes * 8.0 / 4.0 / 1e6;
        eprintln!("{mbit:.1} Mbit/s");
        assert!(
            mbit > 0.92 * 105.0,
            "{mbit:.1} Mbit/s of 105; estimates {:?}",
            sim.found()
        );
        sim.run_until_found("after 4 s full", 1000);
    }

    /// A path back from a cut (its estimate forgotten, see [`Controller::update`]) at the
    /// next transfer, whose slow start queues its bursts on every path: the other paths'
    /// estimates do not fall to what the ramping sender gave them (without the ramp rule they
    /// fell to 0.07 and 0.08 of their rates in the first 400 ms), and every path is found.
    #[test]
    fn a_slow_start_lowers_no_estimate() {
        let mut sim = Sim::new(&[60.0, 30.0, 15.0], &[10, 100, 40]);
        sim.run_until_found("fresh paths", 3500);
        sim.run(2000);
        // The transfer ends; the fastest path was cut and is back; a new transfer starts.
        sim.rate = 0.0;
        sim.slow_start = true;
        sim.run(1000);
        sim.bursts = true;
        sim.m.control.lock().unwrap().samples[0] = Sample::default();
        sim.m.stats[0].capacity.store(0, Relaxed);
        sim.rate = 1e6 / 8.0;
        let before = sim.found();
        sim.run(800);
        let during = sim.found();
        for i in 1..3 {
            assert!(
                during[i] >= before[i] * 0.95,
                "path {i}: {:.2} of its rate before the transfer, {:.2} in its slow start",
                before[i],
                during[i]
            );
        }
        let t = sim.run_until_found("the path back from a cut", 3000);
        eprintln!("back from a cut: found {} ms into the transfer", t + 800);
    }

    /// A ramp compares the same paths: one measured this window and not the last (no newer
    /// echo, too little sent) is no ramp, a transfer starting is, and so is the traffic over
    /// the paths measured in both windows growing by half.
    #[test]
    fn a_ramp_compares_the_paths_measured_in_both_windows() {
        let w = |sent: f64| {
            Some(Window {
                delivered: sent,
                sent,
                saturated: false,
                lossy: false,
            })
        };
        let s = |sent: f64| Sample {
            sent,
            ..Sample::default()
        };
        let steady = [s(40.0), s(20.0), s(0.0)];
        assert!(!Controller::ramp(&steady, &[w(40.0), w(20.0), w(10.0)]));
        assert!(!Controller::ramp(&steady, &[w(40.0), None, w(10.0)]));
        assert!(Controller::ramp(&steady, &[w(70.0), w(30.0), w(10.0)]));
        let idle = [s(0.0), s(0.0), s(0.0)];
        assert!(Controller::ramp(&idle, &[w(5.0), None, None]));
        assert!(!Controller::ramp(&idle, &[None, None, None]));
    }

    /// A path back from a cut is measured only between echoes of probes sent after it came
    /// back: the late echo of a probe sent into the cut (a link that held its packets) spans
    /// the bytes sent into the cut, which look lost. Found in the lab (three links): link 1
    /// back from its cut was measured at 0.15 Mbit/s with nothing sent since it came back.
    #[test]
    fn a_path_back_from_a_cut_is_not_measured_across_the_cut() {
        let p = PathStats::default();
        p.set_state(PathState::Up);
        // Down until 1 s; the last echo before the cut was of a probe sent at 0.4 s.
        let mut s = Sample {
            down_at: 1000 * MS,
            ..Sample::default()
        };
        p.echo(400 * MS, 410 * MS, 1_000_000, 1_000_000);
        s.mark = p.mark();
        // A probe sent at 0.5 s, into the cut, after 2 MB more were sent; echoed late, when
        // the peer had received 10 kB of them.
        p.echo(500 * MS, 1100 * MS, 3_000_000, 1_010_000);
        assert!(Controller::window(&mut s, &p).is_none(), "across the cut");
        // The first probe sent after the path came back starts the first window.
        p.echo(1200 * MS, 1210 * MS, 3_000_000, 1_010_000);
        assert!(
            Controller::window(&mut s, &p).is_none(),
            "from a probe sent into the cut"
        );
        p.echo(1400 * MS, 1410 * MS, 4_000_000, 2_010_000);
        let w = Controller::window(&mut s, &p).expect("a window after the cut");
        assert!(!w.lossy && (w.delivered - 5e6).abs() < 1.0, "{w:?}");
    }

    /// A path whose rate changes (halved, then back) is found again.
    #[test]
    fn a_rate_change_is_found_again() {
        let mut sim = Sim::new(&[40.0, 20.0], &[10, 60]);
        sim.run_until_found("fresh paths", 3000);
        sim.run(2000);
        sim.cap[0] /= 2.0;
        let t = sim.run_until_found("the first path halved", 1500);
        eprintln!("halved: found after {t} ms");
        sim.run(1000);
        sim.cap[0] *= 2.0;
        let t = sim.run_until_found("the first path restored", 1500);
        eprintln!("restored: found after {t} ms");
    }
}

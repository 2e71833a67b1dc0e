//! A fresh path's capacity, measured before traffic needs it: a train of filler packets.
//!
//! The controller learns a path's rate from traffic that fills it ([`Controller`]), so one TCP
//! stream's first slow start over fresh paths ran on shares nobody knew: with three links of
//! 60, 30 and 15 Mbit/s and equal starting shares, the 15 Mbit/s path filled when the stream
//! reached 45, its drops ended slow start there, and cubic, at the slowest path's round trip
//! (100 ms), took the rest of an 8 s transfer to grow back (lab: 61.6 and 77.0 Mbit/s of a
//! 95.6 ceiling, 64-72 Mbit/s for seconds on end).
//!
//! So when a path comes up with no estimate, the prober sends on it, back to back: a probe
//! (P0), half a train of fillers (ESP dummy packets the peer counts as received on the path
//! and discards), a probe (P1), the other half, and the round's own probe (P2). The peer
//! answers each probe with the bytes it had received on the path and when the probe arrived
//! (on its clock; the spacing is all that is read). The train queues at
//! the path's bottleneck, so between P1 and P2 the peer took in the second half at the
//! bottleneck's rate: that is the estimate. A token-bucket shaper lets its burst through at
//! line rate first; P0 to P1 shows whether the burst was over by P1 (the first half then took
//! time too): if it was not (the first half went four times faster than the second, or the
//! second took under a millisecond), the next round sends a train twice as long; if an echo
//! does not come (the train overflowed the bottleneck's queue and the probe behind it was
//! dropped), half as long. A path gets at most [`MAX_TRIES`] trains per time it comes up.
//!
//! Why the peer's arrival times: both peers send their trains when the paths come up, so an
//! echo going back waits behind the peer's own train on the same link. Read from the echoes'
//! arrivals here, the second half seemed to take the reverse train's time too: the lab's
//! 15 Mbit/s link was measured at 4.1-6.0 Mbit/s in 10 of 16 daemon starts. A peer that does
//! not send arrival times (espip before 2026-12-06) is measured by the echoes' arrivals.

/// The first train's filler bytes (both halves).
pub const FIRST_BYTES: usize = 128 * 1024;
/// The shortest train (halved after lost echoes no further).
pub const MIN_BYTES: usize = 32 * 1024;
/// The longest train (a 100 Mbit/s link whose shaper lets 125 KB through at once needs 512 KB).
pub const MAX_BYTES: usize = 1024 * 1024;
/// Trains a path gets each time it comes up.
pub const MAX_TRIES: u32 = 5;
/// A filler's payload (inside ESP): under any tunnel MTU espip allows, a full packet's
/// worth, so the train is as many packets as a stream's would be.
pub const FILL_LEN: usize = 1200;

/// One path's train state.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Train {
    /// Filler bytes of the next train (0: [`FIRST_BYTES`]).
    bytes: usize,
    /// Trains sent since the path came up.
    tries: u32,
    /// The train in flight: when it was sent, and the identifiers of P0, P1 and P2.
    sent_at: u64,
    ids: [u64; 3],
    /// The echoes of P0, P1, P2: (arrival here, bytes the peer had received on the path,
    /// the probe's arrival at the peer on its clock or 0).
    echoes: [Option<(u64, u64, u64)>; 3],
    /// Measured (or given up): no more trains until the path goes down.
    done: bool,
}

/// What a completed train says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// The path delivers this many (inner) bytes per second.
    Rate(f64),
    /// The burst was not over by P1: send a longer train.
    Longer,
}

impl Train {
    /// Forget everything (the path went down: what comes back may be another line).
    pub fn reset(&mut self) {
        *self = Train::default();
    }

    /// Whether a train should go now (`now`, with `late_ns` the time after which an echo that
    /// has not come will not): none done, none in flight, tries left. A train whose echoes
    /// did not all come in time counts as overflowed: the next one is half as long.
    pub fn wanted(&mut self, now: u64, late_ns: u64) -> bool {
        if self.done {
            return false;
        }
        if self.sent_at != 0 {
            if now.saturating_sub(self.sent_at) < late_ns {
                return false;
            }
            self.sent_at = 0;
            self.bytes = (self.bytes() / 2).max(MIN_BYTES);
        }
        if self.tries >= MAX_TRIES {
            self.done = true;
            return false;
        }
        true
    }

    /// Filler bytes of the next train.
    pub fn bytes(&self) -> usize {
        if self.bytes == 0 {
            FIRST_BYTES
        } else {
            self.bytes
        }
    }

    /// A train with probes `ids` (P0, P1, P2) went at `now`.
    pub fn sent(&mut self, ids: [u64; 3], now: u64) {
        self.sent_at = now.max(1);
        self.ids = ids;
        self.echoes = [None; 3];
        self.tries += 1;
    }

    /// The echo of probe `id` came at `now`, the peer having received `rx` bytes on the path
    /// and the probe at `arrived` on its clock (0: not given): the verdict once all three are
    /// in.
    pub fn echo(&mut self, id: u64, now: u64, rx: u64, arrived: u64) -> Option<Verdict> {
        if self.sent_at == 0 || self.done {
            return None;
        }
        let k = self.ids.iter().position(|&i| i == id)?;
        self.echoes[k] = Some((now, rx, arrived));
        let [Some(e0), Some(e1), Some(e2)] = self.echoes else {
            return None;
        };
        self.sent_at = 0;
        // The peer's arrival times when it gave all three (in order), else the echoes'.
        let theirs = e0.2 != 0 && e0.2 <= e1.2 && e1.2 <= e2.2;
        let at = |e: (u64, u64, u64)| if theirs { e.2 } else { e.0 };
        let span = |a: (u64, u64, u64), b: (u64, u64, u64)| {
            (
                at(b).saturating_sub(at(a)) as f64 / 1e9,
                b.1.saturating_sub(a.1) as f64,
            )
        };
        let (t1, b1) = span(e0, e1);
        let (t2, b2) = span(e1, e2);
        let fast = t2 < 1e-3 || b2 <= 0.0 || b1 > 4.0 * t1 * (b2 / t2);
        if fast {
            if self.bytes() >= MAX_BYTES {
                self.done = true;
                return None;
            }
            self.bytes = self.bytes() * 2;
            return Some(Verdict::Longer);
        }
        self.done = true;
        Some(Verdict::Rate(b2 / t2))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A shaper of `rate` bytes/s with a burst of `burst` bytes: when the peer has received
    /// `at` bytes of a train sent at once (time 0).
    fn arrival(at: f64, rate: f64, burst: f64) -> u64 {
        (((at - burst).max(0.0) / rate) * 1e9) as u64
    }

    fn run(t: &mut Train, rate: f64, burst: f64) -> Option<Verdict> {
        let half = t.bytes() as f64 / 2.0;
        t.sent([1, 2, 3], 1);
        let mut v = None;
        for (id, at) in [(1, 0.0), (2, half), (3, 2.0 * half)] {
            v = t.echo(id, 10 * MS + arrival(at, rate, burst), 1000 + at as u64, 0);
        }
        v
    }

    #[test]
    fn a_train_past_the_burst_measures_the_rate() {
        // 15 Mbit/s, a 18.75 KB burst (the lab's tbf): the first train is long enough.
        let mut t = Train::default();
        assert!(t.wanted(0, 300 * MS));
        match run(&mut t, 15e6 / 8.0, 18_750.0) {
            Some(Verdict::Rate(r)) => assert!((r * 8.0 / 15e6 - 1.0).abs() < 0.01, "{r}"),
            v => panic!("{v:?}"),
        }
        assert!(!t.wanted(1000 * MS, 300 * MS), "measured: no more trains");
    }

    #[test]
    fn the_peers_arrival_times_measure_past_a_queue_on_the_way_back() {
        // 15 Mbit/s; the peer's own train (35 KB at 15 Mbit/s) delays P1's echo and more
        // P2's on the way back, as both daemons send theirs when the paths come up.
        let (rate, burst) = (15e6 / 8.0, 18_750.0);
        let half = FIRST_BYTES as f64 / 2.0;
        let back = |k: u64| k * 19 * MS;
        let measure = |given: bool| {
            let mut t = Train::default();
            t.sent([1, 2, 3], 1);
            let mut v = None;
            for (k, at) in [(0u64, 0.0), (1, half), (2, 2.0 * half)] {
                let there = 5 * MS + arrival(at, rate, burst);
                let theirs = if given { 1_000 * MS + there } else { 0 };
                v = t.echo(k + 1, there + 5 * MS + back(k), 1000 + at as u64, theirs);
            }
            match v {
                Some(Verdict::Rate(r)) => r * 8.0 / 1e6,
                v => panic!("{v:?}"),
            }
        };
        let (given, not) = (measure(true), measure(false));
        assert!((given / 15.0 - 1.0).abs() < 0.01, "{given}");
        assert!(
            not < 10.0,
            "the echoes' spacing includes the way back: {not}"
        );
    }

    #[test]
    fn a_train_inside_the_burst_is_sent_again_longer() {
        // 100 Mbit/s with a 125 KB burst: 128 KB and 256 KB pass too early; 512 KB measures.
        let mut t = Train::default();
        let (rate, burst) = (100e6 / 8.0, 125_000.0);
        assert_eq!(run(&mut t, rate, burst), Some(Verdict::Longer));
        assert!(t.wanted(500 * MS, 300 * MS));
        assert_eq!(run(&mut t, rate, burst), Some(Verdict::Longer));
        match run(&mut t, rate, burst) {
            Some(Verdict::Rate(r)) => assert!((r / rate - 1.0).abs() < 0.01, "{r}"),
            v => panic!("{v:?}"),
        }
        assert_eq!(t.bytes(), 512 * 1024);
    }

    #[test]
    fn a_lost_echo_halves_the_train_and_tries_end() {
        let mut t = Train::default();
        assert!(t.wanted(0, 300 * MS));
        t.sent([1, 2, 3], 1);
        assert_eq!(t.echo(1, 10 * MS, 0, 0), None);
        assert_eq!(t.echo(3, 20 * MS, 0, 0), None, "P1's echo is missing");
        assert!(!t.wanted(100 * MS, 300 * MS), "still in flight");
        assert!(t.wanted(400 * MS, 300 * MS), "late: another, shorter");
        assert_eq!(t.bytes(), FIRST_BYTES / 2);
        for k in 1..MAX_TRIES {
            t.sent([1, 2, 3], 1000 * MS * u64::from(k));
            assert!(t.wanted(1000 * MS * u64::from(k) + 400 * MS, 300 * MS) == (k + 1 < MAX_TRIES));
        }
        assert!(!t.wanted(u64::MAX / 2, 300 * MS));
        assert_eq!(t.bytes(), MIN_BYTES);
        t.reset();
        assert!(t.wanted(0, 300 * MS), "a path back up measures again");
    }

    #[test]
    fn a_stranger_echo_or_a_done_train_says_nothing() {
        let mut t = Train::default();
        assert_eq!(t.echo(1, 1, 1, 0), None, "none sent");
        t.sent([1, 2, 3], 1);
        assert_eq!(t.echo(9, 1, 1, 0), None);
    }
}

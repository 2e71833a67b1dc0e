//! `espip lab-tool relay`: an emulated link for the multipath lab. This kernel has no netem,
//! so a middle namespace runs this relay: it copies every Ethernet frame between two
//! interfaces (AF_PACKET, so the two ends share one layer-2 segment through it), holds each
//! for a fixed one-way delay and drops a configurable share at random. Rate limits are the
//! kernel's `tbf` on the interfaces it writes to (a frame the full qdisc refuses is lost, as
//! on a congested link).
//!
//! One thread per direction: wait for a frame or the head of the queue's due time, read every
//! frame waiting (stamped with its due time), send every frame that is due. A `cut` file
//! (`--cut FILE`: while it exists, nothing passes either way) lets the lab cut the link and
//! restore it.

use espip_sys::link::LinkSocket;
use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Frames held per direction at most (about 2.6 s at 10 ms and 1 Gbit/s of 1500-byte frames
/// would need far fewer; above this the relay drops, like a full router queue).
const MAX_HELD: usize = 100_000;

/// Options of one relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// The two interfaces (in this namespace).
    pub ifaces: [String; 2],
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Extra delay of each frame, uniform in zero to this; a frame never leaves before the one
    /// ahead of it (a link's queue varies, its order does not).
    pub jitter: Duration,
    /// Share of frames dropped at random, 0..1.
    pub loss: f64,
    /// While this file exists, the link is cut.
    pub cut: Option<PathBuf>,
}

/// xorshift64*: the loss decisions (no cryptographic need).
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What one direction did.
#[derive(Debug, Default, Clone, Copy)]
pub struct RelayCounts {
    /// Frames read.
    pub frames: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Dropped while the link was cut.
    pub cut: u64,
    /// Refused by the outgoing interface (its qdisc full).
    pub refused: u64,
}

/// Relay one direction, from `rx` to `tx`, until `stop` is set.
fn direction(
    rx: &LinkSocket,
    tx: &LinkSocket,
    opts: &RelayOptions,
    seed: u64,
    stop: &std::sync::atomic::AtomicBool,
) -> RelayCounts {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut held: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut rng = Rng(seed | 1);
    let mut c = RelayCounts::default();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let timeout = match held.front() {
            Some((due, _)) => {
                let left = due.saturating_duration_since(Instant::now());
                // Millisecond polls; the last part is spun off below with a short sleep.
                PollTimeout::from(left.as_millis().min(100) as u16)
            }
            None => PollTimeout::from(100u16),
        };
        let mut fds = [PollFd::new(rx.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, timeout);
        let cut = opts.cut.as_ref().is_some_and(|p| p.exists());
        while let Some(n) = rx.recv(&mut buf) {
            c.frames += 1;
            if cut {
                c.cut += 1;
                continue;
            }
            if opts.loss > 0.0 && rng.next_f64() < opts.loss {
                c.lost += 1;
                continue;
            }
            if held.len() >= MAX_HELD {
                c.refused += 1;
                continue;
            }
            let mut v = spare.pop().unwrap_or_default();
            v.clear();
            v.extend_from_slice(&buf[..n]);
            let mut due = Instant::now() + opts.delay;
            if !opts.jitter.is_zero() {
                due += opts.jitter.mul_f64(rng.next_f64());
                if let Some((last, _)) = held.back() {
                    due = due.max(*last);
                }
            }
            held.push_back((due, v));
        }
        // Sub-millisecond remainders: wait them out rather than send early.
        if let Some((due, _)) = held.front() {
            let left = due.saturating_duration_since(Instant::now());
            if left > Duration::ZERO && left < Duration::from_millis(1) {
                std::thread::sleep(left);
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = held.pop_front().expect("front");
            if !tx.send(&frame) {
                c.refused += 1;
            }
            if spare.len() < 1024 {
                spare.push(frame);
            }
        }
    }
    c
}

/// Run the relay until SIGTERM or SIGINT; returns each direction's counts.
pub fn run(opts: &RelayOptions) -> io::Result<[RelayCounts; 2]> {
    let a = LinkSocket::open(&opts.ifaces[0])?;
    let b = LinkSocket::open(&opts.ifaces[1])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    espip_sys::proc::set_flag_on_signals(stop.clone())?;
    let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let counts = std::thread::scope(|s| {
        let ab = s.spawn(|| direction(&a, &b, opts, seed, &stop));
        let ba = s.spawn(|| direction(&b, &a, opts, seed.rotate_left(17), &stop));
        [ab.join().unwrap_or_default(), ba.join().unwrap_or_default()]
    });
    Ok(counts)
}

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

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
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
    /// Share of frames dropped at random, 0..1.
    pub loss: f64,
    /// While this file exists, the link is cut.
    pub cut: Option<PathBuf>,
}

/// A packet socket bound to one interface, all protocols, not seeing its own sends.
fn packet_socket(iface: &str) -> io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let index = nix::net::if_::if_nametoindex(iface)
        .map_err(|e| io::Error::other(format!("interface {iface}: {e}")))?;
    // SAFETY: sockaddr_ll is plain old data; zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given length.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    use crate::sys::set_int;
    set_int(&fd, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, 1)?;
    // A large receive buffer: the relay holds frames, the kernel should not drop them first
    // (best effort: FORCE needs CAP_NET_ADMIN).
    let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
    // And a large send buffer: frames written wait in the link's `tbf` (50 ms of queue), and
    // each counts against this buffer until it leaves. The default (208 KB, about 90 frames)
    // was the smaller limit: 10 ms at 100 Mbit/s, so link 1 refused frames at a fifth of the
    // queue the lab configures.
    let _ = set_int(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 32 << 20);
    // Each frame comes and goes with its virtio-net header: a frame whose checksum the
    // sender left to offload (CHECKSUM_PARTIAL, as the veth's TCP and UDP are) keeps that
    // state on the way out instead of arriving with a wrong checksum.
    set_int(&fd, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
    // Frames for other hosts' MAC addresses must reach the socket.
    // SAFETY: packet_mreq is plain old data.
    let mut mr: libc::packet_mreq = unsafe { std::mem::zeroed() };
    mr.mr_ifindex = index as i32;
    mr.mr_type = libc::PACKET_MR_PROMISC as u16;
    // SAFETY: setsockopt with a packet_mreq of the right size.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mr as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as u32,
        );
    }
    Ok(fd)
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
    rx: &OwnedFd,
    tx: &OwnedFd,
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
        loop {
            // SAFETY: recv into our buffer, non-blocking.
            let n = unsafe {
                libc::recv(
                    rx.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n <= 0 {
                break;
            }
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
            v.extend_from_slice(&buf[..n as usize]);
            held.push_back((Instant::now() + opts.delay, v));
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
            // SAFETY: send a frame we own on a bound packet socket.
            let rc = unsafe {
                libc::send(
                    tx.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
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
    let a = packet_socket(&opts.ifaces[0])?;
    let b = packet_socket(&opts.ifaces[1])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook_like::SIGTERM, signal_hook_like::SIGINT] {
        signal_hook_like::flag(sig, stop.clone())?;
    }
    let seed = std::process::id() as u64 ^ 0x9e37_79b9_7f4a_7c15;
    let counts = std::thread::scope(|s| {
        let ab = s.spawn(|| direction(&a, &b, opts, seed, &stop));
        let ba = s.spawn(|| direction(&b, &a, opts, seed.rotate_left(17), &stop));
        [ab.join().unwrap_or_default(), ba.join().unwrap_or_default()]
    });
    Ok(counts)
}

/// Setting a flag on a signal, with nix only.
mod signal_hook_like {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, OnceLock};

    pub use nix::sys::signal::Signal::{SIGINT, SIGTERM};

    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

    extern "C" fn on_signal(_: libc::c_int) {
        if let Some(f) = FLAG.get() {
            f.store(true, Ordering::Relaxed);
        }
    }

    /// Set `flag` when `sig` arrives (one flag for the process).
    pub fn flag(sig: nix::sys::signal::Signal, flag: Arc<AtomicBool>) -> std::io::Result<()> {
        let _ = FLAG.set(flag);
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_signal),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .map(|_| ())
            .map_err(std::io::Error::from)
    }
}

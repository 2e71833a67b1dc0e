//! espip's packet core: buffers in, verdicts out, time passed in, no I/O.
//!
//! The daemon (the `espip` crate) owns the kernel edges: the TUN, raw and UDP sockets,
//! netlink, files, clocks. Everything here is a pure function of its inputs, so it runs the
//! same in the daemon, in the in-memory tests (two data paths talking to each other) and under
//! the fuzzer. The boundary is kept by the compiler and clippy, not by convention: this crate
//! depends on nothing that does I/O, forbids `unsafe`, and its `clippy.toml` refuses std's
//! files, sockets, processes, threads and clocks.
//!
//! Modules, from the bottom up: [`buf`] (packet buffers with headroom), [`wire`] (typed views
//! of ESP, IP, ICMP), [`replay`] (RFC 4303/6479 anti-replay window), [`sa`] (security
//! associations: AEAD, sequence numbers, lifetimes), [`prefix`] (longest-prefix tables),
//! [`nat`] (the same-LAN address rewriting), [`gso`] / [`gro`] (TUN offload segmentation and
//! coalescing), [`datapath`] (the outbound and inbound flows and their verdicts).

#![forbid(unsafe_code)]

pub mod buf;
pub mod datapath;
pub mod endpoint;
pub mod gro;
pub mod gso;
pub mod ike;
pub mod multipath;
pub mod nat;
pub mod prefix;
pub mod replay;
pub mod sa;
pub mod wire;

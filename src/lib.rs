//! espip: IP packets from a TUN device, carried in RFC 4303 ESP tunnel mode (AES-GCM per
//! RFC 4106, ChaCha20-Poly1305 per RFC 7634) or RFC 2003 IP-in-IP over raw IP sockets.
//!
//! Two crates:
//! - `espip-core` (`crates/espip-core`): the pure packet core ([`buf`], [`wire`], [`sa`],
//!   [`replay`], [`prefix`], [`nat`], [`gso`], [`gro`], [`datapath`]), re-exported here under
//!   the same paths; buffers in, verdicts out, time passed in, no I/O, kept so by its
//!   dependencies, `#![forbid(unsafe_code)]` and its clippy.toml;
//! - this crate: the edges ([`sys`], [`daemon`], [`control`], [`config`], [`lab`]): the kernel,
//!   files, processes and the command line.

#![forbid(unsafe_code)]

pub use espip_api::status;
pub use espip_core::{
    buf, datapath, endpoint, gro, gso, ike, multipath, nat, prefix, replay, sa, wire,
};
pub use espip_sys as sys;

pub mod config;
pub mod control;
pub mod daemon;
pub mod rules;
pub mod telemetry;
pub mod wireshark;

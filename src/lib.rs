//! espip: IP packets from a TUN device, carried in RFC 4303 ESP tunnel mode (AES-GCM per
//! RFC 4106, ChaCha20-Poly1305 per RFC 7634) or RFC 2003 IP-in-IP over raw IP sockets.
//!
//! The crate is split in two:
//! - the pure core ([`buf`], [`wire`], [`sa`], [`replay`], [`prefix`], [`datapath`]): buffers in,
//!   verdicts out, time passed in, no I/O (checked by `tests/layering.rs`);
//! - the edges ([`sys`], [`daemon`], [`lab`], [`config`]): the kernel, files and processes.

pub mod buf;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod gro;
pub mod gso;
pub mod lab;
pub mod nat;
pub mod prefix;
pub mod replay;
pub mod rules;
pub mod sa;
pub mod status;
pub mod sys;
pub mod telemetry;
pub mod wire;
pub mod wireshark;

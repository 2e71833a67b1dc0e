//! Typed zero-copy views over packet bytes (smoltcp's `wire` style): byte ranges in `field`
//! modules, `new_checked` for untrusted input after which no accessor panics, setters only on
//! mutable buffers.

pub mod checksum;
pub mod esp;
pub mod icmp;
pub mod ip;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;

/// A byte range inside a header.
pub type Field = std::ops::Range<usize>;

/// The one error of the wire layer: the bytes are too short or inconsistent for the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed packet")
    }
}

impl std::error::Error for Malformed {}

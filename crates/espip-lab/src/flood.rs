//! `espip lab-tool flood`: garbage ESP and IP-in-IP at a daemon, as fast as one core sends,
//! for the flood test (docs/security.md). Four kinds in turn:
//! 1. ESP with the daemon's real SPI, a sequence number far ahead, 1000 random bytes: passes
//!    the replay check and costs a full AEAD verification (`bad_icv`);
//! 2. ESP with a random SPI (`unknown_spi`);
//! 3. IP-in-IP with a random inner packet from a host that is no ipip peer (`unknown_peer`);
//! 4. three bytes of ESP (`malformed`).

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// xorshift64*: cheap noise, not cryptography.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// Send garbage to `dst` for `seconds`, at most `pps` packets a second in all (0: as fast as
/// one core sends); returns the packets sent of each kind.
pub fn flood(dst: Ipv4Addr, spi: u32, seconds: u64, pps: u64) -> io::Result<[u64; 4]> {
    let open = |p: i32| Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(p)));
    let esp = open(50)?;
    let ipip = open(4)?;
    let to = SockAddr::from(SocketAddr::new(IpAddr::V4(dst), 0));
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id()));
    let mut buf = [0u8; 1024];
    let mut sent = [0u64; 4];
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut i: u64 = 0;
    while i % 256 != 0 || Instant::now() < end {
        if pps > 0 && i % 256 == 0 {
            // Paced in batches of 256: never ahead of i packets at `pps`.
            let due = start + Duration::from_secs_f64(i as f64 / pps as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let kind = (i % 4) as usize;
        i += 1;
        let (sock, len) = match kind {
            0 => {
                noise.fill(&mut buf[..1000]);
                buf[..4].copy_from_slice(&spi.to_be_bytes());
                // Far ahead of any window, never the same twice in a run.
                let seq = 0x4000_0000u32.wrapping_add(i as u32);
                buf[4..8].copy_from_slice(&seq.to_be_bytes());
                (&esp, 1000)
            }
            1 => {
                noise.fill(&mut buf[..100]);
                (&esp, 100)
            }
            2 => {
                noise.fill(&mut buf[..60]);
                buf[0] = 0x45;
                (&ipip, 60)
            }
            _ => {
                noise.fill(&mut buf[..3]);
                (&esp, 3)
            }
        };
        // A full socket buffer (ENOBUFS) is part of flooding: count only what left.
        if sock.send_to(&buf[..len], &to).is_ok() {
            sent[kind] += 1;
        }
    }
    Ok(sent)
}

//! The lab's TCP transfer: a source that sends a reproducible byte stream with a plaintext
//! canary in every block, and a sink that hashes what it receives (SHA-256, ring).

use ring::digest::{Context, SHA256};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Text written at the start of every 64 KiB block, so a capture can be searched for plaintext.
pub const CANARY: &[u8] = b"ESPIP-PLAINTEXT-CANARY-0123456789";

const BLOCK: usize = 64 * 1024;

/// Bytes and SHA-256 of one side of a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digest {
    /// Bytes sent or received.
    pub bytes: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bytes={} sha256={}", self.bytes, self.sha256)
    }
}

/// A line that is not a transfer digest (`bytes=N sha256=HEX`): what the tool printed
/// instead, or why it printed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a transfer digest: {0:?}")]
pub struct NotADigest(pub String);

impl std::str::FromStr for Digest {
    type Err = NotADigest;
    fn from_str(s: &str) -> Result<Self, NotADigest> {
        let mut bytes = None;
        let mut sha = None;
        for part in s.split_whitespace() {
            if let Some(v) = part.strip_prefix("bytes=") {
                bytes = v.parse().ok();
            } else if let Some(v) = part.strip_prefix("sha256=") {
                sha = Some(v.to_string());
            }
        }
        match (bytes, sha) {
            (Some(bytes), Some(sha256)) => Ok(Digest { bytes, sha256 }),
            _ => Err(NotADigest(s.to_string())),
        }
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fill `block` with the stream's bytes for block number `n` (xorshift, seeded by `n`).
fn fill(block: &mut [u8], n: u64) {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    block[..CANARY.len()].copy_from_slice(CANARY);
}

/// Connect to `to` (retrying for up to 10 s while the listener starts) and send `bytes` bytes.
pub fn source(to: SocketAddr, bytes: u64) -> io::Result<Digest> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(e),
        }
    };
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut ctx = Context::new(&SHA256);
    let mut block = vec![0u8; BLOCK];
    let mut sent = 0u64;
    let mut n = 0u64;
    while sent < bytes {
        fill(&mut block, n);
        let take = (bytes - sent).min(BLOCK as u64) as usize;
        s.write_all(&block[..take])?;
        ctx.update(&block[..take]);
        sent += take as u64;
        n += 1;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // Wait for the sink to close so that every byte was taken.
    let mut rest = [0u8; 16];
    let _ = s.read(&mut rest);
    Ok(Digest {
        bytes: sent,
        sha256: hex(ctx.finish().as_ref()),
    })
}

/// Accept one connection on `on` and hash everything until EOF.
pub fn sink(on: SocketAddr) -> io::Result<Digest> {
    let l = TcpListener::bind(on)?;
    let (mut s, _) = l.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; BLOCK];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        got += n as u64;
    }
    Ok(Digest {
        bytes: got,
        sha256: hex(ctx.finish().as_ref()),
    })
}

/// Serve a one-line HTTP page on `on` until killed; every request is logged to stdout with the
/// client address the server saw.
pub fn http_serve(on: SocketAddr, name: &str) -> io::Result<()> {
    let l = TcpListener::bind(on)?;
    let name = name.to_string();
    for conn in l.incoming() {
        let Ok(mut s) = conn else { continue };
        let name = name.clone();
        // One thread per connection: a client stalled by a firewall must not hold up the next.
        std::thread::spawn(move || {
            let peer = s
                .peer_addr()
                .map(|a| a.ip().to_string())
                .unwrap_or_default();
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut req = [0u8; 2048];
            let n = s.read(&mut req).unwrap_or(0);
            let line = String::from_utf8_lossy(&req[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_string();
            let body = format!("espip lab: host {name}; you are {peer}\n");
            let _ = write!(
                s,
                "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            println!("{peer} \"{line}\"");
            let _ = io::stdout().flush();
        });
    }
    Ok(())
}

//! Capture taps: the inner packets (as read from / written to the TUN) and the outer packets
//! (as sent / received on the raw sockets), written to classic pcap files
//! (`LINKTYPE_RAW`, so both IPv4 and IPv6 inner packets open in Wireshark).
//!
//! 1. A data-path thread appends pcap records to its own chunk buffer (no lock, no syscall).
//! 2. At the end of each batch the chunk goes to the writer thread through a bounded channel
//!    with `try_send`: when the writer is behind (slow or full disk) the chunk is dropped and
//!    its records are counted in `dropped`; the data path never waits for a disk.
//! 3. The writer thread appends chunks to `<if>-inner.pcap` / `<if>-outer.pcap`, rotating a
//!    file when it would pass `max_file_bytes` (`x.pcap` -> `x.pcap.1` -> ... ; at most
//!    `files` per tap), and hands the emptied buffer back to a small pool.
//!
//! Outbound ESP/IP-in-IP leaves through a raw socket without an IP header (the kernel writes
//! it), so the outer tap writes the header the kernel will write: IPv4, DF clear, TTL 64,
//! the configured or routed source address.

use std::fs::File;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// The `[capture]` section of the configuration, validated: pcap taps on the TUN side and the wire side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where `<interface>-inner.pcap` and `<interface>-outer.pcap` are written.
    pub dir: PathBuf,
    /// Tap the inner packets (as read from / written to the TUN).
    pub inner: bool,
    /// Tap the outer packets (as sent / received on the raw sockets).
    pub outer: bool,
    /// A file is rotated when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Files kept per tap, the current one included (`x.pcap`, `x.pcap.1`, ...).
    pub files: u32,
    /// Bytes kept of each packet.
    pub snaplen: u32,
}

/// pcap's global header magic (microsecond timestamps), written in native byte order.
const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
/// LINKTYPE_RAW: each record is an IPv4 or IPv6 packet.
const LINKTYPE_RAW: u32 = 101;
/// Size of the pcap global header.
const FILE_HEADER: u64 = 24;
/// Size of a pcap record header.
const RECORD_HEADER: usize = 16;
/// A chunk is handed to the writer once it holds this many bytes (tuning: a 64-packet batch of
/// 1500-byte packets is about 100 KB, so full batches go in one chunk).
const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks in flight between the data path and the writer. Tuning: 16 x 256 KB bounds the
/// memory a stalled disk can pin to 4 MB; the writer catches up within that at disk speed.
const CHUNKS_IN_FLIGHT: usize = 16;
/// A write error is logged at most this often.
const WARN_INTERVAL: Duration = Duration::from_secs(60);

/// Which tap a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// TUN side.
    Inner,
    /// Wire side.
    Outer,
}

/// Counters of the capture, read by `espip show` and the metrics.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Records written to a file.
    pub written: AtomicU64,
    /// Records dropped because the writer was behind (the data path did not wait).
    pub dropped: AtomicU64,
    /// Records lost to a failed write (full disk, removed directory).
    pub write_errors: AtomicU64,
    /// Files rotated.
    pub rotations: AtomicU64,
}

struct Chunk {
    tap: Tap,
    bytes: Vec<u8>,
    records: u64,
}

struct Shared {
    stats: Arc<CaptureStats>,
    pool: Mutex<Vec<Vec<u8>>>,
    snaplen: usize,
    inner: bool,
    outer: bool,
}

/// The writer thread and the counters; dropping every [`Recorder`] ends the thread, and
/// [`Taps::finish`] waits for the files to be complete.
pub struct Taps {
    tx: Option<SyncSender<Chunk>>,
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    paths: Vec<PathBuf>,
}

impl Taps {
    /// Create the directory (0700 if new) and start the writer. Files are opened (0600: they
    /// hold plaintext) when the first record arrives.
    pub fn start(cfg: &CaptureConfig, ifname: &str) -> io::Result<Taps> {
        if !cfg.dir.exists() {
            std::fs::create_dir_all(&cfg.dir)?;
            std::fs::set_permissions(&cfg.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let inner = cfg.dir.join(format!("{ifname}-inner.pcap"));
        let outer = cfg.dir.join(format!("{ifname}-outer.pcap"));
        // Fail now, not at the first packet, if the directory is not writable.
        let probe = cfg.dir.join(format!(".{ifname}-capture-probe"));
        File::create(&probe)?;
        let _ = std::fs::remove_file(&probe);
        let stats = Arc::new(CaptureStats::default());
        let shared = Arc::new(Shared {
            stats: stats.clone(),
            pool: Mutex::new(Vec::new()),
            snaplen: cfg.snaplen as usize,
            inner: cfg.inner,
            outer: cfg.outer,
        });
        let (tx, rx) = sync_channel(CHUNKS_IN_FLIGHT);
        let mut files = [
            TapFile::new(inner.clone(), cfg),
            TapFile::new(outer.clone(), cfg),
        ];
        let sh = shared.clone();
        let writer = std::thread::Builder::new()
            .name("espip-capture".into())
            .spawn(move || writer_loop(rx, &mut files, &sh))?;
        let mut paths = Vec::new();
        if cfg.inner {
            paths.push(inner);
        }
        if cfg.outer {
            paths.push(outer);
        }
        Ok(Taps {
            tx: Some(tx),
            shared,
            writer: Some(writer),
            paths,
        })
    }

    /// A recorder for one data-path thread.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            sink: self.tx.clone().map(|tx| (tx, self.shared.clone())),
            inner: Pending::default(),
            outer: Pending::default(),
            ts: [0; 8],
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<CaptureStats> {
        self.shared.stats.clone()
    }

    /// The files written (current ones; rotated ones carry `.1`, `.2`, ...).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// Wait until every chunk sent so far is on disk. Call after the data-path threads (and
    /// with them their recorders) have ended.
    pub fn finish(mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let s = &self.shared.stats;
        info!(
            written = s.written.load(Relaxed),
            dropped = s.dropped.load(Relaxed),
            write_errors = s.write_errors.load(Relaxed),
            files = %self.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "),
            "capture closed"
        );
    }
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    records: u64,
}

/// A data-path thread's side of the capture. A recorder of a capture that is off (or a tap
/// that is off) does nothing but a branch per call.
pub struct Recorder {
    sink: Option<(SyncSender<Chunk>, Arc<Shared>)>,
    inner: Pending,
    outer: Pending,
    ts: [u8; 8],
}

impl Recorder {
    /// A recorder that records nothing.
    pub fn off() -> Recorder {
        Recorder {
            sink: None,
            inner: Pending::default(),
            outer: Pending::default(),
            ts: [0; 8],
        }
    }

    /// Is this tap on?
    #[inline]
    pub fn wants(&self, tap: Tap) -> bool {
        match &self.sink {
            None => false,
            Some((_, s)) => match tap {
                Tap::Inner => s.inner,
                Tap::Outer => s.outer,
            },
        }
    }

    /// Take the time stamp for the records of the coming batch (one clock read per batch).
    pub fn begin_batch(&mut self) {
        if self.sink.is_none() {
            return;
        }
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.ts[..4].copy_from_slice(&(t.as_secs() as u32).to_ne_bytes());
        self.ts[4..].copy_from_slice(&t.subsec_micros().to_ne_bytes());
    }

    /// Record a whole IP packet on `tap`.
    #[inline]
    pub fn record(&mut self, tap: Tap, packet: &[u8]) {
        if self.wants(tap) {
            self.append(tap, &[], packet);
        }
    }

    /// Record an outer packet whose IP header the tap does not see (the kernel writes it on
    /// send, and strips an IPv6 one on receive), with that header reconstructed: IPv4, or
    /// IPv6 with `protocol` as its next header.
    pub fn record_outer(&mut self, src: IpAddr, dst: IpAddr, protocol: u8, payload: &[u8]) {
        if !self.wants(Tap::Outer) {
            return;
        }
        let mut h = [0u8; 48];
        let n = ip_header(&mut h, src, dst, protocol, payload.len());
        self.append(Tap::Outer, &h[..n], payload);
    }

    /// Record an ESP-in-UDP datagram (sent, or received: the UDP socket gives only the
    /// payload) with the IP and UDP headers it has on the wire reconstructed.
    pub fn record_udp(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
        if !self.wants(Tap::Outer) {
            return;
        }
        let mut h = [0u8; 48];
        let udp_len = payload.len() + espip_core::wire::udp::HEADER_LEN;
        let n = ip_header(
            &mut h,
            src.ip(),
            dst.ip(),
            espip_core::wire::ip::PROTO_UDP,
            udp_len,
        );
        espip_core::wire::ip::emit_udp_header(&mut h[n..], src.port(), dst.port(), payload.len());
        if let (IpAddr::V6(s6), IpAddr::V6(d6)) = (src.ip(), dst.ip()) {
            // IPv6 has no "no checksum" (RFC 8200 section 8.1): the rebuilt header gets the
            // one the kernel sent.
            use espip_core::wire::ip::{fold, pseudo_sum_v6, sum_words, PROTO_UDP};
            let udp = &h[n..n + espip_core::wire::udp::HEADER_LEN];
            let sum = sum_words(pseudo_sum_v6(s6, d6, PROTO_UDP, udp_len as u32), udp);
            let c = match fold(sum_words(sum, payload)) {
                0 => 0xffff,
                c => c,
            };
            h[n + 6..n + 8].copy_from_slice(&c.to_be_bytes());
        }
        self.append(
            Tap::Outer,
            &h[..n + espip_core::wire::udp::HEADER_LEN],
            payload,
        );
    }

    fn append(&mut self, tap: Tap, head: &[u8], body: &[u8]) {
        let Some((_, shared)) = &self.sink else {
            return;
        };
        let orig = head.len() + body.len();
        let keep = orig.min(shared.snaplen);
        let p = match tap {
            Tap::Inner => &mut self.inner,
            Tap::Outer => &mut self.outer,
        };
        if p.bytes.capacity() == 0 {
            // try_lock: the data path never waits for the writer thread.
            p.bytes = shared
                .pool
                .try_lock()
                .ok()
                .and_then(|mut pool| pool.pop())
                .unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES + 65536 + RECORD_HEADER));
        }
        p.bytes.extend_from_slice(&self.ts);
        p.bytes.extend_from_slice(&(keep as u32).to_ne_bytes());
        p.bytes.extend_from_slice(&(orig as u32).to_ne_bytes());
        let head_keep = head.len().min(keep);
        p.bytes.extend_from_slice(&head[..head_keep]);
        p.bytes.extend_from_slice(&body[..keep - head_keep]);
        p.records += 1;
        if p.bytes.len() >= CHUNK_BYTES {
            self.flush_tap(tap);
        }
    }

    /// Hand what the batch recorded to the writer (end of a batch).
    pub fn flush(&mut self) {
        if self.inner.records > 0 {
            self.flush_tap(Tap::Inner);
        }
        if self.outer.records > 0 {
            self.flush_tap(Tap::Outer);
        }
    }

    fn flush_tap(&mut self, tap: Tap) {
        let Some((tx, shared)) = &self.sink else {
            return;
        };
        let p = match tap {
            Tap::Inner => &mut self.inner,
            Tap::Outer => &mut self.outer,
        };
        let chunk = Chunk {
            tap,
            bytes: std::mem::take(&mut p.bytes),
            records: std::mem::take(&mut p.records),
        };
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(TrySendError::Full(mut c)) | Err(TrySendError::Disconnected(mut c)) => {
                shared.stats.dropped.fetch_add(c.records, Relaxed);
                c.bytes.clear();
                p.bytes = c.bytes;
            }
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.flush();
    }
}

struct TapFile {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    max: u64,
    files: u32,
    snaplen: u32,
    /// The current file was created (with its header) by this run.
    started: bool,
}

impl TapFile {
    fn new(path: PathBuf, cfg: &CaptureConfig) -> TapFile {
        TapFile {
            path,
            file: None,
            size: 0,
            max: cfg.max_file_bytes,
            files: cfg.files,
            snaplen: cfg.snaplen,
            started: false,
        }
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut s = self.path.clone().into_os_string();
        s.push(format!(".{n}"));
        PathBuf::from(s)
    }

    /// Shift `x.pcap` -> `x.pcap.1` -> ... keeping `files` in all.
    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        self.started = false;
        if self.files <= 1 {
            return remove_if_exists(&self.path);
        }
        remove_if_exists(&self.rotated(self.files - 1))?;
        for n in (1..self.files - 1).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))
    }

    fn open(&mut self) -> io::Result<()> {
        if self.started {
            // Reopening after a failed write (a full disk): keep what the file holds.
            let f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
            self.size = f.metadata()?.len();
            if self.size >= FILE_HEADER {
                self.file = Some(f);
                return Ok(());
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.path)?;
        let mut h = Vec::with_capacity(FILE_HEADER as usize);
        h.extend_from_slice(&PCAP_MAGIC.to_ne_bytes());
        h.extend_from_slice(&2u16.to_ne_bytes());
        h.extend_from_slice(&4u16.to_ne_bytes());
        h.extend_from_slice(&0i32.to_ne_bytes());
        h.extend_from_slice(&0u32.to_ne_bytes());
        h.extend_from_slice(&self.snaplen.to_ne_bytes());
        h.extend_from_slice(&LINKTYPE_RAW.to_ne_bytes());
        f.write_all(&h)?;
        self.file = Some(f);
        self.size = FILE_HEADER;
        self.started = true;
        Ok(())
    }

    fn write(&mut self, bytes: &[u8], stats: &CaptureStats) -> io::Result<()> {
        if self.file.is_some()
            && self.size + bytes.len() as u64 > self.max
            && self.size > FILE_HEADER
        {
            self.rotate()?;
            stats.rotations.fetch_add(1, Relaxed);
        }
        if self.file.is_none() {
            self.open()?;
        }
        let f = self.file.as_mut().expect("opened above");
        match f.write_all(bytes) {
            Ok(()) => {
                self.size += bytes.len() as u64;
                Ok(())
            }
            Err(e) => {
                // A partial record would corrupt the rest of the file: start a new one next
                // time (the old one is kept up to its last whole chunk by truncating it).
                let _ = f.set_len(self.size);
                self.file = None;
                Err(e)
            }
        }
    }
}

/// An IPv4 or IPv6 header for `len` bytes of `protocol` from `src` to `dst` (of one family)
/// into `h`; returns its length.
fn ip_header(h: &mut [u8; 48], src: IpAddr, dst: IpAddr, protocol: u8, len: usize) -> usize {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let plen = len.min(usize::from(u16::MAX)) as u16;
            espip_core::wire::ipv6::emit_header(h, s, d, protocol, plen);
            espip_core::wire::ipv6::HEADER_LEN
        }
        (s, d) => {
            let v4 = |a: IpAddr| match a {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => std::net::Ipv4Addr::UNSPECIFIED,
            };
            let total = (len + 20).min(usize::from(u16::MAX)) as u16;
            espip_core::wire::ip::emit_ipv4_header(&mut h[..20], v4(s), v4(d), protocol, total);
            20
        }
    }
}

fn remove_if_exists(p: &Path) -> io::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn writer_loop(rx: Receiver<Chunk>, files: &mut [TapFile; 2], shared: &Shared) {
    let mut last_warn: Option<Instant> = None;
    while let Ok(mut c) = rx.recv() {
        let f = match c.tap {
            Tap::Inner => &mut files[0],
            Tap::Outer => &mut files[1],
        };
        match f.write(&c.bytes, &shared.stats) {
            Ok(()) => {
                shared.stats.written.fetch_add(c.records, Relaxed);
            }
            Err(e) => {
                shared.stats.write_errors.fetch_add(c.records, Relaxed);
                if !last_warn.is_some_and(|t| t.elapsed() < WARN_INTERVAL) {
                    last_warn = Some(Instant::now());
                    warn!(
                        file = %f.path.display(),
                        "writing the capture failed: {e}; capture records are dropped (the tunnel is not affected) until writes succeed again"
                    );
                }
            }
        }
        c.bytes.clear();
        let mut pool = shared.pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < CHUNKS_IN_FLIGHT {
            pool.push(c.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, max: u64, files: u32) -> CaptureConfig {
        CaptureConfig {
            dir: dir.to_path_buf(),
            inner: true,
            outer: true,
            max_file_bytes: max,
            files,
            snaplen: 100,
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("espip-capture-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_land_in_pcap_files_with_snaplen_and_synthesised_headers() {
        let d = tmp("basic");
        let cap = Taps::start(&cfg(&d, 1 << 20, 2), "t0").unwrap();
        let mut r = cap.recorder();
        r.begin_batch();
        let pkt: Vec<u8> = (0..60).map(|i| i as u8).collect();
        r.record(Tap::Inner, &pkt);
        r.record(Tap::Inner, &[0x45; 300]);
        r.record_outer(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            50,
            &[9; 40],
        );
        drop(r);
        let stats = cap.stats();
        cap.finish();
        assert_eq!(stats.written.load(Relaxed), 3);
        let inner = std::fs::read(d.join("t0-inner.pcap")).unwrap();
        assert_eq!(&inner[..4], &PCAP_MAGIC.to_ne_bytes());
        assert_eq!(
            inner.len(),
            24 + 16 + 60 + 16 + 100,
            "second packet cut at snaplen"
        );
        assert_eq!(&inner[24 + 8..24 + 12], &60u32.to_ne_bytes());
        assert_eq!(&inner[40..100], &pkt[..]);
        let rec2 = 24 + 16 + 60;
        assert_eq!(&inner[rec2 + 8..rec2 + 12], &100u32.to_ne_bytes());
        assert_eq!(&inner[rec2 + 12..rec2 + 16], &300u32.to_ne_bytes());
        let outer = std::fs::read(d.join("t0-outer.pcap")).unwrap();
        let ip = &outer[40..];
        assert_eq!(ip.len(), 60);
        assert_eq!(ip[0], 0x45);
        assert_eq!(ip[9], 50);
        assert_eq!(&ip[12..20], &[192, 0, 2, 1, 192, 0, 2, 2]);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 60);
        assert_eq!(
            espip_core::wire::ip::checksum(&ip[..20]),
            0,
            "valid header checksum"
        );
        let mode = std::fs::metadata(d.join("t0-inner.pcap"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn files_rotate_and_old_ones_are_deleted() {
        let d = tmp("rotate");
        // Each chunk (one batch of 10 records of 16 + 100 bytes) is 1160 bytes; 2000-byte files
        // hold one chunk each.
        let cap = Taps::start(&cfg(&d, 2000, 3), "t1").unwrap();
        let mut r = cap.recorder();
        for _ in 0..5 {
            r.begin_batch();
            for _ in 0..10 {
                r.record(Tap::Inner, &[0x45; 100]);
            }
            r.flush();
            // Let the writer take each chunk so none is dropped.
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(r);
        let stats = cap.stats();
        cap.finish();
        assert_eq!(stats.written.load(Relaxed), 50);
        assert_eq!(stats.rotations.load(Relaxed), 4);
        let names: Vec<String> = {
            let mut v: Vec<String> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        };
        assert_eq!(
            names,
            ["t1-inner.pcap", "t1-inner.pcap.1", "t1-inner.pcap.2"]
        );
        for n in &names {
            let len = std::fs::metadata(d.join(n)).unwrap().len();
            assert_eq!(len, 24 + 1160, "{n}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_stalled_writer_drops_records_instead_of_blocking() {
        let d = tmp("stall");
        let cap = Taps::start(&cfg(&d, 1 << 30, 1), "t2").unwrap();
        // Hold the pool lock: the writer blocks after its first chunk, the channel fills.
        let shared = cap.shared.clone();
        let guard = shared.pool.lock().unwrap();
        let mut r = Recorder {
            sink: cap.tx.clone().map(|tx| (tx, cap.shared.clone())),
            inner: Pending {
                bytes: Vec::with_capacity(CHUNK_BYTES),
                records: 0,
            },
            outer: Pending::default(),
            ts: [0; 8],
        };
        let t = Instant::now();
        for _ in 0..(CHUNKS_IN_FLIGHT + 10) {
            r.record(Tap::Inner, &[0x45; 100]);
            r.flush();
        }
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "recording never waits"
        );
        let stats = cap.stats();
        assert!(stats.dropped.load(Relaxed) >= 9, "{:?}", stats);
        drop(guard);
        drop(r);
        cap.finish();
        let total = stats.written.load(Relaxed) + stats.dropped.load(Relaxed);
        assert_eq!(total, CHUNKS_IN_FLIGHT as u64 + 10);
        let _ = std::fs::remove_dir_all(&d);
    }
}

//! The control side of a running daemon: the Unix control socket (`espip show`, `espip sa`),
//! the Prometheus metrics endpoint, and the snapshot both serve.
//!
//! Control protocol: the client connects, writes one request line (`status`, `sa`, or
//! `sa-keys` for the Wireshark lines with keys, or `reload` followed by a JSON document up
//! to the end of its stream: the configuration, the key files it names, and the state files
//! of its keys as descriptors passed with `SCM_RIGHTS`), and reads one JSON document until
//! the daemon closes the connection.
//!
//! Who may ask (docs/security.md): the socket is bound by root, before the privilege drop, in
//! a directory only root can write ([`PrivateDir`]), with mode 0600; the daemon answers only
//! callers whose kernel-checked credentials (`SO_PEERCRED`) are root's. The client checks the
//! other way round: the socket and its directory belong to root, and the process that listens
//! on it was root when it called `listen` (the daemon binds before it drops root; a socket
//! another user bound shows that user's uid). Answers are capped in size and what is printed
//! from them is stripped of control characters.

use crate::config::{default_dir, in_init_netns, DEFAULT_CONTROL_DIR};
use crate::config::{Config, KeyFiles};
use crate::datapath::{DropReason, EncapSpec, Stats};
use crate::status::{CaptureStatus, InterfaceStatus, PeerStatus, SaExport, SaIn, SaOut, Status};
use crate::sys::capture::CaptureStats;
use crate::sys::safefs::PrivateDir;
use crate::telemetry::EdgeStats;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, warn};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64;
/// Largest reload document accepted (a configuration of a thousand peers is far below).
const MAX_RELOAD: usize = 1 << 20;
/// Most descriptors a reload may pass (one state file per key; the kernel passes at most
/// 253 in one message).
const MAX_FDS: usize = 250;
/// How long a reload may take in the daemon (netlink, fsyncs) before the client is told.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that sends nothing (or reads nothing) for this long is disconnected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once on each listener; more wait in the kernel's backlog, costing
/// the daemon no descriptor. Tuning constant: far above what `espip show` and a Prometheus
/// scraper need, far below the descriptor limit.
const MAX_CLIENTS: usize = 16;
/// Back-off after `accept` fails for want of descriptors or memory (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): the pending connection stays queued, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Largest answer the client reads (a status of a thousand peers is under 1 MiB).
pub const MAX_REPLY: usize = 4 << 20;

/// Why the control socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error("another espip is running for interface {iface}: its control socket {path} answers; stop it first (or give this one another interface.name)")]
    InUse {
        /// Interface name.
        iface: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or set interface.control to another path")]
    NotASocket(PathBuf),
    /// The OS refused.
    #[error("control socket {0}: {1}")]
    Io(PathBuf, io::Error),
    /// Nothing listens there.
    #[error("no espip daemon answers on {0} ({1}); is it running, and are you root?")]
    NotRunning(PathBuf, io::Error),
    /// The socket or the process behind it is not the root daemon's.
    #[error("{0}: {1}; refusing to talk to it (an espip daemon's socket is root's, in a directory only root can write)")]
    NotTrusted(PathBuf, String),
    /// The daemon refused the request.
    #[error("the daemon at {0} refused: {1}")]
    Refused(PathBuf, String),
}

/// The bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    ino: u64,
}

impl ControlSocket {
    /// Bind `path` with mode 0600. A socket left by a killed daemon (nobody answers) is
    /// replaced; one that answers means another daemon runs for this interface.
    pub fn bind(path: &Path, iface: &str) -> Result<ControlSocket, ControlError> {
        let io_err = |e| ControlError::Io(path.to_path_buf(), e);
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io_err(io::Error::other("not a file name")))?;
        // Root's own directory: no other user can replace the socket or plant one.
        let dir = PrivateDir::open(dir).map_err(|e| {
            ControlError::Io(
                path.to_path_buf(),
                io::Error::other(format!(
                    "{e} (interface.control must be in a directory of root's, e.g. {DEFAULT_CONTROL_DIR})"
                )),
            )
        })?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ControlError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse {
                        iface: iface.to_string(),
                        path: path.to_path_buf(),
                    });
                }
                dir.remove(name).map_err(io_err)?;
            }
            Err(_) => {}
        }
        // The socket is born 0600: no window in which another user could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let ino = std::fs::metadata(path).map_err(io_err)?.ino();
        Ok(ControlSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take the listener (for the server task); the file stays until `self` drops.
    pub fn take(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still ours. After the privilege drop the directory is
        // not writable any more and the inert socket stays until the next start replaces it
        // (clients skip a socket nobody answers on).
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A reload asked for on the control socket, for the serving loop.
pub struct ReloadRequest {
    /// The configuration, parsed and validated with the key files the client sent.
    pub cfg: Config,
    /// State files of the configuration's keys, opened by root in the client: (fingerprint,
    /// file).
    pub key_files: Vec<(String, std::fs::File)>,
    /// The answer: a summary of what changed, or why nothing did.
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

/// `espip rekey`: rekey the CHILD_SAs (or the IKE SA) of IKEv2 peers now, for the serving
/// loop.
pub struct RekeyRequest {
    /// Only this peer (`None`: every IKEv2 peer).
    pub peer: Option<String>,
    /// The IKE SA instead of the CHILD_SAs.
    pub ike: bool,
    /// What was started, or why nothing was.
    pub reply: tokio::sync::oneshot::Sender<Result<String, String>>,
}

/// What `espip reload` sends after its request line.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReloadDocument {
    /// The configuration text.
    pub config: zeroize::Zeroizing<String>,
    /// Its directory (relative key file paths are resolved against it).
    pub base: PathBuf,
    /// The key files it names, as read (with the checks of a start) by root.
    pub files: Vec<(PathBuf, zeroize::Zeroizing<String>)>,
    /// Key fingerprints of the descriptors passed with the request, in order.
    pub keys: Vec<String>,
}

/// Everything a snapshot reads: shared with the data-path threads, read without stopping them
/// or taking a lock (atomics only).
pub struct Live {
    /// The current generation: configuration, outbound half (sequence numbers and
    /// reservations, read atomically), per-peer counters, sources.
    pub current: Arc<crate::telemetry::Current>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Data-path counters (drops, relayed: they outlive reloads).
    pub stats: Arc<Stats>,
    /// Where reload requests go (the serving loop); `None`: reloads are refused.
    pub reload: Option<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// Where rekey requests go (the serving loop).
    pub rekey: Option<tokio::sync::mpsc::Sender<RekeyRequest>>,
    /// Edge errors.
    pub edge: Arc<EdgeStats>,
    /// Capture counters and files.
    pub capture: Option<(Arc<CaptureStats>, Vec<PathBuf>)>,
    /// The data path's clock origin (its `now` is nanoseconds since this).
    pub clock: Instant,
    /// Wall-clock time at `clock`.
    pub started: SystemTime,
    /// Inodes of the raw and UDP sockets (for their kernel drop counters).
    pub socket_inodes: Vec<u64>,
    /// IKEv2 peers' state and their IKE SAs' Wireshark lines (the IKE edge updates both).
    pub ike: std::sync::Mutex<(
        Vec<crate::status::IkePeerStatus>,
        Vec<zeroize::Zeroizing<String>>,
    )>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Live {
    /// The IKE edge's latest state.
    pub fn set_ike(
        &self,
        status: Vec<crate::status::IkePeerStatus>,
        wireshark: Vec<zeroize::Zeroizing<String>>,
    ) {
        if let Ok(mut g) = self.ike.lock() {
            *g = (status, wireshark);
        }
    }

    /// Wireshark `ikev2_decryption_table` lines of the current IKE SAs.
    pub fn ike_wireshark(&self) -> Vec<zeroize::Zeroizing<String>> {
        self.ike.lock().map(|g| g.1.clone()).unwrap_or_default()
    }

    fn wall(&self, ns: u64) -> Option<f64> {
        (ns != 0).then(|| unix(self.started) + ns as f64 / 1e9)
    }

    /// Take a snapshot.
    pub fn status(&self) -> Status {
        let g = self.current.load();
        let out = &g.outbound;
        let out_state: Vec<Option<(u64, Option<u64>)>> =
            (0..out.peer_count()).map(|i| out.sa_sequence(i)).collect();
        let peers = g
            .cfg
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let s = out.peer_stats(i);
                let (mode, sa_out, sa_in) = match &p.encap {
                    EncapSpec::IpIp => ("ipip", None, None),
                    EncapSpec::EspPending { udp_port, .. } => (
                        if udp_port.is_some() { "esp-udp" } else { "esp" },
                        None,
                        None,
                    ),
                    EncapSpec::Esp {
                        cipher,
                        spi_out,
                        spi_in,
                        replay_window,
                        esn,
                        udp_port,
                        ..
                    } => {
                        let (next, limit) =
                            out_state.get(i).copied().flatten().unwrap_or((0, None));
                        (
                            if udp_port.is_some() { "esp-udp" } else { "esp" },
                            Some(SaOut {
                                spi: *spi_out,
                                cipher: cipher.name().into(),
                                esn: *esn,
                                next_seq: next,
                                reserved_to: limit,
                            }),
                            Some(SaIn {
                                spi: *spi_in,
                                cipher: cipher.name().into(),
                                esn: *esn,
                                highest_seq: s.replay_top.load(Relaxed),
                                replay_window: *replay_window,
                            }),
                        )
                    }
                };
                // A learned endpoint: its address (and port) from the peer's last
                // authenticated packet.
                let learned = s.learned.get();
                let address = p.endpoint.or(learned.map(|a| a.ip()));
                PeerStatus {
                    name: p.name.clone(),
                    endpoint: match (address, &p.encap) {
                        (None, _) => "(none yet)".into(),
                        (
                            Some(ip),
                            EncapSpec::Esp {
                                udp_port: Some(port),
                                ..
                            }
                            | EncapSpec::EspPending {
                                udp_port: Some(port),
                                ..
                            },
                        ) => {
                            // The port the peer's last authenticated datagram came from wins.
                            let seen = s.udp_port_seen.load(Relaxed) as u16;
                            let port = if seen != 0 { seen } else { *port };
                            std::net::SocketAddr::new(ip, port).to_string()
                        }
                        (Some(ip), _) => ip.to_string(),
                    },
                    endpoint_learned: p.endpoint.is_none(),
                    endpoint_changed_unix: learned
                        .and_then(|_| self.wall(s.learned.changed_at.load(Relaxed))),
                    endpoint_moves: s.learned.moves.load(Relaxed),
                    mode: mode.into(),
                    allowed_ips: p.allowed_ips.iter().map(|a| a.to_string()).collect(),
                    sa_out,
                    sa_in,
                    tx_packets: s.tx_packets.load(Relaxed),
                    tx_bytes: s.tx_bytes.load(Relaxed),
                    rx_packets: s.rx_packets.load(Relaxed),
                    rx_bytes: s.rx_bytes.load(Relaxed),
                    last_tx_unix: self.wall(s.last_tx.load(Relaxed)),
                    last_rx_unix: self.wall(s.last_rx.load(Relaxed)),
                    multipath: out.multipath(i).map(|m| path_status(m)),
                }
            })
            .collect();
        let drops = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), self.stats.drops(*r)))
            .collect();
        let e = &self.edge;
        let errors = [
            ("tun_read", &e.tun_read_errors),
            ("tun_write", &e.tun_write_errors),
            ("send", &e.send_errors),
            ("bad_outer", &e.bad_outer),
            ("offload", &e.offload_errors),
            ("ike_foreign", &e.ike_foreign),
            ("ike_queue_full", &e.ike_queue_full),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Relaxed)))
        .collect();
        let i = &g.cfg.interface;
        Status {
            interface: InterfaceStatus {
                name: i.name.clone(),
                mtu: self.mtu,
                addresses: i.addresses.iter().map(|a| a.to_string()).collect(),
                local: i.local.map(|l| l.to_string()),
                started_unix: unix(self.started),
                uptime_seconds: self.clock.elapsed().as_secs_f64(),
                version: env!("CARGO_PKG_VERSION").into(),
                generation: g.number,
            },
            peers,
            drops,
            errors,
            relayed: self.stats.relayed.load(Relaxed),
            offload: [
                ("tso_in", &e.tso_packets),
                ("uso_in", &e.uso_packets),
                ("gro_out", &e.gro_packets),
                ("udp_gso_out", &e.udp_gso_sends),
                ("af_packet_out", &e.af_packet_sends),
                ("udp_gro_in", &e.udp_gro_receives),
                ("ipip_gro_in", &e.ipip_gro_receives),
                ("xdp_in", &e.xdp_receives),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.load(Relaxed)))
            .collect(),
            kernel_drops: {
                let k = crate::sys::kstats::read(&i.name, &self.socket_inodes).unwrap_or_default();
                [
                    ("tun_tx_queue", k.tun_tx_queue),
                    ("tun_rx", k.tun_rx),
                    ("socket_rcvbuf", k.socket_rcvbuf),
                    ("xdp_socket", e.xdp_dropped.load(Relaxed)),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
            },
            capture: self.capture.as_ref().map(|(c, files)| CaptureStatus {
                files: files.iter().map(|f| f.display().to_string()).collect(),
                written: c.written.load(Relaxed),
                dropped: c.dropped.load(Relaxed),
                write_errors: c.write_errors.load(Relaxed),
                rotations: c.rotations.load(Relaxed),
            }),
            ike: self.ike.lock().map(|g| g.0.clone()).unwrap_or_default(),
            netns: None,
        }
    }

    /// Every ESP SA, with its Wireshark `esp_sa` line (which holds the key) if `keys`.
    pub fn sa_export(&self, keys: bool) -> Vec<SaExport> {
        let mut v = Vec::new();
        let g = self.current.load();
        for (p, endpoint) in g
            .cfg
            .peers
            .iter()
            .flat_map(|p| p.endpoints().into_iter().map(move |e| (p, e)))
        {
            let local = g.source_for(&endpoint);
            let EncapSpec::Esp {
                spi_out,
                key_out,
                spi_in,
                key_in,
                ..
            } = &p.encap
            else {
                continue;
            };
            // IKEv2 peers: the older inbound SAs still accepted during a rekey too.
            let older = p
                .negotiated
                .iter()
                .flatten()
                .map(|(spi, key, _)| ("in", endpoint, local, *spi, key));
            for (dir, src, dst, spi, key) in [
                ("out", local, endpoint, *spi_out, key_out),
                ("in", endpoint, local, *spi_in, key_in),
            ]
            .into_iter()
            .chain(older)
            {
                v.push(SaExport {
                    peer: p.name.clone(),
                    direction: dir.into(),
                    src: src.to_string(),
                    dst: dst.to_string(),
                    spi,
                    cipher: key.cipher().name().into(),
                    wireshark: if keys {
                        crate::wireshark::esp_sa_line(src, dst, spi, key)
                    } else {
                        None
                    },
                });
            }
        }
        v
    }

    /// Apply a reload document: parse the configuration with the key files it carries (as
    /// root read them), and hand it to the serving loop with the passed state files.
    async fn reload(
        &self,
        doc: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> zeroize::Zeroizing<Vec<u8>> {
        let result = self.reload_inner(doc, fds).await;
        let v = match result {
            Ok(summary) => serde_json::json!({ "reloaded": summary }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        zeroize::Zeroizing::new(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// `rekey child|ike [PEER]`: handed to the serving loop, which starts the exchanges.
    async fn rekey(&self, request: &str) -> zeroize::Zeroizing<Vec<u8>> {
        let result = async {
            let Some(tx) = &self.rekey else {
                return Err("this daemon does not take rekey requests".to_string());
            };
            let mut words = request.split_whitespace().skip(1);
            let ike = match words.next() {
                Some("ike") => true,
                Some("child") => false,
                _ => return Err("expected \"rekey child [PEER]\" or \"rekey ike [PEER]\"".into()),
            };
            let peer = words.next().map(str::to_string);
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(RekeyRequest { peer, ike, reply })
                .await
                .map_err(|_| "the daemon is stopping".to_string())?;
            answer
                .await
                .map_err(|_| "the daemon is stopping".to_string())?
        }
        .await;
        let v = match result {
            Ok(s) => serde_json::json!({ "rekey": s }),
            Err(e) => serde_json::json!({ "error": e }),
        };
        zeroize::Zeroizing::new(serde_json::to_vec(&v).unwrap_or_default())
    }

    async fn reload_inner(
        &self,
        doc: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<String, String> {
        let Some(tx) = &self.reload else {
            return Err("this daemon does not take reloads".into());
        };
        let d: ReloadDocument = serde_json::from_slice(doc)
            .map_err(|e| format!("a reload document espip did not write: {e}"))?;
        if d.keys.len() != fds.len() {
            return Err(format!(
                "the reload names {} key state files but passed {} descriptors",
                d.keys.len(),
                fds.len()
            ));
        }
        let files = d.files.into_iter().collect();
        let cfg = Config::parse_with(&d.config, &d.base, &KeyFiles::given(files))
            .map_err(|e| e.to_string())?;
        let key_files = d
            .keys
            .into_iter()
            .zip(fds)
            .map(|(k, f)| (k, std::fs::File::from(f)))
            .collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        tx.send(ReloadRequest {
            cfg,
            key_files,
            reply,
        })
        .await
        .map_err(|_| "the daemon is stopping".to_string())?;
        match tokio::time::timeout(RELOAD_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err("the daemon is stopping".into()),
            Err(_) => Err(format!(
                "no answer within {} s; see the daemon's log",
                RELOAD_TIMEOUT.as_secs()
            )),
        }
    }

    fn answer(&self, request: &str) -> zeroize::Zeroizing<Vec<u8>> {
        // Serialized into a buffer allocated once (growth would leave copies of the keys in
        // freed memory) that is wiped when dropped.
        let mut body = zeroize::Zeroizing::new(Vec::with_capacity(MAX_REPLY));
        let done = match request {
            "status" => serde_json::to_writer(&mut *body, &self.status()),
            "sa" => serde_json::to_writer(&mut *body, &self.sa_export(false)),
            "sa-keys" => serde_json::to_writer(&mut *body, &self.sa_export(true)),
            "ike-keys" => serde_json::to_writer(
                &mut *body,
                &self
                    .ike_wireshark()
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<&str>>(),
            ),
            other => serde_json::to_writer(
                &mut *body,
                &serde_json::json!({
                    "error": format!("unknown request {other:?}; expected \"status\", \"sa\", \"sa-keys\" or \"reload\"")
                }),
            ),
        };
        if done.is_err() {
            body.clear();
        }
        body
    }
}

/// Accept connections on `listener` one permit at a time, backing off when descriptors run
/// out, and hand each to `serve`.
async fn accept_loop<L, C, F, Fut>(what: &'static str, mut accept: L, serve: F)
where
    L: FnMut() -> C,
    C: std::future::Future<Output = io::Result<Fut>>,
    F: Fn(Fut) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    let mut warned: Option<Instant> = None;
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        match accept().await {
            Ok(conn) => {
                let fut = serve(conn);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
            Err(e) => {
                let starved = matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                );
                if !warned.is_some_and(|t| t.elapsed() <= Duration::from_secs(60)) {
                    warn!("{what}: accept failed: {e}; backing off");
                    warned = Some(Instant::now());
                }
                tokio::time::sleep(if starved {
                    ACCEPT_BACKOFF
                } else {
                    ACCEPT_BACKOFF / 10
                })
                .await;
            }
        }
    }
}

/// Whether a caller with these credentials may make `request`: root only, for every request
/// (keys and status alike; docs/security.md).
pub fn authorized(uid: u32, request: &str) -> Result<(), String> {
    if uid == 0 {
        Ok(())
    } else {
        Err(format!(
            "uid {uid} may not make request {:?}: espip answers root only (run espip show/sa as root)",
            request.escape_debug().to_string()
        ))
    }
}

/// Serve the control socket until the task is dropped.
pub async fn serve_control(listener: UnixListener, live: Arc<Live>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!("control socket: {e}; `espip show` will not answer");
            return;
        }
    };
    let accept = || {
        let l = listener.clone();
        async move { l.accept().await.map(|(c, _)| c) }
    };
    let serve = move |mut conn: tokio::net::UnixStream| {
        let live = live.clone();
        Box::pin(async move {
            // SO_PEERCRED: the kernel's record of who connected.
            let uid = match conn.peer_cred() {
                Ok(c) => c.uid(),
                Err(_) => return,
            };
            let read = tokio::time::timeout(REQUEST_TIMEOUT, read_request(&conn, uid == 0)).await;
            let Ok(Ok((req, doc, fds))) = read else {
                debug!("control client sent no complete request in time");
                return;
            };
            let request = String::from_utf8_lossy(&req).trim().to_string();
            let body = match authorized(uid, &request) {
                Ok(()) if request == "reload" => live.reload(&doc, fds).await,
                Ok(()) if request.starts_with("rekey ") => live.rekey(&request).await,
                Ok(()) => live.answer(&request),
                Err(why) => {
                    debug!(uid, "control request refused");
                    zeroize::Zeroizing::new(
                        serde_json::to_vec(&serde_json::json!({ "error": why }))
                            .unwrap_or_default(),
                    )
                }
            };
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let _ = conn.write_all(&body).await;
                let _ = conn.shutdown().await;
            })
            .await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    accept_loop("control socket", accept, serve).await;
}

/// Read a request: its line, and for `reload` (only from root: `may_reload`) the document
/// after it up to the end of the stream, with the descriptors passed along (`SCM_RIGHTS`).
async fn read_request(
    conn: &tokio::net::UnixStream,
    may_reload: bool,
) -> io::Result<(
    Vec<u8>,
    zeroize::Zeroizing<Vec<u8>>,
    Vec<std::os::fd::OwnedFd>,
)> {
    use std::os::fd::AsRawFd;
    let mut line = Vec::with_capacity(MAX_REQUEST);
    let mut doc = zeroize::Zeroizing::new(Vec::new());
    let mut fds = Vec::new();
    let mut chunk = zeroize::Zeroizing::new(vec![0u8; 4096]);
    loop {
        conn.readable().await?;
        let n = match conn.try_io(tokio::io::Interest::READABLE, || {
            recv_with_fds(conn.as_raw_fd(), &mut chunk, &mut fds)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        if fds.len() > MAX_FDS {
            return Err(io::Error::other("too many descriptors"));
        }
        let mut got = &chunk[..n];
        if doc.capacity() == 0 {
            // Still in the request line.
            match got.iter().position(|b| *b == b'\n') {
                Some(i) => {
                    line.extend_from_slice(&got[..i]);
                    got = &got[i + 1..];
                    if line != b"reload" || !may_reload {
                        return Ok((line, doc, fds));
                    }
                    // Allocated once, never grown: no copy of a key in a freed reallocation.
                    doc = zeroize::Zeroizing::new(Vec::with_capacity(MAX_RELOAD));
                }
                None => {
                    line.extend_from_slice(got);
                    if n == 0 || line.len() > MAX_REQUEST {
                        return Ok((line, doc, fds));
                    }
                    continue;
                }
            }
        }
        if got.len() > MAX_RELOAD - doc.len() {
            return Err(io::Error::other("reload document too large"));
        }
        doc.extend_from_slice(got);
        if n == 0 {
            return Ok((line, doc, fds));
        }
    }
}

/// One `recvmsg` on a control connection: bytes into `buf`, passed descriptors onto `fds`.
fn recv_with_fds(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    fds: &mut Vec<std::os::fd::OwnedFd>,
) -> io::Result<usize> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::FromRawFd;
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; MAX_FDS]);
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(v) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us;
            // nothing else owns them.
            fds.extend(
                v.into_iter()
                    .map(|f| unsafe { std::os::fd::OwnedFd::from_raw_fd(f) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(io::Error::other("descriptors truncated"));
    }
    Ok(msg.bytes)
}

/// Serve `GET /metrics` (Prometheus text format) on `listener` until the task is dropped.
pub async fn serve_metrics(listener: std::net::TcpListener, live: Arc<Live>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!("metrics listener: {e}");
            return;
        }
    };
    let accept = || {
        let l = listener.clone();
        async move { l.accept().await.map(|(c, _)| c) }
    };
    let serve = move |mut conn: tokio::net::TcpStream| {
        let live = live.clone();
        Box::pin(async move {
            let mut head = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let got = tokio::time::timeout(REQUEST_TIMEOUT, async {
                while head.len() < 8192 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(got, Ok(true)) {
                return;
            }
            let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "GET only\n".to_string(),
                )
            } else if target == "/metrics" || target.starts_with("/metrics?") {
                (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    live.status().to_prometheus(),
                )
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
                let _ = conn.write_all(resp.as_bytes()).await;
                let _ = conn.shutdown().await;
            })
            .await;
        }) as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
    };
    accept_loop("metrics listener", accept, serve).await;
}

/// Whether `path` (not followed) is a socket of root's (or of this user's) in a directory
/// only root (or this user) can write.
fn trusted_socket(path: &Path) -> Result<(), String> {
    let me = nix::unistd::geteuid().as_raw();
    let m = std::fs::symlink_metadata(path).map_err(|e| e.to_string())?;
    if !m.file_type().is_socket() {
        return Err("not a socket".into());
    }
    if m.uid() != 0 && m.uid() != me {
        return Err(format!("the socket belongs to uid {}", m.uid()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let d = std::fs::metadata(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })
    .map_err(|e| e.to_string())?;
    if d.uid() != 0 && d.uid() != me {
        return Err(format!(
            "its directory {} belongs to uid {}, who could have replaced it",
            dir.display(),
            d.uid()
        ));
    }
    if d.mode() & 0o022 != 0 {
        return Err(format!(
            "its directory {} is writable by others (mode {:04o})",
            dir.display(),
            d.mode() & 0o7777
        ));
    }
    Ok(())
}

/// Send `request` to the daemon at `path` and return its JSON answer (at most [`MAX_REPLY`]
/// bytes, in a buffer wiped when dropped). The socket, its directory and the listening process
/// must be root's (see the module documentation).
pub fn request(path: &Path, request: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    exchange(path, format!("{request}\n").as_bytes(), &[])
}

/// Send `espip reload`'s document (configuration text, the key files it names, and the state
/// files of its keys as descriptors) to the daemon at `path`; its answer.
pub fn request_reload(
    path: &Path,
    doc: &ReloadDocument,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    let mut msg = zeroize::Zeroizing::new(b"reload\n".to_vec());
    serde_json::to_writer(&mut *msg, doc)
        .map_err(|e| ControlError::Io(path.to_path_buf(), io::Error::other(e)))?;
    exchange(path, &msg, fds)
}

/// Connect to the daemon at `path` (trusted as [`request`] says), send `msg` with `fds`
/// (`SCM_RIGHTS`) and read the JSON answer.
fn exchange(
    path: &Path,
    msg: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    use std::os::fd::AsRawFd;
    let untrusted = |why: String| ControlError::NotTrusted(path.to_path_buf(), why);
    if let Err(why) = trusted_socket(path) {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(ControlError::NotRunning(
                path.to_path_buf(),
                io::Error::new(io::ErrorKind::NotFound, why),
            ));
        }
        return Err(untrusted(why));
    }
    let mut s =
        UnixStream::connect(path).map_err(|e| ControlError::NotRunning(path.to_path_buf(), e))?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| untrusted(format!("SO_PEERCRED: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        return Err(untrusted(format!(
            "the process listening on it (pid {}) is uid {}, not root",
            cred.pid(),
            cred.uid()
        )));
    }
    let io_err = |e| ControlError::Io(path.to_path_buf(), e);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    if fds.is_empty() {
        s.write_all(msg).map_err(io_err)?;
    } else {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // The descriptors travel with the first bytes; the rest follows as a stream.
        let first = &msg[..msg.len().min(1)];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[io::IoSlice::new(first)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| io_err(e.into()))?;
        s.write_all(&msg[first.len()..]).map_err(io_err)?;
    }
    // The end of the request (a reload document is read to the end of the stream).
    s.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    // Allocated once, never grown: no copy of a key is left in a freed reallocation.
    let mut out = zeroize::Zeroizing::new(vec![0u8; MAX_REPLY + 1]);
    let mut n = 0;
    while n < out.len() {
        match s.read(&mut out[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    if n > MAX_REPLY {
        return Err(untrusted(format!(
            "its answer is larger than {MAX_REPLY} bytes"
        )));
    }
    out.truncate(n);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(ControlError::Refused(path.to_path_buf(), clean(e)));
        }
    }
    Ok(out)
}

/// `text` with every control character (escape sequences, carriage returns) replaced by
/// `?`, keeping newlines and tabs: for printing what a daemon sent to a terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The control sockets of every daemon using a default socket path, each with the network
/// namespace it runs in when that is another one (its `ip netns` name, else `inode N`): the
/// default directory's own sockets, and, from the initial namespace, those of every
/// `netns-INODE` directory below it (daemons in other namespaces). Directories and sockets left
/// by stopped daemons are returned too; the caller skips those nobody answers on.
pub fn all_default_sockets() -> Vec<(PathBuf, Option<String>)> {
    let dir = default_dir();
    let mut out: Vec<(PathBuf, Option<String>)> = running_sockets(&dir)
        .into_iter()
        .map(|p| (p, None))
        .collect();
    if !in_init_netns() {
        return out;
    }
    let names = netns_names();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut subdirs: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        // Only real directories (a link is not followed) named netns-<inode>.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name();
            let ino = name.to_str()?.strip_prefix("netns-")?.parse::<u64>().ok()?;
            Some((ino, e.path()))
        })
        .collect();
    subdirs.sort();
    for (ino, sub) in subdirs {
        let label = names
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| format!("inode {ino}"));
        out.extend(
            running_sockets(&sub)
                .into_iter()
                .map(|p| (p, Some(label.clone()))),
        );
    }
    out
}

/// The names `ip netns` gave namespaces, by namespace inode.
fn netns_names() -> std::collections::HashMap<u64, String> {
    let mut m = std::collections::HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.filter_map(|e| e.ok()) {
            if let (Ok(meta), Some(name)) = (std::fs::metadata(e.path()), e.file_name().to_str()) {
                m.insert(meta.ino(), name.to_string());
            }
        }
    }
    m
}

/// The control sockets of the daemons running with the default directory.
pub fn running_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// A multipath peer's paths as `espip show` reports them.
fn path_status(m: &crate::multipath::Multipath) -> crate::status::MultipathStatus {
    use crate::multipath::SLOTS;
    let ms = |ns: u64| (ns > 0).then(|| ns as f64 / 1e6);
    crate::status::MultipathStatus {
        scheduler: m.spec.scheduler.name().into(),
        paths: m
            .paths
            .iter()
            .zip(&m.stats)
            .map(|(p, s)| {
                let port = match s.udp_port_seen.load(Relaxed) {
                    0 => p.port,
                    seen => seen as u16,
                };
                crate::status::PathStatus {
                    name: p.name.clone(),
                    endpoint: if port == 0 {
                        p.endpoint.to_string()
                    } else {
                        std::net::SocketAddr::new(p.endpoint, port).to_string()
                    },
                    state: s.state().name().into(),
                    // A down path has no current RTT (its last one would mislead).
                    rtt_ms: if s.state().name() == "down" {
                        None
                    } else {
                        ms(s.srtt_ns.load(Relaxed))
                    },
                    min_rtt_ms: ms(s.min_rtt_ns.load(Relaxed)),
                    probes_sent: s.probes_sent.load(Relaxed),
                    echoes: s.echoes.load(Relaxed),
                    quiet_count: s.quiet_count.load(Relaxed),
                    share: f64::from(s.share.load(Relaxed)) / SLOTS as f64,
                    capacity_bps: s.capacity.load(Relaxed) as f64 * 8.0,
                    tx_packets: s.tx_packets.load(Relaxed),
                    tx_bytes: s.tx_bytes.load(Relaxed),
                    send_refused: s.send_refused.load(Relaxed),
                    rx_packets: s.rx_packets.load(Relaxed),
                    rx_bytes: s.rx_bytes.load(Relaxed),
                    peer_rx_bytes: s.peer_rx_bytes.load(Relaxed),
                }
            })
            .collect(),
        reorder_held: m.reorder.held.load(Relaxed),
        reorder_gaps_skipped: m.reorder.gaps_skipped.load(Relaxed),
        reorder_late: m.reorder.late.load(Relaxed),
        reorder_hold_ms: m.hold_ns() as f64 / 1e6,
    }
}

//! [`Live`]: what a snapshot reads (atomics shared with the data path, never a lock on it),
//! and the [`Status`] it builds for `espip show`, `espip sa` and the metrics; reload and rekey
//! requests handed to the serving loop.

use super::*;
use crate::config::{Config, KeyFiles};
use crate::datapath::{DropReason, EncapSpec, Stats};
use crate::status::{CaptureStatus, InterfaceStatus, PeerStatus, SaExport, SaIn, SaOut, Status};
use crate::sys::capture::CaptureStats;
use crate::telemetry::EdgeStats;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

/// A peer's mode and its static SAs (none for ipip and for IKEv2 peers, whose SAs the IKE
/// status shows): the outbound one with its next sequence number and reservation.
fn sa_pair(
    encap: &EncapSpec,
    s: &crate::datapath::PeerStats,
    out_seq: Option<(u64, Option<u64>)>,
) -> (&'static str, Option<SaOut>, Option<SaIn>) {
    match encap {
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
            let (next, limit) = out_seq.unwrap_or((0, None));
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
    }
}

/// The edges' error counters by name.
fn edge_errors(e: &EdgeStats) -> BTreeMap<String, u64> {
    [
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
    .collect()
}

/// The offloads used, by name: packets (or sends) each carried.
fn offload_counts(e: &EdgeStats) -> BTreeMap<String, u64> {
    [
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
    .collect()
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
                self.peer_status(
                    p,
                    out.peer_stats(i),
                    out_state.get(i).copied().flatten(),
                    out.multipath(i).map(Arc::as_ref),
                )
            })
            .collect();
        let drops = DropReason::ALL
            .iter()
            .map(|r| (r.name().to_string(), self.stats.drops(*r)))
            .collect();
        let e = &self.edge;
        let errors = edge_errors(e);
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
            offload: offload_counts(e),
            kernel_drops: self.kernel_drops(&i.name),
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

    /// One peer's status: its SAs, its endpoint (configured or learned), counters, paths.
    fn peer_status(
        &self,
        p: &crate::datapath::PeerSpec,
        s: &crate::datapath::PeerStats,
        out_seq: Option<(u64, Option<u64>)>,
        multipath: Option<&crate::multipath::Multipath>,
    ) -> PeerStatus {
        let (mode, sa_out, sa_in) = sa_pair(&p.encap, s, out_seq);
        // A learned endpoint: its address (and port) from the peer's last
        // authenticated packet.
        let learned = s.learned.get();
        let address = p.endpoint.or(learned.map(|a| a.ip()));
        let per_path = multipath.is_some_and(|m| m.learns());
        PeerStatus {
            name: p.name.clone(),
            endpoint: match (address, &p.encap) {
                (None, _) if per_path => format!(
                    "learned per path (max_paths {})",
                    multipath.map_or(0, |m| m.paths.len())
                ),
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
            endpoint_learned: p.endpoint.is_none() && !per_path,
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
            multipath: multipath.map(|m| path_status(m, &|ns| self.wall(ns))),
        }
    }

    /// The kernel's drops on our devices and sockets, and AF_XDP's.
    fn kernel_drops(&self, ifname: &str) -> BTreeMap<String, u64> {
        let k = crate::sys::kstats::read(ifname, &self.socket_inodes).unwrap_or_default();
        [
            ("tun_tx_queue", k.tun_tx_queue),
            ("tun_rx", k.tun_rx),
            ("socket_rcvbuf", k.socket_rcvbuf),
            ("xdp_socket", self.edge.xdp_dropped.load(Relaxed)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Every ESP SA, with its Wireshark `esp_sa` line (which holds the key) if `keys`.
    pub fn sa_export(&self, keys: bool) -> Vec<SaExport> {
        let mut v = Vec::new();
        let g = self.current.load();
        // A peer without a configured endpoint: the address learned from its packets (none
        // yet: no lines), with the source the kernel picks towards it.
        let learned = |i: usize| g.outbound.peer_stats(i).learned.get().map(|a| a.ip());
        let learned_paths = |i: usize| -> Vec<std::net::IpAddr> {
            g.outbound.multipath(i).map_or(Vec::new(), |m| {
                (0..m.paths.len())
                    .filter(|&j| m.paths[j].learned)
                    .filter_map(|j| m.endpoint_of(j).map(|e| e.0))
                    .collect()
            })
        };
        for (p, endpoint) in g.cfg.peers.iter().enumerate().flat_map(|(i, p)| {
            let eps = match p.endpoint {
                None if p.multipath.is_none() => learned(i).into_iter().collect(),
                None => learned_paths(i),
                _ => p.endpoints(),
            };
            eps.into_iter().map(move |e| (p, e))
        }) {
            let local = match (p.endpoint, g.source_for(&endpoint)) {
                (None, l) if l.is_unspecified() => {
                    crate::sys::source_for(endpoint, g.cfg.interface.local).unwrap_or(l)
                }
                (_, l) => l,
            };
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
    pub(super) async fn reload(
        &self,
        doc: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> zeroize::Zeroizing<Vec<u8>> {
        let result = self.reload_inner(doc, fds).await;
        let v = match result {
            Ok(summary) => serde_json::json!({ "reloaded": summary }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        zeroize::Zeroizing::new(serde_json::to_vec(&v).unwrap_or_default())
    }

    /// `rekey child|ike [PEER]`: handed to the serving loop, which starts the exchanges.
    pub(super) async fn rekey(&self, request: &str) -> zeroize::Zeroizing<Vec<u8>> {
        let result = async {
            let Some(tx) = &self.rekey else {
                return Err(Refused::NotTaken("rekey requests"));
            };
            let mut words = request.split_whitespace().skip(1);
            let ike = match words.next() {
                Some("ike") => true,
                Some("child") => false,
                _ => {
                    return Err(Refused::BadRequest(
                        "\"rekey child [PEER]\" or \"rekey ike [PEER]\"",
                    ))
                }
            };
            let peer = words.next().map(str::to_string);
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(RekeyRequest { peer, ike, reply })
                .await
                .map_err(|_| Refused::Stopping)?;
            answer.await.map_err(|_| Refused::Stopping)?
        }
        .await;
        let v = match result {
            Ok(s) => serde_json::json!({ "rekey": s }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        zeroize::Zeroizing::new(serde_json::to_vec(&v).unwrap_or_default())
    }

    async fn reload_inner(
        &self,
        doc: &[u8],
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> Result<String, Refused> {
        let Some(tx) = &self.reload else {
            return Err(Refused::NotTaken("reloads"));
        };
        let d: ReloadDocument =
            serde_json::from_slice(doc).map_err(|e| Refused::Document(e.to_string()))?;
        if d.keys.len() != fds.len() {
            return Err(Refused::Document(format!(
                "it names {} key state files but passed {} descriptors",
                d.keys.len(),
                fds.len()
            )));
        }
        let files = d.files.into_iter().collect();
        let cfg = Config::parse_with(&d.config, &d.base, &KeyFiles::given(files))?;
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
        .map_err(|_| Refused::Stopping)?;
        match tokio::time::timeout(RELOAD_TIMEOUT, answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(Refused::Stopping),
            Err(_) => Err(Refused::Timeout(RELOAD_TIMEOUT.as_secs())),
        }
    }

    pub(super) fn answer(&self, request: &str) -> zeroize::Zeroizing<Vec<u8>> {
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

/// A multipath peer's paths as `espip show` reports them.
fn path_status(
    m: &crate::multipath::Multipath,
    wall: &dyn Fn(u64) -> Option<f64>,
) -> crate::status::MultipathStatus {
    use crate::multipath::SLOTS;
    let ms = |ns: u64| (ns > 0).then(|| ns as f64 / 1e6);
    crate::status::MultipathStatus {
        scheduler: m.spec.scheduler.name().into(),
        paths: m
            .paths
            .iter()
            .zip(&m.stats)
            .enumerate()
            .map(|(i, (p, s))| {
                let endpoint = m.endpoint_of(i).map(|(ip, port)| {
                    let port = match (p.learned, s.udp_port_seen.load(Relaxed)) {
                        (false, seen) if seen != 0 => seen as u16,
                        _ => port,
                    };
                    if port == 0 {
                        ip.to_string()
                    } else {
                        std::net::SocketAddr::new(ip, port).to_string()
                    }
                });
                crate::status::PathStatus {
                    name: p.name.clone(),
                    endpoint: endpoint.unwrap_or_else(|| "(none learned yet)".into()),
                    learned_unix: p
                        .learned
                        .then(|| wall(s.learned.changed_at.load(Relaxed)))
                        .flatten(),
                    local: p.local.map(|l| l.to_string()),
                    device: p.device.clone(),
                    state: if p.learned && s.forgotten.load(Relaxed) {
                        "forgotten".into()
                    } else {
                        s.state().name().into()
                    },
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
                    repaired: s.repaired.load(Relaxed),
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
        reorder_asked: m.reorder.asked.load(Relaxed),
        reorder_repaired: m.reorder.repaired.load(Relaxed),
        reorder_hold_ms: m.hold_ns() as f64 / 1e6,
    }
}

//! Phase 3: serve until a signal or a dead data-path thread. The control socket and the
//! metrics endpoint answer from atomics; once a second the peers' silence and the SA
//! lifetimes are checked.

use super::edges::NattDatagram;
use super::ike::IkeDriver;
use super::reload::Reloader;
use super::seq::{extend_reservations, RESERVATION_TICK};
use super::workers::Ended;
use crate::config::Config;
use crate::control::{Live, Refused, ReloadRequest};
use crate::datapath::{EncapSpec, Stats};
use crate::telemetry::{EdgeStats, Generation, RateLimit};
use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{info, warn};

/// Why serving ended.
#[derive(Debug)]
pub(super) enum Stop {
    /// SIGTERM or SIGINT.
    Signal(&'static str),
    /// A data-path thread returned or panicked.
    Worker(Ended),
}

/// What the control side listens on.
pub(super) struct Listeners<'a> {
    /// The control socket.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// The metrics endpoint.
    pub metrics: Option<std::net::TcpListener>,
    /// Reload requests the control socket received (`espip reload`).
    pub reload: &'a mut tokio::sync::mpsc::Receiver<ReloadRequest>,
    /// `espip rekey` requests.
    pub rekey: &'a mut tokio::sync::mpsc::Receiver<crate::control::RekeyRequest>,
    /// IKEv2 (port 500 and the engines), when a peer uses it.
    pub ike: Option<IkeDriver>,
    /// IKE messages the RX thread took off the ESP-in-UDP port.
    pub natt: Option<tokio::sync::mpsc::Receiver<NattDatagram>>,
    /// The `AF_PACKET` sockets' next hops, to keep current (`None`: no such socket is open).
    pub next_hops: Option<Arc<arc_swap::ArcSwap<crate::sys::packet::NextHops>>>,
}

/// Serve `live` until a stop signal, or until a data-path thread reports on `ended`; keep the
/// sequence reservations ahead of the SAs; reload on SIGHUP (re-reading `path`) or on a
/// request.
pub(super) fn serve(
    rt: &tokio::runtime::Runtime,
    live: &Arc<Live>,
    listeners: Listeners,
    mut reloader: Reloader,
    path: Option<&Path>,
    ended: &mut UnboundedReceiver<Ended>,
) -> io::Result<Stop> {
    let clock = live.clock;
    let Listeners {
        control,
        metrics,
        reload,
        rekey,
        mut ike,
        mut natt,
        next_hops,
    } = listeners;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = control {
            tasks.spawn(crate::control::serve_control(l, live.clone()));
        }
        if let Some(l) = metrics {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, "metrics served at http://{addr}/metrics");
            }
            tasks.spawn(crate::control::serve_metrics(l, live.clone()));
        }
        if let Some(h) = next_hops {
            tasks.spawn(super::nexthop::refresh(h, live.current.clone()));
        }
        let mut tick = tokio::time::interval(SILENCE_CHECK);
        let mut reserve = tokio::time::interval(RESERVATION_TICK);
        let mut warn_state = RateLimit::default();
        let mut silence = Silence::default();
        let mut lifetimes = LifetimeWatch::default();
        let stop = loop {
            tokio::select! {
                _ = term.recv() => break Stop::Signal("SIGTERM"),
                _ = int.recv() => break Stop::Signal("SIGINT"),
                Some(e) = ended.recv() => break Stop::Worker(e),
                _ = hup.recv() => reload_from_file(&mut reloader, ike.as_mut(), path).await,
                (msg, from, here) = async {
                    match &ike {
                        Some(d) => d.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(d) = ike.as_mut() {
                        d.handle(&msg, (from, here), false, &mut reloader).await;
                    }
                }
                Some((msg, from, here)) = async {
                    match natt.as_mut() {
                        Some(r) => r.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(d) = ike.as_mut() {
                        d.handle(&msg, (from, here), true, &mut reloader).await;
                    }
                }
                // The engines' next timer (their poll_timeout), not a fixed interval.
                _ = async {
                    match &ike {
                        Some(d) => tokio::time::sleep_until(d.next_deadline()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(d) = ike.as_mut() {
                        d.tick(&mut reloader).await;
                    }
                }
                Some(r) = reload.recv() => {
                    let result = reload_with_ike(&mut reloader, ike.as_mut(), r.cfg, r.key_files)
                        .await
                        .map_err(|e| {
                            warn!("reload refused, the running configuration is unchanged: {e}");
                            Refused::Unchanged(Box::new(e))
                        });
                    let _ = r.reply.send(result);
                }
                Some(r) = rekey.recv() => {
                    let result = match ike.as_mut() {
                        Some(d) => d.rekey(r.peer.as_deref(), r.ike, &mut reloader).await,
                        None => Err(Refused::StaticOnly),
                    };
                    let _ = r.reply.send(result);
                }
                _ = reserve.tick() => extend_reservations(&reloader.live.current.load().outbound, reloader.store, &mut warn_state),
                _ = tick.tick() => {
                    let now = clock.elapsed().as_nanos() as u64;
                    let g = live.current.load();
                    silence.check(&g, now);
                    lifetimes.check(&g, now);
                }
            }
        };
        // A clean stop tells IKEv2 peers (DELETE), so they do not wait for a dead peer.
        if let Some(d) = ike.as_mut() {
            d.close(&mut reloader).await;
        }
        Ok(stop)
    })
}

/// A reload with IKEv2 peers, as one transaction: the engines' next set is planned without
/// touching today's (unchanged ones keep their SAs, which stay installed), the reload
/// validates and applies the whole configuration, and only a reload that was applied makes
/// the planned engines the running ones. A refused reload changes nothing, IKEv2 included.
async fn reload_with_ike(
    reloader: &mut Reloader<'_>,
    ike: Option<&mut IkeDriver>,
    mut cfg: Config,
    key_files: Vec<(String, std::fs::File)>,
) -> Result<String, Refused> {
    let Some(d) = ike else {
        if !cfg.ike.is_empty() {
            return Err(Refused::IkeNotStarted);
        }
        return reloader.apply(cfg, key_files).await;
    };
    let plan = d.plan(&cfg, &super::setup::outer_sources(&cfg));
    cfg.peers = d.keyed_by(&plan, &cfg.peers);
    let applied = reloader.apply(cfg, key_files).await?;
    d.commit(plan);
    // The engines' status (a peer that started over shows as such) follows at once.
    d.refresh(reloader);
    Ok(applied)
}

/// SIGHUP: re-read the configuration file and apply it. A daemon that dropped its privileges
/// usually cannot read root's configuration and key files: the message names `espip reload`,
/// which reads them as root.
async fn reload_from_file(
    reloader: &mut Reloader<'_>,
    ike: Option<&mut IkeDriver>,
    path: Option<&Path>,
) {
    let Some(path) = path else {
        warn!("SIGHUP: this daemon was not started from a configuration file; nothing to re-read");
        return;
    };
    info!(config = %path.display(), "SIGHUP: reloading");
    match Config::load(path) {
        Ok(cfg) => {
            if let Err(e) = reload_with_ike(reloader, ike, cfg, Vec::new()).await {
                warn!("reload refused, the running configuration is unchanged: {e}");
            }
        }
        Err(e) => warn!(
            "reload refused, the running configuration is unchanged: {e} (as user {}, after the privilege drop; `espip reload -c {}` reads it as root and sends it)",
            crate::sys::privdrop::current(),
            path.display()
        ),
    }
}

/// How often the control side looks for silent peers and SA lifetimes: a lifetime warning
/// comes at most this late.
pub(super) const SILENCE_CHECK: Duration = Duration::from_secs(1);

/// A peer is reported silent when packets have gone to it for this long with nothing coming
/// back (WireGuard gives up a handshake after 5 s of no answer and retries; a tunnel without
/// handshakes needs a longer view to tell silence from one-way bursts).
pub(super) const SILENT_AFTER: Duration = Duration::from_secs(30);

/// Tracks, per peer (by name: reloads add and remove peers), whether packets go out
/// unanswered, and logs each change once.
#[derive(Default)]
pub(super) struct Silence {
    peers: HashMap<String, SilenceState>,
}

#[derive(Default)]
struct SilenceState {
    last: (u64, u64),
    unanswered_since: Option<u64>,
    silent: bool,
}

impl Silence {
    fn check(&mut self, g: &Generation, now: u64) {
        let cfg = &g.cfg;
        self.peers
            .retain(|name, _| cfg.peers.iter().any(|p| &p.name == name));
        for (i, p) in cfg.peers.iter().enumerate() {
            let st = self.peers.entry(p.name.clone()).or_default();
            let s = g.outbound.peer_stats(i);
            let (tx, rx) = (s.tx_packets.load(Relaxed), s.rx_packets.load(Relaxed));
            let (last_tx, last_rx) = std::mem::replace(&mut st.last, (tx, rx));
            if rx > last_rx {
                st.unanswered_since = None;
                if std::mem::replace(&mut st.silent, false) {
                    info!(peer = %p.name, endpoint = %p.endpoint_text(), "peer heard again");
                }
            } else if tx > last_tx {
                let since = *st.unanswered_since.get_or_insert(now);
                if !st.silent && now.saturating_sub(since) >= SILENT_AFTER.as_nanos() as u64 {
                    st.silent = true;
                    let proto = match p.encap {
                        EncapSpec::Esp {
                            udp_port: Some(port),
                            ..
                        }
                        | EncapSpec::EspPending {
                            udp_port: Some(port),
                            ..
                        } => format!(
                            "ESP in UDP (port {port} there, {} here)",
                            cfg.interface.listen_port
                        ),
                        EncapSpec::Esp { .. } | EncapSpec::EspPending { .. } => {
                            "ESP (protocol 50)".into()
                        }
                        EncapSpec::IpIp => "IP-in-IP (protocols 4 and 41)".into(),
                    };
                    warn!(
                        peer = %p.name,
                        endpoint = %p.endpoint_text(),
                        "peer silent: packets sent for {} s, none received; check that its daemon runs, that keys and SPIs match, and that {proto} passes the firewalls between (expected on a one-way tunnel)",
                        SILENT_AFTER.as_secs()
                    );
                }
            } else {
                st.unanswered_since = None;
            }
        }
    }
}

/// Warns once per SA pair when 90% of a hard lifetime is used (strongSwan's soft lifetime;
/// without a key exchange the operator must install new keys), and once when it expires.
/// Keyed by the SA pair's outbound SPI and key, so new keys at a reload start over.
#[derive(Default)]
pub(super) struct LifetimeWatch {
    warned: HashMap<(String, u32), u8>,
}

impl LifetimeWatch {
    fn check(&mut self, g: &Generation, now: u64) {
        for (i, p) in g.cfg.peers.iter().enumerate() {
            let EncapSpec::Esp {
                lifetime, spi_out, ..
            } = &p.encap
            else {
                continue;
            };
            let s = g.outbound.peer_stats(i);
            let warned = self.warned.entry((p.name.clone(), *spi_out)).or_default();
            let used = [
                (
                    "packets",
                    lifetime.packets,
                    s.tx_packets.load(Relaxed).max(s.rx_packets.load(Relaxed)),
                ),
                (
                    "bytes",
                    lifetime.bytes,
                    s.tx_bytes.load(Relaxed).max(s.rx_bytes.load(Relaxed)),
                ),
                ("seconds", lifetime.seconds, now / 1_000_000_000),
            ];
            for (what, limit, n) in used {
                let Some(limit) = limit else { continue };
                let level = if n >= limit {
                    2
                } else if n.saturating_mul(10) >= limit.saturating_mul(9) {
                    1
                } else {
                    0
                };
                if level > *warned {
                    // A lifetime shorter than one check interval passes 90% and 100% between
                    // two checks: both are said, in order.
                    if level == 2 && *warned == 0 {
                        warn!(peer = %p.name, "SA pair has used 90% of its lifetime ({what}: limit {limit}), and its whole lifetime since the last check");
                    }
                    *warned = level;
                    if level == 2 {
                        warn!(peer = %p.name, "SA pair reached its lifetime ({what}: {n} of {limit}): it no longer sends or accepts; install new keys and SPIs and reload");
                    } else {
                        warn!(peer = %p.name, "SA pair has used 90% of its lifetime ({what}: {n} of {limit}); install new keys and SPIs (espip reload) before it stops");
                    }
                }
            }
        }
    }
}

pub(super) fn log_summary(g: &Generation, stats: &Stats, edge: &EdgeStats) {
    for (i, p) in g.cfg.peers.iter().enumerate() {
        let s = g.outbound.peer_stats(i);
        info!(
            peer = %p.name,
            tx_packets = s.tx_packets.load(Relaxed),
            tx_bytes = s.tx_bytes.load(Relaxed),
            rx_packets = s.rx_packets.load(Relaxed),
            rx_bytes = s.rx_bytes.load(Relaxed),
            "peer totals"
        );
    }
    let drops: Vec<String> = stats
        .drop_counts()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    info!(
        drops = %drops.join(" "),
        tun_read_errors = edge.tun_read_errors.load(Relaxed),
        tun_write_errors = edge.tun_write_errors.load(Relaxed),
        send_errors = edge.send_errors.load(Relaxed),
        bad_outer = edge.bad_outer.load(Relaxed),
        relayed = stats.relayed.load(Relaxed),
        "drop totals"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{self, TunnelSpec};

    #[test]
    fn a_peer_is_silent_after_30_s_of_unanswered_packets_and_heard_again_on_reply() {
        let cfg = Config::parse(
            "[interface]\nname = \"t0\"\n[[peer]]\nname = \"b\"\nendpoint = \"192.0.2.2\"\nallowed_ips = [\"10.0.0.2/32\"]\nmode = \"ipip\"\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let tunnel = TunnelSpec {
            relay: false,
            mtu: 1400,
        };
        let (outbound, _, _) =
            datapath::build(&cfg.peers, tunnel, crate::nat::NatTable::default()).unwrap();
        let g = Generation {
            cfg: Arc::new(cfg),
            outbound,
            sources: Vec::new(),
            sent_from: Vec::new(),
            number: 1,
        };
        let s = Duration::from_secs(1).as_nanos() as u64;
        let mut silence = Silence::default();
        let stats = g.outbound.peer_stats(0);
        let tx = |n| stats.tx_packets.fetch_add(n, Relaxed);
        let silent = |s: &Silence| s.peers["b"].silent;
        // Sending every 5 s without an answer: silent once 30 s have passed since the first
        // unanswered check, not before.
        for t in (0..=25).step_by(5) {
            tx(10);
            silence.check(&g, t * s);
            assert!(!silent(&silence), "at {t} s");
        }
        tx(10);
        silence.check(&g, 30 * s);
        assert!(silent(&silence));
        // An answer clears it.
        stats.rx_packets.fetch_add(1, Relaxed);
        silence.check(&g, 35 * s);
        assert!(!silent(&silence));
        // Idle (nothing sent) is not silence.
        for t in 8..20 {
            silence.check(&g, t * 5 * s);
            assert!(!silent(&silence));
        }
    }
}

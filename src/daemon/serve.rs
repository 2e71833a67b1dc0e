//! Phase 3: serve until a signal or a dead data-path thread. The control socket and the
//! metrics endpoint answer from atomics; once a second the peers' silence and the SA
//! lifetimes are checked.

use super::seq::{extend_reservations, RESERVATION_TICK};
use super::workers::Ended;
use crate::config::Config;
use crate::control::Live;
use crate::datapath::{EncapSpec, Stats};
use crate::sys::seqstore::SeqStore;
use crate::telemetry::EdgeStats;
use crate::telemetry::RateLimit;
use std::io;
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
pub(super) struct Listeners {
    /// The control socket.
    pub control: Option<std::os::unix::net::UnixListener>,
    /// The metrics endpoint.
    pub metrics: Option<std::net::TcpListener>,
}

/// Serve `live` until a stop signal, or until a data-path thread reports on `ended`; keep the
/// sequence reservations in `store` ahead of the SAs.
pub(super) fn serve(
    rt: &tokio::runtime::Runtime,
    live: &Arc<Live>,
    listeners: Listeners,
    store: &mut SeqStore,
    ended: &mut UnboundedReceiver<Ended>,
) -> io::Result<Stop> {
    let cfg = live.cfg.clone();
    let stats = live.stats.clone();
    let clock = live.clock;
    let Listeners { control, metrics } = listeners;
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
        let mut tick = tokio::time::interval(SILENCE_CHECK);
        let mut reserve = tokio::time::interval(RESERVATION_TICK);
        let mut warn_state = RateLimit::default();
        let mut silence = Silence::new(cfg.peers.len());
        let mut lifetimes = LifetimeWatch { warned: Vec::new() };
        loop {
            tokio::select! {
                _ = term.recv() => return Ok(Stop::Signal("SIGTERM")),
                _ = int.recv() => return Ok(Stop::Signal("SIGINT")),
                Some(e) = ended.recv() => return Ok(Stop::Worker(e)),
                _ = hup.recv() => warn!("SIGHUP: reloading is not supported; restart espip to apply a new configuration"),
                _ = reserve.tick() => extend_reservations(&live.outbound, store, &mut warn_state),
                _ = tick.tick() => {
                    let now = clock.elapsed().as_nanos() as u64;
                    silence.check(&cfg, &stats, now);
                    lifetimes.check(&cfg, &stats, now);
                }
            }
        }
    })
}

/// How often the control side looks for silent peers and SA lifetimes: a lifetime warning
/// comes at most this late.
pub(super) const SILENCE_CHECK: Duration = Duration::from_secs(1);

/// A peer is reported silent when packets have gone to it for this long with nothing coming
/// back (WireGuard gives up a handshake after 5 s of no answer and retries; a tunnel without
/// handshakes needs a longer view to tell silence from one-way bursts).
pub(super) const SILENT_AFTER: Duration = Duration::from_secs(30);

/// Tracks, per peer, whether packets go out unanswered, and logs each change once.
pub(super) struct Silence {
    last: Vec<(u64, u64)>,
    unanswered_since: Vec<Option<u64>>,
    silent: Vec<bool>,
}

impl Silence {
    fn new(n: usize) -> Silence {
        Silence {
            last: vec![(0, 0); n],
            unanswered_since: vec![None; n],
            silent: vec![false; n],
        }
    }

    fn check(&mut self, cfg: &Config, stats: &Stats, now: u64) {
        for (i, p) in cfg.peers.iter().enumerate() {
            let s = &stats.peers[i];
            let (tx, rx) = (s.tx_packets.load(Relaxed), s.rx_packets.load(Relaxed));
            let (last_tx, last_rx) = std::mem::replace(&mut self.last[i], (tx, rx));
            if rx > last_rx {
                self.unanswered_since[i] = None;
                if std::mem::replace(&mut self.silent[i], false) {
                    info!(peer = %p.name, endpoint = %p.endpoint, "peer heard again");
                }
            } else if tx > last_tx {
                let since = *self.unanswered_since[i].get_or_insert(now);
                if !self.silent[i] && now.saturating_sub(since) >= SILENT_AFTER.as_nanos() as u64 {
                    self.silent[i] = true;
                    let proto = match p.encap {
                        EncapSpec::Esp {
                            udp_port: Some(port),
                            ..
                        } => format!(
                            "ESP in UDP (port {port} there, {} here)",
                            cfg.interface.listen_port
                        ),
                        EncapSpec::Esp { .. } => "ESP (protocol 50)".into(),
                        EncapSpec::IpIp => "IP-in-IP (protocols 4 and 41)".into(),
                    };
                    warn!(
                        peer = %p.name,
                        endpoint = %p.endpoint,
                        "peer silent: packets sent for {} s, none received; check that its daemon runs, that keys and SPIs match, and that {proto} passes the firewalls between (expected on a one-way tunnel)",
                        SILENT_AFTER.as_secs()
                    );
                }
            } else {
                self.unanswered_since[i] = None;
            }
        }
    }
}

/// Warns once per SA pair when 90% of a hard lifetime is used (strongSwan's soft lifetime;
/// without a key exchange the operator must install new keys), and once when it expires.
pub(super) struct LifetimeWatch {
    warned: Vec<u8>,
}

impl LifetimeWatch {
    fn check(&mut self, cfg: &Config, stats: &Stats, now: u64) {
        self.warned.resize(cfg.peers.len(), 0);
        for (i, p) in cfg.peers.iter().enumerate() {
            let EncapSpec::Esp { lifetime, .. } = &p.encap else {
                continue;
            };
            let s = &stats.peers[i];
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
                if level > self.warned[i] {
                    // A lifetime shorter than one check interval passes 90% and 100% between
                    // two checks: both are said, in order.
                    if level == 2 && self.warned[i] == 0 {
                        warn!(peer = %p.name, "SA pair has used 90% of its lifetime ({what}: limit {limit}), and its whole lifetime since the last check");
                    }
                    self.warned[i] = level;
                    if level == 2 {
                        warn!(peer = %p.name, "SA pair reached its lifetime ({what}: {n} of {limit}): it no longer sends or accepts; install new keys and SPIs and restart");
                    } else {
                        warn!(peer = %p.name, "SA pair has used 90% of its lifetime ({what}: {n} of {limit}); install new keys and SPIs before it stops");
                    }
                }
            }
        }
    }
}

pub(super) fn log_summary(cfg: &Config, stats: &Stats, edge: &EdgeStats) {
    for (p, s) in cfg.peers.iter().zip(&stats.peers) {
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
        let (_, _, stats) =
            datapath::build(&cfg.peers, tunnel, crate::nat::NatTable::default()).unwrap();
        let s = Duration::from_secs(1).as_nanos() as u64;
        let mut silence = Silence::new(1);
        let tx = |n| stats.peers[0].tx_packets.fetch_add(n, Relaxed);
        // Sending every 5 s without an answer: silent once 30 s have passed since the first
        // unanswered check, not before.
        for t in (0..=25).step_by(5) {
            tx(10);
            silence.check(&cfg, &stats, t * s);
            assert!(!silence.silent[0], "at {t} s");
        }
        tx(10);
        silence.check(&cfg, &stats, 30 * s);
        assert!(silence.silent[0]);
        // An answer clears it.
        stats.peers[0].rx_packets.fetch_add(1, Relaxed);
        silence.check(&cfg, &stats, 35 * s);
        assert!(!silence.silent[0]);
        // Idle (nothing sent) is not silence.
        for t in 8..20 {
            silence.check(&cfg, &stats, t * 5 * s);
            assert!(!silence.silent[0]);
        }
    }
}

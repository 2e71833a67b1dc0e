//! `espip run`: set up the TUN, raw sockets and routes, run the data path, tear down on a
//! signal.
//!
//! Threads (see docs/architecture.md for the measurements behind the choice):
//! - the main thread runs a current-thread tokio runtime for the control side (rtnetlink,
//!   signals);
//! - a TX thread: TUN reads (drained up to a batch of 64) -> `Outbound::process` -> one
//!   `sendmmsg` per raw socket and batch;
//! - an RX thread: `recvmmsg` batches from the raw sockets -> `Inbound::process` -> TUN writes.
//!
//! Each thread owns its half of the data path, so the hot path takes no lock. A stop is an
//! eventfd both threads poll.

use crate::buf::{PacketBuf, MAX_PACKET};
use crate::config::Config;
use crate::control::{ControlSocket, Live};
use crate::datapath::{self, DropReason, EncapSpec, Inbound, Outbound, Stats, TunnelSpec, Verdict};
use crate::sys::capture::{Recorder, Tap, Taps};
use crate::sys::raw::{strip_ipv4_header, RawSocket};
use crate::sys::safefs::PrivateDir;
use crate::sys::seqstore::{SeqError, SeqStore, RESERVE};
use crate::sys::tun::Tun;
use crate::sys::udp::UdpEncapSocket;
use crate::telemetry::{EdgeStats, RateLimit};
use crate::wire::ip::{PROTO_ESP, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};

/// Packets per batch. Tuning constant: 64 amortises a syscall over enough packets that its
/// cost disappears against AEAD, and keeps a batch in L2 cache (64 x 64 KiB buffers are
/// allocated once per thread, but only the touched bytes are resident).
pub const BATCH: usize = 64;

/// TX buffers: a batch plus the segments of one more TSO packet (65535 / 536-byte MSS = 123).
const TX_BUFS: usize = BATCH + 128;

/// Batches between two checks of the sequence reservations (see `tx_loop`).
const RESERVATION_CHECK: u64 = 256;
const _: () = assert!(RESERVATION_CHECK * BATCH as u64 <= RESERVE / 2);

/// How often the control side looks for silent peers and SA lifetimes: a lifetime warning
/// comes at most this late.
const SILENCE_CHECK: Duration = Duration::from_secs(1);
/// A peer is reported silent when packets have gone to it for this long with nothing coming
/// back (WireGuard gives up a handshake after 5 s of no answer and retries; a tunnel without
/// handshakes needs a longer view to tell silence from one-way bursts).
const SILENT_AFTER: Duration = Duration::from_secs(30);

/// Tracks, per peer, whether packets go out unanswered, and logs each change once.
struct Silence {
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
struct LifetimeWatch {
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

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// TUN creation.
    #[error(transparent)]
    Tun(#[from] crate::sys::tun::TunError),
    /// Raw socket creation.
    #[error("cannot open a raw IP socket for protocol {protocol}: {source} (run as root or with CAP_NET_RAW)")]
    RawSocket {
        /// IP protocol.
        protocol: u8,
        /// Why.
        source: io::Error,
    },
    /// The ESP-in-UDP socket.
    #[error("cannot open UDP port {port} for ESP in UDP: {source}; another program (an IKE daemon such as strongSwan's charon, or a second espip) may hold it: stop it or set interface.listen_port")]
    UdpSocket {
        /// The port.
        port: u16,
        /// Why.
        source: io::Error,
    },
    /// Interface configuration.
    #[error("configuring the interface: {0}")]
    Netlink(#[from] crate::sys::netlink::NetlinkError),
    /// Path MTU lookup.
    #[error("no route to peer {peer:?} endpoint {endpoint} ({source}); add a route to it or set interface.mtu")]
    NoRouteToPeer {
        /// Peer name.
        peer: String,
        /// Endpoint.
        endpoint: IpAddr,
        /// Why.
        source: io::Error,
    },
    /// An alias prefix is on-link.
    #[error(
        "nat.map alias {alias} is on-link ({found}); choose an alias prefix no interface uses"
    )]
    AliasOnLink {
        /// The alias prefix.
        alias: crate::prefix::Prefix,
        /// The overlapping local networks.
        found: String,
    },
    /// Rules.
    #[error(transparent)]
    Rules(#[from] crate::sys::iptables::RulesError),
    /// Data path build.
    #[error(transparent)]
    Build(#[from] datapath::BuildError),
    /// The state directory (root's own).
    #[error("interface.state_dir: {1}")]
    State(std::path::PathBuf, io::Error),
    /// The sequence number state of a key.
    #[error(transparent)]
    Seq(#[from] SeqError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The capture directory.
    #[error("capture.dir {0}: {1}; choose a directory root can write")]
    Capture(std::path::PathBuf, io::Error),
    /// The metrics address.
    #[error("metrics.listen {0}: {1}; choose a free port on an address of this host")]
    Metrics(std::net::SocketAddr, io::Error),
    /// Becoming the configured user.
    #[error("interface.user {0:?}: {1}; create the user (useradd --system --no-create-home {0}), leave user out to use espip's own, or set user = \"root\"")]
    User(String, io::Error),
    /// Dropping privileges failed.
    #[error("dropping privileges to {0:?}: {1}")]
    Drop(String, io::Error),
    /// `interface.local` is not an address of this host.
    #[error("{}", crate::sys::not_local_message(*.0))]
    NotLocal(IpAddr),
    /// Anything else of the OS.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
}

/// The tunnel MTU: the configured one, or the smallest path MTU to any endpoint minus the
/// encapsulation overhead.
pub fn tunnel_mtu(cfg: &Config) -> Result<u16, DaemonError> {
    if let Some(m) = cfg.interface.mtu {
        return Ok(m);
    }
    let mut mtu = u16::MAX;
    for p in &cfg.peers {
        let path = crate::sys::path_mtu(p.endpoint, cfg.interface.local).map_err(|source| {
            DaemonError::NoRouteToPeer {
                peer: p.name.clone(),
                endpoint: p.endpoint,
                source,
            }
        })?;
        mtu = mtu.min(datapath::inner_mtu(path, &p.encap));
    }
    let floor = if cfg.interface.addresses.iter().any(|a| a.addr.is_ipv6()) {
        crate::config::MIN_MTU_V6
    } else {
        crate::config::MIN_MTU_V4
    };
    Ok(mtu.max(floor))
}

/// Raise the soft descriptor limit to the hard one (systemd's default soft limit is 1024): a
/// burst of control or metrics clients must not starve the daemon (the data path itself never
/// opens a descriptor after setup).
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                debug!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
    }
}

/// Run the daemon in the foreground until SIGINT or SIGTERM.
pub fn run(cfg: Config) -> Result<(), DaemonError> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    if let Some(l) = cfg.interface.local {
        if !crate::sys::is_local_address(l) {
            return Err(DaemonError::NotLocal(l));
        }
    }
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DaemonError::Os("tokio runtime", e))?;
    let mtu = tunnel_mtu(&cfg)?;
    let local_v4 = match cfg.interface.local {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    };
    // Sockets first: a missing privilege fails before any device exists.
    let mut sockets = Vec::new();
    let need_esp = cfg
        .peers
        .iter()
        .any(|p| matches!(p.encap, EncapSpec::Esp { udp_port: None, .. }));
    let need_udp = cfg.peers.iter().any(|p| {
        matches!(
            p.encap,
            EncapSpec::Esp {
                udp_port: Some(_),
                ..
            }
        )
    });
    let need_ipip = cfg.peers.iter().any(|p| matches!(p.encap, EncapSpec::IpIp));
    let mut protocols = Vec::new();
    if need_esp {
        protocols.push(PROTO_ESP);
    }
    if need_ipip {
        protocols.extend([PROTO_IPIP, PROTO_IPV6]);
    }
    for protocol in protocols {
        let s = RawSocket::open(protocol, local_v4)
            .map_err(|source| DaemonError::RawSocket { protocol, source })?;
        sockets.push(s);
    }
    let udp = if need_udp {
        let port = cfg.interface.listen_port;
        Some(
            UdpEncapSocket::open(local_v4, port)
                .map_err(|source| DaemonError::UdpSocket { port, source })?,
        )
    } else {
        None
    };
    // Root's own state (sysctls saved, sequence numbers): a directory no other user can write.
    let state = PrivateDir::open(&cfg.interface.state_dir)
        .map_err(|e| DaemonError::State(cfg.interface.state_dir.clone(), e))?;
    // The control socket second: it is also the lock against a second daemon for the same
    // interface (a socket left by a killed daemon does not answer and is replaced).
    let mut control = ControlSocket::bind(&cfg.interface.control, &cfg.interface.name)?;
    // The user to become after setup: an unknown one fails now, before anything exists.
    let run_as = match &cfg.interface.user {
        Some(u) => Some(
            crate::sys::privdrop::lookup_or_create(u)
                .map_err(|e| DaemonError::User(u.clone(), e))?,
        ),
        None => None,
    };

    let metrics = match cfg.metrics {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr).map_err(|e| DaemonError::Metrics(addr, e))?;
            l.set_nonblocking(true)
                .map_err(|e| DaemonError::Metrics(addr, e))?;
            Some(l)
        }
        None => None,
    };
    for m in &cfg.nat.maps {
        let found = crate::sys::iptables::on_link_overlaps(m.alias, &cfg.interface.name);
        if !found.is_empty() {
            return Err(DaemonError::AliasOnLink {
                alias: m.alias,
                found: found.join(", "),
            });
        }
    }
    let stale = crate::sys::sysctl::restore_stale(&state, &cfg.interface.name);
    if !stale.done.is_empty() {
        info!(restored = %stale.done.join(" "), "restored kernel settings a previous run left changed");
    }
    for r in &stale.refused {
        warn!(line = %r.escape_debug(), "state file asked for a kernel setting espip never changes; not written");
    }
    let tun = Tun::create(&cfg.interface.name, cfg.interface.offload)?;
    let routes = cfg.routes();
    let added = rt.block_on(crate::sys::netlink::configure(
        tun.name(),
        mtu,
        &cfg.interface.addresses,
        &routes,
    ))?;
    let mut settings = Vec::new();
    if cfg.interface.forward {
        settings.push(("net.ipv4.ip_forward".to_string(), "1".to_string()));
    }
    if let Some(rp) = cfg.interface.rp_filter {
        let v = rp.value();
        // The effective value is the larger of "all" and the interface's own: a looser mode on
        // the TUN needs "all" lowered as well (restored on stop).
        let all: u8 = crate::sys::sysctl::value("net.ipv4.conf.all.rp_filter")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if all > v || (v == 2 && all == 1) {
            settings.push(("net.ipv4.conf.all.rp_filter".to_string(), v.to_string()));
        }
        settings.push((
            format!("net.ipv4.conf.{}.rp_filter", tun.name()),
            v.to_string(),
        ));
    }
    let _sysctls = if settings.is_empty() {
        None
    } else {
        let g = crate::sys::sysctl::apply(&state, tun.name(), &settings)
            .map_err(|e| DaemonError::Os("changing kernel settings", e))?;
        info!(
            set = %settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "),
            "kernel settings changed (restored on stop)"
        );
        Some(g)
    };
    let tunnel = TunnelSpec {
        relay: cfg.interface.forward,
        mtu,
    };
    let (mut outbound, inbound, stats) = datapath::build(&cfg.peers, tunnel, cfg.nat_table())?;
    // The outer source of each peer's packets (for the outer tap and the Wireshark SA lines).
    let sources: Vec<IpAddr> = cfg
        .peers
        .iter()
        .map(|p| {
            crate::sys::source_for(p.endpoint, cfg.interface.local)
                .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        })
        .collect();
    let mut store = SeqStore::open(&cfg.interface.state_dir, &cfg.interface.name)
        .map_err(|e| DaemonError::State(cfg.interface.state_dir.clone(), e))?;
    reserve_initial(&mut outbound, &mut store)?;
    drop(state);
    // Rules last: a failure above leaves nothing in netfilter. Stale rules of a killed daemon
    // are removed first (the apply list starts with the removal).
    let _rules = if crate::rules::daemon_applies(&cfg) {
        let guard = RulesGuard(cfg.interface.name.clone());
        // On failure the guard's drop removes whatever part was installed.
        let n = crate::sys::iptables::run(&crate::rules::apply(&cfg))?;
        info!(chain = %crate::rules::nat_chain(&cfg.interface.name), commands = n, "netfilter rules applied");
        Some(guard)
    } else {
        if cfg.nat.rules == crate::config::RulesMode::Print && !cfg.nat.maps.is_empty() {
            info!(
                "[nat] rules = \"print\": install these rules yourself:\n{}",
                crate::rules::script(&cfg, false)
            );
        }
        None
    };
    // The capture directory is the only one the unprivileged daemon writes: espip creates it
    // for that user, or uses it if it already is that user's; it never takes one over.
    if let Some(c) = &cfg.capture {
        match &run_as {
            Some(t) => crate::sys::privdrop::own_dir(&c.dir, t),
            None => crate::sys::privdrop::own_dir(
                &c.dir,
                &crate::sys::privdrop::Target {
                    name: "root".into(),
                    uid: nix::unistd::geteuid().as_raw(),
                    gid: nix::unistd::getegid().as_raw(),
                },
            ),
        }
        .map_err(|e| DaemonError::Capture(c.dir.clone(), e))?;
    }
    // Setup is done: become the configured user, keeping CAP_NET_ADMIN and CAP_NET_RAW for the
    // cleanup on stop (rules, sysctls). Before any thread is spawned: capabilities are per
    // thread. The directories the daemon still writes are handed over first.
    if let Some(t) = &run_as {
        crate::sys::privdrop::drop_to(t).map_err(|e| DaemonError::Drop(t.name.clone(), e))?;
        // The user must be able to write the capture directory (a parent directory it cannot
        // search would stop the captures at the first rotation).
        if let Some(c) = &cfg.capture {
            let probe = c.dir.join(format!(".{}.probe", cfg.interface.name));
            std::fs::File::create(&probe)
                .and_then(|_| std::fs::remove_file(&probe))
                .map_err(|e| {
                    DaemonError::Capture(
                        c.dir.clone(),
                        io::Error::new(
                            e.kind(),
                            format!(
                                "after dropping privileges to {} it cannot write there: {e} (are all parent directories searchable by it?)",
                                t.name
                            ),
                        ),
                    )
                })?;
        }
        info!(user = %t.name, now = %crate::sys::privdrop::current(), "privileges dropped (kept CAP_NET_ADMIN, CAP_NET_RAW)");
    }
    let taps = match &cfg.capture {
        Some(c) => Some(
            Taps::start(c, &cfg.interface.name)
                .map_err(|e| DaemonError::Capture(c.dir.clone(), e))?,
        ),
        None => None,
    };
    info!(
        interface = tun.name(),
        mtu,
        addresses = ?cfg.interface.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        routes = ?added.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "interface up"
    );
    for p in &cfg.peers {
        match &p.encap {
            EncapSpec::Esp {
                cipher,
                spi_out,
                spi_in,
                replay_window,
                esn,
                udp_port,
                ..
            } => info!(
                peer = %p.name,
                endpoint = %p.endpoint,
                transport = match udp_port {
                    Some(port) => format!("ESP in UDP to port {port} (from port {})", cfg.interface.listen_port),
                    None => "ESP (protocol 50)".to_string(),
                },
                cipher = cipher.name(),
                spi_out = format!("{spi_out:#010x}"),
                spi_in = format!("{spi_in:#010x}"),
                replay_window,
                esn,
                "SA pair installed"
            ),
            EncapSpec::IpIp => info!(peer = %p.name, endpoint = %p.endpoint, "ipip peer installed"),
        }
    }

    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| DaemonError::Os("eventfd", e.into()))?,
    );
    let edge = Arc::new(EdgeStats::default());
    let socket_inodes: Vec<u64> = sockets
        .iter()
        .filter_map(crate::sys::kstats::inode)
        .chain(udp.as_ref().and_then(crate::sys::kstats::inode))
        .collect();
    let tun = Arc::new(tun);
    let sockets = Arc::new(sockets);
    let udp = Arc::new(udp);
    // The TX thread takes the lock once per batch; the RX thread only when a batch holds
    // packets to relay between peers (a hub). Uncontended otherwise.
    let outbound = Arc::new(Mutex::new(outbound));
    let clock = Instant::now();
    let started = SystemTime::now();
    let recorder = || taps.as_ref().map_or_else(Recorder::off, Taps::recorder);
    let sent_from: Arc<Vec<(Ipv4Addr, Ipv4Addr)>> = Arc::new(
        cfg.peers
            .iter()
            .zip(&sources)
            .filter_map(|(p, s)| match (p.endpoint, s) {
                (IpAddr::V4(e), IpAddr::V4(s)) => Some((e, *s)),
                _ => None,
            })
            .collect(),
    );
    let handles = EdgeHandles {
        tun: tun.clone(),
        sockets: sockets.clone(),
        udp: udp.clone(),
        stop: stop.clone(),
        edge: edge.clone(),
        sent_from,
    };
    let tx = {
        let h = handles.clone();
        let outbound = outbound.clone();
        let mut rec = recorder();
        std::thread::Builder::new()
            .name("espip-tx".into())
            .spawn(move || tx_loop(&outbound, &h.edges(), &mut rec, clock, store))
            .map_err(|e| DaemonError::Os("spawn TX thread", e))?
    };
    let rx = {
        let h = handles;
        let out = outbound.clone();
        let mut rec = recorder();
        std::thread::Builder::new()
            .name("espip-rx".into())
            .spawn(move || rx_loop(inbound, &out, &h.edges(), &mut rec, clock))
            .map_err(|e| DaemonError::Os("spawn RX thread", e))?
    };
    let cfg = Arc::new(cfg);
    let live = Arc::new(Live {
        cfg: cfg.clone(),
        mtu,
        stats: stats.clone(),
        edge: edge.clone(),
        outbound: outbound.clone(),
        capture: taps.as_ref().map(|t| (t.stats(), t.paths().to_vec())),
        sources,
        clock,
        started,
        socket_inodes,
    });
    if let Some(t) = &taps {
        info!(files = %t.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "), "capture taps on");
    }
    info!(interface = %cfg.interface.name, peers = cfg.peers.len(), control = %control.path().display(), "espip ready");

    let signal = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = control.take() {
            tasks.spawn(crate::control::serve_control(l, live.clone()));
        }
        if let Some(l) = metrics {
            if let Ok(addr) = l.local_addr() {
                info!(%addr, "metrics served at http://{addr}/metrics");
            }
            tasks.spawn(crate::control::serve_metrics(l, live.clone()));
        }
        let mut tick = tokio::time::interval(SILENCE_CHECK);
        let mut silence = Silence::new(cfg.peers.len());
        let mut lifetimes = LifetimeWatch { warned: Vec::new() };
        loop {
            tokio::select! {
                _ = term.recv() => return Ok::<_, io::Error>("SIGTERM"),
                _ = int.recv() => return Ok("SIGINT"),
                _ = hup.recv() => warn!("SIGHUP: reloading is not supported; restart espip to apply a new configuration"),
                _ = tick.tick() => {
                    let now = clock.elapsed().as_nanos() as u64;
                    silence.check(&cfg, &stats, now);
                    lifetimes.check(&cfg, &stats, now);
                }
            }
        }
    });
    let signal = signal.map_err(|e| DaemonError::Os("signal handler", e))?;
    info!(signal, "stopping");
    let _ = stop.write(1);
    if let Ok(mut store) = tx.join() {
        record_final(
            &outbound.lock().unwrap_or_else(|e| e.into_inner()),
            &mut store,
        );
    }
    let _ = rx.join();
    if let Some(t) = taps {
        t.finish();
    }
    log_summary(&cfg, &stats, &edge);
    drop(_rules);
    drop(_sysctls);
    drop(tun);
    drop(control);
    info!(interface = %cfg.interface.name, "stopped; TUN device and its routes removed");
    Ok(())
}

/// What each data-path thread owns a share of; [`EdgeHandles::edges`] lends it out.
#[derive(Clone)]
struct EdgeHandles {
    tun: Arc<Tun>,
    sockets: Arc<Vec<RawSocket>>,
    udp: Arc<Option<UdpEncapSocket>>,
    stop: Arc<EventFd>,
    edge: Arc<EdgeStats>,
    sent_from: Arc<Vec<(Ipv4Addr, Ipv4Addr)>>,
}

impl EdgeHandles {
    fn edges(&self) -> Edges<'_> {
        Edges {
            tun: &self.tun,
            sockets: &self.sockets,
            udp: self.udp.as_ref().as_ref(),
            stop: &self.stop,
            edge: &self.edge,
            sent_from: &self.sent_from,
        }
    }
}

/// The kernel objects and shared counters a data-path thread works with.
struct Edges<'a> {
    tun: &'a Tun,
    sockets: &'a [RawSocket],
    udp: Option<&'a UdpEncapSocket>,
    stop: &'a EventFd,
    edge: &'a EdgeStats,
    /// (endpoint, source) of every IPv4 peer, for the outer tap's synthesised headers.
    sent_from: &'a [(Ipv4Addr, Ipv4Addr)],
}

/// Wrap the packets of a batch that are for another peer (hub relaying) and send them.
fn relay_batch(
    shared_out: &Mutex<Outbound>,
    bufs: &mut [PacketBuf],
    relay: &[bool],
    e: &Edges,
    rec: &mut Recorder,
    now: u64,
) {
    let mut verdicts = [Verdict::Drop(DropReason::Dummy); BATCH];
    {
        let mut out = shared_out.lock().unwrap_or_else(|e| e.into_inner());
        for (i, b) in bufs.iter_mut().enumerate() {
            if relay[i] {
                verdicts[i] = out.process(b, now);
            }
        }
    }
    for (i, b) in bufs.iter_mut().enumerate() {
        if verdicts[i] == Verdict::ToTun {
            rec.record(Tap::Inner, b.as_slice());
            if e.tun.write_packet(b, 0).is_err() {
                e.edge.tun_write_errors.fetch_add(1, Relaxed);
            }
        }
    }
    send_verdicts(bufs, &verdicts[..bufs.len()], e, rec);
}

/// Send every `Send` verdict of a batch: one `sendmmsg` per raw socket, and the ESP-in-UDP
/// datagrams through the UDP socket (trains of one size as single GSO messages).
fn send_verdicts(
    bufs: &[PacketBuf],
    verdicts: &[Verdict],
    e: &Edges,
    rec: &mut Recorder,
) -> Option<io::Error> {
    let source = |dst: &Ipv4Addr| {
        e.sent_from
            .iter()
            .find(|(ep, _)| ep == dst)
            .map_or(Ipv4Addr::UNSPECIFIED, |(_, s)| *s)
    };
    if rec.wants(Tap::Outer) {
        for (b, v) in bufs.iter().zip(verdicts) {
            match v {
                Verdict::Send {
                    endpoint: IpAddr::V4(dst),
                    protocol: PROTO_UDP,
                    port,
                } => {
                    let from = SocketAddrV4::new(source(dst), e.udp.map_or(0, |u| u.port()));
                    rec.record_udp(from, SocketAddrV4::new(*dst, *port), b.as_slice());
                }
                Verdict::Send {
                    endpoint: IpAddr::V4(dst),
                    protocol,
                    ..
                } => rec.record_sent(source(dst), *dst, *protocol, b.as_slice()),
                _ => {}
            }
        }
    }
    let mut last_err = None;
    for s in e.sockets {
        let proto = s.protocol();
        let is_ours = |v: &Verdict| matches!(v, Verdict::Send { protocol, endpoint: IpAddr::V4(_), .. } if *protocol == proto);
        let want = verdicts.iter().filter(|v| is_ours(v)).count();
        if want == 0 {
            continue;
        }
        let pending = bufs.iter().zip(verdicts).filter_map(|(b, v)| match v {
            Verdict::Send {
                endpoint: IpAddr::V4(dst),
                protocol,
                ..
            } if *protocol == proto => Some((b.as_slice(), *dst)),
            _ => None,
        });
        match s.send_batch(pending) {
            Ok(sent) => {
                e.edge
                    .send_errors
                    .fetch_add((want - sent.min(want)) as u64, Relaxed);
            }
            Err(err) => {
                e.edge.send_errors.fetch_add(want as u64, Relaxed);
                last_err = Some(err);
            }
        }
    }
    if let Some(u) = e.udp {
        let mut items = [(&[][..], SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)); TX_BUFS];
        let mut want = 0;
        for (b, v) in bufs.iter().zip(verdicts) {
            if let Verdict::Send {
                endpoint: IpAddr::V4(dst),
                protocol: PROTO_UDP,
                port,
            } = v
            {
                items[want] = (b.as_slice(), SocketAddrV4::new(*dst, *port));
                want += 1;
            }
        }
        if want > 0 {
            let sent = u.send_datagrams(&items[..want]);
            e.edge
                .send_errors
                .fetch_add((want - sent.datagrams.min(want)) as u64, Relaxed);
            e.edge.udp_gso_sends.fetch_add(sent.trains as u64, Relaxed);
            if sent.error.is_some() {
                last_err = sent.error;
            }
        }
    }
    last_err
}

/// Resume every outbound SA after its saved reservation (1 for a new key) and reserve the
/// first block before anything is sent.
fn reserve_initial(out: &mut Outbound, store: &mut SeqStore) -> Result<(), SeqError> {
    for idx in 0..out.peer_count() {
        let Some((spi, fp, _, _)) = out.sa_reservation(idx) else {
            continue;
        };
        let fp = fp.to_string();
        let start = store.load(spi, &fp)?.map_or(1, |r| r.saturating_add(1));
        let limit = start.saturating_add(RESERVE - 1);
        store.save(&fp, limit)?;
        out.set_next_seq(idx, start);
        out.set_limit(idx, limit);
        if start > 1 {
            info!(
                spi = format!("{spi:#010x}"),
                start, "outbound SA resumes after its saved sequence number"
            );
        }
    }
    Ok(())
}

/// Extend reservations that are half used. A failed write leaves the limit where it is, so the
/// SA stops at the end of what is on disk (`seq_unreserved`) rather than risk a repeat.
fn extend_reservations(out: &mut Outbound, store: &mut SeqStore, warn_state: &mut RateLimit) {
    for idx in 0..out.peer_count() {
        let Some((spi, fp, next, limit)) = out.sa_reservation(idx) else {
            continue;
        };
        if next.saturating_add(RESERVE / 2) <= limit {
            continue;
        }
        let fp = fp.to_string();
        let new = limit.saturating_add(RESERVE);
        match store.save(&fp, new) {
            Ok(()) => out.set_limit(idx, new),
            Err(e) if warn_state.ready() => warn!(
                spi = format!("{spi:#010x}"),
                "cannot extend the sequence number reservation: {e}; the SA stops at {limit}"
            ),
            Err(_) => {}
        }
    }
}

/// On a clean stop, record the last sequence number actually sent.
fn record_final(out: &Outbound, store: &mut SeqStore) {
    for idx in 0..out.peer_count() {
        if let Some((spi, fp, next, _)) = out.sa_reservation(idx) {
            if let Err(e) = store.save(fp, next.saturating_sub(1)) {
                warn!("recording the last sequence number of SA {spi:#010x}: {e}");
            }
        }
    }
}

/// Removes espip's rules when dropped (stop, or an error after they were applied).
struct RulesGuard(String);

impl Drop for RulesGuard {
    fn drop(&mut self) {
        match crate::sys::iptables::run(&crate::rules::remove(&self.0)) {
            Ok(_) => info!(chain = %crate::rules::nat_chain(&self.0), "netfilter rules removed"),
            Err(e) => warn!("removing netfilter rules: {e}"),
        }
    }
}

fn log_summary(cfg: &Config, stats: &Stats, edge: &EdgeStats) {
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

/// Wait until one of `fds` is readable. `fds[0]` is the stop eventfd. Returns false when the
/// thread must stop (stop requested, or poll failed, which is logged).
fn wait(fds: &mut [PollFd], what: &str) -> bool {
    loop {
        match poll(fds, PollTimeout::NONE) {
            Ok(_) => break,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                warn!("poll on {what} failed: {e}; the thread stops");
                return false;
            }
        }
    }
    !fds[0]
        .revents()
        .is_some_and(|r| r.intersects(PollFlags::POLLIN))
}

fn tx_loop(
    shared: &Mutex<Outbound>,
    e: &Edges,
    rec: &mut Recorder,
    clock: Instant,
    mut store: SeqStore,
) -> SeqStore {
    let mut warn_state = RateLimit::default();
    let mut batches: u64 = 0;
    // Room for a full batch plus the segments of one more TSO packet (64 KB at an MSS of 536).
    let mut bufs: Vec<PacketBuf> = (0..TX_BUFS).map(|_| PacketBuf::new(MAX_PACKET)).collect();
    let mut verdicts = [Verdict::Drop(DropReason::Dummy); TX_BUFS];
    let mut warn_read = RateLimit::default();
    let mut warn_send = RateLimit::default();
    let mut warn_exhausted = RateLimit::default();
    loop {
        let mut fds = [
            PollFd::new(e.stop.as_fd(), PollFlags::POLLIN),
            PollFd::new(e.tun.as_fd(), PollFlags::POLLIN),
        ];
        if !wait(&mut fds, "the TUN") {
            return store;
        }
        let now = clock.elapsed().as_nanos() as u64;
        rec.begin_batch();
        let mut n = 0;
        while n < BATCH {
            bufs[n].reset();
            match e.tun.recv(bufs[n].read_area()) {
                Ok(len) => {
                    bufs[n].set_len(len);
                    let got = if e.tun.vnet() {
                        offload_in(&mut bufs[n..], e.edge)
                    } else {
                        1
                    };
                    for b in &bufs[n..n + got] {
                        rec.record(Tap::Inner, b.as_slice());
                    }
                    n += got;
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    e.edge.tun_read_errors.fetch_add(1, Relaxed);
                    if warn_read.ready() {
                        warn!("reading the TUN failed: {err}");
                    }
                    break;
                }
            }
        }
        let mut out = shared.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..n {
            verdicts[i] = out.process(&mut bufs[i], now);
            match verdicts[i] {
                Verdict::ToTun => {
                    rec.record(Tap::Inner, bufs[i].as_slice());
                    if e.tun.write_packet(&mut bufs[i], 0).is_err() {
                        e.edge.tun_write_errors.fetch_add(1, Relaxed);
                    }
                }
                Verdict::Drop(DropReason::SeqUnreserved) if warn_exhausted.ready() => warn!(
                    "an outbound SA reached the end of its persisted sequence reservation; \
                     packets are dropped until the state directory can be written"
                ),
                Verdict::Drop(DropReason::SeqExhausted) if warn_exhausted.ready() => warn!(
                    "an outbound SA has used every sequence number (2^32 without esn) and stopped sending; \
                     install new keys and SPIs (or enable esn) and restart"
                ),
                _ => {}
            }
        }
        // A batch sends at most BATCH packets per SA, so checking every RESERVATION_CHECK
        // batches consumes at most 16384 numbers between checks, far inside the half block
        // (2^21) of margin, and keeps the per-peer loop off most batches.
        if n > 0 {
            batches = batches.wrapping_add(1);
            if batches % RESERVATION_CHECK == 0 {
                extend_reservations(&mut out, &mut store, &mut warn_state);
            }
        }
        drop(out);
        if let Some(err) = send_verdicts(&bufs[..n], &verdicts[..n], e, rec) {
            if warn_send.ready() {
                warn!("sending packets failed: {err}");
            }
        }
        rec.flush();
    }
}

/// Turn the TUN packet in `bufs[0]` (with its `virtio_net_hdr`) into plain packets at the
/// front of `bufs`: itself with a completed checksum, or its TSO segments. Returns how many.
fn offload_in(bufs: &mut [PacketBuf], edge: &EdgeStats) -> usize {
    use crate::gso::{self, VnetHdr};
    let Some(h) = VnetHdr::parse(bufs[0].as_slice()) else {
        edge.offload_errors.fetch_add(1, Relaxed);
        return 0;
    };
    let _ = bufs[0].pull_front(gso::VNET_HDR_LEN);
    let result = match h.gso_type & !gso::GSO_ECN {
        gso::GSO_NONE if h.flags & gso::F_NEEDS_CSUM != 0 => gso::complete_checksum(
            bufs[0].as_mut_slice(),
            usize::from(h.csum_start),
            usize::from(h.csum_offset),
        )
        .map(|()| 1),
        gso::GSO_NONE => Ok(1),
        gso::GSO_TCPV4 | gso::GSO_TCPV6 => {
            let (src, rest) = bufs.split_at_mut(1);
            let r = gso::segment_tcp(src[0].as_slice(), usize::from(h.gso_size), rest);
            if let Ok(k) = r {
                // The segments replace the large packet.
                bufs[..=k].rotate_left(1);
                edge.tso_packets.fetch_add(1, Relaxed);
            }
            r
        }
        gso::GSO_UDP_L4 => {
            let (src, rest) = bufs.split_at_mut(1);
            let r = gso::segment_udp(src[0].as_slice(), usize::from(h.gso_size), rest);
            if let Ok(k) = r {
                bufs[..=k].rotate_left(1);
                edge.uso_packets.fetch_add(1, Relaxed);
            }
            r
        }
        _ => Err(gso::GsoError::Unsupported),
    };
    match result {
        Ok(k) => k,
        Err(_) => {
            edge.offload_errors.fetch_add(1, Relaxed);
            0
        }
    }
}

/// Write the packets `bufs[i]` for `i` in `deliver` to the TUN, in order. With TUN offloads,
/// consecutive TCP segments of one flow go as one large packet (GRO, `crate::gro`): the new
/// headers and each segment's payload in one `writev`, no copy.
fn write_coalesced(
    tun: &Tun,
    bufs: &mut [PacketBuf],
    deliver: &[usize],
    edge: &EdgeStats,
) -> io::Result<()> {
    use crate::gro;
    let mut last_err = Ok(());
    let mut fail = |r: io::Result<()>| {
        if let Err(e) = r {
            edge.tun_write_errors.fetch_add(1, Relaxed);
            last_err = Err(e);
        }
    };
    if !tun.vnet() {
        for &i in deliver {
            fail(tun.write_packet(&mut bufs[i], 0));
        }
        return last_err;
    }
    let mut k = 0;
    while k < deliver.len() {
        let first = deliver[k];
        let mut end = k + 1;
        let mut group = None;
        if let Some(fs) = gro::segment(bufs[first].as_slice()) {
            let (mut last, mut ls, mut total) = (first, fs, bufs[first].len());
            while let Some(&nx) = deliver.get(end) {
                let Some(ns) = gro::segment(bufs[nx].as_slice()) else {
                    break;
                };
                if !gro::can_merge(
                    bufs[first].as_slice(),
                    &fs,
                    bufs[last].as_slice(),
                    &ls,
                    total,
                    bufs[nx].as_slice(),
                    &ns,
                ) {
                    break;
                }
                total += ns.payload;
                (last, ls) = (nx, ns);
                end += 1;
            }
            group = Some((fs, last, total));
        }
        match group {
            Some((fs, last, total)) if end - k > 1 => {
                let psh = bufs[last].as_slice()[fs.ip_len + 13] & 0x08 != 0;
                let mut hdr = [0u8; gro::MAX_HEADERS];
                let v = gro::merged_headers(bufs[first].as_slice(), &fs, total, psh, &mut hdr);
                let mut vh = [0u8; crate::gso::VNET_HDR_LEN];
                v.emit(&mut vh);
                let mut parts: [io::IoSlice<'_>; BATCH + 2] = [io::IoSlice::new(&[]); BATCH + 2];
                parts[0] = io::IoSlice::new(&vh);
                parts[1] = io::IoSlice::new(&hdr[..fs.hdr_len]);
                for (slot, &i) in parts[2..].iter_mut().zip(&deliver[k..end]) {
                    *slot = io::IoSlice::new(&bufs[i].as_slice()[fs.hdr_len..]);
                }
                fail(tun.send_vectored(&parts[..2 + end - k]));
                edge.gro_packets.fetch_add(1, Relaxed);
            }
            _ => fail(tun.write_packet(&mut bufs[first], 0)),
        }
        k = end;
    }
    last_err
}

/// Messages per `recvmmsg` on the ESP-in-UDP socket; each may carry a coalesced train of up
/// to 64 KB, split into [`BATCH`]-sized batches for the core.
const UDP_MSGS: usize = 8;

/// The outer source and protocol of a received packet (`None`: its outer header was bad).
type Origin = Option<(IpAddr, u8)>;

fn rx_loop(
    mut inb: Inbound,
    shared_out: &Mutex<Outbound>,
    e: &Edges,
    rec: &mut Recorder,
    clock: Instant,
) {
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new(MAX_PACKET)).collect();
    let mut origin: [Origin; BATCH] = [None; BATCH];
    // The UDP source port of each packet of a batch from the ESP-in-UDP socket.
    let mut ports = [0u16; BATCH];
    let mut wire: Vec<PacketBuf> = match e.udp {
        Some(_) => (0..UDP_MSGS).map(|_| PacketBuf::new(MAX_PACKET)).collect(),
        None => Vec::new(),
    };
    let mut meta = [crate::sys::udp::Received {
        from: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
        segment: 0,
        truncated: false,
    }; UDP_MSGS];
    let mut rx = RxState {
        inb: &mut inb,
        shared_out,
        e,
        warn_write: RateLimit::default(),
    };
    loop {
        // One small allocation per wakeup (not per packet): at most 5 descriptors.
        let mut fds: Vec<PollFd> = Vec::with_capacity(5);
        fds.push(PollFd::new(e.stop.as_fd(), PollFlags::POLLIN));
        fds.extend(
            e.sockets
                .iter()
                .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN)),
        );
        fds.extend(e.udp.map(|u| PollFd::new(u.as_fd(), PollFlags::POLLIN)));
        if !wait(&mut fds, "the sockets") {
            return;
        }
        let mut ready = [false; 5];
        for (r, f) in ready.iter_mut().zip(&fds[1..]) {
            *r = f.revents().is_some_and(|r| r.intersects(PollFlags::POLLIN));
        }
        drop(fds);
        let now = clock.elapsed().as_nanos() as u64;
        for (s, _) in e.sockets.iter().zip(ready).filter(|(_, r)| *r) {
            loop {
                let n = match s.recv_batch(&mut bufs) {
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        debug!("recvmmsg: {err}");
                        break;
                    }
                };
                rec.begin_batch();
                for (b, o) in bufs[..n].iter_mut().zip(origin.iter_mut()) {
                    rec.record(Tap::Outer, b.as_slice());
                    *o = strip_ipv4_header(b);
                    if o.is_none() {
                        e.edge.bad_outer.fetch_add(1, Relaxed);
                    }
                }
                rx.batch(&mut bufs[..n], &origin[..n], &[], rec, now);
                rec.flush();
                if n < bufs.len() {
                    break;
                }
            }
        }
        if let (Some(u), true) = (e.udp, ready[e.sockets.len()]) {
            loop {
                let m = match u.recv_batch(&mut wire, &mut meta) {
                    Ok(m) => m,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => {
                        debug!("recvmmsg (UDP): {err}");
                        break;
                    }
                };
                rec.begin_batch();
                let mut n = 0;
                for (w, r) in wire[..m].iter().zip(&meta[..m]) {
                    if r.truncated {
                        e.edge.bad_outer.fetch_add(1, Relaxed);
                        continue;
                    }
                    if r.segment < w.len() {
                        e.edge.udp_gro_receives.fetch_add(1, Relaxed);
                    }
                    let here = SocketAddrV4::new(
                        e.sent_from
                            .iter()
                            .find(|(ep, _)| ep == r.from.ip())
                            .map_or(Ipv4Addr::UNSPECIFIED, |(_, s)| *s),
                        u.port(),
                    );
                    // A coalesced train: each datagram becomes its own packet for the core (an
                    // empty datagram too: the core counts it malformed).
                    let whole = w.as_slice();
                    let datagrams = whole.chunks(r.segment.max(1));
                    for d in datagrams.chain(whole.is_empty().then_some(whole)) {
                        rec.record_udp(r.from, here, d);
                        let b = &mut bufs[n];
                        b.reset();
                        b.read_area()[..d.len()].copy_from_slice(d);
                        b.set_len(d.len());
                        origin[n] = Some((IpAddr::V4(*r.from.ip()), PROTO_UDP));
                        ports[n] = r.from.port();
                        n += 1;
                        if n == BATCH {
                            rx.batch(&mut bufs[..n], &origin[..n], &ports[..n], rec, now);
                            n = 0;
                        }
                    }
                }
                if n > 0 {
                    rx.batch(&mut bufs[..n], &origin[..n], &ports[..n], rec, now);
                }
                rec.flush();
                if m < wire.len() {
                    break;
                }
            }
        }
    }
}

/// What the RX thread keeps between batches.
struct RxState<'a, 'e> {
    inb: &'a mut Inbound,
    shared_out: &'a Mutex<Outbound>,
    e: &'a Edges<'e>,
    warn_write: RateLimit,
}

impl RxState<'_, '_> {
    /// Run a batch of received packets (outer headers removed) through the core and deliver
    /// them: to the TUN (coalesced where possible) or, on a hub, on to another peer. `ports`:
    /// the UDP source ports of a batch from the ESP-in-UDP socket (empty for raw sockets).
    fn batch(
        &mut self,
        bufs: &mut [PacketBuf],
        origin: &[Origin],
        ports: &[u16],
        rec: &mut Recorder,
        now: u64,
    ) {
        let e = self.e;
        let mut relay = [false; BATCH];
        let mut any_relay = false;
        let mut deliver = [0usize; BATCH];
        let mut dn = 0;
        for (i, (b, o)) in bufs.iter_mut().zip(origin).enumerate() {
            let Some((src, proto)) = *o else {
                continue;
            };
            let v = match ports.get(i) {
                Some(&port) => self.inb.process_udp(b, SocketAddr::new(src, port), now),
                None => self.inb.process(b, src, proto, now),
            };
            match v {
                Verdict::ToTun => {
                    rec.record(Tap::Inner, b.as_slice());
                    deliver[dn] = i;
                    dn += 1;
                }
                Verdict::Relay => {
                    relay[i] = true;
                    any_relay = true;
                }
                _ => {}
            }
        }
        if let Err(err) = write_coalesced(e.tun, bufs, &deliver[..dn], e.edge) {
            if self.warn_write.ready() {
                warn!("writing to the TUN failed: {err}");
            }
        }
        if any_relay {
            relay_batch(self.shared_out, bufs, &relay[..bufs.len()], e, rec, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

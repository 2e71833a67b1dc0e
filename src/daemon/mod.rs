//! `espip run`: set up the TUN, raw sockets and routes, run the data path, tear down on a
//! signal, in three phases:
//!
//! 1. **acquire** ([`setup`]): every resource is a field of one struct whose declaration order
//!    is the teardown order; a failure releases what was acquired;
//! 2. **spawn** ([`workers`]): the TX and RX threads, each reporting when it ends (return or
//!    panic);
//! 3. **serve** ([`serve`]): signals, the control socket, metrics, once-a-second checks, until
//!    a signal or a data-path thread ends; then the threads are stopped and joined, the last
//!    sequence numbers recorded, and the resources dropped in order. A thread that ended on
//!    its own makes the daemon exit non-zero with the thread's name and why.
//!
//! Threads (see docs/architecture.md for the measurements behind the choice):
//! - the main thread runs a current-thread tokio runtime for the control side (rtnetlink,
//!   signals, control socket, metrics);
//! - a TX thread ([`tx`]): TUN reads (drained up to a batch of 64) -> `Outbound::process` ->
//!   one `sendmmsg` per raw socket and batch;
//! - an RX thread ([`rx`]): `recvmmsg` batches from the raw sockets -> `Inbound::process` ->
//!   TUN writes.
//!
//! A stop is an eventfd both threads poll.

mod edges;
mod ike;
mod keylog;
mod nexthop;
mod probe;
mod reload;
mod rx;
mod send;
mod seq;
mod serve;
mod setup;
mod tx;
mod workers;

use crate::config::Config;
use crate::control::Live;
use crate::datapath;
use crate::sys::capture::{Recorder, Taps};
use crate::sys::seqstore::SeqError;
use crate::telemetry::{EdgeStats, Generation, InboundHandoff};
use edges::EdgeHandles;
use nix::sys::eventfd::{EfdFlags, EventFd};
use serve::Stop;
use setup::Resources;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::{debug, info, warn};
use workers::Workers;

pub use edges::BATCH;

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
    /// The key log directory.
    #[error("interface.save_keys: {0} (it must be a directory only root can write, in directories only root can write; create it with: install -d -m 0700 DIR)")]
    SaveKeys(io::Error),
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
    /// A data-path thread ended while the daemon ran.
    #[error("data-path thread {0} stopped: {1}; the daemon stopped cleanly (nothing left behind); please report this with the log")]
    Worker(&'static str, String),
    /// The IKE socket.
    #[error("cannot open UDP port 500 for IKEv2 ({0}): {1}; {advice}", advice = ike_socket_advice(.1))]
    IkeSocket(IpAddr, io::Error),
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
        if p.endpoint.is_none() && p.multipath.is_none() {
            // A learned endpoint has no route to ask yet: assume an Ethernet path (1500), as
            // WireGuard's default MTU does; `interface.mtu` says otherwise.
            let v6 = cfg.peer_families(p).contains(&true);
            mtu = mtu.min(datapath::inner_mtu(1500, &p.encap, v6));
        }
        // A multipath peer's packets may take any path: the smallest fits them all.
        for endpoint in p.endpoints() {
            let path = crate::sys::path_mtu(endpoint, cfg.interface.local).map_err(|source| {
                DaemonError::NoRouteToPeer {
                    peer: p.name.clone(),
                    endpoint,
                    source,
                }
            })?;
            mtu = mtu.min(datapath::inner_mtu(path, &p.encap, endpoint.is_ipv6()));
        }
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
pub(super) fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                debug!("raising RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
    }
}

/// Run the daemon in the foreground until SIGINT or SIGTERM (or until a data-path thread
/// ends, which is an error). `path`: where `cfg` came from, re-read on SIGHUP.
pub fn run(cfg: Config, path: Option<&std::path::Path>) -> Result<(), DaemonError> {
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

    // 1. Acquire.
    let mut res = Resources::acquire(&cfg, &rt)?;

    // 2. Spawn.
    let cfg = Arc::new(cfg);
    let Running {
        workers,
        mut ended,
        live,
        handoff,
        mut reload_rx,
        mut rekey_rx,
        natt_rx,
    } = spawn(&mut res, cfg.clone())?;
    // The IKE sockets register with the control thread's runtime.
    let ike = {
        let _in_runtime = rt.enter();
        ike::IkeDriver::new(
            &cfg,
            &res.sources,
            std::mem::take(&mut res.ike),
            res.udp.clone(),
            live.clock,
        )
    }
    .map_err(|e| DaemonError::Os("the IKE sockets", e))?;
    let mut ike = ike;
    if let Some(mut k) = res.keylog.take() {
        warn!(dir = %cfg.interface.save_keys.as_deref().unwrap_or(std::path::Path::new("")).display(), "interface.save_keys: every SA's keys are written to this directory; whoever reads it decrypts the traffic");
        k.record(&live);
        if let Some(d) = ike.as_mut() {
            d.keylog = Some(k);
        }
    }
    if let Some(t) = &res.taps {
        info!(files = %t.paths().iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" "), "capture taps on");
    }
    info!(interface = %cfg.interface.name, peers = cfg.peers.len(), control = %res.control.path().display(), "espip ready");

    // 3. Serve.
    let control = res.control.take();
    let mut store = res.store.take().expect("acquired");
    let transports = res.transports();
    let stopped = serve::serve(
        &rt,
        &live,
        serve::Listeners {
            control,
            metrics: res.metrics.take(),
            reload: &mut reload_rx,
            rekey: &mut rekey_rx,
            ike,
            natt: natt_rx,
            next_hops: res.fast_path.then(|| res.hops.clone()),
        },
        reload::Reloader {
            live: &live,
            store: &mut store,
            handoff: &handoff,
            routes: &mut res.routes,
            transports,
        },
        path,
        &mut ended,
    );
    match &stopped {
        Ok(Stop::Signal(s)) => info!(signal = s, "stopping"),
        Ok(Stop::Worker(w)) => warn!(thread = w.0, "a data-path thread ended; stopping"),
        Err(e) => warn!("signal handling failed: {e}; stopping"),
    }
    let failed = workers.finish();
    seq::record_final(&live.current.load().outbound, &mut store);
    if let Some(t) = res.taps.take() {
        t.finish();
    }
    serve::log_summary(&live.current.load(), &res.stats, &live.edge);
    if let Some(mut p) = res.pre_down.take() {
        p.run();
    }
    drop(res);
    info!(interface = %cfg.interface.name, "stopped; TUN device and its routes removed");
    outcome(stopped, failed)
}

/// What the spawn phase hands to the serving phase.
struct Running {
    workers: Workers,
    ended: tokio::sync::mpsc::UnboundedReceiver<workers::Ended>,
    live: Arc<Live>,
    handoff: Arc<InboundHandoff>,
    reload_rx: tokio::sync::mpsc::Receiver<crate::control::ReloadRequest>,
    rekey_rx: tokio::sync::mpsc::Receiver<crate::control::RekeyRequest>,
    natt_rx: Option<tokio::sync::mpsc::Receiver<edges::NattDatagram>>,
}

/// Phase 2: the first generation of the data path, its threads, and the control side's view.
fn spawn(res: &mut Resources, cfg: Arc<Config>) -> Result<Running, DaemonError> {
    let stop = Arc::new(
        EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
            .map_err(|e| DaemonError::Os("eventfd", e.into()))?,
    );
    let no_ike = cfg.ike.is_empty();
    let edge = Arc::new(EdgeStats::default());
    let clock = Instant::now();
    let started = SystemTime::now();
    let current = Arc::new(arc_swap::ArcSwap::from_pointee(Generation {
        sent_from: sent_from(&cfg, &res.sources),
        sources: res.sources.clone(),
        outbound: res.outbound.take().expect("acquired"),
        cfg,
        number: 1,
    }));
    let handoff = Arc::new(InboundHandoff::default());
    // IKE arriving on the ESP-in-UDP port, from the RX thread to the serving loop.
    let (natt_tx, natt_rx) = match no_ike {
        true => (None, None),
        false => {
            let (t, r) = tokio::sync::mpsc::channel(64);
            (Some(t), Some(r))
        }
    };
    let handles = EdgeHandles {
        natt: natt_tx,
        tun: res.tun.clone(),
        sockets: res.sockets.clone(),
        udp: res.udp.clone(),
        stop,
        edge: edge.clone(),
        current: current.clone(),
        handoff: handoff.clone(),
        hops: res.hops.clone(),
        packet: Arc::new(std::mem::take(&mut res.packet)),
    };
    let recorder = || res.taps.as_ref().map_or_else(Recorder::off, Taps::recorder);
    let (workers, ended) = Workers::spawn(
        handles,
        res.inbound.take().expect("acquired"),
        std::mem::take(&mut res.xdp),
        &recorder,
        clock,
    )
    .map_err(|e| DaemonError::Os("spawn the data-path threads", e))?;
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(1);
    let (rekey_tx, rekey_rx) = tokio::sync::mpsc::channel(1);
    let live = Arc::new(Live {
        current,
        mtu: res.mtu,
        stats: res.stats.clone(),
        edge,
        capture: res.taps.as_ref().map(|t| (t.stats(), t.paths().to_vec())),
        reload: Some(reload_tx),
        rekey: Some(rekey_tx),
        clock,
        started,
        socket_inodes: res.socket_inodes(),
        ike: std::sync::Mutex::default(),
    });
    Ok(Running {
        workers,
        ended,
        live,
        handoff,
        reload_rx,
        rekey_rx,
        natt_rx,
    })
}

/// The daemon's result from why serving stopped and which threads failed.
fn outcome(stopped: io::Result<Stop>, failed: Vec<String>) -> Result<(), DaemonError> {
    match stopped {
        Ok(Stop::Signal(_)) if failed.is_empty() => Ok(()),
        Ok(Stop::Worker(w)) => Err(DaemonError::Worker(
            w.0,
            if failed.is_empty() {
                "it returned (an error it could not recover from; see the log above)".into()
            } else {
                failed.join("; ")
            },
        )),
        Ok(Stop::Signal(_)) => Err(DaemonError::Worker("data path", failed.join("; "))),
        Err(e) => Err(DaemonError::Os("signal handler", e)),
    }
}

/// (endpoint, source) of every peer's every path, for the outer tap's synthesised headers
/// and the Wireshark SA lines. `sources`: the source of each peer's (first) endpoint.
fn sent_from(cfg: &Config, sources: &[IpAddr]) -> Vec<(IpAddr, IpAddr)> {
    let mut v = Vec::new();
    for (p, s) in cfg.peers.iter().zip(sources) {
        for (i, e) in p.endpoints().into_iter().enumerate() {
            let src = match i {
                0 => *s,
                _ => crate::sys::source_for(e, cfg.interface.local).unwrap_or(match e {
                    IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
                    IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                }),
            };
            v.push((e, src));
        }
    }
    v
}

/// What to do about a refused IKE socket, by the reason the kernel gave.
fn ike_socket_advice(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "binding a port below 1024 needs CAP_NET_BIND_SERVICE, which this process does not have: start espip as root, and under systemd keep CAP_NET_BIND_SERVICE in the unit's CapabilityBoundingSet (docs/systemd/espip@.service has it)"
        }
        Some(libc::EADDRINUSE) => {
            "another IKE daemon (strongSwan's charon, libreswan's pluto) holds it: stop it, or key this peer statically"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "the address is not one of this host's: check interface.local"
        }
        _ => "check that espip runs as root and that no other IKE daemon runs",
    }
}

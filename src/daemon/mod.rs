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
mod error;
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
pub mod uplinks;
mod workers;

use crate::config::Config;
use crate::control::Live;
use crate::sys::capture::{Recorder, Taps};
use crate::telemetry::{EdgeStats, Generation, InboundHandoff};
use edges::EdgeHandles;
use nix::sys::eventfd::{EfdFlags, EventFd};
use serve::Stop;
use setup::Resources;
use std::io;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tracing::{debug, info, warn};
use workers::Workers;

pub use edges::BATCH;
pub use error::DaemonError;
pub use setup::tunnel_mtu;

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
pub fn run(mut cfg: Config, path: Option<&std::path::Path>) -> Result<(), DaemonError> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    for w in uplinks::resolve(&mut cfg)? {
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
        sent_from: setup::sent_from(&cfg, &res.sources),
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

//! Phase 2: the data-path threads, supervised. Each thread carries a guard that reports on
//! a channel when the thread ends, by returning or by panicking (the guard drops during the
//! unwind); the serving loop wakes on it, stops the daemon cleanly and exits non-zero with the
//! thread's name and why it ended.

use super::{rx, tx};
use crate::datapath::Inbound;
use crate::sys::capture::Recorder;
use crate::sys::raw::RawSocket;
use crate::sys::tun::Tun;
use crate::sys::udp::UdpEncapSocket;
use crate::telemetry::{Current, EdgeStats, InboundHandoff};
use nix::sys::eventfd::EventFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// A data-path thread that ended, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended(pub &'static str);

/// Sends the thread's name when dropped: at its end, normal or unwinding.
struct Report(&'static str, UnboundedSender<Ended>);

impl Drop for Report {
    fn drop(&mut self) {
        let _ = self.1.send(Ended(self.0));
    }
}

/// The running data-path threads.
pub(super) struct Workers {
    tx: Option<JoinHandle<()>>,
    rx: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
}

/// A debug-build hook for the supervision test: `ESPIP_DEBUG_PANIC=tx` (or `rx`) makes that
/// thread panic at its first packet. Compiled out of release builds.
pub(super) fn debug_panic_requested(thread: &str) -> bool {
    cfg!(debug_assertions)
        && std::env::var("ESPIP_DEBUG_PANIC")
            .map(|v| v == thread)
            .unwrap_or(false)
}

impl Workers {
    /// Start the TX and RX threads; `ended` receives each thread's name when it ends.
    pub(super) fn spawn(
        handles: EdgeHandles,
        inbound: Inbound,
        recorders: (Recorder, Recorder),
        clock: Instant,
    ) -> std::io::Result<(Workers, UnboundedReceiver<Ended>)> {
        let (report, ended) = unbounded_channel();
        let stop = handles.stop.clone();
        let (mut rec_tx, mut rec_rx) = recorders;
        let tx = {
            let h = handles.clone();
            let guard = Report("espip-tx", report.clone());
            std::thread::Builder::new()
                .name("espip-tx".into())
                .spawn(move || {
                    let _guard = guard;
                    tx::tx_loop(&h.edges(), &mut rec_tx, clock)
                })?
        };
        let rx = {
            let guard = Report("espip-rx", report);
            std::thread::Builder::new()
                .name("espip-rx".into())
                .spawn(move || {
                    let _guard = guard;
                    rx::rx_loop(inbound, &handles.edges(), &mut rec_rx, clock)
                })?
        };
        Ok((
            Workers {
                tx: Some(tx),
                rx: Some(rx),
                stop,
            },
            ended,
        ))
    }

    /// Tell both threads to stop and wait for them; why each thread that panicked did.
    pub(super) fn finish(mut self) -> Vec<String> {
        let _ = self.stop.write(1);
        let why = |name: &str, e: Box<dyn std::any::Any + Send>| {
            let msg = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            format!("{name} panicked: {msg}")
        };
        let mut failed = Vec::new();
        if let Some(Err(e)) = self.tx.take().map(JoinHandle::join) {
            failed.push(why("espip-tx", e));
        }
        if let Some(Err(e)) = self.rx.take().map(JoinHandle::join) {
            failed.push(why("espip-rx", e));
        }
        failed
    }
}

/// What each data-path thread owns a share of; [`EdgeHandles::edges`] lends it out.
#[derive(Clone)]
pub(super) struct EdgeHandles {
    pub(super) tun: Arc<Tun>,
    pub(super) sockets: Arc<Vec<RawSocket>>,
    pub(super) udp: Arc<Vec<UdpEncapSocket>>,
    pub(super) stop: Arc<EventFd>,
    pub(super) edge: Arc<EdgeStats>,
    pub(super) current: Arc<Current>,
    pub(super) handoff: Arc<InboundHandoff>,
}

impl EdgeHandles {
    pub(super) fn edges(&self) -> Edges<'_> {
        Edges {
            tun: &self.tun,
            sockets: &self.sockets,
            udp: &self.udp,
            stop: &self.stop,
            edge: &self.edge,
            current: &self.current,
            handoff: &self.handoff,
        }
    }
}

/// The kernel objects and shared counters a data-path thread works with.
pub(super) struct Edges<'a> {
    pub(super) tun: &'a Tun,
    pub(super) sockets: &'a [RawSocket],
    pub(super) udp: &'a [UdpEncapSocket],
    pub(super) stop: &'a EventFd,
    pub(super) edge: &'a EdgeStats,
    /// The current generation (peers, SAs, configuration), loaded once per batch.
    pub(super) current: &'a Current,
    /// A new inbound half for the RX thread after a reload.
    pub(super) handoff: &'a InboundHandoff,
}

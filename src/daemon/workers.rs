//! Phase 2: the data-path threads, supervised. Each thread carries a guard that reports on
//! a channel when the thread ends, by returning or by panicking (the guard drops during the
//! unwind); the serving loop wakes on it, stops the daemon cleanly and exits non-zero with the
//! thread's name and why it ended.

use super::edges::EdgeHandles;
use super::{probe, rx, tx};
use crate::datapath::Inbound;
use crate::sys::capture::Recorder;
use crate::sys::xsk::XdpRx;
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
    tx: Vec<JoinHandle<()>>,
    rx: Option<JoinHandle<()>>,
    probe: Option<JoinHandle<()>>,
    stop: Arc<EventFd>,
}

impl Workers {
    /// Start the TX and RX threads; `ended` receives each thread's name when it ends.
    pub(super) fn spawn(
        handles: EdgeHandles,
        inbound: Inbound,
        xdp: Vec<XdpRx>,
        recorder: &dyn Fn() -> Recorder,
        clock: Instant,
    ) -> std::io::Result<(Workers, UnboundedReceiver<Ended>)> {
        let (report, ended) = unbounded_channel();
        let stop = handles.stop.clone();
        let mut tx = Vec::new();
        for (queue, name) in TX_NAMES.iter().enumerate().take(handles.tun.len()) {
            let h = handles.clone();
            let guard = Report(name, report.clone());
            let mut rec = recorder();
            tx.push(
                std::thread::Builder::new()
                    .name((*name).into())
                    .spawn(move || {
                        let _guard = guard;
                        tx::tx_loop(&h.edges(queue), &mut rec, clock)
                    })?,
            );
        }
        let probe = {
            let h = handles.clone();
            let guard = Report("espip-probe", report.clone());
            let mut rec = recorder();
            std::thread::Builder::new()
                .name("espip-probe".into())
                .spawn(move || {
                    let _guard = guard;
                    probe::probe_loop(&h.edges(0), &mut rec, clock)
                })?
        };
        let rx = {
            let guard = Report("espip-rx", report);
            let mut rec = recorder();
            std::thread::Builder::new()
                .name("espip-rx".into())
                .spawn(move || {
                    let _guard = guard;
                    rx::rx_loop(inbound, xdp, &handles.edges(0), &mut rec, clock)
                })?
        };
        Ok((
            Workers {
                tx,
                rx: Some(rx),
                probe: Some(probe),
                stop,
            },
            ended,
        ))
    }

    /// Tell every thread to stop and wait for them; why each thread that panicked did.
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
        for (t, name) in self.tx.drain(..).zip(TX_NAMES) {
            if let Err(e) = t.join() {
                failed.push(why(name, e));
            }
        }
        if let Some(Err(e)) = self.rx.take().map(JoinHandle::join) {
            failed.push(why("espip-rx", e));
        }
        if let Some(Err(e)) = self.probe.take().map(JoinHandle::join) {
            failed.push(why("espip-probe", e));
        }
        failed
    }
}

/// TX thread names, by TUN queue (at most `config::interface::MAX_TX_THREADS`).
const TX_NAMES: [&str; 8] = [
    "espip-tx",
    "espip-tx1",
    "espip-tx2",
    "espip-tx3",
    "espip-tx4",
    "espip-tx5",
    "espip-tx6",
    "espip-tx7",
];

//! The probe thread of multipath peers: four times per probe interval it lets the core update
//! each path's liveness and the schedule (probes and estimates once per interval), logs the
//! paths that went down or came back (once per change), and sends the probes the core made
//! (ESP dummy packets on each path).
//!
//! It runs whether or not a peer has several paths (a reload may add one); without one it
//! wakes once a second and does nothing.

use super::edges::{wait, Edges};
use super::send::send_verdicts;
use crate::datapath::Verdict;
use crate::multipath::PathState;
use crate::sys::capture::Recorder;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use std::os::fd::AsFd;
use std::time::Instant;
use tracing::{info, warn};

/// How often the thread wakes when no peer has paths.
const IDLE_MS: u16 = 1000;

pub(super) fn probe_loop(e: &Edges, rec: &mut Recorder, clock: Instant) {
    loop {
        let g = e.current.load_full();
        let interval = (0..g.outbound.peer_count())
            .filter_map(|i| g.outbound.multipath(i))
            .map(|m| m.spec.probe_interval_ms)
            .min()
            // Four wakes per probe interval: probes go out once an interval, the quiet rule
            // (a path late by an interval and a half leaves the schedule) runs at each.
            .map_or(IDLE_MS, |ms| (ms / 4).clamp(1, u32::from(IDLE_MS)) as u16);
        let mut fds = [PollFd::new(e.stop.as_fd(), PollFlags::POLLIN)];
        if !wait(&mut fds, PollTimeout::from(interval), "the probe timer") {
            return;
        }
        let now = clock.elapsed().as_nanos() as u64;
        let (events, probes) = g.outbound.tick(now);
        for (peer, path, state) in events {
            let (Some(p), Some(m)) = (g.cfg.peers.get(peer), g.outbound.multipath(peer)) else {
                continue;
            };
            let endpoint = m
                .endpoint_of(path)
                .map_or("(none)".into(), |e| e.0.to_string());
            let forgotten = m.forgotten(path, now);
            let path = &m.paths[path];
            match state {
                PathState::Down if forgotten => info!(
                    peer = %p.name, path = %path.name, endpoint = %endpoint,
                    "learned path forgotten: silent for {} s (path_idle); its slot takes the next new address",
                    m.spec.path_idle_s
                ),
                PathState::Down => warn!(
                    peer = %p.name, path = %path.name, endpoint = %endpoint,
                    "path down: no echo for {} ms; its traffic moves to the other paths",
                    u64::from(m.spec.probe_interval_ms) * u64::from(m.spec.dead_after)
                ),
                _ => info!(peer = %p.name, path = %path.name, endpoint = %endpoint, "path up"),
            }
        }
        if probes.is_empty() {
            continue;
        }
        let (bufs, verdicts): (Vec<_>, Vec<_>) = probes
            .into_iter()
            .map(|(b, w)| (b, Some(Verdict::Send(w))))
            .unzip();
        rec.begin_batch();
        if let Some(err) = send_verdicts(&bufs, &verdicts, e, &g, rec) {
            tracing::debug!("sending probes failed: {err}");
        }
        rec.flush();
    }
}

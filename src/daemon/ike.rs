//! The IKEv2 edge: UDP port 500 (and IKE on the ESP-in-UDP port behind the non-ESP marker,
//! which the RX thread hands over), one [`Engine`] per `keying = "ikev2"` peer, and the
//! translation of the engines' SA sets into data-path generations.
//!
//! Everything here runs on the control thread (the serving loop): a message in, the engine's
//! outputs performed in order - a changed SA set is published to the data path before the
//! next message goes out, so the peer never uses an SA we have not installed.

use super::reload::Reloader;
use crate::config::{Config, IkePeer, IkeRole};
use crate::control::Refused;
use crate::datapath::{EncapSpec, Lifetime, PeerSpec};
use crate::ike::engine::{ChildKeys, Engine, Event, IkeConfig, Out, Role, SaStatus};
use crate::ike::msg::Id;
use crate::ike::ts;
use crate::sys::udp::UdpEncapSocket;
use ring::rand::SystemRandom;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// How soon a waiting status refresh is made.
pub(super) const IKE_TICK: std::time::Duration = std::time::Duration::from_millis(50);
/// The engines' timers run when their `poll_timeout` says, but not more often than this
/// (work queued behind an unanswered request waits for the answer, not for a timer)...
const TICK_MIN: std::time::Duration = std::time::Duration::from_millis(5);
/// ...and at least this often (the peers' received-packet counters feed dead peer detection).
const TICK_MAX: std::time::Duration = std::time::Duration::from_secs(1);
/// First retransmission timeout; doubled on each of [`RETRANSMIT_TRIES`] tries (about 15 s
/// in all before a peer counts as dead).
const RETRANSMIT_MS: u64 = 500;
/// Retransmissions before the peer counts as dead.
const RETRANSMIT_TRIES: u32 = 4;

/// One peer's engine and what it was made from.
struct Peer {
    name: String,
    spec: IkePeer,
    engine: Engine,
    /// Authenticated ESP packets seen from the peer at the last tick (DPD need not ask).
    rx_seen: u64,
    /// The engine's `ike_keys_made` when the control side last got its keys.
    keys_seen: u64,
    /// Where the peer's last IKE message landed here: a responder answers, and asks, from
    /// there (RFC 7296 section 2.11; a server may have several addresses).
    here: Option<IpAddr>,
}

/// The IKE sockets and engines.
pub(super) struct IkeDriver {
    peers: Vec<Peer>,
    /// With responders without endpoint: the engine that answers IKE_SA_INIT from addresses
    /// no peer has and hands each IKE SA to the peer its IKE_AUTH names.
    lobby: Option<Engine>,
    sockets: Vec<tokio::net::UdpSocket>,
    udp: Arc<Vec<UdpEncapSocket>>,
    rng: SystemRandom,
    clock: Instant,
    /// `interface.save_keys`.
    pub(super) keylog: Option<super::keylog::KeyLog>,
    /// Failures logged once, then summarised.
    failure_log: FailureLog,
    /// Counters moved since the control side's snapshot was last refreshed (it is refreshed
    /// at once when SAs change, otherwise at the next tick: a flood of unauthenticated
    /// messages costs no snapshot each).
    status_dirty: bool,
    /// When the kernel was last asked for our source address towards each peer (MOBIKE).
    route_checked: Instant,
    /// `interface.local` is set: our address never moves, no need to ask.
    pinned: bool,
}

/// How often the kernel is asked which source address reaches each peer: a change is our
/// address moving (a new DHCP lease, another uplink), which MOBIKE announces.
const ROUTE_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// How often one kind of IKE failure of one peer is logged; the ones between are counted
/// (in `espip show` and the metrics, as every failure is) and summarised.
const FAILURE_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// IKE failures of one (peer, reason): logged the first time, then at most once per
/// [`FAILURE_LOG_EVERY`] with how many came between, so that a flood of unauthenticated
/// messages (or a wrong key retried every 5 s) does not flood the log.
#[derive(Default)]
struct FailureLog {
    /// (peer, reason) -> (last logged, failures since that were not logged).
    seen: std::collections::HashMap<(String, String), (Instant, u64)>,
}

impl FailureLog {
    /// A failure at `now`: `Some(n)` if it is to be logged, `n` being how many of its kind
    /// were not since the last line.
    fn note(&mut self, peer: &str, reason: &str, now: Instant) -> Option<u64> {
        match self.seen.get_mut(&(peer.to_string(), reason.to_string())) {
            None => {
                if self.seen.len() >= 1024 {
                    self.seen.clear();
                }
                self.seen
                    .insert((peer.to_string(), reason.to_string()), (now, 0));
                Some(0)
            }
            Some((last, n)) if now.duration_since(*last) >= FAILURE_LOG_EVERY => {
                *last = now;
                Some(std::mem::take(n))
            }
            Some((_, n)) => {
                *n += 1;
                None
            }
        }
    }

    /// Summaries that are due: (peer, reason, failures not logged in the last interval).
    fn due(&mut self, now: Instant) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        self.seen.retain(|(peer, reason), (last, n)| {
            let age = now.duration_since(*last);
            if age < FAILURE_LOG_EVERY {
                return true;
            }
            if *n > 0 {
                out.push((peer.clone(), reason.clone(), std::mem::take(n)));
                *last = now;
                return true;
            }
            // Quiet for a while: the next one is logged as a first again.
            age < FAILURE_LOG_EVERY * 10
        });
        out
    }
}

/// Engines a new configuration would run (see [`IkeDriver::plan`]).
pub(super) struct IkePlan {
    entries: Vec<PlanEntry>,
}

enum PlanEntry {
    /// Today's engine at this index continues.
    Keep(usize),
    /// A new engine.
    New(Box<Peer>),
}

/// What [`IkeDriver::recv`] returns.
pub(super) type Received = (Vec<u8>, SocketAddr, Option<IpAddr>);

fn engine_config(cfg: &Config, s: &IkePeer, p: &PeerSpec, local: IpAddr) -> IkeConfig {
    let udp_port = match p.encap {
        EncapSpec::Esp { udp_port, .. } | EncapSpec::EspPending { udp_port, .. } => udp_port,
        EncapSpec::IpIp => None,
    };
    let ms = |s: u64| s.saturating_mul(1000);
    IkeConfig {
        name: p.name.clone(),
        role: match s.role {
            IkeRole::Initiator => Role::Initiator,
            IkeRole::Responder => Role::Responder,
        },
        psk: s.psk.clone(),
        local_id: Id::from_config(&s.local_id),
        remote_id: Id::from_config(&s.remote_id),
        ike: s.ike_proposals.clone(),
        esp: s.esp_proposals.clone(),
        ike_rekey_ms: ms(s.ike_lifetime - s.rekey_margin),
        child_rekey_ms: ms(s.child_lifetime - s.rekey_margin),
        child_life_ms: ms(s.child_lifetime),
        jitter_ms: ms(s.rekey_jitter),
        dpd_ms: ms(s.dpd_interval),
        retransmit_ms: RETRANSMIT_MS,
        retransmit_tries: RETRANSMIT_TRIES,
        local_ts: s.local_ts.iter().map(ts::from_prefix).collect(),
        remote_ts: p.allowed_ips.iter().map(ts::from_prefix).collect(),
        // A responder without endpoint: unspecified, it takes IKE SAs from the lobby.
        remote: SocketAddr::new(
            p.endpoint.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            crate::wire::ip::IKE_PORT,
        ),
        local,
        local_port: crate::wire::ip::IKE_PORT,
        natt_port: cfg.interface.listen_port,
        remote_natt_port: udp_port.unwrap_or(crate::wire::ip::IPSEC_NAT_T_PORT),
        force_encap: udp_port.is_some(),
        lobby: None,
        mobike: s.mobike,
    }
}

/// The lobby for the responders among `peers` that have no endpoint (`None`: there are
/// none). It keeps `old` when it would be the same (its half-open SAs and cookie secret
/// survive a reload).
fn lobby_for(peers: &[Peer], old: Option<Engine>) -> Option<Engine> {
    let roaming: Vec<&Peer> = peers.iter().filter(|p| p.engine.roams()).collect();
    let first = roaming.first()?;
    let ids: Vec<Id> = roaming
        .iter()
        .map(|p| p.engine.config().remote_id.clone())
        .collect();
    let mut cfg = first.engine.config().clone();
    cfg.name = LOBBY.to_string();
    cfg.lobby = Some(ids);
    // It makes no CHILD_SA and no peer's key is its.
    cfg.psk = zeroize::Zeroizing::new(Vec::new());
    match old {
        Some(o)
            if o.config().lobby == cfg.lobby
                && o.config().ike == cfg.ike
                && o.config().local == cfg.local =>
        {
            Some(o)
        }
        _ => Some(Engine::new(cfg)),
    }
}

/// The lobby's name in logs and `espip show`.
const LOBBY: &str = "(responders without endpoint)";

impl IkeDriver {
    /// The engines of `cfg`'s ikev2 peers on `sockets` (bound to port 500 by the setup);
    /// `None` when no peer uses IKEv2.
    pub(super) fn new(
        cfg: &Config,
        sources: &[IpAddr],
        sockets: Vec<std::net::UdpSocket>,
        udp: Arc<Vec<UdpEncapSocket>>,
        clock: Instant,
    ) -> std::io::Result<Option<IkeDriver>> {
        if cfg.ike.is_empty() {
            return Ok(None);
        }
        let mut tokio_sockets = Vec::new();
        for s in sockets {
            s.set_nonblocking(true)?;
            tokio_sockets.push(tokio::net::UdpSocket::from_std(s)?);
        }
        let mut d = IkeDriver {
            peers: Vec::new(),
            lobby: None,
            sockets: tokio_sockets,
            udp,
            rng: SystemRandom::new(),
            clock,
            keylog: None,
            failure_log: FailureLog::default(),
            status_dirty: false,
            route_checked: Instant::now(),
            pinned: cfg.interface.local.is_some(),
        };
        d.reconfigure(cfg, sources);
        Ok(Some(d))
    }

    /// Follow a new configuration at once (the start): see [`IkeDriver::plan`].
    pub(super) fn reconfigure(&mut self, cfg: &Config, sources: &[IpAddr]) {
        let plan = self.plan(cfg, sources);
        self.commit(plan);
    }

    /// What a new configuration would make of the engines, without changing any: engines of
    /// peers whose IKE settings, endpoint and selectors are unchanged keep running (by index
    /// into today's engines); others start over. A reload computes this, lets the data path
    /// validate the whole configuration with [`IkeDriver::keyed_by`], and only then
    /// [`IkeDriver::commit`]s it: a refused reload leaves every engine as it was.
    pub(super) fn plan(&self, cfg: &Config, sources: &[IpAddr]) -> IkePlan {
        let mut entries = Vec::new();
        let mut taken = vec![false; self.peers.len()];
        for s in &cfg.ike {
            let Some((i, p)) = cfg.peers.iter().enumerate().find(|(_, p)| p.name == s.peer) else {
                continue;
            };
            let local = sources.get(i).copied().unwrap_or(match p.endpoint {
                Some(IpAddr::V6(_)) => std::net::Ipv6Addr::UNSPECIFIED.into(),
                _ => std::net::Ipv4Addr::UNSPECIFIED.into(),
            });
            let ec = engine_config(cfg, s, p, local);
            let same = self.peers.iter().enumerate().position(|(j, q)| {
                !taken[j]
                    && q.name == p.name
                    && q.spec == *s
                    && q.engine.config().remote == ec.remote
                    && q.engine.config().remote_ts == ec.remote_ts
            });
            match same {
                Some(j) => {
                    taken[j] = true;
                    entries.push(PlanEntry::Keep(j));
                }
                None => entries.push(PlanEntry::New(Box::new(Peer {
                    name: p.name.clone(),
                    spec: s.clone(),
                    engine: Engine::new(ec),
                    rx_seen: 0,
                    keys_seen: 0,
                    here: None,
                }))),
            }
        }
        IkePlan { entries }
    }

    /// The engines `plan` names, in its order.
    fn planned<'a>(&'a self, plan: &'a IkePlan) -> impl Iterator<Item = &'a Peer> + 'a {
        plan.entries.iter().map(move |e| match e {
            PlanEntry::Keep(j) => &self.peers[*j],
            PlanEntry::New(p) => p.as_ref(),
        })
    }

    /// Make `plan` the running set of engines (engines it does not keep are dropped).
    pub(super) fn commit(&mut self, plan: IkePlan) {
        let mut old: Vec<Option<Peer>> = std::mem::take(&mut self.peers)
            .into_iter()
            .map(Some)
            .collect();
        self.peers = plan
            .entries
            .into_iter()
            .filter_map(|e| match e {
                PlanEntry::Keep(j) => old.get_mut(j).and_then(Option::take),
                PlanEntry::New(p) => Some(*p),
            })
            .collect();
        self.lobby = lobby_for(&self.peers, self.lobby.take());
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_nanos() as u64
    }

    /// The next datagram on port 500.
    pub(super) async fn recv(&self) -> Received {
        loop {
            // Readiness first, then a non-blocking read: one buffer, whichever socket.
            let ready = match self.sockets.as_slice() {
                [a] => a.readable().await.map(|_| a),
                [a, b, ..] => {
                    tokio::select! {
                        r = a.readable() => r.map(|_| a),
                        r = b.readable() => r.map(|_| b),
                    }
                }
                [] => std::future::pending().await,
            };
            let Ok(s) = ready else { continue };
            let mut buf = vec![0u8; crate::ike::msg::MAX_MSG + 1];
            if let Ok((n, from, here)) = s.try_io(tokio::io::Interest::READABLE, || {
                crate::sys::ikesock::recv_landing(s, &mut buf)
            }) {
                buf.truncate(n);
                return (buf, from, here);
            }
        }
    }

    /// A datagram from port 500 (`natt` false) or the ESP-in-UDP port.
    pub(super) async fn handle(
        &mut self,
        msg: &[u8],
        (from, here): (SocketAddr, Option<IpAddr>),
        natt: bool,
        reloader: &mut Reloader<'_>,
    ) {
        let from = SocketAddr::new(canonical(from.ip()), from.port());
        let here = here.map(canonical);
        let now = self.now();
        match self.engine_for(msg, from) {
            Some(i) => {
                if here.is_some() {
                    self.peers[i].here = here;
                }
                let outs = self.peers[i].engine.handle(msg, from, natt, now, &self.rng);
                self.perform(i, outs, reloader).await;
            }
            None => {
                let Some(lobby) = self.lobby.as_mut() else {
                    return;
                };
                let outs = lobby.handle(msg, from, natt, now, &self.rng);
                self.perform_lobby(outs, Some((msg, from, natt)), here, reloader)
                    .await;
            }
        }
    }

    /// The engine a message is for: the peer at its source address, else a peer without
    /// endpoint that holds its IKE SA (by SPIs). `None`: the lobby's, if there is one.
    fn engine_for(&self, msg: &[u8], from: SocketAddr) -> Option<usize> {
        if let Some(i) = self
            .peers
            .iter()
            .position(|p| p.engine.config().remote.ip() == from.ip())
        {
            return Some(i);
        }
        let h = crate::ike::msg::parse_header(msg).ok()?;
        if h.spi_r == 0 {
            return None;
        }
        self.peers
            .iter()
            .position(|p| p.engine.follows(h.spi_i, h.spi_r))
    }

    /// The lobby's outputs: its answers sent, its failures logged, and an IKE SA whose
    /// IKE_AUTH named a peer handed to that peer's engine with the message (`msg`).
    async fn perform_lobby(
        &mut self,
        outs: Vec<Out>,
        msg: Option<(&[u8], SocketAddr, bool)>,
        here: Option<IpAddr>,
        reloader: &mut Reloader<'_>,
    ) {
        let via = crate::datapath::Via {
            src: here,
            ifindex: 0,
        };
        for o in outs {
            match o {
                Out::Send { to, natt, msg } => self.send(to, natt, via, &msg).await,
                Out::Handoff { id, spis } => {
                    let (Some((raw, from, natt)), Some(half)) =
                        (msg, self.lobby.as_mut().and_then(|l| l.hand_over(spis)))
                    else {
                        continue;
                    };
                    let Some(i) = self
                        .peers
                        .iter()
                        .position(|p| p.engine.roams() && p.engine.config().remote_id == id)
                    else {
                        continue;
                    };
                    debug!(peer = self.peers[i].name, %from, id = id.display(), "IKE: an initiator without configured address names this peer");
                    let now = self.now();
                    self.peers[i].here = here;
                    self.peers[i].engine.adopt(half);
                    let outs = self.peers[i].engine.handle(raw, from, natt, now, &self.rng);
                    Box::pin(self.perform(i, outs, reloader)).await;
                }
                Out::Event(Event::Failed { reason, detail }) => {
                    let reason = reason.name();
                    if let Some(n) = self.failure_log.note(LOBBY, &reason, Instant::now()) {
                        warn!(
                            peer = LOBBY,
                            reason, "IKE: {detail} ({n} more since the last such line)"
                        );
                    }
                }
                Out::Changed | Out::Event(_) => {}
            }
        }
        self.status_dirty = true;
    }

    /// When [`IkeDriver::tick`] is next due: the earliest of the engines' `poll_timeout`s,
    /// at least [`TICK_MIN`] and at most [`TICK_MAX`] from now (the status snapshot and the
    /// liveness bookkeeping follow at that pace; a refresh that is waiting, within
    /// [`IKE_TICK`]).
    pub(super) fn next_deadline(&self) -> tokio::time::Instant {
        let now = self.now();
        let mut wait = if self.status_dirty {
            IKE_TICK
        } else {
            TICK_MAX
        };
        for e in self.peers.iter().map(|p| &p.engine).chain(&self.lobby) {
            if let Some(t) = e.poll_timeout() {
                wait = wait.min(std::time::Duration::from_nanos(t.saturating_sub(now)));
            }
        }
        // Our source address is asked for at its own pace (MOBIKE).
        if !self.pinned && self.peers.iter().any(|p| !p.engine.roams()) {
            wait = wait.min(ROUTE_CHECK_EVERY.saturating_sub(self.route_checked.elapsed()));
        }
        tokio::time::Instant::now() + wait.max(TICK_MIN)
    }

    /// Timers: retransmissions, rekeys, liveness, reconnects.
    pub(super) async fn tick(&mut self, reloader: &mut Reloader<'_>) {
        for (peer, reason, n) in self.failure_log.due(Instant::now()) {
            warn!(
                peer,
                reason,
                "IKE: {n} more {reason} failures in the last {} s (not logged one by one; `espip show` counts them)",
                FAILURE_LOG_EVERY.as_secs()
            );
        }
        let now = self.now();
        let g = reloader.live.current.load_full();
        for i in 0..self.peers.len() {
            if let Some(idx) = g
                .cfg
                .peers
                .iter()
                .position(|p| p.name == self.peers[i].name)
            {
                let rx = g
                    .outbound
                    .peer_stats(idx)
                    .rx_packets
                    .load(std::sync::atomic::Ordering::Relaxed);
                if rx != self.peers[i].rx_seen {
                    self.peers[i].rx_seen = rx;
                    self.peers[i].engine.heard(now);
                }
            }
            let outs = self.peers[i].engine.tick(now, &self.rng);
            self.perform(i, outs, reloader).await;
        }
        if let Some(l) = self.lobby.as_mut() {
            let outs = l.tick(now, &self.rng);
            self.perform_lobby(outs, None, None, reloader).await;
        }
        if self.route_checked.elapsed() >= ROUTE_CHECK_EVERY {
            self.route_checked = Instant::now();
            self.pinned = g.cfg.interface.local.is_some();
            self.follow_local_address(reloader).await;
        }
        if self.status_dirty {
            self.refresh(reloader);
        }
    }

    /// Our source address towards each peer with an endpoint, as the kernel's routes pick it
    /// now: when it changed, the engine announces it (MOBIKE's UPDATE_SA_ADDRESSES, or a
    /// liveness check from the new address). Not with `interface.local`: that address is
    /// ours for good.
    async fn follow_local_address(&mut self, reloader: &mut Reloader<'_>) {
        if self.pinned {
            return;
        }
        for i in 0..self.peers.len() {
            let remote = self.peers[i].engine.config().remote.ip();
            if remote.is_unspecified() {
                continue;
            }
            let Ok(here) = crate::sys::source_for(remote, None) else {
                continue;
            };
            if here == self.peers[i].engine.config().local {
                continue;
            }
            let now = self.now();
            let outs = self.peers[i].engine.local_moved(here, now, &self.rng);
            self.perform(i, outs, reloader).await;
        }
    }

    /// `espip rekey`: start a rekey of the CHILD_SAs (or the IKE SA) of `peer` (or of every
    /// IKEv2 peer) now.
    pub(super) async fn rekey(
        &mut self,
        peer: Option<&str>,
        ike: bool,
        reloader: &mut Reloader<'_>,
    ) -> Result<String, Refused> {
        let now = self.now();
        let chosen: Vec<usize> = (0..self.peers.len())
            .filter(|&i| peer.map_or(true, |p| self.peers[i].name == p))
            .collect();
        if chosen.is_empty() {
            return Err(Refused::NoIkePeer(peer.map(str::to_string)));
        }
        let mut started = Vec::new();
        let mut refused = Vec::new();
        for i in chosen {
            match self.peers[i].engine.rekey_now(ike, now, &self.rng) {
                Ok(outs) => {
                    started.push(self.peers[i].name.clone());
                    self.perform(i, outs, reloader).await;
                }
                Err(why) => refused.push(format!("{}: {why}", self.peers[i].name)),
            }
        }
        let what = if ike { "IKE SA" } else { "CHILD_SA" };
        match (started.is_empty(), refused.is_empty()) {
            (true, _) => Err(Refused::RekeyRefused(refused)),
            (false, true) => Ok(format!("{what} rekey requested for {}", started.join(", "))),
            (false, false) => Ok(format!(
                "{what} rekey requested for {}; not for {}",
                started.join(", "),
                refused.join("; ")
            )),
        }
    }

    /// A clean stop: DELETE every IKE SA.
    pub(super) async fn close(&mut self, reloader: &mut Reloader<'_>) {
        let now = self.now();
        for i in 0..self.peers.len() {
            let outs = self.peers[i].engine.close(now);
            self.perform(i, outs, reloader).await;
        }
    }

    async fn perform(&mut self, i: usize, outs: Vec<Out>, reloader: &mut Reloader<'_>) {
        let name = self.peers[i].name.clone();
        // New IKE SA keys (a failed or colliding IKE SA's too) go to `save_keys` at once.
        let keys_made = self.peers[i].engine.stats().ike_keys_made;
        let mut now = keys_made != self.peers[i].keys_seen;
        self.peers[i].keys_seen = keys_made;
        for o in outs {
            match o {
                Out::Send { to, natt, msg } => {
                    let (to, mut via) = self.route(&name, to, natt, reloader);
                    // A responder sends from where the peer reaches it; an initiator from its
                    // routed source (which MOBIKE follows).
                    if via.is_routed() && self.peers[i].spec.role == IkeRole::Responder {
                        via.src = self.peers[i].here.filter(|h| h.is_ipv6() == to.is_ipv6());
                    }
                    self.send(to, natt, via, &msg).await
                }
                Out::Changed => {
                    now = true;
                    self.publish(reloader)
                }
                Out::Event(
                    e @ (Event::IkeUp { .. } | Event::IkeRekeyed { .. } | Event::IkeDown { .. }),
                ) => {
                    now = true;
                    log_event(&name, &e)
                }
                Out::Event(Event::Failed { reason, detail }) => {
                    let reason = reason.name();
                    if let Some(n) = self.failure_log.note(&name, &reason, Instant::now()) {
                        if n == 0 {
                            warn!(peer = name, reason, "IKE: {detail}");
                        } else {
                            warn!(peer = name, reason, "IKE: {detail} ({n} more {reason} failures since the last such line; `espip show` counts them)");
                        }
                    }
                }
                Out::Event(e) => log_event(&name, &e),
                // Only a lobby hands over (see `perform_lobby`).
                Out::Handoff { .. } => {}
            }
        }
        self.status_dirty = true;
        if now {
            self.refresh(reloader);
        }
    }

    /// Give the control side the engines' current status and keys (and `save_keys` the new
    /// ones).
    pub(super) fn refresh(&mut self, reloader: &Reloader<'_>) {
        self.status_dirty = false;
        let mut movable: Vec<(u64, u64)> = self
            .peers
            .iter()
            .flat_map(|p| p.engine.mobike_spis())
            .collect();
        movable.sort_unstable();
        if **reloader.live.edge.ike_movable.load() != movable {
            reloader.live.edge.ike_movable.store(Arc::new(movable));
        }
        reloader.live.set_ike(self.status(), self.wireshark_ike());
        if let Some(k) = self.keylog.as_mut() {
            k.record(reloader.live);
        }
    }

    /// Where and how an IKE message of peer `name` to `to` goes: a multipath peer's IKE
    /// (on the NAT-T port) takes a path that is not down ([`crate::multipath::Multipath::ike_route`]),
    /// so a cut of the path IKE started on does not take the IKE SA down with it.
    fn route(
        &self,
        name: &str,
        to: SocketAddr,
        natt: bool,
        reloader: &Reloader<'_>,
    ) -> (SocketAddr, crate::datapath::Via) {
        let routed = (to, crate::datapath::Via::ROUTED);
        if !natt {
            return routed;
        }
        let g = reloader.live.current.load_full();
        g.cfg
            .peers
            .iter()
            .position(|p| p.name == name)
            .and_then(|i| g.outbound.multipath(i))
            .and_then(|m| m.ike_route(to))
            .unwrap_or(routed)
    }

    async fn send(&self, to: SocketAddr, natt: bool, via: crate::datapath::Via, msg: &[u8]) {
        let result = if natt {
            let Some(u) = self.udp.iter().find(|u| u.is_v6() == to.is_ipv6()) else {
                warn!(%to, "IKE wants the NAT-T port but espip has no ESP-in-UDP socket for that address family");
                return;
            };
            // RFC 3948 section 2.2: IKE on the NAT-T port follows four zero octets.
            let mut m = Vec::with_capacity(msg.len() + 4);
            m.extend_from_slice(&[0, 0, 0, 0]);
            m.extend_from_slice(msg);
            let sent = u.send_datagrams(&[(&m, to, via)], |_, _, _, _| {});
            if sent.datagrams == 1 {
                Ok(())
            } else {
                Err(sent
                    .error
                    .unwrap_or_else(|| std::io::Error::other("not sent")))
            }
        } else {
            match self
                .sockets
                .iter()
                .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6() == to.is_ipv6()))
            {
                Some(s) => {
                    let src = via.src.filter(|a| a.is_ipv6() == to.is_ipv6());
                    loop {
                        match s.try_io(tokio::io::Interest::WRITABLE, || {
                            crate::sys::ikesock::send_from(s, msg, to, src)
                        }) {
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                if let Err(e) = s.writable().await {
                                    break Err(e);
                                }
                            }
                            r => break r.map(|_| ()),
                        }
                    }
                }
                None => Err(std::io::Error::other(
                    "no IKE socket for that address family",
                )),
            }
        };
        if let Err(e) = result {
            warn!(%to, "sending an IKE message: {e}");
        }
    }

    /// The peers with their IKE-made SAs in place of `EspPending`.
    pub(super) fn keyed(&self, peers: &[PeerSpec]) -> Vec<PeerSpec> {
        keyed_with(self.peers.iter(), peers)
    }

    /// [`IkeDriver::keyed`] as it would be after `plan` is committed.
    pub(super) fn keyed_by(&self, plan: &IkePlan, peers: &[PeerSpec]) -> Vec<PeerSpec> {
        keyed_with(self.planned(plan), peers)
    }

    fn publish(&self, reloader: &mut Reloader<'_>) {
        let old = reloader.live.current.load_full();
        let mut cfg = (*old.cfg).clone();
        cfg.peers = self.keyed(&old.cfg.peers);
        if let Err(e) = reloader.publish_keys(cfg) {
            warn!("installing IKEv2 SAs: {e}");
        }
        // A peer without endpoint is where its IKE_AUTH came from (until its ESP says
        // otherwise): the data path can send to it before its first ESP packet.
        let g = reloader.live.current.load_full();
        let now = self.now();
        for p in self.peers.iter().filter(|p| p.engine.roams()) {
            let (Some(at), Some(idx)) = (
                p.engine.peer_addr(),
                g.cfg.peers.iter().position(|q| q.name == p.name),
            ) else {
                continue;
            };
            let port = if p.engine.natt() { at.port() } else { 0 };
            g.outbound
                .peer_stats(idx)
                .learned
                .learn(SocketAddr::new(at.ip(), port), now);
        }
    }

    /// Status lines of every peer's SAs.
    pub(super) fn status(&self) -> Vec<crate::status::IkePeerStatus> {
        let now = self.now();
        let role = |r: IkeRole| match r {
            IkeRole::Initiator => "initiator",
            IkeRole::Responder => "responder",
        };
        let mut v: Vec<_> = self
            .peers
            .iter()
            .map(|p| {
                engine_status(
                    (&p.name, role(p.spec.role)),
                    (p.spec.local_id.clone(), p.spec.remote_id.clone()),
                    &p.engine,
                    now,
                )
            })
            .collect();
        // The lobby's counters (IKE_SA_INITs from unknown addresses, cookies, identities no
        // peer has) are shown as a peer of their own.
        if let Some(l) = &self.lobby {
            let ids = l.config().lobby.as_deref().unwrap_or_default();
            let ids = ids.iter().map(Id::display).collect::<Vec<_>>().join(", ");
            v.push(engine_status(
                (LOBBY, "responder"),
                (l.config().local_id.display(), ids),
                l,
                now,
            ));
        }
        v
    }

    /// Wireshark's `ikev2_decryption_table` lines of the current IKE SAs.
    pub(super) fn wireshark_ike(&self) -> Vec<zeroize::Zeroizing<String>> {
        self.peers
            .iter()
            .flat_map(|p| p.engine.ike_keys())
            .filter_map(|(i, r, ei, er)| crate::wireshark::ikev2_line(i, r, &ei, &er))
            .collect()
    }
}

/// `peers` with the SAs of `engines` in place of `EspPending`.
fn keyed_with<'a>(engines: impl Iterator<Item = &'a Peer>, peers: &[PeerSpec]) -> Vec<PeerSpec> {
    let engines: Vec<&Peer> = engines.collect();
    peers
        .iter()
        .map(|p| {
            let Some(e) = engines.iter().find(|q| q.name == p.name) else {
                return p.clone();
            };
            let (udp_port, replay_window) = match &p.encap {
                EncapSpec::Esp {
                    udp_port,
                    replay_window,
                    ..
                }
                | EncapSpec::EspPending {
                    udp_port,
                    replay_window,
                } => (*udp_port, *replay_window),
                EncapSpec::IpIp => return p.clone(),
            };
            let sas = e.engine.sas();
            let mut q = p.clone();
            match sas.out {
                None => {
                    q.encap = EncapSpec::EspPending {
                        udp_port,
                        replay_window,
                    };
                    q.negotiated = None;
                }
                Some(ChildKeys {
                    spi_out,
                    key_out,
                    esn,
                    ..
                }) => {
                    // The primary inbound SA: the newest with the outbound SA's ESN.
                    let mut ins: Vec<_> = sas
                        .ins
                        .into_iter()
                        .map(|c| (c.spi_in, c.key_in, c.esn))
                        .collect();
                    let at = ins.iter().position(|(_, _, e)| *e == esn).unwrap_or(0);
                    let (spi_in, key_in, _) = ins.remove(at);
                    // MOBIKE moved the peer (its UPDATE_SA_ADDRESSES): ESP follows, and
                    // only from there is it accepted.
                    // (A multipath peer's paths have their own addresses.)
                    if let (Some(_), None, Some(at)) =
                        (q.endpoint, &q.multipath, e.engine.mobike_peer())
                    {
                        q.endpoint = Some(at.ip());
                    }
                    // ESP in UDP goes to the port IKE floated to (a NAT may map it).
                    let udp_port = match (udp_port, e.engine.peer_addr()) {
                        (Some(_), Some(a)) if a.port() != crate::wire::ip::IKE_PORT => {
                            Some(a.port())
                        }
                        (u, _) => u,
                    };
                    q.encap = EncapSpec::Esp {
                        cipher: key_out.cipher(),
                        spi_out,
                        key_out,
                        spi_in,
                        key_in,
                        replay_window,
                        esn,
                        lifetime: Lifetime::default(),
                        udp_port,
                    };
                    q.negotiated = Some(ins);
                }
            }
            q
        })
        .collect()
}

/// One engine's status: its SAs and counters.
fn engine_status(
    (peer, role): (&str, &str),
    (local_id, remote_id): (String, String),
    engine: &Engine,
    now: u64,
) -> crate::status::IkePeerStatus {
    let st = engine.stats();
    crate::status::IkePeerStatus {
        peer: peer.to_string(),
        role: role.to_string(),
        local_id,
        remote_id,
        sas: engine
            .status(now)
            .into_iter()
            .map(|s: SaStatus| crate::status::IkeSaStatus {
                kind: s.kind.into(),
                spis: s.spis,
                state: s.state.into(),
                proposal: s.proposal,
                age_s: s.age_ms as f64 / 1000.0,
                rekey_in_s: s.rekey_in_ms.map(|m| m as f64 / 1000.0),
            })
            .collect(),
        established: st.established,
        child_rekeys: st.child_rekeys,
        ike_rekeys: st.ike_rekeys,
        requests: st.requests,
        retransmits: st.retransmits,
        responses: st.responses,
        failures: st.failures.iter().map(|(f, n)| (f.name(), *n)).collect(),
        mobike: engine.mobike_peer().is_some(),
        address_updates: st.address_updates,
        peer_address: engine.peer_addr().map(|a| a.to_string()),
    }
}

/// An IPv4-mapped IPv6 source as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn log_event(peer: &str, e: &Event) {
    match e {
        Event::IkeUp {
            spis,
            proposal,
            natt,
            mobike,
        } => info!(peer, spis, proposal, natt, mobike, "IKE SA established"),
        Event::Moved { from, to, who } => info!(
            peer,
            %from,
            %to,
            who,
            "IKE: addresses moved (MOBIKE or a liveness check from the new address)"
        ),
        Event::ChildUp {
            spi_in,
            spi_out,
            proposal,
            ts,
            rekey_of,
        } => match rekey_of {
            None => info!(
                peer,
                spi_in = format!("{spi_in:#010x}"),
                spi_out = format!("{spi_out:#010x}"),
                proposal,
                ts,
                "CHILD_SA installed"
            ),
            Some(old) => info!(
                peer,
                spi_in = format!("{spi_in:#010x}"),
                spi_out = format!("{spi_out:#010x}"),
                old_spi_in = format!("{old:#010x}"),
                proposal,
                "CHILD_SA rekeyed"
            ),
        },
        Event::IkeRekeyed { spis } => info!(peer, spis, "IKE SA rekeyed"),
        Event::ChildDown { spi_in, why } => {
            info!(
                peer,
                spi_in = format!("{spi_in:#010x}"),
                why,
                "CHILD_SA removed"
            )
        }
        Event::Collision { detail } => info!(peer, detail, "IKE: rekey collision resolved"),
        Event::IkeDown { why } => warn!(peer, why, "IKE SA gone"),
        // Rate-limited by the caller (FailureLog).
        Event::Failed { reason, detail } => warn!(peer, reason = %reason, "IKE: {detail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_logged_once_then_summarised_per_interval() {
        let mut log = FailureLog::default();
        let t0 = Instant::now();
        let s = std::time::Duration::from_secs;
        assert_eq!(log.note("b", "NO_PROPOSAL_CHOSEN", t0), Some(0));
        // A flood in the next seconds: not one more line.
        for i in 0..100_000u64 {
            let t = t0 + std::time::Duration::from_micros(i * 40);
            assert_eq!(log.note("b", "NO_PROPOSAL_CHOSEN", t), None);
        }
        // Another reason or peer is logged on its own.
        assert_eq!(log.note("b", "AUTHENTICATION_FAILED", t0 + s(1)), Some(0));
        assert_eq!(log.note("c", "NO_PROPOSAL_CHOSEN", t0 + s(1)), Some(0));
        assert!(log.due(t0 + s(30)).is_empty());
        // After the interval: one summary with the count.
        assert_eq!(
            log.due(t0 + s(60)),
            vec![("b".to_string(), "NO_PROPOSAL_CHOSEN".to_string(), 100_000)]
        );
        assert!(log.due(t0 + s(61)).is_empty());
        // A wrong key retried every 5 s: one line a minute.
        let mut lines = 0;
        for i in 0..120u64 {
            if log
                .note("d", "AUTHENTICATION_FAILED", t0 + s(5 * i))
                .is_some()
            {
                lines += 1;
            }
        }
        assert_eq!(lines, 10);
    }
}

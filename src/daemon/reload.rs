//! `espip reload` and SIGHUP: apply a new configuration to the running data path without
//! stopping it.
//!
//! What may change: peers (added, removed, endpoints, `allowed_ips`, keys and SPIs, lifetimes,
//! replay windows of new SAs). What may not (a restart applies it, and the reload says so):
//! the `[interface]`, `[nat]`, `[capture]` and `[metrics]` sections, the tunnel MTU, and a
//! transport no socket was opened for at start (the first ESP-in-UDP peer, say).
//!
//! Steps, each of which refuses the whole reload (the old configuration keeps running):
//! 1. compare the sections that cannot change;
//! 2. build the next generation from the current one (`datapath::rebuild`): an SA whose SPI,
//!    key, cipher and ESN are unchanged is the same SA, shared, its sequence numbers and
//!    replay window continue;
//! 3. reserve sequence numbers for every new outbound SA before it can send: a key the
//!    daemon already holds continues after its reservation, a new key's file comes from
//!    `espip reload` (opened by root, passed over the control socket) or, for a daemon still
//!    running as root, is opened here;
//! 4. publish: the RX thread gets the new inbound half (it adopts the continuing SAs' replay
//!    windows before its next batch), then the generation is swapped for the TX thread and
//!    the control side; routes of removed prefixes go, new ones come; key files no SA uses
//!    are closed.
//!
//! Packets of peers that did not change are never touched: the TX thread finishes its batch
//! on the old generation and takes the next batch with the new one, both sharing the SA.

use super::seq::reserve_new;
use crate::config::Config;
use crate::control::Live;
use crate::control::Refused;
use crate::datapath::{self, EncapSpec, TunnelSpec};
use crate::prefix::Prefix;
use crate::sys::seqstore::SeqStore;
use crate::telemetry::{Generation, InboundHandoff};
use crate::wire::ip::{PROTO_ESP, PROTO_IPIP, PROTO_UDP};
use std::collections::HashSet;
use std::fs::File;
use std::sync::Arc;
use tracing::info;

/// What the running daemon cannot change without a restart, and what a reload changes.
pub(super) struct Reloader<'a> {
    /// The control side's view (holds the current generation).
    pub live: &'a Live,
    /// Sequence reservations.
    pub store: &'a mut SeqStore,
    /// Where the RX thread picks up its new inbound half.
    pub handoff: &'a InboundHandoff,
    /// Routes espip added to the TUN (only these are ever removed).
    pub routes: &'a mut Vec<Prefix>,
    /// Transports with a socket: (IPv6, protocol 50, 4 or 17).
    pub transports: Vec<(bool, u8)>,
}

impl Reloader<'_> {
    /// Apply `cfg`; `key_files`: state files of new keys opened by root (`espip reload`).
    /// Returns a one-line summary; on error nothing changed.
    pub(super) async fn apply(
        &mut self,
        mut cfg: Config,
        key_files: Vec<(String, File)>,
    ) -> Result<String, Refused> {
        for w in super::uplinks::resolve(&mut cfg)? {
            tracing::warn!("{w}");
        }
        let old = self.live.current.load_full();
        self.compatible(&old.cfg, &cfg)?;
        let tunnel = TunnelSpec {
            relay: cfg.interface.forward,
            mtu: self.live.mtu,
        };
        let (outbound, inbound) =
            datapath::rebuild(&cfg.peers, tunnel, cfg.nat_table(), &old.outbound)?;
        // Sequence numbers of new SAs are durable before anything can send with them.
        let reserved = reserve_new(&outbound, &old.outbound, self.store, key_files);
        let in_use: HashSet<String> = (0..outbound.peer_count())
            .filter_map(|i| {
                outbound
                    .sa_reservation(i)
                    .map(|(_, fp, _, _)| fp.to_string())
            })
            .collect();
        if let Err(e) = reserved {
            // Close what this attempt opened; the running SAs' files stay.
            let running: HashSet<String> = (0..old.outbound.peer_count())
                .filter_map(|i| {
                    old.outbound
                        .sa_reservation(i)
                        .map(|(_, fp, _, _)| fp.to_string())
                })
                .collect();
            self.store.retain(|fp| running.contains(fp));
            return Err(e);
        }
        let summary = summarize(&old.cfg, &cfg);
        let sources = super::setup::outer_sources(&cfg);
        let next = Generation {
            sent_from: super::setup::sent_from(&cfg, &sources),
            sources,
            outbound,
            cfg: Arc::new(cfg),
            number: old.number + 1,
        };
        let wanted = next.cfg.routes();
        // The RX thread first (a new peer's first packet finds its SA), then everyone else.
        self.handoff.offer(inbound);
        self.live.current.store(Arc::new(next));
        self.store.retain(|fp| in_use.contains(fp));
        let remove: Vec<Prefix> = self
            .routes
            .iter()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        let add: Vec<Prefix> = wanted
            .iter()
            .filter(|p| !self.routes.contains(p))
            .copied()
            .collect();
        let name = old.cfg.interface.name.clone();
        let routes = match crate::sys::netlink::update_routes(&name, &add, &remove).await {
            Ok(added) => {
                self.routes.retain(|p| !remove.contains(p));
                self.routes.extend(added);
                String::new()
            }
            Err(e) => format!(
                "; but the routes could not be updated ({e}): traffic to new prefixes may not reach the TUN"
            ),
        };
        info!(
            generation = old.number + 1,
            "configuration reloaded: {summary}{routes}"
        );
        Ok(format!("{summary}{routes}"))
    }

    /// Publish `cfg`, the running configuration with IKEv2's current SAs in place of its
    /// ikev2 peers' `EspPending` (a rekey, an SA installed or removed): a new generation in
    /// which every other SA continues. Nothing but SAs changes, so no route moves and no
    /// reservation is written (negotiated keys have none). Synchronous: the caller sends the
    /// IKE message that lets the peer use a new SA only after this returned.
    pub(super) fn publish_keys(&mut self, cfg: Config) -> Result<(), Refused> {
        let old = self.live.current.load_full();
        let tunnel = TunnelSpec {
            relay: cfg.interface.forward,
            mtu: self.live.mtu,
        };
        let (outbound, inbound) =
            datapath::rebuild(&cfg.peers, tunnel, cfg.nat_table(), &old.outbound)?;
        reserve_new(&outbound, &old.outbound, self.store, Vec::new())?;
        let next = Generation {
            sent_from: old.sent_from.clone(),
            sources: old.sources.clone(),
            outbound,
            cfg: Arc::new(cfg),
            number: old.number + 1,
        };
        self.handoff.offer(inbound);
        self.live.current.store(Arc::new(next));
        Ok(())
    }

    /// Refuse what only a restart can change.
    fn compatible(&self, old: &Config, new: &Config) -> Result<(), Refused> {
        // (The caller adds that the running configuration is unchanged.)
        let restart = |what: &str| Err(Refused::NeedsRestart(what.to_string()));
        if old.interface != new.interface {
            let keys = old.interface.changed_keys(&new.interface);
            return restart(&format!(
                "[interface] {} ({})",
                if keys.len() == 1 { "key" } else { "keys" },
                keys.join(", ")
            ));
        }
        if old.nat != new.nat {
            return restart("[nat]");
        }
        if old.capture != new.capture {
            return restart("[capture]");
        }
        if old.metrics != new.metrics {
            return restart("[metrics]");
        }
        for p in &new.peers {
            let (protocol, what) = match p.encap {
                EncapSpec::Esp {
                    udp_port: Some(_), ..
                }
                | EncapSpec::EspPending {
                    udp_port: Some(_), ..
                } => (PROTO_UDP, "esp-udp (the ESP-in-UDP socket)"),
                EncapSpec::Esp { .. } | EncapSpec::EspPending { .. } => {
                    (PROTO_ESP, "esp (a raw socket for protocol 50)")
                }
                EncapSpec::IpIp => (PROTO_IPIP, "ipip (raw sockets for protocols 4 and 41)"),
            };
            for v6 in new.peer_families(p) {
                if !self.transports.contains(&(v6, protocol)) {
                    return Err(Refused::NewTransport {
                        peer: p.name.clone(),
                        mode: what,
                        family: if v6 { "IPv6" } else { "IPv4" },
                    });
                }
            }
        }
        if new.interface.mtu.is_none() {
            let mtu = super::setup::tunnel_mtu(new).map_err(|e| Refused::Mtu(e.to_string()))?;
            if mtu != self.live.mtu {
                return Err(Refused::MtuChange {
                    from: self.live.mtu,
                    to: mtu,
                });
            }
        }
        Ok(())
    }
}

/// "peers added [c], removed [d], changed [b], unchanged 1".
fn summarize(old: &Config, new: &Config) -> String {
    let names = |c: &Config| c.peers.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    let (o, n) = (names(old), names(new));
    let added: Vec<_> = n.iter().filter(|x| !o.contains(x)).cloned().collect();
    let removed: Vec<_> = o.iter().filter(|x| !n.contains(x)).cloned().collect();
    let mut changed = Vec::new();
    let mut same = 0;
    for p in &new.peers {
        if let Some(q) = old.peers.iter().find(|q| q.name == p.name) {
            if q.endpoint == p.endpoint
                && q.multipath == p.multipath
                && q.allowed_ips == p.allowed_ips
                && q.route == p.route
                && q.describe(0) == p.describe(0)
                && keys(q) == keys(p)
            {
                same += 1;
            } else {
                changed.push(p.name.clone());
            }
        }
    }
    format!("peers added {added:?}, removed {removed:?}, changed {changed:?}, unchanged {same}")
}

fn keys(p: &datapath::PeerSpec) -> Option<(String, String)> {
    match &p.encap {
        EncapSpec::Esp {
            key_out, key_in, ..
        } => Some((key_out.fingerprint(), key_in.fingerprint())),
        EncapSpec::IpIp | EncapSpec::EspPending { .. } => None,
    }
}

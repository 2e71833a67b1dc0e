//! Building a generation's outbound and inbound halves from the peers' specifications, carrying
//! over what continues from the previous generation (SAs, counters, paths).

use super::*;

fn sa_ids(encap: &EncapSpec) -> Option<(SaId, SaId)> {
    match encap {
        EncapSpec::IpIp | EncapSpec::EspPending { .. } => None,
        EncapSpec::Esp {
            cipher,
            spi_out,
            key_out,
            spi_in,
            key_in,
            esn,
            ..
        } => Some((
            SaId {
                cipher: *cipher,
                spi: *spi_out,
                key: key_out.fingerprint(),
                esn: *esn,
            },
            SaId {
                cipher: *cipher,
                spi: *spi_in,
                key: key_in.fingerprint(),
                esn: *esn,
            },
        )),
    }
}

/// What a peer's encapsulation gives its two halves: ports, SAs, lifetime and keying.
struct EncapParts {
    port: u16,
    udp: bool,
    sa_out: Option<(SaId, Arc<OutboundSa>)>,
    used: Arc<SharedUsed>,
    sa_in: Option<(SaId, InboundSa)>,
    older: Vec<(SaId, InboundSa)>,
    lifetime: Lifetime,
    keyless: bool,
    negotiated: bool,
}

/// The maps an `Inbound` finds peers by, filled peer by peer with the duplicates refused.
#[derive(Default)]
struct Lookups {
    by_spi: HashMap<u32, usize>,
    by_endpoint: HashMap<IpAddr, usize>,
}

impl Lookups {
    /// Inbound SPI `spi` belongs to peer `i`.
    fn spi(&mut self, spi: u32, i: usize, peers: &[PeerSpec]) -> Result<(), BuildError> {
        match self.by_spi.insert(spi, i) {
            Some(j) => Err(BuildError::DuplicateSpi {
                spi,
                first: peers[j].name.clone(),
                second: peers[i].name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// IP-in-IP from `endpoint` belongs to peer `i` (its own paths may share one).
    fn endpoint(
        &mut self,
        endpoint: IpAddr,
        i: usize,
        peers: &[PeerSpec],
    ) -> Result<(), BuildError> {
        match self.by_endpoint.insert(endpoint, i) {
            Some(j) if j != i => Err(BuildError::DuplicateIpIpEndpoint {
                endpoint,
                first: peers[j].name.clone(),
                second: peers[i].name.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// Peer `i`'s SAs and keying by its encapsulation; `kept`: its outbound SA of the previous
/// generation when the same one continues.
fn encap_parts(
    peers: &[PeerSpec],
    i: usize,
    kept: Option<(SaId, Arc<OutboundSa>, Arc<SharedUsed>)>,
    lookups: &mut Lookups,
) -> Result<EncapParts, BuildError> {
    let p = &peers[i];
    let keyless = |port: Option<u16>, keyless: bool| EncapParts {
        port: port.unwrap_or(0),
        udp: port.is_some(),
        sa_out: None,
        used: Arc::default(),
        sa_in: None,
        older: Vec::new(),
        lifetime: Lifetime::default(),
        keyless,
        negotiated: keyless,
    };
    match &p.encap {
        EncapSpec::IpIp => {
            for e in p.endpoints() {
                lookups.endpoint(e, i, peers)?;
            }
            Ok(keyless(None, false))
        }
        EncapSpec::EspPending { udp_port, .. } => Ok(keyless(*udp_port, true)),
        EncapSpec::Esp {
            spi_out,
            key_out,
            spi_in,
            key_in,
            replay_window,
            esn,
            lifetime,
            udp_port,
            ..
        } => {
            lookups.spi(*spi_in, i, peers)?;
            let (out_id, in_id) = sa_ids(&p.encap).expect("ESP has SA ids");
            let negotiated = p.negotiated.is_some();
            let (sa_out, used) = match kept {
                Some((id, sa, used)) => (Some((id, sa)), used),
                None => {
                    let sa = Arc::new(OutboundSa::new(*spi_out, key_out, *esn));
                    if negotiated {
                        // A key IKEv2 made for this process only: nothing to reserve.
                        sa.set_limit(u64::MAX);
                    }
                    (Some((out_id, sa)), Arc::default())
                }
            };
            let mut older = Vec::new();
            for (spi, key, esn) in p.negotiated.iter().flatten() {
                lookups.spi(*spi, i, peers)?;
                let id = SaId {
                    cipher: key.cipher(),
                    spi: *spi,
                    key: key.fingerprint(),
                    esn: *esn,
                };
                older.push((id, InboundSa::new(*spi, key, *esn, *replay_window)));
            }
            Ok(EncapParts {
                port: udp_port.unwrap_or(0),
                udp: udp_port.is_some(),
                sa_out,
                used,
                sa_in: Some((in_id, InboundSa::new(*spi_in, key_in, *esn, *replay_window))),
                older,
                lifetime: *lifetime,
                keyless: false,
                negotiated,
            })
        }
    }
}

pub(super) fn build_with(
    peers: &[PeerSpec],
    tunnel: TunnelSpec,
    nat: NatTable,
    stats: Arc<Stats>,
    prev: Option<&Outbound>,
) -> Result<(Outbound, Inbound), BuildError> {
    let mut routes = PrefixTable::new();
    let mut lookups = Lookups::default();
    let mut out = Vec::new();
    let mut inp = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        for prefix in &p.allowed_ips {
            if let Some(j) = routes.insert(*prefix, i) {
                return Err(BuildError::DuplicatePrefix {
                    prefix: *prefix,
                    first: peers[j].name.clone(),
                    second: p.name.clone(),
                });
            }
        }
        let ids = sa_ids(&p.encap);
        let old = prev.and_then(|o| o.peers.iter().find(|q| q.name == p.name));
        // The same outbound SA continues (its sequence counter and lifetime use with it).
        let kept = old.and_then(|q| match (&q.sa, &ids) {
            (Some((id, sa)), Some((out_id, _))) if id == out_id => {
                Some((id.clone(), sa.clone(), q.used.clone()))
            }
            _ => None,
        });
        let mp = p.multipath.as_ref().map(|pp| {
            Arc::new(Multipath::new(
                pp.spec,
                pp.paths.clone(),
                old.and_then(|q| q.mp.as_deref()),
            ))
        });
        let peer_stats = match old {
            Some(q) if q.endpoint == p.endpoint && (kept.is_some() || ids.is_none()) => {
                q.stats.clone()
            }
            Some(q) => Arc::new(PeerStats::continued_from(&q.stats)),
            None => Arc::new(PeerStats::default()),
        };
        let parts = encap_parts(peers, i, kept, &mut lookups)?;
        out.push(OutPeer {
            name: p.name.clone(),
            endpoint: p.endpoint,
            port: parts.port,
            sa: parts.sa_out,
            lifetime: parts.lifetime,
            used: parts.used,
            stats: peer_stats.clone(),
            mp: mp.clone(),
            keyless: parts.keyless,
            negotiated: parts.negotiated,
        });
        inp.push(InPeer {
            name: p.name.clone(),
            endpoint: p.endpoint,
            udp: parts.udp,
            sa: parts.sa_in,
            older: parts.older,
            lifetime: parts.lifetime,
            used: Used::default(),
            stats: peer_stats,
            mp: mp.map(InPaths::new),
        });
    }
    let outbound = Outbound {
        nat: nat.clone(),
        routes: routes.clone(),
        peers: out,
        tunnel,
        stats: stats.clone(),
    };
    let inbound = Inbound {
        nat,
        relay: tunnel.relay,
        allowed: routes,
        by_spi: lookups.by_spi,
        by_endpoint: lookups.by_endpoint,
        peers: inp,
        stats,
    };
    Ok((outbound, inbound))
}

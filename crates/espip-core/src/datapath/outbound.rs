//! The outbound half (RFC 4303 section 3.3): an inner packet from the TUN to its peer, wrapped, with
//! the wire it travels on.

use super::*;

impl Outbound {
    /// Process one inner packet read from the TUN. On `Send` the buffer holds the ESP packet
    /// (or the unchanged inner packet for IP-in-IP); on `ToTun` an ICMP error for the sender.
    pub fn process(&self, buf: &mut PacketBuf, now: u64) -> Verdict {
        let v = self.process_inner(buf, now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    fn process_inner(&self, buf: &mut PacketBuf, now: u64) -> Verdict {
        let Ok(inner) = InnerPacket::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        buf.truncate(inner.total_len);
        // The policy sees the real destination; a local DNAT may have moved it into an alias.
        let dst = self.nat.to_real(inner.dst).unwrap_or(inner.dst);
        let Some(&idx) = self.routes.lookup(dst) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if buf.len() > usize::from(self.tunnel.mtu) {
            // Quote the packet as the local stack sent it, so its conntrack recognises it.
            return self.too_big(buf, &inner);
        }
        if self.nat.egress(buf.as_mut_slice()).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let len = buf.len() as u64;
        let peer = &self.peers[idx];
        if peer.keyless {
            return Verdict::Drop(DropReason::NoSa);
        }
        let s = &*peer.stats;
        // A peer whose address is learned: nothing to send to until it has sent (the port,
        // for ESP in UDP, is `udp_port_seen`, set by the same packet).
        // (A multipath peer's paths know their own.)
        let endpoint = peer.endpoint.or_else(|| s.learned.get().map(|a| a.ip()));
        let Some(endpoint) = endpoint.or(peer.mp.as_ref().map(|_| IpAddr::from([0, 0, 0, 0])))
        else {
            return Verdict::Drop(DropReason::NoEndpoint);
        };
        let wire = match &peer.sa {
            Some((_, sa)) => {
                if !peer.lifetime.take(&peer.used, len, now) {
                    return Verdict::Drop(DropReason::LifetimeExpired);
                }
                let nh = if inner.is_ipv4() {
                    NEXT_HEADER_IPV4
                } else {
                    NEXT_HEADER_IPV6
                };
                let bare = peer.mp.is_some() && inner.is_pure_ack(buf.as_slice());
                match sa.encapsulate(buf, nh) {
                    Ok(seq) if peer.mp.is_some() => {
                        let (v, path) = self.schedule_on(idx, len, !inner.is_ipv4(), now, bare);
                        if let Some(mp) = &peer.mp {
                            // Kept for repair, with the path it took.
                            mp.keep(seq, len as usize, buf.as_slice(), path);
                        }
                        return v;
                    }
                    Ok(_) if peer.port != 0 => {
                        // The port the peer's last authenticated datagram came from wins.
                        let port = match s.udp_port_seen.load(Relaxed) {
                            0 => peer.port,
                            seen => seen as u16,
                        };
                        Wire::EspInUdp {
                            dst: SocketAddr::new(endpoint, port),
                            via: s.reply_via(),
                        }
                    }
                    Ok(_) => Wire::Esp {
                        dst: endpoint,
                        via: s.reply_via(),
                    },
                    Err(EspError::SeqExhausted) => return Verdict::Drop(DropReason::SeqExhausted),
                    Err(EspError::SeqUnreserved) => {
                        return Verdict::Drop(DropReason::SeqUnreserved)
                    }
                    Err(_) => return Verdict::Drop(DropReason::Malformed),
                }
            }
            None if peer.mp.is_some() => {
                let bare = inner.is_pure_ack(buf.as_slice());
                return self.schedule_on(idx, len, !inner.is_ipv4(), now, bare).0;
            }
            None => Wire::IpIp {
                dst: endpoint,
                inner_v6: !inner.is_ipv4(),
                via: Via::ROUTED,
            },
        };
        s.tx_packets.fetch_add(1, Relaxed);
        s.tx_bytes.fetch_add(len, Relaxed);
        s.last_tx.store(now, Relaxed);
        Verdict::Send(wire)
    }

    /// The verdict for a multipath peer's packet (already wrapped; `bare`: a pure TCP
    /// acknowledgment, see [`Multipath::pick_packet`]): the path(s) the schedule picks, with
    /// their counters, and the one path it picked (`None`: none, or several).
    fn schedule_on(
        &self,
        idx: usize,
        len: u64,
        inner_v6: bool,
        now: u64,
        bare: bool,
    ) -> (Verdict, Option<usize>) {
        let peer = &self.peers[idx];
        let mp = peer.mp.as_ref().expect("a multipath peer");
        let s = &*peer.stats;
        let pick = match mp.pick_packet(now, len as usize, bare) {
            // Learned paths: only those someone is behind.
            Pick::One(i) if mp.learns() && mp.endpoint_of(i).is_none() => None,
            Pick::Every(mask) if mp.learns() => {
                let known = (0..mp.paths.len())
                    .filter(|&i| mp.endpoint_of(i).is_some())
                    .fold(0u32, |m, i| m | 1 << i);
                Some(Pick::Every(mask & known)).filter(|p| *p != Pick::Every(0))
            }
            p => Some(p),
        };
        let Some(pick) = pick else {
            return (Verdict::Drop(DropReason::NoEndpoint), None);
        };
        s.tx_packets.fetch_add(1, Relaxed);
        s.tx_bytes.fetch_add(len, Relaxed);
        s.last_tx.store(now, Relaxed);
        let count = |i: usize| {
            let p = &mp.stats[i];
            p.tx_packets.fetch_add(1, Relaxed);
            p.tx_bytes.fetch_add(len, Relaxed);
        };
        match pick {
            Pick::One(i) => {
                count(i);
                (Verdict::Send(self.path_wire(idx, i, inner_v6)), Some(i))
            }
            Pick::Every(mask) => {
                for i in (0..mp.paths.len()).filter(|i| mask & (1 << i) != 0) {
                    count(i);
                }
                if mask.count_ones() == 1 {
                    let i = mask.trailing_zeros() as usize;
                    (Verdict::Send(self.path_wire(idx, i, inner_v6)), Some(i))
                } else {
                    let v = Verdict::SendEvery {
                        peer: idx as u16,
                        mask,
                        inner_v6,
                    };
                    (v, None)
                }
            }
        }
    }

    /// Count `n` outer packets to `dst` (sent by `via`) that the kernel refused to send
    /// against the multipath path with that endpoint and way out, if there is one.
    pub fn count_refused(&self, dst: IpAddr, via: Via, n: u64) {
        let path = self
            .peers
            .iter()
            .filter_map(|p| p.mp.as_ref())
            .find_map(|mp| {
                (0..mp.paths.len())
                    .find(|&i| {
                        mp.endpoint_of(i).is_some_and(|e| e.0 == dst) && mp.path_via(i) == via
                    })
                    .map(|i| &mp.stats[i])
            });
        if let Some(p) = path {
            p.send_refused.fetch_add(n, Relaxed);
        }
        if let Some(src) = via.src {
            // A source this host no longer has (it roamed): answer from the routed one
            // until a packet lands on an address of ours again.
            for p in &self.peers {
                p.stats.reply_from.refused(src);
                if let Some(mp) = &p.mp {
                    for s in &mp.stats {
                        s.reply_from.refused(src);
                    }
                }
            }
        }
    }

    /// How a packet for path `path` of multipath peer `peer` travels (ESP in UDP: to the port
    /// the path's last authenticated datagram came from, else the configured one).
    pub fn path_wire(&self, peer: usize, path: usize, inner_v6: bool) -> Wire {
        let p = &self.peers[peer];
        let (endpoint, port, seen, via) = match &p.mp {
            Some(mp) => {
                // (A learned path not learned yet: the caller never picks it.)
                let (endpoint, port) = mp
                    .endpoint_of(path)
                    .unwrap_or((IpAddr::from([0, 0, 0, 0]), 0));
                let seen = match mp.paths[path].learned {
                    true => 0,
                    false => mp.stats[path].udp_port_seen.load(Relaxed),
                };
                (endpoint, port, seen, mp.path_via(path))
            }
            None => (
                p.endpoint
                    .or_else(|| p.stats.learned.get().map(|a| a.ip()))
                    .unwrap_or(IpAddr::from([0, 0, 0, 0])),
                p.port,
                p.stats.udp_port_seen.load(Relaxed),
                p.stats.reply_via(),
            ),
        };
        match (&p.sa, port) {
            (None, _) => Wire::IpIp {
                dst: endpoint,
                inner_v6,
                via,
            },
            (Some(_), 0) => Wire::Esp { dst: endpoint, via },
            (Some(_), port) => Wire::EspInUdp {
                dst: SocketAddr::new(endpoint, if seen == 0 { port } else { seen as u16 }),
                via,
            },
        }
    }

    /// The multipath control tick at `now` (every probe interval; `started`: when the data
    /// path started; a peer's tick does nothing until its probe interval is over): liveness and schedules of every multipath peer, and the probes to send
    /// (ESP dummy packets, authenticated by the peer's SA). Returns the state changes as
    /// (peer, path, state) and the probes, wrapped, with their wires.
    #[allow(clippy::type_complexity)]
    pub fn tick(
        &self,
        now: u64,
    ) -> (
        Vec<(usize, usize, crate::multipath::PathState)>,
        Vec<(PacketBuf, Wire)>,
    ) {
        let mut events = Vec::new();
        let mut out = Vec::new();
        for (idx, peer) in self.peers.iter().enumerate() {
            let (Some(mp), Some((_, sa))) = (&peer.mp, &peer.sa) else {
                // IP-in-IP has no SA to authenticate probes: its paths stay as configured.
                continue;
            };
            let (ev, mut probes) = mp.tick(now);
            events.extend(ev.into_iter().map(|e| (idx, e.path, e.state)));
            // The probe of a live path goes last and lists the others' sequence numbers, so
            // the peer does not wait for those that a dead path loses: the live path of least
            // delay, whose probe arrives first, so the peer forgets the others' numbers before
            // its reorder stage waits for them behind a slower path.
            let carrier = probes
                .iter()
                .enumerate()
                .filter(|(_, (i, _))| mp.stats[*i].state() == crate::multipath::PathState::Up)
                .min_by_key(|(_, (i, _))| match mp.stats[*i].min_rtt_ns.load(Relaxed) {
                    0 => u64::MAX,
                    r => r,
                })
                .map(|(k, _)| k);
            if let Some(c) = carrier {
                let last = probes.len() - 1;
                probes.swap(c, last);
            }
            let mut seqs = Vec::new();
            let count = probes.len();
            for (k, (path, mut probe)) in probes.into_iter().enumerate() {
                if carrier.is_some() && k == count - 1 {
                    for (slot, s) in probe.skip.iter_mut().zip(&seqs) {
                        *slot = *s;
                    }
                    probe.skipped = seqs.len().min(crate::multipath::MAX_PATHS) as u8;
                }
                if let Some((bytes, ids)) = mp.train_plan(path, probe.id, now) {
                    out.extend(self.train(idx, path, bytes, ids, now));
                    // P2 counts what the train added.
                    probe.tx_bytes = mp.stats[path].tx_bytes.load(Relaxed);
                }
                if !peer.lifetime.take(&peer.used, probe.len() as u64, now) {
                    break;
                }
                let mut buf = PacketBuf::new(Probe::LEN + 8 * crate::multipath::MAX_PATHS);
                buf.reset();
                probe.emit(&mut buf.read_area()[..probe.len()]);
                buf.set_len(probe.len());
                if let Ok(seq) = sa.encapsulate(&mut buf, NEXT_HEADER_DUMMY) {
                    seqs.push(seq);
                    out.push((buf, self.path_wire(idx, path, false)));
                }
            }
        }
        (events, out)
    }

    /// A capacity train on `path` of `peer` (see `multipath::train`): probe `ids[0]`, half
    /// of `bytes` in fillers, probe `ids[1]`, the other half (the round's own probe, `ids[2]`,
    /// follows), wrapped, back to back. The fillers count as inner bytes sent on the path, as
    /// the peer counts them received.
    fn train(
        &self,
        peer: usize,
        path: usize,
        bytes: usize,
        ids: [u64; 3],
        now: u64,
    ) -> Vec<(PacketBuf, Wire)> {
        use crate::multipath::{ProbeKind, FILL_LEN};
        let p = &self.peers[peer];
        let (Some(mp), Some((_, sa))) = (&p.mp, &p.sa) else {
            return Vec::new();
        };
        let stats = &mp.stats[path];
        let half = bytes.div_ceil(2 * FILL_LEN);
        let mut out = Vec::with_capacity(2 * half + 2);
        for id in &ids[..2] {
            let probe = Probe {
                tx_bytes: stats.tx_bytes.load(Relaxed),
                ..Probe::new(ProbeKind::Probe, path as u8, *id, now, 0)
            };
            let mut buf = PacketBuf::new(FILL_LEN.max(Probe::LEN));
            buf.reset();
            probe.emit(&mut buf.read_area()[..probe.len()]);
            buf.set_len(probe.len());
            if !p.lifetime.take(&p.used, probe.len() as u64, now)
                || sa.encapsulate(&mut buf, NEXT_HEADER_DUMMY).is_err()
            {
                return out;
            }
            stats.probes_sent.fetch_add(1, Relaxed);
            out.push((buf, self.path_wire(peer, path, false)));
            for _ in 0..half {
                let mut buf = PacketBuf::new(FILL_LEN);
                buf.reset();
                Probe::emit_fill(path as u8, &mut buf.read_area()[..FILL_LEN]);
                buf.set_len(FILL_LEN);
                if !p.lifetime.take(&p.used, FILL_LEN as u64, now)
                    || sa.encapsulate(&mut buf, NEXT_HEADER_DUMMY).is_err()
                {
                    return out;
                }
                stats.tx_bytes.fetch_add(FILL_LEN as u64, Relaxed);
                out.push((buf, self.path_wire(peer, path, false)));
            }
        }
        out
    }

    /// Wrap the echo payload in `buf` (left there by [`Inbound::process`] with
    /// [`Verdict::Echo`]) for `peer` and say where it goes: back to where the probe came from
    /// (`to`), the way the probe's path leaves (`via`).
    pub fn echo(
        &self,
        peer: usize,
        buf: &mut PacketBuf,
        to: SocketAddr,
        via: Via,
        now: u64,
    ) -> Verdict {
        let Some(p) = self.peers.get(peer) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let Some((_, sa)) = &p.sa else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if !p.lifetime.take(&p.used, buf.len() as u64, now) {
            return Verdict::Drop(DropReason::LifetimeExpired);
        }
        match sa.encapsulate(buf, NEXT_HEADER_DUMMY) {
            Ok(_) if p.port != 0 => Verdict::Send(Wire::EspInUdp { dst: to, via }),
            Ok(_) => Verdict::Send(Wire::Esp { dst: to.ip(), via }),
            Err(EspError::SeqExhausted) => Verdict::Drop(DropReason::SeqExhausted),
            Err(EspError::SeqUnreserved) => Verdict::Drop(DropReason::SeqUnreserved),
            Err(_) => Verdict::Drop(DropReason::Malformed),
        }
    }

    /// The requests of `peer` (a multipath ESP peer) for the sequence numbers `seqs`
    /// (ascending) of SA `spi`, wrapped, on its fastest path.
    pub fn nack(&self, peer: usize, spi: u32, seqs: &[u64], now: u64) -> Vec<(PacketBuf, Wire)> {
        let Some(p) = self.peers.get(peer) else {
            return Vec::new();
        };
        let (Some(mp), Some((_, sa))) = (&p.mp, &p.sa) else {
            return Vec::new();
        };
        let Some(path) = mp.repair_path(None) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for n in crate::multipath::Nack::for_seqs(spi, seqs) {
            if !p.lifetime.take(&p.used, n.len() as u64, now) {
                break;
            }
            let mut buf = PacketBuf::new(n.len());
            buf.reset();
            n.emit(&mut buf.read_area()[..n.len()]);
            buf.set_len(n.len());
            if sa.encapsulate(&mut buf, NEXT_HEADER_DUMMY).is_ok() {
                out.push((buf, self.path_wire(peer, path, false)));
            }
        }
        out
    }

    /// The packets `peer` asks for again in `request` (left in the buffer by
    /// [`Inbound::process`] with [`Verdict::Repair`]): each one still kept, as it was sent,
    /// on the fastest path other than the one that lost it, counted as `repaired` there.
    pub fn repair(&self, peer: usize, request: &[u8]) -> Vec<(PacketBuf, Wire)> {
        let Some(p) = self.peers.get(peer) else {
            return Vec::new();
        };
        let (Some(mp), Some(n)) = (&p.mp, crate::multipath::Nack::parse(request)) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for seq in n.seqs() {
            let copy = mp.kept(n.spi, seq, |packet, _, lost_on| {
                let mut buf = PacketBuf::new(packet.len());
                buf.reset();
                buf.read_area()[..packet.len()].copy_from_slice(packet);
                buf.set_len(packet.len());
                (buf, lost_on)
            });
            let Some((buf, lost_on)) = copy else {
                continue;
            };
            let Some(path) = mp.repair_path(lost_on) else {
                continue;
            };
            // Not counted as sent on the path: the controller compares what a path was sent
            // with what the peer received on it, and a repair of a packet that was late,
            // not lost, is a duplicate the peer drops. Counted, a path carrying repairs
            // looked lossy (a link back from a cut stayed at 3 of its 60 Mbit/s).
            mp.stats[path].repaired.fetch_add(1, Relaxed);
            out.push((buf, self.path_wire(peer, path, false)));
        }
        out
    }

    /// Multipath peer `idx`'s shared path state (`None`: a single-path peer).
    pub fn multipath(&self, idx: usize) -> Option<&Arc<Multipath>> {
        self.peers.get(idx)?.mp.as_ref()
    }

    fn too_big(&self, buf: &mut PacketBuf, inner: &InnerPacket) -> Verdict {
        let mtu = self.tunnel.mtu;
        let made = match inner.src {
            IpAddr::V4(_) if !inner.dont_fragment => {
                // The sender allowed fragmentation; the inner packet is larger than the tunnel
                // MTU only when the TUN MTU was raised by hand. Refuse rather than fragment.
                Err(icmp::NoIcmp::Forbidden)
            }
            // The source is the packet's own destination, as if the tunnel's far end were the
            // router that could not forward it. The TUN's own address would be a local source
            // arriving from outside, which Linux discards as a martian (so a local sender
            // would never learn the path MTU); the destination is routed through the TUN, so
            // the reverse-path filter accepts it.
            IpAddr::V4(_) => match inner.dst {
                IpAddr::V4(d) => icmp::frag_needed_v4(buf, d, mtu),
                IpAddr::V6(_) => Err(icmp::NoIcmp::Malformed),
            },
            IpAddr::V6(_) => match inner.dst {
                IpAddr::V6(d) => icmp::packet_too_big_v6(buf, d, u32::from(mtu)),
                IpAddr::V4(_) => Err(icmp::NoIcmp::Malformed),
            },
        };
        match made {
            Ok(()) => {
                // The packet is dropped all the same: count it here, since `ToTun` is not
                // counted by `process`.
                self.stats.count_drop(DropReason::TooBig);
                Verdict::ToTun
            }
            Err(_) => Verdict::Drop(DropReason::TooBig),
        }
    }

    /// The outbound SA state of each peer: (SPI, next sequence number), `None` for IP-in-IP.
    pub fn sa_state(&self) -> Vec<Option<(u32, u64)>> {
        self.peers
            .iter()
            .map(|p| p.sa.as_ref().map(|(_, s)| (s.spi(), s.next_seq())))
            .collect()
    }

    /// Peer `idx`'s outbound SA, static or negotiated: (next sequence number, the
    /// reservation's limit for a static SA; `None` for a negotiated one, whose fresh keys
    /// need none).
    pub fn sa_sequence(&self, idx: usize) -> Option<(u64, Option<u64>)> {
        let p = self.peers.get(idx)?;
        let (_, sa) = p.sa.as_ref()?;
        Some((sa.next_seq(), (!p.negotiated).then(|| sa.limit())))
    }

    /// Peer `idx`'s outbound SA: (SPI, key fingerprint, next sequence number, limit).
    pub fn sa_reservation(&self, idx: usize) -> Option<(u32, &str, u64, u64)> {
        let p = self.peers.get(idx)?;
        if p.negotiated {
            return None;
        }
        let (_, sa) = p.sa.as_ref()?;
        Some((sa.spi(), sa.key_fingerprint(), sa.next_seq(), sa.limit()))
    }

    /// Whether peer `idx`'s outbound SA is the very SA of `prev` (continued by a reload,
    /// its sequence numbers already reserved) rather than a new one.
    pub fn sa_continues(&self, idx: usize, prev: &Outbound) -> bool {
        let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) else {
            return false;
        };
        prev.peers
            .iter()
            .any(|q| q.sa.as_ref().is_some_and(|(_, o)| Arc::ptr_eq(o, sa)))
    }

    /// Peer `idx`'s counters (peers are indexed as given to [`build`] or [`rebuild`]).
    pub fn peer_stats(&self, idx: usize) -> &PeerStats {
        &self.peers[idx].stats
    }

    /// The counters of the whole data path.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Allow peer `idx`'s outbound SA to send up to sequence number `limit`.
    pub fn set_limit(&self, idx: usize, limit: u64) {
        if let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) {
            sa.set_limit(limit);
        }
    }

    /// Continue peer `idx`'s outbound SA from sequence number `seq` (tests, restarts).
    pub fn set_next_seq(&self, idx: usize, seq: u64) {
        if let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) {
            sa.set_next_seq(seq);
        }
    }
}

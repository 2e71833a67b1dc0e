//! The inbound half (RFC 4303 section 3.4): an outer packet from the wire to the TUN, unwrapped,
//! checked and (for multipath peers) put back in order.

use super::*;

/// An authenticated ESP packet: the peer's index, the next header, the sequence number, the
/// path it came by, and its SA (SPI, and whether that SA holds the peer's newest keys).
type Opened = (usize, u8, u64, Option<usize>, (u32, bool));

impl Inbound {
    /// Process one packet from a raw socket (`buf` holds what follows the outer IP header;
    /// `outer_src` and `protocol` come from that header) or one datagram from the ESP-in-UDP
    /// socket (`buf` holds the UDP payload, `protocol` is 17). On `ToTun` the buffer holds the
    /// inner packet.
    pub fn process(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        now: u64,
    ) -> Verdict {
        self.process_at(buf, outer_src, protocol, Landing::UNKNOWN, now)
    }

    /// [`Inbound::process`], knowing where the packet landed (which of a multipath peer's
    /// paths that share its address it came by).
    pub fn process_at(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        landing: Landing,
        now: u64,
    ) -> Verdict {
        let v = self.process_inner(buf, outer_src, protocol, 0, landing, now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    /// Process the payload of one UDP datagram from `from` (ESP in UDP, RFC 3948). Once it
    /// authenticates, its source port becomes the one the peer's packets go to.
    pub fn process_udp(&mut self, buf: &mut PacketBuf, from: SocketAddr, now: u64) -> Verdict {
        self.process_udp_at(buf, from, Landing::UNKNOWN, now)
    }

    /// [`Inbound::process_udp`], knowing where the datagram landed.
    pub fn process_udp_at(
        &mut self,
        buf: &mut PacketBuf,
        from: SocketAddr,
        landing: Landing,
        now: u64,
    ) -> Verdict {
        let v = self.process_inner(buf, from.ip(), PROTO_UDP, from.port(), landing, now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    fn process_inner(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        src_port: u16,
        landing: Landing,
        now: u64,
    ) -> Verdict {
        if protocol == PROTO_UDP {
            // RFC 3948 section 2: what is on the port besides ESP.
            match buf.as_slice() {
                [0xff] => return Verdict::Drop(DropReason::NatKeepalive),
                [0, 0, 0, 0, ..] => return Verdict::Drop(DropReason::NonEsp),
                _ => {}
            }
        }
        let (idx, next_header, seq, path, sa) = match protocol {
            PROTO_ESP | PROTO_UDP => {
                match self.open_esp(buf, outer_src, protocol, src_port, landing, now) {
                    Ok(x) => x,
                    Err(r) => return Verdict::Drop(r),
                }
            }
            PROTO_IPIP | PROTO_IPV6 => {
                let Some(&idx) = self.by_endpoint.get(&outer_src) else {
                    return Verdict::Drop(DropReason::UnknownPeer);
                };
                let path = self.peers[idx]
                    .mp
                    .as_ref()
                    .and_then(|m| m.shared.path_from(outer_src, 0, landing));
                (idx, protocol, 0, path, (0, true))
            }
            _ => return Verdict::Drop(DropReason::Malformed),
        };
        let arrival = Arrival {
            idx,
            seq,
            sa,
            path,
            src_port,
            outer_src,
        };
        let v = self.deliver(buf, &arrival, next_header, now);
        self.reorder(buf, &arrival, v, now)
    }

    /// Step 1 of an ESP packet (RFC 4303 section 3.4): its SA by SPI, the source check, the
    /// lifetime, then ICV and replay window; on success the peer's port and (for a learned
    /// endpoint) address follow the packet. The peer's index, the next header, the sequence
    /// number and the path it came on.
    #[inline]
    fn open_esp(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        src_port: u16,
        landing: Landing,
        now: u64,
    ) -> Result<Opened, DropReason> {
        let Some(spi) = buf.as_slice().get(..4) else {
            return Err(DropReason::Malformed);
        };
        let spi = u32::from_be_bytes(spi.try_into().expect("4 bytes"));
        let Some(&idx) = self.by_spi.get(&spi) else {
            return Err(DropReason::UnknownSpi);
        };
        let peer = &mut self.peers[idx];
        let port = if protocol == PROTO_UDP { src_port } else { 0 };
        let mut path = match &peer.mp {
            Some(mp) => mp.shared.path_from(outer_src, port, landing),
            // A peer whose address is learned may send from anywhere: the ICV and the
            // replay window decide, and only then does its address move (below).
            None => peer.endpoint.map_or(true, |e| e == outer_src).then_some(0),
        };
        // Learned paths: a new (address, port) may become one once the packet authenticates.
        let adopting = path.is_none() && peer.mp.as_ref().is_some_and(|m| m.shared.learns());
        if (path.is_none() && !adopting) || peer.udp != (protocol == PROTO_UDP) {
            return Err(DropReason::WrongSource);
        }
        // (`newest`: the SA the peer's newest keys belong to; the reorder stage needs to
        // know, see `Reorder::key`.)
        let (sa, newest) = match peer.sa.as_mut() {
            Some((_, sa)) if sa.spi() == spi => (sa, true),
            _ => match peer.older.iter_mut().find(|(id, _)| id.spi == spi) {
                Some((_, sa)) => (sa, false),
                None => return Err(DropReason::UnknownSpi),
            },
        };
        // Checked before decryption against what was used so far (the inner length is
        // known only after it); counted with the inner length once it verified.
        if !peer.lifetime.allows(&peer.used, 0, now) {
            return Err(DropReason::LifetimeExpired);
        }
        match sa.decapsulate(buf) {
            Ok(o) => {
                if adopting {
                    // Authenticated and not a replay: a new path of the peer's (or one a
                    // NAT rebound), if there is room.
                    let mp = peer.mp.as_ref().expect("adopting: a multipath peer");
                    path = mp.shared.adopt(SocketAddr::new(outer_src, port), now);
                    if path.is_none() {
                        return Err(DropReason::PathLimit);
                    }
                }
                if protocol == PROTO_UDP && src_port != 0 {
                    // Authenticated and new (replay checked): the peer's current port
                    // (on this path).
                    let seen = match (&peer.mp, path) {
                        (Some(mp), Some(i)) => &mp.shared.stats[i].udp_port_seen,
                        _ => &peer.stats.udp_port_seen,
                    };
                    if seen.load(Relaxed) != u32::from(src_port) {
                        seen.store(u32::from(src_port), Relaxed);
                    }
                }
                // Authenticated: answer from where the peer reached us.
                if let Some(at) = landing.reply_source() {
                    let cell = match (&peer.mp, path) {
                        (Some(mp), Some(i)) if !mp.shared.paths[i].bound() => {
                            Some(&mp.shared.stats[i].reply_from)
                        }
                        (None, _) => Some(&peer.stats.reply_from),
                        _ => None,
                    };
                    if let Some(c) = cell {
                        c.learn(at, now);
                    }
                }
                if peer.endpoint.is_none() && peer.mp.is_none() {
                    // Authenticated and not a replay: the peer is here now.
                    peer.stats
                        .learned
                        .learn(SocketAddr::new(outer_src, src_port), now);
                }
                peer.used.packets += 1;
                peer.used.bytes += buf.len() as u64;
                peer.stats.replay_top.store(sa.replay().top(), Relaxed);
                Ok((idx, o.next_header, o.seq, path, (spi, newest)))
            }
            Err(EspError::Malformed) => Err(DropReason::Malformed),
            // A `redundant` multipath peer's copies have the same sequence number;
            // any other peer's repeated number is a replay.
            Err(EspError::Replay(crate::replay::ReplayError::Duplicate))
                if peer.mp.as_ref().is_some_and(|m| {
                    m.shared.spec.scheduler == crate::multipath::Scheduler::Redundant
                }) =>
            {
                Err(DropReason::Duplicate)
            }
            Err(EspError::Replay(_)) => Err(DropReason::Replay),
            Err(EspError::BadIcv) => Err(DropReason::BadIcv),
            Err(EspError::BadPadding) => Err(DropReason::BadPadding),
            Err(EspError::SeqExhausted | EspError::SeqUnreserved) => Err(DropReason::Malformed),
        }
    }

    /// A multipath peer's sequence numbers go through the reorder stage: what is for this
    /// host (`v` is `ToTun`) may wait for a gap ahead of it; anything else only takes its
    /// place in the order. Other peers' verdicts pass unchanged.
    #[inline]
    fn reorder(&mut self, buf: &PacketBuf, arrival: &Arrival, v: Verdict, now: u64) -> Verdict {
        let (idx, seq, path) = (arrival.idx, arrival.seq, arrival.path);
        let InPeer { mp, .. } = &mut self.peers[idx];
        match (mp, v) {
            (
                Some(InPaths {
                    shared,
                    reorder: Some(r),
                }),
                v,
            ) if seq != 0 => {
                let hold = shared.hold_ns();
                let seq = r.key(arrival.sa.0, arrival.sa.1, seq);
                r.set_live(shared.order_mask());
                r.set_repair(shared.spec.repair);
                if let Some(p) = path {
                    r.note(p, seq, now, 2 * hold);
                }
                // A pure acknowledgment came by the fastest path, ahead of its order
                // (`fast_acks`): delivered now, its number only takes its place in the order.
                let bare = v == Verdict::ToTun
                    && shared.fast_acks()
                    && InnerPacket::parse(buf.as_slice())
                        .is_ok_and(|i| i.is_pure_ack(buf.as_slice()));
                let data = (v == Verdict::ToTun && !bare).then(|| buf.as_slice());
                let wait = path.map_or(0, |p| shared.skew_ns(p));
                if bare {
                    r.offer_after(seq, None, now, hold, 0, &shared.reorder);
                    return v;
                }
                match (
                    r.offer_after(seq, data, now, hold, wait, &shared.reorder),
                    v,
                ) {
                    (crate::multipath::Order::Held, Verdict::ToTun) => Verdict::Held,
                    (_, v) => v,
                }
            }
            (_, v) => v,
        }
    }

    /// Steps 2-4 of an authenticated packet: probes, the inner packet's checks, NAT, counters.
    fn deliver(&mut self, buf: &mut PacketBuf, a: &Arrival, next_header: u8, now: u64) -> Verdict {
        let (idx, path) = (a.idx, a.path);
        if let (Some(mp), Some(i)) = (&self.peers[idx].mp, path) {
            // The path works on the way back (the quiet rule's second witness).
            mp.shared.stats[i].heard.store(now, Relaxed);
        }
        let want_v4 = match next_header {
            NEXT_HEADER_IPV4 => true,
            NEXT_HEADER_IPV6 => false,
            NEXT_HEADER_DUMMY => return self.dummy(buf, a, now),
            _ => return Verdict::Drop(DropReason::BadNextHeader),
        };
        let Ok(inner) = InnerPacket::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if inner.is_ipv4() != want_v4 {
            return Verdict::Drop(DropReason::BadNextHeader);
        }
        // Bytes after the inner packet are TFC padding (RFC 4303 section 2.7).
        buf.truncate(inner.total_len);
        if let (Some(mp), Some(i)) = (&self.peers[idx].mp, path) {
            // What the path delivered, reported back in echoes (before the policy: the sender
            // counted it when it sent it).
            let p = &mp.shared.stats[i];
            p.rx_packets.fetch_add(1, Relaxed);
            p.rx_bytes.fetch_add(buf.len() as u64, Relaxed);
        }
        if self.allowed.lookup(inner.src) != Some(&idx) {
            return Verdict::Drop(DropReason::NotAllowed);
        }
        // Checked against the real source above; the local stack sees the alias.
        if self.nat.ingress(buf.as_mut_slice()).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let s = &self.peers[idx].stats;
        s.rx_packets.fetch_add(1, Relaxed);
        s.rx_bytes.fetch_add(buf.len() as u64, Relaxed);
        s.last_rx.store(now, Relaxed);
        if self.relay {
            let dst = self.nat.to_real(inner.dst).unwrap_or(inner.dst);
            if matches!(self.allowed.lookup(dst), Some(&to) if to != idx) {
                self.stats.relayed.fetch_add(1, Relaxed);
                return Verdict::Relay;
            }
        }
        Verdict::ToTun
    }

    /// An authenticated dummy packet (next header 59): a multipath probe (answered), an echo
    /// (the path's RTT and liveness), or anything else (discarded, RFC 4303 section 2.6).
    fn dummy(&mut self, buf: &mut PacketBuf, a: &Arrival, now: u64) -> Verdict {
        let peer = &mut self.peers[a.idx];
        let Some(InPaths { shared, reorder }) = &mut peer.mp else {
            return Verdict::Drop(DropReason::Dummy);
        };
        if crate::multipath::Nack::is_nack(buf.as_slice()) {
            peer.stats.last_rx.store(now, Relaxed);
            return match crate::multipath::Nack::parse(buf.as_slice()) {
                Some(_) => Verdict::Repair { peer: a.idx as u16 },
                None => Verdict::Drop(DropReason::Dummy),
            };
        }
        if Probe::is_fill(buf.as_slice()) {
            // A capacity train's filler: counted as received on its path (the echoes of the
            // train's probes report it), then discarded.
            if let Some(i) = a.path {
                let p = &shared.stats[i];
                p.rx_packets.fetch_add(1, Relaxed);
                p.rx_bytes.fetch_add(buf.len() as u64, Relaxed);
            }
            return Verdict::Consumed;
        }
        let Some(probe) = Probe::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Dummy);
        };
        peer.stats.last_rx.store(now, Relaxed);
        match probe.kind {
            ProbeKind::Echo => {
                shared.echoed(&probe, now);
                Verdict::Consumed
            }
            ProbeKind::Probe => {
                let rx_bytes = a.path.map_or(0, |i| shared.stats[i].rx_bytes.load(Relaxed));
                // The probes of this round on other paths came before this one (lower
                // sequence numbers, at most one per path): not waited for if they are lost.
                if let Some(r) = reorder {
                    for s in probe.skipped() {
                        if *s < a.seq && a.seq - *s <= crate::multipath::MAX_PATHS as u64 * 4 {
                            let k = r.key(a.sa.0, a.sa.1, *s);
                            r.forget(k);
                        }
                    }
                }
                let echo = Probe {
                    tx_bytes: probe.tx_bytes,
                    arrived: now.max(1),
                    ..Probe::new(ProbeKind::Echo, probe.path, probe.id, probe.sent, rx_bytes)
                };
                buf.truncate(0);
                let Some(room) = buf.push_back(echo.len()) else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                echo.emit(room);
                Verdict::Echo {
                    peer: a.idx as u16,
                    to: SocketAddr::new(a.outer_src, a.src_port),
                    via: a.path.map_or(Via::ROUTED, |i| shared.path_via(i)),
                }
            }
        }
    }

    /// The lost packets the reorder stages ask for again since the last call: per peer, the
    /// SA's SPI and the sequence numbers (low 48 bits), for [`Outbound::nack`].
    pub fn take_asks(&mut self) -> Vec<(usize, u32, Vec<u64>)> {
        let mut out: Vec<(usize, u32, Vec<u64>)> = Vec::new();
        for (idx, p) in self.peers.iter_mut().enumerate() {
            let Some(InPaths {
                reorder: Some(r), ..
            }) = &mut p.mp
            else {
                continue;
            };
            for (spi, seq) in r.take_asks() {
                match out.last_mut() {
                    Some((i, s, seqs)) if *i == idx && *s == spi => seqs.push(seq),
                    _ => out.push((idx, spi, vec![seq])),
                }
            }
        }
        out
    }

    /// Deliver, in order, up to `limit` packets of the reorder stages whose turn has come at
    /// `now` (the gap ahead of them filled, or their hold time passed); `deliver` gets each
    /// one. Returns how many; call again while it returns `limit`.
    pub fn release(&mut self, now: u64, limit: usize, mut deliver: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        for p in &mut self.peers {
            if let Some(InPaths {
                shared,
                reorder: Some(r),
            }) = &mut p.mp
            {
                r.set_live(shared.order_mask());
                r.set_repair(shared.spec.repair);
                if n < limit && r.ready(now) {
                    n += r.release(now, &shared.reorder, limit - n, &mut deliver);
                }
            }
        }
        n
    }

    /// When the next held packet must be released (`None`: nothing held).
    pub fn next_release(&self) -> Option<u64> {
        self.peers
            .iter()
            .filter_map(|p| p.mp.as_ref()?.reorder.as_ref()?.deadline())
            .min()
    }

    /// The inbound SA state of each peer: (SPI, highest sequence number seen), `None` for IP-in-IP.
    pub fn sa_state(&self) -> Vec<Option<(u32, u64)>> {
        self.peers
            .iter()
            .map(|p| p.sa.as_ref().map(|(_, s)| (s.spi(), s.replay().top())))
            .collect()
    }

    /// Take over the state of `old`'s inbound SAs that continue in `self` (same SPI, key,
    /// cipher and ESN): their replay windows and lifetime use, so a reload neither re-opens
    /// the window to replays nor forgets what was received. Called by the thread that owns
    /// both, between two batches; `old` is left with fresh state and is dropped after.
    pub fn adopt(&mut self, old: &mut Inbound) {
        // A multipath peer's reorder stage continues (what it holds, the SAs it orders): an
        // IKEv2 rekey publishes a new generation, and the packets waiting for a gap must not
        // go with the old one.
        for peer in &mut self.peers {
            let Some(InPaths {
                reorder: Some(r),
                shared,
            }) = &mut peer.mp
            else {
                continue;
            };
            let prev = old.peers.iter_mut().find_map(|q| match &mut q.mp {
                Some(InPaths {
                    reorder: Some(o), ..
                }) if q.name == peer.name => Some(o),
                _ => None,
            });
            if let Some(o) = prev {
                std::mem::swap(r, o);
                let s = shared.spec;
                r.resize(s.reorder_packets as usize, s.reorder_bytes as usize);
            }
        }
        for peer in &mut self.peers {
            let mut took_used = false;
            for (primary, (id, sa)) in peer
                .sa
                .iter_mut()
                .map(|x| (true, x))
                .chain(peer.older.iter_mut().map(|x| (false, x)))
            {
                let Some(&j) = old.by_spi.get(&id.spi) else {
                    continue;
                };
                let prev = &mut old.peers[j];
                // The same SA may have been the primary or an older one (a rekey moves it).
                let found = prev
                    .sa
                    .iter_mut()
                    .chain(prev.older.iter_mut())
                    .find(|(old_id, _)| old_id == id);
                if let Some((_, old_sa)) = found {
                    std::mem::swap(sa, old_sa);
                    if primary {
                        peer.stats.replay_top.store(sa.replay().top(), Relaxed);
                    }
                    if !took_used {
                        std::mem::swap(&mut peer.used, &mut prev.used);
                        took_used = true;
                    }
                }
            }
        }
    }
}

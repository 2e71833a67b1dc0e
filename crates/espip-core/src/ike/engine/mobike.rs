//! MOBIKE (RFC 4555), the part a road warrior needs: both sides announce MOBIKE_SUPPORTED in
//! IKE_AUTH; then the IKE SA and its CHILD_SAs move only by UPDATE_SA_ADDRESSES, which only
//! the IKE SA's original initiator sends (section 3.5), from its new address, with fresh NAT
//! detection hashes. The responder takes the message's source as the peer's address for the
//! IKE SA and every CHILD_SA, and answers with its own hashes. Not built: address lists
//! (ADDITIONAL_*_ADDRESS are ignored; we send NO_ADDITIONAL_ADDRESSES), COOKIE2 and the
//! return routability check (section 3.12, a MAY of the responder).

use super::*;

impl Engine {
    /// Our outer address towards the peer is now `local` (the edge saw the kernel's route
    /// change): an initiator of a MOBIKE IKE SA sends UPDATE_SA_ADDRESSES; without MOBIKE a
    /// liveness check goes out from the new address (an espip responder without endpoint
    /// follows it at once). Nothing when the address did not change.
    pub fn local_moved(&mut self, local: IpAddr, now: u64, rng: &dyn SecureRandom) -> Vec<Out> {
        let mut out = Vec::new();
        if local == self.cfg.local || local.is_unspecified() {
            return out;
        }
        let before = self.cfg.local;
        self.cfg.local = local;
        // No route at the start: nothing to announce, only now known.
        if before.is_unspecified() {
            return out;
        }
        let Some(s) = self.ike.as_mut() else {
            return out;
        };
        if s.state() != State::Established {
            return out;
        }
        out.push(Out::Event(Event::Moved {
            from: SocketAddr::new(before, 0),
            to: SocketAddr::new(local, 0),
            who: "local",
        }));
        if !s.queue.contains(&Task::UpdateAddresses) {
            // First: the peer should hear of it before anything else goes out.
            s.queue.insert(0, Task::UpdateAddresses);
        }
        self.next_task(now, rng, &mut out);
        out
    }

    /// The current IKE SA negotiated MOBIKE: its peer address is where the peer's
    /// UPDATE_SA_ADDRESSES came from, the data path's endpoint for this peer.
    pub fn mobike_peer(&self) -> Option<SocketAddr> {
        self.ike
            .as_ref()
            .filter(|s| s.mobike && s.state() == State::Established)
            .map(|s| s.peer)
    }

    /// The SPIs of the IKE SAs that negotiated MOBIKE: their messages may come from any
    /// address (the edge lets them through its source filter).
    pub fn mobike_spis(&self) -> Vec<(u64, u64)> {
        self.ike
            .iter()
            .chain(&self.others)
            .filter(|s| s.mobike)
            .map(|s| (s.spi_i, s.spi_r))
            .collect()
    }

    /// An IKE SA with these SPIs negotiated MOBIKE: its messages may come from any address.
    pub(super) fn mobike_sa(&self, spi_i: u64, spi_r: u64) -> bool {
        self.ike
            .iter()
            .chain(&self.others)
            .any(|s| s.mobike && s.spi_i == spi_i && s.spi_r == spi_r)
    }

    /// Whether a message with these SPIs from an address this peer does not name is still
    /// this engine's: a peer without endpoint holds it, or it is a MOBIKE IKE SA.
    pub fn follows(&self, spi_i: u64, spi_r: u64) -> bool {
        (self.roams() && self.owns(spi_i, spi_r)) || self.mobike_sa(spi_i, spi_r)
    }

    /// The request of [`Task::UpdateAddresses`] on `s`: UPDATE_SA_ADDRESSES with the NAT
    /// detection hashes of our new address (section 3.5), or, when the IKE SA has no MOBIKE
    /// or we are not its initiator, an empty INFORMATIONAL.
    pub(super) fn update_request(
        cfg: &IkeConfig,
        s: &IkeSa,
        rng: &dyn SecureRandom,
    ) -> (Vec<Payload>, Req) {
        if !(s.mobike && s.initiator) {
            return (Vec::new(), Req::Dpd);
        }
        let mut p = vec![Payload::notify(notify::UPDATE_SA_ADDRESSES, Vec::new())];
        p.extend(nat_detection(cfg, s, s.peer, rng));
        p.push(Payload::notify(notify::NO_ADDITIONAL_ADDRESSES, Vec::new()));
        (p, Req::UpdateAddresses)
    }

    /// A request on a MOBIKE IKE SA `s` we respond to: UPDATE_SA_ADDRESSES from its initiator
    /// moves it to `from` (returns the NAT detection notifies for the answer); any other
    /// request leaves the addresses as they are (section 3.5: only that notify moves them).
    /// On an IKE SA without MOBIKE, every request moves it (RFC 7296 section 2.23's NAT-T
    /// behaviour, and a roaming peer's).
    pub(super) fn follow_request(
        &mut self,
        s: &mut IkeSa,
        p: &[Payload],
        (from, natt): (SocketAddr, bool),
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> Vec<Payload> {
        if !s.mobike {
            s.peer = from;
            s.natt = natt;
            return Vec::new();
        }
        if s.initiator || find_notify(p, notify::UPDATE_SA_ADDRESSES).is_none() {
            return Vec::new();
        }
        let before = s.peer;
        s.peer = from;
        s.natt = natt;
        self.stats.address_updates += 1;
        if before != from {
            out.push(Out::Event(Event::Moved {
                from: before,
                to: from,
                who: "peer",
            }));
            // The data path's endpoint follows (see `mobike_peer`).
            out.push(Out::Changed);
        }
        nat_detection(&self.cfg, s, from, rng).to_vec()
    }

    /// The answer to our UPDATE_SA_ADDRESSES: the peer took our new address.
    pub(super) fn on_update_response(&mut self) -> After {
        self.stats.address_updates += 1;
        After::Keep
    }
}

/// NAT_DETECTION_SOURCE_IP (our address and port on `s`; random with `force_encap`, so the
/// peer keeps encapsulating) and NAT_DETECTION_DESTINATION_IP (`to`).
fn nat_detection(
    cfg: &IkeConfig,
    s: &IkeSa,
    to: SocketAddr,
    rng: &dyn SecureRandom,
) -> [Payload; 2] {
    let port = if s.natt {
        cfg.natt_port
    } else {
        cfg.local_port
    };
    let me = SocketAddr::new(cfg.local, port);
    let src = if cfg.force_encap {
        rand_bytes(rng, 20)
    } else {
        crypto::nat_hash(s.spi_i, s.spi_r, me)
    };
    [
        Payload::notify(notify::NAT_DETECTION_SOURCE_IP, src),
        Payload::notify(
            notify::NAT_DETECTION_DESTINATION_IP,
            crypto::nat_hash(s.spi_i, s.spi_r, to),
        ),
    ]
}

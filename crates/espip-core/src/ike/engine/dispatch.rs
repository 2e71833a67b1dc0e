//! Messages in: which IKE SA a message belongs to, requests answered by exchange, responses
//! matched to the request in flight; and the close of the engine.

use super::*;

impl Engine {
    fn slot_of(&self, h: &Header) -> Option<Slot> {
        let matches = |s: &IkeSa| {
            s.spi_i == h.spi_i
                && (s.spi_r == h.spi_r
                    || (s.spi_r == 0
                        && h.exchange == exchange::IKE_SA_INIT
                        && h.is_response()
                        && h.msg_id == 0))
        };
        if self.ike.as_ref().is_some_and(matches) {
            return Some(Slot::Current);
        }
        self.others.iter().position(matches).map(Slot::Other)
    }

    fn take_sa(&mut self, slot: Slot) -> IkeSa {
        match slot {
            Slot::Current => self.ike.take().expect("slot"),
            Slot::Other(i) => self.others.remove(i),
        }
    }

    /// One IKE datagram from the peer (without the non-ESP marker); `natt`: it came to the
    /// NAT-T port.
    pub fn handle(
        &mut self,
        raw: &[u8],
        from: SocketAddr,
        natt: bool,
        now: u64,
        rng: &dyn SecureRandom,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        if raw.len() > msg::MAX_MSG {
            self.stats.fail(Failure::TooLarge);
            return out;
        }
        let h = match msg::parse_header(raw) {
            Ok(h) => h,
            Err(MsgError::Version) => {
                self.stats
                    .fail(Failure::Notify(notify::INVALID_MAJOR_VERSION));
                return out;
            }
            Err(_) => {
                self.stats.fail(Failure::Malformed);
                return out;
            }
        };
        if !self.roams() && from.ip() != self.cfg.remote.ip() && !self.mobike_sa(h.spi_i, h.spi_r) {
            self.stats.fail(Failure::WrongSource);
            return out;
        }
        if h.exchange == exchange::IKE_SA_INIT && !h.is_response() && h.spi_r == 0 {
            self.respond_init(&h, raw, from, natt, now, rng, &mut out);
            return out;
        }
        let Some(slot) = self.slot_of(&h) else {
            if self.early_for_our_rekey(&h) && self.early.len() < EARLY_MAX {
                self.early.push((raw.to_vec(), from, natt));
            } else {
                self.stats.fail(Failure::UnknownIkeSpi);
            }
            return out;
        };
        // The answer to our IKE_SA_INIT: init_response takes the current SA and puts it (or a
        // new attempt) back, or leaves none when the exchange failed.
        if slot == Slot::Current
            && h.exchange == exchange::IKE_SA_INIT
            && h.is_response()
            && !h.from_initiator()
            && self
                .ike
                .as_ref()
                .is_some_and(|s| s.initiator && s.state() == State::InitSent)
        {
            match msg::parse_chain(raw, msg::HDR_LEN, h.next) {
                Ok(c) => self.init_response(now, rng, &h, raw, &c.payloads, &mut out),
                Err(_) => self.stats.fail(Failure::Malformed),
            }
            if self.ike.is_none() {
                self.current_gone(now, &mut out);
            }
            self.settle(now, rng, &mut out);
            return out;
        }
        let mut s = self.take_sa(slot);
        let after = self.on_message(&mut s, &h, raw, from, natt, now, rng, &mut out);
        match after {
            After::Keep => match slot {
                Slot::Current => self.ike = Some(s),
                Slot::Other(_) => self.others.push(s),
            },
            After::Promote => {
                if let Some(old) = self.ike.replace(s) {
                    self.orphaned(&old, now);
                }
            }
            After::Replaced(new) => {
                // Work queued on the old IKE SA (a CHILD_SA rekey, a DELETE) moves over.
                let mut new = new;
                let moves = |t: &Task| {
                    matches!(
                        t,
                        Task::RekeyChild(_) | Task::DeleteChild(_) | Task::NewChild
                    )
                };
                if let (Slot::Other(_), Some(mut cur)) = (slot, self.ike.take()) {
                    // An older IKE SA was replaced while another one was current (the peer's
                    // new IKE SA of a rekey collision that ours won): that one waits for the
                    // peer's DELETE too, never dropped unheard.
                    // (One still in its IKE_SA_INIT has nothing to wait for.)
                    new.queue.extend(cur.queue.drain(..).filter(moves));
                    if cur.state() != State::InitSent {
                        cur.set_stage(Stage::Rekeyed);
                        cur.rekey_at = now;
                        self.others.push(cur);
                    }
                }
                new.queue.extend(s.queue.drain(..).filter(moves));
                s.set_stage(Stage::Rekeyed);
                // From now on: when it was replaced (it goes HALF_OPEN_MS later at most).
                s.rekey_at = now;
                self.others.push(s);
                self.ike = Some(*new);
            }
            After::Handoff(id) => {
                out.push(Out::Handoff {
                    id,
                    spis: (s.spi_i, s.spi_r),
                });
                match slot {
                    Slot::Current => self.ike = Some(s),
                    Slot::Other(_) => self.others.push(s),
                }
            }
            After::Drop => {
                self.orphaned(&s, now);
                // The peer deleted the IKE SA it made in a rekey collision, which our answer
                // had made current: it found its own redundant (section 2.8.2) while the
                // answer to our request has not come (a peer that dropped our answer to its
                // request learns late that ours is the survivor). The old IKE SA, where our
                // request waits, is current again; the CHILD_SAs stay.
                let reverted = slot == Slot::Current
                    && self
                        .ike_collision
                        .as_ref()
                        .is_some_and(|c| c.theirs == (s.spi_i, s.spi_r))
                    && self.restore_collided(&mut s);
                if slot == Slot::Current && !reverted {
                    self.current_gone(now, &mut out);
                }
            }
        }
        self.settle(now, rng, &mut out);
        self.release_early(now, rng, &mut out);
        out
    }

    /// A request from the peer on the IKE SA that our rekey in flight is making (its SPIi is
    /// ours, the peer's SPIr comes with the answer): RFC 7296 section 2.8 lets the peer use
    /// the new IKE SA as soon as it answered, and the answer may come after.
    pub(super) fn early_for_our_rekey(&self, h: &Header) -> bool {
        let ours = |s: &IkeSa| {
            matches!(s.flight.as_ref().map(|f| &f.req),
                Some(Req::RekeyIke { spi, .. }) if *spi == h.spi_i)
        };
        !h.is_response()
            && !h.from_initiator()
            && h.spi_r != 0
            && (h.exchange == exchange::CREATE_CHILD_SA || h.exchange == exchange::INFORMATIONAL)
            && (self.ike.as_ref().is_some_and(ours) || self.others.iter().any(ours))
    }

    /// Held requests whose rekey is no longer in flight: handled now (on the new IKE SA if the
    /// rekey made it, else counted as for an unknown IKE SA).
    fn release_early(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        for (raw, from, natt) in self.early_due() {
            out.extend(self.handle(&raw, from, natt, now, rng));
        }
    }

    /// The held requests whose rekey is no longer in flight, taken out; the others stay.
    pub(super) fn early_due(&mut self) -> Vec<(Vec<u8>, SocketAddr, bool)> {
        let held = std::mem::take(&mut self.early);
        let (wait, due) = held.into_iter().partition(|(raw, ..)| {
            msg::parse_header(raw).is_ok_and(|h| self.early_for_our_rekey(&h))
        });
        self.early = wait;
        due
    }

    /// The current IKE SA is gone: its CHILD_SAs go with it, and an initiator connects again
    /// after [`RETRY_MS`].
    fn current_gone(&mut self, now: u64, out: &mut Vec<Out>) {
        if !self.children.is_empty() {
            self.children.clear();
            out.push(Out::Changed);
        }
        if self.cfg.role == Role::Initiator && !self.closing {
            self.retry_at = Some(now + RETRY_MS * MS);
        }
    }

    /// After a message: the outbound CHILD_SA chosen, and the next queued task started.
    fn settle(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        if self.ensure_out(now) {
            out.push(Out::Changed);
        }
        self.next_task(now, rng, out);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &mut self,
        s: &mut IkeSa,
        h: &Header,
        raw: &[u8],
        from: SocketAddr,
        natt: bool,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        // The I flag says who sent it: never ourselves.
        if h.from_initiator() == s.initiator {
            self.stats.fail(Failure::WrongInitiatorFlag);
            return After::Keep;
        }
        let chain = match msg::parse_chain(raw, msg::HDR_LEN, h.next) {
            Ok(c) => c,
            Err(_) => {
                self.stats.fail(Failure::Malformed);
                return After::Keep;
            }
        };
        if h.exchange == exchange::IKE_SA_INIT {
            // An initiator's IKE_SA_INIT answer never comes here (see `handle`).
            self.stats.fail(Failure::UnexpectedMessage);
            return After::Keep;
        }
        let Some(sk) = chain.sk else {
            self.stats.fail(Failure::Unencrypted);
            return After::Keep;
        };
        if s.state() == State::InitSent {
            self.stats.fail(Failure::UnexpectedMessage);
            return After::Keep;
        }
        if h.is_response() {
            if s.flight.as_ref().map(|f| f.id) != Some(h.msg_id) {
                self.stats.fail(Failure::UnexpectedResponse);
                return After::Keep;
            }
            let Some(p) = self.open_sk(raw, sk, s) else {
                return After::Keep;
            };
            s.last_heard = now;
            if natt {
                s.peer = from;
            }
            let f = s.flight.take().expect("checked");
            return self.on_response(s, f.req, &p, now, rng, out);
        }
        // A request.
        let retransmit = h.msg_id.wrapping_add(1) == s.peer_next;
        if h.msg_id != s.peer_next && !retransmit {
            self.stats.fail(Failure::InvalidMessageId);
            return After::Keep;
        }
        let Some(p) = self.open_sk(raw, sk, s) else {
            return After::Keep;
        };
        if retransmit {
            if let Some((id, m)) = &s.cached {
                if *id == h.msg_id {
                    self.stats.resent_responses += 1;
                    out.push(Out::Send {
                        to: from,
                        natt,
                        msg: m.clone(),
                    });
                }
            }
            return After::Keep;
        }
        if let Some(id) = self.handoff(s, h, &p) {
            return After::Handoff(id);
        }
        s.last_heard = now;
        let natd = self.follow_request(s, &p, (from, natt), rng, out);
        s.peer_next = s.peer_next.wrapping_add(1);
        let (mut payloads, after) = self.answer_request(s, h.exchange, &p, now, rng, out);
        payloads.extend(natd);
        // RFC 4555 section 3.5: the answer carries the request's COOKIE2 back (any request:
        // strongSwan puts one in its path checks too).
        if let Some((_, c)) = find_notify(&p, notify::COOKIE2) {
            payloads.push(Payload::notify(notify::COOKIE2, c.to_vec()));
        }
        let h2 = s.header(h.exchange, h.msg_id, true);
        let m = s.seal(h2, &payloads);
        s.cached = Some((h.msg_id, m.clone()));
        self.stats.responses += 1;
        // Answered where the request came from (RFC 7296 section 2.11), even on a MOBIKE IKE
        // SA that it did not move.
        out.push(Out::Send {
            to: from,
            natt,
            msg: m,
        });
        after
    }

    /// The SK payload of a message on `s` opened with the peer's keys; a failure (ICV or
    /// format) is counted and `None` returned.
    fn open_sk(&mut self, raw: &[u8], sk: (usize, u8, usize), s: &IkeSa) -> Option<Vec<Payload>> {
        match msg::open_sk(raw, sk, s.peer_key()) {
            Ok(p) => Some(p),
            Err(MsgError::BadIcv) => {
                self.stats.fail(Failure::BadIcv);
                None
            }
            Err(_) => {
                self.stats.fail(Failure::Malformed);
                None
            }
        }
    }

    /// The answer to a new request of exchange type `kind` on `s` (by exchange and the SA's state), and
    /// what becomes of the SA after it is sent.
    fn answer_request(
        &mut self,
        s: &mut IkeSa,
        kind: u8,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> (Vec<Payload>, After) {
        match kind {
            exchange::IKE_AUTH if !s.initiator && s.state() == State::Authenticating => {
                self.respond_auth(s, p, now, rng, out)
            }
            exchange::CREATE_CHILD_SA if s.state() == State::Established => {
                self.respond_create(s, p, now, rng, out)
            }
            // Sent before the peer learnt that this IKE SA was rekeyed (the requests crossed):
            // its CHILD_SAs live on the new one now. Section 2.25: the peer tries again (on
            // the new one); INVALID_SYNTAX would be a hard error to it.
            exchange::CREATE_CHILD_SA if s.state() == State::Rekeyed => {
                self.stats.fail(Failure::RekeyCollision);
                (
                    vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                    After::Keep,
                )
            }
            exchange::INFORMATIONAL if s.state() != State::InitSent => {
                self.respond_info(s, p, now, out)
            }
            _ => {
                self.stats.fail(Failure::UnexpectedMessage);
                (
                    vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                    After::Keep,
                )
            }
        }
    }

    fn on_response(
        &mut self,
        s: &mut IkeSa,
        req: Req,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        match req {
            Req::Init { .. } => After::Keep,
            Req::Auth { spi_in } => self.on_auth_response(s, spi_in, p, now, rng, out),
            Req::RekeyChild {
                old_in,
                new_in,
                ni,
                share,
            } => self.on_rekey_child_response(s, old_in, new_in, ni, share, p, now, rng, out),
            Req::NewChild { new_in, ni, share } => {
                self.on_new_child_response(s, new_in, ni, share, p, now, rng, out)
            }
            Req::DeleteChild(spi_in) => self.on_delete_child_response(spi_in, now),
            Req::RekeyIke { spi, ni, share } => {
                self.on_rekey_ike_response(s, spi, ni, share, p, now, rng, out)
            }
            Req::DeleteIke => After::Drop,
            Req::Dpd => After::Keep,
            Req::UpdateAddresses => self.on_update_response(),
        }
    }

    /// A clean stop: DELETE the IKE SA (its CHILD_SAs with it, section 1.4.1), once, without
    /// waiting for the answer.
    pub fn close(&mut self, _now: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.closing = true;
        if let Some(mut s) = self.ike.take() {
            if s.state() == State::Established {
                out.push(s.delete_request());
                out.push(Out::Event(Event::IkeDown {
                    why: "closed: DELETE sent".into(),
                }));
            }
        }
        if !self.children.is_empty() {
            self.children.clear();
            out.push(Out::Changed);
        }
        out
    }
}

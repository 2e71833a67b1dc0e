//! Time passing: retransmissions, rekeys, DPD, grace periods, reconnects, and the
//! queue of tasks the current IKE SA works through.

use super::*;

impl Engine {
    /// Time passes: retransmissions, rekeys, DPD, grace periods, reconnects.
    pub fn tick(&mut self, now: u64, rng: &dyn SecureRandom) -> Vec<Out> {
        let mut out = Vec::new();
        // Held requests whose rekey was given up: for an IKE SA that never came.
        for _ in self.early_due() {
            self.stats.fail(Failure::UnknownIkeSpi);
        }
        self.unconfirmed_survivors(now, &mut out);
        self.tick_children(now, &mut out);
        self.tick_others(now, &mut out);
        // Reconnect.
        if self.ike.is_none() && !self.closing {
            if let Some(t) = self.retry_at {
                if now >= t {
                    self.retry_at = None;
                    self.initiate(now, rng, &mut out);
                }
            }
            return out;
        }
        // Retransmit or give up.
        let Some(dead) = self.retransmit(now, &mut out) else {
            return out;
        };
        if dead {
            let detail = format!(
                "no answer from {} after {} retransmissions",
                self.cfg.remote.ip(),
                self.cfg.retransmit_tries
            );
            self.teardown(now, &mut out, Failure::PeerDead, detail);
            return out;
        }
        if !self.schedule(now) {
            return out;
        }
        self.next_task(now, rng, &mut out);
        out
    }

    /// CHILD_SAs: grace periods end, pending switches time out, hard lifetimes expire (the
    /// peer is told with a DELETE).
    fn tick_children(&mut self, now: u64, out: &mut Vec<Out>) {
        let before = self.children.len();
        let mut changed = false;
        self.children.retain(|c| c.until.map_or(true, |u| now < u));
        for c in &mut self.children {
            if c.expire_at != 0 && now >= c.expire_at && c.until.is_none() {
                c.until = Some(now);
            }
        }
        let expired: Vec<u32> = self
            .children
            .iter()
            .filter(|c| c.until == Some(now) && c.expire_at != 0 && now >= c.expire_at)
            .map(|c| c.keys.spi_in)
            .collect();
        for spi in expired {
            self.children.retain(|c| c.keys.spi_in != spi);
            out.push(Out::Event(Event::ChildDown {
                spi_in: spi,
                why: "hard lifetime reached before a rekey",
            }));
            // Tell the peer (as strongSwan does), which otherwise keeps sending on it until
            // its own lifetime ends.
            let task = Task::DeleteChild(spi);
            if !self.deferred.contains(&task) {
                self.deferred.push(task);
            }
        }
        if self.children.len() != before {
            changed = true;
        }
        if self.switch_pending(now, false) || self.ensure_out(now) {
            changed = true;
        }
        if changed {
            out.push(Out::Changed);
        }
    }

    /// Half-open and replaced IKE SAs: forgotten when their time is up, their requests
    /// (a DELETE of a replaced one) retransmitted.
    fn tick_others(&mut self, now: u64, out: &mut Vec<Out>) {
        let cfg_tries = self.cfg.retransmit_tries;
        self.others.retain(|s| {
            let half_open_expired = s.state() == State::Authenticating
                && now.saturating_sub(s.created) > HALF_OPEN_MS * MS;
            let delete_unanswered = s.state() == State::Rekeyed
                && s.flight.as_ref().is_some_and(|f| f.tries > cfg_tries);
            let replaced_long_ago =
                s.state() == State::Rekeyed && now.saturating_sub(s.rekey_at) > HALF_OPEN_MS * MS;
            !half_open_expired && !delete_unanswered && !replaced_long_ago
        });
        for s in &mut self.others {
            if let Some(f) = s.flight.as_mut() {
                if now >= f.next_at {
                    f.tries += 1;
                    f.next_at = now + self.cfg.retransmit_ms * MS * (1 << f.tries.min(10));
                    out.push(Out::Send {
                        to: s.peer,
                        natt: s.natt,
                        msg: f.msg.clone(),
                    });
                }
            }
        }
    }

    /// Retransmit the IKE SA's request in flight when due: `Some(true)` when it ran out of
    /// tries (the peer is dead), `None` without an IKE SA.
    fn retransmit(&mut self, now: u64, out: &mut Vec<Out>) -> Option<bool> {
        let s = self.ike.as_mut()?;
        Some(match s.flight.as_mut() {
            Some(f) if now >= f.next_at => {
                if f.tries >= self.cfg.retransmit_tries {
                    true
                } else {
                    f.tries += 1;
                    f.next_at = now + self.cfg.retransmit_ms * MS * (1 << f.tries.min(10));
                    self.stats.retransmits += 1;
                    out.push(Out::Send {
                        to: s.peer,
                        natt: s.natt,
                        msg: f.msg.clone(),
                    });
                    false
                }
            }
            _ => false,
        })
    }

    /// Queue what is due on the established IKE SA: its rekey, CHILD_SA rekeys (again, when a
    /// request was lost with an IKE SA), a new CHILD_SA when the IKE SA outlived its last one,
    /// dead peer detection. False if the IKE SA is not established.
    fn schedule(&mut self, now: u64) -> bool {
        // CHILD_SAs due for a rekey that no queue or flight holds: a rekey whose request was
        // lost with an IKE SA (replaced, deleted) is asked for again, not forgotten.
        let due: Vec<u32> = self
            .children
            .iter()
            .filter(|c| !c.replaced && c.until.is_none() && c.out && now >= c.rekey_at)
            .map(|c| c.keys.spi_in)
            .filter(|spi| !self.rekey_busy(*spi))
            .collect();
        let s = self.ike.as_mut().expect("checked");
        if s.state() != State::Established {
            return false;
        }
        // Schedule work.
        if self.cfg.ike_rekey_ms > 0 && now >= s.rekey_at && !s.queue.contains(&Task::RekeyIke) {
            s.queue.push(Task::RekeyIke);
            s.rekey_at = u64::MAX;
        }
        for spi in due {
            s.queue.push(Task::RekeyChild(spi));
        }
        // The IKE SA outlived its CHILD_SAs (a hard lifetime after failed rekeys, a DELETE
        // by the peer): its original initiator makes a new one.
        let active = self
            .children
            .iter()
            .any(|c| c.until.is_none() && !c.replaced);
        let creating = s.queue.contains(&Task::NewChild)
            || matches!(
                s.flight.as_ref().map(|f| &f.req),
                Some(Req::NewChild { .. })
            );
        if (s.initiator || self.remake_child) && !active && !creating && now >= self.new_child_at {
            s.queue.push(Task::NewChild);
            self.remake_child = false;
        }
        if self.cfg.dpd_ms > 0
            && s.flight.is_none()
            && s.queue.is_empty()
            && now.saturating_sub(s.last_heard) >= self.cfg.dpd_ms * MS
        {
            s.queue.push(Task::Dpd);
        }
        true
    }

    /// Start the next queued request, if none is in flight.
    pub(super) fn next_task(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        let Some(s) = self.ike.as_mut() else { return };
        // Work an answer on an older IKE SA left (a DELETE after a rekey it finished), or a
        // DELETE of an expired CHILD_SA: first, in order (before a new CHILD_SA, which the
        // peer refuses while it still holds the old one).
        let mut at = 0;
        for t in self.deferred.drain(..) {
            if !s.queue.contains(&t) {
                s.queue.insert(at, t);
                at += 1;
            }
        }
        if s.flight.is_some() || s.state() != State::Established || s.queue.is_empty() {
            return;
        }
        // Both sides rekey the IKE SA and our answer made the peer's new one current: until
        // the answer to our own request says which stays, nothing starts on it. If ours stays,
        // the peer deletes its new one (strongSwan may never have made it, when it dropped our
        // answer), and a request started on it would hang there, unanswered, until that IKE
        // SA is forgotten: a CHILD_SA rekey stuck like that lets the CHILD_SA die of old age.
        let current = (s.spi_i, s.spi_r);
        if self.waits_for_ike_collision(current) {
            return;
        }
        let s = self.ike.as_mut().expect("checked");
        let task = s.queue.remove(0);
        let (payloads, exch, req) = match task {
            Task::Dpd => (Vec::new(), exchange::INFORMATIONAL, Req::Dpd),
            Task::UpdateAddresses => {
                let (p, req) = Engine::update_request(&self.cfg, s, rng);
                (p, exchange::INFORMATIONAL, req)
            }
            Task::DeleteChild(spi_in) => (
                vec![Payload::Delete {
                    protocol: proto::ESP,
                    spis: vec![spi_in.to_be_bytes().to_vec()],
                }],
                exchange::INFORMATIONAL,
                Req::DeleteChild(spi_in),
            ),
            Task::NewChild => {
                if self.has_active_child() {
                    return self.next_task(now, rng, out);
                }
                let (p, new_in, ni, share) = self.child_request(None, rng);
                (
                    p,
                    exchange::CREATE_CHILD_SA,
                    Req::NewChild { new_in, ni, share },
                )
            }
            Task::RekeyChild(old_in) => {
                if !self
                    .children
                    .iter()
                    .any(|c| c.keys.spi_in == old_in && !c.replaced && c.until.is_none())
                {
                    return self.next_task(now, rng, out);
                }
                let (p, new_in, ni, share) = self.child_request(Some(old_in), rng);
                (
                    p,
                    exchange::CREATE_CHILD_SA,
                    Req::RekeyChild {
                        old_in,
                        new_in,
                        ni,
                        share,
                    },
                )
            }
            Task::RekeyIke => {
                let choice = s.choice().expect("established");
                let Some((p, req)) = self.rekey_ike_request(&choice, rng) else {
                    return;
                };
                (p, exchange::CREATE_CHILD_SA, req)
            }
        };
        let s = self.ike.as_mut().expect("checked");
        let id = s.next_id;
        s.next_id = s.next_id.wrapping_add(1);
        let h = s.header(exch, id, false);
        let m = s.seal(h, &payloads);
        s.flight = Some(InFlight {
            id,
            msg: m.clone(),
            tries: 0,
            next_at: now + self.cfg.retransmit_ms * MS,
            req,
        });
        self.stats.requests += 1;
        out.push(Out::Send {
            to: s.peer,
            natt: s.natt,
            msg: m,
        });
    }

    /// Both sides rekey the IKE SA and our answer made the peer's new one (`current`) current:
    /// until the answer to our own request says which stays, nothing starts on it. If ours
    /// stays, the peer deletes its new one (strongSwan may never have made it, when it dropped
    /// our answer), and a request started on it would hang there, unanswered, until that IKE
    /// SA is forgotten: a CHILD_SA rekey stuck like that lets the CHILD_SA die of old age.
    fn waits_for_ike_collision(&self, current: (u64, u64)) -> bool {
        if let Some(c) = &self.ike_collision {
            let ours_in_flight = self.others.iter().any(|o| {
                (o.spi_i, o.spi_r) == c.old
                    && matches!(
                        o.flight.as_ref().map(|f| &f.req),
                        Some(Req::RekeyIke { .. })
                    )
            });
            return ours_in_flight && current == c.theirs;
        }
        false
    }

    /// A CREATE_CHILD_SA request for a new CHILD_SA, or the rekey of the one with inbound SPI
    /// `rekey` (REKEY_SA first): its payloads, our new inbound SPI, nonce and key share (with
    /// PFS when our ESP proposal has a group).
    fn child_request(
        &self,
        rekey: Option<u32>,
        rng: &dyn SecureRandom,
    ) -> (Vec<Payload>, u32, Vec<u8>, Option<KeyShare>) {
        let new_in = rand_spi(rng);
        let ni = rand_bytes(rng, 32);
        let pfs = self.cfg.esp.iter().find_map(|p| p.groups.first().copied());
        let share = pfs.and_then(|g| KeyShare::new(g, rng));
        let mut p = Vec::new();
        if let Some(old_in) = rekey {
            p.push(Payload::Notify {
                protocol: proto::ESP,
                spi: old_in.to_be_bytes().to_vec(),
                kind: notify::REKEY_SA,
                data: Vec::new(),
            });
        }
        p.push(Payload::Sa(self.esp_offer(new_in, share.is_some())));
        p.push(Payload::Nonce(ni.clone()));
        if let Some(sh) = &share {
            p.push(Payload::Ke {
                group: sh.group().id(),
                data: sh.public.clone(),
            });
        }
        p.push(Payload::TsI(self.cfg.local_ts.clone()));
        p.push(Payload::TsR(self.cfg.remote_ts.clone()));
        (p, new_in, ni, share)
    }

    /// A CREATE_CHILD_SA request rekeying the IKE SA: our proposals with the current group
    /// first, a nonce and a key share of that group.
    fn rekey_ike_request(
        &self,
        choice: &IkeChoice,
        rng: &dyn SecureRandom,
    ) -> Option<(Vec<Payload>, Req)> {
        let spi = rand_u64(rng);
        let ni = rand_bytes(rng, 32);
        let share = KeyShare::new(choice.group, rng)?;
        let offer = self.ike_offer(choice.group, spi.to_be_bytes().to_vec());
        Some((
            vec![
                Payload::Sa(offer),
                Payload::Nonce(ni.clone()),
                Payload::Ke {
                    group: share.group().id(),
                    data: share.public.clone(),
                },
            ],
            Req::RekeyIke { spi, ni, share },
        ))
    }

    /// Remove the IKE SA and its children; an initiator tries again later.
    pub(super) fn teardown(
        &mut self,
        now: u64,
        out: &mut Vec<Out>,
        reason: Failure,
        detail: String,
    ) {
        if self.ike.take().is_some() {
            self.stats.fail(reason);
            out.push(Out::Event(Event::IkeDown {
                why: format!("{reason}: {detail}"),
            }));
        }
        if !self.children.is_empty() {
            self.children.clear();
            out.push(Out::Changed);
        }
        if self.cfg.role == Role::Initiator && !self.closing {
            self.retry_at = Some(now + RETRY_MS * MS);
        }
    }
}

impl Engine {
    /// When [`Engine::tick`] next has something to do (the engine's clock, ns): the earliest
    /// retransmission, rekey, hard lifetime, grace end, pending switch, half-open expiry,
    /// liveness check or reconnect; `Some(0)` when work is queued now; `None` when nothing is
    /// scheduled (a responder without SAs). The edge sleeps until then, as quinn-proto's
    /// `poll_timeout` lets its edge do, instead of waking on a fixed interval. Calling `tick`
    /// earlier is harmless; calling it later only makes those things late.
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut due: Option<u64> = None;
        let mut at = |t: u64| due = Some(due.map_or(t, |d| d.min(t)));
        for c in &self.children {
            if let Some(u) = c.until {
                at(u);
            }
            if c.expire_at != 0 {
                at(c.expire_at);
            }
            if !c.replaced && c.until.is_none() && c.out {
                at(c.rekey_at);
            }
            if let Some(t) = c.pending_since {
                at(t + SWITCH_WAIT_MS * MS);
                // unconfirmed_survivors: half of the old SA's remaining life.
                if let Some(o) = c.awaits_delete_of.and_then(|old| {
                    self.children
                        .iter()
                        .find(|o| o.keys.spi_in == old && o.expire_at != 0)
                }) {
                    at(t + o.expire_at.saturating_sub(t) / 2);
                }
            }
        }
        for s in &self.others {
            // (`tick` forgets them once strictly past these.)
            match s.state() {
                State::Authenticating => at(s.created + HALF_OPEN_MS * MS + 1),
                State::Rekeyed => at(s.rekey_at.saturating_add(HALF_OPEN_MS * MS + 1)),
                _ => {}
            }
            if let Some(f) = &s.flight {
                at(f.next_at);
            }
        }
        let Some(s) = self.ike.as_ref() else {
            if !self.closing {
                if let Some(t) = self.retry_at {
                    at(t);
                }
            }
            return due;
        };
        if let Some(f) = &s.flight {
            at(f.next_at);
        }
        if s.state() == State::Established {
            if !self.deferred.is_empty() || (s.flight.is_none() && !s.queue.is_empty()) {
                at(0);
            }
            if self.cfg.ike_rekey_ms > 0 && s.rekey_at != u64::MAX {
                at(s.rekey_at);
            }
            let active = self
                .children
                .iter()
                .any(|c| c.until.is_none() && !c.replaced);
            if (s.initiator || self.remake_child) && !active {
                at(self.new_child_at);
            }
            if self.cfg.dpd_ms > 0 && s.flight.is_none() {
                at(s.last_heard + self.cfg.dpd_ms * MS);
            }
        }
        due
    }
}

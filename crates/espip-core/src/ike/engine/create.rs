//! CREATE_CHILD_SA: new CHILD_SAs, CHILD_SA and IKE SA rekeys, and their collisions
//! (RFC 7296 sections 1.3, 2.8).

use super::*;

impl Engine {
    /// Rekey now (as strongSwan's `swanctl --rekey`): the IKE SA if `ike`, else every current
    /// CHILD_SA. The exchange starts when no other is in flight (and, for a CHILD_SA the peer
    /// just made, once espip sends on it).
    pub fn rekey_now(
        &mut self,
        ike: bool,
        now: u64,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<Out>, &'static str> {
        let Some(s) = self
            .ike
            .as_mut()
            .filter(|s| s.state() == State::Established)
        else {
            return Err("no IKE SA is up");
        };
        if ike {
            let flying = matches!(
                s.flight.as_ref().map(|f| &f.req),
                Some(Req::RekeyIke { .. })
            );
            if !flying && !s.queue.contains(&Task::RekeyIke) {
                s.queue.push(Task::RekeyIke);
            }
        } else {
            // The current CHILD_SAs, including one the peer just made that waits for the
            // DELETE of the old one (its rekey starts once it carries traffic).
            let mut any = false;
            for c in &mut self.children {
                if !c.replaced && c.until.is_none() {
                    c.rekey_at = c.rekey_at.min(now);
                    any = true;
                }
            }
            if !any {
                return Err("no CHILD_SA is up (one is being made)");
            }
        }
        Ok(self.tick(now, rng))
    }

    pub(super) fn esp_offer(&self, spi: u32, pfs: bool) -> Vec<Proposal> {
        self.cfg
            .esp
            .iter()
            .enumerate()
            .map(|(i, p)| p.to_wire(i as u8 + 1, spi, pfs))
            .collect()
    }

    pub(super) fn respond_create(
        &mut self,
        s: &mut IkeSa,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> (Vec<Payload>, After) {
        let offered = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let ni = take!(p, Payload::Nonce(n) => n.clone());
        let ke = take!(p, Payload::Ke { group, data } => (*group, data.clone()));
        let Some(ni) = ni else {
            return (
                vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                After::Keep,
            );
        };
        let nr = rand_bytes(rng, 32);
        let keys = s.keys().clone();
        // Rekey of the IKE SA.
        if offered.iter().any(|x| x.protocol == proto::IKE) {
            return self.respond_rekey_ike(s, &offered, ni, nr, ke, &keys, now, rng, out);
        }
        // Rekey of a CHILD_SA, or a new one when this peer has none (its last one expired or
        // was deleted while the IKE SA lived on).
        let rekey_spi = p.iter().find_map(|x| match x {
            Payload::Notify { kind, spi, .. } if *kind == notify::REKEY_SA => Some(spi.clone()),
            _ => None,
        });
        let old_idx = match self.child_to_rekey(rekey_spi.as_deref(), now, out) {
            Ok(i) => i,
            Err(refusal) => return (refusal, After::Keep),
        };
        let old_in = old_idx.map(|i| self.children[i].keys.spi_in);
        let again = old_idx.is_some_and(|i| self.children[i].replaced);
        let flight = s.flight.as_ref().map(|f| &f.req);
        // Section 2.25: no CHILD_SA while our rekey of the IKE SA is under way (the peer
        // tries again on the new one); and of two new CHILD_SAs asked for at once (each side
        // lost its last one) the original initiator's is made.
        if matches!(flight, Some(Req::RekeyIke { .. }))
            || (old_idx.is_none() && s.initiator && matches!(flight, Some(Req::NewChild { .. })))
        {
            self.stats.fail(Failure::RekeyCollision);
            return (
                vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                After::Keep,
            );
        }
        // Both sides rekey this CHILD_SA at once (section 2.8.1): answer as usual; the nonces
        // decide which new CHILD_SA stays when the answer to ours comes.
        let colliding = old_in.is_some_and(|o| {
            std::iter::once(&*s)
                .chain(self.ike.iter())
                .chain(&self.others)
                .any(|x| rekeying_child(x).is_some_and(|(r, _)| r == o))
        });
        let tsi = take!(p, Payload::TsI(v) => v.clone()).unwrap_or_default();
        let tsr = take!(p, Payload::TsR(v) => v.clone()).unwrap_or_default();
        let pfs = ke.as_ref().and_then(|(g, _)| Group::from_id(*g));
        if ke.is_some() && pfs.is_none() {
            let g = self.cfg.esp.iter().find_map(|e| e.groups.first().copied());
            return (
                vec![match g {
                    Some(g) => {
                        Payload::notify(notify::INVALID_KE_PAYLOAD, g.id().to_be_bytes().to_vec())
                    }
                    None => Payload::notify(notify::NO_PROPOSAL_CHOSEN, Vec::new()),
                }],
                After::Keep,
            );
        }
        let (choice, tsi, tsr) = match self.child_for(&offered, pfs, &tsi, &tsr, out) {
            Ok(c) => c,
            Err(n) => return (vec![Payload::notify(n, Vec::new())], After::Keep),
        };
        let (resp_ke, shared) = match respond_ke(choice.group, ke, rng) {
            Ok(x) => x,
            Err(refusal) => return (vec![refusal], After::Keep),
        };
        let spi_in = rand_spi(rng);
        let (i2r, r2i) = crypto::child_keys(
            keys.prf,
            &keys.sk_d,
            choice.cipher,
            shared.as_deref().map(|v| v.as_slice()),
            &ni,
            &nr,
        );
        let ck = ChildKeys {
            spi_in,
            spi_out: choice.spi,
            key_in: i2r,
            key_out: r2i,
            esn: choice.esn,
        };
        if let (true, Some(o)) = (colliding, old_in) {
            self.child_collision = Some(ChildCollision {
                old_in: o,
                theirs_in: spi_in,
                low: ni.as_slice().min(nr.as_slice()).to_vec(),
                again,
            });
        }
        // A rekey: inbound now, outbound once the peer deletes the old SA. A new CHILD_SA:
        // both at once (as in IKE_AUTH).
        let c = self.new_child(ck, choice.name(), old_idx.is_none(), now, rng);
        if let Some(i) = old_idx {
            self.children[i].replaced = true;
            self.stats.child_rekeys += 1;
        }
        self.push_child(c, ts_string(&tsr, &tsi), old_in, out);
        let mut resp = vec![
            Payload::Sa(vec![choice.to_wire(spi_in)]),
            Payload::Nonce(nr),
        ];
        resp.extend(resp_ke);
        resp.push(Payload::TsI(tsi));
        resp.push(Payload::TsR(tsr));
        (resp, After::Keep)
    }

    /// The CHILD_SA a CREATE_CHILD_SA request rekeys (by the SPI of its REKEY_SA notify), or
    /// `None` for a new one when this peer has none active; `Err`: the answer refusing it.
    fn child_to_rekey(
        &mut self,
        rekey_spi: Option<&[u8]>,
        now: u64,
        out: &mut Vec<Out>,
    ) -> Result<Option<usize>, Vec<Payload>> {
        match rekey_spi {
            None => {
                if self.has_active_child() {
                    self.stats.fail(Failure::Notify(notify::NO_ADDITIONAL_SAS));
                    return Err(vec![Payload::notify(35, Vec::new())]);
                }
                Ok(None)
            }
            Some(spi) => {
                let old_out = <[u8; 4]>::try_from(spi).ok().map(u32::from_be_bytes);
                // The CHILD_SA we send on, even if a CHILD_SA the peer made replaced it and
                // waits for the peer to confirm (DELETE the old one): a peer that asks to rekey
                // the old one again never got our answer (strongSwan drops an answer whose
                // message ID equals that of a request it is processing, and may restart the
                // exchange on a new IKE SA), so the waiting one is abandoned below.
                let Some(idx) = self.children.iter().position(|c| {
                    Some(c.keys.spi_out) == old_out && c.until.is_none() && (!c.replaced || c.out)
                }) else {
                    if self
                        .children
                        .iter()
                        .any(|c| Some(c.keys.spi_out) == old_out)
                    {
                        // Section 2.25: one we are closing (replaced by our own rekey,
                        // or deleted): the peer may try again.
                        self.stats.fail(Failure::RekeyCollision);
                        return Err(vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())]);
                    }
                    self.fail(
                        out,
                        Failure::Notify(notify::CHILD_SA_NOT_FOUND),
                        format!("rekey of SPI {old_out:08x?} by {}", self.cfg.name),
                    );
                    return Err(vec![Payload::Notify {
                        protocol: proto::ESP,
                        spi: spi.to_vec(),
                        kind: notify::CHILD_SA_NOT_FOUND,
                        data: Vec::new(),
                    }]);
                };
                if self.children[idx].replaced {
                    for c in &mut self.children {
                        if c.pending_since.take().is_some() {
                            c.awaits_delete_of = None;
                            c.replaced = true;
                            c.until = Some(now + GRACE_MS * MS);
                            out.push(Out::Event(Event::ChildDown {
                                spi_in: c.keys.spi_in,
                                why: "abandoned: the peer rekeys the SA it replaced again",
                            }));
                        }
                    }
                }
                Ok(Some(idx))
            }
        }
    }

    /// A CREATE_CHILD_SA request that rekeys the IKE SA (RFC 7296 section 1.3.2): the new
    /// IKE SA's keys from a fresh exchange, a collision with our own rekey noted for the
    /// nonces to decide (section 2.8.2).
    #[allow(clippy::too_many_arguments)]
    fn respond_rekey_ike(
        &mut self,
        s: &mut IkeSa,
        offered: &[Proposal],
        ni: Vec<u8>,
        nr: Vec<u8>,
        ke: Option<(u16, Vec<u8>)>,
        keys: &IkeKeys,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> (Vec<Payload>, After) {
        // Section 2.25: not while we create, rekey or delete a CHILD_SA on it.
        if matches!(
            s.flight.as_ref().map(|f| &f.req),
            Some(Req::RekeyChild { .. } | Req::NewChild { .. } | Req::DeleteChild(_))
        ) {
            self.stats.fail(Failure::RekeyCollision);
            return (
                vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                After::Keep,
            );
        }
        // Both sides rekey the IKE SA at once (section 2.8.2): answer as usual; the
        // nonces decide which new IKE SA stays when the answer to ours comes.
        let colliding = matches!(
            s.flight.as_ref().map(|f| &f.req),
            Some(Req::RekeyIke { .. })
        );
        let Some(choice) = proposal::choose_ike(offered, &self.cfg.ike) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                format!("IKE rekey by {}", self.cfg.name),
            );
            return (
                vec![Payload::notify(notify::NO_PROPOSAL_CHOSEN, Vec::new())],
                After::Keep,
            );
        };
        let Some((g, kdata)) = ke.filter(|(g, _)| *g == choice.group.id()) else {
            return (
                vec![Payload::notify(
                    notify::INVALID_KE_PAYLOAD,
                    choice.group.id().to_be_bytes().to_vec(),
                )],
                After::Keep,
            );
        };
        let _ = g;
        let peer_spi = offered
            .iter()
            .find(|x| x.num == choice.num && x.protocol == proto::IKE)
            .and_then(|x| <[u8; 8]>::try_from(&x.spi[..]).ok())
            .map(u64::from_be_bytes);
        let (Some(peer_spi), Some(share)) = (peer_spi, KeyShare::new(choice.group, rng)) else {
            return (
                vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                After::Keep,
            );
        };
        let kr = share.public.clone();
        let Ok(shared) = share.agree(&kdata) else {
            return (
                vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                After::Keep,
            );
        };
        let spi_r = rand_u64(rng);
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &nr, Some(&keys.sk_d));
        if colliding {
            self.ike_collision = Some(IkeCollision {
                old: (s.spi_i, s.spi_r),
                theirs: (peer_spi, spi_r),
                low: ni.as_slice().min(nr.as_slice()).to_vec(),
            });
        }
        let new = self.rekeyed_sa(
            s,
            choice,
            &seed,
            ni,
            nr.clone(),
            peer_spi,
            spi_r,
            false,
            now,
            rng,
        );
        self.stats.ike_rekeys += 1;
        out.push(Out::Event(Event::IkeRekeyed { spis: new.spis() }));
        (
            vec![
                Payload::Sa(vec![choice.to_wire(spi_r.to_be_bytes().to_vec())]),
                Payload::Nonce(nr),
                Payload::Ke {
                    group: choice.group.id(),
                    data: kr,
                },
            ],
            After::Replaced(Box::new(new)),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rekeyed_sa(
        &mut self,
        old: &IkeSa,
        choice: IkeChoice,
        seed: &[u8],
        ni: Vec<u8>,
        nr: Vec<u8>,
        spi_i: u64,
        spi_r: u64,
        initiator: bool,
        now: u64,
        rng: &dyn SecureRandom,
    ) -> IkeSa {
        self.stats.ike_keys_made += 1;
        let keys = crypto::ike_keys(choice.prf, choice.cipher, seed, &ni, &nr, spi_i, spi_r);
        IkeSa {
            spi_i,
            spi_r,
            initiator,
            phase: Phase::Keyed {
                choice,
                keys,
                stage: Stage::Established,
            },
            ni,
            nr,
            init_req: Vec::new(),
            init_resp: Vec::new(),
            next_id: 0,
            flight: None,
            peer_next: 0,
            cached: None,
            iv: 0,
            peer: old.peer,
            natt: old.natt,
            mobike: old.mobike,
            created: now,
            rekey_at: if self.cfg.ike_rekey_ms > 0 {
                now + self.cfg.ike_rekey_ms * MS - jitter(rng, self.cfg.jitter_ms)
            } else {
                u64::MAX
            },
            last_heard: now,
            queue: Vec::new(),
        }
    }

    /// The peer's survivor of a rekey collision that the peer did not confirm (no DELETE of the
    /// old CHILD_SA) within the switch wait: the peer never completed its exchange (strongSwan
    /// can drop our answer, see respond_create). It is abandoned; the old CHILD_SA, which both
    /// sides still hold and espip still sends on, is rekeyed again by espip.
    ///
    /// Earlier when the old CHILD_SA's hard lifetime is near: at half the time it had left
    /// when the wait began, espip rekeys the old one again, so that the new one (a round trip
    /// away) is there before the old one dies. The survivor stays as the fallback meanwhile: if
    /// the old one dies first (a busy peer answers late, or TEMPORARY_FAILURE), traffic moves
    /// to the survivor (`ensure_out`) rather than to nothing. Once the old one no longer
    /// carries traffic and another SA does, a survivor still unconfirmed is abandoned.
    pub(super) fn unconfirmed_survivors(&mut self, now: u64, out: &mut Vec<Out>) {
        enum Step {
            /// Abandon the survivor, rekey the old one again.
            Abandon,
            /// Rekey the old one again; keep the survivor as the fallback.
            RekeyOld,
            /// The old one is gone and another SA carries traffic: abandon the survivor.
            Superseded,
        }
        let steps: Vec<(u32, u32, Step)> = self
            .children
            .iter()
            .filter_map(|p| {
                let (t, old) = (p.pending_since?, p.awaits_delete_of?);
                let Some(o) = self
                    .children
                    .iter()
                    .find(|c| c.keys.spi_in == old && c.until.is_none() && c.out)
                else {
                    let other = self
                        .children
                        .iter()
                        .any(|c| c.out && c.until.is_none() && c.keys.spi_in != p.keys.spi_in);
                    return other.then_some((p.keys.spi_in, old, Step::Superseded));
                };
                let waited = now.saturating_sub(t);
                // Not earlier than the wait: a peer that completed (espip, or strongSwan when
                // it kept our answer) deletes the old one within a round trip, and abandoning
                // a survivor the peer already sends on would leave espip without a common SA.
                if waited >= SWITCH_WAIT_MS * MS {
                    Some((p.keys.spi_in, old, Step::Abandon))
                } else if o.expire_at != 0 && waited >= o.expire_at.saturating_sub(t) / 2 {
                    Some((p.keys.spi_in, old, Step::RekeyOld))
                } else {
                    None
                }
            })
            .collect();
        for (p_in, old, step) in steps {
            for c in &mut self.children {
                if c.keys.spi_in == p_in && !matches!(step, Step::RekeyOld) {
                    c.pending_since = None;
                    c.awaits_delete_of = None;
                    c.replaced = true;
                    c.until = Some(now + GRACE_MS * MS);
                } else if c.keys.spi_in == old
                    && c.until.is_none()
                    && !matches!(step, Step::Superseded)
                    && c.replaced
                {
                    c.replaced = false;
                    c.out = true;
                    c.rekey_at = now;
                }
            }
            if !matches!(step, Step::RekeyOld) {
                out.push(Out::Event(Event::ChildDown {
                    spi_in: p_in,
                    why: "abandoned: the peer did not complete its side of a rekey collision",
                }));
            }
        }
    }

    /// Activate the outbound half of children waiting for the old SA's delete: those whose
    /// old SA is `deleted_out` (the peer deleted it), or all that waited too long.
    pub(super) fn switch_pending(&mut self, now: u64, force: bool) -> bool {
        let mut changed = false;
        let due: Vec<bool> = self
            .children
            .iter()
            .map(|c| {
                c.pending_since.is_some_and(|t| {
                    force
                        || (c.awaits_delete_of.is_none()
                            && now.saturating_sub(t) >= SWITCH_WAIT_MS * MS)
                })
            })
            .collect();
        let waited = due.iter().any(|d| *d);
        if waited {
            for (c, due) in self.children.iter_mut().zip(due) {
                if due {
                    c.pending_since = None;
                    c.awaits_delete_of = None;
                    c.out = true;
                } else if c.replaced && c.out && c.pending_since.is_none() {
                    c.out = false;
                    c.until.get_or_insert(now + GRACE_MS * MS);
                }
            }
            changed = true;
        }
        changed
    }

    /// The CHILD_SA that the answer `p` to our CREATE_CHILD_SA sets up (we initiated the
    /// exchange: the initiator-to-responder keys are ours to send with), or why not:
    /// (the RFC name of the error, a detail for the log).
    pub(super) fn child_from_answer(
        &self,
        s: &IkeSa,
        p: &[Payload],
        new_in: u32,
        ni: &[u8],
        share: Option<KeyShare>,
    ) -> Result<Answered, (Failure, String)> {
        if let Some(e) = error_notify(p) {
            return Err((
                Failure::Notify(e),
                format!("peer {} refused it", self.cfg.name),
            ));
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let nr = take!(p, Payload::Nonce(n) => n.clone());
        let ke = take!(p, Payload::Ke { data, .. } => data.clone());
        let pfs = share.as_ref().map(KeyShare::group);
        let (Some(choice), Some(nr)) = (proposal::accept_esp(&sa, &self.cfg.esp, pfs), nr) else {
            return Err((
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                "the answer is not one of the proposals we offered".into(),
            ));
        };
        let shared = match (share, ke) {
            (Some(sh), Some(k)) => Some(sh.agree(&k).map_err(|_| {
                (
                    Failure::Notify(notify::INVALID_SYNTAX),
                    "a bad KE in the answer".to_string(),
                )
            })?),
            (None, _) => None,
            (Some(_), None) => {
                return Err((
                    Failure::Notify(notify::INVALID_SYNTAX),
                    "no KE in the answer to a PFS proposal".into(),
                ))
            }
        };
        let keys = s.keys();
        let (i2r, r2i) = crypto::child_keys(
            keys.prf,
            &keys.sk_d,
            choice.cipher,
            shared.as_deref().map(|v| v.as_slice()),
            ni,
            &nr,
        );
        let tsi = take!(p, Payload::TsI(v) => v.clone()).unwrap_or_default();
        let tsr = take!(p, Payload::TsR(v) => v.clone()).unwrap_or_default();
        let ck = ChildKeys {
            spi_in: new_in,
            spi_out: choice.spi,
            key_in: r2i,
            key_out: i2r,
            esn: choice.esn,
        };
        Ok((ck, choice, ts_string(&tsi, &tsr), nr))
    }

    /// Install a CHILD_SA we initiated (both halves at once) and say so.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install_child(
        &mut self,
        ck: ChildKeys,
        choice: &EspChoice,
        ts: String,
        rekey_of: Option<u32>,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) {
        let c = self.new_child(ck, choice.name(), true, now, rng);
        self.push_child(c, ts, rekey_of, out);
    }

    /// Hold CHILD_SA `c` and say so: the data path's SAs changed, and it is up (`ts`: its
    /// selectors for the log; `rekey_of`: the inbound SPI it replaces).
    pub(super) fn push_child(
        &mut self,
        c: Child,
        ts: String,
        rekey_of: Option<u32>,
        out: &mut Vec<Out>,
    ) {
        out.push(Out::Changed);
        out.push(Out::Event(Event::ChildUp {
            spi_in: c.keys.spi_in,
            spi_out: c.keys.spi_out,
            proposal: c.proposal.clone(),
            ts,
            rekey_of,
        }));
        self.children.push(c);
    }

    /// The answer to our CREATE_CHILD_SA rekeying the CHILD_SA `old_in`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_rekey_child_response(
        &mut self,
        s: &mut IkeSa,
        old_in: u32,
        new_in: u32,
        ni: Vec<u8>,
        share: Option<KeyShare>,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        match self.child_from_answer(s, p, new_in, &ni, share) {
            Err((reason, detail)) => {
                // Had we answered the peer's rekey of it, the peer's stays.
                self.child_collision.take_if(|c| c.old_in == old_in);
                if reason == Failure::Notify(notify::CHILD_SA_NOT_FOUND) {
                    // The peer holds no such SA any more (section 2.25: it deleted
                    // it, and its DELETE crossed our request or was lost): sending
                    // on it loses every packet. As for the peer's DELETE: gone now,
                    // a CHILD_SA the peer made in its place carries our traffic, and
                    // with none left a new one is made without waiting.
                    self.fail(out, reason, format!("CHILD_SA rekey: {detail}"));
                    self.peer_lost_child(old_in, now, out);
                    return After::Keep;
                }
                let (delay, spread) = if reason == Failure::Notify(notify::TEMPORARY_FAILURE) {
                    // A collision (section 2.25: the peer is rekeying the IKE SA, or
                    // closing this CHILD_SA): tried again soon, at a random moment so
                    // that two sides do not collide again.
                    self.stats.fail(Failure::RekeyCollision);
                    (100, 400)
                } else {
                    self.fail(out, reason, format!("CHILD_SA rekey: {detail}"));
                    (10_000, 2_000)
                };
                if let Some(c) = self.children.iter_mut().find(|c| c.keys.spi_in == old_in) {
                    c.rekey_at = now + delay * MS + jitter(rng, spread);
                }
            }
            Ok((ck, choice, ts, nr)) => {
                for o in &mut self.children {
                    if o.keys.spi_in == old_in {
                        o.out = false;
                        o.replaced = true;
                    }
                }
                self.stats.child_rekeys += 1;
                let collision = self.child_collision.take_if(|c| c.old_in == old_in);
                match collision {
                    Some(c) if c.again || ours_redundant((&ni, &nr), &c.low) => {
                        // Section 2.8.1: ours holds the lowest nonce. We made it, so
                        // we delete it; the peer's stays, and the peer deletes the old
                        // one: we send on the old one until then (the peer may not
                        // have our answer yet that gives it both halves of its own).
                        let mut x = self.new_child(ck, choice.name(), false, now, rng);
                        x.pending_since = None;
                        x.replaced = true;
                        self.children.push(x);
                        // (Unless the peer deleted it meanwhile: then its new one
                        // carries our traffic already.)
                        if let Some(o) = self
                            .children
                            .iter_mut()
                            .find(|o| o.keys.spi_in == old_in && o.until.is_none())
                        {
                            o.out = true;
                        }
                        if let Some(t) = self
                            .children
                            .iter_mut()
                            .find(|t| t.keys.spi_in == c.theirs_in && t.pending_since.is_some())
                        {
                            t.awaits_delete_of = Some(old_in);
                        }
                        self.deferred.insert(0, Task::DeleteChild(new_in));
                        out.push(Out::Changed);
                        let why = if c.again {
                            "the peer rekeyed it again before our answer came"
                        } else {
                            "lowest nonce"
                        };
                        out.push(Out::Event(Event::Collision {
                            detail: format!(
                                "both sides rekeyed CHILD_SA {old_in:#010x}: the peer's {:#010x} stays, ours {new_in:#010x} is deleted ({why})",
                                c.theirs_in
                            ),
                        }));
                    }
                    collision => {
                        if let Some(c) = &collision {
                            // The peer's holds the lowest nonce: the peer deletes
                            // it; it never carries our traffic.
                            if let Some(t) = self
                                .children
                                .iter_mut()
                                .find(|x| x.keys.spi_in == c.theirs_in)
                            {
                                t.pending_since = None;
                                t.out = false;
                                t.replaced = true;
                                t.until.get_or_insert(now + SWITCH_WAIT_MS * MS * 2);
                            }
                            out.push(Out::Event(Event::Collision {
                                detail: format!(
                                    "both sides rekeyed CHILD_SA {old_in:#010x}: ours {new_in:#010x} stays, the peer deletes its {:#010x} (lowest nonce)",
                                    c.theirs_in
                                ),
                            }));
                        }
                        self.install_child(ck, &choice, ts, Some(old_in), now, rng, out);
                        // On the current IKE SA (this answer may have come on one a
                        // rekey replaced).
                        self.deferred.insert(0, Task::DeleteChild(old_in));
                    }
                }
            }
        }
        After::Keep
    }

    /// The answer to our CREATE_CHILD_SA for a new CHILD_SA.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_new_child_response(
        &mut self,
        s: &mut IkeSa,
        new_in: u32,
        ni: Vec<u8>,
        share: Option<KeyShare>,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        match self.child_from_answer(s, p, new_in, &ni, share) {
            Err((reason, detail)) => {
                self.fail(out, reason, format!("new CHILD_SA: {detail}"));
                self.new_child_at = now + 10_000 * MS + jitter(rng, 2_000);
            }
            Ok((ck, choice, ts, _)) => self.install_child(ck, &choice, ts, None, now, rng, out),
        }
        After::Keep
    }

    /// The answer to our CREATE_CHILD_SA rekeying the IKE SA.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_rekey_ike_response(
        &mut self,
        s: &mut IkeSa,
        spi: u64,
        ni: Vec<u8>,
        share: KeyShare,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        if let Some(e) = error_notify(p) {
            if e == notify::TEMPORARY_FAILURE {
                self.stats.fail(Failure::RekeyCollision);
            } else {
                self.fail(
                    out,
                    Failure::Notify(e),
                    format!("peer {} refused the IKE SA rekey", self.cfg.name),
                );
            }
            s.rekey_at = if e == notify::TEMPORARY_FAILURE {
                // After the longest CHILD_SA retry (0.1-0.5 s): a CHILD_SA rekey that
                // crossed this one goes first, rather than the two refusing each
                // other again while the CHILD_SA's hard lifetime comes near.
                now + 600 * MS + jitter(rng, 800)
            } else {
                now + 1_000 * MS + jitter(rng, 2_000)
            };
            return After::Keep;
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let nr = take!(p, Payload::Nonce(n) => n.clone());
        let ke = take!(p, Payload::Ke { data, .. } => data.clone());
        let choice = proposal::accept_ike(&sa, &self.cfg.ike);
        let peer_spi = sa
            .first()
            .and_then(|x| <[u8; 8]>::try_from(&x.spi[..]).ok())
            .map(u64::from_be_bytes);
        let (Some(choice), Some(nr), Some(ke), Some(spi_r)) = (choice, nr, ke, peer_spi) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                "the IKE rekey answer is not one we offered".into(),
            );
            s.rekey_at = now + 10_000 * MS;
            return After::Keep;
        };
        let Ok(shared) = share.agree(&ke) else {
            self.fail(
                out,
                Failure::Notify(notify::INVALID_SYNTAX),
                "bad KE in the IKE rekey answer".into(),
            );
            s.rekey_at = now + 10_000 * MS;
            return After::Keep;
        };
        let old_d = s.keys().sk_d.clone();
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &nr, Some(&old_d));
        let collision = self.ike_collision.take_if(|c| c.old == (s.spi_i, s.spi_r));
        let redundant = collision
            .as_ref()
            .is_some_and(|c| ours_redundant((&ni, &nr), &c.low));
        let mut new = self.rekeyed_sa(s, choice, &seed, ni, nr, spi, spi_r, true, now, rng);
        if let Some(c) = collision {
            let theirs = format!("{:016x}_i {:016x}_r", c.theirs.0, c.theirs.1);
            out.push(Out::Event(Event::Collision {
                detail: if redundant {
                    format!("both sides rekeyed the IKE SA: the peer's {theirs} stays, ours {} is deleted (lowest nonce)", new.spis())
                } else {
                    format!("both sides rekeyed the IKE SA: ours {} stays, the peer deletes its {theirs} (lowest nonce)", new.spis())
                },
            }));
        }
        if redundant {
            // Section 2.8.2: ours holds the lowest nonce. We delete it on itself; the
            // peer, whose new IKE SA stays, deletes the old one.
            new.set_stage(Stage::Rekeyed);
            new.rekey_at = now;
            self.delete_ike_on(&mut new, now, out);
            self.others.push(new);
            return After::Keep;
        }
        self.stats.ike_rekeys += 1;
        out.push(Out::Event(Event::IkeRekeyed { spis: new.spis() }));
        // Delete the old IKE SA on itself.
        self.delete_ike_on(s, now, out);
        After::Replaced(Box::new(new))
    }
}

/// Our KE payload and the shared secret of a CREATE_CHILD_SA with PFS (both `None` without).
type Pfs = (Option<Payload>, Option<zeroize::Zeroizing<Vec<u8>>>);

/// Our side of a CREATE_CHILD_SA's Diffie-Hellman (PFS) when the chosen proposal has a group
/// and the request a key share: our KE payload and the shared secret; `Err`: the notify that
/// refuses it.
fn respond_ke(
    group: Option<Group>,
    ke: Option<(u16, Vec<u8>)>,
    rng: &dyn SecureRandom,
) -> Result<Pfs, Payload> {
    let mut resp_ke = None;
    let shared = match (group, ke) {
        (Some(g), Some((_, data))) => {
            let Some(share) = KeyShare::new(g, rng) else {
                return Err(Payload::notify(notify::TEMPORARY_FAILURE, Vec::new()));
            };
            resp_ke = Some(Payload::Ke {
                group: g.id(),
                data: share.public.clone(),
            });
            match share.agree(&data) {
                Ok(x) => Some(x),
                Err(_) => {
                    return Err(Payload::notify(notify::INVALID_SYNTAX, Vec::new()));
                }
            }
        }
        _ => None,
    };
    Ok((resp_ke, shared))
}

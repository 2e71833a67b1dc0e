//! IKE_AUTH: the pre-shared key AUTH payloads, their check, and the first CHILD_SA
//! (RFC 7296 sections 1.2, 2.15).

use super::*;

impl Engine {
    pub(super) fn auth_payloads(
        &self,
        s: &IkeSa,
        id_payload: Payload,
        signed_msg: &[u8],
        peer_nonce: &[u8],
    ) -> Payload {
        let keys = s.keys();
        let sk_p = if s.initiator {
            &keys.sk_pi
        } else {
            &keys.sk_pr
        };
        let body = match &id_payload {
            Payload::IdI(id) | Payload::IdR(id) => id.body(),
            _ => Vec::new(),
        };
        let auth = crypto::psk_auth(keys.prf, &self.cfg.psk, signed_msg, peer_nonce, sk_p, &body);
        Payload::Auth {
            method: 2,
            data: auth.to_vec(),
        }
    }

    pub(super) fn verify_auth(
        &self,
        s: &IkeSa,
        p: &[Payload],
        from_initiator: bool,
    ) -> Result<(), AuthError> {
        let id = if from_initiator {
            take!(p, Payload::IdI(i) => i.clone())
        } else {
            take!(p, Payload::IdR(i) => i.clone())
        }
        .ok_or(AuthError::NoIdentity)?;
        // A lobby authenticates no one: an identity none of its peers has ends here.
        if let Some(ids) = &self.cfg.lobby {
            return Err(AuthError::WrongIdentity {
                got: id.display(),
                want: ids.iter().map(Id::display).collect::<Vec<_>>().join(" or "),
            });
        }
        if id != self.cfg.remote_id {
            return Err(AuthError::WrongIdentity {
                got: id.display(),
                want: self.cfg.remote_id.display(),
            });
        }
        let (method, data) = take!(p, Payload::Auth { method, data } => (*method, data.clone()))
            .ok_or(AuthError::NoAuth)?;
        if method != 2 {
            return Err(AuthError::Method(method));
        }
        let keys = s.keys();
        let (signed, nonce, sk_p) = if from_initiator {
            (&s.init_req, &s.nr, &keys.sk_pi)
        } else {
            (&s.init_resp, &s.ni, &keys.sk_pr)
        };
        let want = crypto::psk_auth(keys.prf, &self.cfg.psk, signed, nonce, sk_p, &id.body());
        if !crypto::mac_eq(&want, &data) {
            return Err(AuthError::Mismatch);
        }
        Ok(())
    }

    pub(super) fn new_child(
        &self,
        keys: ChildKeys,
        proposal: String,
        out_now: bool,
        now: u64,
        rng: &dyn SecureRandom,
    ) -> Child {
        let rekey_at = if self.cfg.child_rekey_ms > 0 {
            now + self.cfg.child_rekey_ms * MS - jitter(rng, self.cfg.jitter_ms)
        } else {
            u64::MAX
        };
        Child {
            keys,
            proposal,
            out: out_now,
            pending_since: (!out_now).then_some(now),
            awaits_delete_of: None,
            until: None,
            replaced: false,
            rekey_at,
            expire_at: if self.cfg.child_life_ms > 0 {
                now + self.cfg.child_life_ms * MS
            } else {
                0
            },
            created: now,
        }
    }

    pub(super) fn established(
        &mut self,
        s: &mut IkeSa,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) {
        s.set_stage(Stage::Established);
        s.created = now;
        s.rekey_at = if self.cfg.ike_rekey_ms > 0 {
            now + self.cfg.ike_rekey_ms * MS - jitter(rng, self.cfg.jitter_ms)
        } else {
            u64::MAX
        };
        self.stats.established += 1;
        self.group_hint = None;
        out.push(Out::Event(Event::IkeUp {
            spis: s.spis(),
            proposal: s.choice().map(|c| c.name()).unwrap_or_default(),
            natt: s.natt,
            mobike: s.mobike,
        }));
    }

    pub(super) fn respond_auth(
        &mut self,
        s: &mut IkeSa,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> (Vec<Payload>, After) {
        if let Err(why) = self.verify_auth(s, p, true) {
            self.fail(
                out,
                Failure::Notify(notify::AUTHENTICATION_FAILED),
                format!("peer {} ({}): {why}", self.cfg.name, s.peer.ip()),
            );
            return (
                vec![Payload::notify(notify::AUTHENTICATION_FAILED, Vec::new())],
                After::Drop,
            );
        }
        let idr = Payload::IdR(self.cfg.local_id.clone());
        let auth = self.auth_payloads(s, idr.clone(), &s.init_resp, &s.ni);
        let mut resp = vec![idr, auth];
        // The first CHILD_SA.
        let offered = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let tsi = take!(p, Payload::TsI(v) => v.clone()).unwrap_or_default();
        let tsr = take!(p, Payload::TsR(v) => v.clone()).unwrap_or_default();
        // A child that cannot be made leaves the IKE SA up (section 1.2) but without traffic,
        // so espip gives up the IKE SA: the error is logged, the initiator retries later.
        let child = self.child_for(&offered, None, &tsi, &tsr, out);
        s.peer_next = s.peer_next.max(2);
        s.mobike = self.cfg.mobike && find_notify(p, notify::MOBIKE_SUPPORTED).is_some();
        if s.mobike {
            resp.push(Payload::notify(notify::MOBIKE_SUPPORTED, Vec::new()));
        }
        self.established(s, now, rng, out);
        // The peer started over: whatever SAs we had with it go.
        self.children.clear();
        match child {
            Ok((choice, tsi, tsr)) => {
                let spi_in = rand_spi(rng);
                let keys = s.keys();
                let (i2r, r2i) =
                    crypto::child_keys(keys.prf, &keys.sk_d, choice.cipher, None, &s.ni, &s.nr);
                let ck = ChildKeys {
                    spi_in,
                    spi_out: choice.spi,
                    key_in: i2r,
                    key_out: r2i,
                    esn: choice.esn,
                };
                let c = self.new_child(ck, choice.name(), true, now, rng);
                self.push_child(c, ts_string(&tsr, &tsi), None, out);
                resp.push(Payload::Sa(vec![choice.to_wire(spi_in)]));
                resp.push(Payload::TsI(tsi));
                resp.push(Payload::TsR(tsr));
            }
            Err(n) => {
                out.push(Out::Changed);
                resp.push(Payload::notify(n, Vec::new()));
            }
        }
        (resp, After::Promote)
    }

    /// Choose an ESP proposal and narrow the selectors, or the error notify to send.
    pub(super) fn child_for(
        &mut self,
        offered: &[Proposal],
        pfs: Option<Group>,
        tsi: &[Ts],
        tsr: &[Ts],
        out: &mut Vec<Out>,
    ) -> Result<(EspChoice, Vec<Ts>, Vec<Ts>), u16> {
        let Some(choice) = proposal::choose_esp(offered, &self.cfg.esp, pfs) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                format!(
                    "peer {} offered no ESP proposal we accept (ours: {})",
                    self.cfg.name,
                    self.cfg
                        .esp
                        .iter()
                        .map(EspProposal::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return Err(notify::NO_PROPOSAL_CHOSEN);
        };
        // TSi is the initiator's side: the peer's addresses, within allowed_ips; TSr ours.
        let ni = ts::narrow(tsi, &self.cfg.remote_ts);
        let nr = ts::narrow(tsr, &self.cfg.local_ts);
        if ni.is_empty() || nr.is_empty() {
            self.fail(
                out,
                Failure::Notify(notify::TS_UNACCEPTABLE),
                format!(
                    "peer {} proposed {} but allowed_ips is {} and our side is {}",
                    self.cfg.name,
                    ts_string(tsi, tsr),
                    ts_string(&self.cfg.remote_ts, &[]),
                    ts_string(&self.cfg.local_ts, &[]),
                ),
            );
            return Err(notify::TS_UNACCEPTABLE);
        }
        Ok((choice, ni, nr))
    }

    /// The answer to our IKE_AUTH: the responder authenticated, the first CHILD_SA.
    pub(super) fn on_auth_response(
        &mut self,
        s: &mut IkeSa,
        spi_in: u32,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> After {
        if let Some(e) = error_notify(p)
            .filter(|e| *e != notify::NO_PROPOSAL_CHOSEN && *e != notify::TS_UNACCEPTABLE)
        {
            self.fail(
                out,
                Failure::Notify(e),
                format!(
                    "peer {} refused IKE_AUTH (check psk_file and the identities)",
                    self.cfg.name
                ),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return After::Drop;
        }
        if let Err(why) = self.verify_auth(s, p, false) {
            self.fail(
                out,
                Failure::Notify(notify::AUTHENTICATION_FAILED),
                format!("peer {} ({}): {why}", self.cfg.name, s.peer.ip()),
            );
            // The responder thinks the IKE SA is up: tell it, in a separate
            // INFORMATIONAL (section 2.21.2), so it deletes its SAs too. Sent once:
            // this side forgets the IKE SA now.
            let h = s.header(exchange::INFORMATIONAL, s.next_id, false);
            s.next_id += 1;
            let m = s.seal(
                h,
                &[Payload::notify(notify::AUTHENTICATION_FAILED, Vec::new())],
            );
            out.push(Out::Send {
                to: s.peer,
                natt: s.natt,
                msg: m,
            });
            self.retry_at = Some(now + RETRY_MS * MS);
            return After::Drop;
        }
        s.mobike = self.cfg.mobike && find_notify(p, notify::MOBIKE_SUPPORTED).is_some();
        self.established(s, now, rng, out);
        if let Some(e) = error_notify(p) {
            self.fail(
                out,
                Failure::Notify(e),
                format!("peer {} refused the CHILD_SA", self.cfg.name),
            );
            // No traffic without a child: close and try again later.
            out.push(s.delete_request());
            self.retry_at = Some(now + RETRY_MS * MS);
            return After::Drop;
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let tsi = take!(p, Payload::TsI(v) => v.clone()).unwrap_or_default();
        let tsr = take!(p, Payload::TsR(v) => v.clone()).unwrap_or_default();
        let Some(choice) = proposal::accept_esp(&sa, &self.cfg.esp, None) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                "the responder's ESP proposal is not one we offered".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return After::Drop;
        };
        let keys = s.keys();
        let (i2r, r2i) =
            crypto::child_keys(keys.prf, &keys.sk_d, choice.cipher, None, &s.ni, &s.nr);
        let ck = ChildKeys {
            spi_in,
            spi_out: choice.spi,
            key_in: r2i,
            key_out: i2r,
            esn: choice.esn,
        };
        let c = self.new_child(ck, choice.name(), true, now, rng);
        self.children.clear();
        self.push_child(c, ts_string(&tsi, &tsr), None, out);
        After::Keep
    }
}

/// Why the peer's IKE_AUTH does not authenticate it (sent as AUTHENTICATION_FAILED; this is
/// the log's detail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum AuthError {
    #[error("no identity payload")]
    NoIdentity,
    #[error("peer identity {got:?} is not remote_id {want:?}")]
    WrongIdentity { got: String, want: String },
    #[error("no AUTH payload")]
    NoAuth,
    #[error("AUTH method {0} (espip accepts only 2, shared key MIC)")]
    Method(u8),
    #[error("the AUTH value does not verify: the pre-shared keys differ")]
    Mismatch,
}

//! IKE_SA_INIT: the initiator's first message and the answer to it, and the responder's
//! side with its cookies (RFC 7296 sections 1.2, 2.6).

use super::*;

impl Engine {
    /// The cookie for an initiator: VersionIDofSecret | SHA-256(secret | Ni | IPi | SPIi)
    /// (section 2.6), with the current secret (a new one every [`COOKIE_ROTATE_MS`]).
    pub(super) fn cookie(
        &mut self,
        rng: &dyn SecureRandom,
        now: u64,
        ni: &[u8],
        ip: IpAddr,
        spi_i: u64,
    ) -> Vec<u8> {
        let c = &mut self.cookie_secrets;
        let stale = c.current.map_or(true, |(_, _, made)| {
            now.saturating_sub(made) >= COOKIE_ROTATE_MS * MS
        });
        if stale {
            let version = c.current.map_or(0, |(v, _, _)| v.wrapping_add(1));
            // A secret older than two rotations is of no use any more.
            c.previous = c
                .current
                .filter(|(_, _, made)| now.saturating_sub(*made) < 2 * COOKIE_ROTATE_MS * MS)
                .map(|(v, k, _)| (v, k));
            let secret: [u8; 32] = rand_bytes(rng, 32).try_into().expect("32 bytes");
            c.current = Some((version, secret, now));
        }
        let (version, secret, _) = c.current.expect("made above");
        let mut out = vec![version];
        out.extend_from_slice(&cookie_mac(&secret, ni, ip, spi_i));
        out
    }

    /// Whether `given` is a cookie of the current or the previous secret for this request.
    pub(super) fn cookie_valid(
        &self,
        now: u64,
        given: &[u8],
        ni: &[u8],
        ip: IpAddr,
        spi_i: u64,
    ) -> bool {
        let Some((&version, mac)) = given.split_first() else {
            return false;
        };
        let c = &self.cookie_secrets;
        let secret = match (c.current, c.previous) {
            // The current secret makes cookies for COOKIE_ROTATE_MS, which stay good for as
            // long again (rotation happens when the next cookie is made).
            (Some((v, k, made)), _)
                if v == version && now.saturating_sub(made) < 2 * COOKIE_ROTATE_MS * MS =>
            {
                k
            }
            (Some((_, _, made)), Some((v, k)))
                if v == version && now.saturating_sub(made) < COOKIE_ROTATE_MS * MS =>
            {
                k
            }
            _ => return false,
        };
        crypto::mac_eq(mac, &cookie_mac(&secret, ni, ip, spi_i))
    }

    /// An IKE_SA_INIT with an invalid key share came: remembered for the cookie threshold.
    pub(super) fn note_invalid_init(&mut self, now: u64) {
        if self.invalid_inits.len() >= COOKIE_THRESHOLD {
            self.invalid_inits.remove(0);
        }
        self.invalid_inits.push(now);
    }

    pub(super) fn initiate(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        let group = self.group_hint.unwrap_or_else(|| self.cfg.ike[0].groups[0]);
        let Some(share) = KeyShare::new(group, rng) else {
            return;
        };
        let spi_i = rand_u64(rng);
        let ni = rand_bytes(rng, 32);
        let offer = self.ike_offer(group, Vec::new());
        let me = SocketAddr::new(self.cfg.local, self.cfg.local_port);
        let src_hash = if self.cfg.force_encap {
            rand_bytes(rng, 20)
        } else {
            crypto::nat_hash(spi_i, 0, me)
        };
        let payloads = vec![
            Payload::Sa(offer),
            Payload::Ke {
                group: group.id(),
                data: share.public.clone(),
            },
            Payload::Nonce(ni.clone()),
            Payload::notify(notify::NAT_DETECTION_SOURCE_IP, src_hash),
            Payload::notify(
                notify::NAT_DETECTION_DESTINATION_IP,
                crypto::nat_hash(spi_i, 0, self.cfg.remote),
            ),
        ];
        let h = Header {
            spi_i,
            spi_r: 0,
            next: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::INITIATOR,
            msg_id: 0,
            length: 0,
        };
        let m = msg::encode_plain(h, &payloads);
        let sa = IkeSa {
            spi_i,
            spi_r: 0,
            initiator: true,
            phase: Phase::InitSent,
            ni: ni.clone(),
            nr: Vec::new(),
            init_req: m.clone(),
            init_resp: Vec::new(),
            next_id: 1,
            flight: Some(InFlight {
                id: 0,
                msg: m.clone(),
                tries: 0,
                next_at: now + self.cfg.retransmit_ms * MS,
                req: Req::Init { share, ni },
            }),
            peer_next: 0,
            cached: None,
            iv: 0,
            peer: self.cfg.remote,
            natt: false,
            mobike: false,
            created: now,
            rekey_at: u64::MAX,
            last_heard: now,
            queue: Vec::new(),
        };
        self.ike = Some(sa);
        self.stats.requests += 1;
        out.push(Out::Send {
            to: self.cfg.remote,
            natt: false,
            msg: m,
        });
    }

    pub(super) fn init_response(
        &mut self,
        now: u64,
        rng: &dyn SecureRandom,
        h: &Header,
        raw: &[u8],
        p: &[Payload],
        out: &mut Vec<Out>,
    ) {
        let Some(mut s) = self.ike.take() else { return };
        let Some(InFlight {
            req: Req::Init { share, ni },
            ..
        }) = s.flight.take()
        else {
            self.ike = Some(s);
            return;
        };
        if let Some((_, cookie)) = find_notify(p, notify::COOKIE) {
            let cookie = cookie.to_vec();
            self.resend_with_cookie(s, &cookie, (share, ni), now, out);
            return;
        }
        if self.init_refused(p, now, rng, out) {
            return;
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let Some(choice) = proposal::accept_ike(&sa, &self.cfg.ike) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                "the responder's IKE proposal is not one we offered".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        };
        let (Some((g, ke)), Some(nr)) = (
            take!(p, Payload::Ke { group, data } => (*group, data.clone())),
            take!(p, Payload::Nonce(n) => n.clone()),
        ) else {
            self.fail(
                out,
                Failure::Notify(notify::INVALID_SYNTAX),
                "IKE_SA_INIT response without KE or nonce".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        };
        if g != share.group().id() || choice.group != share.group() {
            self.fail(
                out,
                Failure::Notify(notify::INVALID_SYNTAX),
                "KE group differs from the chosen one".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        }
        let Ok(shared) = share.agree(&ke) else {
            self.fail(
                out,
                Failure::Notify(notify::INVALID_SYNTAX),
                "bad KE public value".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        };
        s.spi_r = h.spi_r;
        s.nr = nr;
        s.init_resp = raw.to_vec();
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &s.nr, None);
        self.stats.ike_keys_made += 1;
        let keys = crypto::ike_keys(
            choice.prf,
            choice.cipher,
            &seed,
            &ni,
            &s.nr,
            s.spi_i,
            s.spi_r,
        );
        // IKE_SA_INIT is done: from here the SA has its proposal and keys (it goes when this
        // exchange fails below).
        s.phase = Phase::Keyed {
            choice,
            keys,
            stage: Stage::Authenticating,
        };
        if !self.detect_nat(&mut s, p, now, out) {
            return;
        }
        self.send_auth_request(s, now, rng, out);
    }

    /// The responder asked for a cookie: the same IKE_SA_INIT again with the cookie as its
    /// first payload (section 2.6); a second cookie for a request that carried one is a
    /// failure.
    fn resend_with_cookie(
        &mut self,
        mut s: IkeSa,
        cookie: &[u8],
        (share, ni): (KeyShare, Vec<u8>),
        now: u64,
        out: &mut Vec<Out>,
    ) {
        let mut payloads = msg::parse_chain(&s.init_req, msg::HDR_LEN, s.init_req[16])
            .map(|c| c.payloads)
            .unwrap_or_default();
        let had = matches!(payloads.first(), Some(Payload::Notify { kind, .. }) if *kind == notify::COOKIE);
        if had || cookie.is_empty() || cookie.len() > 64 {
            self.fail(
                out,
                Failure::Notify(notify::COOKIE),
                format!("peer {} keeps asking for a cookie", self.cfg.name),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        }
        payloads.insert(0, Payload::notify(notify::COOKIE, cookie.to_vec()));
        let hdr = msg::parse_header(&s.init_req).expect("our own message");
        let m = msg::encode_plain(hdr, &payloads);
        s.init_req = m.clone();
        s.flight = Some(InFlight {
            id: 0,
            msg: m.clone(),
            tries: 0,
            next_at: now + self.cfg.retransmit_ms * MS,
            req: Req::Init { share, ni },
        });
        out.push(Out::Send {
            to: s.peer,
            natt: s.natt,
            msg: m,
        });
        self.ike = Some(s);
    }

    /// The responder refused IKE_SA_INIT: with INVALID_KE_PAYLOAD naming a group we have, we
    /// start again with it (once); any other error notify waits for the retry. True if `p`
    /// was a refusal.
    fn init_refused(
        &mut self,
        p: &[Payload],
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> bool {
        if let Some((_, data)) = find_notify(p, notify::INVALID_KE_PAYLOAD) {
            let g = data
                .get(..2)
                .and_then(|d| Group::from_id(u16::from_be_bytes([d[0], d[1]])));
            let ok = g.filter(|g| self.cfg.ike.iter().any(|x| x.groups.contains(g)));
            self.fail(
                out,
                Failure::Notify(notify::INVALID_KE_PAYLOAD),
                format!(
                    "peer {} wants group {:?}; retrying with it",
                    self.cfg.name, g
                ),
            );
            if let Some(g) = ok {
                if self.group_hint != Some(g) {
                    self.group_hint = Some(g);
                    self.initiate(now, rng, out);
                    return true;
                }
            }
            self.retry_at = Some(now + RETRY_MS * MS);
            return true;
        }
        if let Some(e) = error_notify(p) {
            self.fail(
                out,
                Failure::Notify(e),
                format!("peer {} refused IKE_SA_INIT", self.cfg.name),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return true;
        }
        false
    }

    /// NAT detection (RFC 7296 section 2.23) from the responder's hashes: behind a NAT, the SA
    /// moves to port 4500 (false, and a failure, for ESP as protocol 50, which cannot cross
    /// one).
    fn detect_nat(&mut self, s: &mut IkeSa, p: &[Payload], now: u64, out: &mut Vec<Out>) -> bool {
        // NAT detection: the responder saw our packet from an address other than ours, or
        // the responder is not where we sent it (or forces encapsulation).
        let me = SocketAddr::new(self.cfg.local, self.cfg.local_port);
        let nat_here = find_notify(p, notify::NAT_DETECTION_DESTINATION_IP)
            .is_some_and(|(_, d)| d != crypto::nat_hash(s.spi_i, s.spi_r, me).as_slice());
        let nat_there = find_notify(p, notify::NAT_DETECTION_SOURCE_IP)
            .is_some_and(|(_, d)| d != crypto::nat_hash(s.spi_i, s.spi_r, s.peer).as_slice());
        if (nat_here || nat_there) && !self.cfg.force_encap {
            // ESP as IP protocol 50 does not cross a NAT (no ports to map).
            self.fail(
                out,
                Failure::NatDetected,
                format!(
                    "a NAT between {} and {} (the NAT detection hashes differ): ESP as IP protocol 50 cannot cross it; use mode = \"esp-udp\" for peer {}",
                    me.ip(),
                    s.peer.ip(),
                    self.cfg.name
                ),
            );
            self.retry_at = Some(now + 6 * RETRY_MS * MS);
            return false;
        }
        if nat_here || nat_there || self.cfg.force_encap {
            s.natt = true;
            s.peer = SocketAddr::new(s.peer.ip(), self.cfg.remote_natt_port);
        }
        true
    }

    /// IKE_SA_INIT is done: our IKE_AUTH request (identities, AUTH, the CHILD_SA's proposal
    /// and traffic selectors), in flight until answered.
    fn send_auth_request(
        &mut self,
        mut s: IkeSa,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) {
        let new_in = rand_spi(rng);
        let idi = Payload::IdI(self.cfg.local_id.clone());
        let auth = self.auth_payloads(&s, idi.clone(), &s.init_req, &s.nr);
        let payloads = vec![
            idi,
            Payload::IdR(self.cfg.remote_id.clone()),
            auth,
            Payload::notify(notify::INITIAL_CONTACT, Vec::new()),
            Payload::Sa(self.esp_offer(new_in, false)),
            Payload::TsI(self.cfg.local_ts.clone()),
            Payload::TsR(self.cfg.remote_ts.clone()),
            Payload::notify(notify::ESP_TFC_PADDING_NOT_SUPPORTED, Vec::new()),
        ];
        let mut payloads = payloads;
        if self.cfg.mobike {
            payloads.push(Payload::notify(notify::MOBIKE_SUPPORTED, Vec::new()));
        }
        let h = s.header(exchange::IKE_AUTH, 1, false);
        s.next_id = 2;
        let m = s.seal(h, &payloads);
        s.flight = Some(InFlight {
            id: 1,
            msg: m.clone(),
            tries: 0,
            next_at: now + self.cfg.retransmit_ms * MS,
            req: Req::Auth { spi_in: new_in },
        });
        self.stats.requests += 1;
        out.push(Out::Send {
            to: s.peer,
            natt: s.natt,
            msg: m,
        });
        self.ike = Some(s);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn respond_init(
        &mut self,
        h: &Header,
        raw: &[u8],
        from: SocketAddr,
        natt: bool,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) {
        // A retransmitted IKE_SA_INIT: the same answer.
        if self.resend_init_response(h, raw, from, natt, out) {
            return;
        }
        let chain = match msg::parse_chain(raw, msg::HDR_LEN, h.next) {
            Ok(c) if c.sk.is_none() => c,
            _ => {
                self.stats.fail(Failure::Malformed);
                return;
            }
        };
        let p = &chain.payloads;
        let plain_error = |t: u16, data: Vec<u8>| init_error(h.spi_i, t, data);
        let offered = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let (Some((g, ke)), Some(ni)) = (
            take!(p, Payload::Ke { group, data } => (*group, data.clone())),
            take!(p, Payload::Nonce(n) => n.clone()),
        ) else {
            self.stats.fail(Failure::Notify(notify::INVALID_SYNTAX));
            out.push(Out::Send {
                to: from,
                natt,
                msg: plain_error(notify::INVALID_SYNTAX, Vec::new()),
            });
            return;
        };
        let Some(evict) = self.admit_init(h, p, &ni, (from, natt), now, rng, out) else {
            return;
        };
        let Some(choice) = self.choose_for_init(h, &offered, g, (from, natt), out) else {
            return;
        };
        // The key share is checked before any work of ours (a few microseconds, against a
        // key generation's hundreds): not a point of the group, no answer, and it counts
        // towards the cookie threshold.
        if !point::valid_public(choice.group, &ke) {
            self.stats.fail(Failure::InvalidKeyShare);
            self.note_invalid_init(now);
            return;
        }
        let Some(share) = KeyShare::new(choice.group, rng) else {
            return;
        };
        let kr = share.public.clone();
        let Ok(shared) = share.agree(&ke) else {
            self.stats.fail(Failure::InvalidKeyShare);
            self.note_invalid_init(now);
            return;
        };
        let spi_r = rand_u64(rng);
        let nr = rand_bytes(rng, 32);
        let resp = self.init_response_msg(h, &choice, (spi_r, kr, &nr), (from, natt), rng);
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &nr, None);
        self.stats.ike_keys_made += 1;
        let keys = crypto::ike_keys(choice.prf, choice.cipher, &seed, &ni, &nr, h.spi_i, spi_r);
        // At most a few half-open SAs per peer: the oldest goes, once it had its time.
        if let Some(i) = evict {
            self.others.remove(i);
            self.stats.fail(Failure::HalfOpenEvicted);
        }
        self.others.push(IkeSa {
            spi_i: h.spi_i,
            spi_r,
            initiator: false,
            phase: Phase::Keyed {
                choice,
                keys,
                stage: Stage::Authenticating,
            },
            ni,
            nr,
            init_req: raw.to_vec(),
            init_resp: resp.clone(),
            next_id: 0,
            flight: None,
            peer_next: 1,
            cached: None,
            iv: 0,
            peer: from,
            natt,
            mobike: false,
            created: now,
            rekey_at: u64::MAX,
            last_heard: now,
            queue: Vec::new(),
        });
        self.stats.responses += 1;
        out.push(Out::Send {
            to: from,
            natt,
            msg: resp,
        });
    }

    /// The IKE proposal we accept of those `offered`, with the initiator's key share in its
    /// group `g`; else the refusal (NO_PROPOSAL_CHOSEN, or INVALID_KE_PAYLOAD naming our
    /// group) is sent and `None` returned.
    fn choose_for_init(
        &mut self,
        h: &Header,
        offered: &[Proposal],
        g: u16,
        (from, natt): (SocketAddr, bool),
        out: &mut Vec<Out>,
    ) -> Option<IkeChoice> {
        let Some(choice) = proposal::choose_ike(offered, &self.cfg.ike) else {
            self.fail(
                out,
                Failure::Notify(notify::NO_PROPOSAL_CHOSEN),
                format!(
                    "peer {} offered no IKE proposal we accept (ours: {})",
                    self.cfg.name,
                    self.cfg
                        .ike
                        .iter()
                        .map(IkeProposal::name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            out.push(Out::Send {
                to: from,
                natt,
                msg: init_error(h.spi_i, notify::NO_PROPOSAL_CHOSEN, Vec::new()),
            });
            return None;
        };
        if g != choice.group.id() {
            self.stats.fail(Failure::Notify(notify::INVALID_KE_PAYLOAD));
            out.push(Out::Send {
                to: from,
                natt,
                msg: init_error(
                    h.spi_i,
                    notify::INVALID_KE_PAYLOAD,
                    choice.group.id().to_be_bytes().to_vec(),
                ),
            });
            return None;
        }
        Some(choice)
    }

    /// A retransmitted IKE_SA_INIT (the same bytes from a half-open SA's initiator) gets the
    /// same answer; true if `raw` belongs to a half-open SA (answered or not).
    fn resend_init_response(
        &mut self,
        h: &Header,
        raw: &[u8],
        from: SocketAddr,
        natt: bool,
        out: &mut Vec<Out>,
    ) -> bool {
        if let Some(s) = self
            .others
            .iter()
            .find(|s| s.spi_i == h.spi_i && !s.initiator && s.state() == State::Authenticating)
        {
            if s.init_req == raw {
                self.stats.resent_responses += 1;
                out.push(Out::Send {
                    to: from,
                    natt,
                    msg: s.init_resp.clone(),
                });
            }
            return true;
        }
        false
    }

    /// Whether a new IKE_SA_INIT may cost a key generation: under half-open load only with a
    /// valid cookie (else one is sent), and only with room for one more half-open SA.
    /// `Some(evict)`: admitted, evicting that old half-open SA first; `None`: refused.
    #[allow(clippy::too_many_arguments)]
    fn admit_init(
        &mut self,
        h: &Header,
        p: &[Payload],
        ni: &[u8],
        (from, natt): (SocketAddr, bool),
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) -> Option<Option<usize>> {
        // Under half-open load, a cookie before any state or Diffie-Hellman (section 2.6):
        // only a sender that receives at its address can come back with it.
        // Requests with an invalid key share count as half-open SAs: a flood of them gets
        // cookies too, instead of a key generation each.
        self.invalid_inits
            .retain(|t| now.saturating_sub(*t) < HALF_OPEN_MS * MS);
        let half_open = self
            .others
            .iter()
            .filter(|s| s.state() == State::Authenticating)
            .count()
            + self.invalid_inits.len();
        if half_open >= COOKIE_THRESHOLD {
            let given = match p.first() {
                Some(Payload::Notify { kind, data, .. }) if *kind == notify::COOKIE => Some(data),
                _ => None,
            };
            if !given.is_some_and(|g| self.cookie_valid(now, g, ni, from.ip(), h.spi_i)) {
                let want = self.cookie(rng, now, ni, from.ip(), h.spi_i);
                self.stats.fail(Failure::CookieRequired);
                out.push(Out::Send {
                    to: from,
                    natt,
                    msg: init_error(h.spi_i, notify::COOKIE, want),
                });
                return None;
            }
        }
        // Room for one more half-open SA, or no answer at all (before any key generation):
        // the oldest may go only once it had time for its IKE_AUTH.
        let evict = {
            let mut half: Vec<(usize, u64)> = self
                .others
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state() == State::Authenticating)
                .map(|(i, s)| (i, s.created))
                .collect();
            if half.len() < MAX_HALF_OPEN {
                None
            } else {
                half.sort_by_key(|(_, c)| *c);
                match half.first() {
                    Some(&(i, created))
                        if now.saturating_sub(created) >= HALF_OPEN_KEEP_MS * MS =>
                    {
                        Some(i)
                    }
                    _ => {
                        self.stats.fail(Failure::HalfOpenFull);
                        return None;
                    }
                }
            }
        };
        Some(evict)
    }

    /// Our IKE_SA_INIT response: the chosen proposal, our key share and nonce, and the NAT
    /// detection hashes (the source one random with `force_encap`, to make the peer
    /// encapsulate).
    fn init_response_msg(
        &self,
        h: &Header,
        choice: &IkeChoice,
        (spi_r, kr, nr): (u64, Vec<u8>, &[u8]),
        (from, natt): (SocketAddr, bool),
        rng: &dyn SecureRandom,
    ) -> Vec<u8> {
        let port = if natt {
            self.cfg.natt_port
        } else {
            self.cfg.local_port
        };
        let me = SocketAddr::new(self.cfg.local, port);
        let src_hash = if self.cfg.force_encap {
            rand_bytes(rng, 20)
        } else {
            crypto::nat_hash(h.spi_i, spi_r, me)
        };
        let payloads = vec![
            Payload::Sa(vec![choice.to_wire(Vec::new())]),
            Payload::Ke {
                group: choice.group.id(),
                data: kr,
            },
            Payload::Nonce(nr.to_vec()),
            Payload::notify(notify::NAT_DETECTION_SOURCE_IP, src_hash),
            Payload::notify(
                notify::NAT_DETECTION_DESTINATION_IP,
                crypto::nat_hash(h.spi_i, spi_r, from),
            ),
        ];
        msg::encode_plain(
            Header {
                spi_i: h.spi_i,
                spi_r,
                next: 0,
                exchange: exchange::IKE_SA_INIT,
                flags: flags::RESPONSE,
                msg_id: 0,
                length: 0,
            },
            &payloads,
        )
    }
}

/// An IKE_SA_INIT response carrying only the notify `t` (an error, or a COOKIE to echo).
fn init_error(spi_i: u64, t: u16, data: Vec<u8>) -> Vec<u8> {
    msg::encode_plain(
        Header {
            spi_i,
            spi_r: 0,
            next: 0,
            exchange: exchange::IKE_SA_INIT,
            flags: flags::RESPONSE,
            msg_id: 0,
            length: 0,
        },
        &[Payload::notify(t, data)],
    )
}

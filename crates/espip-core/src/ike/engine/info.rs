//! INFORMATIONAL: DELETE of CHILD_SAs and IKE SAs, liveness (DPD) and
//! AUTHENTICATION_FAILED (RFC 7296 sections 1.4, 2.4, 2.21.2).

use super::*;

impl Engine {
    pub(super) fn respond_info(
        &mut self,
        s: &mut IkeSa,
        p: &[Payload],
        now: u64,
        out: &mut Vec<Out>,
    ) -> (Vec<Payload>, After) {
        let mut resp = Vec::new();
        let mut after = After::Keep;
        // The initiator refused our IKE_AUTH answer (section 2.21.2): it holds no IKE SA.
        if find_notify(p, notify::AUTHENTICATION_FAILED).is_some() {
            self.fail(
                out,
                Failure::Notify(notify::AUTHENTICATION_FAILED),
                format!(
                    "peer {} refused our authentication: its remote_id must be our local_id ({}) and both psk_files the same key",
                    self.cfg.name,
                    self.cfg.local_id.display()
                ),
            );
            if s.state() == State::Established {
                out.push(Out::Event(Event::IkeDown {
                    why: "the peer refused our authentication".into(),
                }));
            }
            s.flight = None;
            return (resp, After::Drop);
        }
        for d in p {
            let Payload::Delete { protocol, spis } = d else {
                continue;
            };
            match *protocol {
                proto::IKE => {
                    let collided = self
                        .ike_collision
                        .as_ref()
                        .is_some_and(|c| c.theirs == (s.spi_i, s.spi_r));
                    if s.state() == State::Established && !collided {
                        out.push(Out::Event(Event::IkeDown {
                            why: "deleted by the peer".into(),
                        }));
                    }
                    after = After::Drop;
                }
                proto::ESP => {
                    let mut ours = Vec::new();
                    for spi in spis {
                        let Ok(spi) = <[u8; 4]>::try_from(&spi[..]).map(u32::from_be_bytes) else {
                            continue;
                        };
                        let Some(i) = self.children.iter().position(|c| c.keys.spi_out == spi)
                        else {
                            continue;
                        };
                        ours.push(self.children[i].keys.spi_in.to_be_bytes().to_vec());
                        let replaced = self.children[i].replaced;
                        let c = &mut self.children[i];
                        c.out = false;
                        c.replaced = true;
                        c.until = Some(
                            c.until
                                .map_or(now + GRACE_MS * MS, |u| u.min(now + GRACE_MS * MS)),
                        );
                        if replaced {
                            // The rekey initiator deleted the old SA: send on the new one.
                            self.switch_pending(now, true);
                            out.push(Out::Event(Event::ChildDown {
                                spi_in: self.children[i].keys.spi_in,
                                why: "replaced by a rekey, deleted by the peer (inbound kept for the grace period)",
                            }));
                        } else {
                            out.push(Out::Event(Event::ChildDown {
                                spi_in: self.children[i].keys.spi_in,
                                why: "deleted by the peer",
                            }));
                        }
                        out.push(Out::Changed);
                    }
                    if !ours.is_empty() {
                        resp.push(Payload::Delete {
                            protocol: proto::ESP,
                            spis: ours,
                        });
                    }
                }
                _ => {}
            }
        }
        if let After::Drop = after {
            s.flight = None;
        }
        (resp, after)
    }

    /// Send DELETE for the IKE SA `sa` on itself, as its request in flight (retransmitted
    /// until answered).
    pub(super) fn delete_ike_on(&self, sa: &mut IkeSa, now: u64, out: &mut Vec<Out>) {
        let h = sa.header(exchange::INFORMATIONAL, sa.next_id, false);
        let id = sa.next_id;
        sa.next_id += 1;
        let m = sa.seal(
            h,
            &[Payload::Delete {
                protocol: proto::IKE,
                spis: Vec::new(),
            }],
        );
        sa.flight = Some(InFlight {
            id,
            msg: m.clone(),
            tries: 0,
            next_at: now + self.cfg.retransmit_ms * MS,
            req: Req::DeleteIke,
        });
        out.push(Out::Send {
            to: sa.peer,
            natt: sa.natt,
            msg: m,
        });
    }

    /// The answer to our DELETE of the CHILD_SA `spi_in`: its inbound half stays for the grace period.
    pub(super) fn on_delete_child_response(&mut self, spi_in: u32, now: u64) -> After {
        if let Some(c) = self.children.iter_mut().find(|c| c.keys.spi_in == spi_in) {
            c.until = Some(
                c.until
                    .map_or(now + GRACE_MS * MS, |u| u.min(now + GRACE_MS * MS)),
            );
        }
        After::Keep
    }
}

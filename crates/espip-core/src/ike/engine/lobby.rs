//! Responders without endpoint (strongSwan's `remote_addrs = %any`): one lobby engine answers
//! every IKE_SA_INIT that no configured peer address claims, and at IKE_AUTH hands the IKE SA
//! to the engine of the peer whose `remote_id` the initiator names (IDi), which authenticates
//! it with its own pre-shared key. IKE_SA_INIT's keys depend on no peer setting but the
//! proposals, which those peers share (the configuration checks), so the SA moves as it is.

use super::*;

/// A half-open IKE SA on its way from the lobby to its peer's engine.
pub struct HalfOpen(IkeSa);

impl Engine {
    /// Whether the peer has no configured address: its IKE SAs (found by their SPIs) are
    /// accepted from any source, which they follow.
    pub fn roams(&self) -> bool {
        self.cfg.remote.ip().is_unspecified()
    }

    /// Whether the current IKE SA runs over the NAT-T port (ESP then goes in UDP to the port
    /// its peer address has).
    pub fn natt(&self) -> bool {
        self.ike.as_ref().is_some_and(|s| s.natt)
    }

    /// In a lobby, an IKE_AUTH request (already authenticated by the IKE SA's keys) on `s`
    /// that names one of the lobby's peers: the identity to hand it to.
    pub(super) fn handoff(&self, s: &IkeSa, h: &Header, p: &[Payload]) -> Option<Id> {
        let ids = self.cfg.lobby.as_ref()?;
        if h.exchange != exchange::IKE_AUTH || s.initiator || s.state() != State::Authenticating {
            return None;
        }
        let id = take!(p, Payload::IdI(i) => i.clone())?;
        ids.contains(&id).then_some(id)
    }

    /// Take the half-open IKE SA with these SPIs out of this (lobby) engine.
    pub fn hand_over(&mut self, spis: (u64, u64)) -> Option<HalfOpen> {
        let i = self
            .others
            .iter()
            .position(|s| (s.spi_i, s.spi_r) == spis && s.state() == State::Authenticating)?;
        Some(HalfOpen(self.others.remove(i)))
    }

    /// Take a half-open IKE SA from the lobby; the IKE_AUTH that named this peer follows by
    /// [`Engine::handle`]. It waits among the half-open SAs, which expire as this engine's
    /// own do.
    pub fn adopt(&mut self, sa: HalfOpen) {
        let HalfOpen(s) = sa;
        self.others
            .retain(|o| (o.spi_i, o.spi_r) != (s.spi_i, s.spi_r));
        self.others.push(s);
    }
}

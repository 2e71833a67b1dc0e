//! Why an exchange failed or a message was dropped: one name per reason, counted per peer
//! (`IkeStats::failures`), carried by [`super::Event::Failed`], and shown by `espip show`
//! and the metrics under [`Failure::name`]. RFC 7296 error notifies keep their RFC names.

use crate::ike::msg::notify;

/// A failure or a dropped message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Failure {
    /// An RFC 7296 error notify we sent or received (`AUTHENTICATION_FAILED`,
    /// `NO_PROPOSAL_CHOSEN`, ...).
    #[error("{}", notify::name(*.0))]
    Notify(u16),
    /// A message whose integrity check (the SK payload's AEAD tag) failed.
    #[error("bad_icv")]
    BadIcv,
    /// A message that does not parse.
    #[error("malformed")]
    Malformed,
    /// A message larger than espip accepts.
    #[error("too_large")]
    TooLarge,
    /// A message from an address that is not the peer's.
    #[error("wrong_source")]
    WrongSource,
    /// A message whose Initiator flag claims it came from ourselves.
    #[error("wrong_initiator_flag")]
    WrongInitiatorFlag,
    /// A message for an IKE SA we do not hold.
    #[error("unknown_ike_spi")]
    UnknownIkeSpi,
    /// A request with a message ID other than the expected one (or its retransmission).
    #[error("invalid_message_id")]
    InvalidMessageId,
    /// A response to no request of ours in flight.
    #[error("unexpected_response")]
    UnexpectedResponse,
    /// A request of an exchange the IKE SA's state does not allow.
    #[error("unexpected_message")]
    UnexpectedMessage,
    /// A message after IKE_SA_INIT without an SK payload.
    #[error("unencrypted")]
    Unencrypted,
    /// Requests crossed (a rekey of both sides at once); counted, resolved by the nonces.
    #[error("rekey_collision")]
    RekeyCollision,
    /// An IKE_SA_INIT whose key share is not a public value of its group.
    #[error("invalid_key_share")]
    InvalidKeyShare,
    /// An IKE_SA_INIT answered with a cookie request (under half-open load).
    #[error("cookie_required")]
    CookieRequired,
    /// A half-open IKE SA dropped to make room for a new one.
    #[error("half_open_evicted")]
    HalfOpenEvicted,
    /// An IKE_SA_INIT left unanswered: every half-open slot is taken by a young SA.
    #[error("half_open_full")]
    HalfOpenFull,
    /// The peer stopped answering (retransmissions exhausted).
    #[error("peer_dead")]
    PeerDead,
    /// ESP as IP protocol 50 with a NAT between the peers (it cannot cross one).
    #[error("NAT_DETECTED")]
    NatDetected,
}

impl Failure {
    /// The name `espip show`, the metrics and the log use.
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// The failure an RFC 7296 notify type stands for.
    pub fn notify(t: u16) -> Failure {
        Failure::Notify(t)
    }
}

impl PartialEq<str> for Failure {
    fn eq(&self, other: &str) -> bool {
        self.name() == other
    }
}

impl PartialEq<&str> for Failure {
    fn eq(&self, other: &&str) -> bool {
        self.name() == *other
    }
}

/// How many failures named `name` `failures` holds (for tests and reports that go by name).
pub fn count(failures: &std::collections::BTreeMap<Failure, u64>, name: &str) -> Option<u64> {
    failures
        .iter()
        .find(|(f, _)| f.name() == name)
        .map(|(_, n)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_rfc_notify_names_or_espips() {
        assert_eq!(
            Failure::Notify(notify::AUTHENTICATION_FAILED).name(),
            "AUTHENTICATION_FAILED"
        );
        assert_eq!(
            Failure::Notify(notify::NO_PROPOSAL_CHOSEN).name(),
            "NO_PROPOSAL_CHOSEN"
        );
        assert_eq!(Failure::BadIcv.name(), "bad_icv");
        assert_eq!(Failure::HalfOpenFull.name(), "half_open_full");
    }
}

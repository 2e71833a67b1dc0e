//! The IKEv2 state machine of one peer (RFC 7296), sans I/O: datagrams and time in,
//! datagrams to send and a changed set of ESP SAs out.
//!
//! Exchanges: IKE_SA_INIT (with NAT detection and INVALID_KE_PAYLOAD retry), IKE_AUTH with a
//! pre-shared key and the first CHILD_SA, CREATE_CHILD_SA to rekey a CHILD_SA (PFS when the
//! ESP proposal names a group) or the IKE SA, INFORMATIONAL for liveness (DPD) and DELETE.
//! One request in flight each way (window size 1), retransmitted with exponential back-off;
//! a retransmitted request is answered from the cached response.
//!
//! The ESP SAs the data path should hold are [`Engine::sas`]; [`Out::Changed`] says when they
//! changed. The order of [`Out`] values is the order of effects: when a response installs an
//! inbound SA, `Changed` comes before the `Send` of the response, so the edge installs it
//! before the peer can use it (section 2.8: rekeying without loss). After a CHILD_SA rekey
//! the initiator sends on the new SA at once; the responder keeps sending on the old one
//! until the initiator deletes it (as strongSwan does), so neither side ever sends on an SA
//! the other has not installed. The old inbound SA stays for [`GRACE_MS`] after its delete.

use super::crypto::{self, Group, IkeKeys, KeyShare};
use super::msg::{
    self, exchange, flags, notify, proto, Header, Id, MsgError, Payload, Proposal, Ts,
};
use super::point;
use super::proposal::{self, EspChoice, EspProposal, IkeChoice, IkeProposal};
use super::ts;
use crate::sa::KeyMaterial;
use ring::rand::SecureRandom;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use zeroize::Zeroizing;

const MS: u64 = 1_000_000;
/// Requests held for an IKE SA our rekey is making (see `Engine::early`).
const EARLY_MAX: usize = 2;
/// How long an inbound SA stays after it was deleted or replaced (packets in flight).
pub const GRACE_MS: u64 = 2_000;
/// How long the responder of a CHILD_SA rekey waits for the delete of the old SA before it
/// sends on the new one anyway.
const SWITCH_WAIT_MS: u64 = 5_000;
/// A half-open IKE SA (responder, before IKE_AUTH) is forgotten after this.
const HALF_OPEN_MS: u64 = 30_000;
/// Wait before an initiator tries again after a failure.
const RETRY_MS: u64 = 5_000;
/// Half-open IKE SAs at which the responder asks for a cookie first (section 2.6): a flood
/// of IKE_SA_INIT then costs one SHA-256 per message and no state or Diffie-Hellman.
const COOKIE_THRESHOLD: usize = 2;
/// Most half-open IKE SAs kept per peer.
const MAX_HALF_OPEN: usize = 4;
/// A half-open IKE SA younger than this is never evicted for a newer one: room for the
/// initiator's IKE_AUTH after a slow round trip. When every slot holds one, a new
/// IKE_SA_INIT gets no answer (`half_open_full`) and the initiator retransmits; so a flood
/// that echoes cookies from the peer's own address costs at most [`MAX_HALF_OPEN`] key
/// generations per this interval, and never evicts an honest initiator before its IKE_AUTH.
const HALF_OPEN_KEEP_MS: u64 = 2_000;
/// The cookie secret is replaced this often; a cookie made with the previous one is still
/// accepted, so a cookie is good for 10 to 20 s (section 2.6: versioned secrets).
const COOKIE_ROTATE_MS: u64 = 10_000;

/// Which side starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects at start and after a failure.
    Initiator,
    /// Waits for the peer.
    Responder,
}

/// What one peer's engine needs to know.
#[derive(Clone)]
pub struct IkeConfig {
    /// Peer name (logs).
    pub name: String,
    /// Initiator or responder.
    pub role: Role,
    /// The pre-shared key.
    pub psk: Zeroizing<Vec<u8>>,
    /// Our identity.
    pub local_id: Id,
    /// The identity the peer must prove.
    pub remote_id: Id,
    /// IKE proposals, in order of preference.
    pub ike: Vec<IkeProposal>,
    /// ESP proposals, in order of preference.
    pub esp: Vec<EspProposal>,
    /// IKE SA rekey time (ms after it was established; 0: never).
    pub ike_rekey_ms: u64,
    /// CHILD_SA rekey time (ms; 0: never).
    pub child_rekey_ms: u64,
    /// CHILD_SA hard lifetime (ms; 0: none): the SA is removed if it was not rekeyed by then.
    pub child_life_ms: u64,
    /// Random jitter subtracted from each rekey time, at most this many ms.
    pub jitter_ms: u64,
    /// Liveness check after this long without an authenticated message (ms; 0: off).
    pub dpd_ms: u64,
    /// First retransmission timeout (ms), doubled on each try.
    pub retransmit_ms: u64,
    /// Retransmissions before the peer counts as dead.
    pub retransmit_tries: u32,
    /// Our inner addresses (TSi when initiating).
    pub local_ts: Vec<Ts>,
    /// The peer's inner prefixes (`allowed_ips`).
    pub remote_ts: Vec<Ts>,
    /// The peer's IKE address (port 500).
    pub remote: SocketAddr,
    /// Our address towards the peer (NAT detection).
    pub local: IpAddr,
    /// Our IKE port (500).
    pub local_port: u16,
    /// NAT-T port on both sides (4500, `interface.listen_port` here).
    pub natt_port: u16,
    /// The peer's NAT-T port.
    pub remote_natt_port: u16,
    /// ESP in UDP: float to the NAT-T port and encapsulate even without a NAT (as
    /// strongSwan's `encap = yes`).
    pub force_encap: bool,
    /// A lobby (`Some`, with `remote` unspecified): it answers IKE_SA_INIT from any address
    /// on behalf of the responders without endpoint, whose `remote_id`s these are,
    /// authenticates no one itself, and hands each IKE SA over ([`Out::Handoff`]) when its
    /// IKE_AUTH names one of them.
    pub lobby: Option<Vec<Id>>,
    /// Offer and accept MOBIKE (RFC 4555): an IKE SA on which both sides announced it moves
    /// only by UPDATE_SA_ADDRESSES, which its initiator sends when [`Engine::local_moved`]
    /// says its address changed.
    pub mobike: bool,
}

/// An ESP SA pair's keys as the data path needs them.
#[derive(Debug, Clone)]
pub struct ChildKeys {
    /// SPI we receive with.
    pub spi_in: u32,
    /// SPI we send with.
    pub spi_out: u32,
    /// Key || salt we receive with.
    pub key_in: KeyMaterial,
    /// Key || salt we send with.
    pub key_out: KeyMaterial,
    /// 64-bit sequence numbers.
    pub esn: bool,
}

/// The ESP SAs the data path should hold for this peer.
#[derive(Debug, Clone, Default)]
pub struct SaSet {
    /// The CHILD_SA we send on (its `spi_out` and `key_out`).
    pub out: Option<ChildKeys>,
    /// Every CHILD_SA we accept on, newest first (their `spi_in` and `key_in`).
    pub ins: Vec<ChildKeys>,
}

/// What the engine wants done, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Send `msg` to `to`; `natt`: from the NAT-T port, behind the non-ESP marker.
    Send {
        /// Destination.
        to: SocketAddr,
        /// From the NAT-T port.
        natt: bool,
        /// The IKE message.
        msg: Vec<u8>,
    },
    /// [`Engine::sas`] changed: install before the next `Send`.
    Changed,
    /// Something to log once.
    Event(Event),
    /// A lobby's half-open IKE SA (these SPIs) reached IKE_AUTH naming this identity: take it
    /// with [`Engine::hand_over`], give it to that peer's engine with [`Engine::adopt`] and
    /// hand that engine the same message.
    Handoff {
        /// The initiator's identity (IDi).
        id: Id,
        /// (SPIi, SPIr).
        spis: (u64, u64),
    },
}

/// Things worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The IKE SA is up.
    IkeUp {
        /// "SPIi_SPIr" in hex.
        spis: String,
        /// The chosen proposal.
        proposal: String,
        /// Whether a NAT was seen (or encapsulation forced) and IKE moved to NAT-T.
        natt: bool,
        /// Both sides support MOBIKE (RFC 4555).
        mobike: bool,
    },
    /// The peer's address for this IKE SA and its CHILD_SAs changed (MOBIKE's
    /// UPDATE_SA_ADDRESSES from the peer), or ours did and the peer took the update.
    Moved {
        /// The peer's address before.
        from: SocketAddr,
        /// The peer's address now.
        to: SocketAddr,
        /// Whose address changed: "peer" or "local".
        who: &'static str,
    },
    /// A CHILD_SA is up (new or rekeyed).
    ChildUp {
        /// Inbound SPI.
        spi_in: u32,
        /// Outbound SPI.
        spi_out: u32,
        /// Chosen ESP proposal.
        proposal: String,
        /// Negotiated selectors (ours, theirs).
        ts: String,
        /// Replaced this inbound SPI.
        rekey_of: Option<u32>,
    },
    /// The IKE SA was rekeyed.
    IkeRekeyed {
        /// New SPIs.
        spis: String,
    },
    /// A CHILD_SA went away.
    ChildDown {
        /// Inbound SPI.
        spi_in: u32,
        /// Why.
        why: &'static str,
    },
    /// Both sides rekeyed the same SA at once; the nonces decided (RFC 7296 section 2.8).
    Collision {
        /// Which SA stays, which goes.
        detail: String,
    },
    /// The IKE SA went away.
    IkeDown {
        /// Why.
        why: String,
    },
    /// An exchange failed.
    Failed {
        /// The notify (error type) sent or received, or another reason.
        reason: Failure,
        /// Detail for the log.
        detail: String,
    },
}

/// Counters of one engine.
#[derive(Debug, Clone, Default)]
pub struct IkeStats {
    /// Requests sent (first transmissions).
    pub requests: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Requests received and answered.
    pub responses: u64,
    /// Retransmitted requests answered from the cache.
    pub resent_responses: u64,
    /// CHILD_SA rekeys completed.
    pub child_rekeys: u64,
    /// IKE SA rekeys completed.
    pub ike_rekeys: u64,
    /// IKE SAs established.
    pub established: u64,
    /// Failures and drops by reason.
    pub failures: BTreeMap<Failure, u64>,
    /// IKE SA keys derived (any IKE SA, half-open and failed ones too): when this moves, the
    /// edge has new keys to export for Wireshark.
    pub ike_keys_made: u64,
    /// MOBIKE address updates: UPDATE_SA_ADDRESSES we answered, or sent and had answered.
    pub address_updates: u64,
}

impl IkeStats {
    fn fail(&mut self, r: Failure) {
        *self.failures.entry(r).or_default() += 1;
    }
}

/// One CHILD_SA.
#[derive(Debug, Clone)]
struct Child {
    keys: ChildKeys,
    proposal: String,
    /// We send on it.
    out: bool,
    /// Pending outbound switch (responder of a rekey) since this time.
    pending_since: Option<u64>,
    /// The peer's survivor of a rekey collision: switched to only when the peer deletes this
    /// old CHILD_SA (our inbound SPI), which proves the peer completed it; never on a timeout.
    awaits_delete_of: Option<u32>,
    /// Remove at this time (grace after delete/replace).
    until: Option<u64>,
    /// Replaced by a rekey (no second rekey, no lifetime action).
    replaced: bool,
    rekey_at: u64,
    expire_at: u64,
    created: u64,
}

/// What a request of ours was.
enum Req {
    Init {
        share: KeyShare,
        ni: Vec<u8>,
    },
    Auth {
        spi_in: u32,
    },
    RekeyChild {
        old_in: u32,
        new_in: u32,
        ni: Vec<u8>,
        share: Option<KeyShare>,
    },
    NewChild {
        new_in: u32,
        ni: Vec<u8>,
        share: Option<KeyShare>,
    },
    RekeyIke {
        spi: u64,
        ni: Vec<u8>,
        share: KeyShare,
    },
    DeleteChild(u32),
    DeleteIke,
    Dpd,
    /// UPDATE_SA_ADDRESSES (MOBIKE) from our new address.
    UpdateAddresses,
}

struct InFlight {
    id: u32,
    msg: Vec<u8>,
    tries: u32,
    next_at: u64,
    req: Req,
}

/// An IKE SA's state, as a word (what [`Phase`] says without its data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// Initiator: IKE_AUTH sent. Responder: IKE_SA_INIT answered, waiting for IKE_AUTH.
    Authenticating,
    Established,
    /// A newer IKE SA replaced it; it waits for its delete.
    Rekeyed,
}

/// The states of an IKE SA whose IKE_SA_INIT is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Authenticating,
    Established,
    Rekeyed,
}

/// How far an IKE SA got, with what each step has: nothing agreed while our IKE_SA_INIT is
/// unanswered; from its exchange on, the chosen proposal and the keys.
enum Phase {
    /// Initiator: IKE_SA_INIT sent.
    InitSent,
    /// IKE_SA_INIT done.
    Keyed {
        choice: IkeChoice,
        keys: IkeKeys,
        stage: Stage,
    },
}

/// One IKE SA.
struct IkeSa {
    spi_i: u64,
    spi_r: u64,
    /// We are the original initiator of this IKE SA.
    initiator: bool,
    /// How far it got, with what that step has (keys from IKE_SA_INIT on).
    phase: Phase,
    ni: Vec<u8>,
    nr: Vec<u8>,
    /// IKE_SA_INIT request and response as sent (AUTH covers them).
    init_req: Vec<u8>,
    init_resp: Vec<u8>,
    next_id: u32,
    flight: Option<InFlight>,
    peer_next: u32,
    cached: Option<(u32, Vec<u8>)>,
    iv: u64,
    peer: SocketAddr,
    natt: bool,
    /// Both sides announced MOBIKE in IKE_AUTH (RFC 4555 section 3.1).
    mobike: bool,
    created: u64,
    rekey_at: u64,
    last_heard: u64,
    /// Pending requests, sent one at a time.
    queue: Vec<Task>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Task {
    /// A CHILD_SA for an IKE SA that has none left.
    NewChild,
    RekeyChild(u32),
    RekeyIke,
    DeleteChild(u32),
    Dpd,
    /// Our address changed: UPDATE_SA_ADDRESSES (MOBIKE), else a liveness check from the new
    /// address (a peer that follows requests learns it at once).
    UpdateAddresses,
}

impl IkeSa {
    fn state(&self) -> State {
        match &self.phase {
            Phase::InitSent => State::InitSent,
            Phase::Keyed { stage, .. } => match stage {
                Stage::Authenticating => State::Authenticating,
                Stage::Established => State::Established,
                Stage::Rekeyed => State::Rekeyed,
            },
        }
    }

    /// Move a keyed SA to `to` (an SA still in IKE_SA_INIT has no other state to go to).
    fn set_stage(&mut self, to: Stage) {
        if let Phase::Keyed { stage, .. } = &mut self.phase {
            *stage = to;
        }
    }

    /// The IKE SA's keys, if IKE_SA_INIT is done.
    fn keys_if_any(&self) -> Option<&IkeKeys> {
        match &self.phase {
            Phase::Keyed { keys, .. } => Some(keys),
            Phase::InitSent => None,
        }
    }

    /// The IKE SA's keys: only asked for by the exchanges after IKE_SA_INIT, which `handle`
    /// lets through only for a keyed SA.
    fn keys(&self) -> &IkeKeys {
        self.keys_if_any().expect("keys after IKE_SA_INIT")
    }

    /// The chosen IKE proposal, if IKE_SA_INIT is done.
    fn choice(&self) -> Option<IkeChoice> {
        match &self.phase {
            Phase::Keyed { choice, .. } => Some(*choice),
            Phase::InitSent => None,
        }
    }

    fn spis(&self) -> String {
        format!("{:016x}_i {:016x}_r", self.spi_i, self.spi_r)
    }

    fn my_key(&self) -> &KeyMaterial {
        let k = self.keys();
        if self.initiator {
            &k.sk_ei
        } else {
            &k.sk_er
        }
    }

    fn peer_key(&self) -> &KeyMaterial {
        let k = self.keys();
        if self.initiator {
            &k.sk_er
        } else {
            &k.sk_ei
        }
    }

    fn header(&self, exch: u8, id: u32, response: bool) -> Header {
        Header {
            spi_i: self.spi_i,
            spi_r: self.spi_r,
            next: 0,
            exchange: exch,
            flags: if self.initiator { flags::INITIATOR } else { 0 }
                | if response { flags::RESPONSE } else { 0 },
            msg_id: id,
            length: 0,
        }
    }

    /// An INFORMATIONAL request deleting this IKE SA, sent once (the SA goes with it).
    fn delete_request(&mut self) -> Out {
        let h = self.header(exchange::INFORMATIONAL, self.next_id, false);
        let msg = self.seal(
            h,
            &[Payload::Delete {
                protocol: proto::IKE,
                spis: Vec::new(),
            }],
        );
        Out::Send {
            to: self.peer,
            natt: self.natt,
            msg,
        }
    }

    fn seal(&mut self, h: Header, payloads: &[Payload]) -> Vec<u8> {
        self.iv += 1;
        msg::encode_sk(h, payloads, self.my_key(), self.iv)
    }
}

/// The IKEv2 engine of one peer.
pub struct Engine {
    cfg: IkeConfig,
    ike: Option<IkeSa>,
    /// Replaced IKE SAs waiting for their delete, and half-open responder SAs.
    others: Vec<IkeSa>,
    children: Vec<Child>,
    retry_at: Option<u64>,
    /// Group to use on the next IKE_SA_INIT (after INVALID_KE_PAYLOAD).
    group_hint: Option<Group>,
    stats: IkeStats,
    closing: bool,
    /// Tasks for the current IKE SA that came up while another one was being handled.
    deferred: Vec<Task>,
    /// No new CHILD_SA attempt before this (after a refusal).
    new_child_at: u64,
    /// The responder's cookie secrets, made at the first cookie, rotated.
    cookie_secrets: CookieSecrets,
    /// When IKE_SA_INITs with an invalid key share came (the last [`HALF_OPEN_MS`], at most
    /// [`COOKIE_THRESHOLD`]): they count as half-open SAs towards the cookie threshold.
    invalid_inits: Vec<u64>,
    /// We answered the peer's rekey of a CHILD_SA we are rekeying ourselves (RFC 7296
    /// section 2.8.1): decided by the nonces when our answer comes.
    child_collision: Option<ChildCollision>,
    /// The same for the IKE SA (section 2.8.2).
    ike_collision: Option<IkeCollision>,
    /// The peer said it holds none of our CHILD_SAs: make a new one even as the IKE SA's
    /// responder.
    remake_child: bool,
    /// Requests on the IKE SA our rekey is making, come before the rekey's answer (strongSwan
    /// sends a queued request on the new IKE SA first): held, at most [`EARLY_MAX`], until the
    /// answer makes the SA, then handled (authenticated only then); dropped if it fails.
    early: Vec<(Vec<u8>, SocketAddr, bool)>,
}

/// The responder's cookie secrets (RFC 7296 section 2.6): the current one with its version
/// (the cookie's first octet) and when it was made, and the one before it.
#[derive(Default)]
struct CookieSecrets {
    current: Option<(u8, [u8; 32], u64)>,
    previous: Option<(u8, [u8; 32])>,
}

/// The peer's side of a simultaneous CHILD_SA rekey.
struct ChildCollision {
    /// The CHILD_SA both sides rekey (our inbound SPI).
    old_in: u32,
    /// The CHILD_SA the peer made (our inbound SPI of it).
    theirs_in: u32,
    /// The lower of the two nonces of the peer's exchange.
    low: Vec<u8>,
    /// The peer rekeys this SA a second time: it gave up on its first rekey's outcome (an SA
    /// of ours it never got the answer for, abandoned), and it does not see our request as
    /// colliding with this one (for the peer, ours is the first exchange, answered long ago).
    /// The peer's new SA stays whatever the nonces say; ours, when its answer comes, is
    /// deleted at once.
    again: bool,
}

/// The peer's side of a simultaneous IKE SA rekey.
struct IkeCollision {
    /// SPIs of the IKE SA both sides rekey.
    old: (u64, u64),
    /// SPIs of the IKE SA the peer made.
    theirs: (u64, u64),
    /// The lower of the two nonces of the peer's exchange.
    low: Vec<u8>,
}

/// Which of two simultaneous rekeys survives (RFC 7296 section 2.8.1): the SA created with
/// the lowest of the four nonces is redundant. Nonces compare octet by octet, a nonce that
/// is a prefix of the other being the lower: the order of byte slices.
fn ours_redundant(ours: (&[u8], &[u8]), theirs_low: &[u8]) -> bool {
    ours.0.min(ours.1) < theirs_low
}

/// A CHILD_SA from the answer to our CREATE_CHILD_SA: its keys, the chosen proposal, the
/// selectors for the log, and the responder's nonce.
type Answered = (ChildKeys, EspChoice, String, Vec<u8>);

/// The CHILD_SA (our inbound SPI) and nonce of a rekey `s` has in flight.
fn rekeying_child(s: &IkeSa) -> Option<(u32, &[u8])> {
    match s.flight.as_ref().map(|f| &f.req) {
        Some(Req::RekeyChild { old_in, ni, .. }) => Some((*old_in, ni)),
        _ => None,
    }
}

fn rand_bytes(rng: &dyn SecureRandom, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill(&mut v).expect("system randomness");
    v
}

fn rand_u64(rng: &dyn SecureRandom) -> u64 {
    loop {
        let v = u64::from_be_bytes(rand_bytes(rng, 8).try_into().expect("8"));
        if v != 0 {
            return v;
        }
    }
}

fn rand_spi(rng: &dyn SecureRandom) -> u32 {
    loop {
        let v = u32::from_be_bytes(rand_bytes(rng, 4).try_into().expect("4"));
        // SPIs 1-255 are reserved by IANA; 0 is not an SPI (RFC 4303 section 2.1).
        if v > 255 {
            return v;
        }
    }
}

fn jitter(rng: &dyn SecureRandom, max_ms: u64) -> u64 {
    if max_ms == 0 {
        return 0;
    }
    rand_u64(rng) % (max_ms * MS)
}

fn find_notify(p: &[Payload], t: u16) -> Option<(&[u8], &[u8])> {
    p.iter().find_map(|x| match x {
        Payload::Notify {
            kind, spi, data, ..
        } if *kind == t => Some((spi.as_slice(), data.as_slice())),
        _ => None,
    })
}

/// The first error notify (types below 16384) in a response.
fn error_notify(p: &[Payload]) -> Option<u16> {
    p.iter().find_map(|x| match x {
        Payload::Notify { kind, .. } if *kind < 16384 => Some(*kind),
        _ => None,
    })
}

macro_rules! take {
    ($p:expr, $pat:pat => $v:expr) => {
        $p.iter().find_map(|x| match x {
            $pat => Some($v),
            _ => None,
        })
    };
}

// The exchanges, one module each (after `take!`, which they use).
mod auth;
mod dispatch;
mod failure;
pub use failure::{count as failure_count, Failure};
mod create;
mod info;
mod init;
mod lobby;
pub use lobby::HalfOpen;
mod mobike;
mod timers;

fn ts_string(a: &[Ts], b: &[Ts]) -> String {
    let f = |v: &[Ts]| v.iter().map(ts::display).collect::<Vec<_>>().join(",");
    format!("{} === {}", f(a), f(b))
}

impl Engine {
    /// A new engine; an initiator connects on its first [`Engine::tick`].
    pub fn new(cfg: IkeConfig) -> Engine {
        let retry_at = (cfg.role == Role::Initiator).then_some(0);
        Engine {
            cfg,
            ike: None,
            others: Vec::new(),
            children: Vec::new(),
            retry_at,
            group_hint: None,
            stats: IkeStats::default(),
            closing: false,
            deferred: Vec::new(),
            new_child_at: 0,
            remake_child: false,
            child_collision: None,
            ike_collision: None,
            cookie_secrets: CookieSecrets::default(),
            invalid_inits: Vec::new(),
            early: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &IkeConfig {
        &self.cfg
    }

    /// Counters.
    pub fn stats(&self) -> &IkeStats {
        &self.stats
    }

    /// The ESP SAs the data path should hold.
    pub fn sas(&self) -> SaSet {
        let mut s = SaSet::default();
        for c in self.children.iter().rev() {
            if c.out && s.out.is_none() {
                s.out = Some(c.keys.clone());
            }
            s.ins.push(c.keys.clone());
        }
        s
    }

    /// The peer's current address for ESP in UDP (its NAT-T address once IKE floated).
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.ike.as_ref().map(|s| s.peer)
    }

    /// A status line per SA: (kind, spis, state, proposal, age ms, next rekey in ms).
    pub fn status(&self, now: u64) -> Vec<SaStatus> {
        let mut v = Vec::new();
        for s in self.ike.iter().chain(&self.others) {
            v.push(SaStatus {
                kind: "ike",
                spis: s.spis(),
                state: match s.state() {
                    State::InitSent => "connecting",
                    State::Authenticating => "authenticating",
                    State::Established => "established",
                    State::Rekeyed => "rekeyed",
                },
                proposal: s.choice().map(|c| c.name()).unwrap_or_default(),
                age_ms: now.saturating_sub(s.created) / MS,
                rekey_in_ms: (s.state() == State::Established && self.cfg.ike_rekey_ms > 0)
                    .then(|| s.rekey_at.saturating_sub(now) / MS),
            });
        }
        for c in &self.children {
            v.push(SaStatus {
                kind: "child",
                spis: format!("{:08x}_i {:08x}_o", c.keys.spi_in, c.keys.spi_out),
                state: if c.until.is_some() {
                    "deleting"
                } else if c.pending_since.is_some() {
                    "installed (inbound)"
                } else if c.replaced {
                    "rekeyed"
                } else {
                    "installed"
                },
                proposal: c.proposal.clone(),
                age_ms: now.saturating_sub(c.created) / MS,
                rekey_in_ms: (!c.replaced && c.until.is_none() && self.cfg.child_rekey_ms > 0)
                    .then(|| c.rekey_at.saturating_sub(now) / MS),
            });
        }
        v
    }

    /// The keys of the current IKE SA for Wireshark's `ikev2_decryption_table`:
    /// (SPIi, SPIr, SK_ei, SK_er, cipher).
    pub fn ike_keys(&self) -> Vec<(u64, u64, KeyMaterial, KeyMaterial)> {
        self.ike
            .iter()
            .chain(&self.others)
            .filter_map(|s| {
                s.keys_if_any()
                    .map(|k| (s.spi_i, s.spi_r, k.sk_ei.clone(), k.sk_er.clone()))
            })
            .collect()
    }

    /// Has an IKE SA (or half-open one) with these SPIs?
    pub fn owns(&self, spi_i: u64, spi_r: u64) -> bool {
        self.ike
            .iter()
            .chain(&self.others)
            .any(|s| s.spi_i == spi_i && (s.spi_r == spi_r || s.spi_r == 0 || spi_r == 0))
    }
}

/// SHA-256(secret | Ni | IPi | SPIi).
fn cookie_mac(secret: &[u8; 32], ni: &[u8], ip: IpAddr, spi_i: u64) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(secret);
    ctx.update(ni);
    match ip {
        IpAddr::V4(a) => ctx.update(&a.octets()),
        IpAddr::V6(a) => ctx.update(&a.octets()),
    }
    ctx.update(&spi_i.to_be_bytes());
    ctx.finish().as_ref().to_vec()
}

impl Engine {
    /// Our IKE proposals for an IKE_SA_INIT (`spi` empty) or an IKE SA rekey (`spi`: the new
    /// SPI), numbered in order, each with the key share's `group` first.
    fn ike_offer(&self, group: Group, spi: Vec<u8>) -> Vec<Proposal> {
        self.cfg
            .ike
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut p = p.clone();
                p.groups.sort_by_key(|g| *g != group);
                p.to_wire(i as u8 + 1, spi.clone())
            })
            .collect()
    }

    /// Never without an outbound SA while an installed one waits: when the SA we sent on is
    /// gone (deleted by the peer, e.g. the loser of a rekey collision it resolved by nonces,
    /// or past its hard lifetime) and a CHILD_SA the peer made waits for its switch, switch
    /// now (the peer holds both halves of it). Returns whether the SAs changed.
    fn ensure_out(&mut self, now: u64) -> bool {
        let sending = self.children.iter().any(|c| c.out);
        let waiting = self.children.iter().any(|c| c.pending_since.is_some());
        !sending && waiting && self.switch_pending(now, true)
    }

    /// Make the IKE SA of the pending rekey collision current again, in place of the peer's
    /// new one `theirs` that the peer deleted (see `handle`): only while our own rekey of it
    /// is still in flight. Work queued meanwhile moves back. Returns whether it did.
    fn restore_collided(&mut self, theirs: &mut IkeSa) -> bool {
        let Some(c) = &self.ike_collision else {
            return false;
        };
        let Some(i) = self.others.iter().position(|o| {
            (o.spi_i, o.spi_r) == c.old
                && matches!(
                    o.flight.as_ref().map(|f| &f.req),
                    Some(Req::RekeyIke { .. })
                )
        }) else {
            return false;
        };
        let mut old = self.others.remove(i);
        old.set_stage(Stage::Established);
        // Its successor sets the next rekey when the collision resolves.
        old.rekey_at = u64::MAX;
        old.queue.append(&mut theirs.queue);
        self.ike = Some(old);
        true
    }

    /// The peer answered that it holds no CHILD_SA `spi_in` (our inbound SPI): it goes at
    /// once (nothing of it can arrive), a CHILD_SA the peer made in its place carries our
    /// traffic from now on, and when none is left a new one is made at once, whichever side
    /// initiated the IKE SA (the peer may not know that it has none).
    fn peer_lost_child(&mut self, spi_in: u32, now: u64, out: &mut Vec<Out>) {
        let Some(c) = self
            .children
            .iter_mut()
            .find(|c| c.keys.spi_in == spi_in && c.until.map_or(true, |u| u > now))
        else {
            return;
        };
        c.out = false;
        c.replaced = true;
        c.pending_since = None;
        c.awaits_delete_of = None;
        c.until = Some(now);
        out.push(Out::Event(Event::ChildDown {
            spi_in,
            why: "the peer no longer holds it (CHILD_SA_NOT_FOUND)",
        }));
        if self.children.iter().any(|c| c.pending_since.is_some()) {
            self.switch_pending(now, true);
        }
        if !self.has_active_child() {
            self.new_child_at = now;
            self.remake_child = true;
        }
        out.push(Out::Changed);
    }

    /// A rekey of the CHILD_SA `spi_in` is queued or in flight, on any IKE SA.
    fn rekey_busy(&self, spi_in: u32) -> bool {
        let task = Task::RekeyChild(spi_in);
        self.deferred.contains(&task)
            || self.ike.iter().chain(&self.others).any(|s| {
                s.queue.contains(&task) || rekeying_child(s).is_some_and(|(o, _)| o == spi_in)
            })
    }

    /// A CHILD_SA that carries traffic (not replaced, not being deleted).
    fn has_active_child(&self) -> bool {
        self.children
            .iter()
            .any(|c| c.until.is_none() && !c.replaced)
    }

    /// An IKE SA goes away with a request in flight: a CHILD_SA rekey it carried is tried
    /// again on the current IKE SA.
    fn orphaned(&mut self, sa: &IkeSa, now: u64) {
        if let Some(InFlight {
            req: Req::RekeyChild { old_in, .. },
            ..
        }) = &sa.flight
        {
            if let Some(c) = self
                .children
                .iter_mut()
                .find(|c| c.keys.spi_in == *old_in && !c.replaced)
            {
                c.rekey_at = now;
            }
        }
    }

    /// An authenticated ESP packet arrived from the peer (DPD need not ask).
    pub fn heard(&mut self, now: u64) {
        if let Some(s) = self.ike.as_mut() {
            s.last_heard = s.last_heard.max(now);
        }
    }

    fn fail(&mut self, out: &mut Vec<Out>, reason: Failure, detail: String) {
        self.stats.fail(reason);
        out.push(Out::Event(Event::Failed { reason, detail }));
    }

    // ------------------------------------------------------------------ timers

    // ------------------------------------------------------------------ initiator
}

/// One line of `espip show` per SA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaStatus {
    /// "ike" or "child".
    pub kind: &'static str,
    /// The SPIs.
    pub spis: String,
    /// The state.
    pub state: &'static str,
    /// The proposal.
    pub proposal: String,
    /// Age in ms.
    pub age_ms: u64,
    /// Time to the next rekey, ms.
    pub rekey_in_ms: Option<u64>,
}

/// Where a message's IKE SA lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Current,
    Other(usize),
}

/// What processing a request did to the IKE SA it came on.
enum After {
    /// Keep it where it was.
    Keep,
    /// It became the current IKE SA (a responder's IKE_AUTH).
    Promote,
    /// A rekey replaced it with this one; it waits for its delete.
    Replaced(Box<IkeSa>),
    /// It is gone (deleted by the peer, or failed authentication).
    Drop,
    /// A lobby's: its IKE_AUTH names this peer ([`Out::Handoff`]).
    Handoff(Id),
}

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
    /// The SA we send on.
    pub out: Option<(u32, KeyMaterial, bool)>,
    /// Every SA we accept (newest first).
    pub ins: Vec<(u32, KeyMaterial, bool)>,
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
        /// The notify (error type) sent or received, by RFC name, or another reason.
        reason: String,
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
    pub failures: BTreeMap<String, u64>,
    /// IKE SA keys derived (any IKE SA, half-open and failed ones too): when this moves, the
    /// edge has new keys to export for Wireshark.
    pub ike_keys_made: u64,
}

impl IkeStats {
    fn fail(&mut self, r: &str) {
        *self.failures.entry(r.to_string()).or_default() += 1;
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
}

struct InFlight {
    id: u32,
    msg: Vec<u8>,
    tries: u32,
    next_at: u64,
    req: Req,
}

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

/// One IKE SA.
struct IkeSa {
    spi_i: u64,
    spi_r: u64,
    /// We are the original initiator of this IKE SA.
    initiator: bool,
    state: State,
    choice: Option<IkeChoice>,
    keys: Option<IkeKeys>,
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
}

impl IkeSa {
    fn spis(&self) -> String {
        format!("{:016x}_i {:016x}_r", self.spi_i, self.spi_r)
    }

    fn my_key(&self) -> &KeyMaterial {
        let k = self.keys.as_ref().expect("keys after IKE_SA_INIT");
        if self.initiator {
            &k.sk_ei
        } else {
            &k.sk_er
        }
    }

    fn peer_key(&self) -> &KeyMaterial {
        let k = self.keys.as_ref().expect("keys after IKE_SA_INIT");
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
                s.out = Some((c.keys.spi_out, c.keys.key_out.clone(), c.keys.esn));
            }
            s.ins
                .push((c.keys.spi_in, c.keys.key_in.clone(), c.keys.esn));
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
                state: match s.state {
                    State::InitSent => "connecting",
                    State::Authenticating => "authenticating",
                    State::Established => "established",
                    State::Rekeyed => "rekeyed",
                },
                proposal: s.choice.map(|c| c.name()).unwrap_or_default(),
                age_ms: now.saturating_sub(s.created) / MS,
                rekey_in_ms: (s.state == State::Established && self.cfg.ike_rekey_ms > 0)
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
                s.keys
                    .as_ref()
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

    /// The cookie for an initiator: VersionIDofSecret | SHA-256(secret | Ni | IPi | SPIi)
    /// (section 2.6), with the current secret (a new one every [`COOKIE_ROTATE_MS`]).
    fn cookie(
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
    fn cookie_valid(&self, now: u64, given: &[u8], ni: &[u8], ip: IpAddr, spi_i: u64) -> bool {
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
    /// An IKE_SA_INIT with an invalid key share came: remembered for the cookie threshold.
    fn note_invalid_init(&mut self, now: u64) {
        if self.invalid_inits.len() >= COOKIE_THRESHOLD {
            self.invalid_inits.remove(0);
        }
        self.invalid_inits.push(now);
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
        old.state = State::Established;
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

    /// Rekey now (as strongSwan's `swanctl --rekey`): the IKE SA if `ike`, else every current
    /// CHILD_SA. The exchange starts when no other is in flight (and, for a CHILD_SA the peer
    /// just made, once espip sends on it).
    pub fn rekey_now(
        &mut self,
        ike: bool,
        now: u64,
        rng: &dyn SecureRandom,
    ) -> Result<Vec<Out>, &'static str> {
        let Some(s) = self.ike.as_mut().filter(|s| s.state == State::Established) else {
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

    /// An authenticated ESP packet arrived from the peer (DPD need not ask).
    pub fn heard(&mut self, now: u64) {
        if let Some(s) = self.ike.as_mut() {
            s.last_heard = s.last_heard.max(now);
        }
    }

    fn fail(&mut self, out: &mut Vec<Out>, reason: &str, detail: String) {
        self.stats.fail(reason);
        out.push(Out::Event(Event::Failed {
            reason: reason.to_string(),
            detail,
        }));
    }

    // ------------------------------------------------------------------ timers

    /// Time passes: retransmissions, rekeys, DPD, grace periods, reconnects.
    pub fn tick(&mut self, now: u64, rng: &dyn SecureRandom) -> Vec<Out> {
        let mut out = Vec::new();
        self.unconfirmed_survivors(now, &mut out);
        // Child SAs: grace ends, pending switches time out, hard lifetimes.
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
        // Half-open and replaced IKE SAs.
        let cfg_tries = self.cfg.retransmit_tries;
        self.others.retain(|s| {
            let half_open_expired = s.state == State::Authenticating
                && now.saturating_sub(s.created) > HALF_OPEN_MS * MS;
            let delete_unanswered =
                s.state == State::Rekeyed && s.flight.as_ref().is_some_and(|f| f.tries > cfg_tries);
            let replaced_long_ago =
                s.state == State::Rekeyed && now.saturating_sub(s.rekey_at) > HALF_OPEN_MS * MS;
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
        let dead = {
            let Some(s) = self.ike.as_mut() else {
                return out;
            };
            match s.flight.as_mut() {
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
            }
        };
        if dead {
            let detail = format!(
                "no answer from {} after {} retransmissions",
                self.cfg.remote.ip(),
                self.cfg.retransmit_tries
            );
            self.teardown(now, &mut out, "peer_dead", detail);
            return out;
        }
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
        if s.state != State::Established {
            return out;
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
        self.next_task(now, rng, &mut out);
        out
    }

    /// Start the next queued request, if none is in flight.
    fn next_task(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
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
        if s.flight.is_some() || s.state != State::Established || s.queue.is_empty() {
            return;
        }
        // Both sides rekey the IKE SA and our answer made the peer's new one current: until
        // the answer to our own request says which stays, nothing starts on it. If ours stays,
        // the peer deletes its new one (strongSwan may never have made it, when it dropped our
        // answer), and a request started on it would hang there, unanswered, until that IKE
        // SA is forgotten: a CHILD_SA rekey stuck like that lets the CHILD_SA die of old age.
        if let Some(c) = &self.ike_collision {
            let ours_in_flight = self.others.iter().any(|o| {
                (o.spi_i, o.spi_r) == c.old
                    && matches!(
                        o.flight.as_ref().map(|f| &f.req),
                        Some(Req::RekeyIke { .. })
                    )
            });
            if ours_in_flight && (s.spi_i, s.spi_r) == c.theirs {
                return;
            }
        }
        let task = s.queue.remove(0);
        let (payloads, exch, req) = match task {
            Task::Dpd => (Vec::new(), exchange::INFORMATIONAL, Req::Dpd),
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
                let new_in = rand_spi(rng);
                let ni = rand_bytes(rng, 32);
                let pfs = self.cfg.esp.iter().find_map(|p| p.groups.first().copied());
                let share = pfs.and_then(|g| KeyShare::new(g, rng));
                let mut p = vec![
                    Payload::Sa(self.esp_offer(new_in, share.is_some())),
                    Payload::Nonce(ni.clone()),
                ];
                if let Some(sh) = &share {
                    p.push(Payload::Ke {
                        group: sh.group().id(),
                        data: sh.public.clone(),
                    });
                }
                p.push(Payload::TsI(self.cfg.local_ts.clone()));
                p.push(Payload::TsR(self.cfg.remote_ts.clone()));
                (
                    p,
                    exchange::CREATE_CHILD_SA,
                    Req::NewChild { new_in, ni, share },
                )
            }
            Task::RekeyChild(old_in) => {
                let Some(old) = self
                    .children
                    .iter()
                    .find(|c| c.keys.spi_in == old_in && !c.replaced && c.until.is_none())
                else {
                    return self.next_task(now, rng, out);
                };
                let new_in = rand_spi(rng);
                let ni = rand_bytes(rng, 32);
                let pfs = self.cfg.esp.iter().find_map(|p| p.groups.first().copied());
                let share = pfs.and_then(|g| KeyShare::new(g, rng));
                let mut p = vec![
                    Payload::Notify {
                        protocol: proto::ESP,
                        spi: old.keys.spi_in.to_be_bytes().to_vec(),
                        kind: notify::REKEY_SA,
                        data: Vec::new(),
                    },
                    Payload::Sa(self.esp_offer(new_in, share.is_some())),
                    Payload::Nonce(ni.clone()),
                ];
                if let Some(sh) = &share {
                    p.push(Payload::Ke {
                        group: sh.group().id(),
                        data: sh.public.clone(),
                    });
                }
                p.push(Payload::TsI(self.cfg.local_ts.clone()));
                p.push(Payload::TsR(self.cfg.remote_ts.clone()));
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
                let spi = rand_u64(rng);
                let ni = rand_bytes(rng, 32);
                let choice = s.choice.expect("established");
                let Some(share) = KeyShare::new(choice.group, rng) else {
                    return;
                };
                let offer: Vec<Proposal> = self
                    .cfg
                    .ike
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        // The group of the key share first.
                        let mut p = p.clone();
                        p.groups.sort_by_key(|g| *g != choice.group);
                        p.to_wire(i as u8 + 1, spi.to_be_bytes().to_vec())
                    })
                    .collect();
                (
                    vec![
                        Payload::Sa(offer),
                        Payload::Nonce(ni.clone()),
                        Payload::Ke {
                            group: share.group().id(),
                            data: share.public.clone(),
                        },
                    ],
                    exchange::CREATE_CHILD_SA,
                    Req::RekeyIke { spi, ni, share },
                )
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

    fn esp_offer(&self, spi: u32, pfs: bool) -> Vec<Proposal> {
        self.cfg
            .esp
            .iter()
            .enumerate()
            .map(|(i, p)| p.to_wire(i as u8 + 1, spi, pfs))
            .collect()
    }

    /// Remove the IKE SA and its children; an initiator tries again later.
    fn teardown(&mut self, now: u64, out: &mut Vec<Out>, reason: &str, detail: String) {
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

    // ------------------------------------------------------------------ initiator

    fn initiate(&mut self, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        let group = self.group_hint.unwrap_or_else(|| self.cfg.ike[0].groups[0]);
        let Some(share) = KeyShare::new(group, rng) else {
            return;
        };
        let spi_i = rand_u64(rng);
        let ni = rand_bytes(rng, 32);
        let offer: Vec<Proposal> = self
            .cfg
            .ike
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut p = p.clone();
                p.groups.sort_by_key(|g| *g != group);
                p.to_wire(i as u8 + 1, Vec::new())
            })
            .collect();
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
            state: State::InitSent,
            choice: None,
            keys: None,
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

    fn auth_payloads(
        &self,
        s: &IkeSa,
        id_payload: Payload,
        signed_msg: &[u8],
        peer_nonce: &[u8],
    ) -> Payload {
        let keys = s.keys.as_ref().expect("keys");
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

    fn verify_auth(&self, s: &IkeSa, p: &[Payload], from_initiator: bool) -> Result<(), String> {
        let id = if from_initiator {
            take!(p, Payload::IdI(i) => i.clone())
        } else {
            take!(p, Payload::IdR(i) => i.clone())
        }
        .ok_or("no identity payload")?;
        if id != self.cfg.remote_id {
            return Err(format!(
                "peer identity {:?} is not remote_id {:?}",
                id.display(),
                self.cfg.remote_id.display()
            ));
        }
        let (method, data) = take!(p, Payload::Auth { method, data } => (*method, data.clone()))
            .ok_or("no AUTH payload")?;
        if method != 2 {
            return Err(format!(
                "AUTH method {method} (espip accepts only 2, shared key MIC)"
            ));
        }
        let keys = s.keys.as_ref().expect("keys");
        let (signed, nonce, sk_p) = if from_initiator {
            (&s.init_req, &s.nr, &keys.sk_pi)
        } else {
            (&s.init_resp, &s.ni, &keys.sk_pr)
        };
        let want = crypto::psk_auth(keys.prf, &self.cfg.psk, signed, nonce, sk_p, &id.body());
        if !crypto::mac_eq(&want, &data) {
            return Err("the AUTH value does not verify: the pre-shared keys differ".into());
        }
        Ok(())
    }

    fn init_response(
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
            // The same request again with the cookie as its first payload (section 2.6);
            // a second cookie for a request that carried one is a failure.
            let mut payloads = msg::parse_chain(&s.init_req, msg::HDR_LEN, s.init_req[16])
                .map(|c| c.payloads)
                .unwrap_or_default();
            let had = matches!(payloads.first(), Some(Payload::Notify { kind, .. }) if *kind == notify::COOKIE);
            if had || cookie.is_empty() || cookie.len() > 64 {
                self.fail(
                    out,
                    "COOKIE",
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
            return;
        }
        if let Some((_, data)) = find_notify(p, notify::INVALID_KE_PAYLOAD) {
            let g = data
                .get(..2)
                .and_then(|d| Group::from_id(u16::from_be_bytes([d[0], d[1]])));
            let ok = g.filter(|g| self.cfg.ike.iter().any(|x| x.groups.contains(g)));
            self.fail(
                out,
                "INVALID_KE_PAYLOAD",
                format!(
                    "peer {} wants group {:?}; retrying with it",
                    self.cfg.name, g
                ),
            );
            if let Some(g) = ok {
                if self.group_hint != Some(g) {
                    self.group_hint = Some(g);
                    self.initiate(now, rng, out);
                    return;
                }
            }
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        }
        if let Some(e) = error_notify(p) {
            self.fail(
                out,
                &notify::name(e),
                format!("peer {} refused IKE_SA_INIT", self.cfg.name),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let Some(choice) = proposal::accept_ike(&sa, &self.cfg.ike) else {
            self.fail(
                out,
                "NO_PROPOSAL_CHOSEN",
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
                "INVALID_SYNTAX",
                "IKE_SA_INIT response without KE or nonce".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        };
        if g != share.group().id() || choice.group != share.group() {
            self.fail(
                out,
                "INVALID_SYNTAX",
                "KE group differs from the chosen one".into(),
            );
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        }
        let Ok(shared) = share.agree(&ke) else {
            self.fail(out, "INVALID_SYNTAX", "bad KE public value".into());
            self.retry_at = Some(now + RETRY_MS * MS);
            return;
        };
        s.spi_r = h.spi_r;
        s.nr = nr;
        s.init_resp = raw.to_vec();
        s.choice = Some(choice);
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &s.nr, None);
        self.stats.ike_keys_made += 1;
        s.keys = Some(crypto::ike_keys(
            choice.prf,
            choice.cipher,
            &seed,
            &ni,
            &s.nr,
            s.spi_i,
            s.spi_r,
        ));
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
                "NAT_DETECTED",
                format!(
                    "a NAT between {} and {} (the NAT detection hashes differ): ESP as IP protocol 50 cannot cross it; use mode = \"esp-udp\" for peer {}",
                    me.ip(),
                    s.peer.ip(),
                    self.cfg.name
                ),
            );
            self.retry_at = Some(now + 6 * RETRY_MS * MS);
            return;
        }
        if nat_here || nat_there || self.cfg.force_encap {
            s.natt = true;
            s.peer = SocketAddr::new(s.peer.ip(), self.cfg.remote_natt_port);
        }
        // IKE_AUTH.
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
        s.state = State::Authenticating;
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
}

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
            self.stats.fail("too_large");
            return out;
        }
        let h = match msg::parse_header(raw) {
            Ok(h) => h,
            Err(MsgError::Version) => {
                self.stats.fail("INVALID_MAJOR_VERSION");
                return out;
            }
            Err(_) => {
                self.stats.fail("malformed");
                return out;
            }
        };
        if from.ip() != self.cfg.remote.ip() {
            self.stats.fail("wrong_source");
            return out;
        }
        if h.exchange == exchange::IKE_SA_INIT && !h.is_response() && h.spi_r == 0 {
            self.respond_init(&h, raw, from, natt, now, rng, &mut out);
            return out;
        }
        let Some(slot) = self.slot_of(&h) else {
            self.stats.fail("unknown_ike_spi");
            return out;
        };
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
                    new.queue.extend(cur.queue.drain(..).filter(moves));
                    cur.state = State::Rekeyed;
                    cur.rekey_at = now;
                    self.others.push(cur);
                }
                new.queue.extend(s.queue.drain(..).filter(moves));
                s.state = State::Rekeyed;
                // From now on: when it was replaced (it goes HALF_OPEN_MS later at most).
                s.rekey_at = now;
                self.others.push(s);
                self.ike = Some(*new);
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
                    if !self.children.is_empty() {
                        self.children.clear();
                        out.push(Out::Changed);
                    }
                    if self.cfg.role == Role::Initiator && !self.closing {
                        self.retry_at = Some(now + RETRY_MS * MS);
                    }
                }
            }
        }
        if self.ensure_out(now) {
            out.push(Out::Changed);
        }
        self.next_task(now, rng, &mut out);
        out
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
            self.stats.fail("wrong_initiator_flag");
            return After::Keep;
        }
        let chain = match msg::parse_chain(raw, msg::HDR_LEN, h.next) {
            Ok(c) => c,
            Err(_) => {
                self.stats.fail("malformed");
                return After::Keep;
            }
        };
        if h.exchange == exchange::IKE_SA_INIT {
            if h.is_response() && s.state == State::InitSent && s.initiator {
                self.ike = Some(std::mem::replace(s, dummy_sa()));
                self.init_response(now, rng, h, raw, &chain.payloads, out);
                // init_response put the SA (or a new attempt) back in self.ike.
                *s = match self.ike.take() {
                    Some(x) => x,
                    None => return After::Drop,
                };
                return After::Keep;
            }
            self.stats.fail("unexpected_message");
            return After::Keep;
        }
        let Some(sk) = chain.sk else {
            self.stats.fail("unencrypted");
            return After::Keep;
        };
        if s.keys.is_none() {
            self.stats.fail("unexpected_message");
            return After::Keep;
        }
        if h.is_response() {
            if s.flight.as_ref().map(|f| f.id) != Some(h.msg_id) {
                self.stats.fail("unexpected_response");
                return After::Keep;
            }
            let p = match msg::open_sk(raw, sk, s.peer_key()) {
                Ok(p) => p,
                Err(MsgError::BadIcv) => {
                    self.stats.fail("bad_icv");
                    return After::Keep;
                }
                Err(_) => {
                    self.stats.fail("malformed");
                    return After::Keep;
                }
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
            self.stats.fail("invalid_message_id");
            return After::Keep;
        }
        let p = match msg::open_sk(raw, sk, s.peer_key()) {
            Ok(p) => p,
            Err(MsgError::BadIcv) => {
                self.stats.fail("bad_icv");
                return After::Keep;
            }
            Err(_) => {
                self.stats.fail("malformed");
                return After::Keep;
            }
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
        s.last_heard = now;
        s.peer = from;
        s.natt = natt;
        s.peer_next = s.peer_next.wrapping_add(1);
        let (payloads, after) = match h.exchange {
            exchange::IKE_AUTH if !s.initiator && s.state == State::Authenticating => {
                self.respond_auth(s, &p, now, rng, out)
            }
            exchange::CREATE_CHILD_SA if s.state == State::Established => {
                self.respond_create(s, &p, now, rng, out)
            }
            // Sent before the peer learnt that this IKE SA was rekeyed (the requests crossed):
            // its CHILD_SAs live on the new one now. Section 2.25: the peer tries again (on
            // the new one); INVALID_SYNTAX would be a hard error to it.
            exchange::CREATE_CHILD_SA if s.state == State::Rekeyed => {
                self.stats.fail("rekey_collision");
                (
                    vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                    After::Keep,
                )
            }
            exchange::INFORMATIONAL if s.state != State::InitSent => {
                self.respond_info(s, &p, now, out)
            }
            _ => {
                self.stats.fail("unexpected_message");
                (
                    vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                    After::Keep,
                )
            }
        };
        let h2 = s.header(h.exchange, h.msg_id, true);
        let m = s.seal(h2, &payloads);
        s.cached = Some((h.msg_id, m.clone()));
        self.stats.responses += 1;
        out.push(Out::Send {
            to: s.peer,
            natt: s.natt,
            msg: m,
        });
        after
    }

    #[allow(clippy::too_many_arguments)]
    fn respond_init(
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
        if let Some(s) = self
            .others
            .iter()
            .find(|s| s.spi_i == h.spi_i && !s.initiator && s.state == State::Authenticating)
        {
            if s.init_req == raw {
                self.stats.resent_responses += 1;
                out.push(Out::Send {
                    to: from,
                    natt,
                    msg: s.init_resp.clone(),
                });
            }
            return;
        }
        let chain = match msg::parse_chain(raw, msg::HDR_LEN, h.next) {
            Ok(c) if c.sk.is_none() => c,
            _ => {
                self.stats.fail("malformed");
                return;
            }
        };
        let p = &chain.payloads;
        let plain_error = |t: u16, data: Vec<u8>| {
            msg::encode_plain(
                Header {
                    spi_i: h.spi_i,
                    spi_r: 0,
                    next: 0,
                    exchange: exchange::IKE_SA_INIT,
                    flags: flags::RESPONSE,
                    msg_id: 0,
                    length: 0,
                },
                &[Payload::notify(t, data)],
            )
        };
        let offered = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let (Some((g, ke)), Some(ni)) = (
            take!(p, Payload::Ke { group, data } => (*group, data.clone())),
            take!(p, Payload::Nonce(n) => n.clone()),
        ) else {
            self.stats.fail("INVALID_SYNTAX");
            out.push(Out::Send {
                to: from,
                natt,
                msg: plain_error(notify::INVALID_SYNTAX, Vec::new()),
            });
            return;
        };
        // Under half-open load, a cookie before any state or Diffie-Hellman (section 2.6):
        // only a sender that receives at its address can come back with it.
        // Requests with an invalid key share count as half-open SAs: a flood of them gets
        // cookies too, instead of a key generation each.
        self.invalid_inits
            .retain(|t| now.saturating_sub(*t) < HALF_OPEN_MS * MS);
        let half_open = self
            .others
            .iter()
            .filter(|s| s.state == State::Authenticating)
            .count()
            + self.invalid_inits.len();
        if half_open >= COOKIE_THRESHOLD {
            let given = match p.first() {
                Some(Payload::Notify { kind, data, .. }) if *kind == notify::COOKIE => Some(data),
                _ => None,
            };
            if !given.is_some_and(|g| self.cookie_valid(now, g, &ni, from.ip(), h.spi_i)) {
                let want = self.cookie(rng, now, &ni, from.ip(), h.spi_i);
                self.stats.fail("cookie_required");
                out.push(Out::Send {
                    to: from,
                    natt,
                    msg: plain_error(notify::COOKIE, want),
                });
                return;
            }
        }
        // Room for one more half-open SA, or no answer at all (before any key generation):
        // the oldest may go only once it had time for its IKE_AUTH.
        let evict = {
            let mut half: Vec<(usize, u64)> = self
                .others
                .iter()
                .enumerate()
                .filter(|(_, s)| s.state == State::Authenticating)
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
                        self.stats.fail("half_open_full");
                        return;
                    }
                }
            }
        };
        let Some(choice) = proposal::choose_ike(&offered, &self.cfg.ike) else {
            self.fail(
                out,
                "NO_PROPOSAL_CHOSEN",
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
                msg: plain_error(notify::NO_PROPOSAL_CHOSEN, Vec::new()),
            });
            return;
        };
        if g != choice.group.id() {
            self.stats.fail("INVALID_KE_PAYLOAD");
            out.push(Out::Send {
                to: from,
                natt,
                msg: plain_error(
                    notify::INVALID_KE_PAYLOAD,
                    choice.group.id().to_be_bytes().to_vec(),
                ),
            });
            return;
        }
        // The key share is checked before any work of ours (a few microseconds, against a
        // key generation's hundreds): not a point of the group, no answer, and it counts
        // towards the cookie threshold.
        if !point::valid_public(choice.group, &ke) {
            self.stats.fail("invalid_key_share");
            self.note_invalid_init(now);
            return;
        }
        let Some(share) = KeyShare::new(choice.group, rng) else {
            return;
        };
        let kr = share.public.clone();
        let Ok(shared) = share.agree(&ke) else {
            self.stats.fail("invalid_key_share");
            self.note_invalid_init(now);
            return;
        };
        let spi_r = rand_u64(rng);
        let nr = rand_bytes(rng, 32);
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
            Payload::Nonce(nr.clone()),
            Payload::notify(notify::NAT_DETECTION_SOURCE_IP, src_hash),
            Payload::notify(
                notify::NAT_DETECTION_DESTINATION_IP,
                crypto::nat_hash(h.spi_i, spi_r, from),
            ),
        ];
        let resp = msg::encode_plain(
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
        );
        let seed = crypto::skeyseed(choice.prf, &shared, &ni, &nr, None);
        self.stats.ike_keys_made += 1;
        let keys = crypto::ike_keys(choice.prf, choice.cipher, &seed, &ni, &nr, h.spi_i, spi_r);
        // At most a few half-open SAs per peer: the oldest goes, once it had its time.
        if let Some(i) = evict {
            self.others.remove(i);
            self.stats.fail("half_open_evicted");
        }
        self.others.push(IkeSa {
            spi_i: h.spi_i,
            spi_r,
            initiator: false,
            state: State::Authenticating,
            choice: Some(choice),
            keys: Some(keys),
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

    fn new_child(
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

    fn established(&mut self, s: &mut IkeSa, now: u64, rng: &dyn SecureRandom, out: &mut Vec<Out>) {
        s.state = State::Established;
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
            proposal: s.choice.map(|c| c.name()).unwrap_or_default(),
            natt: s.natt,
        }));
    }

    fn respond_auth(
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
                "AUTHENTICATION_FAILED",
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
        self.established(s, now, rng, out);
        // The peer started over: whatever SAs we had with it go.
        self.children.clear();
        match child {
            Ok((choice, tsi, tsr)) => {
                let spi_in = rand_spi(rng);
                let keys = s.keys.as_ref().expect("keys");
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
                self.children.push(c);
                out.push(Out::Changed);
                out.push(Out::Event(Event::ChildUp {
                    spi_in,
                    spi_out: choice.spi,
                    proposal: choice.name(),
                    ts: ts_string(&tsr, &tsi),
                    rekey_of: None,
                }));
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
    fn child_for(
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
                "NO_PROPOSAL_CHOSEN",
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
                "TS_UNACCEPTABLE",
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

    fn respond_create(
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
        let keys = s.keys.clone().expect("keys");
        // Rekey of the IKE SA.
        if offered.iter().any(|x| x.protocol == proto::IKE) {
            // Section 2.25: not while we create, rekey or delete a CHILD_SA on it.
            if matches!(
                s.flight.as_ref().map(|f| &f.req),
                Some(Req::RekeyChild { .. } | Req::NewChild { .. } | Req::DeleteChild(_))
            ) {
                self.stats.fail("rekey_collision");
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
            let Some(choice) = proposal::choose_ike(&offered, &self.cfg.ike) else {
                self.fail(
                    out,
                    "NO_PROPOSAL_CHOSEN",
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
            return (
                vec![
                    Payload::Sa(vec![choice.to_wire(spi_r.to_be_bytes().to_vec())]),
                    Payload::Nonce(nr),
                    Payload::Ke {
                        group: choice.group.id(),
                        data: kr,
                    },
                ],
                After::Replaced(Box::new(new)),
            );
        }
        // Rekey of a CHILD_SA, or a new one when this peer has none (its last one expired or
        // was deleted while the IKE SA lived on).
        let rekey_spi = p.iter().find_map(|x| match x {
            Payload::Notify { kind, spi, .. } if *kind == notify::REKEY_SA => Some(spi.clone()),
            _ => None,
        });
        let old_idx = match &rekey_spi {
            None => {
                if self.has_active_child() {
                    self.stats.fail("NO_ADDITIONAL_SAS");
                    return (vec![Payload::notify(35, Vec::new())], After::Keep);
                }
                None
            }
            Some(spi) => {
                let old_out = <[u8; 4]>::try_from(&spi[..]).ok().map(u32::from_be_bytes);
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
                        self.stats.fail("rekey_collision");
                        return (
                            vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                            After::Keep,
                        );
                    }
                    self.fail(
                        out,
                        "CHILD_SA_NOT_FOUND",
                        format!("rekey of SPI {old_out:08x?} by {}", self.cfg.name),
                    );
                    return (
                        vec![Payload::Notify {
                            protocol: proto::ESP,
                            spi: spi.clone(),
                            kind: notify::CHILD_SA_NOT_FOUND,
                            data: Vec::new(),
                        }],
                        After::Keep,
                    );
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
                Some(idx)
            }
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
            self.stats.fail("rekey_collision");
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
        let mut resp_ke = None;
        let shared = match (choice.group, ke) {
            (Some(g), Some((_, data))) => {
                let Some(share) = KeyShare::new(g, rng) else {
                    return (
                        vec![Payload::notify(notify::TEMPORARY_FAILURE, Vec::new())],
                        After::Keep,
                    );
                };
                resp_ke = Some(Payload::Ke {
                    group: g.id(),
                    data: share.public.clone(),
                });
                match share.agree(&data) {
                    Ok(x) => Some(x),
                    Err(_) => {
                        return (
                            vec![Payload::notify(notify::INVALID_SYNTAX, Vec::new())],
                            After::Keep,
                        )
                    }
                }
            }
            _ => None,
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
        self.children.push(c);
        out.push(Out::Changed);
        out.push(Out::Event(Event::ChildUp {
            spi_in,
            spi_out: choice.spi,
            proposal: choice.name(),
            ts: ts_string(&tsr, &tsi),
            rekey_of: old_in,
        }));
        let mut resp = vec![
            Payload::Sa(vec![choice.to_wire(spi_in)]),
            Payload::Nonce(nr),
        ];
        resp.extend(resp_ke);
        resp.push(Payload::TsI(tsi));
        resp.push(Payload::TsR(tsr));
        (resp, After::Keep)
    }

    #[allow(clippy::too_many_arguments)]
    fn rekeyed_sa(
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
            state: State::Established,
            choice: Some(choice),
            keys: Some(keys),
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
    fn unconfirmed_survivors(&mut self, now: u64, out: &mut Vec<Out>) {
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
    fn switch_pending(&mut self, now: u64, force: bool) -> bool {
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

    fn respond_info(
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
                "AUTHENTICATION_FAILED",
                format!(
                    "peer {} refused our authentication: its remote_id must be our local_id ({}) and both psk_files the same key",
                    self.cfg.name,
                    self.cfg.local_id.display()
                ),
            );
            if s.state == State::Established {
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
                    if s.state == State::Established && !collided {
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
            Req::Auth { spi_in } => {
                if let Some(e) = error_notify(p)
                    .filter(|e| *e != notify::NO_PROPOSAL_CHOSEN && *e != notify::TS_UNACCEPTABLE)
                {
                    self.fail(
                        out,
                        &notify::name(e),
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
                        "AUTHENTICATION_FAILED",
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
                self.established(s, now, rng, out);
                if let Some(e) = error_notify(p) {
                    self.fail(
                        out,
                        &notify::name(e),
                        format!("peer {} refused the CHILD_SA", self.cfg.name),
                    );
                    // No traffic without a child: close and try again later.
                    let h = s.header(exchange::INFORMATIONAL, s.next_id, false);
                    let m = s.seal(
                        h,
                        &[Payload::Delete {
                            protocol: proto::IKE,
                            spis: Vec::new(),
                        }],
                    );
                    out.push(Out::Send {
                        to: s.peer,
                        natt: s.natt,
                        msg: m,
                    });
                    self.retry_at = Some(now + RETRY_MS * MS);
                    return After::Drop;
                }
                let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
                let tsi = take!(p, Payload::TsI(v) => v.clone()).unwrap_or_default();
                let tsr = take!(p, Payload::TsR(v) => v.clone()).unwrap_or_default();
                let Some(choice) = proposal::accept_esp(&sa, &self.cfg.esp, None) else {
                    self.fail(
                        out,
                        "NO_PROPOSAL_CHOSEN",
                        "the responder's ESP proposal is not one we offered".into(),
                    );
                    self.retry_at = Some(now + RETRY_MS * MS);
                    return After::Drop;
                };
                let keys = s.keys.as_ref().expect("keys");
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
                self.children.push(c);
                out.push(Out::Changed);
                out.push(Out::Event(Event::ChildUp {
                    spi_in,
                    spi_out: choice.spi,
                    proposal: choice.name(),
                    ts: ts_string(&tsi, &tsr),
                    rekey_of: None,
                }));
                After::Keep
            }
            Req::RekeyChild {
                old_in,
                new_in,
                ni,
                share,
            } => {
                match self.child_from_answer(s, p, new_in, &ni, share) {
                    Err((reason, detail)) => {
                        // Had we answered the peer's rekey of it, the peer's stays.
                        self.child_collision.take_if(|c| c.old_in == old_in);
                        if reason == "CHILD_SA_NOT_FOUND" {
                            // The peer holds no such SA any more (section 2.25: it deleted
                            // it, and its DELETE crossed our request or was lost): sending
                            // on it loses every packet. As for the peer's DELETE: gone now,
                            // a CHILD_SA the peer made in its place carries our traffic, and
                            // with none left a new one is made without waiting.
                            self.fail(out, &reason, format!("CHILD_SA rekey: {detail}"));
                            self.peer_lost_child(old_in, now, out);
                            return After::Keep;
                        }
                        let (delay, spread) = if reason == "TEMPORARY_FAILURE" {
                            // A collision (section 2.25: the peer is rekeying the IKE SA, or
                            // closing this CHILD_SA): tried again soon, at a random moment so
                            // that two sides do not collide again.
                            self.stats.fail("rekey_collision");
                            (100, 400)
                        } else {
                            self.fail(out, &reason, format!("CHILD_SA rekey: {detail}"));
                            (10_000, 2_000)
                        };
                        if let Some(c) = self.children.iter_mut().find(|c| c.keys.spi_in == old_in)
                        {
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
                                if let Some(t) = self.children.iter_mut().find(|t| {
                                    t.keys.spi_in == c.theirs_in && t.pending_since.is_some()
                                }) {
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
            Req::NewChild { new_in, ni, share } => {
                match self.child_from_answer(s, p, new_in, &ni, share) {
                    Err((reason, detail)) => {
                        self.fail(out, &reason, format!("new CHILD_SA: {detail}"));
                        self.new_child_at = now + 10_000 * MS + jitter(rng, 2_000);
                    }
                    Ok((ck, choice, ts, _)) => {
                        self.install_child(ck, &choice, ts, None, now, rng, out)
                    }
                }
                After::Keep
            }
            Req::DeleteChild(spi_in) => {
                if let Some(c) = self.children.iter_mut().find(|c| c.keys.spi_in == spi_in) {
                    c.until = Some(
                        c.until
                            .map_or(now + GRACE_MS * MS, |u| u.min(now + GRACE_MS * MS)),
                    );
                }
                After::Keep
            }
            Req::RekeyIke { spi, ni, share } => {
                if let Some(e) = error_notify(p) {
                    if e == notify::TEMPORARY_FAILURE {
                        self.stats.fail("rekey_collision");
                    } else {
                        self.fail(
                            out,
                            &notify::name(e),
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
                let (Some(choice), Some(nr), Some(ke), Some(spi_r)) = (choice, nr, ke, peer_spi)
                else {
                    self.fail(
                        out,
                        "NO_PROPOSAL_CHOSEN",
                        "the IKE rekey answer is not one we offered".into(),
                    );
                    s.rekey_at = now + 10_000 * MS;
                    return After::Keep;
                };
                let Ok(shared) = share.agree(&ke) else {
                    self.fail(
                        out,
                        "INVALID_SYNTAX",
                        "bad KE in the IKE rekey answer".into(),
                    );
                    s.rekey_at = now + 10_000 * MS;
                    return After::Keep;
                };
                let old_d = s.keys.as_ref().expect("keys").sk_d.clone();
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
                    new.state = State::Rekeyed;
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
            Req::DeleteIke => After::Drop,
            Req::Dpd => After::Keep,
        }
    }

    /// Send DELETE for the IKE SA `sa` on itself, as its request in flight (retransmitted
    /// until answered).
    fn delete_ike_on(&self, sa: &mut IkeSa, now: u64, out: &mut Vec<Out>) {
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

    /// The CHILD_SA that the answer `p` to our CREATE_CHILD_SA sets up (we initiated the
    /// exchange: the initiator-to-responder keys are ours to send with), or why not:
    /// (the RFC name of the error, a detail for the log).
    fn child_from_answer(
        &self,
        s: &IkeSa,
        p: &[Payload],
        new_in: u32,
        ni: &[u8],
        share: Option<KeyShare>,
    ) -> Result<Answered, (String, String)> {
        if let Some(e) = error_notify(p) {
            return Err((
                notify::name(e),
                format!("peer {} refused it", self.cfg.name),
            ));
        }
        let sa = take!(p, Payload::Sa(v) => v.clone()).unwrap_or_default();
        let nr = take!(p, Payload::Nonce(n) => n.clone());
        let ke = take!(p, Payload::Ke { data, .. } => data.clone());
        let pfs = share.as_ref().map(KeyShare::group);
        let (Some(choice), Some(nr)) = (proposal::accept_esp(&sa, &self.cfg.esp, pfs), nr) else {
            return Err((
                "NO_PROPOSAL_CHOSEN".into(),
                "the answer is not one of the proposals we offered".into(),
            ));
        };
        let shared = match (share, ke) {
            (Some(sh), Some(k)) => Some(sh.agree(&k).map_err(|_| {
                (
                    "INVALID_SYNTAX".to_string(),
                    "a bad KE in the answer".to_string(),
                )
            })?),
            (None, _) => None,
            (Some(_), None) => {
                return Err((
                    "INVALID_SYNTAX".into(),
                    "no KE in the answer to a PFS proposal".into(),
                ))
            }
        };
        let keys = s.keys.as_ref().expect("keys");
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
    fn install_child(
        &mut self,
        ck: ChildKeys,
        choice: &EspChoice,
        ts: String,
        rekey_of: Option<u32>,
        now: u64,
        rng: &dyn SecureRandom,
        out: &mut Vec<Out>,
    ) {
        let (spi_in, spi_out) = (ck.spi_in, ck.spi_out);
        let c = self.new_child(ck, choice.name(), true, now, rng);
        self.children.push(c);
        out.push(Out::Changed);
        out.push(Out::Event(Event::ChildUp {
            spi_in,
            spi_out,
            proposal: choice.name(),
            ts,
            rekey_of,
        }));
    }

    /// A clean stop: DELETE the IKE SA (its CHILD_SAs with it, section 1.4.1), once, without
    /// waiting for the answer.
    pub fn close(&mut self, _now: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.closing = true;
        if let Some(mut s) = self.ike.take() {
            if s.state == State::Established {
                let h = s.header(exchange::INFORMATIONAL, s.next_id, false);
                let m = s.seal(
                    h,
                    &[Payload::Delete {
                        protocol: proto::IKE,
                        spis: Vec::new(),
                    }],
                );
                out.push(Out::Send {
                    to: s.peer,
                    natt: s.natt,
                    msg: m,
                });
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

fn dummy_sa() -> IkeSa {
    IkeSa {
        spi_i: 0,
        spi_r: 0,
        initiator: false,
        state: State::Rekeyed,
        choice: None,
        keys: None,
        ni: Vec::new(),
        nr: Vec::new(),
        init_req: Vec::new(),
        init_resp: Vec::new(),
        next_id: 0,
        flight: None,
        peer_next: 0,
        cached: None,
        iv: 0,
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        natt: false,
        created: 0,
        rekey_at: u64::MAX,
        last_heard: 0,
        queue: Vec::new(),
    }
}

//! The pure packet core: verdicts for packets, no I/O, time passed in.
//!
//! Outbound (TUN -> wire), one call per packet read from the TUN:
//! 1. classify the inner packet (its IPv4/IPv6 header, `wire::ip::InnerPacket`);
//! 2. policy: longest-prefix match of the inner destination over every peer's `allowed_ips`;
//! 3. MTU: a packet above the tunnel MTU with DF (or any IPv6 packet) becomes an ICMP "too big"
//!    written back into the TUN;
//! 4. encapsulation: ESP (sequence number, padding, seal) or nothing for IP-in-IP;
//! 5. verdict: send to the peer's endpoint with IP protocol 50, 4 or 41, or in UDP (RFC 3948).
//!
//! Inbound (wire -> TUN), one call per packet from a raw socket, outer header already removed
//! (or per UDP datagram's payload):
//! 0. UDP: a NAT-keepalive (0xFF) or a non-ESP marker (IKE, 4 zero bytes) is discarded;
//! 1. ESP: SA by SPI (SAD), outer source (and transport, UDP or protocol 50) must be the SA's
//!    peer's; IP-in-IP: peer by outer source;
//! 2. ESP: replay check, open, replay advance, trailer; next header 59 is discarded;
//! 3. the inner packet must be the IP version the header announced, and its source must be in
//!    the peer's `allowed_ips`;
//! 4. verdict: write to the TUN.
//!
//! Each direction is its own struct so that the edge can run them on separate threads without a
//! lock: only counters (relaxed atomics) are shared.

use crate::buf::PacketBuf;
use crate::multipath::{Multipath, PeerPaths, Pick, Probe, ProbeKind, Reorder};
use crate::nat::NatTable;
use crate::prefix::{Prefix, PrefixTable};
use crate::sa::{Cipher, EspError, InboundSa, KeyMaterial, OutboundSa};
use crate::wire::esp::{NEXT_HEADER_DUMMY, NEXT_HEADER_IPV4, NEXT_HEADER_IPV6};
use crate::wire::icmp;
use crate::wire::ip::{InnerPacket, PROTO_ESP, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Why a packet was dropped; each has its own counter (Linux: `LINUX_MIB_XFRM*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Inner destination matches no peer's `allowed_ips` (includes IPv6 router solicitations).
    NoRoute,
    /// Inner packet above the tunnel MTU; an ICMP error went back when allowed.
    TooBig,
    /// Unparseable packet: short, misaligned, bad IP header.
    Malformed,
    /// ESP with an SPI no inbound SA has (Linux: XfrmInNoStates).
    UnknownSpi,
    /// ESP for a known SPI, or IP-in-IP, from an outer source that is not that peer's endpoint
    /// (or ESP in UDP for a peer configured for protocol 50, and the reverse).
    WrongSource,
    /// IP-in-IP from an address that is no peer's endpoint.
    UnknownPeer,
    /// Sequence number replayed or left of the window (Linux: XfrmInStateSeqError).
    Replay,
    /// ICV did not verify (Linux: XfrmInStateProtoError).
    BadIcv,
    /// ESP padding bytes are not 1, 2, 3, ...
    BadPadding,
    /// Next header neither 4 nor 41, or the inner packet's version differs from it.
    BadNextHeader,
    /// Inner source outside the peer's `allowed_ips`.
    NotAllowed,
    /// The outbound SA has used up its sequence numbers and stopped sending.
    SeqExhausted,
    /// A dummy packet (next header 59), discarded as RFC 4303 section 2.6 says.
    Dummy,
    /// The outbound SA reached the end of its persisted sequence reservation (the state
    /// directory cannot be written); nothing is sent that a restart could repeat.
    SeqUnreserved,
    /// The SA reached a hard lifetime (packets, bytes or seconds; Linux: XfrmOutStateExpired /
    /// XfrmInStateExpired): it neither sends nor accepts until new keys are installed.
    LifetimeExpired,
    /// A UDP NAT-keepalive (one byte 0xFF, RFC 3948 section 2.3) on the ESP-in-UDP port.
    NatKeepalive,
    /// A UDP datagram with the non-ESP marker (4 zero bytes: IKE, RFC 3948 section 2.2), which
    /// espip does not speak.
    NonEsp,
    /// A copy of a packet already received from a multipath peer whose scheduler is
    /// `redundant` (the same sequence number by another path), not counted as a replay.
    Duplicate,
    /// For a peer keyed by IKEv2 that has no CHILD_SA (yet, or any more): nothing is sent
    /// in the clear instead.
    NoSa,
    /// For a peer without a configured `endpoint` that has not yet sent an authenticated
    /// packet: its address is not known.
    NoEndpoint,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 20] = [
        DropReason::NoRoute,
        DropReason::TooBig,
        DropReason::Malformed,
        DropReason::UnknownSpi,
        DropReason::WrongSource,
        DropReason::UnknownPeer,
        DropReason::Replay,
        DropReason::BadIcv,
        DropReason::BadPadding,
        DropReason::BadNextHeader,
        DropReason::NotAllowed,
        DropReason::SeqExhausted,
        DropReason::Dummy,
        DropReason::SeqUnreserved,
        DropReason::LifetimeExpired,
        DropReason::NatKeepalive,
        DropReason::NonEsp,
        DropReason::Duplicate,
        DropReason::NoSa,
        DropReason::NoEndpoint,
    ];

    /// The counter name (snake case, stable: used in logs, `show` and metrics).
    pub fn name(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::TooBig => "too_big",
            DropReason::Malformed => "malformed",
            DropReason::UnknownSpi => "unknown_spi",
            DropReason::WrongSource => "wrong_source",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::Replay => "replay",
            DropReason::BadIcv => "bad_icv",
            DropReason::BadPadding => "bad_padding",
            DropReason::BadNextHeader => "bad_next_header",
            DropReason::NotAllowed => "not_allowed",
            DropReason::SeqExhausted => "seq_exhausted",
            DropReason::Dummy => "dummy",
            DropReason::SeqUnreserved => "seq_unreserved",
            DropReason::LifetimeExpired => "lifetime_expired",
            DropReason::NatKeepalive => "nat_keepalive",
            DropReason::NonEsp => "non_esp",
            DropReason::Duplicate => "duplicate",
            DropReason::NoSa => "no_sa",
            DropReason::NoEndpoint => "no_endpoint",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Traffic counters of one peer.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Packets sent to the peer.
    pub tx_packets: AtomicU64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: AtomicU64,
    /// Packets received from the peer and written to the TUN.
    pub rx_packets: AtomicU64,
    /// Inner bytes received from the peer.
    pub rx_bytes: AtomicU64,
    /// Time of the last packet from the peer (the caller's clock, nanoseconds; 0 = never).
    pub last_rx: AtomicU64,
    /// Time of the last packet to the peer.
    pub last_tx: AtomicU64,
    /// The inbound SA's highest authenticated sequence number (the replay window's top).
    pub replay_top: AtomicU64,
    /// ESP in UDP: the source port of the peer's last authenticated datagram (0: none yet).
    /// The outbound half sends to it instead of the configured port, so a NAT between the
    /// peers that maps the peer's port elsewhere is followed (RFC 3948 NAT traversal; the
    /// address must still be the configured endpoint).
    pub udp_port_seen: AtomicU32,
    /// A peer without a configured endpoint: the address (and UDP port) its last
    /// authenticated packet came from, which the outbound half sends to.
    pub learned: crate::endpoint::EndpointCell,
}

impl PeerStats {
    /// Fresh counters for a peer whose SA pair or endpoint changed at a reload: the traffic
    /// totals continue, what belonged to the old SAs (replay top, NAT-mapped port) starts over.
    fn continued_from(old: &PeerStats) -> PeerStats {
        let s = PeerStats::default();
        for (new, old) in [
            (&s.tx_packets, &old.tx_packets),
            (&s.tx_bytes, &old.tx_bytes),
            (&s.rx_packets, &old.rx_packets),
            (&s.rx_bytes, &old.rx_bytes),
            (&s.last_rx, &old.last_rx),
            (&s.last_tx, &old.last_tx),
        ] {
            new.store(old.load(Relaxed), Relaxed);
        }
        s.learned.copy_from(&old.learned);
        s
    }
}

/// Counters of the whole data path, shared by both directions and every generation of it
/// (they outlive reloads), read by the control side. Per-peer counters live with the peers
/// ([`Outbound::peer_stats`]).
#[derive(Debug, Default)]
pub struct Stats {
    drops: [AtomicU64; DropReason::ALL.len()],
    /// Packets relayed from one peer to another inside the daemon.
    pub relayed: AtomicU64,
}

impl Stats {
    /// Count one drop.
    pub fn count_drop(&self, r: DropReason) {
        self.drops[r.index()].fetch_add(1, Relaxed);
    }

    /// The current value of a drop counter.
    pub fn drops(&self, r: DropReason) -> u64 {
        self.drops[r.index()].load(Relaxed)
    }

    /// Every drop counter with its name.
    pub fn drop_counts(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (r.name(), self.drops(*r)))
            .collect()
    }
}

/// How a peer's packets are wrapped.
#[derive(Debug, Clone)]
pub enum EncapSpec {
    /// RFC 2003 / RFC 4213 IP-in-IP, no protection.
    IpIp,
    /// RFC 4303 ESP tunnel mode with one SA each way.
    Esp {
        /// Cipher of both SAs.
        cipher: Cipher,
        /// SPI we send with.
        spi_out: u32,
        /// Key || salt we send with.
        key_out: KeyMaterial,
        /// SPI we accept.
        spi_in: u32,
        /// Key || salt we accept.
        key_in: KeyMaterial,
        /// Replay window in packets (0 disables).
        replay_window: u32,
        /// 64-bit extended sequence numbers.
        esn: bool,
        /// Hard limits of each SA (Linux: `limit packet-hard / byte-hard / time-hard`).
        lifetime: Lifetime,
        /// UDP encapsulation (RFC 3948): the ESP packets travel in UDP datagrams to this port
        /// of the endpoint. `None`: bare IP protocol 50.
        udp_port: Option<u16>,
    },
    /// RFC 4303 ESP whose SAs IKEv2 negotiates, before it has (or after it lost) a CHILD_SA:
    /// the peer's packets are dropped (`no_sa`), never sent unprotected. The daemon replaces
    /// it with [`EncapSpec::Esp`] and [`PeerSpec::negotiated`] while a CHILD_SA exists.
    EspPending {
        /// As in [`EncapSpec::Esp`].
        udp_port: Option<u16>,
        /// As in [`EncapSpec::Esp`].
        replay_window: u32,
    },
}

impl EncapSpec {
    /// Bytes added in front of the inner packet besides ESP's own: the outer IP header (IPv4
    /// without options, or IPv6 without extension headers) and, for ESP in UDP, the UDP header.
    fn outer_len(&self, outer_v6: bool) -> usize {
        let ip = if outer_v6 {
            OUTER_IPV6_LEN
        } else {
            OUTER_IPV4_LEN
        };
        match self {
            EncapSpec::Esp {
                udp_port: Some(_), ..
            }
            | EncapSpec::EspPending {
                udp_port: Some(_), ..
            } => ip + OUTER_UDP_LEN,
            _ => ip,
        }
    }
}

/// Hard lifetime of an SA: when one limit is reached the SA stops (there is no key exchange
/// to rekey; the operator installs new keys and SPIs). `None`: no limit of that kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lifetime {
    /// Packets through the SA.
    pub packets: Option<u64>,
    /// Inner bytes through the SA.
    pub bytes: Option<u64>,
    /// Seconds since the SA was installed (the data path's clock origin).
    pub seconds: Option<u64>,
}

/// What an SA has used of its lifetime.
#[derive(Debug, Clone, Copy, Default)]
struct Used {
    packets: u64,
    bytes: u64,
}

/// What an outbound SA has used of its lifetime, shared by the threads that send on it.
#[derive(Debug, Default)]
struct SharedUsed {
    packets: AtomicU64,
    bytes: AtomicU64,
}

impl Lifetime {
    /// Would one more packet of `len` bytes at `now` (nanoseconds) exceed the lifetime?
    fn allows(&self, used: &Used, len: u64, now: u64) -> bool {
        self.allows_counts(used.packets, used.bytes, len, now)
    }

    fn allows_counts(&self, packets: u64, bytes: u64, len: u64, now: u64) -> bool {
        self.packets.map_or(true, |max| packets < max)
            && self
                .bytes
                .map_or(true, |max| bytes.saturating_add(len) <= max)
            && self
                .seconds
                .map_or(true, |max| now < max.saturating_mul(1_000_000_000))
    }

    /// Count one packet of `len` bytes against `used` and say whether it was within the
    /// lifetime: the counts are taken atomically, so two threads never both send the last
    /// allowed packet. A refused packet stays counted (the SA is at its end anyway).
    fn take(&self, used: &SharedUsed, len: u64, now: u64) -> bool {
        if self.packets.is_none() && self.bytes.is_none() && self.seconds.is_none() {
            return true;
        }
        let packets = used.packets.fetch_add(1, Relaxed);
        let bytes = used.bytes.fetch_add(len, Relaxed);
        self.allows_counts(packets, bytes, len, now)
    }
}

/// One peer as the core needs it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    /// Name for logs and status.
    pub name: String,
    /// Outer destination; `None`: learned from the peer's first authenticated packet and
    /// followed when it moves (static-key ESP only).
    pub endpoint: Option<IpAddr>,
    /// Inner prefixes routed to the peer and accepted from it.
    pub allowed_ips: Vec<Prefix>,
    /// Encapsulation.
    pub encap: EncapSpec,
    /// Whether kernel routes for `allowed_ips` are installed (false: accept-only, as for a relay
    /// that receives a client's upstream traffic but never sends it anything).
    pub route: bool,
    /// Several paths (`[[peer.path]]`); `None`: the one `endpoint`.
    pub multipath: Option<PeerPaths>,
    /// The SAs come from IKEv2: fresh keys that never outlive the process (no sequence
    /// number reservation on disk), and the older inbound SAs still accepted during a rekey
    /// (SPI, key, ESN). `None`: static keys from the configuration.
    pub negotiated: Option<Vec<(u32, KeyMaterial, bool)>>,
}

impl PeerSpec {
    /// Every outer address of the peer: its paths' endpoints, or its one endpoint.
    pub fn endpoints(&self) -> Vec<IpAddr> {
        match &self.multipath {
            Some(pp) => pp.paths.iter().map(|p| p.endpoint).collect(),
            None => self.endpoint.into_iter().collect(),
        }
    }

    /// The configured endpoint, or what stands for a learned one in messages.
    pub fn endpoint_text(&self) -> String {
        self.endpoint
            .map_or("(learned from its packets)".into(), |e| e.to_string())
    }

    /// One line saying what the peer is (for `espip check` and the start log; never a key):
    /// `ESP tunnel to 192.0.2.2 (aes-128-gcm, out SPI 0x00001001, ...)` or `IP-in-IP ... to`.
    /// `listen_port`: the local ESP-in-UDP port.
    pub fn describe(&self, listen_port: u16) -> String {
        match &self.encap {
            EncapSpec::Esp {
                cipher,
                spi_out,
                spi_in,
                replay_window,
                esn,
                udp_port,
                ..
            } => format!(
                "ESP tunnel to {} ({}, out SPI {spi_out:#010x}, in SPI {spi_in:#010x}, replay window {replay_window}, esn {esn})",
                match (udp_port, self.endpoint) {
                    (Some(port), Some(e)) => format!(
                        "{e}:{port} in UDP (RFC 3948, from local port {listen_port})"
                    ),
                    (Some(_), None) => format!(
                        "an address learned from its packets, in UDP (RFC 3948, local port {listen_port})"
                    ),
                    (None, Some(e)) => e.to_string(),
                    (None, None) => "an address learned from its packets".into(),
                },
                cipher.name()
            ),
            EncapSpec::IpIp => format!(
                "IP-in-IP (protocol 4/41, unencrypted) to {}",
                self.endpoint_text()
            ),
            EncapSpec::EspPending { udp_port, .. } => format!(
                "ESP tunnel to {}, keyed by IKEv2 (no CHILD_SA yet)",
                match udp_port {
                    Some(port) => format!("{}:{port} in UDP", self.endpoint_text()),
                    None => self.endpoint_text(),
                }
            ),
        }
    }
}

/// Tunnel-wide parameters.
#[derive(Debug, Clone, Copy)]
pub struct TunnelSpec {
    /// Relay packets from one peer to another inside the daemon (set with `forward`).
    pub relay: bool,
    /// Largest inner packet sent through the tunnel.
    pub mtu: u16,
}

/// Outer IPv4 header without options.
pub const OUTER_IPV4_LEN: usize = 20;
/// Outer IPv6 header without extension headers.
pub const OUTER_IPV6_LEN: usize = 40;
/// UDP header in front of UDP-encapsulated ESP.
pub const OUTER_UDP_LEN: usize = 8;

/// The largest inner packet that fits a path MTU of `path_mtu` with IPv4 (or, `outer_v6`,
/// IPv6) outer headers: IP-in-IP adds 20 (40) bytes; ESP adds 20 (40) (+ 8 of UDP when
/// encapsulated) + 8 (SPI, sequence) + 8 (IV) + 16 (ICV) and a 2-byte trailer, with the
/// ciphertext padded to 4 bytes (RFC 4303 section 2.4).
pub fn inner_mtu(path_mtu: u32, encap: &EncapSpec, outer_v6: bool) -> u16 {
    let path = path_mtu.min(65535) as usize;
    let room = match encap {
        EncapSpec::Esp { .. } | EncapSpec::EspPending { .. } => {
            let ct = path.saturating_sub(
                encap.outer_len(outer_v6)
                    + crate::wire::esp::field::PAYLOAD
                    + crate::wire::esp::ICV_LEN,
            );
            (ct / crate::wire::esp::ALIGN * crate::wire::esp::ALIGN)
                .saturating_sub(crate::wire::esp::TRAILER_LEN)
        }
        EncapSpec::IpIp => path.saturating_sub(encap.outer_len(outer_v6)),
    };
    room as u16
}

/// What the edge does with a packet after the core is done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the buffer the way `Wire` says.
    Send(Wire),
    /// Write the buffer to the TUN (a decapsulated packet or a generated ICMP error).
    ToTun,
    /// The decapsulated packet is for another peer (a hub relaying between clients): hand the
    /// buffer to [`Outbound::process`], which wraps it for that peer, without the local stack.
    Relay,
    /// Send the buffer on each path of a multipath peer whose bit is set in `mask`
    /// (`redundant`); [`Outbound::path_wire`] gives each path's `Wire`.
    SendEvery {
        /// The peer.
        peer: u16,
        /// Bit i: path i.
        mask: u32,
        /// The inner packet is IPv6 (IP-in-IP: protocol 41).
        inner_v6: bool,
    },
    /// A multipath probe arrived: the buffer holds the echo's payload; wrap it with
    /// [`Outbound::echo`] and send it to `to`.
    Echo {
        /// The peer.
        peer: u16,
        /// Where the probe came from (UDP port 0 for protocol 50).
        to: SocketAddr,
    },
    /// The packet waits in the peer's reorder stage; [`Inbound::release`] delivers it.
    Held,
    /// A control packet the core used (a multipath echo); nothing to do.
    Consumed,
    /// Drop; already counted.
    Drop(DropReason),
}

/// How and where an outer packet goes: what each transport needs, and nothing it does not
/// (the destination is an `IpAddr`, so an IPv6 outer needs no new variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The buffer is an ESP packet for IP protocol 50 (RFC 4303) to `dst`.
    Esp {
        /// Outer destination.
        dst: IpAddr,
    },
    /// The buffer is the payload of a UDP datagram to `dst` (ESP in UDP, RFC 3948).
    EspInUdp {
        /// Outer destination address and UDP port.
        dst: SocketAddr,
    },
    /// The buffer is the inner packet itself, for IP protocol 4 (IPv4 inside, RFC 2003) or 41
    /// (IPv6 inside, RFC 4213) to `dst`.
    IpIp {
        /// Outer destination.
        dst: IpAddr,
        /// The inner packet is IPv6 (protocol 41), else IPv4 (protocol 4).
        inner_v6: bool,
    },
}

impl Wire {
    /// The outer IP protocol number: 50, 17, 4 or 41.
    pub fn protocol(self) -> u8 {
        match self {
            Wire::Esp { .. } => PROTO_ESP,
            Wire::EspInUdp { .. } => PROTO_UDP,
            Wire::IpIp {
                inner_v6: false, ..
            } => PROTO_IPIP,
            Wire::IpIp { inner_v6: true, .. } => PROTO_IPV6,
        }
    }

    /// The outer destination address.
    pub fn dst_ip(self) -> IpAddr {
        match self {
            Wire::Esp { dst } | Wire::IpIp { dst, .. } => dst,
            Wire::EspInUdp { dst } => dst.ip(),
        }
    }
}

/// What makes an SA the same SA across a reload: the key (by fingerprint) under the same SPI,
/// cipher and sequence-number width. An SA that stays the same keeps its state (next
/// sequence number, replay window, lifetime used); any other change makes a new SA.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SaId {
    cipher: Cipher,
    spi: u32,
    key: String,
    esn: bool,
}

struct OutPeer {
    name: String,
    /// `None`: learned ([`PeerStats::learned`]).
    endpoint: Option<IpAddr>,
    /// UDP destination port of ESP in UDP; 0 for IP protocols 50, 4 and 41.
    port: u16,
    /// The SA and its identity; shared with the previous generation when it continues.
    sa: Option<(SaId, Arc<OutboundSa>)>,
    lifetime: Lifetime,
    used: Arc<SharedUsed>,
    stats: Arc<PeerStats>,
    /// Several paths (shared with the inbound half and the control side).
    mp: Option<Arc<Multipath>>,
    /// ESP keyed by IKEv2 without a CHILD_SA: drop (`no_sa`).
    keyless: bool,
    /// Keys negotiated by IKEv2 (no reservation on disk).
    negotiated: bool,
}

/// The TUN -> wire half. Shared by reference (`&self`): every per-packet change is an atomic
/// (sequence numbers, lifetime counts, counters), so the TX thread, a hub's relay and the
/// status snapshot use it without a lock.
///
/// A reload builds a new `Outbound` with [`rebuild`] from the old one: peers whose SA did not
/// change share it (one sequence counter for both generations), so the edge can swap the
/// whole half atomically while packets flow.
pub struct Outbound {
    routes: PrefixTable<usize>,
    nat: NatTable,
    peers: Vec<OutPeer>,
    tunnel: TunnelSpec,
    stats: Arc<Stats>,
}

struct InPeer {
    /// `None`: any source, learned once a packet authenticates.
    endpoint: Option<IpAddr>,
    /// The peer's ESP arrives in UDP (RFC 3948), not as protocol 50.
    udp: bool,
    sa: Option<(SaId, InboundSa)>,
    /// Older inbound SAs still accepted while IKEv2 rekeys.
    older: Vec<(SaId, InboundSa)>,
    lifetime: Lifetime,
    used: Used,
    stats: Arc<PeerStats>,
    mp: Option<InPaths>,
}

/// Where an authenticated packet came from.
struct Arrival {
    /// The peer.
    idx: usize,
    /// Its ESP sequence number (0: IP-in-IP).
    seq: u64,
    /// The peer's path it came by, if known.
    path: Option<usize>,
    /// UDP source port (0: not UDP).
    src_port: u16,
    /// Outer source address.
    outer_src: IpAddr,
}

/// A multipath peer's inbound state: the shared paths and the reorder stage (owned here).
struct InPaths {
    shared: Arc<Multipath>,
    reorder: Option<Reorder>,
}

impl InPaths {
    fn new(shared: Arc<Multipath>) -> InPaths {
        let s = shared.spec;
        let reorder = (s.reorder_ms > 0 && shared.paths.len() > 1)
            .then(|| Reorder::new(s.reorder_packets as usize, s.reorder_bytes as usize));
        InPaths { shared, reorder }
    }
}

/// The wire -> TUN half. Owned by one thread (`&mut self`: the replay windows); a reload hands
/// that thread a new `Inbound`, which takes over the state of the SAs that continue with
/// [`Inbound::adopt`].
pub struct Inbound {
    nat: NatTable,
    relay: bool,
    /// Source policy: inner source -> peer index.
    allowed: PrefixTable<usize>,
    /// SAD: SPI -> peer index.
    by_spi: HashMap<u32, usize>,
    /// IP-in-IP peers by outer address.
    by_endpoint: HashMap<IpAddr, usize>,
    peers: Vec<InPeer>,
    stats: Arc<Stats>,
}

/// Why a set of peers cannot form a data path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// Two peers claim the same prefix.
    #[error("allowed_ips {prefix} is claimed by both peer {first:?} and peer {second:?}; each prefix may belong to one peer")]
    DuplicatePrefix {
        /// The prefix.
        prefix: Prefix,
        /// First peer.
        first: String,
        /// Second peer.
        second: String,
    },
    /// Two peers accept the same SPI.
    #[error("spi_in {spi:#010x} is used by both peer {first:?} and peer {second:?}; inbound SPIs must be unique")]
    DuplicateSpi {
        /// The SPI.
        spi: u32,
        /// First peer.
        first: String,
        /// Second peer.
        second: String,
    },
    /// Two IP-in-IP peers share an endpoint.
    #[error("peers {first:?} and {second:?} both use ipip with endpoint {endpoint}; ipip tells peers apart by endpoint only")]
    DuplicateIpIpEndpoint {
        /// The endpoint.
        endpoint: IpAddr,
        /// First peer.
        first: String,
        /// Second peer.
        second: String,
    },
}

/// Build both halves of the data path and their shared counters.
pub fn build(
    peers: &[PeerSpec],
    tunnel: TunnelSpec,
    nat: NatTable,
) -> Result<(Outbound, Inbound, Arc<Stats>), BuildError> {
    let stats = Arc::new(Stats::default());
    let (out, inb) = build_with(peers, tunnel, nat, stats.clone(), None)?;
    Ok((out, inb, stats))
}

/// Build the next generation of the data path from `peers` (a reload). A peer of `prev` with
/// the same name keeps its counters; an SA whose SPI, key, cipher and ESN are unchanged is
/// the same SA (shared: its sequence numbers continue; the inbound side takes its replay
/// window over in [`Inbound::adopt`]). Changed and new SAs start fresh: the edge must reserve
/// their sequence numbers before the new generation sends.
pub fn rebuild(
    peers: &[PeerSpec],
    tunnel: TunnelSpec,
    nat: NatTable,
    prev: &Outbound,
) -> Result<(Outbound, Inbound), BuildError> {
    build_with(peers, tunnel, nat, prev.stats.clone(), Some(prev))
}

fn sa_ids(encap: &EncapSpec) -> Option<(SaId, SaId)> {
    match encap {
        EncapSpec::IpIp | EncapSpec::EspPending { .. } => None,
        EncapSpec::Esp {
            cipher,
            spi_out,
            key_out,
            spi_in,
            key_in,
            esn,
            ..
        } => Some((
            SaId {
                cipher: *cipher,
                spi: *spi_out,
                key: key_out.fingerprint(),
                esn: *esn,
            },
            SaId {
                cipher: *cipher,
                spi: *spi_in,
                key: key_in.fingerprint(),
                esn: *esn,
            },
        )),
    }
}

/// What a peer's encapsulation gives its two halves: ports, SAs, lifetime and keying.
struct EncapParts {
    port: u16,
    udp: bool,
    sa_out: Option<(SaId, Arc<OutboundSa>)>,
    used: Arc<SharedUsed>,
    sa_in: Option<(SaId, InboundSa)>,
    older: Vec<(SaId, InboundSa)>,
    lifetime: Lifetime,
    keyless: bool,
    negotiated: bool,
}

/// The maps an `Inbound` finds peers by, filled peer by peer with the duplicates refused.
#[derive(Default)]
struct Lookups {
    by_spi: HashMap<u32, usize>,
    by_endpoint: HashMap<IpAddr, usize>,
}

impl Lookups {
    /// Inbound SPI `spi` belongs to peer `i`.
    fn spi(&mut self, spi: u32, i: usize, peers: &[PeerSpec]) -> Result<(), BuildError> {
        match self.by_spi.insert(spi, i) {
            Some(j) => Err(BuildError::DuplicateSpi {
                spi,
                first: peers[j].name.clone(),
                second: peers[i].name.clone(),
            }),
            None => Ok(()),
        }
    }

    /// IP-in-IP from `endpoint` belongs to peer `i` (its own paths may share one).
    fn endpoint(
        &mut self,
        endpoint: IpAddr,
        i: usize,
        peers: &[PeerSpec],
    ) -> Result<(), BuildError> {
        match self.by_endpoint.insert(endpoint, i) {
            Some(j) if j != i => Err(BuildError::DuplicateIpIpEndpoint {
                endpoint,
                first: peers[j].name.clone(),
                second: peers[i].name.clone(),
            }),
            _ => Ok(()),
        }
    }
}

/// Peer `i`'s SAs and keying by its encapsulation; `kept`: its outbound SA of the previous
/// generation when the same one continues.
fn encap_parts(
    peers: &[PeerSpec],
    i: usize,
    kept: Option<(SaId, Arc<OutboundSa>, Arc<SharedUsed>)>,
    lookups: &mut Lookups,
) -> Result<EncapParts, BuildError> {
    let p = &peers[i];
    let keyless = |port: Option<u16>, keyless: bool| EncapParts {
        port: port.unwrap_or(0),
        udp: port.is_some(),
        sa_out: None,
        used: Arc::default(),
        sa_in: None,
        older: Vec::new(),
        lifetime: Lifetime::default(),
        keyless,
        negotiated: keyless,
    };
    match &p.encap {
        EncapSpec::IpIp => {
            for e in p.endpoints() {
                lookups.endpoint(e, i, peers)?;
            }
            Ok(keyless(None, false))
        }
        EncapSpec::EspPending { udp_port, .. } => Ok(keyless(*udp_port, true)),
        EncapSpec::Esp {
            spi_out,
            key_out,
            spi_in,
            key_in,
            replay_window,
            esn,
            lifetime,
            udp_port,
            ..
        } => {
            lookups.spi(*spi_in, i, peers)?;
            let (out_id, in_id) = sa_ids(&p.encap).expect("ESP has SA ids");
            let negotiated = p.negotiated.is_some();
            let (sa_out, used) = match kept {
                Some((id, sa, used)) => (Some((id, sa)), used),
                None => {
                    let sa = Arc::new(OutboundSa::new(*spi_out, key_out, *esn));
                    if negotiated {
                        // A key IKEv2 made for this process only: nothing to reserve.
                        sa.set_limit(u64::MAX);
                    }
                    (Some((out_id, sa)), Arc::default())
                }
            };
            let mut older = Vec::new();
            for (spi, key, esn) in p.negotiated.iter().flatten() {
                lookups.spi(*spi, i, peers)?;
                let id = SaId {
                    cipher: key.cipher(),
                    spi: *spi,
                    key: key.fingerprint(),
                    esn: *esn,
                };
                older.push((id, InboundSa::new(*spi, key, *esn, *replay_window)));
            }
            Ok(EncapParts {
                port: udp_port.unwrap_or(0),
                udp: udp_port.is_some(),
                sa_out,
                used,
                sa_in: Some((in_id, InboundSa::new(*spi_in, key_in, *esn, *replay_window))),
                older,
                lifetime: *lifetime,
                keyless: false,
                negotiated,
            })
        }
    }
}

fn build_with(
    peers: &[PeerSpec],
    tunnel: TunnelSpec,
    nat: NatTable,
    stats: Arc<Stats>,
    prev: Option<&Outbound>,
) -> Result<(Outbound, Inbound), BuildError> {
    let mut routes = PrefixTable::new();
    let mut lookups = Lookups::default();
    let mut out = Vec::new();
    let mut inp = Vec::new();
    for (i, p) in peers.iter().enumerate() {
        for prefix in &p.allowed_ips {
            if let Some(j) = routes.insert(*prefix, i) {
                return Err(BuildError::DuplicatePrefix {
                    prefix: *prefix,
                    first: peers[j].name.clone(),
                    second: p.name.clone(),
                });
            }
        }
        let ids = sa_ids(&p.encap);
        let old = prev.and_then(|o| o.peers.iter().find(|q| q.name == p.name));
        // The same outbound SA continues (its sequence counter and lifetime use with it).
        let kept = old.and_then(|q| match (&q.sa, &ids) {
            (Some((id, sa)), Some((out_id, _))) if id == out_id => {
                Some((id.clone(), sa.clone(), q.used.clone()))
            }
            _ => None,
        });
        let mp = p.multipath.as_ref().map(|pp| {
            Arc::new(Multipath::new(
                pp.spec,
                pp.paths.clone(),
                old.and_then(|q| q.mp.as_deref()),
            ))
        });
        let peer_stats = match old {
            Some(q) if q.endpoint == p.endpoint && (kept.is_some() || ids.is_none()) => {
                q.stats.clone()
            }
            Some(q) => Arc::new(PeerStats::continued_from(&q.stats)),
            None => Arc::new(PeerStats::default()),
        };
        let parts = encap_parts(peers, i, kept, &mut lookups)?;
        out.push(OutPeer {
            name: p.name.clone(),
            endpoint: p.endpoint,
            port: parts.port,
            sa: parts.sa_out,
            lifetime: parts.lifetime,
            used: parts.used,
            stats: peer_stats.clone(),
            mp: mp.clone(),
            keyless: parts.keyless,
            negotiated: parts.negotiated,
        });
        inp.push(InPeer {
            endpoint: p.endpoint,
            udp: parts.udp,
            sa: parts.sa_in,
            older: parts.older,
            lifetime: parts.lifetime,
            used: Used::default(),
            stats: peer_stats,
            mp: mp.map(InPaths::new),
        });
    }
    let outbound = Outbound {
        nat: nat.clone(),
        routes: routes.clone(),
        peers: out,
        tunnel,
        stats: stats.clone(),
    };
    let inbound = Inbound {
        nat,
        relay: tunnel.relay,
        allowed: routes,
        by_spi: lookups.by_spi,
        by_endpoint: lookups.by_endpoint,
        peers: inp,
        stats,
    };
    Ok((outbound, inbound))
}

impl Outbound {
    /// Process one inner packet read from the TUN. On `Send` the buffer holds the ESP packet
    /// (or the unchanged inner packet for IP-in-IP); on `ToTun` an ICMP error for the sender.
    pub fn process(&self, buf: &mut PacketBuf, now: u64) -> Verdict {
        let v = self.process_inner(buf, now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    fn process_inner(&self, buf: &mut PacketBuf, now: u64) -> Verdict {
        let Ok(inner) = InnerPacket::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        buf.truncate(inner.total_len);
        // The policy sees the real destination; a local DNAT may have moved it into an alias.
        let dst = self.nat.to_real(inner.dst).unwrap_or(inner.dst);
        let Some(&idx) = self.routes.lookup(dst) else {
            return Verdict::Drop(DropReason::NoRoute);
        };
        if buf.len() > usize::from(self.tunnel.mtu) {
            // Quote the packet as the local stack sent it, so its conntrack recognises it.
            return self.too_big(buf, &inner);
        }
        if self.nat.egress(buf.as_mut_slice()).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let len = buf.len() as u64;
        let peer = &self.peers[idx];
        if peer.keyless {
            return Verdict::Drop(DropReason::NoSa);
        }
        let s = &*peer.stats;
        // A peer whose address is learned: nothing to send to until it has sent (the port,
        // for ESP in UDP, is `udp_port_seen`, set by the same packet).
        let Some(endpoint) = peer.endpoint.or_else(|| s.learned.get().map(|a| a.ip())) else {
            return Verdict::Drop(DropReason::NoEndpoint);
        };
        let wire = match &peer.sa {
            Some((_, sa)) => {
                if !peer.lifetime.take(&peer.used, len, now) {
                    return Verdict::Drop(DropReason::LifetimeExpired);
                }
                let nh = if inner.is_ipv4() {
                    NEXT_HEADER_IPV4
                } else {
                    NEXT_HEADER_IPV6
                };
                match sa.encapsulate(buf, nh) {
                    Ok(_) if peer.mp.is_some() => {
                        return self.schedule(idx, len, !inner.is_ipv4(), now)
                    }
                    Ok(_) if peer.port != 0 => {
                        // The port the peer's last authenticated datagram came from wins.
                        let port = match s.udp_port_seen.load(Relaxed) {
                            0 => peer.port,
                            seen => seen as u16,
                        };
                        Wire::EspInUdp {
                            dst: SocketAddr::new(endpoint, port),
                        }
                    }
                    Ok(_) => Wire::Esp { dst: endpoint },
                    Err(EspError::SeqExhausted) => return Verdict::Drop(DropReason::SeqExhausted),
                    Err(EspError::SeqUnreserved) => {
                        return Verdict::Drop(DropReason::SeqUnreserved)
                    }
                    Err(_) => return Verdict::Drop(DropReason::Malformed),
                }
            }
            None if peer.mp.is_some() => return self.schedule(idx, len, !inner.is_ipv4(), now),
            None => Wire::IpIp {
                dst: endpoint,
                inner_v6: !inner.is_ipv4(),
            },
        };
        s.tx_packets.fetch_add(1, Relaxed);
        s.tx_bytes.fetch_add(len, Relaxed);
        s.last_tx.store(now, Relaxed);
        Verdict::Send(wire)
    }

    /// The verdict for a multipath peer's packet (already wrapped): the path(s) the schedule
    /// picks, with their counters.
    fn schedule(&self, idx: usize, len: u64, inner_v6: bool, now: u64) -> Verdict {
        let peer = &self.peers[idx];
        let mp = peer.mp.as_ref().expect("a multipath peer");
        let s = &*peer.stats;
        s.tx_packets.fetch_add(1, Relaxed);
        s.tx_bytes.fetch_add(len, Relaxed);
        s.last_tx.store(now, Relaxed);
        let count = |i: usize| {
            let p = &mp.stats[i];
            p.tx_packets.fetch_add(1, Relaxed);
            p.tx_bytes.fetch_add(len, Relaxed);
        };
        match mp.pick_at(now, len as usize) {
            Pick::One(i) => {
                count(i);
                Verdict::Send(self.path_wire(idx, i, inner_v6))
            }
            Pick::Every(mask) => {
                for i in (0..mp.paths.len()).filter(|i| mask & (1 << i) != 0) {
                    count(i);
                }
                if mask.count_ones() == 1 {
                    Verdict::Send(self.path_wire(idx, mask.trailing_zeros() as usize, inner_v6))
                } else {
                    Verdict::SendEvery {
                        peer: idx as u16,
                        mask,
                        inner_v6,
                    }
                }
            }
        }
    }

    /// Count `n` outer packets to `dst` that the kernel refused to send against the multipath
    /// path with that endpoint, if there is one (a path's endpoint is its own: paths of a peer
    /// have distinct destinations).
    pub fn count_refused(&self, dst: IpAddr, n: u64) {
        let path = self
            .peers
            .iter()
            .filter_map(|p| p.mp.as_ref())
            .find_map(|mp| {
                mp.paths
                    .iter()
                    .position(|x| x.endpoint == dst)
                    .map(|i| &mp.stats[i])
            });
        if let Some(p) = path {
            p.send_refused.fetch_add(n, Relaxed);
        }
    }

    /// How a packet for path `path` of multipath peer `peer` travels (ESP in UDP: to the port
    /// the path's last authenticated datagram came from, else the configured one).
    pub fn path_wire(&self, peer: usize, path: usize, inner_v6: bool) -> Wire {
        let p = &self.peers[peer];
        let (endpoint, port, seen) = match &p.mp {
            Some(mp) => {
                let x = &mp.paths[path];
                (
                    x.endpoint,
                    x.port,
                    mp.stats[path].udp_port_seen.load(Relaxed),
                )
            }
            None => (
                p.endpoint
                    .or_else(|| p.stats.learned.get().map(|a| a.ip()))
                    .unwrap_or(IpAddr::from([0, 0, 0, 0])),
                p.port,
                p.stats.udp_port_seen.load(Relaxed),
            ),
        };
        match (&p.sa, port) {
            (None, _) => Wire::IpIp {
                dst: endpoint,
                inner_v6,
            },
            (Some(_), 0) => Wire::Esp { dst: endpoint },
            (Some(_), port) => Wire::EspInUdp {
                dst: SocketAddr::new(endpoint, if seen == 0 { port } else { seen as u16 }),
            },
        }
    }

    /// The multipath control tick at `now` (every probe interval; `started`: when the data
    /// path started; a peer's tick does nothing until its probe interval is over): liveness and schedules of every multipath peer, and the probes to send
    /// (ESP dummy packets, authenticated by the peer's SA). Returns the state changes as
    /// (peer, path, state) and the probes, wrapped, with their wires.
    #[allow(clippy::type_complexity)]
    pub fn tick(
        &self,
        now: u64,
    ) -> (
        Vec<(usize, usize, crate::multipath::PathState)>,
        Vec<(PacketBuf, Wire)>,
    ) {
        let mut events = Vec::new();
        let mut out = Vec::new();
        for (idx, peer) in self.peers.iter().enumerate() {
            let (Some(mp), Some((_, sa))) = (&peer.mp, &peer.sa) else {
                // IP-in-IP has no SA to authenticate probes: its paths stay as configured.
                continue;
            };
            let (ev, mut probes) = mp.tick(now);
            events.extend(ev.into_iter().map(|e| (idx, e.path, e.state)));
            // The probe of a live path goes last and lists the others' sequence numbers, so
            // the peer does not wait for those that a dead path loses.
            let carrier = probes
                .iter()
                .position(|(i, _)| mp.stats[*i].state() == crate::multipath::PathState::Up);
            if let Some(c) = carrier {
                let last = probes.len() - 1;
                probes.swap(c, last);
            }
            let mut seqs = Vec::new();
            let count = probes.len();
            for (k, (path, mut probe)) in probes.into_iter().enumerate() {
                if carrier.is_some() && k == count - 1 {
                    for (slot, s) in probe.skip.iter_mut().zip(&seqs) {
                        *slot = *s;
                    }
                    probe.skipped = seqs.len().min(crate::multipath::MAX_PATHS) as u8;
                }
                if !peer.lifetime.take(&peer.used, probe.len() as u64, now) {
                    break;
                }
                let mut buf = PacketBuf::new(Probe::LEN + 8 * crate::multipath::MAX_PATHS);
                buf.reset();
                probe.emit(&mut buf.read_area()[..probe.len()]);
                buf.set_len(probe.len());
                if let Ok(seq) = sa.encapsulate(&mut buf, NEXT_HEADER_DUMMY) {
                    seqs.push(seq);
                    out.push((buf, self.path_wire(idx, path, false)));
                }
            }
        }
        (events, out)
    }

    /// Wrap the echo payload in `buf` (left there by [`Inbound::process`] with
    /// [`Verdict::Echo`]) for `peer` and say where it goes: back to where the probe came from.
    pub fn echo(&self, peer: usize, buf: &mut PacketBuf, to: SocketAddr, now: u64) -> Verdict {
        let Some(p) = self.peers.get(peer) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        let Some((_, sa)) = &p.sa else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if !p.lifetime.take(&p.used, buf.len() as u64, now) {
            return Verdict::Drop(DropReason::LifetimeExpired);
        }
        match sa.encapsulate(buf, NEXT_HEADER_DUMMY) {
            Ok(_) if p.port != 0 => Verdict::Send(Wire::EspInUdp { dst: to }),
            Ok(_) => Verdict::Send(Wire::Esp { dst: to.ip() }),
            Err(EspError::SeqExhausted) => Verdict::Drop(DropReason::SeqExhausted),
            Err(EspError::SeqUnreserved) => Verdict::Drop(DropReason::SeqUnreserved),
            Err(_) => Verdict::Drop(DropReason::Malformed),
        }
    }

    /// Multipath peer `idx`'s shared path state (`None`: a single-path peer).
    pub fn multipath(&self, idx: usize) -> Option<&Arc<Multipath>> {
        self.peers.get(idx)?.mp.as_ref()
    }

    fn too_big(&self, buf: &mut PacketBuf, inner: &InnerPacket) -> Verdict {
        let mtu = self.tunnel.mtu;
        let made = match inner.src {
            IpAddr::V4(_) if !inner.dont_fragment => {
                // The sender allowed fragmentation; the inner packet is larger than the tunnel
                // MTU only when the TUN MTU was raised by hand. Refuse rather than fragment.
                Err(icmp::NoIcmp::Forbidden)
            }
            // The source is the packet's own destination, as if the tunnel's far end were the
            // router that could not forward it. The TUN's own address would be a local source
            // arriving from outside, which Linux discards as a martian (so a local sender
            // would never learn the path MTU); the destination is routed through the TUN, so
            // the reverse-path filter accepts it.
            IpAddr::V4(_) => match inner.dst {
                IpAddr::V4(d) => icmp::frag_needed_v4(buf, d, mtu),
                IpAddr::V6(_) => Err(icmp::NoIcmp::Malformed),
            },
            IpAddr::V6(_) => match inner.dst {
                IpAddr::V6(d) => icmp::packet_too_big_v6(buf, d, u32::from(mtu)),
                IpAddr::V4(_) => Err(icmp::NoIcmp::Malformed),
            },
        };
        match made {
            Ok(()) => {
                // The packet is dropped all the same: count it here, since `ToTun` is not
                // counted by `process`.
                self.stats.count_drop(DropReason::TooBig);
                Verdict::ToTun
            }
            Err(_) => Verdict::Drop(DropReason::TooBig),
        }
    }

    /// The outbound SA state of each peer: (SPI, next sequence number), `None` for IP-in-IP.
    pub fn sa_state(&self) -> Vec<Option<(u32, u64)>> {
        self.peers
            .iter()
            .map(|p| p.sa.as_ref().map(|(_, s)| (s.spi(), s.next_seq())))
            .collect()
    }

    /// Peer `idx`'s outbound SA, static or negotiated: (next sequence number, the
    /// reservation's limit for a static SA; `None` for a negotiated one, whose fresh keys
    /// need none).
    pub fn sa_sequence(&self, idx: usize) -> Option<(u64, Option<u64>)> {
        let p = self.peers.get(idx)?;
        let (_, sa) = p.sa.as_ref()?;
        Some((sa.next_seq(), (!p.negotiated).then(|| sa.limit())))
    }

    /// Peer `idx`'s outbound SA: (SPI, key fingerprint, next sequence number, limit).
    pub fn sa_reservation(&self, idx: usize) -> Option<(u32, &str, u64, u64)> {
        let p = self.peers.get(idx)?;
        if p.negotiated {
            return None;
        }
        let (_, sa) = p.sa.as_ref()?;
        Some((sa.spi(), sa.key_fingerprint(), sa.next_seq(), sa.limit()))
    }

    /// Whether peer `idx`'s outbound SA is the very SA of `prev` (continued by a reload,
    /// its sequence numbers already reserved) rather than a new one.
    pub fn sa_continues(&self, idx: usize, prev: &Outbound) -> bool {
        let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) else {
            return false;
        };
        prev.peers
            .iter()
            .any(|q| q.sa.as_ref().is_some_and(|(_, o)| Arc::ptr_eq(o, sa)))
    }

    /// Peer `idx`'s counters (peers are indexed as given to [`build`] or [`rebuild`]).
    pub fn peer_stats(&self, idx: usize) -> &PeerStats {
        &self.peers[idx].stats
    }

    /// The counters of the whole data path.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Number of peers.
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Allow peer `idx`'s outbound SA to send up to sequence number `limit`.
    pub fn set_limit(&self, idx: usize, limit: u64) {
        if let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) {
            sa.set_limit(limit);
        }
    }

    /// Continue peer `idx`'s outbound SA from sequence number `seq` (tests, restarts).
    pub fn set_next_seq(&self, idx: usize, seq: u64) {
        if let Some((_, sa)) = self.peers.get(idx).and_then(|p| p.sa.as_ref()) {
            sa.set_next_seq(seq);
        }
    }
}

impl Inbound {
    /// Process one packet from a raw socket (`buf` holds what follows the outer IP header;
    /// `outer_src` and `protocol` come from that header) or one datagram from the ESP-in-UDP
    /// socket (`buf` holds the UDP payload, `protocol` is 17). On `ToTun` the buffer holds the
    /// inner packet.
    pub fn process(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        now: u64,
    ) -> Verdict {
        let v = self.process_inner(buf, outer_src, protocol, 0, now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    /// Process the payload of one UDP datagram from `from` (ESP in UDP, RFC 3948). Once it
    /// authenticates, its source port becomes the one the peer's packets go to.
    pub fn process_udp(&mut self, buf: &mut PacketBuf, from: SocketAddr, now: u64) -> Verdict {
        let v = self.process_inner(buf, from.ip(), PROTO_UDP, from.port(), now);
        if let Verdict::Drop(r) = v {
            self.stats.count_drop(r);
        }
        v
    }

    fn process_inner(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        src_port: u16,
        now: u64,
    ) -> Verdict {
        if protocol == PROTO_UDP {
            // RFC 3948 section 2: what is on the port besides ESP.
            match buf.as_slice() {
                [0xff] => return Verdict::Drop(DropReason::NatKeepalive),
                [0, 0, 0, 0, ..] => return Verdict::Drop(DropReason::NonEsp),
                _ => {}
            }
        }
        let (idx, next_header, seq, path) = match protocol {
            PROTO_ESP | PROTO_UDP => match self.open_esp(buf, outer_src, protocol, src_port, now) {
                Ok(x) => x,
                Err(r) => return Verdict::Drop(r),
            },
            PROTO_IPIP | PROTO_IPV6 => {
                let Some(&idx) = self.by_endpoint.get(&outer_src) else {
                    return Verdict::Drop(DropReason::UnknownPeer);
                };
                let path = self.peers[idx]
                    .mp
                    .as_ref()
                    .and_then(|m| m.shared.path_from(outer_src));
                (idx, protocol, 0, path)
            }
            _ => return Verdict::Drop(DropReason::Malformed),
        };
        let arrival = Arrival {
            idx,
            seq,
            path,
            src_port,
            outer_src,
        };
        let v = self.deliver(buf, &arrival, next_header, now);
        self.reorder(buf, (idx, seq, path), v, now)
    }

    /// Step 1 of an ESP packet (RFC 4303 section 3.4): its SA by SPI, the source check, the
    /// lifetime, then ICV and replay window; on success the peer's port and (for a learned
    /// endpoint) address follow the packet. The peer's index, the next header, the sequence
    /// number and the path it came on.
    #[inline]
    fn open_esp(
        &mut self,
        buf: &mut PacketBuf,
        outer_src: IpAddr,
        protocol: u8,
        src_port: u16,
        now: u64,
    ) -> Result<(usize, u8, u64, Option<usize>), DropReason> {
        let Some(spi) = buf.as_slice().get(..4) else {
            return Err(DropReason::Malformed);
        };
        let spi = u32::from_be_bytes(spi.try_into().expect("4 bytes"));
        let Some(&idx) = self.by_spi.get(&spi) else {
            return Err(DropReason::UnknownSpi);
        };
        let peer = &mut self.peers[idx];
        let path = match &peer.mp {
            Some(mp) => mp.shared.path_from(outer_src),
            // A peer whose address is learned may send from anywhere: the ICV and the
            // replay window decide, and only then does its address move (below).
            None => peer.endpoint.map_or(true, |e| e == outer_src).then_some(0),
        };
        if path.is_none() || peer.udp != (protocol == PROTO_UDP) {
            return Err(DropReason::WrongSource);
        }
        let sa = match peer.sa.as_mut() {
            Some((_, sa)) if sa.spi() == spi => sa,
            _ => match peer.older.iter_mut().find(|(id, _)| id.spi == spi) {
                Some((_, sa)) => sa,
                None => return Err(DropReason::UnknownSpi),
            },
        };
        // Checked before decryption against what was used so far (the inner length is
        // known only after it); counted with the inner length once it verified.
        if !peer.lifetime.allows(&peer.used, 0, now) {
            return Err(DropReason::LifetimeExpired);
        }
        match sa.decapsulate(buf) {
            Ok(o) => {
                if protocol == PROTO_UDP && src_port != 0 {
                    // Authenticated and new (replay checked): the peer's current port
                    // (on this path).
                    let seen = match (&peer.mp, path) {
                        (Some(mp), Some(i)) => &mp.shared.stats[i].udp_port_seen,
                        _ => &peer.stats.udp_port_seen,
                    };
                    if seen.load(Relaxed) != u32::from(src_port) {
                        seen.store(u32::from(src_port), Relaxed);
                    }
                }
                if peer.endpoint.is_none() && peer.mp.is_none() {
                    // Authenticated and not a replay: the peer is here now.
                    peer.stats
                        .learned
                        .learn(SocketAddr::new(outer_src, src_port), now);
                }
                peer.used.packets += 1;
                peer.used.bytes += buf.len() as u64;
                peer.stats.replay_top.store(sa.replay().top(), Relaxed);
                Ok((idx, o.next_header, o.seq, path))
            }
            Err(EspError::Malformed) => Err(DropReason::Malformed),
            // A `redundant` multipath peer's copies have the same sequence number;
            // any other peer's repeated number is a replay.
            Err(EspError::Replay(crate::replay::ReplayError::Duplicate))
                if peer.mp.as_ref().is_some_and(|m| {
                    m.shared.spec.scheduler == crate::multipath::Scheduler::Redundant
                }) =>
            {
                Err(DropReason::Duplicate)
            }
            Err(EspError::Replay(_)) => Err(DropReason::Replay),
            Err(EspError::BadIcv) => Err(DropReason::BadIcv),
            Err(EspError::BadPadding) => Err(DropReason::BadPadding),
            Err(EspError::SeqExhausted | EspError::SeqUnreserved) => Err(DropReason::Malformed),
        }
    }

    /// A multipath peer's sequence numbers go through the reorder stage: what is for this
    /// host (`v` is `ToTun`) may wait for a gap ahead of it; anything else only takes its
    /// place in the order. Other peers' verdicts pass unchanged.
    #[inline]
    fn reorder(
        &mut self,
        buf: &PacketBuf,
        arrival: (usize, u64, Option<usize>),
        v: Verdict,
        now: u64,
    ) -> Verdict {
        let (idx, seq, path) = arrival;
        let InPeer { mp, .. } = &mut self.peers[idx];
        match (mp, v) {
            (
                Some(InPaths {
                    shared,
                    reorder: Some(r),
                }),
                v,
            ) if seq != 0 => {
                let hold = shared.hold_ns();
                r.set_live(shared.live_mask());
                if let Some(p) = path {
                    r.note(p, seq, now, 2 * hold);
                }
                let data = (v == Verdict::ToTun).then(|| buf.as_slice());
                match (r.offer(seq, data, now, hold, &shared.reorder), v) {
                    (crate::multipath::Order::Held, Verdict::ToTun) => Verdict::Held,
                    (_, v) => v,
                }
            }
            (_, v) => v,
        }
    }

    /// Steps 2-4 of an authenticated packet: probes, the inner packet's checks, NAT, counters.
    fn deliver(&mut self, buf: &mut PacketBuf, a: &Arrival, next_header: u8, now: u64) -> Verdict {
        let (idx, path) = (a.idx, a.path);
        if let (Some(mp), Some(i)) = (&self.peers[idx].mp, path) {
            // The path works on the way back (the quiet rule's second witness).
            mp.shared.stats[i].heard.store(now, Relaxed);
        }
        let want_v4 = match next_header {
            NEXT_HEADER_IPV4 => true,
            NEXT_HEADER_IPV6 => false,
            NEXT_HEADER_DUMMY => return self.dummy(buf, a, now),
            _ => return Verdict::Drop(DropReason::BadNextHeader),
        };
        let Ok(inner) = InnerPacket::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Malformed);
        };
        if inner.is_ipv4() != want_v4 {
            return Verdict::Drop(DropReason::BadNextHeader);
        }
        // Bytes after the inner packet are TFC padding (RFC 4303 section 2.7).
        buf.truncate(inner.total_len);
        if let (Some(mp), Some(i)) = (&self.peers[idx].mp, path) {
            // What the path delivered, reported back in echoes (before the policy: the sender
            // counted it when it sent it).
            let p = &mp.shared.stats[i];
            p.rx_packets.fetch_add(1, Relaxed);
            p.rx_bytes.fetch_add(buf.len() as u64, Relaxed);
        }
        if self.allowed.lookup(inner.src) != Some(&idx) {
            return Verdict::Drop(DropReason::NotAllowed);
        }
        // Checked against the real source above; the local stack sees the alias.
        if self.nat.ingress(buf.as_mut_slice()).is_err() {
            return Verdict::Drop(DropReason::Malformed);
        }
        let s = &self.peers[idx].stats;
        s.rx_packets.fetch_add(1, Relaxed);
        s.rx_bytes.fetch_add(buf.len() as u64, Relaxed);
        s.last_rx.store(now, Relaxed);
        if self.relay {
            let dst = self.nat.to_real(inner.dst).unwrap_or(inner.dst);
            if matches!(self.allowed.lookup(dst), Some(&to) if to != idx) {
                self.stats.relayed.fetch_add(1, Relaxed);
                return Verdict::Relay;
            }
        }
        Verdict::ToTun
    }

    /// An authenticated dummy packet (next header 59): a multipath probe (answered), an echo
    /// (the path's RTT and liveness), or anything else (discarded, RFC 4303 section 2.6).
    fn dummy(&mut self, buf: &mut PacketBuf, a: &Arrival, now: u64) -> Verdict {
        let peer = &mut self.peers[a.idx];
        let Some(InPaths { shared, reorder }) = &mut peer.mp else {
            return Verdict::Drop(DropReason::Dummy);
        };
        let Some(probe) = Probe::parse(buf.as_slice()) else {
            return Verdict::Drop(DropReason::Dummy);
        };
        peer.stats.last_rx.store(now, Relaxed);
        match probe.kind {
            ProbeKind::Echo => {
                shared.echoed(&probe, now);
                Verdict::Consumed
            }
            ProbeKind::Probe => {
                let rx_bytes = a.path.map_or(0, |i| shared.stats[i].rx_bytes.load(Relaxed));
                // The probes of this round on other paths came before this one (lower
                // sequence numbers, at most one per path): not waited for if they are lost.
                if let Some(r) = reorder {
                    for s in probe.skipped() {
                        if *s < a.seq && a.seq - *s <= crate::multipath::MAX_PATHS as u64 * 4 {
                            r.forget(*s);
                        }
                    }
                }
                let echo = Probe {
                    tx_bytes: probe.tx_bytes,
                    ..Probe::new(ProbeKind::Echo, probe.path, probe.id, probe.sent, rx_bytes)
                };
                buf.truncate(0);
                let Some(room) = buf.push_back(echo.len()) else {
                    return Verdict::Drop(DropReason::Malformed);
                };
                echo.emit(room);
                Verdict::Echo {
                    peer: a.idx as u16,
                    to: SocketAddr::new(a.outer_src, a.src_port),
                }
            }
        }
    }

    /// Deliver, in order, up to `limit` packets of the reorder stages whose turn has come at
    /// `now` (the gap ahead of them filled, or their hold time passed); `deliver` gets each
    /// one. Returns how many; call again while it returns `limit`.
    pub fn release(&mut self, now: u64, limit: usize, mut deliver: impl FnMut(&[u8])) -> usize {
        let mut n = 0;
        for p in &mut self.peers {
            if let Some(InPaths {
                shared,
                reorder: Some(r),
            }) = &mut p.mp
            {
                r.set_live(shared.live_mask());
                if n < limit && r.ready(now) {
                    n += r.release(now, &shared.reorder, limit - n, &mut deliver);
                }
            }
        }
        n
    }

    /// When the next held packet must be released (`None`: nothing held).
    pub fn next_release(&self) -> Option<u64> {
        self.peers
            .iter()
            .filter_map(|p| p.mp.as_ref()?.reorder.as_ref()?.deadline())
            .min()
    }

    /// The inbound SA state of each peer: (SPI, highest sequence number seen), `None` for IP-in-IP.
    pub fn sa_state(&self) -> Vec<Option<(u32, u64)>> {
        self.peers
            .iter()
            .map(|p| p.sa.as_ref().map(|(_, s)| (s.spi(), s.replay().top())))
            .collect()
    }

    /// Take over the state of `old`'s inbound SAs that continue in `self` (same SPI, key,
    /// cipher and ESN): their replay windows and lifetime use, so a reload neither re-opens
    /// the window to replays nor forgets what was received. Called by the thread that owns
    /// both, between two batches; `old` is left with fresh state and is dropped after.
    pub fn adopt(&mut self, old: &mut Inbound) {
        for peer in &mut self.peers {
            let mut took_used = false;
            for (primary, (id, sa)) in peer
                .sa
                .iter_mut()
                .map(|x| (true, x))
                .chain(peer.older.iter_mut().map(|x| (false, x)))
            {
                let Some(&j) = old.by_spi.get(&id.spi) else {
                    continue;
                };
                let prev = &mut old.peers[j];
                // The same SA may have been the primary or an older one (a rekey moves it).
                let found = prev
                    .sa
                    .iter_mut()
                    .chain(prev.older.iter_mut())
                    .find(|(old_id, _)| old_id == id);
                if let Some((_, old_sa)) = found {
                    std::mem::swap(sa, old_sa);
                    if primary {
                        peer.stats.replay_top.store(sa.replay().top(), Relaxed);
                    }
                    if !took_used {
                        std::mem::swap(&mut peer.used, &mut prev.used);
                        took_used = true;
                    }
                }
            }
        }
    }
}

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

mod build;
mod inbound;
mod outbound;

use crate::buf::PacketBuf;
use crate::multipath::{Multipath, PeerPaths, Pick, Probe, ProbeKind, Reorder};
use crate::nat::NatTable;
use crate::prefix::{Prefix, PrefixTable};
use crate::sa::{Cipher, EspError, InboundSa, KeyMaterial, OutboundSa};
use crate::wire::esp::{NEXT_HEADER_DUMMY, NEXT_HEADER_IPV4, NEXT_HEADER_IPV6};
use crate::wire::icmp;
use crate::wire::ip::{InnerPacket, PROTO_ESP, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use build::build_with;
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
    /// An authenticated packet from a new (address, port) of a peer whose `max_paths` paths
    /// are all live: it would be one path too many.
    PathLimit,
}

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [DropReason; 21] = [
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
        DropReason::PathLimit,
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
            DropReason::PathLimit => "path_limit",
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
    /// ESP: the address of ours the peer's last authenticated packet was sent to, which our
    /// packets to it leave from (port 0; see `PathStats::reply_from`). Empty: the routed
    /// source.
    pub reply_from: crate::endpoint::ReplySource,
}

impl PeerStats {
    /// How packets to the peer leave: from the address it last reached us at, if known.
    pub fn reply_via(&self) -> Via {
        Via {
            src: self.reply_from.get(),
            ifindex: 0,
        }
    }

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
        s.reply_from.copy_from(&old.reply_from);
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
            // (Learned paths have none to name.)
            Some(pp) => pp
                .paths
                .iter()
                .filter(|p| !p.learned)
                .map(|p| p.endpoint)
                .collect(),
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
        /// The source and interface of the path it came by (the echo leaves the same way).
        via: Via,
    },
    /// A multipath peer asks for lost packets again: the buffer holds its request
    /// ([`crate::multipath::Nack`]); [`Outbound::repair`] gives the packets to send.
    Repair {
        /// The peer.
        peer: u16,
    },
    /// The packet waits in the peer's reorder stage; [`Inbound::release`] delivers it.
    Held,
    /// A control packet the core used (a multipath echo); nothing to do.
    Consumed,
    /// Drop; already counted.
    Drop(DropReason),
}

/// Which source address and interface an outer packet leaves by: a multipath path's `local`
/// and `device` (so two paths to one peer address leave by two uplinks, without policy
/// routing); [`Via::ROUTED`]: the kernel's routing decides, as for every single-path peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Via {
    /// Source address (`IP_PKTINFO`'s `ipi_spec_dst`, `IPV6_PKTINFO`'s `ipi6_addr`).
    pub src: Option<IpAddr>,
    /// Outgoing interface index (0: any).
    pub ifindex: u32,
}

impl Via {
    /// Routing alone decides.
    pub const ROUTED: Via = Via {
        src: None,
        ifindex: 0,
    };

    /// Whether routing alone decides.
    pub fn is_routed(self) -> bool {
        self == Via::ROUTED
    }
}

/// Where an outer packet arrived, as far as the edge knows: its destination address (one of
/// this host's) and the interface it came in on (0: not known). Tells apart the paths of a
/// multipath peer that share the peer's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Landing {
    /// The outer destination address.
    pub dst: Option<IpAddr>,
    /// The interface index it arrived on (0: not known).
    pub ifindex: u32,
}

impl Landing {
    /// Nothing known.
    pub const UNKNOWN: Landing = Landing {
        dst: None,
        ifindex: 0,
    };

    /// The address to answer from: the destination, when it is one a packet can leave from
    /// without naming an interface (unicast, not IPv6 link-local).
    pub fn reply_source(&self) -> Option<IpAddr> {
        self.dst.filter(|a| match a {
            IpAddr::V4(a) => !(a.is_unspecified() || a.is_multicast() || a.is_broadcast()),
            IpAddr::V6(a) => {
                !(a.is_unspecified() || a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80)
            }
        })
    }
}

/// How and where an outer packet goes: what each transport needs, and nothing it does not
/// (the destination is an `IpAddr`, so an IPv6 outer needs no new variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// The buffer is an ESP packet for IP protocol 50 (RFC 4303) to `dst`.
    Esp {
        /// Outer destination.
        dst: IpAddr,
        /// Source and interface ([`Via::ROUTED`] unless a path sets them).
        via: Via,
    },
    /// The buffer is the payload of a UDP datagram to `dst` (ESP in UDP, RFC 3948).
    EspInUdp {
        /// Outer destination address and UDP port.
        dst: SocketAddr,
        /// Source and interface.
        via: Via,
    },
    /// The buffer is the inner packet itself, for IP protocol 4 (IPv4 inside, RFC 2003) or 41
    /// (IPv6 inside, RFC 4213) to `dst`.
    IpIp {
        /// Outer destination.
        dst: IpAddr,
        /// The inner packet is IPv6 (protocol 41), else IPv4 (protocol 4).
        inner_v6: bool,
        /// Source and interface.
        via: Via,
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
            Wire::Esp { dst, .. } | Wire::IpIp { dst, .. } => dst,
            Wire::EspInUdp { dst, .. } => dst.ip(),
        }
    }

    /// The source and interface it leaves by.
    pub fn via(self) -> Via {
        match self {
            Wire::Esp { via, .. } | Wire::IpIp { via, .. } | Wire::EspInUdp { via, .. } => via,
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
    /// The peer's name (a reload's new generation finds its predecessor by it).
    name: String,
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
    /// Its SA's SPI, and whether that SA holds the peer's newest keys (IP-in-IP: 0, true).
    sa: (u32, bool),
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

//! What `espip show` prints and the metrics endpoint serves: one snapshot type, rendered as
//! text (like `wg show`), JSON (the control socket's wire format) or the Prometheus text
//! exposition format (version 0.0.4).

mod metrics;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::AtomicU64;

/// A snapshot of a running daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// The interface.
    pub interface: InterfaceStatus,
    /// Each peer, in configuration order.
    pub peers: Vec<PeerStatus>,
    /// Every drop reason with its count (zeros included), named as in docs/configuration.md.
    pub drops: BTreeMap<String, u64>,
    /// Errors at the kernel edges: `tun_read`, `tun_write`, `send`, `bad_outer`.
    pub errors: BTreeMap<String, u64>,
    /// Packets relayed from one peer to another (hub).
    pub relayed: u64,
    /// The capture taps, when configured.
    pub capture: Option<CaptureStatus>,
    /// Offload work: `tso_in`, `uso_in` (large packets read and segmented), `udp_gso_out`,
    /// `udp_gro_in` (ESP-in-UDP trains sent / received as one message), `gro_out`
    /// (coalesced packets written), `ipip_gro_in` (IP-in-IP packets the kernel's GRO merged,
    /// cut back).
    #[serde(default)]
    pub offload: BTreeMap<String, u64>,
    /// Packets the kernel dropped before espip saw them: `tun_tx_queue` (routed into the TUN
    /// and found its queue full: espip reads slower than the senders write), `tun_rx` (writes
    /// to the TUN the kernel refused), `socket_rcvbuf` (a raw or UDP socket's receive buffer
    /// was full).
    #[serde(default)]
    pub kernel_drops: BTreeMap<String, u64>,
    /// IKEv2: one entry per `keying = "ikev2"` peer.
    #[serde(default)]
    pub ike: Vec<IkePeerStatus>,
    /// The network namespace the daemon runs in, when `espip show` found it from another
    /// one (its name in /run/netns, or `inode N`); set by the client, not the daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// The IKEv2 state of one peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IkePeerStatus {
    /// The peer.
    pub peer: String,
    /// "initiator" or "responder".
    pub role: String,
    /// Our identity.
    pub local_id: String,
    /// The peer's identity.
    pub remote_id: String,
    /// IKE SAs and CHILD_SAs.
    pub sas: Vec<IkeSaStatus>,
    /// IKE SAs established.
    pub established: u64,
    /// CHILD_SA rekeys.
    pub child_rekeys: u64,
    /// IKE SA rekeys.
    pub ike_rekeys: u64,
    /// Requests sent (first transmissions).
    pub requests: u64,
    /// Retransmissions.
    pub retransmits: u64,
    /// Requests answered.
    pub responses: u64,
    /// Failures and dropped messages by reason (RFC notify names, or `bad_icv`,
    /// `invalid_message_id`, `unknown_ike_spi`, `peer_dead`, ...).
    pub failures: BTreeMap<String, u64>,
    /// The current IKE SA negotiated MOBIKE (RFC 4555).
    #[serde(default)]
    pub mobike: bool,
    /// MOBIKE address updates (UPDATE_SA_ADDRESSES answered, or sent and answered).
    #[serde(default)]
    pub address_updates: u64,
    /// Where the current IKE SA reaches the peer (address:port).
    #[serde(default)]
    pub peer_address: Option<String>,
}

/// One IKE SA or CHILD_SA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IkeSaStatus {
    /// "ike" or "child".
    pub kind: String,
    /// The SPIs: `SPIi_i SPIr_r` (IKE), `in_i out_o` (CHILD).
    pub spis: String,
    /// State.
    pub state: String,
    /// The proposal in strongSwan's notation.
    pub proposal: String,
    /// Age in seconds.
    pub age_s: f64,
    /// Seconds to the next rekey.
    pub rekey_in_s: Option<f64>,
}

/// The TUN interface.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Device name.
    pub name: String,
    /// Tunnel MTU.
    pub mtu: u16,
    /// Addresses on the TUN.
    pub addresses: Vec<String>,
    /// Configured outer source address, if any.
    pub local: Option<String>,
    /// Start time, seconds since the Unix epoch.
    pub started_unix: f64,
    /// Seconds since the start.
    pub uptime_seconds: f64,
    /// espip's version.
    pub version: String,
    /// The configuration's generation: 1 at start, one more per applied reload.
    #[serde(default)]
    pub generation: u64,
}

/// One peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Configured name.
    pub name: String,
    /// Outer address (with the UDP port for ESP in UDP); for a peer without a configured
    /// endpoint, the one learned from its last authenticated packet, or `(none yet)`.
    pub endpoint: String,
    /// The endpoint is learned (no `endpoint` in the configuration) and follows the peer.
    #[serde(default)]
    pub endpoint_learned: bool,
    /// A learned endpoint: when it was learned or last moved, Unix time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_changed_unix: Option<f64>,
    /// A learned endpoint: how often it moved after it was first learned.
    #[serde(default)]
    pub endpoint_moves: u64,
    /// `esp` or `ipip`.
    pub mode: String,
    /// Inner prefixes routed to / accepted from the peer.
    pub allowed_ips: Vec<String>,
    /// Outbound SA (ESP only).
    pub sa_out: Option<SaOut>,
    /// Inbound SA (ESP only).
    pub sa_in: Option<SaIn>,
    /// Packets sent to the peer.
    pub tx_packets: u64,
    /// Inner bytes sent to the peer.
    pub tx_bytes: u64,
    /// Packets received from the peer and delivered.
    pub rx_packets: u64,
    /// Inner bytes received from the peer.
    pub rx_bytes: u64,
    /// Time of the last packet sent (Unix seconds), `None` before the first.
    pub last_tx_unix: Option<f64>,
    /// Time of the last packet received and delivered.
    pub last_rx_unix: Option<f64>,
    /// A multipath peer's paths and scheduler (`None`: one endpoint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipath: Option<MultipathStatus>,
}

/// A multipath peer's paths and receiver reordering.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultipathStatus {
    /// `spread`, `failover` or `redundant`.
    pub scheduler: String,
    /// The paths, in configured order.
    pub paths: Vec<PathStatus>,
    /// Packets that waited in the reorder stage for a gap ahead of them.
    pub reorder_held: u64,
    /// Gaps given up on (hold time passed or stage full): packets lost on a path.
    pub reorder_gaps_skipped: u64,
    /// Packets that arrived after their gap was given up on.
    pub reorder_late: u64,
    /// Lost packets asked for again (`repair`).
    #[serde(default)]
    pub reorder_asked: u64,
    /// Packets asked for again that came.
    #[serde(default)]
    pub reorder_repaired: u64,
    /// How long the reorder stage holds a packet at most now, milliseconds.
    pub reorder_hold_ms: f64,
}

/// One path of a multipath peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PathStatus {
    /// Configured name.
    pub name: String,
    /// Outer destination (with the UDP port for ESP in UDP).
    pub endpoint: String,
    /// The path's own source address (`local`; `None`: the routed source).
    #[serde(default)]
    pub local: Option<String>,
    /// The interface the path leaves by (`device`, or the one holding `local`; `None`:
    /// routing decides).
    #[serde(default)]
    pub device: Option<String>,
    /// A path learned from the peer's packets (`max_paths`): when it was learned or last
    /// moved (Unix seconds; `None`: a configured path, or none learned yet).
    #[serde(default)]
    pub learned_unix: Option<f64>,
    /// `up`, `quiet` (late, not scheduled, not down yet), `down`, `unknown` (no echo yet) or,
    /// for a learned path, `forgotten` (silent for `path_idle`: its slot is free).
    pub state: String,
    /// Smoothed probe RTT, milliseconds (`None`: none measured).
    pub rtt_ms: Option<f64>,
    /// Smallest probe RTT, milliseconds.
    pub min_rtt_ms: Option<f64>,
    /// Probes sent and echoes received.
    pub probes_sent: u64,
    /// Echoes received.
    pub echoes: u64,
    /// Times the path went quiet (late by a probe interval and a half while another path
    /// answered).
    #[serde(default)]
    pub quiet_count: u64,
    /// Packets sent again on the path because the peer asked for them (`repair`).
    #[serde(default)]
    pub repaired: u64,
    /// Share of the schedule, 0..1 (redundant: 1 for every live path).
    pub share: f64,
    /// What the path is estimated to deliver, bits per second (`spread`; 0: not yet known).
    pub capacity_bps: f64,
    /// Packets sent on the path.
    pub tx_packets: u64,
    /// Inner bytes sent on the path.
    pub tx_bytes: u64,
    /// Of the packets sent, those the kernel refused to send (no route to the path's endpoint,
    /// a source address the host does not have): they never left.
    #[serde(default)]
    pub send_refused: u64,
    /// Packets received on the path.
    pub rx_packets: u64,
    /// Inner bytes received on the path.
    pub rx_bytes: u64,
    /// Inner bytes the peer says it received on the path (from its echoes).
    pub peer_rx_bytes: u64,
}

/// An outbound SA (Linux: `ip xfrm state` with `dir out`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaOut {
    /// SPI.
    pub spi: u32,
    /// Cipher name.
    pub cipher: String,
    /// 64-bit extended sequence numbers.
    pub esn: bool,
    /// Sequence number the next packet gets (`oseq` + 1 in xfrm terms).
    pub next_seq: u64,
    /// Sequence numbers are reserved on disk up to this one (see docs/security.md); `None`
    /// for an SA negotiated by IKEv2 (its keys are new at every start: nothing to reserve).
    #[serde(default)]
    pub reserved_to: Option<u64>,
}

/// An inbound SA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaIn {
    /// SPI.
    pub spi: u32,
    /// Cipher name.
    pub cipher: String,
    /// 64-bit extended sequence numbers.
    pub esn: bool,
    /// Highest authenticated sequence number (the replay window's right edge), 0 before the
    /// first packet.
    pub highest_seq: u64,
    /// Replay window size in packets.
    pub replay_window: u32,
}

/// The capture taps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureStatus {
    /// Current files.
    pub files: Vec<String>,
    /// Records written.
    pub written: u64,
    /// Records dropped because the writer was behind.
    pub dropped: u64,
    /// Records lost to failed writes.
    pub write_errors: u64,
    /// Files rotated.
    pub rotations: u64,
}

/// One SA as `espip sa` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaExport {
    /// Peer name.
    pub peer: String,
    /// `out` or `in`.
    pub direction: String,
    /// Outer source of the SA's packets.
    pub src: String,
    /// Outer destination.
    pub dst: String,
    /// SPI.
    pub spi: u32,
    /// Cipher name.
    pub cipher: String,
    /// The Wireshark `esp_sa` line, or `None` when Wireshark cannot decrypt the cipher.
    pub wireshark: Option<zeroize::Zeroizing<String>>,
}

fn ago(now: f64, t: Option<f64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => format!("{:.1} s ago", (now - t).max(0.0)),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

impl Status {
    /// Human-readable form (`espip show`), with ages relative to `now_unix`.
    pub fn to_text(&self, now_unix: f64) -> String {
        let mut s = String::new();
        let i = &self.interface;
        match &self.netns {
            Some(ns) => {
                let _ = writeln!(s, "interface: {}  (network namespace {ns})", i.name);
            }
            None => {
                let _ = writeln!(s, "interface: {}", i.name);
            }
        }
        let _ = writeln!(
            s,
            "  mtu: {}  addresses: {}  local: {}  up: {:.0} s  configuration: generation {}  (espip {})",
            i.mtu,
            if i.addresses.is_empty() {
                "none".into()
            } else {
                i.addresses.join(", ")
            },
            i.local.as_deref().unwrap_or("routed"),
            i.uptime_seconds,
            i.generation,
            i.version
        );
        for p in &self.peers {
            peer_text(p, now_unix, &mut s);
        }
        self.counters_text(&mut s);
        self.ike_text(&mut s);
        if let Some(c) = &self.capture {
            let _ = writeln!(
                s,
                "capture: {}  ({} records written, {} dropped while the writer was behind, {} lost to write errors)",
                c.files.join(", "),
                c.written,
                c.dropped,
                c.write_errors
            );
        }
        s
    }

    /// The drop, error, kernel-drop, relay and offload lines.
    fn counters_text(&self, s: &mut String) {
        let nonzero: Vec<String> = self
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "\ndrops: {}",
            if nonzero.is_empty() {
                "none".into()
            } else {
                nonzero.join(", ")
            }
        );
        let errs: Vec<String> = self
            .errors
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !errs.is_empty() {
            let _ = writeln!(s, "errors: {}", errs.join(", "));
        }
        let kd: Vec<String> = self
            .kernel_drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !kd.is_empty() {
            let _ = writeln!(s, "dropped by the kernel: {}", kd.join(", "));
        }
        if self.relayed > 0 {
            let _ = writeln!(s, "relayed between peers: {} packets", self.relayed);
        }
        if self.offload.values().any(|n| *n > 0) {
            let get = |k: &str| self.offload.get(k).copied().unwrap_or(0);
            let _ = writeln!(
                s,
                "offload: {} TSO and {} USO packets segmented, {} coalesced writes",
                get("tso_in"),
                get("uso_in"),
                get("gro_out")
            );
            if get("udp_gso_out") + get("udp_gro_in") > 0 {
                let _ = writeln!(
                    s,
                    "ESP in UDP: {} segmented sends (UDP GSO), {} coalesced receives (UDP GRO)",
                    get("udp_gso_out"),
                    get("udp_gro_in")
                );
            }
            if get("ipip_gro_in") > 0 {
                let _ = writeln!(
                    s,
                    "IP-in-IP: {} packets merged by the kernel's GRO received and cut back",
                    get("ipip_gro_in")
                );
            }
            if get("af_packet_out") > 0 {
                let _ = writeln!(
                    s,
                    "fast path: {} outer packets sent through AF_PACKET (interface.tx_path)",
                    get("af_packet_out")
                );
            }
        }
    }

    /// The IKEv2 peers' lines.
    fn ike_text(&self, s: &mut String) {
        for k in &self.ike {
            let _ = writeln!(
                s,
                "\nike: peer {} ({}, {} -> {})  established {}  child rekeys {}  ike rekeys {}  requests {} (retransmitted {})  answered {}",
                k.peer,
                k.role,
                k.local_id,
                k.remote_id,
                k.established,
                k.child_rekeys,
                k.ike_rekeys,
                k.requests,
                k.retransmits,
                k.responses
            );
            if k.mobike || k.address_updates > 0 || k.peer_address.is_some() {
                let _ = writeln!(
                    s,
                    "  peer at {}  mobike {}  address updates {}",
                    k.peer_address.as_deref().unwrap_or("-"),
                    if k.mobike { "yes" } else { "no" },
                    k.address_updates
                );
            }
            for sa in &k.sas {
                let _ = writeln!(
                    s,
                    "  {:5} {}  {}  {}  age {:.0} s{}",
                    sa.kind,
                    sa.spis,
                    sa.state,
                    sa.proposal,
                    sa.age_s,
                    sa.rekey_in_s
                        .map(|r| format!("  rekey in {r:.0} s"))
                        .unwrap_or_default()
                );
            }
            if !k.failures.is_empty() {
                let f: Vec<String> = k.failures.iter().map(|(r, n)| format!("{r} {n}")).collect();
                let _ = writeln!(s, "  failures: {}", f.join(", "));
            }
        }
    }
}

/// One peer's lines of `espip show`.
fn peer_text(p: &PeerStatus, now_unix: f64, s: &mut String) {
    let _ = writeln!(s, "\npeer: {}", p.name);
    let _ = writeln!(s, "  endpoint: {}  mode: {}", p.endpoint, p.mode);
    if p.endpoint_learned {
        let _ = writeln!(
            s,
            "  endpoint learned from the peer's packets: {}",
            match p.endpoint_changed_unix {
                Some(t) => format!(
                    "{} ({} move{} after the first)",
                    ago(now_unix, Some(t)),
                    p.endpoint_moves,
                    if p.endpoint_moves == 1 { "" } else { "s" }
                ),
                None =>
                    "nothing authenticated yet (packets to it are dropped as no_endpoint)".into(),
            }
        );
    }
    let _ = writeln!(s, "  allowed ips: {}", p.allowed_ips.join(", "));
    if let Some(o) = &p.sa_out {
        let _ = writeln!(
            s,
            "  sa out: spi {:#010x}  {}{}  next seq {}  {}",
            o.spi,
            o.cipher,
            if o.esn { " esn" } else { "" },
            o.next_seq,
            match o.reserved_to {
                Some(r) => format!("reserved to {r}"),
                None => "negotiated (no reservation)".into(),
            }
        );
    }
    if let Some(n) = &p.sa_in {
        let _ = writeln!(
            s,
            "  sa in:  spi {:#010x}  {}{}  highest seq {}  replay window {}",
            n.spi,
            n.cipher,
            if n.esn { " esn" } else { "" },
            n.highest_seq,
            n.replay_window
        );
    }
    let _ = writeln!(
        s,
        "  transfer: {} received ({} packets), {} sent ({} packets)",
        bytes(p.rx_bytes),
        p.rx_packets,
        bytes(p.tx_bytes),
        p.tx_packets
    );
    let _ = writeln!(
        s,
        "  latest packet: received {}, sent {}",
        ago(now_unix, p.last_rx_unix),
        ago(now_unix, p.last_tx_unix)
    );
    if let Some(m) = &p.multipath {
        let _ = writeln!(
            s,
            "  scheduler: {}  reorder: held {}, gaps skipped {}, late {}, hold {:.1} ms, asked again {}, repaired {}",
            m.scheduler,
            m.reorder_held,
            m.reorder_gaps_skipped,
            m.reorder_late,
            m.reorder_hold_ms,
            m.reorder_asked,
            m.reorder_repaired
        );
        for x in &m.paths {
            let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
            let _ = writeln!(
                s,
                "  path {}: {}{}  {}  rtt {} (min {})  share {:.0}%  probes {}/{}  quiet {}x  sent {} ({} packets, {} repairs)  received {} ({} packets)",
                x.name,
                x.endpoint,
                match (&x.local, &x.device) {
                    (None, None) => String::new(),
                    (Some(l), Some(d)) => format!(" from {l} via {d}"),
                    (Some(l), None) => format!(" from {l}"),
                    (None, Some(d)) => format!(" via {d}"),
                }
                    + &x.learned_unix
                        .map_or(String::new(), |t| format!(" (learned {})", ago(now_unix, Some(t)))),
                x.state,
                ms(x.rtt_ms),
                ms(x.min_rtt_ms),
                x.share * 100.0,
                x.echoes,
                x.probes_sent,
                x.quiet_count,
                bytes(x.tx_bytes),
                x.tx_packets,
                x.repaired,
                bytes(x.rx_bytes),
                x.rx_packets
            );
            if x.send_refused > 0 {
                let _ = writeln!(
                    s,
                    "    the kernel refused {} of the packets sent on path {} (see the log's \"sending packets failed\")",
                    x.send_refused, x.name
                );
            }
        }
    }
}

/// Label pairs of one sample, in the order they are written.
type Labels = Vec<(String, String)>;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            interface: InterfaceStatus {
                name: "espip0".into(),
                mtu: 1446,
                addresses: vec!["10.4.2.99/24".into()],
                local: Some("192.0.2.1".into()),
                started_unix: 1_700_000_000.5,
                uptime_seconds: 12.0,
                version: "0.1.0".into(),
                generation: 1,
            },
            peers: vec![PeerStatus {
                name: "b \"quoted\"".into(),
                endpoint: "192.0.2.2".into(),
                mode: "esp".into(),
                allowed_ips: vec!["10.4.2.5/32".into()],
                sa_out: Some(SaOut {
                    spi: 0x1001,
                    cipher: "aes-128-gcm".into(),
                    esn: false,
                    next_seq: 11,
                    reserved_to: Some(4_194_304),
                }),
                sa_in: Some(SaIn {
                    spi: 0x1002,
                    cipher: "aes-128-gcm".into(),
                    esn: false,
                    highest_seq: 7,
                    replay_window: 1024,
                }),
                tx_packets: 10,
                tx_bytes: 840,
                rx_packets: 7,
                rx_bytes: 588,
                last_tx_unix: Some(1_700_000_010.0),
                last_rx_unix: None,
                endpoint_learned: false,
                endpoint_changed_unix: None,
                endpoint_moves: 0,
                multipath: None,
            }],
            drops: [("bad_icv".to_string(), 2), ("replay".to_string(), 0)]
                .into_iter()
                .collect(),
            errors: [("send".to_string(), 0)].into_iter().collect(),
            relayed: 0,
            capture: None,
            offload: Default::default(),
            kernel_drops: [("tun_tx_queue".to_string(), 808_426)]
                .into_iter()
                .collect(),
            netns: None,
            ike: vec![IkePeerStatus {
                peer: "sw".into(),
                role: "initiator".into(),
                local_id: "a.lab".into(),
                remote_id: "b.lab".into(),
                sas: vec![
                    IkeSaStatus {
                        kind: "ike".into(),
                        spis: "00000000000000aa_i 00000000000000bb_r".into(),
                        state: "established".into(),
                        proposal: "aes128gcm16-prfsha256-x25519".into(),
                        age_s: 12.0,
                        rekey_in_s: Some(100.0),
                    },
                    IkeSaStatus {
                        kind: "child".into(),
                        spis: "c0000001_i c0000002_o".into(),
                        state: "installed".into(),
                        proposal: "aes128gcm16-esn".into(),
                        age_s: 2.0,
                        rekey_in_s: Some(3.0),
                    },
                ],
                established: 1,
                child_rekeys: 4,
                ike_rekeys: 1,
                requests: 9,
                retransmits: 0,
                responses: 3,
                failures: [("AUTHENTICATION_FAILED".to_string(), 2)]
                    .into_iter()
                    .collect(),
                mobike: true,
                address_updates: 1,
                peer_address: Some("192.0.2.2:4500".into()),
            }],
        }
    }

    /// [`sample`] with every optional part: a learned endpoint, a multipath peer, captures.
    fn full_sample() -> Status {
        let mut s = sample();
        s.capture = Some(CaptureStatus {
            files: vec!["/var/lib/espip/espip0.pcap".into()],
            written: 5,
            dropped: 1,
            write_errors: 0,
            rotations: 0,
        });
        s.offload = [("tso_in".to_string(), 3)].into_iter().collect();
        let p = &mut s.peers[0];
        p.endpoint_learned = true;
        p.endpoint_changed_unix = Some(1_700_000_005.0);
        p.endpoint_moves = 1;
        p.multipath = Some(MultipathStatus {
            scheduler: "spread".into(),
            paths: vec![PathStatus {
                name: "dsl".into(),
                endpoint: "192.0.2.2".into(),
                local: None,
                device: None,
                learned_unix: None,
                state: "up".into(),
                rtt_ms: Some(10.5),
                min_rtt_ms: Some(10.0),
                probes_sent: 10,
                echoes: 9,
                quiet_count: 0,
                repaired: 0,
                share: 0.5,
                capacity_bps: 1e6,
                tx_packets: 4,
                tx_bytes: 400,
                send_refused: 1,
                rx_packets: 3,
                rx_bytes: 300,
                peer_rx_bytes: 380,
            }],
            reorder_held: 0,
            reorder_gaps_skipped: 0,
            reorder_late: 0,
            reorder_asked: 0,
            reorder_repaired: 0,
            reorder_hold_ms: 5.0,
        });
        s
    }

    /// Each sample line's metric name and label names, once each, sorted.
    fn shapes(exposition: &str) -> String {
        let mut v: Vec<String> = exposition
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                let labels: Vec<&str> = l
                    .split_once('{')
                    .map(|(_, rest)| {
                        rest.split("\",")
                            .filter_map(|kv| {
                                kv.split_once('=').map(|(k, _)| k.trim_start_matches(','))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                format!("{name}{{{}}}", labels.join(","))
            })
            .collect();
        v.sort();
        v.dedup();
        v.join("\n") + "\n"
    }

    /// The metric names and label names are the ones the hand-written exporter had
    /// (tests/vectors/metric-shapes.txt was written by it, before prometheus-client).
    #[test]
    fn metric_names_and_labels_stay_the_same() {
        let got = shapes(&full_sample().to_prometheus());
        if std::env::var_os("ESPIP_PRINT_SHAPES").is_some() {
            print!("{got}");
        }
        assert_eq!(
            got,
            include_str!("../../../../tests/vectors/metric-shapes.txt")
        );
    }

    #[test]
    fn ike_state_in_show_and_metrics() {
        let s = sample();
        let t = s.to_text(1_700_000_010.0);
        assert!(
            t.contains("ike: peer sw (initiator, a.lab -> b.lab)  established 1  child rekeys 4"),
            "{t}"
        );
        assert!(
            t.contains(
                "child c0000001_i c0000002_o  installed  aes128gcm16-esn  age 2 s  rekey in 3 s"
            ),
            "{t}"
        );
        assert!(t.contains("failures: AUTHENTICATION_FAILED 2"), "{t}");
        assert!(
            t.contains("peer at 192.0.2.2:4500  mobike yes  address updates 1"),
            "{t}"
        );
        let p = s.to_prometheus();
        assert!(p.contains("espip_ike_sas{interface=\"espip0\",peer=\"sw\",kind=\"child\",state=\"installed\"} 1.0\n"), "{p}");
        assert!(p.contains("espip_ike_exchanges_total{interface=\"espip0\",peer=\"sw\",event=\"child_rekey\"} 4.0\n"), "{p}");
        assert!(p.contains("espip_ike_failures_total{interface=\"espip0\",peer=\"sw\",reason=\"AUTHENTICATION_FAILED\"} 2.0\n"), "{p}");
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Status>(&j).unwrap(), s);
    }

    #[test]
    fn text_names_sas_counts_and_drops() {
        let t = sample().to_text(1_700_000_012.0);
        assert!(
            t.contains("sa out: spi 0x00001001  aes-128-gcm  next seq 11"),
            "{t}"
        );
        assert!(t.contains("highest seq 7  replay window 1024"), "{t}");
        assert!(t.contains("588 B received (7 packets), 840 B sent (10 packets)"));
        assert!(t.contains("received never, sent 2.0 s ago"), "{t}");
        assert!(t.contains("drops: bad_icv 2\n"), "{t}");
    }

    #[test]
    fn prometheus_lines_are_well_formed() {
        let p = sample().to_prometheus();
        assert!(p.contains(
            "espip_peer_packets_total{interface=\"espip0\",peer=\"b \\\"quoted\\\"\",direction=\"rx\"} 7.0\n"
        ), "{p}");
        assert!(p.contains("espip_drops_total{interface=\"espip0\",reason=\"bad_icv\"} 2.0\n"));
        assert!(p.contains("espip_start_time_seconds{interface=\"espip0\"} 1700000000.5\n"));
        assert!(
            p.contains("direction=\"out\"} 10.0\n"),
            "last sent = next - 1"
        );
        // Every sample's family has exactly one TYPE line, before its samples; the exposition
        // ends as OpenMetrics says.
        assert!(p.ends_with("# EOF\n"));
        let mut typed = std::collections::HashSet::new();
        for line in p.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                assert!(typed.insert(rest.split(' ').next().unwrap().to_string()));
            } else if !line.starts_with('#') {
                // OpenMetrics: a counter family's samples add `_total` to its name.
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name.strip_suffix("_total").unwrap_or(name);
                assert!(typed.contains(name) || typed.contains(family), "{line}");
            }
        }
    }
}

//! `keying = "ikev2"` on a `[[peer]]`: the peer's ESP SAs come from IKEv2 (RFC 7296) with a
//! pre-shared key instead of static keys. The settings follow strongSwan's `swanctl.conf`
//! names and notation where they have one, so the two sides read alike.

use super::mode::Mode;
use super::raw::RawPeer;
use super::{invalid, ConfigError};
use crate::ike::proposal::{EspProposal, IkeProposal};
use crate::prefix::Prefix;
use std::net::IpAddr;
use std::path::Path;
use zeroize::Zeroizing;

pub use crate::ike::proposal::DEFAULT_IKE_PROPOSAL;
/// Default ESP proposal.
pub const DEFAULT_ESP_PROPOSAL: &str = "aes128gcm16-esn-noesn";
/// Default IKE SA lifetime, seconds (strongSwan rekeys IKE SAs every 4 h).
pub const DEFAULT_IKE_LIFETIME: u64 = 4 * 3600;
/// Default CHILD_SA lifetime, seconds (strongSwan: 1 h).
pub const DEFAULT_CHILD_LIFETIME: u64 = 3600;
/// Default liveness check interval, seconds.
pub const DEFAULT_DPD: u64 = 30;

/// Which side starts the exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connects at start and after a failure.
    Initiator,
    /// Waits for the peer.
    Responder,
}

/// The IKEv2 settings of one peer.
#[derive(Clone)]
pub struct IkePeer {
    /// The peer (its `name`).
    pub peer: String,
    /// Initiator or responder.
    pub role: Role,
    /// The pre-shared key (file contents: text, or `0x` hex).
    pub psk: Zeroizing<Vec<u8>>,
    /// Our identity (strongSwan `local.id`).
    pub local_id: String,
    /// The peer's identity (`remote.id`).
    pub remote_id: String,
    /// IKE proposals.
    pub ike_proposals: Vec<IkeProposal>,
    /// ESP proposals.
    pub esp_proposals: Vec<EspProposal>,
    /// IKE SA lifetime, seconds (rekeyed `rekey_margin` before).
    pub ike_lifetime: u64,
    /// CHILD_SA lifetime, seconds.
    pub child_lifetime: u64,
    /// Rekey this long before the lifetime ends, seconds.
    pub rekey_margin: u64,
    /// And up to this much earlier still, at random, seconds (so both sides do not collide).
    pub rekey_jitter: u64,
    /// Liveness check after this long without a message from the peer, seconds (0: off).
    pub dpd_interval: u64,
    /// Our side's traffic selectors (default: the interface addresses as hosts).
    pub local_ts: Vec<Prefix>,
    /// Offer and accept MOBIKE (RFC 4555; strongSwan's `mobike`, default yes).
    pub mobike: bool,
}

impl std::fmt::Debug for IkePeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IkePeer")
            .field("peer", &self.peer)
            .field("role", &self.role)
            .field("psk", &"<redacted>")
            .field("local_id", &self.local_id)
            .field("remote_id", &self.remote_id)
            .finish_non_exhaustive()
    }
}

impl PartialEq for IkePeer {
    fn eq(&self, o: &Self) -> bool {
        self.peer == o.peer
            && self.role == o.role
            && *self.psk == *o.psk
            && self.local_id == o.local_id
            && self.remote_id == o.remote_id
            && self.ike_proposals == o.ike_proposals
            && self.esp_proposals == o.esp_proposals
            && self.ike_lifetime == o.ike_lifetime
            && self.child_lifetime == o.child_lifetime
            && self.rekey_margin == o.rekey_margin
            && self.rekey_jitter == o.rekey_jitter
            && self.dpd_interval == o.dpd_interval
            && self.local_ts == o.local_ts
            && self.mobike == o.mobike
    }
}

/// Is the peer keyed by IKEv2? (`keying`, checked.)
pub(super) fn keying(p: &RawPeer, k: &dyn Fn(&str) -> String) -> Result<bool, ConfigError> {
    match p.keying.as_deref() {
        None | Some("static") => {
            for (field, set) in [
                ("psk_file", p.psk_file.is_some()),
                ("local_id", p.local_id.is_some()),
                ("remote_id", p.remote_id.is_some()),
                ("role", p.role.is_some()),
                ("ike_proposals", p.ike_proposals.is_some()),
                ("esp_proposals", p.esp_proposals.is_some()),
                ("ike_lifetime", p.ike_lifetime.is_some()),
                ("child_lifetime", p.child_lifetime.is_some()),
                ("rekey_margin", p.rekey_margin.is_some()),
                ("rekey_jitter", p.rekey_jitter.is_some()),
                ("dpd_interval", p.dpd_interval.is_some()),
                ("local_ts", p.local_ts.is_some()),
                ("mobike", p.mobike.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        k(field),
                        "(set)",
                        "keying = \"ikev2\" on this peer (it is an IKEv2 setting), or remove it",
                    ));
                }
            }
            Ok(false)
        }
        Some("ikev2") => Ok(true),
        Some(other) => Err(invalid(
            k("keying"),
            format!("{other:?}"),
            "\"static\" (keys and SPIs in the configuration, the default) or \"ikev2\" (negotiated with a pre-shared key)",
        )),
    }
}

/// The IKEv2 settings of an ikev2 peer. `mode`, the paths and the static SA keys were read
/// by the caller; static keys are refused here. A multipath peer runs IKE over its first
/// path's endpoint; its CHILD_SA pair carries every path.
#[allow(clippy::too_many_arguments)] // the peer's parsed parts and the parser's context
pub(super) fn ike_peer(
    p: &RawPeer,
    mode: Mode,
    endpoint: Option<IpAddr>,
    base: &Path,
    keys: &super::KeyFiles,
    interface: &super::Interface,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<IkePeer, ConfigError> {
    refuse_for_ikev2(p, mode, k)?;
    let role = match p.role.as_deref() {
        Some("initiator") => Role::Initiator,
        Some("responder") => Role::Responder,
        other => {
            return Err(invalid(
                k("role"),
                other.map_or("(missing)".to_string(), |r| format!("{r:?}")),
                "\"initiator\" on one side and \"responder\" on the other (the initiator connects at start and after a failure; the responder waits)",
            ))
        }
    };
    if role == Role::Initiator && endpoint.is_none() {
        return Err(invalid(
            k("endpoint"),
            "(missing)",
            "the responder's outer address: an initiator connects to it. Only role = \"responder\" may leave endpoint out (it finds its peer by remote_id)",
        ));
    }
    let (local_id, remote_id) = identities(p, endpoint, interface, k)?;
    let psk = read_psk(p, base, keys, k, warnings)?;
    let (ike_proposals, esp_proposals) = proposals(p, k)?;
    let Lifetimes {
        ike_lifetime,
        child_lifetime,
        rekey_margin,
        rekey_jitter,
        dpd_interval,
    } = lifetimes(p, k)?;
    let local_ts = local_ts(p, interface, k)?;
    Ok(IkePeer {
        peer: p.name.clone(),
        role,
        psk,
        local_id,
        remote_id,
        ike_proposals,
        esp_proposals,
        ike_lifetime,
        child_lifetime,
        rekey_margin,
        rekey_jitter,
        dpd_interval,
        local_ts,
        mobike: p.mobike.unwrap_or(true),
    })
}
/// The responders without endpoint share one lobby ([`crate::ike::engine::HalfOpen`]): the
/// initiator's identity picks the peer, so each needs its own `remote_id`, and IKE_SA_INIT is
/// answered before the peer is known, so they need the same `ike_proposals`.
pub(super) fn check_responders_without_endpoint(
    peers: &[crate::datapath::PeerSpec],
    ike: &[IkePeer],
) -> Result<(), ConfigError> {
    let roaming: Vec<&IkePeer> = ike
        .iter()
        .filter(|s| {
            peers
                .iter()
                .any(|p| p.name == s.peer && p.endpoint.is_none())
        })
        .collect();
    for (i, s) in roaming.iter().enumerate() {
        let Some(first) = roaming.first() else { break };
        if let Some(o) = roaming[..i].iter().find(|o| o.remote_id == s.remote_id) {
            return Err(invalid(
                format!("peer {:?}.remote_id", s.peer),
                format!("{:?}", s.remote_id),
                format!(
                    "an identity of its own: peer {:?}, also a responder without endpoint, has it, and the initiator's identity is how espip tells them apart",
                    o.peer
                ),
            ));
        }
        if s.ike_proposals != first.ike_proposals {
            return Err(invalid(
                format!("peer {:?}.ike_proposals", s.peer),
                s.ike_proposals.iter().map(IkeProposal::name).collect::<Vec<_>>().join(", "),
                format!(
                    "the same list as peer {:?} ({}): responders without endpoint answer IKE_SA_INIT before the initiator names its identity, so they share their IKE proposals",
                    first.peer,
                    first.ike_proposals.iter().map(IkeProposal::name).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// What `keying = "ikev2"` refuses: ipip, and every static-key field (IKEv2 negotiates
/// them).
fn refuse_for_ikev2(
    p: &RawPeer,
    mode: Mode,
    k: &dyn Fn(&str) -> String,
) -> Result<(), ConfigError> {
    if mode == Mode::IpIp {
        return Err(invalid(
            k("mode"),
            "\"ipip\"",
            "\"esp-udp\" (what strongSwan and NAT traversal use) or \"esp\" with keying = \"ikev2\": IKEv2 keys ESP",
        ));
    }
    for (field, set) in [
        ("cipher", p.cipher.is_some()),
        ("spi_out", p.spi_out.is_some()),
        ("spi_in", p.spi_in.is_some()),
        ("key_out", p.key_out.is_some() || p.key_out_file.is_some()),
        ("key_in", p.key_in.is_some() || p.key_in_file.is_some()),
        ("esn", p.esn.is_some()),
        ("lifetime_packets", p.lifetime_packets.is_some()),
        ("lifetime_bytes", p.lifetime_bytes.is_some()),
        ("lifetime_seconds", p.lifetime_seconds.is_some()),
    ] {
        if set {
            return Err(invalid(
                k(field),
                "(set)",
                "nothing with keying = \"ikev2\": IKEv2 negotiates ciphers, SPIs, keys and ESN (esp_proposals, child_lifetime); remove it",
            ));
        }
    }
    Ok(())
}

/// The pre-shared key from `psk_file` (text, or 0x and hex); a short one is warned about.
fn read_psk(
    p: &RawPeer,
    base: &Path,
    keys: &super::KeyFiles,
    k: &dyn Fn(&str) -> String,
    warnings: &mut Vec<String>,
) -> Result<Zeroizing<Vec<u8>>, ConfigError> {
    let psk_path = p.psk_file.clone().ok_or_else(|| {
        invalid(
            k("psk_file"),
            "(missing)",
            "the path of a file (mode 0600, owned by root) holding the pre-shared key: text, or 0x and hex",
        )
    })?;
    let psk_path = if psk_path.is_relative() {
        base.join(psk_path)
    } else {
        psk_path
    };
    let text = keys.read(&k("psk_file"), &psk_path)?;
    let t = text.trim_end_matches(['\n', '\r']);
    let psk = match t.strip_prefix("0x") {
        Some(h) => {
            let h = h.trim();
            if h.len() % 2 != 0 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid(
                    k("psk_file"),
                    psk_path.display(),
                    "a file holding the key as text, or as 0x followed by an even number of hex digits",
                ));
            }
            Zeroizing::new(
                (0..h.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap_or(0))
                    .collect::<Vec<u8>>(),
            )
        }
        None => Zeroizing::new(t.as_bytes().to_vec()),
    };
    if psk.is_empty() {
        return Err(invalid(
            k("psk_file"),
            psk_path.display(),
            "a file holding a pre-shared key (it is empty)",
        ));
    }
    if psk.len() < 20 {
        warnings.push(format!(
            "{}: the pre-shared key is {} bytes; a key of 20 or more random bytes (`head -c 32 /dev/urandom | xxd -p -c 64 | sed s/^/0x/`) resists offline guessing",
            k("psk_file"),
            psk.len()
        ));
    }
    Ok(psk)
}

/// This side's identity (`local_id`, else `interface.local`) and the peer's (`remote_id`, else
/// its endpoint address).
fn identities(
    p: &RawPeer,
    endpoint: Option<IpAddr>,
    interface: &super::Interface,
    k: &dyn Fn(&str) -> String,
) -> Result<(String, String), ConfigError> {
    let local_id = match (&p.local_id, interface.local) {
        (Some(s), _) => s.trim().to_string(),
        (None, Some(l)) => l.to_string(),
        (None, None) => {
            return Err(invalid(
                k("local_id"),
                "(missing)",
                "this side's identity, as the peer's remote_id (strongSwan remote.id) names it: an FQDN such as \"a.example\" or an address (or set interface.local to use it)",
            ))
        }
    };
    let remote_id = match (&p.remote_id, endpoint) {
        (Some(s), _) => s.trim().to_string(),
        (None, Some(e)) => e.to_string(),
        (None, None) => {
            return Err(invalid(
                k("remote_id"),
                "(missing)",
                "the identity the peer proves (strongSwan local.id on its side, e.g. \"laptop.example\"): a responder without endpoint finds its peer by it",
            ))
        }
    };
    for (f, v) in [("local_id", &local_id), ("remote_id", &remote_id)] {
        if v.is_empty() || v.len() > 255 || v.chars().any(|c| c.is_control()) {
            return Err(invalid(
                k(f),
                format!("{v:?}"),
                "an FQDN, e-mail style name or address of 1 to 255 printable characters",
            ));
        }
    }
    Ok((local_id, remote_id))
}

/// `ike_proposals` and `esp_proposals` (lists of strongSwan-notation strings, or
/// comma-separated), each at least one.
fn proposals(
    p: &RawPeer,
    k: &dyn Fn(&str) -> String,
) -> Result<(Vec<IkeProposal>, Vec<EspProposal>), ConfigError> {
    let list = |field: &str, v: &Option<Vec<String>>, default: &str| -> Vec<String> {
        let _ = field;
        match v {
            Some(l) => l
                .iter()
                .flat_map(|s| s.split(','))
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => vec![default.to_string()],
        }
    };
    let mut ike_proposals = Vec::new();
    for s in list("ike_proposals", &p.ike_proposals, DEFAULT_IKE_PROPOSAL) {
        ike_proposals.push(
            IkeProposal::parse(&s).map_err(|e| invalid(k("ike_proposals"), &s, e.to_string()))?,
        );
    }
    let mut esp_proposals = Vec::new();
    for s in list("esp_proposals", &p.esp_proposals, DEFAULT_ESP_PROPOSAL) {
        esp_proposals.push(
            EspProposal::parse(&s).map_err(|e| invalid(k("esp_proposals"), &s, e.to_string()))?,
        );
    }
    if ike_proposals.is_empty() || esp_proposals.is_empty() {
        return Err(invalid(
            k(if ike_proposals.is_empty() {
                "ike_proposals"
            } else {
                "esp_proposals"
            }),
            "[]",
            "at least one proposal, e.g. [\"aes128gcm16-prfsha256-x25519\"] / [\"aes128gcm16\"]",
        ));
    }
    Ok((ike_proposals, esp_proposals))
}

/// A peer's lifetimes and timers, seconds.
struct Lifetimes {
    ike_lifetime: u64,
    child_lifetime: u64,
    rekey_margin: u64,
    rekey_jitter: u64,
    dpd_interval: u64,
}

/// `ike_lifetime`, `child_lifetime`, `rekey_margin`, `rekey_jitter` and `dpd_interval`, with
/// their defaults; the margin and jitter stay below the shorter lifetime.
fn lifetimes(p: &RawPeer, k: &dyn Fn(&str) -> String) -> Result<Lifetimes, ConfigError> {
    let secs = |field: &str, v: Option<i64>, default: u64, min: u64| -> Result<u64, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if n >= min as i64 && n <= 365 * 86400 => Ok(n as u64),
            Some(n) => Err(invalid(
                k(field),
                n,
                format!("seconds from {min} to 31536000"),
            )),
        }
    };
    let ike_lifetime = secs("ike_lifetime", p.ike_lifetime, DEFAULT_IKE_LIFETIME, 5)?;
    let child_lifetime = secs(
        "child_lifetime",
        p.child_lifetime,
        DEFAULT_CHILD_LIFETIME,
        3,
    )?;
    let shortest = ike_lifetime.min(child_lifetime);
    let rekey_margin = secs("rekey_margin", p.rekey_margin, (shortest / 10).max(1), 1)?;
    let rekey_jitter = secs("rekey_jitter", p.rekey_jitter, rekey_margin / 2, 0)?;
    if rekey_margin + rekey_jitter >= shortest {
        return Err(invalid(
            k("rekey_margin"),
            rekey_margin,
            format!(
                "a margin that with rekey_jitter ({rekey_jitter}) stays below the shorter lifetime ({shortest} s): the SA must live a while before it is rekeyed"
            ),
        ));
    }
    let dpd_interval = secs("dpd_interval", p.dpd_interval, DEFAULT_DPD, 0)?;
    Ok(Lifetimes {
        ike_lifetime,
        child_lifetime,
        rekey_margin,
        rekey_jitter,
        dpd_interval,
    })
}

/// `local_ts`, by default the interface's addresses as host prefixes.
fn local_ts(
    p: &RawPeer,
    interface: &super::Interface,
    k: &dyn Fn(&str) -> String,
) -> Result<Vec<Prefix>, ConfigError> {
    let local_ts = match &p.local_ts {
        Some(v) => {
            let mut out = Vec::new();
            for a in v {
                out.push(
                    a.parse::<Prefix>()
                        .map_err(|e| invalid(k("local_ts"), format!("{a:?}"), e.to_string()))?,
                );
            }
            out
        }
        None => interface
            .addresses
            .iter()
            .filter_map(|a| Prefix::new(a.addr, if a.addr.is_ipv4() { 32 } else { 128 }))
            .collect(),
    };
    if local_ts.is_empty() {
        return Err(invalid(
            k("local_ts"),
            "(none)",
            "the inner prefixes of this side (the traffic selector the peer routes to us); by default the interface addresses, and the interface has none",
        ));
    }
    Ok(local_ts)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, IkeRole, KeyFiles};
    use crate::datapath::EncapSpec;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    fn ike(extra: &str) -> String {
        format!(
            r#"
[interface]
name = "espip0"
address = ["10.4.2.99/24"]
local = "192.0.2.1"

[[peer]]
name = "b"
endpoint = "192.0.2.2"
allowed_ips = ["10.4.2.5/32"]
mode = "esp-udp"
keying = "ikev2"
role = "initiator"
psk_file = "psk"
remote_id = "b.lab"
{extra}
"#
        )
    }

    fn parse(text: &str, psk: &str) -> Result<Config, String> {
        let files: HashMap<PathBuf, zeroize::Zeroizing<String>> = [(
            PathBuf::from("/etc/espip/psk"),
            zeroize::Zeroizing::new(psk.to_string()),
        )]
        .into_iter()
        .collect();
        Config::parse_with(text, Path::new("/etc/espip"), &KeyFiles::given(files))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn an_ikev2_peer_parses_with_defaults() {
        let c = parse(&ike(""), "a-long-enough-pre-shared-key\n").unwrap();
        assert!(matches!(
            c.peers[0].encap,
            EncapSpec::EspPending {
                udp_port: Some(4500),
                replay_window: 1024
            }
        ));
        let k = &c.ike[0];
        assert_eq!(k.role, IkeRole::Initiator);
        assert_eq!(&k.psk[..], b"a-long-enough-pre-shared-key");
        assert_eq!(k.local_id, "192.0.2.1", "interface.local by default");
        assert_eq!(k.ike_proposals[0].name(), "aes128gcm16-prfsha256-x25519");
        assert_eq!(k.esp_proposals[0].name(), "aes128gcm16-esn-noesn");
        assert_eq!(
            (k.child_lifetime, k.rekey_margin, k.rekey_jitter),
            (3600, 360, 180)
        );
        assert_eq!(k.local_ts[0].to_string(), "10.4.2.99/32");
        let c = parse(&ike(""), "0x00112233445566778899aabbccddeeff0011223344").unwrap();
        assert_eq!(c.ike[0].psk.len(), 21);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(&ike(""), "short").unwrap();
        assert!(
            c.warnings.iter().any(|w| w.contains("5 bytes")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn ikev2_mistakes_are_named_with_the_fix() {
        let psk = "a-long-enough-pre-shared-key";
        for (text, want) in [
            (ike("cipher = \"aes-128-gcm\""), "IKEv2 negotiates ciphers"),
            (ike("esn = true"), "IKEv2 negotiates"),
            (
                ike("").replace("role = \"initiator\"", ""),
                "\"initiator\" on one side",
            ),
            (
                ike("").replace("role = \"initiator\"", "role = \"both\""),
                "\"both\"",
            ),
            (
                ike("").replace("keying = \"ikev2\"", "keying = \"ike\""),
                "\"static\"",
            ),
            (
                ike("").replace("mode = \"esp-udp\"", "mode = \"ipip\""),
                "IKEv2 keys ESP",
            ),
            (ike("").replace("psk_file = \"psk\"", ""), "psk_file"),
            (
                ike("ike_proposals = [\"aes128-sha256-modp2048\"]"),
                "unsupported algorithm \"aes128\"",
            ),
            (
                ike("esp_proposals = [\"aes128gcm16-modp2048\"]"),
                "\"modp2048\"",
            ),
            (
                ike("child_lifetime = 10\nrekey_margin = 9"),
                "below the shorter lifetime",
            ),
            (ike("ike_lifetime = 1"), "seconds from 5"),
            (ike("replay_window = 0"), "IKEv2 SAs keep anti-replay on"),
            (
                ike("remote_id = \"\"").replace("remote_id = \"b.lab\"\n", ""),
                "remote_id",
            ),
        ] {
            let e = parse(&text, psk).unwrap_err();
            assert!(e.contains(want), "want {want:?} in: {e}");
        }
        let static_peer = ike("").replace("keying = \"ikev2\"\n", "");
        let e = parse(&static_peer, psk).unwrap_err();
        assert!(e.contains("keying = \"ikev2\" on this peer"), "{e}");
        let e = parse(&ike(""), "").unwrap_err();
        assert!(e.contains("it is empty"), "{e}");
        let e = parse(&ike(""), "0xabc").unwrap_err();
        assert!(e.contains("even number of hex digits"), "{e}");
        // No local identity: nothing to default to without interface.local.
        let e = parse(&ike("").replace("local = \"192.0.2.1\"\n", ""), psk).unwrap_err();
        assert!(e.contains("local_id") && e.contains("remote_id"), "{e}");
    }

    /// `mobike` (default yes, as strongSwan's) leaves the IKE source filter as it is: a
    /// stranger's IKE is let through only by the SPIs of an established MOBIKE IKE SA (the
    /// edge's `ike_movable`), never by address.
    #[test]
    fn mobike_defaults_on_and_opens_no_address() {
        let psk = "a-long-enough-pre-shared-key";
        let stranger = "198.51.100.7".parse().unwrap();
        let responder = |t: String| t.replace("role = \"initiator\"", "role = \"responder\"");
        let c = parse(&ike(""), psk).unwrap();
        assert!(c.ike[0].mobike);
        assert!(!c.is_ike_endpoint(stranger));
        let c = parse(&responder(ike("")), psk).unwrap();
        assert!(!c.is_ike_endpoint(stranger));
        assert!(c.is_ike_endpoint("192.0.2.2".parse().unwrap()));
        let c = parse(&responder(ike("mobike = false\n")), psk).unwrap();
        assert!(!c.ike[0].mobike);
        let e = parse(&ike("mobike = \"yes\"\n"), psk).unwrap_err();
        assert!(e.contains("mobike"), "{e}");
    }

    /// Responders without endpoint: found by `remote_id`, so each has its own; they answer
    /// IKE_SA_INIT together, so they share `ike_proposals`; an initiator needs an endpoint.
    #[test]
    fn responders_without_endpoint_need_own_identities_and_shared_proposals() {
        let psk = "a-long-enough-pre-shared-key";
        let responder = |name: &str, id: &str, inner: &str, extra: &str| {
            format!("\n[[peer]]\nname = \"{name}\"\nallowed_ips = [\"{inner}/32\"]\nmode = \"esp-udp\"\nkeying = \"ikev2\"\nrole = \"responder\"\npsk_file = \"psk\"\nremote_id = \"{id}\"\n{extra}\n")
        };
        let head = ike("").split("[[peer]]").next().unwrap().to_string();
        let two = |a: &str, b: &str| {
            head.clone()
                + &responder("alice", "alice.lab", "10.4.2.5", a)
                + &responder("bob", "bob.lab", "10.4.2.6", b)
        };
        let c = parse(&two("", ""), psk).unwrap();
        assert!(c.peers.iter().all(|p| p.endpoint.is_none()));
        assert!(c.is_ike_endpoint("198.51.100.7".parse().unwrap()));
        let e = parse(&two("", "").replace("bob.lab", "alice.lab"), psk).unwrap_err();
        assert!(
            e.contains("remote_id") && e.contains("an identity of its own"),
            "{e}"
        );
        let e = parse(
            &two("", "ike_proposals = [\"aes256gcm16-prfsha384-ecp384\"]"),
            psk,
        )
        .unwrap_err();
        assert!(
            e.contains("ike_proposals") && e.contains("the same list as peer"),
            "{e}"
        );
        let e = parse(&ike("").replace("endpoint = \"192.0.2.2\"\n", ""), psk).unwrap_err();
        assert!(
            e.contains("Only role = \"responder\" may leave endpoint out"),
            "{e}"
        );
    }
}

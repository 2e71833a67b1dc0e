//! The TOML configuration: parsing, validation with errors that name the key, the bad value and
//! what is expected, and key files with ssh-like permission checks.
//!
//! One module per section: [`raw`] is the file as serde reads it; `interface`, `peer`, `nat`
//! and `capture` validate their section into the types below, each error naming the key, the
//! value found and what to write instead.

mod capture;
mod ike;
mod interface;
mod keys;
mod mode;
mod nat;
mod paths;
mod peer;
mod raw;

use crate::datapath::PeerSpec;
use crate::prefix::Prefix;
pub use ike::{IkePeer, Role as IkeRole, DEFAULT_IKE_PROPOSAL};
pub use keys::KeyFiles;
pub use mode::Mode;
use raw::{RawConfig, RawMetrics};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Default replay window in packets (Linux `ip xfrm` users commonly pick 32-4096; 1024 tolerates
/// the reordering of multi-queue paths at high rates).
pub const DEFAULT_REPLAY_WINDOW: u32 = 1024;

/// Largest accepted replay window: the bitmap costs one bit per packet.
pub const MAX_REPLAY_WINDOW: u32 = 1 << 20;

/// Smallest tunnel MTU: IPv4 hosts must accept 576-byte datagrams (RFC 791).
pub const MIN_MTU_V4: u16 = 576;

/// Smallest tunnel MTU when the interface carries IPv6 (RFC 8200 section 5).
pub const MIN_MTU_V6: u16 = 1280;

/// A configuration error.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown/mistyped key.
    #[error("{path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// toml's message (it names the line and key).
        message: String,
    },
    /// A value is wrong.
    #[error("{key} = {value}: {expected}")]
    Invalid {
        /// Where: `interface.mtu`, `peer "b".spi_out`, ...
        key: String,
        /// The value as given.
        value: String,
        /// What is expected instead.
        expected: String,
    },
    /// A key file owned by someone other than root (or the user running espip).
    #[error("{key}: key file {path} belongs to uid {uid}; a key file must belong to root (or to the user running espip): `chown root: {path}`, after checking who wrote it")]
    KeyFileOwner {
        /// Which key.
        key: String,
        /// The file (links resolved).
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// The peers together are inconsistent (two claim one prefix, say).
    #[error("the [[peer]] sections together: {0}")]
    Peers(String),
    /// A key file others can read.
    #[error("{key}: key file {path} has mode {mode:04o}, readable by group or others; run `chmod 600 {path}` (and keep it owned by root)")]
    KeyFilePermissions {
        /// Which key.
        key: String,
        /// The file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
}

impl ConfigError {
    /// The error as found in the file `path` (a syntax error names it, not `<config>`).
    pub fn in_file(self, path: &Path) -> ConfigError {
        match self {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        }
    }
}

fn invalid(
    key: impl Into<String>,
    value: impl ToString,
    expected: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        value: value.to_string(),
        expected: expected.into(),
    }
}

pub use espip_sys::capture::CaptureConfig as Capture;

/// Default `capture.max_file_mb`.
pub const DEFAULT_CAPTURE_FILE_MB: u64 = 64;

/// Default `capture.files`.
pub const DEFAULT_CAPTURE_FILES: u32 = 4;

pub use espip_api::{default_dir, in_init_netns, DEFAULT_CONTROL_DIR};

/// What the daemon does with the netfilter rules of the NAT helper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RulesMode {
    /// Install on start (after removing stale ones), remove on stop.
    Apply,
    /// Only print them at start; the user installs them.
    Print,
    /// Neither.
    Off,
}

/// The `[nat]` section, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Nat {
    /// The real <-> alias mappings.
    pub maps: Vec<crate::nat::NatMap>,
    /// Inner source prefixes whose traffic leaving through another interface is masqueraded
    /// (a hub giving its clients a way out).
    pub masquerade: Vec<Prefix>,
    /// What happens to the rules.
    pub rules: RulesMode,
}

pub use espip_sys::netlink::IfAddr;

/// The `[interface]` section, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Interface {
    /// TUN device name.
    pub name: String,
    /// Addresses set on the TUN.
    pub addresses: Vec<IfAddr>,
    /// Tunnel MTU; `None`: derived from the path MTU to the endpoints.
    pub mtu: Option<u16>,
    /// Outer source address.
    pub local: Option<IpAddr>,
    /// Where sequence number reservations are kept.
    pub state_dir: PathBuf,
    /// Turn on IPv4 forwarding (`net.ipv4.ip_forward`) while running; restored on stop.
    pub forward: bool,
    /// Reverse-path filter for the TUN while running; restored on stop.
    pub rp_filter: Option<RpFilter>,
    /// The control socket `espip show` and `espip sa` talk to (root only).
    pub control: PathBuf,
    /// The user the daemon becomes after setup (keeping `CAP_NET_ADMIN` and `CAP_NET_RAW`);
    /// `None`: it stays root.
    pub user: Option<String>,
    /// TUN offloads: TSO/checksum offload on the TUN, segmented by espip.
    pub offload: bool,
    /// The local UDP port ESP-in-UDP peers (`mode = "esp-udp"`) send to.
    pub listen_port: u16,
    /// TX threads, one per TUN queue (`IFF_MULTI_QUEUE` when above 1).
    pub tx_threads: u8,
    /// A directory (private to root) where every SA's keys are appended to Wireshark's
    /// `esp_sa` and `ikev2_decryption_table` files as the SA comes up. Debugging only.
    pub save_keys: Option<PathBuf>,
    /// How the raw-socket modes (`esp`, `ipip`) send.
    pub tx_path: TxPath,
    /// How the raw-socket modes receive.
    pub rx_path: RxPath,
    /// Commands run as root after the setup, before the privilege drop (`%i`: the
    /// interface); one that fails stops the start.
    pub post_up: Vec<String>,
    /// Commands run as root at the stop, before the TUN goes (and after a SIGKILL).
    pub pre_down: Vec<String>,
}

/// How outer packets of the raw-socket modes (`esp` as IP protocol 50, `ipip`) arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxPath {
    /// Raw IP sockets: the kernel's IP input, netfilter's `PREROUTING`/`INPUT` hooks and
    /// raw-socket delivery run for every packet (the default).
    Raw,
    /// An XDP program on each egress interface of the raw-mode peers steers their outer
    /// packets (this host's address, the peers' protocols, unfragmented) to `AF_XDP` sockets
    /// in copy mode; everything else, and everything when XDP cannot be attached, goes to the
    /// stack and the raw sockets.
    Xdp,
}

/// How outer packets of the raw-socket modes (`esp` as IP protocol 50, `ipip`) leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxPath {
    /// An `AF_PACKET` socket on the egress interface, for every destination whose next
    /// hop is resolved and whose outer packet fits the interface's MTU; the raw socket for
    /// the rest (the default).
    Auto,
    /// Always the raw socket (the kernel's IP output path: netfilter's OUTPUT and POSTROUTING
    /// hooks see the outer packets).
    Raw,
}

/// How far one TX thread can put an SA's packets out of order: a batch plus the segments of
/// one TSO read (`daemon::tx::TX_BUFS`).
pub const REORDER_PER_THREAD: usize = 192;

pub use espip_sys::privdrop::DEFAULT_USER;

/// Reverse-path filtering modes (`net.ipv4.conf.*.rp_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpFilter {
    /// 0: no check.
    Off,
    /// 1: the source must be routed back through the receiving interface.
    Strict,
    /// 2: the source must be routable through any interface.
    Loose,
}

impl RpFilter {
    /// The sysctl value.
    pub fn value(self) -> u8 {
        match self {
            RpFilter::Off => 0,
            RpFilter::Strict => 1,
            RpFilter::Loose => 2,
        }
    }
}

/// Default `interface.state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/espip";

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The interface.
    pub interface: Interface,
    /// The peers.
    pub peers: Vec<PeerSpec>,
    /// The NAT helper.
    pub nat: Nat,
    /// Capture taps, if configured.
    pub capture: Option<Capture>,
    /// Where the Prometheus metrics are served, if anywhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Things that are allowed but probably not meant (printed by `check`, logged by `run`).
    pub warnings: Vec<String>,
    /// The IKEv2 settings of the peers with `keying = "ikev2"`.
    pub ike: Vec<IkePeer>,
}

/// Largest configuration file read.
const CONFIG_MAX: u64 = 1 << 20;

impl Interface {
    /// The `[interface]` keys (as written in the file) whose values differ in `other`.
    pub fn changed_keys(&self, other: &Interface) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |key: &'static str, same: bool| {
            if !same {
                out.push(key);
            }
        };
        check("name", self.name == other.name);
        check("address", self.addresses == other.addresses);
        check("mtu", self.mtu == other.mtu);
        check("local", self.local == other.local);
        check("state_dir", self.state_dir == other.state_dir);
        check("forward", self.forward == other.forward);
        check("rp_filter", self.rp_filter == other.rp_filter);
        check("control", self.control == other.control);
        check("user", self.user == other.user);
        check("offload", self.offload == other.offload);
        check("listen_port", self.listen_port == other.listen_port);
        check("tx_threads", self.tx_threads == other.tx_threads);
        check("save_keys", self.save_keys == other.save_keys);
        check("tx_path", self.tx_path == other.tx_path);
        check("rx_path", self.rx_path == other.rx_path);
        check("post_up", self.post_up == other.post_up);
        check("pre_down", self.pre_down == other.pre_down);
        out
    }
}

impl Config {
    /// Read and validate a configuration file. Relative key file paths are resolved against
    /// the configuration file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = Config::read_text(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse_with(&text, base, &KeyFiles::disk()).map_err(|e| e.in_file(path))
    }

    /// The text of a configuration file, refused if another user could have written it.
    pub fn read_text(path: &Path) -> Result<zeroize::Zeroizing<String>, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Non-blocking: a FIFO (or a device) is refused below instead of hanging the reader.
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                .open(path)
                .map_err(read_err)?
        };
        let meta = f.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(
                    "it is not a regular file (a FIFO, a device or a directory); give the path of the configuration file itself",
                ),
            });
        }
        if meta.len() > CONFIG_MAX {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "it is {} bytes; a configuration is at most {CONFIG_MAX}",
                    meta.len()
                )),
            });
        }
        // Root takes this file as its instructions (paths it writes, commands it runs): one
        // another user could have written is refused, like a key file.
        let me = nix::unistd::geteuid().as_raw();
        if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
            return Err(ConfigError::Read {
                path: path.to_path_buf(),
                source: std::io::Error::other(format!(
                    "it belongs to uid {} with mode {:04o}; a configuration must belong to root (or the user running espip) and not be writable by group or others: `chown root: {p} && chmod 600 {p}`",
                    meta.uid(),
                    meta.mode() & 0o7777,
                    p = path.display()
                )),
            });
        }
        // The text may hold inline keys: wiped when dropped.
        let mut text = zeroize::Zeroizing::new(String::new());
        f.take(CONFIG_MAX)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        Ok(text)
    }

    /// Validate configuration text; `base` resolves relative key file paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        Config::parse_with(text, base, &KeyFiles::disk())
    }

    /// Validate configuration text, reading key files through `keys`.
    pub fn parse_with(text: &str, base: &Path, keys: &KeyFiles) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<config>"),
            message: explain_toml(text, &e),
        })?;
        let mut warnings = Vec::new();
        let interface = interface::interface(raw.interface, base)?;
        if raw.peer.is_empty() {
            return Err(invalid(
                "peer",
                "(none)",
                "at least one [[peer]] section with name, endpoint, allowed_ips and mode",
            ));
        }
        let mut peers: Vec<PeerSpec> = Vec::new();
        let mut ike = Vec::new();
        for p in raw.peer {
            let (spec, ike_peer) = peer::peer(p, base, keys, &interface, &mut warnings)?;
            ike.extend(ike_peer);
            if peers.iter().any(|q| q.name == spec.name) {
                return Err(invalid(
                    format!("peer {:?}.name", spec.name),
                    format!("{:?}", spec.name),
                    "a name no other peer has",
                ));
            }
            if let Some(e) = spec
                .endpoints()
                .into_iter()
                .find(|e| Some(*e) == interface.local)
            {
                return Err(invalid(
                    format!("peer {:?}.endpoint", spec.name),
                    e,
                    "the peer's address, not this host's own interface.local",
                ));
            }
            // interface.local is one uplink's address: every path would leave with it, and
            // the kernel sends the others' packets out of their links with a source that is
            // not theirs (dropped by the next hop's reverse-path check or a NAT).
            if let (Some(local), Some(mp)) = (interface.local, &spec.multipath) {
                if mp.paths.len() > 1 {
                    return Err(invalid(
                        "interface.local",
                        local,
                        format!(
                            "no interface.local with the multipath peer {:?} ({} paths): every path would be sent from {local}, and the packets of the paths that leave through another link would carry a source that is not theirs. Remove interface.local; each path is sent from the address the kernel's routing picks for its endpoint",
                            spec.name,
                            mp.paths.len()
                        ),
                    ));
                }
            }
            peers.push(spec);
        }
        if matches!(
            interface.rp_filter,
            Some(RpFilter::Loose | RpFilter::Strict)
        ) && !interface.addresses.iter().any(|a| a.addr.is_ipv4())
        {
            warnings.push(format!(
                "interface.rp_filter = {:?} on an interface without an IPv4 address: Linux then drops every packet whose source is routed elsewhere; use \"off\" or give {} an address",
                if interface.rp_filter == Some(RpFilter::Loose) { "loose" } else { "strict" },
                interface.name
            ));
        }
        if let Some(mtu) = interface.mtu {
            if mtu < MIN_MTU_V6 && interface.addresses.iter().any(|a| a.addr.is_ipv6()) {
                return Err(invalid(
                    "interface.mtu",
                    mtu,
                    format!("at least {MIN_MTU_V6} when the interface has an IPv6 address (RFC 8200 minimum MTU)"),
                ));
            }
        }
        let nat = nat::nat(raw.nat)?;
        let capture = capture::capture(raw.capture, base, &interface.name)?;
        let metrics = metrics(raw.metrics)?;
        // Catch what `datapath::build` would refuse, with the same words, before any setup.
        let tunnel = crate::datapath::TunnelSpec {
            relay: false,
            mtu: 1400,
        };
        crate::datapath::build(&peers, tunnel, crate::nat::NatTable::default())
            .map_err(|e| ConfigError::Peers(e.to_string()))?;
        let cfg = Config {
            interface,
            peers,
            nat,
            capture,
            metrics,
            warnings,
            ike,
        };
        cfg.check_routes()?;
        ike::check_responders_without_endpoint(&cfg.peers, &cfg.ike)?;
        let mut cfg = cfg;
        cfg.warn_reordering();
        Ok(cfg)
    }

    /// Several TX threads reorder an SA's packets by up to a batch each; a receiver whose
    /// replay window is smaller drops them as replays.
    fn warn_reordering(&mut self) {
        let n = usize::from(self.interface.tx_threads);
        if n <= 1 {
            return;
        }
        let need = n * REORDER_PER_THREAD;
        for p in &self.peers {
            if let crate::datapath::EncapSpec::Esp { replay_window, .. } = p.encap {
                if (replay_window as usize) < need {
                    self.warnings.push(format!(
                        "peer {:?}: with interface.tx_threads = {n} its packets may arrive up to {need} sequence numbers out of order; the replay window here is {replay_window}, and the peer's own must be at least {need} (strongSwan and Linux xfrm default to 32: use tx_threads = 1 with them)",
                        p.name
                    ));
                }
            }
        }
    }

    /// The NAT table of the data path.
    pub fn nat_table(&self) -> crate::nat::NatTable {
        crate::nat::NatTable::new(self.nat.maps.clone())
    }

    /// The IP versions (`true`: IPv6) a peer's packets travel over: its endpoints' or, for a
    /// peer whose endpoint is learned, `interface.local`'s (IPv4 when it is not set).
    pub fn peer_families(&self, p: &PeerSpec) -> Vec<bool> {
        match p.endpoint {
            // (Learned paths too: a peer's paths are learned in one family.)
            None => {
                vec![self.interface.local.is_some_and(|l| l.is_ipv6())]
            }
            _ => p.endpoints().iter().map(|e| e.is_ipv6()).collect(),
        }
    }

    /// Whether IKE from `ip` may be for us: it is an endpoint of a peer keyed by IKEv2 (any
    /// of its paths'), or some IKEv2 responder has no endpoint (it finds its peer by
    /// identity, from anywhere). (An established MOBIKE IKE SA's messages pass from any
    /// address by their SPIs: `EdgeStats::ike_movable`.)
    pub fn is_ike_endpoint(&self, ip: std::net::IpAddr) -> bool {
        self.ike.iter().any(|s| {
            self.peers
                .iter()
                .any(|p| p.name == s.peer && (p.endpoint.is_none() || p.endpoints().contains(&ip)))
        })
    }

    /// The prefixes routed into the TUN: every `allowed_ips` prefix except those inside a NAT
    /// `real` prefix (they are on-link; a local DNAT moves traffic for them into the alias),
    /// and every NAT `alias` prefix.
    pub fn routes(&self) -> Vec<Prefix> {
        let inside_real = |p: &Prefix| {
            self.nat
                .maps
                .iter()
                .any(|m| m.real.contains(p.addr()) && p.len() >= m.real.len())
        };
        let mut out: Vec<Prefix> = self
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .filter(|p| !inside_real(p))
            .collect();
        let accept_only: Vec<Prefix> = self
            .peers
            .iter()
            .filter(|p| !p.route)
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        out.retain(|p| !accept_only.contains(p));
        out.extend(self.nat.maps.iter().map(|m| m.alias));
        out
    }

    fn check_routes(&self) -> Result<(), ConfigError> {
        for r in self.routes() {
            for p in &self.peers {
                if let Some(e) = p.endpoints().into_iter().find(|e| r.contains(*e)) {
                    return Err(invalid(
                        format!("peer {:?}.allowed_ips", p.name),
                        r,
                        format!(
                            "prefixes that do not contain a peer endpoint ({e} is inside it, so the tunnel's own packets would be routed into the tunnel); for a peer on the same LAN, add a [[nat.map]] whose real prefix covers it"
                        ),
                    ));
                }
            }
        }
        for m in &self.nat.maps {
            for p in &self.peers {
                for a in &p.allowed_ips {
                    if m.alias.contains(a.addr()) || a.contains(m.alias.addr()) {
                        return Err(invalid(
                            format!("peer {:?}.allowed_ips", p.name),
                            a,
                            format!("a prefix that does not overlap the NAT alias prefix {} (this one does): list the peer's real addresses; espip maps them to the alias itself", m.alias),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn metrics(raw: Option<RawMetrics>) -> Result<Option<std::net::SocketAddr>, ConfigError> {
    let Some(listen) = raw.and_then(|r| r.listen) else {
        return Ok(None);
    };
    listen.trim().parse().map(Some).map_err(|_| {
        invalid(
            "metrics.listen",
            format!("{listen:?}"),
            "an address and port of this host, e.g. \"127.0.0.1:9587\" (IPv6: \"[::1]:9587\")",
        )
    })
}

/// toml's message for a mistyped value names the line but not the key (`invalid type: string
/// "1400", expected i64`): prefix the dotted key and say what to write.
fn explain_toml(text: &str, e: &toml::de::Error) -> String {
    let msg = e.to_string().trim_end().to_string();
    let Some(span) = e.span() else { return msg };
    let before = &text[..span.start.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let line = line.split('\n').next().unwrap_or("");
    let Some((key, _)) = line.split_once('=') else {
        return msg;
    };
    let key = key.trim();
    let section = before[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let full = match section {
        Some(sec) => format!("{sec}.{key}"),
        None => key.to_string(),
    };
    let hint = if msg.contains("expected i64") || msg.contains("expected u") {
        Some("a whole number, without quotes (e.g. `mtu = 1400`)")
    } else if msg.contains("expected a boolean") {
        Some("true or false, without quotes")
    } else if msg.contains("expected a string") {
        Some("a quoted string")
    } else if msg.contains("expected a sequence") {
        Some("a list in brackets, e.g. [\"10.4.2.5/32\"]")
    } else {
        None
    };
    match hint {
        Some(h) => format!("{full}: {h}\n{msg}"),
        None => format!("{full}: {msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::EncapSpec;

    const KEY16: &str = "0x000102030405060708090a0b0c0d0e0f10111213";
    const KEY16B: &str = "0x100102030405060708090a0b0c0d0e0f10111213";

    fn base(extra: &str) -> String {
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
mode = "esp"
cipher = "aes-128-gcm"
spi_out = "0x00001001"
spi_in = 4098
key_out = "{KEY16}"
key_in = "{KEY16B}"
{extra}
"#
        )
    }

    fn err(text: &str) -> String {
        Config::parse(text, Path::new(".")).unwrap_err().to_string()
    }

    #[test]
    fn the_issue_example_parses() {
        let c = Config::parse(&base(""), Path::new(".")).unwrap();
        assert_eq!(c.interface.name, "espip0");
        assert_eq!(c.peers.len(), 1);
        match &c.peers[0].encap {
            EncapSpec::Esp {
                spi_out,
                spi_in,
                replay_window,
                esn,
                ..
            } => {
                assert_eq!(
                    (*spi_out, *spi_in, *replay_window, *esn),
                    (0x1001, 0x1002, 1024, false)
                );
            }
            _ => panic!("esp expected"),
        }
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn errors_name_key_value_and_expectation() {
        let e = err(&base("").replace("\"aes-128-gcm\"", "\"aes-gcm\""));
        assert!(
            e.contains("peer \"b\".cipher")
                && e.contains("aes-gcm")
                && e.contains("chacha20-poly1305"),
            "{e}"
        );
        let e = err(&base("").replace("spi_in = 4098", "spi_in = 7"));
        assert!(e.contains("spi_in = 7") && e.contains("reserved"), "{e}");
        let e = err(&base("").replace(KEY16B, "0x1234"));
        assert!(
            e.contains("key_in") && e.contains("2 bytes") && e.contains("genkey"),
            "{e}"
        );
        assert!(!e.contains("1234"), "keys never echoed: {e}");
        let e = err(&base("replay_window = 0\nesn = true"));
        assert!(e.contains("replay_window"), "{e}");
        let e = err(&base("colour = \"red\""));
        assert!(e.contains("colour"), "{e}");
        let e = err(&base("").replace("192.0.2.2", "192.0.2.300"));
        assert!(e.contains("endpoint") && e.contains("192.0.2.300"), "{e}");
        let e = err(&base("").replace("espip0", "a-name-that-is-too-long"));
        assert!(e.contains("interface.name"), "{e}");
        let e = err(&base("").replace("mode = \"esp\"", "mode = \"gre\""));
        assert!(e.contains("\"esp-udp\""), "{e}");
    }

    #[test]
    fn esp_udp_takes_a_port_and_the_others_refuse_one() {
        let udp = base("").replace("mode = \"esp\"", "mode = \"esp-udp\"");
        let c = Config::parse(&udp, Path::new(".")).unwrap();
        assert_eq!(c.interface.listen_port, 4500);
        assert!(matches!(
            c.peers[0].encap,
            EncapSpec::Esp {
                udp_port: Some(4500),
                ..
            }
        ));
        let c = Config::parse(
            &udp.replace("\"192.0.2.2\"", "\"192.0.2.2:14500\"")
                .replace("[interface]", "[interface]\nlisten_port = 14501"),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.interface.listen_port, 14501);
        assert_eq!(c.peers[0].endpoint_text(), "192.0.2.2");
        assert!(matches!(
            c.peers[0].encap,
            EncapSpec::Esp {
                udp_port: Some(14500),
                ..
            }
        ));
        // IPv6 endpoints, with a port in brackets for esp-udp; the mapped form is refused.
        let c = Config::parse(
            &udp.replace("\"192.0.2.2\"", "\"[2001:db8::2]:14500\""),
            Path::new("."),
        )
        .unwrap();
        assert_eq!(c.peers[0].endpoint_text(), "2001:db8::2");
        let c = Config::parse(
            &base("").replace("\"192.0.2.2\"", "\"2001:db8::2\""),
            Path::new("."),
        )
        .unwrap();
        assert!(c.peers[0].endpoint.unwrap().is_ipv6());
        let e = err(&base("").replace("\"192.0.2.2\"", "\"::ffff:192.0.2.2\""));
        assert!(e.contains("IPv4 address itself"), "{e}");
        let e = err(&base("").replace("\"192.0.2.2\"", "\"192.0.2.2:4500\""));
        assert!(e.contains("endpoint") && e.contains("esp-udp"), "{e}");
        let e = err(&udp.replace("\"192.0.2.2\"", "\"192.0.2.2:0\""));
        assert!(e.contains("endpoint") && e.contains("1 to 65535"), "{e}");
        let e = err(&udp.replace("[interface]", "[interface]\nlisten_port = 70000"));
        assert!(
            e.contains("interface.listen_port") && e.contains("70000"),
            "{e}"
        );
    }

    #[test]
    fn tx_threads_are_bounded_and_a_small_replay_window_is_warned_about() {
        let two =
            |extra: &str| base(extra).replace("[interface]\n", "[interface]\ntx_threads = 2\n");
        let c = Config::parse(&two(""), Path::new(".")).unwrap();
        assert_eq!(c.interface.tx_threads, 2);
        assert!(
            c.warnings.is_empty(),
            "window 1024 >= 2 x 192: {:?}",
            c.warnings
        );
        let c = Config::parse(&two("replay_window = 64"), Path::new(".")).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("tx_threads = 2") && w.contains("384")),
            "{:?}",
            c.warnings
        );
        let e = err(&base("").replace("[interface]\n", "[interface]\ntx_threads = 9\n"));
        assert!(
            e.contains("interface.tx_threads") && e.contains("1 to 8"),
            "{e}"
        );
        assert_eq!(
            Config::parse(&base(""), Path::new("."))
                .unwrap()
                .interface
                .tx_threads,
            1
        );
    }

    #[test]
    fn ipip_refuses_keys_and_warns() {
        let text = r#"
[interface]
name = "espip0"
[[peer]]
name = "b"
endpoint = "192.0.2.2"
allowed_ips = ["10.4.2.5/32"]
mode = "ipip"
"#;
        let c = Config::parse(text, Path::new(".")).unwrap();
        assert!(c.warnings[0].contains("unencrypted"));
        let e = err(&format!("{text}cipher = \"aes-128-gcm\"\n"));
        assert!(e.contains("cipher") && e.contains("ipip"), "{e}");
    }

    /// Issue 29: a static-key ESP peer may leave `endpoint` out (learned); an ipip peer and
    /// an IKEv2 peer may not, and the error says why.
    #[test]
    fn an_endpoint_is_learned_for_static_esp_only() {
        let learned = base("").replace("endpoint = \"192.0.2.2\"\n", "");
        let c = Config::parse(&learned, Path::new(".")).unwrap();
        assert_eq!(c.peers[0].endpoint, None);
        assert_eq!(c.peers[0].endpoint_text(), "(learned from its packets)");
        assert_eq!(c.peer_families(&c.peers[0]), vec![false]);
        let ipip = "[interface]\nname = \"espip0\"\n[[peer]]\nname = \"b\"\nallowed_ips = [\"10.4.2.5/32\"]\nmode = \"ipip\"\n";
        let e = err(ipip);
        assert!(e.contains("endpoint") && e.contains("ipip"), "{e}");
        let ike = "[interface]\nname = \"espip0\"\nlocal = \"192.0.2.1\"\n[[peer]]\nname = \"b\"\nallowed_ips = [\"10.4.2.5/32\"]\nmode = \"esp\"\nkeying = \"ikev2\"\npsk_file = \"x.psk\"\n";
        let e = err(&format!("{ike}role = \"initiator\"\n"));
        assert!(
            e.contains("endpoint") && e.contains("Only role = \"responder\""),
            "{e}"
        );
        let e = err(&format!("{ike}role = \"responder\"\n"));
        assert!(
            e.contains("remote_id") && e.contains("finds its peer by it"),
            "{e}"
        );
    }

    #[test]
    fn key_file_permissions_are_enforced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("espip-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.key");
        std::fs::write(&f, format!("{KEY16B}\n")).unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = base("").replace(&format!("key_in = \"{KEY16B}\""), "key_in_file = \"b.key\"");
        let e = Config::parse(&text, &dir).unwrap_err();
        assert!(
            matches!(e, ConfigError::KeyFilePermissions { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        Config::parse(&text, &dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn duplicate_spi_and_prefix_are_refused() {
        let second = format!(
            r#"
[[peer]]
name = "c"
endpoint = "192.0.2.3"
allowed_ips = ["10.4.2.5/32"]
mode = "esp"
cipher = "aes-128-gcm"
spi_out = 5000
spi_in = 5001
key_out = "{KEY16}"
key_in = "{KEY16B}"
"#
        );
        let e = err(&format!("{}{second}", base("")));
        assert!(
            e.contains("10.4.2.5/32") && e.contains("\"b\"") && e.contains("\"c\""),
            "{e}"
        );
    }

    #[test]
    fn nat_maps_are_validated() {
        let lan = |nat: &str| {
            format!(
                "[interface]\nname = \"espip0\"\n{nat}\n[[peer]]\nname = \"b\"\nendpoint = \"10.0.0.160\"\nallowed_ips = [\"10.0.0.160/32\"]\nmode = \"ipip\"\n"
            )
        };
        let ok = lan("[[nat.map]]\nreal = \"10.0.0.0/24\"\nalias = \"10.0.1.0/24\"\n");
        let c = Config::parse(&ok, Path::new(".")).unwrap();
        assert_eq!(c.nat.rules, RulesMode::Apply, "maps default to apply");
        assert_eq!(
            c.routes(),
            vec!["10.0.1.0/24".parse().unwrap()],
            "the on-link peer is not routed; the alias is"
        );
        let e = err(&lan(
            "[[nat.map]]\nreal = \"10.0.0.0/24\"\nalias = \"10.0.1.0/25\"\n",
        ));
        assert!(e.contains("same size") && e.contains("10.0.1.0/25"), "{e}");
        let e = err(&lan(
            "[[nat.map]]\nreal = \"10.0.0.0/16\"\nalias = \"10.0.1.0/16\"\n",
        ));
        assert!(e.contains("does not overlap"), "{e}");
        let e = err(&lan("[nat]\nrules = \"sometimes\"\n[[nat.map]]\nreal = \"10.0.0.0/24\"\nalias = \"10.0.1.0/24\"\n"));
        assert!(e.contains("nat.rules") && e.contains("print"), "{e}");
        // Without a map, an on-link peer's address would be routed into the tunnel: a loop.
        let e = err(&lan(""));
        assert!(e.contains("nat.map") && e.contains("10.0.0.160"), "{e}");
    }
}

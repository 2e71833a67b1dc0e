//! The TOML configuration: parsing, validation with errors that name the key, the bad value and
//! what is expected, and key files with ssh-like permission checks.

use crate::datapath::{EncapSpec, PeerSpec};
use crate::prefix::Prefix;
use crate::sa::{Cipher, KeyMaterial};
use serde::Deserialize;
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: RawInterface,
    #[serde(default)]
    peer: Vec<RawPeer>,
    nat: Option<RawNat>,
    capture: Option<RawCapture>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    dir: Option<PathBuf>,
    inner: Option<bool>,
    outer: Option<bool>,
    max_file_mb: Option<i64>,
    files: Option<i64>,
    snaplen: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Option<String>,
}

/// The `[capture]` section, validated: pcap taps on the TUN side and the wire side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capture {
    /// Where `<interface>-inner.pcap` and `<interface>-outer.pcap` are written.
    pub dir: PathBuf,
    /// Tap the inner packets (as read from / written to the TUN).
    pub inner: bool,
    /// Tap the outer packets (as sent / received on the raw sockets).
    pub outer: bool,
    /// A file is rotated when it would grow past this many bytes.
    pub max_file_bytes: u64,
    /// Files kept per tap, the current one included (`x.pcap`, `x.pcap.1`, ...).
    pub files: u32,
    /// Bytes kept of each packet.
    pub snaplen: u32,
}

/// Default `capture.max_file_mb`.
pub const DEFAULT_CAPTURE_FILE_MB: u64 = 64;
/// Default `capture.files`.
pub const DEFAULT_CAPTURE_FILES: u32 = 4;
/// Default directory of the control sockets.
pub const DEFAULT_CONTROL_DIR: &str = "/run/espip";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNat {
    rules: Option<String>,
    #[serde(default)]
    map: Vec<RawMap>,
    #[serde(default)]
    masquerade: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMap {
    real: String,
    alias: String,
}

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
#[derive(Debug, Clone)]
pub struct Nat {
    /// The real <-> alias mappings.
    pub maps: Vec<crate::nat::NatMap>,
    /// Inner source prefixes whose traffic leaving through another interface is masqueraded
    /// (a hub giving its clients a way out).
    pub masquerade: Vec<Prefix>,
    /// What happens to the rules.
    pub rules: RulesMode,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInterface {
    name: String,
    #[serde(default)]
    address: Vec<String>,
    mtu: Option<i64>,
    local: Option<String>,
    state_dir: Option<PathBuf>,
    forward: Option<bool>,
    rp_filter: Option<String>,
    control: Option<PathBuf>,
    user: Option<String>,
    offload: Option<bool>,
    listen_port: Option<i64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SpiValue {
    Int(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    name: String,
    endpoint: String,
    #[serde(default)]
    allowed_ips: Vec<String>,
    mode: String,
    cipher: Option<String>,
    spi_out: Option<SpiValue>,
    spi_in: Option<SpiValue>,
    key_out: Option<zeroize::Zeroizing<String>>,
    key_in: Option<zeroize::Zeroizing<String>>,
    key_out_file: Option<PathBuf>,
    key_in_file: Option<PathBuf>,
    replay_window: Option<i64>,
    esn: Option<bool>,
    route: Option<bool>,
    lifetime_packets: Option<i64>,
    lifetime_bytes: Option<i64>,
    lifetime_seconds: Option<i64>,
}

/// An address on the TUN, with its prefix length (host bits kept).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfAddr {
    /// The address.
    pub addr: IpAddr,
    /// Prefix length.
    pub len: u8,
}

impl std::fmt::Display for IfAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The `[interface]` section, validated.
#[derive(Debug, Clone)]
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
}

/// Default `interface.user`.
pub const DEFAULT_USER: &str = "espip";

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
}

impl Config {
    /// Read and validate a configuration file. Relative key file paths are resolved against
    /// the configuration file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        let read_err = |source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(read_err)?;
        let meta = f.metadata().map_err(read_err)?;
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
        f.read_to_string(&mut text).map_err(read_err)?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|e| match e {
            ConfigError::Syntax { message, .. } => ConfigError::Syntax {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Validate configuration text; `base` resolves relative key file paths.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<config>"),
            message: explain_toml(text, &e),
        })?;
        let mut warnings = Vec::new();
        let interface = interface(raw.interface, base)?;
        if raw.peer.is_empty() {
            return Err(invalid(
                "peer",
                "(none)",
                "at least one [[peer]] section with name, endpoint, allowed_ips and mode",
            ));
        }
        let mut peers: Vec<PeerSpec> = Vec::new();
        for p in raw.peer {
            let spec = peer(p, base, &mut warnings)?;
            if peers.iter().any(|q| q.name == spec.name) {
                return Err(invalid(
                    format!("peer {:?}.name", spec.name),
                    format!("{:?}", spec.name),
                    "a name no other peer has",
                ));
            }
            if Some(spec.endpoint) == interface.local {
                return Err(invalid(
                    format!("peer {:?}.endpoint", spec.name),
                    spec.endpoint,
                    "the peer's address, not this host's own interface.local",
                ));
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
        let nat = nat(raw.nat)?;
        let capture = capture(raw.capture, base, &interface.name)?;
        let metrics = metrics(raw.metrics)?;
        // Catch what `datapath::build` would refuse, with the same words, before any setup.
        let tunnel = crate::datapath::TunnelSpec {
            relay: false,
            mtu: 1400,
        };
        crate::datapath::build(&peers, tunnel, crate::nat::NatTable::default())
            .map_err(|e| invalid("peer", "(several)", e.to_string()))?;
        let cfg = Config {
            interface,
            peers,
            nat,
            capture,
            metrics,
            warnings,
        };
        cfg.check_routes()?;
        Ok(cfg)
    }

    /// The NAT table of the data path.
    pub fn nat_table(&self) -> crate::nat::NatTable {
        crate::nat::NatTable::new(self.nat.maps.clone())
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
                if r.contains(p.endpoint) {
                    return Err(invalid(
                        format!("peer {:?}.allowed_ips", p.name),
                        r,
                        format!(
                            "prefixes that do not contain a peer endpoint ({} is inside it, so the tunnel's own packets would be routed into the tunnel); for a peer on the same LAN, add a [[nat.map]] whose real prefix covers it",
                            p.endpoint
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
                            format!("a prefix outside the NAT alias prefix {}: list the peer's real addresses; espip maps them to the alias itself", m.alias),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

fn nat(raw: Option<RawNat>) -> Result<Nat, ConfigError> {
    let Some(raw) = raw else {
        return Ok(Nat {
            maps: Vec::new(),
            masquerade: Vec::new(),
            rules: RulesMode::Off,
        });
    };
    let mut maps: Vec<crate::nat::NatMap> = Vec::new();
    for m in raw.map {
        let parse = |key: &str, v: &str| -> Result<Prefix, ConfigError> {
            let p: Prefix = v.parse().map_err(|e: crate::prefix::BadPrefix| {
                invalid(format!("nat.map.{key}"), format!("{v:?}"), e.to_string())
            })?;
            if !p.addr().is_ipv4() {
                return Err(invalid(
                    format!("nat.map.{key}"),
                    format!("{v:?}"),
                    "an IPv4 prefix: the NAT helper rewrites IPv4 only",
                ));
            }
            Ok(p)
        };
        let real = parse("real", &m.real)?;
        let alias = parse("alias", &m.alias)?;
        if real.len() != alias.len() {
            return Err(invalid(
                "nat.map.alias",
                format!("{:?}", m.alias),
                format!("a prefix of the same size as real = {real} (/{}): a host keeps its host part in the alias", real.len()),
            ));
        }
        let overlap = |a: &Prefix, b: &Prefix| a.contains(b.addr()) || b.contains(a.addr());
        if overlap(&real, &alias) {
            return Err(invalid(
                "nat.map.alias",
                format!("{:?}", m.alias),
                format!("a prefix that does not overlap real = {real}"),
            ));
        }
        for o in &maps {
            for (x, y) in [
                (real, o.real),
                (real, o.alias),
                (alias, o.real),
                (alias, o.alias),
            ] {
                if overlap(&x, &y) {
                    return Err(invalid(
                        "nat.map",
                        format!("{real} -> {alias}"),
                        format!(
                            "prefixes that do not overlap another map ({} -> {})",
                            o.real, o.alias
                        ),
                    ));
                }
            }
        }
        maps.push(crate::nat::NatMap { real, alias });
    }
    let mut masquerade = Vec::new();
    for m in &raw.masquerade {
        let p: Prefix = m.parse().map_err(|e: crate::prefix::BadPrefix| {
            invalid("nat.masquerade", format!("{m:?}"), e.to_string())
        })?;
        if !p.addr().is_ipv4() {
            return Err(invalid(
                "nat.masquerade",
                format!("{m:?}"),
                "an IPv4 source prefix (iptables MASQUERADE is IPv4)",
            ));
        }
        masquerade.push(p);
    }
    let rules = match raw.rules.as_deref() {
        None if maps.is_empty() && masquerade.is_empty() => RulesMode::Off,
        None | Some("apply") => RulesMode::Apply,
        Some("print") => RulesMode::Print,
        Some("off") => RulesMode::Off,
        Some(other) => {
            return Err(invalid("nat.rules", format!("{other:?}"), "\"apply\" (install on start, remove on stop), \"print\" (only show them) or \"off\""));
        }
    };
    Ok(Nat {
        maps,
        masquerade,
        rules,
    })
}

fn interface(raw: RawInterface, base: &Path) -> Result<Interface, ConfigError> {
    let name = raw.name;
    if name.is_empty()
        || name.len() > 15
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        || name == "."
        || name == ".."
    {
        return Err(invalid(
            "interface.name",
            format!("{name:?}"),
            "a Linux interface name: 1 to 15 characters, no '/', ':' or spaces (e.g. \"espip0\")",
        ));
    }
    let mut addresses = Vec::new();
    for a in &raw.address {
        let (addr, len) = a.split_once('/').ok_or_else(|| {
            invalid(
                "interface.address",
                format!("{a:?}"),
                "an address with its prefix length, e.g. \"10.4.2.99/24\"",
            )
        })?;
        let addr: IpAddr = addr.trim().parse().map_err(|_| {
            invalid(
                "interface.address",
                format!("{a:?}"),
                "an IPv4 or IPv6 address with prefix length, e.g. \"10.4.2.99/24\"",
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len: u8 = len
            .trim()
            .parse()
            .ok()
            .filter(|l| *l <= max)
            .ok_or_else(|| {
                invalid(
                    "interface.address",
                    format!("{a:?}"),
                    format!("a prefix length from 0 to {max}"),
                )
            })?;
        addresses.push(IfAddr { addr, len });
    }
    let mtu = match raw.mtu {
        None => None,
        Some(m) if (i64::from(MIN_MTU_V4)..=65535).contains(&m) => Some(m as u16),
        Some(m) => {
            return Err(invalid(
                "interface.mtu",
                m,
                format!(
                "a number from {MIN_MTU_V4} to 65535, or no mtu key to derive it from the path MTU"
            ),
            ))
        }
    };
    let local = match raw.local {
        None => None,
        Some(l) => Some(l.trim().parse::<IpAddr>().map_err(|_| {
            invalid(
                "interface.local",
                format!("{l:?}"),
                "an IP address of this host, e.g. \"192.0.2.1\"",
            )
        })?),
    };
    if let Some(IpAddr::V6(_)) = local {
        return Err(invalid(
            "interface.local",
            local.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            "an IPv4 address: the outer (underlay) side is IPv4 in this version",
        ));
    }
    let state_dir = match raw.state_dir {
        None => PathBuf::from(DEFAULT_STATE_DIR),
        Some(d) if d.as_os_str().is_empty() => {
            return Err(invalid(
                "interface.state_dir",
                "\"\"",
                "a directory for sequence number state, e.g. \"/var/lib/espip\"",
            ))
        }
        Some(d) if d.is_relative() => base.join(d),
        Some(d) => d,
    };
    let rp_filter = match raw.rp_filter.as_deref() {
        None => None,
        Some("off") => Some(RpFilter::Off),
        Some("strict") => Some(RpFilter::Strict),
        Some("loose") => Some(RpFilter::Loose),
        Some(other) => {
            return Err(invalid(
                "interface.rp_filter",
                format!("{other:?}"),
                "\"loose\" (a relay receiving sources routed elsewhere), \"strict\" or \"off\"; leave it out to keep the system setting",
            ))
        }
    };
    let control = match raw.control {
        None => crate::control::default_dir().join(format!("{name}.sock")),
        Some(c) if c.as_os_str().is_empty() || c.file_name().is_none() => {
            return Err(invalid(
                "interface.control",
                format!("{:?}", c.display().to_string()),
                format!("a socket path, e.g. \"{DEFAULT_CONTROL_DIR}/{name}.sock\""),
            ))
        }
        Some(c) if c.is_relative() => base.join(c),
        Some(c) => c,
    };
    let user = match raw.user.as_deref().map(str::trim) {
        None => Some(DEFAULT_USER.to_string()),
        Some("root") => None,
        Some("") => {
            return Err(invalid(
                "interface.user",
                "\"\"",
                "a user name (the daemon runs as it after setup), or \"root\" to keep root",
            ))
        }
        Some(u) => Some(u.to_string()),
    };
    let listen_port = match raw.listen_port {
        None => crate::wire::ip::IPSEC_NAT_T_PORT,
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(invalid(
                "interface.listen_port",
                p,
                "a UDP port from 1 to 65535 (4500, the IPsec NAT-T port, by default)",
            ))
        }
    };
    Ok(Interface {
        offload: raw.offload.unwrap_or(true),
        listen_port,
        user,
        control,
        name,
        addresses,
        mtu,
        local,
        state_dir,
        forward: raw.forward.unwrap_or(false),
        rp_filter,
    })
}

fn capture(
    raw: Option<RawCapture>,
    base: &Path,
    ifname: &str,
) -> Result<Option<Capture>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    let dir = match raw.dir {
        Some(d) if !d.as_os_str().is_empty() => {
            if d.is_relative() {
                base.join(d)
            } else {
                d
            }
        }
        _ => {
            return Err(invalid(
                "capture.dir",
                "(missing)",
                format!("a directory for {ifname}-inner.pcap and {ifname}-outer.pcap, e.g. \"/var/log/espip\"; remove [capture] to capture nothing"),
            ))
        }
    };
    let (inner, outer) = (raw.inner.unwrap_or(true), raw.outer.unwrap_or(true));
    if !inner && !outer {
        return Err(invalid(
            "capture.inner/outer",
            "false/false",
            "at least one tap switched on, or no [capture] section",
        ));
    }
    let max_mb = raw.max_file_mb.unwrap_or(DEFAULT_CAPTURE_FILE_MB as i64);
    if !(1..=1 << 20).contains(&max_mb) {
        return Err(invalid(
            "capture.max_file_mb",
            max_mb,
            "a file size in MB from 1 to 1048576",
        ));
    }
    let files = raw.files.unwrap_or(DEFAULT_CAPTURE_FILES as i64);
    if !(1..=1000).contains(&files) {
        return Err(invalid(
            "capture.files",
            files,
            "the number of files kept per tap, from 1 to 1000 (older ones are deleted)",
        ));
    }
    let snaplen = raw.snaplen.unwrap_or(65535);
    if !(64..=65535).contains(&snaplen) {
        return Err(invalid(
            "capture.snaplen",
            snaplen,
            "bytes kept of each packet, from 64 to 65535",
        ));
    }
    Ok(Some(Capture {
        dir,
        inner,
        outer,
        max_file_bytes: max_mb as u64 * 1_000_000,
        files: files as u32,
        snaplen: snaplen as u32,
    }))
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

fn spi(key: String, v: Option<SpiValue>) -> Result<u32, ConfigError> {
    let expected = "an SPI from 0x100 to 0xffffffff, as \"0x...\" hex or a decimal number (0-255 are reserved, RFC 4303 section 2.1)";
    let (n, shown) = match v {
        None => return Err(invalid(key, "(missing)", expected)),
        Some(SpiValue::Int(i)) => (u32::try_from(i).ok(), i.to_string()),
        Some(SpiValue::Str(s)) => {
            let t = s.trim();
            let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u32::from_str_radix(h, 16).ok(),
                None => t.parse::<u32>().ok(),
            };
            (n, format!("{s:?}"))
        }
    };
    match n {
        Some(n) if n >= 256 => Ok(n),
        _ => Err(invalid(key, shown, expected)),
    }
}

fn key_material(
    key: &str,
    inline: Option<zeroize::Zeroizing<String>>,
    file: Option<PathBuf>,
    base: &Path,
    cipher: Cipher,
) -> Result<KeyMaterial, ConfigError> {
    let expected = format!(
        "0x followed by {} hex digits: a {}-byte key and a 4-byte salt (`espip genkey --cipher {}` makes one)",
        2 * (cipher.key_len() + 4),
        cipher.key_len(),
        cipher.name()
    );
    match (inline, file) {
        (Some(_), Some(_)) => Err(invalid(
            key,
            "(both inline and _file)",
            format!("either {key} or {key}_file, not both"),
        )),
        (None, None) => Err(invalid(
            key,
            "(missing)",
            format!("{key} = \"{expected}\", or {key}_file = \"path\""),
        )),
        (Some(hex), None) => KeyMaterial::from_hex(cipher, &hex)
            .map_err(|e| invalid(key, "\"<redacted>\"", format!("{e}; expected {expected}"))),
        (None, Some(path)) => {
            let path = if path.is_relative() {
                base.join(path)
            } else {
                path
            };
            let fkey = format!("{key}_file");
            let text = read_key_file(&fkey, &path)?;
            KeyMaterial::from_hex(cipher, &text).map_err(|e| {
                invalid(
                    &fkey,
                    path.display(),
                    format!("a file holding {expected}: {e}"),
                )
            })
        }
    }
}

/// Largest key file read: a key is at most 2 + 2 x 36 hex digits and a newline.
const KEY_FILE_MAX: u64 = 4096;

/// Read a key file as ssh reads a private key: a regular file (a link is followed, but its
/// target must be one), owned by root or the user running espip, not readable by others, of a
/// sane size. Opened with `O_NONBLOCK`, so a FIFO is refused instead of hanging.
fn read_key_file(fkey: &str, path: &Path) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let unreadable =
        |e: std::io::Error| invalid(fkey, path.display(), format!("a readable key file ({e})"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(unreadable)?;
    let meta = f.metadata().map_err(unreadable)?;
    // Messages name the file itself, not a link to it (`chmod` on a link to /dev/zero would
    // change /dev/zero).
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else if meta.file_type().is_char_device() || meta.file_type().is_block_device() {
            "a device"
        } else if meta.file_type().is_fifo() {
            "a FIFO"
        } else {
            "not a regular file"
        };
        return Err(invalid(
            fkey,
            path.display(),
            format!(
                "a regular file holding the key; {} is {kind}",
                real.display()
            ),
        ));
    }
    let uid = meta.uid();
    if uid != 0 && uid != nix::unistd::geteuid().as_raw() {
        return Err(ConfigError::KeyFileOwner {
            key: fkey.to_string(),
            path: real,
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::KeyFilePermissions {
            key: fkey.to_string(),
            path: real,
            mode,
        });
    }
    let mut text = zeroize::Zeroizing::new(String::with_capacity(KEY_FILE_MAX as usize + 1));
    f.take(KEY_FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(unreadable)?;
    if text.len() as u64 > KEY_FILE_MAX {
        return Err(invalid(
            fkey,
            path.display(),
            format!("a key file of a few dozen bytes; this one is over {KEY_FILE_MAX}"),
        ));
    }
    Ok(text)
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

fn peer(p: RawPeer, base: &Path, warnings: &mut Vec<String>) -> Result<PeerSpec, ConfigError> {
    let name = p.name.clone();
    let k = |field: &str| format!("peer {name:?}.{field}");
    if name.is_empty() {
        return Err(invalid("peer.name", "\"\"", "a non-empty name"));
    }
    let (endpoint, port): (IpAddr, Option<u16>) =
        match p.endpoint.trim().parse::<std::net::SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => (
                p.endpoint.trim().parse().map_err(|_| {
                    invalid(
                        k("endpoint"),
                        format!("{:?}", p.endpoint),
                        "the peer's outer IPv4 address, e.g. \"192.0.2.2\" (with mode = \"esp-udp\" optionally a port: \"192.0.2.2:4500\")",
                    )
                })?,
                None,
            ),
        };
    if port.is_some() && p.mode != "esp-udp" {
        return Err(invalid(
            k("endpoint"),
            format!("{:?}", p.endpoint),
            "an address without a port: only mode = \"esp-udp\" (ESP in UDP) sends to a port",
        ));
    }
    if port == Some(0) {
        return Err(invalid(
            k("endpoint"),
            format!("{:?}", p.endpoint),
            "a UDP port from 1 to 65535 (4500 if left out)",
        ));
    }
    if endpoint.is_ipv6() {
        return Err(invalid(
            k("endpoint"),
            endpoint,
            "an IPv4 address: the outer (underlay) side is IPv4 in this version",
        ));
    }
    if endpoint.is_unspecified() || endpoint.is_multicast() {
        return Err(invalid(k("endpoint"), endpoint, "a unicast address"));
    }
    let mut allowed_ips = Vec::new();
    for a in &p.allowed_ips {
        let prefix: Prefix = a.parse().map_err(|e: crate::prefix::BadPrefix| {
            invalid(k("allowed_ips"), format!("{a:?}"), e.to_string())
        })?;
        allowed_ips.push(prefix);
    }
    if allowed_ips.is_empty() {
        warnings.push(format!(
            "peer {name:?} has no allowed_ips: nothing will be routed to it or accepted from it"
        ));
    }
    let encap = match p.mode.as_str() {
        "ipip" => {
            for (field, set) in [
                ("cipher", p.cipher.is_some()),
                ("spi_out", p.spi_out.is_some()),
                ("spi_in", p.spi_in.is_some()),
                ("key_out", p.key_out.is_some() || p.key_out_file.is_some()),
                ("key_in", p.key_in.is_some() || p.key_in_file.is_some()),
                ("esn", p.esn.is_some()),
                ("replay_window", p.replay_window.is_some()),
                ("lifetime_packets", p.lifetime_packets.is_some()),
                ("lifetime_bytes", p.lifetime_bytes.is_some()),
                ("lifetime_seconds", p.lifetime_seconds.is_some()),
            ] {
                if set {
                    return Err(invalid(
                        k(field),
                        "(set)",
                        "nothing: mode = \"ipip\" carries packets unprotected; remove the key or use mode = \"esp\"",
                    ));
                }
            }
            warnings.push(format!(
                "peer {name:?} uses ipip: packets cross the wire unencrypted and unauthenticated"
            ));
            EncapSpec::IpIp
        }
        "esp" | "esp-udp" => {
            let cname = p.cipher.clone().unwrap_or_default();
            let cipher = Cipher::from_name(&cname).ok_or_else(|| {
                invalid(
                    k("cipher"),
                    if p.cipher.is_some() {
                        format!("{cname:?}")
                    } else {
                        "(missing)".into()
                    },
                    "one of \"aes-128-gcm\", \"aes-256-gcm\", \"chacha20-poly1305\"",
                )
            })?;
            let spi_out = spi(k("spi_out"), p.spi_out)?;
            let spi_in = spi(k("spi_in"), p.spi_in)?;
            let key_out = key_material(&k("key_out"), p.key_out, p.key_out_file, base, cipher)?;
            let key_in = key_material(&k("key_in"), p.key_in, p.key_in_file, base, cipher)?;
            let replay_window = match p.replay_window {
                None => DEFAULT_REPLAY_WINDOW,
                Some(w) if (0..=i64::from(MAX_REPLAY_WINDOW)).contains(&w) => w as u32,
                Some(w) => {
                    return Err(invalid(
                        k("replay_window"),
                        w,
                        format!("a packet count from 0 (off) to {MAX_REPLAY_WINDOW}"),
                    ))
                }
            };
            let esn = p.esn.unwrap_or(false);
            if replay_window == 0 {
                if esn {
                    return Err(invalid(
                        k("replay_window"),
                        0,
                        "a window above 0 with esn = true: the receiver infers the high sequence bits from the window (RFC 4303 appendix A)",
                    ));
                }
                warnings.push(format!(
                    "peer {name:?}: replay_window = 0 turns anti-replay off; captured packets can be replayed"
                ));
            }
            if key_in.to_hex() == key_out.to_hex() {
                warnings.push(format!(
                    "peer {name:?}: key_in equals key_out; use a different key each way so the two directions never share a nonce space"
                ));
            }
            let limit = |field: &str, v: Option<i64>| -> Result<Option<u64>, ConfigError> {
                match v {
                    None => Ok(None),
                    Some(n) if n > 0 => Ok(Some(n as u64)),
                    Some(n) => Err(invalid(
                        k(field),
                        n,
                        "a positive number (the SA stops when it is reached), or no key for no limit",
                    )),
                }
            };
            let lifetime = crate::datapath::Lifetime {
                packets: limit("lifetime_packets", p.lifetime_packets)?,
                bytes: limit("lifetime_bytes", p.lifetime_bytes)?,
                seconds: limit("lifetime_seconds", p.lifetime_seconds)?,
            };
            EncapSpec::Esp {
                cipher,
                spi_out,
                key_out,
                spi_in,
                key_in,
                replay_window,
                esn,
                lifetime,
                udp_port: (p.mode == "esp-udp")
                    .then(|| port.unwrap_or(crate::wire::ip::IPSEC_NAT_T_PORT)),
            }
        }
        other => {
            return Err(invalid(
                k("mode"),
                format!("{other:?}"),
                "\"esp\", \"esp-udp\" (ESP in UDP, RFC 3948) or \"ipip\"",
            ));
        }
    };
    Ok(PeerSpec {
        name,
        endpoint,
        allowed_ips,
        encap,
        route: p.route.unwrap_or(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.peers[0].endpoint.to_string(), "192.0.2.2");
        assert!(matches!(
            c.peers[0].encap,
            EncapSpec::Esp {
                udp_port: Some(14500),
                ..
            }
        ));
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

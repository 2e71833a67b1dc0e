//! `[interface]`: the TUN, the outer source, root's directories, the user, the UDP port.

use super::raw::RawInterface;
use super::{
    invalid, ConfigError, IfAddr, Interface, RpFilter, DEFAULT_CONTROL_DIR, DEFAULT_STATE_DIR,
    DEFAULT_USER, MIN_MTU_V4,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Validate `[interface]`; `base` resolves relative paths.
/// Most TX threads: each may put a batch (up to 192 packets of one TSO read) ahead of another
/// thread's on the wire, and the peer's replay window must absorb that reordering.
pub const MAX_TX_THREADS: u8 = 8;

pub(super) fn interface(raw: RawInterface, base: &Path) -> Result<Interface, ConfigError> {
    let name = raw.name;
    check_name(&name)?;
    let addresses = raw
        .address
        .iter()
        .map(|a| address(a))
        .collect::<Result<Vec<_>, _>>()?;
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
    let local = local(raw.local)?;
    let rp_filter = rp_filter(raw.rp_filter.as_deref())?;
    let (state_dir, control) = paths(raw.state_dir, raw.control, base, &name)?;
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
    let tx_threads = match raw.tx_threads {
        None => 1,
        Some(n) if (1..=i64::from(MAX_TX_THREADS)).contains(&n) => n as u8,
        Some(n) => {
            return Err(invalid(
                "interface.tx_threads",
                n,
                format!("a number of TX threads (TUN queues) from 1 to {MAX_TX_THREADS}"),
            ))
        }
    };
    let save_keys = match raw.save_keys {
        None => None,
        Some(d) if d.as_os_str().is_empty() => {
            return Err(invalid(
                "interface.save_keys",
                "\"\"",
                "a directory only root can write, e.g. \"/root/espip-keys\" (or no save_keys key: keys are not written anywhere)",
            ))
        }
        Some(d) if d.is_relative() => Some(base.join(d)),
        Some(d) => Some(d),
    };
    let tx_path = match raw.tx_path.as_deref().map(str::trim) {
        None | Some("auto") => super::TxPath::Auto,
        Some("raw") => super::TxPath::Raw,
        Some(other) => {
            return Err(invalid(
                "interface.tx_path",
                format!("{other:?}"),
                "\"auto\" (an AF_PACKET socket where the next hop is known, the default) or \"raw\" (always the raw socket, through netfilter's output hooks)",
            ))
        }
    };
    let rx_path = match raw.rx_path.as_deref().map(str::trim) {
        None | Some("raw") => super::RxPath::Raw,
        Some("xdp") => super::RxPath::Xdp,
        Some(other) => {
            return Err(invalid(
                "interface.rx_path",
                format!("{other:?}"),
                "\"raw\" (raw IP sockets, through netfilter's input hooks, the default) or \"xdp\" (AF_XDP sockets fed by an XDP program on the egress interface)",
            ))
        }
    };
    let post_up = hooks("interface.post_up", raw.post_up)?;
    let pre_down = hooks("interface.pre_down", raw.pre_down)?;
    Ok(Interface {
        post_up,
        pre_down,
        tx_path,
        rx_path,
        save_keys,
        tx_threads,
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

/// `post_up` / `pre_down`: shell commands, at most 32 of at most 4096 bytes each.
fn hooks(key: &str, cmds: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let cmds = cmds.unwrap_or_default();
    if cmds.len() > 32 {
        return Err(invalid(
            key,
            format!("{} commands", cmds.len()),
            "at most 32 commands (put more in a script and run that)",
        ));
    }
    for c in &cmds {
        if c.trim().is_empty() || c.len() > 4096 || c.contains('\0') {
            return Err(invalid(
                key,
                format!("{:?}", c.chars().take(60).collect::<String>()),
                "a shell command of 1 to 4096 bytes (run by /bin/sh -c as root; %i is the interface name)",
            ));
        }
    }
    Ok(cmds)
}

/// A Linux interface name (also used in file names: no `/`).
fn check_name(name: &str) -> Result<(), ConfigError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        || name == "."
        || name == "..";
    if bad {
        return Err(invalid(
            "interface.name",
            format!("{name:?}"),
            "a Linux interface name: 1 to 15 characters, no '/', ':' or spaces (e.g. \"espip0\")",
        ));
    }
    Ok(())
}

/// One `address` entry: `ADDR/LEN`.
fn address(a: &str) -> Result<IfAddr, ConfigError> {
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
    Ok(IfAddr { addr, len })
}

/// `local`: an IPv4 or IPv6 address (whether this host has it is checked by `check` and
/// `run`). It is the source of the peers whose endpoint is of its family; peers of the other
/// family get the source routing picks.
fn local(raw: Option<String>) -> Result<Option<IpAddr>, ConfigError> {
    let Some(l) = raw else { return Ok(None) };
    let ip = l.trim().parse::<IpAddr>().map_err(|_| {
        invalid(
            "interface.local",
            format!("{l:?}"),
            "an IP address of this host, e.g. \"192.0.2.1\" or \"2001:db8::1\"",
        )
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(invalid(
            "interface.local",
            ip,
            "a unicast address of this host (leave local out to let routing choose)",
        ));
    }
    Ok(Some(ip))
}

fn rp_filter(raw: Option<&str>) -> Result<Option<RpFilter>, ConfigError> {
    match raw {
        None => Ok(None),
        Some("off") => Ok(Some(RpFilter::Off)),
        Some("strict") => Ok(Some(RpFilter::Strict)),
        Some("loose") => Ok(Some(RpFilter::Loose)),
        Some(other) => Err(invalid(
            "interface.rp_filter",
            format!("{other:?}"),
            "\"loose\" (a relay receiving sources routed elsewhere), \"strict\" or \"off\"; leave it out to keep the system setting",
        )),
    }
}

/// `state_dir` and `control`, relative paths resolved against `base`; the default control
/// socket belongs to this network namespace.
fn paths(
    state_dir: Option<PathBuf>,
    control: Option<PathBuf>,
    base: &Path,
    name: &str,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let state_dir = match state_dir {
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
    let control = match control {
        None => super::default_dir().join(format!("{name}.sock")),
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
    Ok((state_dir, control))
}

//! Running the NAT helper's `iptables` commands ([`crate::rules`]) and the checks before them.

use std::process::Command;

/// One `iptables` invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IptCmd {
    /// Arguments after `iptables`.
    pub args: Vec<String>,
    /// Removal steps may find nothing to remove.
    pub may_fail: bool,
}

/// Why rules could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// No iptables binary.
    #[error("iptables not found; install it (Debian: apt-get install iptables, nf_tables backend) or set [nat] rules = \"print\" and install the rules yourself")]
    Missing,
    /// A command failed.
    #[error("iptables {args} failed: {stderr}")]
    Failed {
        /// The arguments.
        args: String,
        /// What iptables said.
        stderr: String,
    },
}

/// Run `cmds` in order; a failure of a command that must succeed stops and is returned.
pub fn run(cmds: &[IptCmd]) -> Result<usize, RulesError> {
    let mut done = 0;
    for c in cmds {
        let out = Command::new("iptables")
            .args(&c.args)
            .output()
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    RulesError::Missing
                } else {
                    RulesError::Failed {
                        args: c.args.join(" "),
                        stderr: e.to_string(),
                    }
                }
            })?;
        if !out.status.success() && !c.may_fail {
            return Err(RulesError::Failed {
                args: c.args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        done += usize::from(out.status.success());
    }
    Ok(done)
}

/// Local IPv4 networks (address/prefix of every interface except `skip`) that overlap
/// `prefix`: an alias prefix must not be on-link, or the kernel would deliver to the LAN
/// instead of the TUN.
pub fn on_link_overlaps(prefix: espip_core::prefix::Prefix, skip: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return out;
    };
    for ifa in addrs {
        if ifa.interface_name == skip {
            continue;
        }
        let (Some(addr), Some(mask)) = (ifa.address, ifa.netmask) else {
            continue;
        };
        let (Some(a), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
            continue;
        };
        let len = u32::from(m.ip()).count_ones() as u8;
        let Some(net) = espip_core::prefix::Prefix::new(std::net::IpAddr::V4(a.ip()), len) else {
            continue;
        };
        if net.contains(prefix.addr()) || prefix.contains(net.addr()) {
            out.push(format!("{}/{len} on {}", a.ip(), ifa.interface_name));
        }
    }
    out
}

//! The way out of each multipath path that names its own (`local`, `device`): checked and
//! resolved on this host when the daemon starts and at each reload, so a path leaves by its
//! uplink without policy routing (the data path sends with `IP_PKTINFO`).

use crate::config::Config;
use std::net::IpAddr;

/// An interface index no interface has: the path's packets are refused by the kernel
/// (counted as `send_refused`) and its probes go unanswered, so it is down until its device
/// appears and the configuration is reloaded.
pub const ABSENT: u32 = u32::MAX;

/// A path's `local` that this host does not have.
#[derive(Debug, thiserror::Error)]
#[error("peer {peer:?} path {path:?}: local {local} is not an address of this host (in this network namespace); use the address `ip addr` lists on that uplink, or leave local out to send from the source routing picks")]
pub struct LocalNotHere {
    /// The peer.
    pub peer: String,
    /// The path.
    pub path: String,
    /// The address.
    pub local: IpAddr,
}

/// Resolve every path's interface: `device`, or the interface holding `local`. A `device`
/// this host does not have (an LTE stick not plugged in) is a warning, not an error: the path
/// stays down (see [`ABSENT`]). Returns the warnings.
pub fn resolve(cfg: &mut Config) -> Result<Vec<String>, LocalNotHere> {
    let mut warnings = Vec::new();
    for peer in &mut cfg.peers {
        let Some(mp) = peer.multipath.as_mut() else {
            continue;
        };
        for p in &mut mp.paths {
            if let Some(l) = p.local {
                if !crate::sys::is_local_address(l) {
                    return Err(LocalNotHere {
                        peer: peer.name.clone(),
                        path: p.name.clone(),
                        local: l,
                    });
                }
            }
            let device = p
                .device
                .clone()
                .or_else(|| p.local.and_then(crate::sys::interface_holding));
            p.ifindex = match device.as_deref() {
                None => 0,
                Some(d) => crate::sys::interface_index(d).unwrap_or_else(|| {
                    warnings.push(format!(
                        "peer {:?} path {:?}: device {d:?} does not exist (yet); the path stays down until it does and the configuration is reloaded",
                        peer.name, p.name
                    ));
                    ABSENT
                }),
            };
            if p.device.is_none() {
                // For status: the interface `local` picked.
                p.device = device;
            }
        }
    }
    Ok(warnings)
}

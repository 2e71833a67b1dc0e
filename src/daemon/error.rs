//! Why the daemon could not start, each with the fix it names.

use crate::datapath;
use crate::sys::seqstore::SeqError;
use std::io;
use std::net::IpAddr;

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// TUN creation.
    #[error(transparent)]
    Tun(#[from] crate::sys::tun::TunError),
    /// Raw socket creation.
    #[error("cannot open a raw IP socket for protocol {protocol}: {source} (run as root or with CAP_NET_RAW)")]
    RawSocket {
        /// IP protocol.
        protocol: u8,
        /// Why.
        source: io::Error,
    },
    /// The ESP-in-UDP socket.
    #[error("cannot open UDP port {port} for ESP in UDP: {source}; another program (an IKE daemon such as strongSwan's charon, or a second espip) may hold it: stop it or set interface.listen_port")]
    UdpSocket {
        /// The port.
        port: u16,
        /// Why.
        source: io::Error,
    },
    /// Interface configuration.
    #[error("configuring the interface: {0}")]
    Netlink(#[from] crate::sys::netlink::NetlinkError),
    /// Path MTU lookup.
    #[error("no route to peer {peer:?} endpoint {endpoint} ({source}); add a route to it or set interface.mtu")]
    NoRouteToPeer {
        /// Peer name.
        peer: String,
        /// Endpoint.
        endpoint: IpAddr,
        /// Why.
        source: io::Error,
    },
    /// An alias prefix is on-link.
    #[error(
        "nat.map alias {alias} is on-link ({found}); choose an alias prefix no interface uses"
    )]
    AliasOnLink {
        /// The alias prefix.
        alias: crate::prefix::Prefix,
        /// The overlapping local networks.
        found: String,
    },
    /// Rules.
    #[error(transparent)]
    Rules(#[from] crate::sys::iptables::RulesError),
    /// Data path build.
    #[error(transparent)]
    Build(#[from] datapath::BuildError),
    /// The state directory (root's own).
    #[error("interface.state_dir: {1}")]
    State(std::path::PathBuf, io::Error),
    /// The key log directory.
    #[error("interface.save_keys: {0} (it must be a directory only root can write, in directories only root can write; create it with: install -d -m 0700 DIR)")]
    SaveKeys(io::Error),
    /// The sequence number state of a key.
    #[error(transparent)]
    Seq(#[from] SeqError),
    /// The control socket.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The capture directory.
    #[error("capture.dir {0}: {1}; choose a directory root can write")]
    Capture(std::path::PathBuf, io::Error),
    /// The metrics address.
    #[error("metrics.listen {0}: {1}; choose a free port on an address of this host")]
    Metrics(std::net::SocketAddr, io::Error),
    /// Becoming the configured user.
    #[error("interface.user {0:?}: {1}; create the user (useradd --system --no-create-home {0}), leave user out to use espip's own, or set user = \"root\"")]
    User(String, io::Error),
    /// Dropping privileges failed.
    #[error("dropping privileges to {0:?}: {1}")]
    Drop(String, io::Error),
    /// `interface.local` is not an address of this host.
    #[error("{}", crate::sys::not_local_message(*.0))]
    NotLocal(IpAddr),
    /// A path's `local` is not an address of this host.
    #[error(transparent)]
    PathLocal(#[from] super::uplinks::LocalNotHere),
    /// A data-path thread ended while the daemon ran.
    #[error("data-path thread {0} stopped: {1}; the daemon stopped cleanly (nothing left behind); please report this with the log")]
    Worker(&'static str, String),
    /// The IKE socket.
    #[error("cannot open UDP port 500 for IKEv2 ({0}): {1}; {advice}", advice = ike_socket_advice(.1))]
    IkeSocket(IpAddr, io::Error),
    /// Anything else of the OS.
    #[error("{0}: {1}")]
    Os(&'static str, io::Error),
}

/// What to do about a refused IKE socket, by the reason the kernel gave.
fn ike_socket_advice(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => {
            "binding a port below 1024 needs CAP_NET_BIND_SERVICE, which this process does not have: start espip as root, and under systemd keep CAP_NET_BIND_SERVICE in the unit's CapabilityBoundingSet (docs/systemd/espip@.service has it)"
        }
        Some(libc::EADDRINUSE) => {
            "another IKE daemon (strongSwan's charon, libreswan's pluto) holds it: stop it, or key this peer statically"
        }
        Some(libc::EADDRNOTAVAIL) => {
            "the address is not one of this host's: check interface.local"
        }
        _ => "check that espip runs as root and that no other IKE daemon runs",
    }
}

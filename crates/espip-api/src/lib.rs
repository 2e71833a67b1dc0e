//! espip's API: what a running daemon answers on its control socket and the client that
//! asks it. `espip show`, `espip sa`, `espip reload`, the labs and the tests use this crate;
//! the daemon builds the same documents ([`status::Status`], [`status::SaExport`]) and serves
//! them. The protocol (one request line, one JSON answer, who may ask) is described in the
//! daemon's `control` module and docs/security.md.

pub mod client;
pub mod status;

use std::io;
use std::path::{Path, PathBuf};

/// Largest answer the client reads (a status of a thousand peers is under 1 MiB).
pub const MAX_REPLY: usize = 4 << 20;

/// Why the control socket could not be set up or reached.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error("another espip is running for interface {iface}: its control socket {path} answers; stop it first (or give this one another interface.name)")]
    InUse {
        /// Interface name.
        iface: String,
        /// Socket path.
        path: PathBuf,
    },
    /// Something that is not a socket is in the way.
    #[error("{0} exists and is not a socket; remove it or set interface.control to another path")]
    NotASocket(PathBuf),
    /// The OS refused.
    #[error("control socket {0}: {1}")]
    Io(PathBuf, io::Error),
    /// Nothing listens there.
    #[error("no espip daemon answers on {0} ({1}); is it running, and are you root?")]
    NotRunning(PathBuf, io::Error),
    /// The socket or the process behind it is not the root daemon's.
    #[error("{0}: {1}; refusing to talk to it (an espip daemon's socket is root's, in a directory only root can write)")]
    NotTrusted(PathBuf, String),
    /// The daemon refused the request.
    #[error("the daemon at {0} refused: {1}")]
    Refused(PathBuf, String),
}

/// What `espip reload` sends after its request line.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct ReloadDocument {
    /// The configuration text.
    pub config: zeroize::Zeroizing<String>,
    /// Its directory (relative key file paths are resolved against it).
    pub base: PathBuf,
    /// The key files it names, as read (with the checks of a start) by root.
    pub files: Vec<(PathBuf, zeroize::Zeroizing<String>)>,
    /// Key fingerprints of the descriptors passed with the request, in order.
    pub keys: Vec<String>,
}

/// Default directory of the control sockets.
pub const DEFAULT_CONTROL_DIR: &str = "/run/espip";

/// The directory of the default control sockets for this network namespace: `/run/espip` in
/// the host's (init) namespace, `/run/espip/netns-<inode>` in any other, so daemons with the
/// same interface name in two namespaces (labs, containers) do not meet, and `espip show` run
/// inside a namespace finds that namespace's daemons. The namespace is named by the inode of
/// `/proc/self/ns/net` (what `ip netns identify` compares); the init namespace's is the
/// kernel's constant `PROC_NET_INIT_INO` (include/linux/proc_ns.h), since `/proc/1/ns/net`
/// is not readable from inside another namespace.
pub fn default_dir() -> PathBuf {
    let base = Path::new(DEFAULT_CONTROL_DIR);
    match std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)) {
        Ok(ino) if ino != INIT_NET_INO => base.join(format!("netns-{ino}")),
        _ => base.to_path_buf(),
    }
}

/// `PROC_NET_INIT_INO`: the inode of the initial network namespace.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// Whether this process runs in the initial network namespace.
pub fn in_init_netns() -> bool {
    std::fs::metadata("/proc/self/ns/net")
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == INIT_NET_INO)
}

//! The control side of a running daemon: the Unix control socket (`espip show`, `espip sa`),
//! the Prometheus metrics endpoint, and the snapshot both serve. `server.rs` answers on the
//! control socket, `client.rs` asks it, `snapshot.rs` builds the `Status` both show, and
//! `metrics.rs` serves it to Prometheus.
//!
//! Control protocol: the client connects, writes one request line (`status`, `sa`, or
//! `sa-keys` for the Wireshark lines with keys, or `reload` followed by a JSON document up
//! to the end of its stream: the configuration, the key files it names, and the state files
//! of its keys as descriptors passed with `SCM_RIGHTS`), and reads one JSON document until
//! the daemon closes the connection.
//!
//! Who may ask (docs/security.md): the socket is bound by root, before the privilege drop, in
//! a directory only root can write ([`PrivateDir`]), with mode 0600; the daemon answers only
//! callers whose kernel-checked credentials (`SO_PEERCRED`) are root's. The client checks the
//! other way round: the socket and its directory belong to root, and the process that listens
//! on it was root when it called `listen` (the daemon binds before it drops root; a socket
//! another user bound shows that user's uid). Answers are capped in size and what is printed
//! from them is stripped of control characters.

mod metrics;
mod server;
mod snapshot;

pub use espip_api::client::*;
pub use espip_api::{ControlError, ReloadDocument, MAX_REPLY};
pub use metrics::serve_metrics;
pub use server::*;
pub use snapshot::Live;

use crate::config::Config;
use crate::config::DEFAULT_CONTROL_DIR;
use crate::sys::fdpass::MAX_FDS;
use crate::sys::safefs::PrivateDir;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64;
/// Largest reload document accepted (a configuration of a thousand peers is far below).
const MAX_RELOAD: usize = 1 << 20;
/// How long a reload may take in the daemon (netlink, fsyncs) before the client is told.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that sends nothing (or reads nothing) for this long is disconnected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections served at once on each listener; more wait in the kernel's backlog, costing
/// the daemon no descriptor. Tuning constant: far above what `espip show` and a Prometheus
/// scraper need, far below the descriptor limit.
const MAX_CLIENTS: usize = 16;
/// Back-off after `accept` fails for want of descriptors or memory (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): the pending connection stays queued, so retrying at once would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Why the daemon refused a control request (a reload, a rekey, or the caller itself): what
/// the client prints after "the daemon refused:".
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The caller is not root.
    #[error("uid {uid} may not make request {request:?}: espip answers root only (run espip show/sa as root)")]
    NotRoot {
        /// The caller's uid.
        uid: u32,
        /// What it asked (escaped).
        request: String,
    },
    /// A request line this daemon does not know.
    #[error("expected {0}")]
    BadRequest(&'static str),
    /// This daemon runs without the serving loop that takes the request (reload or rekey).
    #[error("this daemon does not take {0}")]
    NotTaken(&'static str),
    /// The serving loop is gone.
    #[error("the daemon is stopping")]
    Stopping,
    /// The serving loop did not answer in time.
    #[error("no answer within {0} s; see the daemon's log")]
    Timeout(u64),
    /// The reload document is not one `espip reload` writes.
    #[error("a reload document espip did not write: {0}")]
    Document(String),
    /// The configuration of the reload is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A path's `local` of the reload is not an address of this host.
    #[error(transparent)]
    PathLocal(#[from] crate::daemon::uplinks::LocalNotHere),
    /// The reload changes what only a restart can (`what`: the section or keys).
    #[error("{0} changed: a reload changes peers only; restart espip to apply it")]
    NeedsRestart(String),
    /// A peer needs a socket the daemon did not open at start.
    #[error("peer {peer:?} uses mode {mode} over {family}, which no peer used at start: restart espip to open it")]
    NewTransport {
        /// The peer.
        peer: String,
        /// Its mode and the socket it needs.
        mode: &'static str,
        /// IPv4 or IPv6.
        family: &'static str,
    },
    /// IKEv2 needs UDP port 500, opened at start only.
    #[error("a peer now uses keying = \"ikev2\", which needs UDP port 500 opened at start: restart espip")]
    IkeNotStarted,
    /// The derived tunnel MTU would change.
    #[error("the tunnel MTU would change from {from} to {to} (the path MTU to a new endpoint is smaller): restart espip, or set interface.mtu")]
    MtuChange {
        /// Today's MTU.
        from: u16,
        /// The new configuration's.
        to: u16,
    },
    /// The MTU of the new configuration could not be found.
    #[error("the new configuration's tunnel MTU: {0}")]
    Mtu(String),
    /// The data path refused the peers (duplicate prefixes, SPIs, endpoints).
    #[error(transparent)]
    Build(#[from] crate::datapath::BuildError),
    /// Two outbound SAs under one key would reuse nonces.
    #[error(
        "two outbound SAs would use key {0}: they would reuse nonces; give each SA its own key"
    )]
    SharedKey(String),
    /// A new SA's sequence numbers could not be reserved.
    #[error("{0}")]
    Reservation(#[from] crate::sys::seqstore::SeqError),
    /// The same, with the state directory out of reach of a daemon that dropped root.
    #[error("{0} (a daemon that dropped its privileges cannot open root's state directory: use `espip reload`, which opens it as root)")]
    StateOutOfReach(crate::sys::seqstore::SeqError),
    /// A refused reload: nothing of it applied.
    #[error("{0} (the running configuration is unchanged)")]
    Unchanged(Box<Refused>),
    /// `espip rekey` named no IKEv2 peer.
    #[error("no IKEv2 peer{}", .0.as_ref().map(|p| format!(" named {p:?}")).unwrap_or_default())]
    NoIkePeer(Option<String>),
    /// No peer uses IKEv2.
    #[error("no peer uses keying = \"ikev2\": static SAs are never rekeyed")]
    StaticOnly,
    /// Every peer asked to rekey refused (each "peer: why").
    #[error("{}", .0.join("; "))]
    RekeyRefused(Vec<String>),
}

/// The bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: Option<UnixListener>,
    path: PathBuf,
    ino: u64,
}

impl ControlSocket {
    /// Bind `path` with mode 0600. A socket left by a killed daemon (nobody answers) is
    /// replaced; one that answers means another daemon runs for this interface.
    pub fn bind(path: &Path, iface: &str) -> Result<ControlSocket, ControlError> {
        let io_err = |e| ControlError::Io(path.to_path_buf(), e);
        let dir = path.parent().unwrap_or(Path::new("."));
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| io_err(io::Error::other("not a file name")))?;
        // Root's own directory: no other user can replace the socket or plant one.
        let dir = PrivateDir::open(dir).map_err(|e| {
            ControlError::Io(
                path.to_path_buf(),
                io::Error::other(format!(
                    "{e} (interface.control must be in a directory of root's, e.g. {DEFAULT_CONTROL_DIR})"
                )),
            )
        })?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(ControlError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(ControlError::InUse {
                        iface: iface.to_string(),
                        path: path.to_path_buf(),
                    });
                }
                dir.remove(name).map_err(io_err)?;
            }
            Err(_) => {}
        }
        // The socket is born 0600: no window in which another user could connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener = bound.map_err(io_err)?;
        listener.set_nonblocking(true).map_err(io_err)?;
        let ino = std::fs::metadata(path).map_err(io_err)?.ino();
        Ok(ControlSocket {
            listener: Some(listener),
            path: path.to_path_buf(),
            ino,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Take the listener (for the server task); the file stays until `self` drops.
    pub fn take(&mut self) -> Option<UnixListener> {
        self.listener.take()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // Only remove the file if it is still ours. After the privilege drop the directory is
        // not writable any more and the inert socket stays until the next start replaces it
        // (clients skip a socket nobody answers on).
        if std::fs::metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A reload asked for on the control socket, for the serving loop.
pub struct ReloadRequest {
    /// The configuration, parsed and validated with the key files the client sent.
    pub cfg: Config,
    /// State files of the configuration's keys, opened by root in the client: (fingerprint,
    /// file).
    pub key_files: Vec<(String, std::fs::File)>,
    /// The answer: a summary of what changed, or why nothing did.
    pub reply: tokio::sync::oneshot::Sender<Result<String, Refused>>,
}

/// `espip rekey`: rekey the CHILD_SAs (or the IKE SA) of IKEv2 peers now, for the serving
/// loop.
pub struct RekeyRequest {
    /// Only this peer (`None`: every IKEv2 peer).
    pub peer: Option<String>,
    /// The IKE SA instead of the CHILD_SAs.
    pub ike: bool,
    /// What was started, or why nothing was.
    pub reply: tokio::sync::oneshot::Sender<Result<String, Refused>>,
}

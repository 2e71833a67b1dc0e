//! The client side of the control socket (`espip show`, `sa`, `reload`, `rekey`): it checks
//! that the socket and its directory are root's and that root listens on it, sends one request
//! and reads the answer, capped in size; and it finds the daemons' default sockets, in this
//! network namespace and, from the initial one, in every other.

use crate::{default_dir, in_init_netns, ControlError, ReloadDocument, MAX_REPLY};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a control socket is not trusted (see [`trusted_socket`]).
#[derive(Debug, thiserror::Error)]
pub enum Untrusted {
    /// It cannot be examined (missing, or its directory is).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// Something other than a socket.
    #[error("not a socket")]
    NotASocket,
    /// A socket of another user.
    #[error("the socket belongs to uid {0}")]
    Owner(u32),
    /// In a directory another user owns.
    #[error("its directory {} belongs to uid {uid}, who could have replaced it", .dir.display())]
    DirectoryOwner {
        /// The directory.
        dir: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// In a directory others may write.
    #[error("its directory {} is writable by others (mode {mode:04o})", .dir.display())]
    DirectoryWritable {
        /// The directory.
        dir: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// Whether `path` (not followed) is a socket of root's (or of this user's) in a directory
/// only root (or this user) can write.
fn trusted_socket(path: &Path) -> Result<(), Untrusted> {
    let me = nix::unistd::geteuid().as_raw();
    let m = std::fs::symlink_metadata(path)?;
    if !m.file_type().is_socket() {
        return Err(Untrusted::NotASocket);
    }
    if m.uid() != 0 && m.uid() != me {
        return Err(Untrusted::Owner(m.uid()));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let d = std::fs::metadata(if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    })?;
    if d.uid() != 0 && d.uid() != me {
        return Err(Untrusted::DirectoryOwner {
            dir: dir.to_path_buf(),
            uid: d.uid(),
        });
    }
    if d.mode() & 0o022 != 0 {
        return Err(Untrusted::DirectoryWritable {
            dir: dir.to_path_buf(),
            mode: d.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Send `request` to the daemon at `path` and return its JSON answer (at most [`MAX_REPLY`]
/// bytes, in a buffer wiped when dropped). The socket, its directory and the listening process
/// must be root's (see the module documentation).
pub fn request(path: &Path, request: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    exchange(path, format!("{request}\n").as_bytes(), &[])
}

/// Send `espip reload`'s document (configuration text, the key files it names, and the state
/// files of its keys as descriptors) to the daemon at `path`; its answer.
pub fn request_reload(
    path: &Path,
    doc: &ReloadDocument,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    let mut msg = zeroize::Zeroizing::new(b"reload\n".to_vec());
    serde_json::to_writer(&mut *msg, doc)
        .map_err(|e| ControlError::Io(path.to_path_buf(), io::Error::other(e)))?;
    exchange(path, &msg, fds)
}

/// Connect to the daemon at `path` (trusted as [`request`] says), send `msg` with `fds`
/// (`SCM_RIGHTS`) and read the JSON answer.
fn exchange(
    path: &Path,
    msg: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> Result<zeroize::Zeroizing<Vec<u8>>, ControlError> {
    use std::os::fd::AsRawFd;
    let untrusted = |why: String| ControlError::NotTrusted(path.to_path_buf(), why);
    if let Err(why) = trusted_socket(path) {
        if std::fs::symlink_metadata(path).is_err() {
            return Err(ControlError::NotRunning(
                path.to_path_buf(),
                io::Error::new(io::ErrorKind::NotFound, why.to_string()),
            ));
        }
        return Err(untrusted(why.to_string()));
    }
    let mut s =
        UnixStream::connect(path).map_err(|e| ControlError::NotRunning(path.to_path_buf(), e))?;
    let cred = nix::sys::socket::getsockopt(&s, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| untrusted(format!("SO_PEERCRED: {e}")))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != me {
        return Err(untrusted(format!(
            "the process listening on it (pid {}) is uid {}, not root",
            cred.pid(),
            cred.uid()
        )));
    }
    let io_err = |e| ControlError::Io(path.to_path_buf(), e);
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))
        .map_err(io_err)?;
    if fds.is_empty() {
        s.write_all(msg).map_err(io_err)?;
    } else {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let raw: Vec<_> = fds.iter().map(|f| f.as_raw_fd()).collect();
        // The descriptors travel with the first bytes; the rest follows as a stream.
        let first = &msg[..msg.len().min(1)];
        sendmsg::<()>(
            s.as_raw_fd(),
            &[io::IoSlice::new(first)],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| io_err(e.into()))?;
        s.write_all(&msg[first.len()..]).map_err(io_err)?;
    }
    // The end of the request (a reload document is read to the end of the stream).
    s.shutdown(std::net::Shutdown::Write).map_err(io_err)?;
    // Allocated once, never grown: no copy of a key is left in a freed reallocation.
    let mut out = zeroize::Zeroizing::new(vec![0u8; MAX_REPLY + 1]);
    let mut n = 0;
    while n < out.len() {
        match s.read(&mut out[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        }
    }
    if n > MAX_REPLY {
        return Err(untrusted(format!(
            "its answer is larger than {MAX_REPLY} bytes"
        )));
    }
    out.truncate(n);
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out) {
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(ControlError::Refused(path.to_path_buf(), clean(e)));
        }
    }
    Ok(out)
}

/// `text` with every control character (escape sequences, carriage returns) replaced by
/// `?`, keeping newlines and tabs: for printing what a daemon sent to a terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

/// The control sockets of every daemon using a default socket path, each with the network
/// namespace it runs in when that is another one (its `ip netns` name, else `inode N`): the
/// default directory's own sockets, and, from the initial namespace, those of every
/// `netns-INODE` directory below it (daemons in other namespaces). Directories and sockets left
/// by stopped daemons are returned too; the caller skips those nobody answers on.
pub fn all_default_sockets() -> Vec<(PathBuf, Option<String>)> {
    let dir = default_dir();
    let mut out: Vec<(PathBuf, Option<String>)> = running_sockets(&dir)
        .into_iter()
        .map(|p| (p, None))
        .collect();
    if !in_init_netns() {
        return out;
    }
    let names = netns_names();
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut subdirs: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        // Only real directories (a link is not followed) named netns-<inode>.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name();
            let ino = name.to_str()?.strip_prefix("netns-")?.parse::<u64>().ok()?;
            Some((ino, e.path()))
        })
        .collect();
    subdirs.sort();
    for (ino, sub) in subdirs {
        let label = names
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| format!("inode {ino}"));
        out.extend(
            running_sockets(&sub)
                .into_iter()
                .map(|p| (p, Some(label.clone()))),
        );
    }
    out
}

/// The names `ip netns` gave namespaces, by namespace inode.
fn netns_names() -> std::collections::HashMap<u64, String> {
    let mut m = std::collections::HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/run/netns") {
        for e in rd.filter_map(|e| e.ok()) {
            if let (Ok(meta), Some(name)) = (std::fs::metadata(e.path()), e.file_name().to_str()) {
                m.insert(meta.ino(), name.to_string());
            }
        }
    }
    m
}

/// The control sockets of the daemons running with the default directory.
pub fn running_sockets(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_socket()))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

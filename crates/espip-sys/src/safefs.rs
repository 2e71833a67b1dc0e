//! File operations of a daemon that starts as root on a host where an unprivileged user (the
//! one the daemon becomes after setup, or any other) may have prepared the ground.
//!
//! Rules (docs/security.md, "What root reads and writes"):
//! - root keeps its own state in a [`PrivateDir`]: a directory owned by root (the effective
//!   uid), not writable by group or others, whose every parent is writable only by root (or
//!   sticky, as `/tmp`), so no other user can add, replace or rename an entry in it;
//! - every file operation in it is relative to the directory's descriptor (`openat`,
//!   `renameat`, `unlinkat`) with `O_NOFOLLOW`; new files are created with `O_EXCL`;
//! - a file is read only if it is a regular file owned by root, not writable by others, and
//!   smaller than a cap the caller names; anything else is refused with the reason.

use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fstat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A directory only root can write, held open by descriptor.
#[derive(Debug)]
pub struct PrivateDir {
    fd: OwnedFd,
    path: PathBuf,
}

fn err(path: &Path, what: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("{}: {what}", path.display()))
}

fn nix_err(path: &Path, e: nix::Error) -> io::Error {
    io::Error::new(
        io::Error::from(e).kind(),
        format!("{}: {e}", path.display()),
    )
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why `dir` (an existing directory, not followed if a link) is not private to root: another
/// owner, or group/other write permission. `None`: it is private.
pub fn not_private(meta: &std::fs::Metadata) -> Option<String> {
    if meta.file_type().is_symlink() {
        return Some("is a symbolic link".into());
    }
    if !meta.is_dir() {
        return Some("is not a directory".into());
    }
    if meta.uid() != euid() {
        return Some(format!("belongs to uid {}, not to root", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "is writable by group or others (mode {:04o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// The first parent of `path` that a user other than root could write without the sticky bit
/// (so could rename or replace what is below it), with why.
pub fn unsafe_parent(path: &Path) -> Option<(PathBuf, String)> {
    let mut p = path.parent();
    while let Some(dir) = p {
        if dir.as_os_str().is_empty() {
            break;
        }
        if let Ok(m) = std::fs::metadata(dir) {
            let sticky = m.mode() & 0o1000 != 0;
            if m.uid() != 0 && m.uid() != euid() {
                return Some((
                    dir.to_path_buf(),
                    format!(
                        "belongs to uid {}, who could replace what is in it",
                        m.uid()
                    ),
                ));
            }
            if m.mode() & 0o022 != 0 && !sticky {
                return Some((
                    dir.to_path_buf(),
                    format!(
                        "is writable by group or others (mode {:04o}) without the sticky bit",
                        m.mode() & 0o7777
                    ),
                ));
            }
        }
        p = dir.parent();
    }
    None
}

impl PrivateDir {
    /// Open `path`, creating it (mode 0700, and missing parents 0700) if it does not exist.
    /// Refuses a directory that is not root's alone, or below a parent another user could
    /// write; the error says which and how to fix it.
    pub fn open(path: &Path) -> io::Result<PrivateDir> {
        if let Some((p, why)) = unsafe_parent(path) {
            return Err(err(
                path,
                format!(
                    "its parent {} {why}; choose a directory whose every parent only root can write (e.g. under /var/lib or /run)",
                    p.display()
                ),
            ));
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|e| err(path, format!("cannot create it: {e}")))?;
            }
            Err(e) => return Err(err(path, e)),
            Ok(_) => {}
        }
        let fd = nix::fcntl::open(
            path,
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::Error::ELOOP | nix::Error::ENOTDIR => err(
                path,
                "is not a directory (or is a symbolic link); espip keeps root's state only in a real directory",
            ),
            e => nix_err(path, e),
        })?;
        let file = File::from(fd);
        let meta = file.metadata().map_err(|e| err(path, e))?;
        if let Some(why) = not_private(&meta) {
            // A shared directory such as /tmp (sticky, writable by all) is never to be
            // taken over: name another place instead of a chmod.
            if meta.mode() & 0o1002 == 0o1002 {
                return Err(err(
                    path,
                    format!(
                        "{why}: it is a directory every user shares (like /tmp); espip keeps root's state only in a directory of root's alone: choose one such as /run/espip or /var/lib/espip"
                    ),
                ));
            }
            return Err(err(
                path,
                format!(
                    "{why}; espip keeps root's state there and reads it back as root. If its content is yours, `chown root:root {p} && chmod 700 {p}`; otherwise choose another directory",
                    p = path.display()
                ),
            ));
        }
        Ok(PrivateDir {
            fd: file.into(),
            path: path.to_path_buf(),
        })
    }

    /// The directory's path (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `dir/name`, for messages.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    fn open_at(&self, name: &str, flags: OFlag, mode: u32) -> io::Result<File> {
        debug_assert!(!name.contains('/'));
        openat(
            self.fd.as_fd(),
            name,
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::from_bits_truncate(mode),
        )
        .map(File::from)
        .map_err(|e| match e {
            nix::Error::ELOOP => err(
                &self.join(name),
                "is a symbolic link; espip never follows links in its state directory: remove it",
            ),
            e => nix_err(&self.join(name), e),
        })
    }

    /// Open an existing file of root's for reading and writing (`None` if absent), after the
    /// same checks as [`PrivateDir::read`]. The descriptor stays usable after the privilege
    /// drop: the file itself never becomes the unprivileged user's.
    pub fn open_existing(&self, name: &str, max: u64) -> io::Result<Option<File>> {
        let f = match self.open_at(name, OFlag::O_RDWR, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        self.check_trusted(&f, name, max)?;
        Ok(Some(f))
    }

    fn check_trusted(&self, f: &File, name: &str, max: u64) -> io::Result<()> {
        let st = fstat(f.as_fd()).map_err(|e| nix_err(&self.join(name), e))?;
        let path = self.join(name);
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(err(&path, "is not a regular file; remove it"));
        }
        if st.st_uid != euid() {
            return Err(err(
                &path,
                format!("belongs to uid {}, not to root; remove it", st.st_uid),
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(err(
                &path,
                format!(
                    "is writable by group or others (mode {:04o}); remove it",
                    st.st_mode & 0o7777
                ),
            ));
        }
        if st.st_size as u64 > max {
            return Err(err(
                &path,
                format!(
                    "is {} bytes, more than espip ever writes there ({max}); remove it",
                    st.st_size
                ),
            ));
        }
        Ok(())
    }

    /// Read a file of root's (`None` if absent), refusing links, non-regular files, files of
    /// other owners or writable by others, and files over `max` bytes.
    pub fn read(&self, name: &str, max: u64) -> io::Result<Option<Vec<u8>>> {
        let mut f = match self.open_at(name, OFlag::O_RDONLY, 0) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        self.check_trusted(&f, name, max)?;
        let mut v = Vec::new();
        (&mut f)
            .take(max)
            .read_to_end(&mut v)
            .map_err(|e| err(&self.join(name), e))?;
        Ok(Some(v))
    }

    /// Create `name` anew (mode `mode`) with `data`, durably, and return it open for reading
    /// and writing: written to a fresh temporary (`O_CREAT | O_EXCL | O_NOFOLLOW`), synced,
    /// renamed over `name`, the directory synced.
    pub fn create(&self, name: &str, data: &[u8], mode: u32) -> io::Result<File> {
        let tmp = format!(".{name}.tmp");
        // A temporary left by a crash is ours (the directory is root's alone); unlinkat does
        // not follow links.
        let _ = unlinkat(self.fd.as_fd(), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        let mut f = self.open_at(&tmp, OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL, mode)?;
        let path = self.join(name);
        f.write_all(data).map_err(|e| err(&path, e))?;
        f.sync_all().map_err(|e| err(&path, e))?;
        renameat(self.fd.as_fd(), tmp.as_str(), self.fd.as_fd(), name)
            .map_err(|e| nix_err(&path, e))?;
        self.sync()?;
        Ok(f)
    }

    /// Remove `name` (a link is removed, never followed); absent is fine.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match unlinkat(self.fd.as_fd(), name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(nix_err(&self.join(name), e)),
        }
    }

    /// Names of the regular entries (not followed) whose name passes `keep`.
    pub fn names(&self, keep: impl Fn(&str) -> bool) -> io::Result<Vec<String>> {
        let mut v: Vec<String> = std::fs::read_dir(&self.path)?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| keep(n))
            .collect();
        v.sort();
        Ok(v)
    }

    /// fsync the directory (after a rename or create).
    pub fn sync(&self) -> io::Result<()> {
        nix::unistd::fsync(self.fd.as_fd()).map_err(|e| nix_err(&self.path, e))
    }
}

/// Write `data` to `path` readable by its owner only, whatever was there: a fresh temporary
/// beside it (`O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600 from birth) renamed over `path`, so
/// an existing file of wider mode (or a link) is replaced, never written through. Returns the
/// mode the file has.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<u32> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| err(path, "not a file name"))?
        .to_string_lossy();
    let mut rnd = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut rnd)
        .map_err(|_| io::Error::other("random"))?;
    let tmp = dir.join(format!(
        ".{name}.{}.tmp",
        rnd.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let fd = nix::fcntl::open(
        &tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| nix_err(&tmp, e))?;
    let mut f = File::from(fd);
    let done = f
        .write_all(data)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&tmp);
        return Err(err(path, e));
    }
    Ok(f.metadata()?.mode() & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("espip-safefs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn write_private_replaces_a_wider_file_and_a_link() {
        let d = scratch("wp");
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("esp_sa");
        std::fs::write(&f, b"old").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(write_private(&f, b"keys").unwrap(), 0o600);
        assert_eq!(std::fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&f).unwrap(), b"keys");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.join("l")).unwrap();
        write_private(&d.join("l"), b"keys").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn creates_private_and_refuses_writable_or_linked() {
        let d = scratch("mk");
        let p = PrivateDir::open(&d.join("state")).unwrap();
        let m = std::fs::metadata(p.path()).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        std::fs::set_permissions(p.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = PrivateDir::open(&d.join("state")).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        std::os::unix::fs::symlink(d.join("state"), d.join("link")).unwrap();
        let e = PrivateDir::open(&d.join("link")).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn refuses_a_parent_others_can_write() {
        let d = scratch("parent");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = PrivateDir::open(&d.join("state")).unwrap_err().to_string();
        assert!(e.contains("its parent"), "{e}");
        // Sticky, as /tmp: others cannot rename root's entries.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o1777)).unwrap();
        PrivateDir::open(&d.join("state")).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn never_follows_or_trusts_planted_entries() {
        let d = scratch("plant");
        let p = PrivateDir::open(&d.join("state")).unwrap();
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, p.join("x")).unwrap();
        let e = p.read("x", 100).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // create replaces the link itself; the target is untouched.
        p.create("x", b"new", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(p.read("x", 100).unwrap().unwrap(), b"new");
        // A planted temporary link is removed, not written through.
        std::os::unix::fs::symlink(&victim, p.join(".y.tmp")).unwrap();
        p.create("y", b"data", 0o600).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // Too large, writable by others, FIFOs: refused without blocking.
        std::fs::write(p.join("big"), vec![b'a'; 200]).unwrap();
        assert!(p
            .read("big", 100)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        std::fs::write(p.join("w"), b"1").unwrap();
        std::fs::set_permissions(p.join("w"), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(p
            .read("w", 100)
            .unwrap_err()
            .to_string()
            .contains("writable"));
        nix::unistd::mkfifo(&p.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        assert!(p
            .read("fifo", 100)
            .unwrap_err()
            .to_string()
            .contains("not a regular"));
        assert!(p.read("absent", 100).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

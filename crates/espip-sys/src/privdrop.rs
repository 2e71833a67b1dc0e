//! Dropping root after setup (boringtun's `--disable-drop-privileges` default, done with
//! capabilities so that the stop can still clean up).
//!
//! After setup the daemon needs:
//! - nothing for the data path (the TUN and raw socket descriptors are already open);
//! - `CAP_NET_ADMIN` to remove its netfilter rules and restore the `net.*` sysctls on stop
//!   (Linux lets a process with `CAP_NET_ADMIN` in the network namespace write its `net.*`
//!   sysctls as root could: `net_ctl_permissions`), and to run `iptables`, which inherits it
//!   as an ambient capability;
//! - `CAP_NET_RAW` for `iptables` (it opens raw netlink sockets);
//! - write access to its capture directory only (created for the user, never taken over);
//!   its sequence-number and sysctl state files stay root's and are written through
//!   descriptors opened before the switch, and the control socket is bound before it.
//!
//! Order (Linux capabilities(7)): `PR_SET_KEEPCAPS`, drop every other capability from the
//! bounding set (needs `CAP_SETPCAP`, so first), `setgroups([])`, `setgid`, `setuid`, then
//! `capset` the two capabilities as permitted, effective and inheritable, raise them as ambient,
//! and set `PR_SET_NO_NEW_PRIVS`. Must run before any other thread exists: capabilities are
//! per thread.

use std::io;

/// Default `interface.user`.
pub const DEFAULT_USER: &str = "espip";

/// `CAP_NET_ADMIN` (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
/// `CAP_NET_RAW`.
const CAP_NET_RAW: u32 = 13;
/// Highest capability number the bounding-set loop tries (the kernel refuses unknown ones).
const CAP_LAST_TRY: u32 = 63;
/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit words.
const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The user to become, resolved before anything is set up.
#[derive(Debug, Clone)]
pub struct Target {
    /// Name as configured.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
}

/// Look a user up in the passwd database.
pub fn lookup(name: &str) -> io::Result<Target> {
    match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => Ok(Target {
            name: name.to_string(),
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        }),
        Ok(None) => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no user {name:?} in the passwd database"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Look the user up, creating it first when it is espip's own default user and missing
/// (`useradd --system`, no home, no shell, its own group). Any other missing user is an error:
/// espip never creates accounts it was not built to own.
pub fn lookup_or_create(name: &str) -> io::Result<Target> {
    match lookup(name) {
        Err(e) if e.kind() == io::ErrorKind::NotFound && name == DEFAULT_USER => {
            let out = std::process::Command::new("useradd")
                .args([
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/nonexistent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    "--comment",
                    "espip tunnel daemon",
                    name,
                ])
                .output()
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("creating the system user {name:?} with useradd: {e} (install the passwd package, or create the user yourself)"),
                    )
                })?;
            // Exit 9: another start created it meanwhile.
            if !out.status.success() && out.status.code() != Some(9) {
                return Err(io::Error::other(format!(
                    "useradd {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            tracing::info!(user = name, "created the system user espip runs as");
            lookup(name)
        }
        other => other,
    }
}

/// Create the directory `path` (mode 0700, missing parents 0700) owned by `t`, unless it
/// exists: then it must already be a directory of `t`'s (as espip left it), never anything it
/// would have to take over. Only a directory espip creates is ever handed to the user; the
/// owner is set on the open descriptor (`fchown`), never through a path.
pub fn own_dir(path: &std::path::Path, t: &Target) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // The parents as state_dir's: only root may write them (a parent that another user could
    // write or that resolves through a link they planted would let root create, and hand
    // over, a directory anywhere).
    if let Some((p, why)) = crate::safefs::unsafe_parent(path) {
        return Err(io::Error::other(format!(
            "its parent {} {why}; choose a directory whose every parent only root can write (e.g. /var/log/espip)",
            p.display()
        )));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(io::Error::other(format!(
            "{} is a symbolic link; give the directory itself",
            path.display()
        ))),
        Ok(m) if !m.is_dir() => Err(io::Error::other(format!(
            "{} exists and is not a directory",
            path.display()
        ))),
        Ok(m) if m.uid() != t.uid => Err(io::Error::other(format!(
            "{} belongs to uid {}, but the daemon writes it as {} (uid {}) after setup, and espip never takes over a directory it did not create; name a directory that does not exist yet (espip creates it for {}) or `chown {} {}`",
            path.display(),
            m.uid(),
            t.name,
            t.uid,
            t.name,
            t.name,
            path.display()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(parent)?;
            }
            std::fs::DirBuilder::new().mode(0o700).create(path)?;
            let dir = nix::fcntl::open(
                path,
                nix::fcntl::OFlag::O_DIRECTORY
                    | nix::fcntl::OFlag::O_NOFOLLOW
                    | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(io::Error::from)?;
            nix::unistd::fchown(
                &dir,
                Some(nix::unistd::Uid::from_raw(t.uid)),
                Some(nix::unistd::Gid::from_raw(t.gid)),
            )
            .map_err(io::Error::from)
        }
        Err(e) => Err(e),
    }
}

/// Threads of this process (capabilities are per thread: the drop must happen while there is
/// one).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

fn check(rc: libc::c_int, what: &str) -> io::Result<()> {
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// Set the parent-death signal `sig` again (0: none was asked for); if the parent `was` died
/// while it was cleared, deliver it now.
fn keep_parent_death_signal(sig: libc::c_int, was: nix::unistd::Pid) -> io::Result<()> {
    if sig == 0 {
        return Ok(());
    }
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) },
        "PR_SET_PDEATHSIG",
    )?;
    if nix::unistd::getppid() != was {
        // SAFETY: raise with a signal number the kernel accepted above.
        check(unsafe { libc::raise(sig) }, "raise")?;
    }
    Ok(())
}

/// Become `t`, keeping `CAP_NET_ADMIN` and `CAP_NET_RAW` (permitted, effective, inheritable,
/// ambient) and nothing else. Call from the only thread of the process.
pub fn drop_to(t: &Target) -> io::Result<()> {
    let n = thread_count();
    if n != 1 {
        return Err(io::Error::other(format!(
            "{n} threads exist; privileges must be dropped while the process has one"
        )));
    }
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) },
        "PR_SET_KEEPCAPS",
    )?;
    for cap in 0..=CAP_LAST_TRY {
        if cap == CAP_NET_ADMIN || cap == CAP_NET_RAW {
            continue;
        }
        // SAFETY: as above. EINVAL past the last capability the kernel knows is expected.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if rc < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            check(rc, "PR_CAPBSET_DROP")?;
        }
    }
    // The kernel clears the parent-death signal when the credentials change; whoever started
    // us (a lab, a supervisor) asked for it, so it is read here and set again after setuid.
    let mut death: libc::c_int = 0;
    check(
        // SAFETY: PR_GET_PDEATHSIG writes one int to the pointer given.
        unsafe { libc::prctl(libc::PR_GET_PDEATHSIG, &mut death as *mut libc::c_int) },
        "PR_GET_PDEATHSIG",
    )?;
    let parent = nix::unistd::getppid();
    nix::unistd::setgroups(&[]).map_err(|e| io::Error::other(format!("setgroups: {e}")))?;
    nix::unistd::setgid(nix::unistd::Gid::from_raw(t.gid))
        .map_err(|e| io::Error::other(format!("setgid: {e}")))?;
    nix::unistd::setuid(nix::unistd::Uid::from_raw(t.uid))
        .map_err(|e| io::Error::other(format!("setuid: {e}")))?;
    keep_parent_death_signal(death, parent)?;
    let keep = (1u32 << CAP_NET_ADMIN) | (1u32 << CAP_NET_RAW);
    let mut hdr = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep,
            permitted: keep,
            inheritable: keep,
        },
        CapData::default(),
    ];
    check(
        // SAFETY: capset reads one header and two data structs of the v3 layout.
        unsafe {
            libc::syscall(libc::SYS_capset, &mut hdr as *mut CapHeader, data.as_ptr())
                as libc::c_int
        },
        "capset",
    )?;
    for cap in [CAP_NET_ADMIN, CAP_NET_RAW] {
        check(
            // SAFETY: prctl with integer arguments only.
            unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            },
            "PR_CAP_AMBIENT_RAISE",
        )?;
    }
    check(
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        "PR_SET_NO_NEW_PRIVS",
    )?;
    Ok(())
}

/// The effective capability set of this thread and its uid (for logs and tests): from
/// `/proc/thread-self/status`.
pub fn current() -> String {
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("?")
            .to_string()
    };
    format!("uid {} CapEff {}", field("Uid:"), field("CapEff:"))
}

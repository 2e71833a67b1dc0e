//! Process-level helpers of the lab tools: a flag set by SIGTERM and SIGINT, and children
//! that die with their parent.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::Relaxed);
    }
}

/// Set `flag` when SIGTERM or SIGINT arrives (one flag for the process), with nix only.
pub fn set_flag_on_signals(flag: Arc<AtomicBool>) -> io::Result<()> {
    let _ = FLAG.set(flag);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_signal),
        nix::sys::signal::SaFlags::empty(),
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { nix::sys::signal::sigaction(sig, &action) }
            .map(|_| ())
            .map_err(io::Error::from)?;
    }
    Ok(())
}

/// Make the child `cmd` starts get SIGTERM when this process dies (`PR_SET_PDEATHSIG`).
pub fn die_with_parent(cmd: &mut std::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches only the child being set up.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

//! `interface.post_up` and `interface.pre_down`: the operator's commands around the tunnel's
//! life, as wg-quick's PostUp and PreDown. Both run as root, through `/bin/sh -c`, with `%i`
//! replaced by the interface name (and `ESPIP_INTERFACE` in the environment). The commands
//! come from root's own configuration (a file of root's, mode 0600, or it is refused), so
//! nothing the unprivileged daemon can write reaches them.
//!
//! - `post_up` runs at the end of the setup, before the privilege drop: the TUN is up with its
//!   addresses and routes, the rules are in. Each command's output is logged; one that fails
//!   stops the start, and everything set up so far is removed.
//! - `pre_down` must run as root too, at the stop, after the daemon has become its user. So a
//!   small root process is started before the drop: a shell that ignores the termination
//!   signals, waits for one line (or end of file) on a pipe, and then runs the commands. The
//!   daemon holds the only other end and can do nothing with it but write or close: it
//!   triggers the commands at a clean stop (before the TUN goes) and waits for them; when the
//!   daemon dies (SIGKILL), the pipe's end of file triggers them as well.

use std::io::{self, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long the stop waits for the `pre_down` commands.
const PRE_DOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// `cmd` with `%i` replaced by `iface`.
pub fn expand(cmd: &str, iface: &str) -> String {
    cmd.replace("%i", iface)
}

/// Run the `post_up` commands in order; the first that fails (or cannot start) is the error.
pub fn post_up(cmds: &[String], iface: &str) -> io::Result<()> {
    for (n, c) in cmds.iter().enumerate() {
        let cmd = expand(c, iface);
        let out = Command::new("/bin/sh")
            .args(["-c", &cmd])
            .env("ESPIP_INTERFACE", iface)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("post_up[{n}] {cmd:?}: {e}")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            info!(hook = "post_up", command = n, "{}", line.escape_debug());
        }
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "post_up[{n}] {cmd:?} failed ({}); the start is undone",
                out.status
            )));
        }
        info!(hook = "post_up", command = n, "{cmd}: done");
    }
    Ok(())
}

/// The root process that runs `pre_down` at the stop (see the module documentation).
pub struct PreDown {
    child: Option<Child>,
    trigger: Option<ChildStdin>,
}

impl PreDown {
    /// Start the waiting root process for `cmds` (none: nothing to start).
    pub fn start(cmds: &[String], iface: &str) -> io::Result<Option<PreDown>> {
        if cmds.is_empty() {
            return Ok(None);
        }
        let body: String = cmds
            .iter()
            .enumerate()
            .map(|(n, c)| {
                format!(
                    "( {} ) || echo \"espip: pre_down[{n}] failed with status $?\" >&2\n",
                    expand(c, iface)
                )
            })
            .collect();
        // The shell outlives a stop signal sent to the whole group (systemd's KillMode), so
        // it is still there when the daemon triggers it.
        let script = format!("trap '' TERM INT HUP\nread -r _ || true\n{body}");
        let child = Command::new("/bin/sh")
            .args(["-c", &script])
            .env("ESPIP_INTERFACE", iface)
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting the pre_down process: {e}")))?;
        let mut p = PreDown {
            child: Some(child),
            trigger: None,
        };
        p.trigger = p.child.as_mut().and_then(|c| c.stdin.take());
        Ok(Some(p))
    }

    /// Run the commands now and wait for them (at most [`PRE_DOWN_TIMEOUT`]).
    pub fn run(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(mut t) = self.trigger.take() {
            let _ = t.write_all(b"stop\n");
        }
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    info!(hook = "pre_down", "pre_down commands ran ({status})");
                    return;
                }
                Ok(None) if start.elapsed() < PRE_DOWN_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    warn!(
                        "pre_down commands still running after {} s; the stop goes on without them",
                        PRE_DOWN_TIMEOUT.as_secs()
                    );
                    return;
                }
                Err(e) => {
                    warn!("waiting for the pre_down commands: {e}");
                    return;
                }
            }
        }
    }
}

impl Drop for PreDown {
    /// A stop that did not [`PreDown::run`] them (a failed start after `post_up`) runs them
    /// here.
    fn drop(&mut self) {
        self.run();
    }
}

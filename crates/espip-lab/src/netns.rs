//! Network namespaces, veth links and processes inside them, for the labs and the tests.
//!
//! Every namespace is named `espip-<tag>-<pid>-<host>` and deleted when its [`Netns`] drops
//! (processes inside are killed first), so a failing test or lab leaves nothing behind; a lab
//! killed with SIGKILL is cleaned by the next run ([`remove_stale`]).

use std::io;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Prefix of every namespace espip creates.
pub const PREFIX: &str = "espip-";

/// Whether the daemons this process starts outlive it (a lab run with `--keep`).
static DAEMONS_OUTLIVE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Let the daemons started from now on outlive this process (`--keep`: `espip lab down` stops
/// them), or not (the default: a lab killed by SIGTERM or SIGKILL takes its daemons with it).
pub fn daemons_outlive_lab(on: bool) {
    DAEMONS_OUTLIVE.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Run a command, returning its output; an error names the command.
pub fn run(cmd: &mut Command) -> io::Result<Output> {
    let out = cmd
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("{:?}: {e}", cmd.get_program())))?;
    Ok(out)
}

/// Run a command that must succeed.
pub fn run_ok(cmd: &mut Command) -> io::Result<Output> {
    let out = run(cmd)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{:?} {:?} failed: {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// A network namespace that is deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Create `espip-<tag>-<pid>-<host>` with loopback up.
    pub fn new(tag: &str, host: &str) -> io::Result<Netns> {
        let name = format!("{PREFIX}{tag}-{}-{host}", std::process::id());
        let _ = run(Command::new("ip").args(["netns", "del", &name]));
        run_ok(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// `ip -n NS ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> io::Result<Output> {
        run_ok(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Set a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        run_ok(
            self.command("sysctl")
                .args(["-qw", &format!("{key}={value}")]),
        )?;
        Ok(())
    }

    /// True if interface `dev` exists in the namespace.
    pub fn has_link(&self, dev: &str) -> bool {
        run(Command::new("ip").args(["-n", &self.name, "link", "show", dev]))
            .map(|o| o.status.success())
            .unwrap_or(false)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete(&self.name);
    }
}

/// Tear down a lab left running with `--keep`: every namespace named `<lab>-<host>`; their
/// processes get SIGTERM (espip daemons remove their rules and restore their settings), then
/// SIGKILL after 5 s if still there, then the namespaces are deleted. Returns their names.
pub fn down(lab: &str) -> io::Result<Vec<String>> {
    let valid = lab.starts_with(PREFIX)
        && lab.len() > PREFIX.len()
        && lab
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err(io::Error::other(format!(
            "{lab:?} is not a lab name: expected {PREFIX}<lab>-<pid> as `--keep` printed it"
        )));
    }
    let out = run_ok(Command::new("ip").args(["netns", "list"]))?;
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.strip_prefix(lab).is_some_and(|h| h.starts_with('-')))
        .map(str::to_string)
        .collect();
    let pids = |name: &str| -> Vec<i32> {
        run(Command::new("ip").args(["netns", "pids", name]))
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    for n in &names {
        for pid in pids(n) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while names.iter().any(|n| !pids(n).is_empty()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in &names {
        delete(n);
    }
    Ok(names)
}

/// Kill every process in namespace `name`, then delete it.
fn delete(name: &str) {
    if let Ok(out) = run(Command::new("ip").args(["netns", "pids", name])) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let _ = run(Command::new("ip").args(["netns", "del", name]));
}

/// A veth pair: `dev_a` in `a`, its peer `dev_b` in `b` (both down, no address).
pub fn veth_pair(a: &Netns, dev_a: &str, b: &Netns, dev_b: &str) -> io::Result<()> {
    run_ok(Command::new("ip").args([
        "link",
        "add",
        dev_a,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        dev_b,
        "netns",
        b.name(),
    ]))?;
    Ok(())
}

/// Join two namespaces with a veth pair; each end is named `dev` inside its namespace, gets
/// `addr_a`/`addr_b` (CIDR) and is set up. IPv6 is turned off on the link so that captures show
/// only the lab's own traffic.
pub fn veth(a: &Netns, addr_a: &str, b: &Netns, addr_b: &str, dev: &str) -> io::Result<()> {
    veth_pair(a, dev, b, dev)?;
    for (ns, addr) in [(a, addr_a), (b, addr_b)] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1")?;
        ns.ip(&["addr", "add", addr, "dev", dev])?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    Ok(())
}

/// Delete `espip-*-<pid>-*` namespaces whose creating process is gone (left by a lab or test
/// that was killed). Returns the names removed.
pub fn remove_stale() -> Vec<String> {
    let Ok(out) = run(Command::new("ip").args(["netns", "list"])) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').find_map(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                delete(name);
                removed.push(name.to_string());
            }
        }
    }
    removed
}

/// An `espip run` inside a namespace.
pub struct Daemon {
    child: Option<Child>,
    log: std::path::PathBuf,
}

impl Daemon {
    /// Start `exe run --config CONFIG` in `ns`, logging to `log`, and wait until it reports
    /// ready (or fails).
    pub fn start(ns: &Netns, exe: &Path, config: &Path, log: &Path) -> io::Result<Daemon> {
        Daemon::start_with_env(ns, exe, config, log, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_with_env(
        ns: &Netns,
        exe: &Path,
        config: &Path,
        log: &Path,
        env: &[(&str, &str)],
    ) -> io::Result<Daemon> {
        let file = std::fs::File::create(log)?;
        let mut cmd = ns.command(exe);
        // A lab killed (SIGTERM, SIGKILL) takes its daemons with it; they undo their setup and
        // the next lab removes the namespaces (`remove_stale`). A kept lab leaves them to
        // `espip lab down`.
        if !DAEMONS_OUTLIVE.load(std::sync::atomic::Ordering::Relaxed) {
            espip_sys::proc::die_with_parent(&mut cmd);
        }
        let child = cmd
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()?;
        let mut d = Daemon {
            child: Some(child),
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("espip ready") {
                return Ok(d);
            }
            if let Some(c) = d.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    d.child = None;
                    return Err(io::Error::other(format!(
                        "espip in {} exited ({status}) before it was ready:\n{}",
                        ns.name(),
                        text.trim()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(io::Error::other(format!(
                    "espip in {} not ready after 15 s:\n{}",
                    ns.name(),
                    text.trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Stop with `signal` and wait up to 10 s; returns whether it exited successfully.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> io::Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(false);
        };
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = c.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Wait up to `timeout` for the daemon to exit on its own; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> io::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        while let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(None)
    }

    /// Stop with SIGTERM; true if it exited cleanly.
    pub fn stop(&mut self) -> io::Result<bool> {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Create bridge `bridge` (a switch: no address) in `ns`, up. Keep switches in namespaces of
/// their own: with br_netfilter loaded, bridged frames traverse the iptables FORWARD chain of
/// the namespace holding the bridge.
pub fn bridge(ns: &Netns, bridge: &str) -> io::Result<()> {
    ns.ip(&["link", "add", bridge, "type", "bridge"])?;
    ns.ip(&["link", "set", bridge, "up"])?;
    Ok(())
}

/// Plug `host` into `bridge` of namespace `sw` with a veth: `dev` with `addr` in the host,
/// `port` (unique in `sw`) on the bridge.
pub fn plug(
    host: &Netns,
    dev: &str,
    addr: &str,
    sw: &Netns,
    bridge: &str,
    port: &str,
) -> io::Result<()> {
    veth_pair(host, dev, sw, port)?;
    host.sysctl(&format!("net.ipv6.conf.{dev}.disable_ipv6"), "1")?;
    host.ip(&["addr", "add", addr, "dev", dev])?;
    host.ip(&["link", "set", dev, "up"])?;
    sw.ip(&["link", "set", port, "master", bridge])?;
    sw.ip(&["link", "set", port, "up"])?;
    Ok(())
}

//! `espip lab`: the scenarios of SCENARIOS.md built from network namespaces on one machine,
//! with their checks and a report. The labs are also the integration tests' harness.

pub mod gateway;
pub mod hub;
pub mod netns;
pub mod p2p;
pub mod pcap;
pub mod same_lan;
pub mod transfer;
pub mod upstream;

use std::io;
use std::process::Command;

/// Programs a lab runs, with the Debian package that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("ping", "iputils-ping"),
    ("tcpdump", "tcpdump"),
    ("sysctl", "procps"),
];

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// Make sure the lab's programs are installed: install the missing Debian packages with apt-get
/// when running as root and `install` is true, otherwise fail naming them.
pub fn ensure_tools(tools: &[(&str, &str)], install: bool) -> io::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(p, _)| !have(p))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let is_root = nix::unistd::geteuid().is_root();
    if install && is_root && have("apt-get") {
        eprintln!("espip lab: installing {}", missing.join(" "));
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
        let st = Command::new("apt-get")
            .args(["install", "-y", "-qq"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if st.success() && tools.iter().all(|(p, _)| have(p)) {
            return Ok(());
        }
    }
    Err(io::Error::other(format!(
        "missing programs; install the Debian packages: apt-get install {}",
        missing.join(" ")
    )))
}

/// Stop a tcpdump started by a lab so that its file holds every packet captured: tcpdump
/// reads the kernel's ring in blocks that are handed over when full or after a timeout (about
/// one second), and a block still open at SIGINT would be lost.
pub fn stop_capture(mut tcpdump: std::process::Child) {
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(tcpdump.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = tcpdump.wait();
}

/// Fail unless running as root (namespaces, TUN and raw sockets need it).
pub fn ensure_root() -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(io::Error::other(
            "the labs create network namespaces, TUN devices and raw sockets: run as root (sudo)",
        ))
    }
}

/// One check of a lab and its outcome.
#[derive(Debug, Clone)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// Measured detail.
    pub detail: String,
}

/// The result of a lab run.
#[derive(Debug, Default)]
pub struct Report {
    /// Title line.
    pub title: String,
    /// Checks in order.
    pub checks: Vec<Check>,
    /// Extra lines (counters, how to explore).
    pub notes: Vec<String>,
}

impl Report {
    /// Record a check.
    pub fn check(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        let c = Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        };
        println!(
            "  [{}] {}: {}",
            if c.ok { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        self.checks.push(c);
    }

    /// True if every check passed (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.ok)
    }

    /// The end of the report (the checks were printed as they ran): notes and totals.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for n in &self.notes {
            s.push_str(&format!("  {n}\n"));
        }
        let failed = self.checks.iter().filter(|c| !c.ok).count();
        s.push_str(&format!(
            "{} passed, {} failed\n",
            self.checks.len() - failed,
            failed
        ));
        s
    }
}

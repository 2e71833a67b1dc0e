//! `espip lab`: the scenarios of SCENARIOS.md built from network namespaces on one machine,
//! with their checks and a report. The labs are also the integration tests' harness.

pub mod flood;
pub mod gateway;
pub mod hub;
pub mod ike;
pub mod multipath;
pub mod netns;
pub mod p2p;
pub mod pcap;
pub mod relay;
pub mod roaming;
pub mod same_lan;
pub mod transfer;
pub mod upstream;

use std::io;
use std::path::Path;
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
/// `espip lab-tool http-serve` in `ns` on `listen` answering as host `name`, given 300 ms to
/// listen; killing it and reading its stdout gives its access log.
pub fn http_server(
    ns: &netns::Netns,
    exe: &Path,
    listen: &str,
    name: &str,
) -> io::Result<std::process::Child> {
    let child = ns
        .command(exe)
        .args(["lab-tool", "http-serve", "--listen", listen, "--name", name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    Ok(child)
}

/// What every `espip lab` scenario takes besides its own options.
#[derive(Debug, Clone)]
pub struct LabRun {
    /// Leave the namespaces and daemons running afterwards (`espip lab down NAME` ends them).
    pub keep: bool,
    /// Keep configs, logs, captures and the `esp_sa` file here.
    pub pcap_dir: Option<std::path::PathBuf>,
    /// Install missing Debian packages.
    pub install: bool,
    /// The espip binary the lab's daemons run.
    pub exe: std::path::PathBuf,
}

impl LabRun {
    /// The start every scenario shares: root, the programs (`TOOLS` and `extra`), namespaces
    /// a killed lab left removed (and noted), the title printed, the working directory made.
    /// Returns the report to fill, the working directory and whether to keep it.
    pub fn begin(
        &self,
        lab: &str,
        title: String,
        extra: &[(&str, &str)],
    ) -> io::Result<(Report, std::path::PathBuf, bool)> {
        ensure_root()?;
        ensure_tools(TOOLS, self.install)?;
        ensure_tools(extra, self.install)?;
        let stale = netns::remove_stale();
        let mut report = Report {
            title,
            ..Default::default()
        };
        println!("{}", report.title);
        if !stale.is_empty() {
            report
                .notes
                .push(format!("removed stale namespaces: {}", stale.join(" ")));
        }
        let (work, keep) = work_dir(lab, self.pcap_dir.as_deref(), self.keep)?;
        netns::daemons_outlive_lab(self.keep);
        Ok((report, work, keep))
    }
}

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

/// Start `tcpdump` on `dev` in `ns`, writing every full frame to `file` (a 64 MiB kernel buffer
/// so that a fast transfer is not dropped), and wait until it listens.
pub fn start_capture(
    ns: &netns::Netns,
    dev: &str,
    file: &std::path::Path,
) -> io::Result<std::process::Child> {
    let log = file.with_extension("tcpdump.log");
    let child = ns
        .command("tcpdump")
        .args(["-i", dev, "-n", "-U", "-B", "65536", "-s", "0", "-w"])
        .arg(file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    for _ in 0..100 {
        if std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("listening on")
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(child)
}

/// What one transfer through a lab moved.
#[derive(Debug, Clone)]
pub struct TransferResult {
    /// Digest printed by the source.
    pub sent: Result<transfer::Digest, transfer::NotADigest>,
    /// Digest printed by the sink.
    pub got: Result<transfer::Digest, transfer::NotADigest>,
    /// From the sink's start to the source's end.
    pub elapsed: std::time::Duration,
}

impl TransferResult {
    /// Both ends saw the same `bytes` bytes with the same hash.
    pub fn ok(&self, bytes: u64) -> bool {
        matches!((&self.sent, &self.got), (Ok(s), Ok(g)) if s == g && s.bytes == bytes)
    }

    /// Goodput in Mbit/s (setup included).
    pub fn mbit_s(&self) -> f64 {
        let bytes = self.got.as_ref().map_or(0, |g| g.bytes);
        bytes as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// Move `bytes` over TCP from `from` to `to_addr:5001` (a sink in `to`), hashing both ends.
pub fn transfer(
    exe: &std::path::Path,
    ends: (&netns::Netns, &netns::Netns),
    to_addr: &str,
    bytes: u64,
) -> io::Result<TransferResult> {
    transfer_on(exe, ends, to_addr, 5001, bytes)
}

/// [`transfer`] to TCP port `port` (several at once need a port each).
pub fn transfer_on(
    exe: &std::path::Path,
    (from, to): (&netns::Netns, &netns::Netns),
    to_addr: &str,
    port: u16,
    bytes: u64,
) -> io::Result<TransferResult> {
    let target = format!("{to_addr}:{port}");
    let sink = to
        .command(exe)
        .args(["lab-tool", "sink", "--listen", &target])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let started = std::time::Instant::now();
    let src_out = netns::run(from.command(exe).args([
        "lab-tool",
        "source",
        "--connect",
        &target,
        "--bytes",
        &bytes.to_string(),
    ]))?;
    let elapsed = started.elapsed();
    // The sink ends when the source closes; one that never got a connection (the source gave
    // up: no path through the tunnel) is stopped, so a broken tunnel fails the transfer
    // instead of hanging it.
    let mut sink = sink;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sink.try_wait()?.is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = sink.kill();
    let sink_out = sink.wait_with_output()?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
    let parse = |o: &std::process::Output| {
        text(&o.stdout)
            .parse::<transfer::Digest>()
            // What the tool printed instead, its errors included.
            .map_err(|_| transfer::NotADigest(format!("{} {}", text(&o.stdout), text(&o.stderr))))
    };
    Ok(TransferResult {
        sent: parse(&src_out),
        got: parse(&sink_out),
        elapsed,
    })
}

/// Run [`transfer`] and record it as a check: both ends must hold the same bytes.
pub fn transfer_check(
    report: &mut Report,
    name: String,
    exe: &std::path::Path,
    ends: (&netns::Netns, &netns::Netns),
    to_addr: &str,
    bytes: u64,
) -> io::Result<()> {
    let r = transfer(exe, ends, to_addr, bytes)?;
    match (&r.sent, &r.got) {
        (Ok(s), Ok(g)) => report.check(
            name,
            r.ok(bytes),
            format!(
                "sent {} received {}; sha256 {} {} ({:.0} Mbit/s incl. setup)",
                s.bytes,
                g.bytes,
                &s.sha256[..16],
                if s == g { "==" } else { "!=" },
                r.mbit_s()
            ),
        ),
        (s, g) => report.check(name, false, format!("source: {s:?}; sink: {g:?}")),
    }
    Ok(())
}

/// Wait (at most 5 s) until the daemon at `control` has sent and received nothing for half a
/// second, so that a capture stopped afterwards holds every packet its counters count.
pub fn settle(control: &std::path::Path) {
    let totals = || -> Option<u64> {
        let raw = espip_api::client::request(control, "status").ok()?;
        let st: espip_api::status::Status = serde_json::from_slice(&raw).ok()?;
        Some(st.peers.iter().map(|p| p.tx_packets + p.rx_packets).sum())
    };
    let start = std::time::Instant::now();
    let mut last = totals();
    while start.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let now = totals();
        if now == last {
            return;
        }
        last = now;
    }
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

    /// Note that the lab was left running (`--keep`), with the commands to enter each namespace
    /// and to tear everything down.
    pub fn kept(&mut self, namespaces: &[&netns::Netns], work: Option<&std::path::Path>) {
        self.notes
            .push("left running (--keep). Explore with:".into());
        for ns in namespaces {
            self.notes
                .push(format!("  ip netns exec {} bash", ns.name()));
        }
        if let Some(w) = work {
            self.notes
                .push(format!("configs, logs and captures in {}", w.display()));
        }
        // `ip netns del` alone would leave the daemons running: `lab down` stops them first.
        let pid = format!("-{}-", std::process::id());
        if let Some(lab) = namespaces
            .first()
            .and_then(|n| n.name().find(&pid).map(|i| &n.name()[..i + pid.len() - 1]))
        {
            self.notes.push(format!(
                "tear down (stops the daemons, deletes the namespaces) with: espip lab down {lab}"
            ));
        }
    }

    /// `--keep`: name what stays and leave it running. The namespaces and `parts` (daemons,
    /// captures, relays) are forgotten rather than dropped, so nothing tears them down; `espip
    /// lab down NAME` does.
    pub fn keep_running<T>(&mut self, namespaces: Vec<netns::Netns>, work: &Path, parts: T) {
        self.kept(&namespaces.iter().collect::<Vec<_>>(), Some(work));
        std::mem::forget(parts);
        std::mem::forget(namespaces);
    }

    /// Stop the daemons with SIGTERM: the check "clean stop" passes when each exits 0 and its
    /// namespace has no `espip0` left.
    pub fn clean_stop(
        &mut self,
        daemons: &mut [(&netns::Netns, &mut netns::Daemon)],
    ) -> io::Result<()> {
        let mut clean = true;
        for (_, d) in daemons.iter_mut() {
            clean &= d.stop()?;
        }
        let gone = daemons.iter().all(|(ns, _)| !ns.has_link("espip0"));
        self.check(
            "clean stop",
            clean && gone,
            format!(
                "SIGTERM: {}; espip0 {}",
                if clean {
                    "every daemon exited 0"
                } else {
                    "a daemon exited non-zero"
                },
                if gone {
                    "removed everywhere"
                } else {
                    "LEFT BEHIND"
                }
            ),
        );
        Ok(())
    }

    /// One note per daemon with the totals it logged when it stopped: packets and bytes each
    /// way, and its drops by reason.
    pub fn note_totals(&mut self, daemons: &[(&str, &netns::Daemon)]) {
        for (host, d) in daemons {
            let log = d.log();
            let field = |k| p2p::log_field(&log, "peer totals", k).unwrap_or_else(|| "?".into());
            self.notes.push(format!(
                "{host}: tx {} packets / {} bytes, rx {} packets / {} bytes, drops [{}]",
                field("tx_packets"),
                field("tx_bytes"),
                field("rx_packets"),
                field("rx_bytes"),
                p2p::log_field(&log, "drop totals", "drops").unwrap_or_default()
            ));
        }
    }

    /// The lab's work directory: named in a note with what it holds (`contents`) when it is
    /// kept, else removed.
    pub fn finish_work(&mut self, work: &Path, keep: bool, contents: &str) {
        if keep {
            self.notes.push(format!("{contents} in {}", work.display()));
        } else {
            let _ = std::fs::remove_dir_all(work);
        }
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

/// The `state_dir` and `control` lines of a lab host's `[interface]`: each daemon keeps its
/// sequence state and its control socket in its own directory, so several daemons with the
/// same interface name (in different namespaces) do not meet.
pub(crate) fn state_lines(state_dir: &Path) -> String {
    format!(
        "state_dir = \"{}\"\ncontrol = \"{}\"\n",
        state_dir.display(),
        state_dir.join("control.sock").display()
    )
}

/// The `[capture]` section of a lab host when the lab runs with `--pcap DIR`: the daemon's own
/// taps write `DIR/<host>/espip0-inner.pcap` and `-outer.pcap`.
pub(crate) fn capture_lines(pcap_dir: Option<&Path>, host: &str) -> String {
    match pcap_dir {
        Some(d) => format!(
            "\n[capture]\ndir = \"{}\"\ninner = true\nouter = true\n",
            d.join(format!("host-{host}")).display()
        ),
        None => String::new(),
    }
}

/// Write Wireshark's `esp_sa` file from a running daemon's SAs, exactly as
/// `espip sa --wireshark --write FILE` does. Returns the number of SA lines.
pub(crate) fn export_esp_sa(control: &Path, to: &Path) -> io::Result<usize> {
    let raw = zeroize::Zeroizing::new(
        espip_api::client::request(control, "sa-keys").map_err(io::Error::other)?,
    );
    let sas: Vec<espip_api::status::SaExport> =
        serde_json::from_slice(&raw).map_err(io::Error::other)?;
    let mut text = zeroize::Zeroizing::new(String::new());
    let mut n = 0;
    for line in sas.iter().filter_map(|s| s.wireshark.as_deref()) {
        text.push_str(line);
        text.push('\n');
        n += 1;
    }
    if n > 0 {
        p2p::write_private(to, &text)?;
    }
    Ok(n)
}

/// The lab's working directory (configs, logs, state, captures): `pcap_dir` when the user gave
/// one (kept afterwards), else a fresh temporary directory (kept only with `--keep`).
/// Returns the directory and whether to keep it.
pub(crate) fn work_dir(
    lab: &str,
    pcap_dir: Option<&Path>,
    keep: bool,
) -> io::Result<(std::path::PathBuf, bool)> {
    use std::os::unix::fs::PermissionsExt;
    let (work, kept) = match pcap_dir {
        Some(d) => (d.to_path_buf(), true),
        None => (
            std::env::temp_dir().join(format!("espip-lab-{lab}-{}", std::process::id())),
            keep,
        ),
    };
    std::fs::create_dir_all(&work)?;
    // 0711: the daemons, which drop to their user `espip` after setup, must reach the capture
    // directories espip creates for them in here; no one else can list or read what is here
    // (configs are 0600, the state directories root's 0700).
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o711))?;
    Ok((work, kept))
}

//! The shared harness of the namespace tests (real TUN, raw sockets, routes, captures,
//! independent ESP peers: scapy, tshark), one file per thing they prove (labs, interop,
//! lifecycle, rules, control, hostile, hostile_host, offload). They need root; without it they fail, unless ESPIP_SKIP_NETNS=1 says
//! to skip them (for a developer's unprivileged `cargo test`). Namespaces are named
//! `espip-<tag>-<pid>-<host>` and deleted when a test ends, also when it fails.

// Each test file uses a part of the harness.
#![allow(dead_code, unused_imports)]
pub use espip::sa::Cipher;
pub use espip_lab::netns::{self, Daemon, Netns};
pub use espip_lab::p2p::{self, LabKeys, LabMode, SPI_A_TO_B, SPI_B_TO_A};
pub use std::path::{Path, PathBuf};
pub use std::process::Command;
pub use std::sync::Mutex;

/// The heavy tests share two cores; one at a time keeps their timing honest.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// The binary under test; `ESPIP_TEST_EXE` points the tests at another build (to show that
/// a test fails on a version with the defect it guards against).
pub fn exe() -> PathBuf {
    std::env::var_os("ESPIP_TEST_EXE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_espip")))
}

pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var_os("ESPIP_SKIP_NETNS").is_some() {
        eprintln!("skipped: not root and ESPIP_SKIP_NETNS is set");
        return false;
    }
    panic!("namespace tests need root (or set ESPIP_SKIP_NETNS=1 to skip them)");
}

/// The prologue of every namespace test: `None` (skip) without root when ESPIP_SKIP_NETNS is
/// set, otherwise the guard that runs the heavy tests one at a time.
pub fn serial() -> Option<std::sync::MutexGuard<'static, ()>> {
    privileged().then(|| SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Run `espip lab ARGS --no-install`, require it to succeed, and return its report. With
/// `ESPIP_LAB_WORK=DIR` set, the lab keeps its configs, logs and captures in a directory of
/// DIR named after its arguments (`--pcap`), to read after a failure.
pub fn lab_scenario(args: &[&str]) -> String {
    let mut cmd = Command::new(exe());
    cmd.arg("lab").args(args).arg("--no-install");
    if let Some(dir) = std::env::var_os("ESPIP_LAB_WORK") {
        // Short: the control socket inside must fit a sockaddr_un (108 bytes).
        let name: String = args
            .iter()
            .flat_map(|a| a.trim_start_matches('-').chars().take(6).chain(['_']))
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(40)
            .collect();
        cmd.arg("--pcap").arg(Path::new(&dir).join(name));
    }
    let out = cmd.output().expect("run espip lab");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "lab {args:?} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

pub fn lab(args: &[&str]) -> String {
    let out = Command::new(exe())
        .args(["lab", "p2p", "--no-install"])
        .args(args)
        .output()
        .expect("run espip lab");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "lab p2p {args:?} failed:\n{text}");
    assert!(text.contains(" 0 failed"), "{text}");
    text
}

/// Two namespaces on a veth with espip running in A only, from the lab's own config.
pub struct HalfLab {
    pub a: Netns,
    pub b: Netns,
    pub daemon: Daemon,
    pub keys: LabKeys,
    pub dir: PathBuf,
}

impl Drop for HalfLab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn half_lab(tag: &str, cipher: Cipher) -> HalfLab {
    half_lab_with(tag, cipher, "")
}

/// `half_lab` with `extra` appended to A's configuration.
pub fn half_lab_with(tag: &str, cipher: Cipher, extra: &str) -> HalfLab {
    half_lab_mode(tag, LabMode::Esp(cipher), cipher, extra)
}

pub fn half_lab_mode(tag: &str, mode: LabMode, cipher: Cipher, extra: &str) -> HalfLab {
    half_lab_over(tag, mode, cipher, extra, false)
}

/// `half_lab_mode` over an IPv6 underlay when `outer_v6` (A 2001:db8:2::1, B ::2).
pub fn half_lab_over(
    tag: &str,
    mode: LabMode,
    cipher: Cipher,
    extra: &str,
    outer_v6: bool,
) -> HalfLab {
    let (a, b) = if outer_v6 {
        p2p::topology_v6(tag).unwrap()
    } else {
        p2p::topology(tag).unwrap()
    };
    let keys = LabKeys::generate(cipher).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("a.toml");
    std::fs::write(
        &cfg,
        p2p::config_text_over(mode, true, Some(&keys), false, &dir.join("state"), outer_v6) + extra,
    )
    .unwrap();
    let daemon = Daemon::start(&a, &exe(), &cfg, &dir.join("a.log")).unwrap();
    HalfLab {
        a,
        b,
        daemon,
        keys,
        dir,
    }
}

/// The `espip show --json` snapshot of a half lab's daemon.
pub fn status(h: &HalfLab) -> espip::status::Status {
    status_at(&h.dir.join("state/control.sock"))
}

/// The `espip show --json` snapshot of the daemon at `socket`.
pub fn status_at(socket: &Path) -> espip::status::Status {
    let show = Command::new(exe())
        .args(["show", "--json", "--socket"])
        .arg(socket)
        .output()
        .unwrap();
    assert!(
        show.status.success(),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    serde_json::from_slice(&show.stdout).unwrap()
}

/// Both hosts of the p2p lab with a daemon each (esp), from the lab's own configs;
/// `b_interface` is added to B's `[interface]`.
pub struct FullPair {
    pub a: Netns,
    pub b: Netns,
    pub daemons: Vec<Daemon>,
    pub dir: PathBuf,
}

impl Drop for FullPair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn full_pair(tag: &str, cipher: Cipher, b_interface: &str) -> FullPair {
    full_pair_edit(tag, LabMode::Esp(cipher), cipher, |me_a, t| {
        if me_a {
            t
        } else {
            t.replace("[interface]\n", &format!("[interface]\n{b_interface}"))
        }
    })
}

/// Both hosts of the p2p lab in `mode`, each configuration text passed through `edit(me_a, text)`.
pub fn full_pair_edit(
    tag: &str,
    mode: LabMode,
    cipher: Cipher,
    edit: impl Fn(bool, String) -> String,
) -> FullPair {
    let (a, b) = p2p::topology(tag).unwrap();
    let keys = LabKeys::generate(cipher).unwrap();
    let dir = std::env::temp_dir().join(format!("espip-test-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut daemons = Vec::new();
    for (me_a, ns, host) in [(true, &a, "a"), (false, &b, "b")] {
        let cfg = dir.join(format!("{host}.toml"));
        let text = p2p::config_text(
            mode,
            me_a,
            Some(&keys),
            false,
            &dir.join(format!("state-{host}")),
        );
        std::fs::write(&cfg, edit(me_a, text)).unwrap();
        daemons.push(Daemon::start(ns, &exe(), &cfg, &dir.join(format!("{host}.log"))).unwrap());
    }
    FullPair { a, b, daemons, dir }
}

pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Write `text` to `path`, mode 0600 (configurations and key files).
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
}

/// Poll `what` every 100 ms until it holds or `timeout` passed; whether it held.
pub fn wait(timeout: std::time::Duration, what: impl Fn() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if what() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    what()
}

/// One IKE or CHILD SA as `espip show --json` reports it: (peer, "kind SPIs", state).
pub type IkeSaRow = (String, String, String);

/// Every IKE SA and CHILD_SA of the daemon at control socket `ctl` (none without an answer).
pub fn ike_sas(ctl: &Path) -> Vec<IkeSaRow> {
    let out = Command::new(exe())
        .args(["show", "--json", "--socket"])
        .arg(ctl)
        .output()
        .unwrap();
    if !out.status.success() {
        return Vec::new();
    }
    let s: espip::status::Status = serde_json::from_slice(&out.stdout).unwrap();
    s.ike
        .iter()
        .flat_map(|p| {
            p.sas.iter().map(|sa| {
                (
                    p.peer.clone(),
                    format!("{} {}", sa.kind, sa.spis),
                    sa.state.clone(),
                )
            })
        })
        .collect()
}
